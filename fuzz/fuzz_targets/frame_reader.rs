#![no_main]
//! See gateway/src/fuzzing.rs for what is checked.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| gateway::fuzzing::frame_reader(data));
