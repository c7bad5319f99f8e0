//! `ipset list -t` output read on quick tamper checks: only our sets, never a panic.
//! The body is `ven::fuzzing::ipset_list`, which tests/fuzz_corpus.rs replays on the corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ven::fuzzing::ipset_list(data));
