#![no_main]
// See proxy_daemon::fuzzing::client_hello for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| proxy_daemon::fuzzing::run("client_hello", data));
