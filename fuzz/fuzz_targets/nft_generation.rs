//! The kernel's answer to NFT_MSG_GETGEN, read on every quick tamper check: truncated or
//! garbled datagrams are errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let seq = data.first().copied().map_or(0, u32::from);
    let _ = ven::firewall::parse_generation_reply(data, seq);
});
