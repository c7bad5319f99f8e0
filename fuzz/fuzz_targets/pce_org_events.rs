//! The PCE's organisation event records (JSON, one or a list): decoded and rendered as CEF and
//! LEEF lines that no hostname or message can break, never a panic.
//! The body is `pce::fuzzing::org_events`, replayed by crates/pce/tests/fuzz_corpus_store.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pce::fuzzing::org_events(data));
