//! History entries past the checksum (the payload of a file with a valid one): decoded, rendered
//! and encoded back, never a panic.
//! The body is `ven::fuzzing::history_payloads`, which tests/fuzz_corpus.rs replays on the corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ven::fuzzing::history_payloads(data));
