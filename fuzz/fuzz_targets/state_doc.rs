#![no_main]
//! `meshid::fuzzing::state_doc` under libFuzzer (see tools/fuzz.sh).
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshid::fuzzing::state_doc(data));
