#![no_main]
//! `meshid::fuzzing::kubeconfig` under libFuzzer (see tools/fuzz.sh).
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshid::fuzzing::kubeconfig(data));
