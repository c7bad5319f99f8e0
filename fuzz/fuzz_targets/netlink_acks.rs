//! Netlink acknowledgements (NFLOG configuration) and the message walker: never a panic.
//! The body is `ven::fuzzing::netlink_acks`, which tests/fuzz_corpus.rs replays on the corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ven::fuzzing::netlink_acks(data));
