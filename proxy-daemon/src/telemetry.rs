//! Logging: tracing, text or JSON, with a filter that /logging can change at run time.
//! eBPF programs' aya-log records arrive through the `log` crate and are bridged here.
use std::sync::{Arc, Mutex};

use tracing_subscriber::{prelude::*, reload, EnvFilter, Registry};

use crate::cli::LogFormat;

#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Arc<Mutex<String>>,
    /// Flushes the access log's queue when the last copy goes (at exit).
    _access_log: Arc<tracing_appender::non_blocking::WorkerGuard>,
}

impl LogControl {
    pub fn set_filter(&self, filter: &str) -> Result<(), String> {
        let parsed =
            EnvFilter::try_new(filter).map_err(|e| format!("bad filter {filter:?}: {e}"))?;
        self.handle.reload(parsed).map_err(|e| e.to_string())?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = filter.to_string();
        Ok(())
    }

    pub fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

pub fn init(format: LogFormat, filter: &str) -> Result<LogControl, String> {
    let parsed = EnvFilter::try_new(filter).map_err(|e| format!("--log-level {filter:?}: {e}"))?;
    let (filter_layer, handle) = reload::Layer::new(parsed);
    crate::proxy::access_log::set_format(match format {
        LogFormat::Text => crate::proxy::access_log::LogFormat::Text,
        LogFormat::Json => crate::proxy::access_log::LogFormat::Json,
    });
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        // The queue is allocated up front: 8,192 lines is ~40 ms of a busy node's
        // requests, and 0.25 MiB rather than the 4 MiB of the default 128,000.
        .buffered_lines_limit(8192)
        .thread_name("access-log")
        .finish(std::io::stderr());
    crate::proxy::access_log::set_writer(writer);
    let registry = tracing_subscriber::registry().with(filter_layer);
    let result = match format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    result.map_err(|e| e.to_string())?;
    Ok(LogControl {
        handle,
        current: Arc::new(Mutex::new(filter.to_string())),
        _access_log: Arc::new(guard),
    })
}
