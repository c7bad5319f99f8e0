//! ctnetlink datagrams as a netlink socket hands them over: hostile bytes give entries or an
//! error, never a panic; an entry that decodes re-encodes (as a delete request) to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ven::conntrack::{DumpReader, for_each_ack, parse_connection, push_delete_request};

fuzz_target!(|data: &[u8]| {
    // The first 4 bytes pick the dump's sequence number, so that replies both match and not.
    let (seq, datagram) = match data.split_first_chunk::<4>() {
        Some((seq, rest)) => (u32::from_ne_bytes(*seq), rest),
        None => (0, data),
    };
    let mut reader = DumpReader::new(seq);
    let _ = reader.feed(datagram, &mut |_| {});
    // A second datagram after the first, as a multi-part dump delivers them.
    let _ = reader.feed(data, &mut |_| {});
    let _ = for_each_ack(data, &mut |_| {});
    if let Ok(connection) = parse_connection(data, 0) {
        let mut request = Vec::new();
        push_delete_request(&mut request, seq, &connection);
        // The request is nlmsghdr (16 bytes) followed by the same payload layout.
        assert_eq!(parse_connection(&request[16..], 16).ok(), Some(connection));
    }
});
