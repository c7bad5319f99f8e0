//! Our sets' sizes straight from the kernel: one IPSET_CMD_LIST dump with the header-only flag
//! over a NETLINK_NETFILTER socket (what `ipset list -t` asks for), answered by one message per
//! set carrying its name and, in its data, IPSET_ATTR_ELEMENTS.
//!
//! The quick tamper check needs only the sizes, every few seconds: asking the kernel directly
//! saves a fork and exec of `ipset` and its pipes each time, which were most of an idle agent's
//! wake-ups. When the kernel does not answer this way (no ELEMENTS before Linux 4.10, a refused
//! request), the caller falls back to `ipset list -t`.
//!
//! The socket is opened on the calling thread (its network namespace) and closed after the dump.
//! Every receive has a timeout; the number of datagrams is bounded; the decoder takes untrusted
//! bytes, checks every length against what is there and never panics.
//!
//! Layout (linux/netlink.h, linux/netfilter/nfnetlink.h, linux/netfilter/ipset/ip_set.h):
//! `nlmsghdr (16) | nfgenmsg (4) | attributes`; an attribute is `nla_len u16 | nla_type u16 |
//! payload` padded to 4; IPSET_ATTR_DATA is nested; numbers in attributes are big-endian.

use std::collections::BTreeMap;
use std::time::Duration;

use nix::errno::Errno;

use super::ipset::SET_PREFIX;
use crate::netlink::{
    NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NLMSG_HDR_LEN, NLMSG_NOOP, NLMSG_OVERRUN, NetfilterSocket,
    SocketError, align,
};

/// Receive buffer: the kernel fills dump datagrams up to a page or so; one set's header message
/// is about 150 bytes.
pub(crate) const RECV_BUFFER_BYTES: usize = 32 * 1024;
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(1);
/// Datagrams of one dump at most: a host holds at most 65,536 sets (ip_set_max), ~200 a datagram.
const MAX_DATAGRAMS: usize = 1_024;
const SEQ: u32 = 1;

const NLM_F_DUMP: u16 = 0x300;
const NFGENMSG_LEN: usize = 4;
const NFNETLINK_V0: u8 = 0;
/// libipset sends AF_INET in nfgenmsg for every command.
const AF_INET: u8 = 2;
const NFNL_SUBSYS_IPSET: u16 = 6;
const IPSET_CMD_LIST: u16 = 7;
/// The oldest ipset protocol still spoken (kernels speak 6 or 7 and accept 6).
const IPSET_PROTOCOL: u8 = 6;
const IPSET_ATTR_PROTOCOL: u16 = 1;
const IPSET_ATTR_SETNAME: u16 = 2;
const IPSET_ATTR_FLAGS: u16 = 6;
const IPSET_ATTR_DATA: u16 = 7;
const IPSET_ATTR_ELEMENTS: u16 = 24;
const IPSET_FLAG_LIST_HEADER: u32 = 1 << 2;
const NLA_HDR_LEN: usize = 4;
const NLA_F_NET_BYTEORDER: u16 = 0x4000;
/// Clears NLA_F_NESTED and NLA_F_NET_BYTEORDER.
const NLA_TYPE_MASK: u16 = 0x3fff;

#[derive(Debug, thiserror::Error)]
pub enum SizesError {
    #[error("listing ipsets over netlink: {operation} failed: {errno}")]
    Socket { operation: &'static str, errno: Errno },
    #[error("listing ipsets over netlink: no answer within {RECEIVE_TIMEOUT:?}")]
    Timeout,
    #[error("listing ipsets over netlink: the kernel refused the request: {errno}")]
    Refused { errno: Errno },
    #[error("listing ipsets over netlink: malformed answer: {what} at byte {offset}")]
    Malformed { what: &'static str, offset: usize },
    #[error("listing ipsets over netlink: set {0} came without its number of entries")]
    NoElements(String),
    #[error("listing ipsets over netlink: the dump did not end within {MAX_DATAGRAMS} datagrams")]
    Unfinished,
}

/// The sizes of our sets (names starting with `ven-`) in the calling thread's namespace.
pub(crate) fn our_set_sizes() -> Result<BTreeMap<String, usize>, SizesError> {
    let socket = NetfilterSocket::open(RECEIVE_TIMEOUT).map_err(socket_error)?;
    socket.send(&request(SEQ), "send").map_err(socket_error)?;
    let mut buffer = vec![0u8; RECV_BUFFER_BYTES];
    let mut sizes = BTreeMap::new();
    for _ in 0..MAX_DATAGRAMS {
        let Some(len) = socket.receive(&mut buffer, "receive").map_err(socket_error)? else { continue };
        if parse_datagram(buffer.get(..len).unwrap_or_default(), SEQ, &mut sizes)? == Dump::Done {
            return Ok(sizes);
        }
    }
    Err(SizesError::Unfinished)
}

/// IPSET_CMD_LIST, dump, header only, every set.
pub(crate) fn request(seq: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(40);
    out.extend_from_slice(&0u32.to_ne_bytes()); // length, set below
    out.extend_from_slice(&((NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_LIST).to_ne_bytes());
    out.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills in ours
    out.extend_from_slice(&[AF_INET, NFNETLINK_V0, 0, 0]);
    // IPSET_ATTR_PROTOCOL: u8, padded to 4.
    out.extend_from_slice(&5u16.to_ne_bytes());
    out.extend_from_slice(&IPSET_ATTR_PROTOCOL.to_ne_bytes());
    out.extend_from_slice(&[IPSET_PROTOCOL, 0, 0, 0]);
    // IPSET_ATTR_FLAGS: big-endian u32.
    out.extend_from_slice(&8u16.to_ne_bytes());
    out.extend_from_slice(&(IPSET_ATTR_FLAGS | NLA_F_NET_BYTEORDER).to_ne_bytes());
    out.extend_from_slice(&IPSET_FLAG_LIST_HEADER.to_be_bytes());
    let len = out.len() as u32;
    out[0..4].copy_from_slice(&len.to_ne_bytes());
    out
}

/// Whether the dump is over.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Dump {
    More,
    Done,
}

fn malformed(what: &'static str, offset: usize) -> SizesError {
    SizesError::Malformed { what, offset }
}

fn socket_error(error: SocketError) -> SizesError {
    match error {
        SocketError::Os { operation, errno } => SizesError::Socket { operation, errno },
        SocketError::Timeout => SizesError::Timeout,
        SocketError::Truncated => malformed("datagram larger than the receive buffer", RECV_BUFFER_BYTES),
    }
}

fn ne_u16(bytes: &[u8], at: usize) -> Option<u16> {
    bytes.get(at..at.checked_add(2)?)?.try_into().ok().map(u16::from_ne_bytes)
}

fn ne_u32(bytes: &[u8], at: usize) -> Option<u32> {
    bytes.get(at..at.checked_add(4)?)?.try_into().ok().map(u32::from_ne_bytes)
}

/// One attribute: its type without flags, its payload, and its offset in the datagram.
type Attribute<'a> = (u16, &'a [u8], usize);

/// The attributes in `bytes` (which start at `base` in the datagram).
fn attributes(bytes: &[u8], base: usize) -> Result<Vec<Attribute<'_>>, SizesError> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        let rest = &bytes[offset..];
        let (Some(len), Some(kind)) = (ne_u16(rest, 0), ne_u16(rest, 2)) else {
            return Err(malformed("truncated attribute header", base + offset));
        };
        let len = usize::from(len);
        if len < NLA_HDR_LEN || len > rest.len() {
            return Err(malformed("attribute length out of bounds", base + offset));
        }
        out.push((kind & NLA_TYPE_MASK, &rest[NLA_HDR_LEN..len], base + offset));
        offset = offset.saturating_add(align(len)).min(bytes.len());
    }
    Ok(out)
}

/// Adds the sizes of our sets in one datagram of the dump answering `seq` to `sizes`.
pub(crate) fn parse_datagram(
    datagram: &[u8],
    seq: u32,
    sizes: &mut BTreeMap<String, usize>,
) -> Result<Dump, SizesError> {
    let messages = crate::netlink::messages(datagram).map_err(|(what, offset)| malformed(what, offset))?;
    for message in messages.into_iter().filter(|m| m.seq == seq) {
        let (payload, payload_offset) = (message.payload, message.payload_offset);
        match message.kind {
            NLMSG_NOOP => {}
            NLMSG_DONE => return Ok(Dump::Done),
            NLMSG_ERROR => {
                let code = ne_u32(payload, 0)
                    .map(|code| i32::from_ne_bytes(code.to_ne_bytes()))
                    .ok_or_else(|| malformed("truncated error code", payload_offset))?;
                if code == 0 {
                    return Ok(Dump::Done);
                }
                return Err(SizesError::Refused { errno: Errno::from_raw(code.saturating_neg()) });
            }
            NLMSG_OVERRUN => return Err(malformed("overrun", payload_offset - NLMSG_HDR_LEN)),
            kind if kind == (NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_LIST => {
                parse_set(payload, payload_offset, sizes)?;
            }
            _ => return Err(malformed("unexpected message type", payload_offset - NLMSG_HDR_LEN + 4)),
        }
    }
    Ok(Dump::More)
}

/// One set's header message: its name and, when it is ours, IPSET_ATTR_DATA's ELEMENTS.
fn parse_set(payload: &[u8], base: usize, sizes: &mut BTreeMap<String, usize>) -> Result<(), SizesError> {
    let body = payload.get(NFGENMSG_LEN..).ok_or_else(|| malformed("truncated nfgenmsg", base))?;
    let mut name = None;
    let mut elements = None;
    for (kind, value, at) in attributes(body, base + NFGENMSG_LEN)? {
        match kind {
            IPSET_ATTR_SETNAME => {
                let text = value.split(|b| *b == 0).next().unwrap_or_default();
                name = Some(std::str::from_utf8(text).map_err(|_| malformed("set name is not UTF-8", at))?);
            }
            IPSET_ATTR_DATA => {
                for (inner, value, at) in attributes(value, at + NLA_HDR_LEN)? {
                    if inner == IPSET_ATTR_ELEMENTS {
                        let bytes: [u8; 4] = value
                            .try_into()
                            .map_err(|_| malformed("IPSET_ATTR_ELEMENTS is not 4 bytes", at))?;
                        elements = Some(u32::from_be_bytes(bytes) as usize);
                    }
                }
            }
            _ => {}
        }
    }
    let name = name.ok_or_else(|| malformed("a set without a name", base))?;
    if name.starts_with(SET_PREFIX) {
        let elements = elements.ok_or_else(|| SizesError::NoElements(name.to_string()))?;
        sizes.insert(name.to_string(), elements);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One header message as the kernel sends it for set `name` holding `elements`.
    fn set_message(seq: u32, name: &str, elements: Option<u32>) -> Vec<u8> {
        let mut attributes = Vec::new();
        let mut put = |kind: u16, value: &[u8]| {
            attributes.extend_from_slice(&((NLA_HDR_LEN + value.len()) as u16).to_ne_bytes());
            attributes.extend_from_slice(&kind.to_ne_bytes());
            attributes.extend_from_slice(value);
            while attributes.len() % 4 != 0 {
                attributes.push(0);
            }
        };
        put(IPSET_ATTR_PROTOCOL, &[7]);
        let mut named = name.as_bytes().to_vec();
        named.push(0);
        put(IPSET_ATTR_SETNAME, &named);
        put(3, b"hash:net\0");
        let mut data = Vec::new();
        for (kind, value) in
            [(18u16, 1024u32), (19, 131_072)].into_iter().chain(elements.map(|e| (IPSET_ATTR_ELEMENTS, e)))
        {
            data.extend_from_slice(&8u16.to_ne_bytes());
            data.extend_from_slice(&(kind | NLA_F_NET_BYTEORDER).to_ne_bytes());
            data.extend_from_slice(&value.to_be_bytes());
        }
        put(IPSET_ATTR_DATA | 0x8000, &data);
        let mut message = Vec::new();
        message.extend_from_slice(&((NLMSG_HDR_LEN + NFGENMSG_LEN + attributes.len()) as u32).to_ne_bytes());
        message.extend_from_slice(&((NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_LIST).to_ne_bytes());
        message.extend_from_slice(&0x2u16.to_ne_bytes()); // NLM_F_MULTI
        message.extend_from_slice(&seq.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes());
        message.extend_from_slice(&[AF_INET, 0, 0, 0]);
        message.extend_from_slice(&attributes);
        message
    }

    fn done(seq: u32) -> Vec<u8> {
        let mut message = Vec::new();
        message.extend_from_slice(&20u32.to_ne_bytes());
        message.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        message.extend_from_slice(&0x2u16.to_ne_bytes());
        message.extend_from_slice(&seq.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes());
        message
    }

    #[test]
    fn the_request_asks_for_every_header_in_protocol_6() {
        let request = request(9);
        assert_eq!(request.len(), 36);
        assert_eq!(ne_u32(&request, 0), Some(36));
        assert_eq!(ne_u16(&request, 4), Some(0x0607));
        assert_eq!(ne_u16(&request, 6), Some(NLM_F_REQUEST | NLM_F_DUMP));
        assert_eq!(ne_u32(&request, 8), Some(9));
        assert_eq!(request[24], IPSET_PROTOCOL);
        assert_eq!(&request[32..36], &IPSET_FLAG_LIST_HEADER.to_be_bytes());
    }

    #[test]
    fn our_sets_sizes_come_out_of_a_dump_and_others_are_skipped() {
        let mut datagram = set_message(1, "ven-7", Some(3));
        datagram.extend(set_message(1, "foreign", Some(99)));
        datagram.extend(set_message(2, "ven-stale-seq", Some(1)));
        let mut sizes = BTreeMap::new();
        assert_eq!(parse_datagram(&datagram, 1, &mut sizes).unwrap(), Dump::More);
        let mut last = set_message(1, "ven-7-6", Some(0));
        last.extend(done(1));
        assert_eq!(parse_datagram(&last, 1, &mut sizes).unwrap(), Dump::Done);
        assert_eq!(sizes, BTreeMap::from([("ven-7".to_string(), 3), ("ven-7-6".to_string(), 0)]));
    }

    #[test]
    fn damaged_or_incomplete_answers_are_errors_not_panics() {
        let whole = set_message(1, "ven-1", Some(5));
        for cut in 0..whole.len() {
            let _ = parse_datagram(&whole[..cut], 1, &mut BTreeMap::new());
        }
        let missing = parse_datagram(&set_message(1, "ven-1", None), 1, &mut BTreeMap::new());
        assert!(matches!(missing, Err(SizesError::NoElements(name)) if name == "ven-1"));
        // NLMSG_ERROR: the header, the negative errno, the request's header.
        let mut refused = done(1)[..NLMSG_HDR_LEN].to_vec();
        refused[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        refused.extend_from_slice(&(-(Errno::EPROTO as i32)).to_ne_bytes());
        refused.extend_from_slice(&request(1)[..NLMSG_HDR_LEN]);
        let len = refused.len() as u32;
        refused[0..4].copy_from_slice(&len.to_ne_bytes());
        let error = parse_datagram(&refused, 1, &mut BTreeMap::new()).unwrap_err();
        assert!(matches!(error, SizesError::Refused { errno: Errno::EPROTO }), "{error}");
    }
}
