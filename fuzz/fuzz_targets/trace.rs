#![no_main]
//! Fuzz target: the QEMU trace parser and trace conformance.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::trace(data));
