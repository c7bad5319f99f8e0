//! A policy from the PCE is untrusted: whatever decodes must either be refused by validation or
//! render into text that keeps every rule on its own line (no operator text can add a command).
//! The body is `ven::fuzzing::policy_rendering`, which tests/fuzz_corpus.rs replays on the corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ven::fuzzing::policy_rendering(data));
