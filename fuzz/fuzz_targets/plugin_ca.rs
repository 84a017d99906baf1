#![no_main]
//! `meshid::fuzzing::plugin_ca` under libFuzzer (see tools/fuzz.sh).
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshid::fuzzing::plugin_ca(data));
