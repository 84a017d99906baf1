#![no_main]
//! `meshid::fuzzing::csr` under libFuzzer (see tools/fuzz.sh).
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshid::fuzzing::csr(data));
