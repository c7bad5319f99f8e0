//! CA files, CA fingerprints and server names given to `ven activate`: never a panic.
//! The body is `ven::fuzzing::tls_trust`, which tests/fuzz_corpus.rs replays on the corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ven::fuzzing::tls_trust(data));
