//! The configuration file (`Config::parse`): any text is accepted within bounds or refused
//! with its line, never a panic.
//! The body is `ven::fuzzing::config_text`, which tests/fuzz_corpus.rs replays on the corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ven::fuzzing::config_text(data));
