#![no_main]
//! `meshid::fuzzing::istio_csr` under libFuzzer (see tools/fuzz.sh).
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshid::fuzzing::istio_csr(data));
