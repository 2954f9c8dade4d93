#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keel_fuzz::rfc2136_answer(data));
