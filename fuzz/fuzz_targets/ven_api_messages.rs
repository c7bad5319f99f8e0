//! Every VEN API body either side decodes: bytes from the network must give a value or an error.
//! The body is `ven::fuzzing::ven_api_messages`, which tests/fuzz_corpus.rs replays on the corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ven::fuzzing::ven_api_messages(data));
