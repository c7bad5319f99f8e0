//! The kernel's answer to NFT_MSG_GETGEN, read on every quick tamper check: truncated or
//! garbled datagrams are errors, never panics.
//! The body is `ven::fuzzing::nft_generation`, which tests/fuzz_corpus.rs replays on the corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ven::fuzzing::nft_generation(data));
