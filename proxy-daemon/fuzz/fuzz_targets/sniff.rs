#![no_main]
// See proxy_daemon::fuzzing::sniff for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| proxy_daemon::fuzzing::run("sniff", data));
