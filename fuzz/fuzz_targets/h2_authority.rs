#![no_main]
//! `meshid::fuzzing::h2_authority` under libFuzzer (see tools/fuzz.sh).
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshid::fuzzing::h2_authority(data));
