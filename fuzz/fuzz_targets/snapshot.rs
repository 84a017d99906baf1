#![no_main]
//! `meshid::fuzzing::snapshot` under libFuzzer (see tools/fuzz.sh).
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshid::fuzzing::snapshot(data));
