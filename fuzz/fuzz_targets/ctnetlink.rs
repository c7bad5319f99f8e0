//! ctnetlink datagrams as a netlink socket hands them over: hostile bytes give entries or an
//! error, never a panic; an entry that decodes re-encodes (as a delete request) to itself.
//! The body is `ven::fuzzing::ctnetlink`, which tests/fuzz_corpus.rs replays on the corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ven::fuzzing::ctnetlink(data));
