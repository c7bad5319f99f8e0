//! The PCE's release manifests (`DIR/releases/<target>/<version>/manifest`, read from disk each
//! time a VEN asks for a release): never a panic; what is accepted is canonical and in bounds.
//! The body is `pce::fuzzing::release_manifest`, replayed by crates/pce/tests/fuzz_corpus_store.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pce::fuzzing::release_manifest(data));
