//! Every state record's payload past the checksum: decoded and encoded back, never a panic.
//! The body is `ven::fuzzing::state_payloads`, which tests/fuzz_corpus.rs replays on the corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ven::fuzzing::state_payloads(data));
