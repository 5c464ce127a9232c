pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_REVISION: &str = match option_env!("PROXY_DAEMON_GIT_REVISION") {
    Some(r) => r,
    None => "unknown",
};
