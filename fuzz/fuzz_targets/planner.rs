#![no_main]
//! Fuzz target: the planner, any map to any map.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::planner(data));
