//! Requests (and answers) on the agent's control socket: frames or an error, never a panic.
//! The body is `ven::fuzzing::control_requests`, which tests/fuzz_corpus.rs replays on the corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ven::fuzzing::control_requests(data));
