//! The nf_tables ruleset generation: one NFT_MSG_GETGEN request over a NETLINK_NETFILTER socket,
//! answered by NFT_MSG_NEWGEN carrying NFTA_GEN_ID.
//!
//! The kernel increases the generation of a network namespace on every committed nf_tables
//! transaction (every `iptables-nft`, `ip6tables-nft` or `nft` change, whoever makes it; reads,
//! counters and ipset changes do not move it). An unchanged generation therefore means that no
//! iptables-nft rule changed, which lets the quick tamper check skip reading the tables back.
//!
//! The socket is opened on the calling thread, so the answer is that thread's namespace's, and
//! closed after the answer. The receive buffer is bounded and every receive has a timeout, so a
//! kernel that never answers cannot hang the agent. The reply decoder is pure and takes
//! untrusted bytes: every length is checked against the bytes that are there, and it never
//! panics.
//!
//! Layout (linux/netlink.h, linux/netfilter/nfnetlink.h, linux/netfilter/nf_tables.h):
//! `nlmsghdr (16) | nfgenmsg (4) | attributes`, an attribute being `nla_len u16 | nla_type u16 |
//! payload`, padded to 4. Headers are in host byte order, NFTA_GEN_ID is a big-endian u32.

use std::time::Duration;

use nix::errno::Errno;

use crate::netlink::{
    NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NLMSG_HDR_LEN, NLMSG_NOOP, NLMSG_OVERRUN, NetfilterSocket,
    SocketError, align,
};

/// Receive buffer for one datagram. The answer is under 100 bytes (header, nfgenmsg, id, pid and
/// the requester's 16-byte command name); a larger datagram is an error, never a partial read.
pub(crate) const RECV_BUFFER_BYTES: usize = 512;
/// How long one receive waits for the kernel (it answers while handling the request, so this
/// only bounds a kernel that never does).
pub(crate) const RECEIVE_TIMEOUT: Duration = Duration::from_secs(1);
/// Datagrams received without the answer before giving up (only a local process addressing our
/// port id could send them).
const MAX_DATAGRAMS: usize = 16;
/// Sequence number of the request (one request per socket).
const SEQ: u32 = 1;

// nfnetlink (linux/netfilter/nfnetlink.h): message type = subsystem << 8 | message.
const NFGENMSG_LEN: usize = 4;
const NFNETLINK_V0: u8 = 0;
const AF_UNSPEC: u8 = 0;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
// nf_tables (linux/netfilter/nf_tables.h).
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;
// Attributes.
const NLA_HDR_LEN: usize = 4;
/// Clears NLA_F_NESTED and NLA_F_NET_BYTEORDER.
const NLA_TYPE_MASK: u16 = 0x3fff;

const REQUEST_LEN: usize = NLMSG_HDR_LEN + NFGENMSG_LEN;

/// Why the generation could not be read. Callers treat every one of them as "unknown".
#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    #[error("reading the nf_tables generation: {operation} failed: {errno}")]
    Socket { operation: &'static str, errno: Errno },
    #[error("reading the nf_tables generation: no answer within {timeout:?}")]
    Timeout { timeout: Duration },
    #[error("reading the nf_tables generation: the kernel refused the request: {errno}")]
    Refused { errno: Errno },
    #[error("reading the nf_tables generation: malformed answer: {what} at byte {offset}")]
    Malformed { what: &'static str, offset: usize },
}

/// The nf_tables ruleset generation of the calling thread's network namespace.
pub(crate) fn nftables_generation() -> Result<u32, GenerationError> {
    let socket = NetfilterSocket::open(RECEIVE_TIMEOUT).map_err(socket_error)?;
    socket.send(&request(SEQ), "send").map_err(socket_error)?;
    let mut buffer = [0u8; RECV_BUFFER_BYTES];
    for _ in 0..MAX_DATAGRAMS {
        let Some(len) = socket.receive(&mut buffer, "receive").map_err(socket_error)? else { continue };
        if let Some(generation) = parse_reply(buffer.get(..len).unwrap_or_default(), SEQ)? {
            return Ok(generation);
        }
    }
    Err(GenerationError::Socket { operation: "receive", errno: Errno::EPROTO })
}

/// The NFT_MSG_GETGEN request (no NLM_F_ACK: the answer is the NEWGEN message, or an error).
pub(crate) fn request(seq: u32) -> [u8; REQUEST_LEN] {
    let mut out = [0u8; REQUEST_LEN];
    // REQUEST_LEN is 20: it fits a u32.
    out[0..4].copy_from_slice(&(REQUEST_LEN as u32).to_ne_bytes());
    out[4..6].copy_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
    out[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    out[8..12].copy_from_slice(&seq.to_ne_bytes());
    // Bytes 12..16: port id 0, the kernel fills in ours. Then nfgenmsg: family, version, res_id 0.
    out[16] = AF_UNSPEC;
    out[17] = NFNETLINK_V0;
    out
}

fn malformed(what: &'static str, offset: usize) -> GenerationError {
    GenerationError::Malformed { what, offset }
}

fn socket_error(error: SocketError) -> GenerationError {
    match error {
        SocketError::Os { operation, errno } => GenerationError::Socket { operation, errno },
        SocketError::Timeout => GenerationError::Timeout { timeout: RECEIVE_TIMEOUT },
        SocketError::Truncated => malformed("datagram larger than the receive buffer", RECV_BUFFER_BYTES),
    }
}

fn ne_u16(bytes: &[u8], at: usize) -> Option<u16> {
    bytes.get(at..at.checked_add(2)?)?.try_into().ok().map(u16::from_ne_bytes)
}

fn ne_u32(bytes: &[u8], at: usize) -> Option<u32> {
    bytes.get(at..at.checked_add(4)?)?.try_into().ok().map(u32::from_ne_bytes)
}

/// Decodes one datagram from the kernel: `Some(generation)` when it holds the answer to request
/// `seq`, `None` when it holds nothing for it (messages of other sequence numbers, no-ops), an
/// error when the request was refused or the bytes do not hold together. Offsets in errors are
/// from the start of the datagram.
pub(crate) fn parse_reply(datagram: &[u8], seq: u32) -> Result<Option<u32>, GenerationError> {
    let messages = crate::netlink::messages(datagram).map_err(|(what, offset)| malformed(what, offset))?;
    for message in messages.into_iter().filter(|m| m.seq == seq) {
        let (payload, payload_offset) = (message.payload, message.payload_offset);
        match message.kind {
            NLMSG_NOOP | NLMSG_DONE => {}
            NLMSG_ERROR => {
                let code = ne_u32(payload, 0)
                    .map(|code| i32::from_ne_bytes(code.to_ne_bytes()))
                    .ok_or_else(|| malformed("truncated error code", payload_offset))?;
                if code == 0 {
                    return Err(malformed("acknowledgement without a generation", payload_offset));
                }
                return Err(GenerationError::Refused { errno: Errno::from_raw(code.saturating_neg()) });
            }
            NLMSG_OVERRUN => return Err(malformed("overrun", payload_offset - NLMSG_HDR_LEN)),
            kind if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN => {
                return parse_newgen(payload, payload_offset).map(Some);
            }
            _ => return Err(malformed("unexpected message type", payload_offset - NLMSG_HDR_LEN + 4)),
        }
    }
    Ok(None)
}

/// NFTA_GEN_ID of a NEWGEN message's payload (nfgenmsg, then attributes).
fn parse_newgen(payload: &[u8], base: usize) -> Result<u32, GenerationError> {
    let mut offset = NFGENMSG_LEN;
    if payload.len() < offset {
        return Err(malformed("truncated nfgenmsg", base));
    }
    while offset < payload.len() {
        let rest = &payload[offset..];
        let (Some(len), Some(kind)) = (ne_u16(rest, 0), ne_u16(rest, 2)) else {
            return Err(malformed("truncated attribute header", base + offset));
        };
        let len = usize::from(len);
        if len < NLA_HDR_LEN || len > rest.len() {
            return Err(malformed("attribute length out of bounds", base + offset));
        }
        if kind & NLA_TYPE_MASK == NFTA_GEN_ID {
            let value: [u8; 4] = rest[NLA_HDR_LEN..len]
                .try_into()
                .map_err(|_| malformed("NFTA_GEN_ID is not 4 bytes", base + offset))?;
            return Ok(u32::from_be_bytes(value));
        }
        offset = offset.saturating_add(align(len)).min(payload.len());
    }
    Err(malformed("no NFTA_GEN_ID in the answer", base))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    /// The answer to `request(1)` as this module's socket received it (Linux 6.18, x86_64, from
    /// a unit test thread) in a fresh network namespace after one `iptables -A INPUT -j ACCEPT`
    /// (iptables 1.8.9, nf_tables): `ip netns add cap && ip netns exec cap iptables -A INPUT -j
    /// ACCEPT && ip netns exec cap <test binary> ...`. NEWGEN (0x0a0f), seq 1; nfgenmsg with
    /// res_id = generation & 0xffff; NFTA_GEN_ID = 2; NFTA_GEN_PROC_PID; NFTA_GEN_PROC_NAME (the
    /// requesting thread's name, "firewall::gener").
    const NEWGEN: &str = "380000000f0a000001000000ca410000 00000002 \
                          0800010000000002 08000200000041cc \
                          140003006669726577616c6c3a3a67656e657200";

    /// The kernel's error for a message type nf_tables does not have (type 0x0a7f, seq 2,
    /// sent from Python on the same kernel): NLMSG_ERROR, -EINVAL, then the request echoed.
    const EINVAL: &str = "280000000200000002000000c5350000eaffffff140000007f0a0100020000000000000000000000";

    #[test]
    fn the_request_is_getgen_for_every_family() {
        // The request the captures below answer; Python's struct.pack("=IHHIIBBH", 20, 0x0a10,
        // 1, 1, 0, 0, 0, 0) builds the same bytes on x86_64.
        assert_eq!(request(1).to_vec(), hex("14000000100a0100010000000000000000000000"));
    }

    #[test]
    fn the_captured_answer_gives_the_generation() {
        assert_eq!(parse_reply(&hex(NEWGEN), 1).unwrap(), Some(2));
        assert_eq!(parse_reply(&hex(NEWGEN), 7).unwrap(), None, "not the answer to request 7");
    }

    #[test]
    fn a_refusal_gives_the_kernels_errno() {
        let err = parse_reply(&hex(EINVAL), 2).unwrap_err();
        assert!(matches!(err, GenerationError::Refused { errno: Errno::EINVAL }), "{err}");
        assert_eq!(parse_reply(&hex(EINVAL), 1).unwrap(), None);
        // An acknowledgement (error 0) carries no generation.
        let mut ack = hex(EINVAL);
        ack[16..20].copy_from_slice(&0u32.to_ne_bytes());
        assert!(matches!(parse_reply(&ack, 2), Err(GenerationError::Malformed { .. })));
    }

    #[test]
    fn every_truncation_is_an_error_or_nothing_never_a_wrong_generation() {
        let full = hex(NEWGEN);
        for len in 0..full.len() {
            match parse_reply(&full[..len], 1) {
                Ok(None) => assert_eq!(len, 0, "only the empty datagram holds nothing"),
                Ok(Some(generation)) => panic!("{len} bytes decoded to {generation}"),
                Err(GenerationError::Malformed { .. }) => {}
                Err(other) => panic!("{len} bytes: {other}"),
            }
        }
        let error = hex(EINVAL);
        for len in 1..20 {
            assert!(parse_reply(&error[..len], 2).is_err(), "{len}");
        }
    }

    #[test]
    fn garbled_answers_are_errors() {
        let full = hex(NEWGEN);
        let with = |at: usize, bytes: &[u8]| {
            let mut garbled = full.clone();
            garbled[at..at + bytes.len()].copy_from_slice(bytes);
            parse_reply(&garbled, 1)
        };
        let malformed = |result: Result<Option<u32>, GenerationError>| {
            matches!(result, Err(GenerationError::Malformed { .. }))
        };
        // Message length: shorter than a header, longer than the datagram.
        assert!(malformed(with(0, &8u32.to_ne_bytes())));
        assert!(malformed(with(0, &u32::MAX.to_ne_bytes())));
        // A message type that is not NEWGEN, an overrun.
        assert!(malformed(with(4, &0x0a03u16.to_ne_bytes())));
        assert!(malformed(with(4, &NLMSG_OVERRUN.to_ne_bytes())));
        // NFTA_GEN_ID of 5 bytes (the length field of the first attribute), or of 0 length, or
        // longer than the message.
        assert!(malformed(with(20, &9u16.to_ne_bytes())));
        assert!(malformed(with(20, &0u16.to_ne_bytes())));
        assert!(malformed(with(20, &0x100u16.to_ne_bytes())));
        // No NFTA_GEN_ID: its type becomes one the decoder skips.
        assert!(malformed(with(22, &9u16.to_ne_bytes())));
        // A no-op before the answer is skipped; NLA_F_NET_BYTEORDER on the id is ignored.
        let mut noop = hex("10000000010000000100000000000000");
        noop.extend_from_slice(&full);
        assert_eq!(parse_reply(&noop, 1).unwrap(), Some(2));
        assert_eq!(with(22, &(NFTA_GEN_ID | 0x4000).to_ne_bytes()).unwrap(), Some(2));
        // Every single-byte corruption decodes to something or fails; none panics.
        for at in 0..full.len() {
            for value in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                let _ = with(at, &[value]);
            }
        }
    }
}
