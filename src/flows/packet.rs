//! One NFLOG message, parsed in place: the nfnetlink_log attributes (prefix, payload, sequence
//! number, timestamp, hook) and the packet they carry (IPv4 or IPv6, then TCP/UDP ports,
//! ICMP/ICMPv6 type and code, or just the protocol number).
//!
//! Everything borrows from the receive buffer; nothing allocates. Input is untrusted: every
//! offset is checked against the bytes that are there, nothing panics, and anything that does not
//! hold together is a [`PacketError`] the reader counts.
//!
//! Layout (linux/netlink.h, linux/netfilter/nfnetlink.h, linux/netfilter/nfnetlink_log.h):
//! `nlmsghdr (16) | nfgenmsg (4: family, version, res_id = group, big-endian) | attributes`, an
//! attribute being `nla_len u16 | nla_type u16 | value`, padded to 4. Netlink headers are in host
//! byte order, attribute values of nfnetlink_log in network byte order. The payload starts at the
//! network header and is cut to the copy range (128 bytes), so only the headers are there.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::firewall::{LogVerdict, parse_log_prefix};
use crate::netlink::{NLMSG_HDR_LEN, align};

/// nfnetlink subsystem of nfnetlink_log (NFNL_SUBSYS_ULOG).
pub(crate) const NFNL_SUBSYS_ULOG: u16 = 4;
/// NFULNL_MSG_PACKET: a logged packet.
pub(crate) const NFULNL_MSG_PACKET: u16 = 0;
/// NFULNL_MSG_CONFIG: a configuration request.
pub(crate) const NFULNL_MSG_CONFIG: u16 = 1;
pub(crate) const NFGENMSG_LEN: usize = 4;
pub(crate) const NLA_HDR_LEN: usize = 4;
/// Clears NLA_F_NESTED and NLA_F_NET_BYTEORDER.
const NLA_TYPE_MASK: u16 = 0x3fff;

// Packet attributes (enum nfulnl_attr_type).
const NFULA_PACKET_HDR: u16 = 1;
const NFULA_MARK: u16 = 2;
const NFULA_TIMESTAMP: u16 = 3;
const NFULA_IFINDEX_INDEV: u16 = 4;
const NFULA_IFINDEX_OUTDEV: u16 = 5;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NFULA_SEQ: u16 = 12;

// Families (nfgenmsg) and hardware protocols (NFULA_PACKET_HDR).
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

// IP protocol numbers.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;
const IPV6_MOBILITY: u8 = 135;
const IPV6_HIP: u8 = 139;
const IPV6_SHIM6: u8 = 140;

const IPV4_MIN_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
/// Most IPv6 extension headers skipped before giving up on a packet (a legitimate packet has a
/// handful; a chain longer than this is hostile or broken).
pub const MAX_IPV6_EXTENSION_HEADERS: usize = 8;

/// Why a message or its packet could not be read. The reader counts these; none is fatal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("netlink message shorter than its headers")]
    TruncatedMessage,
    #[error("netlink message length out of bounds")]
    BadMessageLength,
    #[error("not an nfnetlink_log packet message (type {0:#06x})")]
    NotAPacket(u16),
    #[error("attribute header or length out of bounds")]
    BadAttribute,
    #[error("attribute {0} has the wrong size")]
    BadAttributeSize(u16),
    #[error("no NFULA_PAYLOAD in the message")]
    NoPayload,
    #[error("packet of family {family} (hardware protocol {hw_protocol:#06x}) is neither IPv4 nor IPv6")]
    UnsupportedFamily { family: u8, hw_protocol: u16 },
    #[error("IP version {0} does not match the message's family")]
    VersionMismatch(u8),
    #[error("IP header truncated")]
    TruncatedIp,
    #[error("IPv4 header length out of bounds")]
    BadIpv4HeaderLength,
    #[error("more than {MAX_IPV6_EXTENSION_HEADERS} IPv6 extension headers")]
    TooManyExtensionHeaders,
    #[error("transport header truncated")]
    TruncatedTransport,
}

/// The kernel's timestamp of a packet (NFULA_TIMESTAMP), when it had one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    pub sec: u64,
    pub usec: u64,
}

/// One NFLOG message, borrowed from the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NflogMessage<'a> {
    /// nfgenmsg family (NFPROTO_IPV4 = 2, NFPROTO_IPV6 = 10, ...).
    pub family: u8,
    /// The NFLOG group (nfgenmsg res_id).
    pub group: u16,
    /// Hardware protocol (ethertype) and netfilter hook, from NFULA_PACKET_HDR.
    pub hw_protocol: Option<u16>,
    pub hook: Option<u8>,
    /// The rule's prefix, NUL included when the kernel sent one.
    pub prefix: &'a [u8],
    /// Per-group sequence number (NFULA_SEQ; present when NFULNL_CFG_F_SEQ was asked for).
    pub seq: Option<u32>,
    pub timestamp: Option<Timestamp>,
    pub mark: Option<u32>,
    pub indev: Option<u32>,
    pub outdev: Option<u32>,
    /// The packet from its network header, cut to the copy range.
    pub payload: &'a [u8],
    /// The whole netlink message, headers included.
    pub raw: &'a [u8],
}

/// What follows the IP header(s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// TCP or UDP.
    Ports { src: u16, dst: u16 },
    /// ICMP or ICMPv6; `id` is the echo identifier of echo requests and replies (what
    /// conntrack tells pings apart by), else 0.
    Icmp { kind: u8, code: u8, id: u16 },
    /// A non-first fragment: no transport header in it.
    Fragment,
    /// Another protocol, kept by number only.
    Other,
}

/// The network and transport headers of a logged packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The upper-layer protocol (after IPv6 extension headers).
    pub protocol: u8,
    pub transport: Transport,
    /// Bytes of the whole packet from its IP header (IPv4 total length, IPv6 payload length
    /// plus 40), as the header says: the payload NFLOG copies is cut to the copy range.
    pub length: u32,
}

/// What a flow is counted by: addresses, protocol, destination port (ICMP type for ICMP and
/// ICMPv6, 0 for other protocols and non-first fragments), and the verdict and rule of the log
/// rule that logged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub port: u16,
    pub verdict: LogVerdict,
    pub rule: u32,
}

impl FlowKey {
    /// The key of `packet` logged with `prefix`; `None` when the prefix is not one of ours.
    pub fn new(prefix: &[u8], packet: &Packet) -> Option<Self> {
        let (verdict, rule) = parse_log_prefix(prefix)?;
        let port = match packet.transport {
            Transport::Ports { dst, .. } => dst,
            Transport::Icmp { kind, .. } => u16::from(kind),
            Transport::Fragment | Transport::Other => 0,
        };
        Some(Self { src: packet.src, dst: packet.dst, protocol: packet.protocol, port, verdict, rule })
    }
}

fn ne_u16(bytes: &[u8], at: usize) -> Option<u16> {
    bytes.get(at..at.checked_add(2)?)?.try_into().ok().map(u16::from_ne_bytes)
}

fn ne_u32(bytes: &[u8], at: usize) -> Option<u32> {
    bytes.get(at..at.checked_add(4)?)?.try_into().ok().map(u32::from_ne_bytes)
}

fn be_u16(bytes: &[u8], at: usize) -> Option<u16> {
    bytes.get(at..at.checked_add(2)?)?.try_into().ok().map(u16::from_be_bytes)
}

fn be_u32_exact(value: &[u8], kind: u16) -> Result<u32, PacketError> {
    value.try_into().map(u32::from_be_bytes).map_err(|_| PacketError::BadAttributeSize(kind))
}

/// The netlink message type of NFLOG packets.
pub(crate) const fn packet_message_type() -> u16 {
    (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
}

/// Parses one netlink message (header included, exactly its `nlmsg_len` bytes or more) as an
/// NFLOG packet message.
pub fn parse_message(message: &[u8]) -> Result<NflogMessage<'_>, PacketError> {
    let (Some(len), Some(kind)) = (ne_u32(message, 0), ne_u16(message, 4)) else {
        return Err(PacketError::TruncatedMessage);
    };
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len < NLMSG_HDR_LEN + NFGENMSG_LEN {
        return Err(if len < NLMSG_HDR_LEN {
            PacketError::BadMessageLength
        } else {
            PacketError::TruncatedMessage
        });
    }
    let message = message.get(..len).ok_or(PacketError::BadMessageLength)?;
    if kind != packet_message_type() {
        return Err(PacketError::NotAPacket(kind));
    }
    let family = message[NLMSG_HDR_LEN];
    let group = u16::from_be_bytes([message[NLMSG_HDR_LEN + 2], message[NLMSG_HDR_LEN + 3]]);
    let mut parsed = NflogMessage {
        family,
        group,
        hw_protocol: None,
        hook: None,
        prefix: &[],
        seq: None,
        timestamp: None,
        mark: None,
        indev: None,
        outdev: None,
        payload: &[],
        raw: message,
    };
    let mut payload = None;
    let attributes = &message[NLMSG_HDR_LEN + NFGENMSG_LEN..];
    let mut offset = 0;
    while offset < attributes.len() {
        let rest = &attributes[offset..];
        let (Some(nla_len), Some(nla_type)) = (ne_u16(rest, 0), ne_u16(rest, 2)) else {
            return Err(PacketError::BadAttribute);
        };
        let nla_len = usize::from(nla_len);
        let value = rest.get(NLA_HDR_LEN..nla_len).ok_or(PacketError::BadAttribute)?;
        let kind = nla_type & NLA_TYPE_MASK;
        match kind {
            NFULA_PACKET_HDR => {
                let (Some(hw_protocol), Some(&hook), 4) = (be_u16(value, 0), value.get(2), value.len())
                else {
                    return Err(PacketError::BadAttributeSize(kind));
                };
                parsed.hw_protocol = Some(hw_protocol);
                parsed.hook = Some(hook);
            }
            NFULA_TIMESTAMP => {
                let stamp: [u8; 16] = value.try_into().map_err(|_| PacketError::BadAttributeSize(kind))?;
                let (sec, usec) = stamp.split_at(8);
                parsed.timestamp = Some(Timestamp {
                    sec: u64::from_be_bytes(sec.try_into().unwrap_or_default()),
                    usec: u64::from_be_bytes(usec.try_into().unwrap_or_default()),
                });
            }
            NFULA_MARK => parsed.mark = Some(be_u32_exact(value, kind)?),
            NFULA_IFINDEX_INDEV => parsed.indev = Some(be_u32_exact(value, kind)?),
            NFULA_IFINDEX_OUTDEV => parsed.outdev = Some(be_u32_exact(value, kind)?),
            NFULA_SEQ => parsed.seq = Some(be_u32_exact(value, kind)?),
            NFULA_PREFIX => parsed.prefix = value,
            NFULA_PAYLOAD => payload = Some(value),
            _ => {}
        }
        offset = offset.saturating_add(align(nla_len)).min(attributes.len());
    }
    parsed.payload = payload.ok_or(PacketError::NoPayload)?;
    Ok(parsed)
}

impl NflogMessage<'_> {
    /// The IP and transport headers of the payload.
    pub fn packet(&self) -> Result<Packet, PacketError> {
        let hw_protocol = self.hw_protocol.unwrap_or(0);
        let version = match (self.family, hw_protocol) {
            (AF_INET, _) | (_, ETH_P_IP) => 4,
            (AF_INET6, _) | (_, ETH_P_IPV6) => 6,
            (family, hw_protocol) => return Err(PacketError::UnsupportedFamily { family, hw_protocol }),
        };
        parse_ip(self.payload, version)
    }

    /// The flow key of this message: `Ok(None)` when the prefix is not one of ours.
    pub fn flow_key(&self) -> Result<Option<FlowKey>, PacketError> {
        if parse_log_prefix(self.prefix).is_none() {
            return Ok(None);
        }
        Ok(FlowKey::new(self.prefix, &self.packet()?))
    }
}

/// Parses an IP packet of `version` (4 or 6) from its first byte.
pub fn parse_ip(payload: &[u8], version: u8) -> Result<Packet, PacketError> {
    let first = *payload.first().ok_or(PacketError::TruncatedIp)?;
    if first >> 4 != version {
        return Err(PacketError::VersionMismatch(first >> 4));
    }
    if version == 4 { parse_ipv4(payload) } else { parse_ipv6(payload) }
}

fn parse_ipv4(payload: &[u8]) -> Result<Packet, PacketError> {
    let header: &[u8; IPV4_MIN_HEADER] =
        payload.get(..IPV4_MIN_HEADER).and_then(|h| h.try_into().ok()).ok_or(PacketError::TruncatedIp)?;
    let header_len = usize::from(header[0] & 0x0f) * 4;
    if header_len < IPV4_MIN_HEADER {
        return Err(PacketError::BadIpv4HeaderLength);
    }
    let protocol = header[9];
    let fragment_offset = u16::from_be_bytes([header[6], header[7]]) & 0x1fff;
    let src = Ipv4Addr::new(header[12], header[13], header[14], header[15]);
    let dst = Ipv4Addr::new(header[16], header[17], header[18], header[19]);
    let length = u32::from(u16::from_be_bytes([header[2], header[3]]));
    let transport = if fragment_offset != 0 {
        Transport::Fragment
    } else {
        let upper = payload.get(header_len..).ok_or(PacketError::TruncatedIp)?;
        parse_transport(upper, protocol, PROTO_ICMP)?
    };
    Ok(Packet { src: src.into(), dst: dst.into(), protocol, transport, length })
}

fn parse_ipv6(payload: &[u8]) -> Result<Packet, PacketError> {
    let header: &[u8; IPV6_HEADER] =
        payload.get(..IPV6_HEADER).and_then(|h| h.try_into().ok()).ok_or(PacketError::TruncatedIp)?;
    let address = |at: usize| {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&header[at..at + 16]);
        Ipv6Addr::from(octets)
    };
    let (src, dst) = (address(8), address(24));
    // A jumbogram's payload length is 0 (its length is in a hop-by-hop option): 40 is a floor.
    let length = u32::from(u16::from_be_bytes([header[4], header[5]])) + IPV6_HEADER as u32;
    let mut next = header[6];
    let mut offset = IPV6_HEADER;
    let mut fragment = false;
    let mut skipped = 0;
    while matches!(
        next,
        IPV6_HOP_BY_HOP
            | IPV6_ROUTING
            | IPV6_FRAGMENT
            | IPV6_AUTH
            | IPV6_DEST_OPTS
            | IPV6_MOBILITY
            | IPV6_HIP
            | IPV6_SHIM6
    ) {
        if skipped == MAX_IPV6_EXTENSION_HEADERS {
            return Err(PacketError::TooManyExtensionHeaders);
        }
        skipped += 1;
        let extension = payload.get(offset..offset.saturating_add(8)).ok_or(PacketError::TruncatedIp)?;
        let length = match next {
            IPV6_FRAGMENT => {
                fragment |= u16::from_be_bytes([extension[2], extension[3]]) >> 3 != 0;
                8
            }
            // The authentication header counts 4-octet units, less 2.
            IPV6_AUTH => (usize::from(extension[1]) + 2) * 4,
            _ => (usize::from(extension[1]) + 1) * 8,
        };
        next = extension[0];
        offset = offset.saturating_add(length);
    }
    let transport = if fragment {
        Transport::Fragment
    } else {
        let upper = payload.get(offset..).ok_or(PacketError::TruncatedIp)?;
        parse_transport(upper, next, PROTO_ICMPV6)?
    };
    Ok(Packet { src: src.into(), dst: dst.into(), protocol: next, transport, length })
}

fn parse_transport(upper: &[u8], protocol: u8, icmp: u8) -> Result<Transport, PacketError> {
    match protocol {
        PROTO_TCP | PROTO_UDP => match (be_u16(upper, 0), be_u16(upper, 2)) {
            (Some(src), Some(dst)) => Ok(Transport::Ports { src, dst }),
            _ => Err(PacketError::TruncatedTransport),
        },
        p if p == icmp => match upper {
            [kind, code, rest @ ..] => {
                // Echo request and reply: ICMP 8 and 0, ICMPv6 128 and 129.
                let echo = matches!((icmp, *kind), (PROTO_ICMP, 0 | 8) | (PROTO_ICMPV6, 128 | 129));
                let id = match rest {
                    [_, _, a, b, ..] if echo => u16::from_be_bytes([*a, *b]),
                    _ => 0,
                };
                Ok(Transport::Icmp { kind: *kind, code: *code, id })
            }
            _ => Err(PacketError::TruncatedTransport),
        },
        _ => Ok(Transport::Other),
    }
}
