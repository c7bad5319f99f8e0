//! The last-known-good policy (and the saved host firewall) restored from the state directory,
//! past the record checksum: validated, rendered and recorded, never a panic.
//! The body is `ven::fuzzing::policy_restore`, which tests/fuzz_corpus.rs replays on the corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ven::fuzzing::policy_restore(data));
