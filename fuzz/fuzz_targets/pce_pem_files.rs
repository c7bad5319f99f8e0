//! The PCE's PKI files read at start (CA key and certificate, server certificate, key and
//! server.json): a damaged file is an error, never a panic.
//! The body is `pce::fuzzing::pem_files`, replayed by crates/pce/tests/fuzz_corpus_store.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pce::fuzzing::pem_files(data));
