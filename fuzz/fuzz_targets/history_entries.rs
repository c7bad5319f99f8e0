//! History files read back after a crash, a torn write or tampering: corrupt input is reported,
//! never misread or panicked on, and what decodes renders without panicking.
//! The body is `ven::fuzzing::history_entries`, which tests/fuzz_corpus.rs replays on the corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ven::fuzzing::history_entries(data));
