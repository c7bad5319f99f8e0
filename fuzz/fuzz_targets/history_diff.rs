//! The history's one-line diff of two recorded rulesets read back from files: never a panic.
//! The body is `ven::fuzzing::history_diff`, which tests/fuzz_corpus.rs replays on the corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ven::fuzzing::history_diff(data));
