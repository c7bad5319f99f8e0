//! Datagrams of NFLOG messages as the flow pipeline's reader receives them from the kernel:
//! truncated or garbled netlink, IP or transport headers are counted, never panics. Seeded with
//! messages captured from the kernel (src/flows/testdata/nflog-group7.hex; see fuzz/README.md).
//! The body is `ven::fuzzing::nflog_packets`, which tests/fuzz_corpus.rs replays on the corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ven::fuzzing::nflog_packets(data));
