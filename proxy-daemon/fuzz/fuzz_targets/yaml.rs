#![no_main]
// See proxy_daemon::fuzzing::yaml for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| proxy_daemon::fuzzing::run("yaml", data));
