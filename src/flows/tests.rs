//! Tests of the NFLOG message and packet parsers and of the reader's decoding, from messages
//! captured from the kernel (see `testdata/nflog-group7.hex` for how), and their truncated and
//! garbled variants. The reader against the kernel is tested in `tests/flows_nflog_kernel.rs`.

use std::net::IpAddr;

use super::nflog::{DecodeState, LossCounters, acknowledgement, config_request};
use super::packet::{self, PacketError, Transport, parse_ip, parse_message};
use super::*;
use crate::firewall::LogVerdict;

/// Messages of the capture file, in sequence order (seq 0..=9): one per line, `#` lines are
/// comments.
fn captured() -> Vec<Vec<u8>> {
    include_str!("testdata/nflog-group7.hex")
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            (0..line.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&line[i..i + 2], 16).expect("hex"))
                .collect()
        })
        .collect()
}

// Indexes (and sequence numbers) in the capture.
const TCP4_SYN: usize = 0;
const ICMPV6_NS: usize = 3;
const TCP6_SYN: usize = 4;
const UDP4: usize = 7;
const ICMP4_ECHO: usize = 8;
const ICMPV6_ECHO: usize = 9;

fn ip(text: &str) -> IpAddr {
    text.parse().expect("address")
}

/// NLMSG_DONE as the kernel ends a batch of several messages.
fn done() -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&20u32.to_ne_bytes());
    out.extend_from_slice(&3u16.to_ne_bytes());
    out.extend_from_slice(&[0; 14]);
    out
}

fn decode(datagram: &[u8]) -> (Vec<FlowKey>, LossCounters) {
    decode_datagram(datagram)
}

#[test]
fn captured_ipv4_tcp_syn_parses_with_every_attribute() {
    let messages = captured();
    assert_eq!(messages.len(), 10);
    let message = parse_message(&messages[TCP4_SYN]).expect("parse");
    assert_eq!((message.family, message.group), (2, 7));
    assert_eq!((message.hw_protocol, message.hook), (Some(0x0800), Some(1)));
    assert_eq!(message.prefix, b"ven:d:0\0");
    assert_eq!(message.seq, Some(0));
    assert_eq!(message.indev, Some(2));
    assert_eq!((message.outdev, message.mark), (None, None));
    let stamp = message.timestamp.expect("timestamp");
    assert!(stamp.sec > 1_700_000_000 && stamp.usec < 1_000_000, "{stamp:?}");
    assert_eq!(message.payload.len(), 60, "a SYN with options, under the copy range");
    assert_eq!(message.raw, messages[TCP4_SYN].as_slice());
    let packet = message.packet().expect("packet");
    assert_eq!((packet.src, packet.dst, packet.protocol), (ip("198.18.0.1"), ip("198.18.0.2"), 6));
    assert!(matches!(packet.transport, Transport::Ports { dst: 7001, .. }), "{packet:?}");
    let key = message.flow_key().expect("key").expect("our prefix");
    assert_eq!(
        key,
        FlowKey {
            src: ip("198.18.0.1"),
            dst: ip("198.18.0.2"),
            protocol: 6,
            port: 7001,
            verdict: LogVerdict::Dropped,
            rule: 0
        }
    );
}

#[test]
fn captured_messages_of_every_protocol_give_their_flow_keys() {
    let messages = captured();
    let expect = |index: usize, src: &str, dst: &str, protocol: u8, port: u16| {
        let message = parse_message(&messages[index]).expect("parse");
        assert_eq!(message.seq, Some(index as u32));
        let key = message.flow_key().expect("key").expect("our prefix");
        assert_eq!(
            (key.src, key.dst, key.protocol, key.port),
            (ip(src), ip(dst), protocol, port),
            "message {index}"
        );
        assert_eq!((key.verdict, key.rule), (LogVerdict::Dropped, 0));
    };
    expect(TCP6_SYN, "2001:2::1", "2001:2::2", 6, 7001);
    expect(UDP4, "198.18.0.1", "198.18.0.2", 17, 7003);
    expect(ICMP4_ECHO, "198.18.0.1", "198.18.0.2", 1, 8);
    expect(ICMPV6_ECHO, "2001:2::1", "2001:2::2", 58, 128);
    expect(ICMPV6_NS, "2001:2::1", "ff02::1:ff00:2", 58, 135);
    let v6 = parse_message(&messages[TCP6_SYN]).expect("parse");
    assert_eq!((v6.family, v6.hw_protocol), (10, Some(0x86dd)));
    let udp = parse_message(&messages[UDP4]).expect("parse").packet().expect("packet");
    assert!(matches!(udp.transport, Transport::Ports { dst: 7003, .. }));
    let echo = parse_message(&messages[ICMP4_ECHO]).expect("parse").packet().expect("packet");
    assert!(matches!(echo.transport, Transport::Icmp { kind: 8, code: 0, .. }), "{echo:?}");
    assert!(echo.length >= 28, "{echo:?}");
}

#[test]
fn a_batch_decodes_every_message_and_counts_sequence_gaps() {
    let messages = captured();
    let mut batch: Vec<u8> = messages.concat();
    batch.extend(done());
    let (keys, loss) = decode(&batch);
    assert_eq!(keys.len(), 10);
    assert_eq!(loss, LossCounters::default());

    // Messages 1, 2, 5 and 6 never arrived: four packets lost.
    let picked: Vec<u8> = [0, 3, 4, 7, 8, 9].iter().flat_map(|&i| messages[i].clone()).collect();
    let (keys, loss) = decode(&picked);
    assert_eq!(keys.len(), 6);
    assert_eq!(loss.sequence_gaps, 4);
    assert_eq!(loss.lost(), 4);

    // Across datagrams, and across the wrap of the 32-bit number.
    let mut state = DecodeState { expected_seq: u32::MAX - 1, ..DecodeState::default() };
    let mut count = 0;
    state.decode(&messages[0], &mut |_: &NflogEvent<'_>| count += 1);
    assert_eq!(state.loss.sequence_gaps, 2, "u32::MAX - 1 and u32::MAX went missing before 0");
    state.decode(&messages[1], &mut |_: &NflogEvent<'_>| count += 1);
    state.decode(&messages[1], &mut |_: &NflogEvent<'_>| count += 1);
    assert_eq!(state.loss.sequence_gaps, 2, "a repeated number is not loss");
    assert_eq!(count, 3);
}

#[test]
fn unknown_prefixes_are_counted_and_skipped() {
    let messages = captured();
    let mut foreign = messages[UDP4].clone();
    let at = foreign.windows(7).position(|w| w == b"ven:d:0").expect("prefix");
    foreign[at..at + 3].copy_from_slice(b"ulg");
    let message = parse_message(&foreign).expect("still a message");
    assert_eq!(message.flow_key(), Ok(None));
    let (keys, loss) = decode(&[foreign.as_slice(), &messages[ICMP4_ECHO]].concat());
    assert_eq!(keys.len(), 1);
    assert_eq!((loss.unknown_prefix, loss.malformed), (1, 0));
    assert_eq!(loss.sequence_gaps, 7, "the numbers are still followed: 0..=6 never came");
}

#[test]
fn every_truncation_of_every_message_is_an_error_not_a_panic() {
    for (index, message) in captured().iter().enumerate() {
        for len in 0..message.len() {
            let cut = &message[..len];
            assert!(parse_message(cut).is_err(), "message {index} cut at {len}");
            let (keys, loss) = decode(cut);
            assert!(keys.is_empty());
            assert_eq!(loss.malformed, u64::from(len > 0), "message {index} cut at {len}");
        }
        // The payload itself cut short (the netlink lengths adjusted): headers missing are
        // errors, a packet cut after the ports or ICMP type still parses.
        let payload = parse_message(message).expect("parse").payload;
        let version = payload[0] >> 4;
        for len in 0..payload.len() {
            let _ = parse_ip(&payload[..len], version);
        }
        assert!(parse_ip(&payload[..payload.len().min(19)], version).is_err());
    }
}

#[test]
fn garbled_messages_never_panic_and_are_counted() {
    for message in captured() {
        for at in 0..message.len() {
            for flip in [0xff, 0x80, 0x01] {
                let mut garbled = message.clone();
                garbled[at] ^= flip;
                if let Ok(parsed) = parse_message(&garbled) {
                    let _ = parsed.flow_key();
                }
                // One event, or the damage counted somewhere.
                let (keys, loss) = decode(&garbled);
                let counted = loss.malformed + loss.unknown_prefix + loss.unexpected;
                assert!(
                    keys.len() == 1 || (keys.is_empty() && counted > 0),
                    "byte {at} ^ {flip:#x}: {loss:?}"
                );
            }
        }
    }
}

#[test]
fn malformed_netlink_lengths_stop_the_datagram_and_are_counted() {
    let messages = captured();
    let mut batch = [messages[0].as_slice(), &messages[1]].concat();
    // The second message claims more bytes than there are.
    let second = messages[0].len();
    batch[second..second + 4].copy_from_slice(&10_000u32.to_ne_bytes());
    let (keys, loss) = decode(&batch);
    assert_eq!((keys.len(), loss.malformed), (1, 1));
    assert_eq!(loss.last_malformed, Some(PacketError::BadMessageLength));
    // Shorter than a header: the walk cannot go on.
    batch[second..second + 4].copy_from_slice(&3u32.to_ne_bytes());
    assert_eq!(decode(&batch).1.malformed, 1);
    // An attribute longer than its message.
    let mut message = messages[UDP4].clone();
    message[20..22].copy_from_slice(&0xfff0u16.to_ne_bytes());
    assert_eq!(parse_message(&message), Err(PacketError::BadAttribute));
}

#[test]
fn other_netlink_messages_are_acks_noise_or_loss() {
    let ack = {
        let mut out = Vec::new();
        out.extend_from_slice(&36u32.to_ne_bytes());
        out.extend_from_slice(&2u16.to_ne_bytes());
        out.extend_from_slice(&[0; 10]);
        out.extend_from_slice(&0i32.to_ne_bytes());
        out.extend_from_slice(&[0; 16]);
        out
    };
    let mut refusal = ack.clone();
    refusal[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
    let mut ours = ack.clone();
    ours[8..12].copy_from_slice(&1u32.to_ne_bytes());
    assert_eq!(acknowledgement(&ours, 1), Some(0));
    assert_eq!(acknowledgement(&ack, 1), None, "another request's");
    let mut refused = refusal.clone();
    refused[8..12].copy_from_slice(&1u32.to_ne_bytes());
    assert_eq!(acknowledgement(&[captured()[0].as_slice(), &refused].concat(), 1), Some(-1));
    assert_eq!(acknowledgement(&refused[..10], 1), None);
    let mut overrun = done();
    overrun[4..6].copy_from_slice(&4u16.to_ne_bytes());
    let (keys, loss) = decode(&[ack, refusal, overrun, done()].concat());
    assert!(keys.is_empty());
    assert_eq!((loss.unexpected, loss.overruns, loss.malformed), (1, 1, 0));
}

/// Issue 17 (found by the `netlink_acks` fuzz target, regression file in
/// fuzz/regressions/netlink_acks/): the error code of an acknowledgement shorter than its code
/// was read past the message's end, from the next message or the padding.
#[test]
fn a_truncated_acknowledgement_has_no_code() {
    let mut truncated = Vec::new();
    truncated.extend_from_slice(&17u32.to_ne_bytes());
    truncated.extend_from_slice(&2u16.to_ne_bytes());
    truncated.extend_from_slice(&0u16.to_ne_bytes());
    truncated.extend_from_slice(&2u32.to_ne_bytes());
    truncated.extend_from_slice(&0u32.to_ne_bytes());
    // One byte of the code, then padding: read past the end, the code was 255.
    truncated.extend_from_slice(&[0xff, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(acknowledgement(&truncated, 2), None);
    let (keys, loss) = decode(&truncated);
    assert!(keys.is_empty());
    assert_eq!(loss.unexpected, 1, "not taken for an acceptance");
}

/// The IPv6 echo request of the capture with extension headers put in front of ICMPv6.
fn with_extensions(headers: &[(u8, &[u8])]) -> Vec<u8> {
    let messages = captured();
    let payload = parse_message(&messages[ICMPV6_ECHO]).expect("parse").payload.to_vec();
    let (fixed, upper) = payload.split_at(40);
    let mut out = fixed.to_vec();
    out[6] = headers.first().map_or(58, |(kind, _)| *kind);
    for (i, (_, body)) in headers.iter().enumerate() {
        let next = headers.get(i + 1).map_or(58, |(kind, _)| *kind);
        out.push(next);
        out.extend_from_slice(body);
    }
    out.extend_from_slice(upper);
    out
}

#[test]
fn ipv6_extension_headers_are_skipped_up_to_the_limit() {
    // Hop-by-hop (8 bytes: length 0) and destination options (16 bytes: length 1).
    let hop: &[u8] = &[0, 1, 4, 0, 0, 0, 0];
    let dest: &[u8] = &[1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let packet = parse_ip(&with_extensions(&[(0, hop), (60, dest)]), 6).expect("parse");
    assert_eq!(packet.protocol, 58);
    assert!(matches!(packet.transport, Transport::Icmp { kind: 128, code: 0, .. }));

    // A first fragment has the ICMPv6 header; a later one does not.
    let first: &[u8] = &[0, 0, 1, 0, 0, 0, 42];
    let packet = parse_ip(&with_extensions(&[(44, first)]), 6).expect("parse");
    assert!(matches!(packet.transport, Transport::Icmp { kind: 128, code: 0, .. }));
    let later: &[u8] = &[0, 0, 0x10, 0, 0, 0, 42];
    let packet = parse_ip(&with_extensions(&[(44, later)]), 6).expect("parse");
    assert_eq!((packet.protocol, packet.transport), (58, Transport::Fragment));

    let many = vec![(60u8, hop); packet::MAX_IPV6_EXTENSION_HEADERS];
    assert!(parse_ip(&with_extensions(&many), 6).is_ok());
    let too_many = vec![(60u8, hop); packet::MAX_IPV6_EXTENSION_HEADERS + 1];
    assert_eq!(parse_ip(&with_extensions(&too_many), 6), Err(PacketError::TooManyExtensionHeaders));
    // A header that claims to run past the copy range.
    let long: &[u8] = &[200, 0, 0, 0, 0, 0, 0];
    assert_eq!(parse_ip(&with_extensions(&[(60, long)]), 6), Err(PacketError::TruncatedIp));
}

#[test]
fn ipv4_fragments_options_and_other_protocols() {
    let messages = captured();
    let udp = parse_message(&messages[UDP4]).expect("parse").payload.to_vec();
    let mut later = udp.clone();
    later[6] = 0x00;
    later[7] = 0x10;
    assert_eq!(parse_ip(&later, 4).expect("parse").transport, Transport::Fragment);
    let mut gre = udp.clone();
    gre[9] = 47;
    assert_eq!(parse_ip(&gre, 4).expect("parse").transport, Transport::Other);
    let mut short_header = udp.clone();
    short_header[0] = 0x44;
    assert_eq!(parse_ip(&short_header, 4), Err(PacketError::BadIpv4HeaderLength));
    let mut long_header = udp.clone();
    long_header[0] = 0x4f;
    assert_eq!(parse_ip(&long_header, 4), Err(PacketError::TruncatedIp), "60-byte header, 35-byte packet");
    assert_eq!(parse_ip(&udp, 6), Err(PacketError::VersionMismatch(4)));
    assert_eq!(parse_ip(&[], 4), Err(PacketError::TruncatedIp));
    assert_eq!(parse_ip(&udp[..21], 4), Err(PacketError::TruncatedTransport));
}

#[test]
fn families_other_than_ip_are_refused() {
    let mut message = captured()[UDP4].clone();
    message[16] = 7; // NFPROTO_BRIDGE, with the IPv4 ethertype: still read as IPv4.
    assert!(parse_message(&message).expect("parse").packet().is_ok());
    // NFPROTO_ARP with its ethertype.
    message[16] = 3;
    let at = 20 + 4; // NFULA_PACKET_HDR is the first attribute: hw_protocol at its value.
    message[at..at + 2].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(
        parse_message(&message).expect("parse").packet(),
        Err(PacketError::UnsupportedFamily { family: 3, hw_protocol: 0x0806 })
    );
}

#[test]
fn the_configuration_request_binds_our_group_only() {
    let request = config_request(7, 1);
    let expected = concat!(
        "48000000",
        "0104",
        "0500",
        "01000000",
        "00000000",         // nlmsghdr: CONFIG, REQUEST|ACK, seq 1
        "00000007",         // nfgenmsg: AF_UNSPEC, v0, group 7
        "0500010001000000", // NFULA_CFG_CMD: BIND (never PF_BIND or PF_UNBIND)
        "0a00020000000080020000",
        "00",               // NFULA_CFG_MODE: copy range 128, COPY_PACKET
        "0800030000008000", // NFULA_CFG_NLBUFSIZ 32 KiB
        "080004000000000a", // NFULA_CFG_TIMEOUT 10 (1/100 s)
        "0800050000000040", // NFULA_CFG_QTHRESH 64
        "0600060000010000", // NFULA_CFG_FLAGS: F_SEQ
    );
    let hex: String = request.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, expected.replace(' ', ""));
}
