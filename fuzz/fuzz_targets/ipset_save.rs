//! `ipset save` output read on full tamper checks, applies and snapshots: never a panic.
//! The body is `ven::fuzzing::ipset_save`, which tests/fuzz_corpus.rs replays on the corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ven::fuzzing::ipset_save(data));
