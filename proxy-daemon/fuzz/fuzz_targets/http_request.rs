#![no_main]
// See proxy_daemon::fuzzing::http_request for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| proxy_daemon::fuzzing::run("http_request", data));
