#![no_main]
//! `meshid::fuzzing::spiffe_id` under libFuzzer (see tools/fuzz.sh).
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshid::fuzzing::spiffe_id(data));
