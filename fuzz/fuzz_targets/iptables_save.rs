//! `iptables-save -t filter` output read on every tamper check: never a panic.
//! The body is `ven::fuzzing::iptables_save`, which tests/fuzz_corpus.rs replays on the corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ven::fuzzing::iptables_save(data));
