//! Datagrams of NFLOG messages as the flow pipeline's reader receives them from the kernel:
//! truncated or garbled netlink, IP or transport headers are counted, never panics. Seeded with
//! messages captured from the kernel: src/flows/testdata/nflog-group7.hex, one message a line
//! (fuzz/corpus is not committed; recreate the seeds with
//! `grep -v '^#' src/flows/testdata/nflog-group7.hex | while read -r m; do echo "$m" | xxd -r -p >
//! "fuzz/corpus/nflog_packets/$(echo "$m" | sha1sum | cut -c1-16)"; done`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (keys, loss) = ven::flows::decode_datagram(data);
    // Every message is at least a netlink header and its nfgenmsg.
    assert!(keys.len() <= data.len() / 20);
    let _ = loss.lost();
    // The message parser on its own, and the packet parser on the raw bytes.
    if let Ok(message) = ven::flows::packet::parse_message(data) {
        let _ = message.flow_key();
    }
    for version in [4, 6] {
        let _ = ven::flows::packet::parse_ip(data, version);
    }
});
