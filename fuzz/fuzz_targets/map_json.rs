#![no_main]
//! Fuzz target: the map JSON reader.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::map_json(data));
