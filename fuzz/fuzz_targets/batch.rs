#![no_main]
//! Fuzz target: batch validation (all or nothing) and hole analysis.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::batch(data));
