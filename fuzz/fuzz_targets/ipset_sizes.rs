//! One datagram of the kernel's IPSET_CMD_LIST header dump, read on every quick tamper check:
//! truncated or garbled datagrams are errors, never panics, and only our sets come out.
//! The body is `ven::fuzzing::ipset_sizes`, which tests/fuzz_corpus.rs replays on the corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ven::fuzzing::ipset_sizes(data));
