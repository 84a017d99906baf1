#![no_main]
//! `meshid::fuzzing::xds` under libFuzzer (see tools/fuzz.sh).
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshid::fuzzing::xds(data));
