#![no_main]
//! `meshid::fuzzing::jwt` under libFuzzer (see tools/fuzz.sh).
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshid::fuzzing::jwt(data));
