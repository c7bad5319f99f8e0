//! The PCE's store records as read back at start after a crash, a damaged disk or tampering
//! (`table TAB key TAB json` a line), and an older PCE's state.json / events.json: never a panic,
//! and what a store that opens commits reads back as its state.
//! The body is `pce::fuzzing::store_records`, replayed by crates/pce/tests/fuzz_corpus_store.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pce::fuzzing::store_records(data));
