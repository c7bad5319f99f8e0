//! The ctnetlink wire format, written by hand: building requests and decoding the kernel's replies.
//!
//! Everything here is pure. The decoders take untrusted bytes (a datagram from a netlink socket)
//! and never panic: every length is checked against the bytes that are actually there, attribute
//! lengths are validated before use, and NLA/NLMSG alignment (4) is applied with the remaining
//! length as a ceiling. A malformed datagram gives [`ConntrackError::Malformed`] with the byte
//! offset, in the datagram, where decoding stopped.
//!
//! Layout (linux/netlink.h, linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h):
//! `nlmsghdr (16) | nfgenmsg (4) | attributes`, where an attribute is `nla_len u16 | nla_type u16 |
//! payload`, padded to 4. Netlink headers are in host byte order; attribute payloads carrying
//! addresses, ports, zones and ids are big-endian.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use nix::errno::Errno;

use super::{Connection, ConntrackError, Icmp};
use crate::netlink::{
    NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NLMSG_HDR_LEN, NLMSG_NOOP, NLMSG_OVERRUN, align,
};

// Netlink message header (linux/netlink.h): the shared part is in `crate::netlink`.
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP_INTR: u16 = 0x10;
/// NLM_F_ROOT | NLM_F_MATCH.
const NLM_F_DUMP: u16 = 0x300;

// nfnetlink (linux/netfilter/nfnetlink.h): message type = subsystem << 8 | message.
const NFGENMSG_LEN: usize = 4;
const NFNETLINK_V0: u8 = 0;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;

// Attributes (linux/netlink.h, nfnetlink_conntrack.h).
const NLA_HDR_LEN: usize = 4;
const NLA_F_NESTED: u16 = 0x8000;
/// Clears NLA_F_NESTED and NLA_F_NET_BYTEORDER.
const NLA_TYPE_MASK: u16 = 0x3fff;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_COUNTERS_ORIG: u16 = 9;
const CTA_COUNTERS_REPLY: u16 = 10;
const CTA_ID: u16 = 12;
const CTA_COUNTERS_PACKETS: u16 = 1;
const CTA_COUNTERS_BYTES: u16 = 2;
const CTA_COUNTERS32_PACKETS: u16 = 3;
const CTA_COUNTERS32_BYTES: u16 = 4;
/// The multicast group of destroyed entries (NFNLGRP_CONNTRACK_DESTROY).
pub const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
const CTA_PROTO_ICMPV6_ID: u16 = 7;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTO_ICMPV6_CODE: u16 = 9;

/// Address families as nfgenmsg carries them (linux/socket.h).
pub(crate) const AF_UNSPEC: u8 = 0;
pub(crate) const AF_INET: u8 = 2;
pub(crate) const AF_INET6: u8 = 10;

/// IP protocol numbers the decoder and the policy look at.
pub(crate) const IPPROTO_ICMP: u8 = 1;
pub(crate) const IPPROTO_TCP: u8 = 6;
pub(crate) const IPPROTO_UDP: u8 = 17;
pub(crate) const IPPROTO_ICMPV6: u8 = 58;

const fn ctnetlink_type(message: u16) -> u16 {
    (NFNL_SUBSYS_CTNETLINK << 8) | message
}

fn malformed(what: &'static str, offset: usize) -> ConntrackError {
    ConntrackError::Malformed { what, offset }
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// A dump request for the whole table of one family ([`AF_UNSPEC`]: every family).
pub(crate) fn dump_request(seq: u32, family: u8) -> Vec<u8> {
    let mut message = Vec::with_capacity(NLMSG_HDR_LEN + NFGENMSG_LEN);
    let start =
        begin_message(&mut message, ctnetlink_type(IPCTNL_MSG_CT_GET), NLM_F_REQUEST | NLM_F_DUMP, seq);
    push_nfgenmsg(&mut message, family);
    end_message(&mut message, start);
    message
}

/// Appends a delete request for `connection` to `out` (several may share one datagram).
///
/// INVARIANT: the request always carries CTA_TUPLE_ORIG. A delete without a tuple is a flush of
/// the whole table in the kernel, so no code path may build one.
pub fn push_delete_request(out: &mut Vec<u8>, seq: u32, connection: &Connection) {
    let start = begin_message(out, ctnetlink_type(IPCTNL_MSG_CT_DELETE), NLM_F_REQUEST | NLM_F_ACK, seq);
    push_nfgenmsg(out, connection.family());
    let tuple = begin_nest(out, CTA_TUPLE_ORIG);
    let ip = begin_nest(out, CTA_TUPLE_IP);
    match (connection.original_src, connection.original_dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            push_attr(out, CTA_IP_V4_SRC, &src.octets());
            push_attr(out, CTA_IP_V4_DST, &dst.octets());
        }
        (src, dst) => {
            push_attr(out, CTA_IP_V6_SRC, &v6(src).octets());
            push_attr(out, CTA_IP_V6_DST, &v6(dst).octets());
        }
    }
    end_nest(out, ip);
    let proto = begin_nest(out, CTA_TUPLE_PROTO);
    push_attr(out, CTA_PROTO_NUM, &[connection.protocol]);
    if let Some(port) = connection.src_port {
        push_attr(out, CTA_PROTO_SRC_PORT, &port.to_be_bytes());
    }
    if let Some(port) = connection.dst_port {
        push_attr(out, CTA_PROTO_DST_PORT, &port.to_be_bytes());
    }
    if let Some(icmp) = connection.icmp {
        let [id, kind, code] = if connection.protocol == IPPROTO_ICMPV6 {
            [CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE]
        } else {
            [CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE]
        };
        push_attr(out, id, &icmp.id.to_be_bytes());
        push_attr(out, kind, &[icmp.kind]);
        push_attr(out, code, &[icmp.code]);
    }
    end_nest(out, proto);
    end_nest(out, tuple);
    if let Some(zone) = connection.zone {
        push_attr(out, CTA_ZONE, &zone.to_be_bytes());
    }
    // With CTA_ID the kernel deletes only this very entry, not a newer one reusing the tuple.
    if let Some(id) = connection.id {
        push_attr(out, CTA_ID, &id.to_be_bytes());
    }
    end_message(out, start);
}

/// A mixed-family tuple never decodes, so this only maps a v4 address in a v6 tuple.
fn v6(addr: IpAddr) -> Ipv6Addr {
    match addr {
        IpAddr::V6(v6) => v6,
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
    }
}

fn begin_message(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32) -> usize {
    let start = out.len();
    out.extend_from_slice(&0u32.to_ne_bytes()); // length, patched by end_message
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id 0: the kernel fills in ours
    start
}

fn end_message(out: &mut [u8], start: usize) {
    // Our requests are at most a few hundred bytes.
    let len = u32::try_from(out.len() - start).unwrap_or(u32::MAX);
    out[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

fn push_nfgenmsg(out: &mut Vec<u8>, family: u8) {
    out.extend_from_slice(&[family, NFNETLINK_V0, 0, 0]); // res_id 0
}

fn push_attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = u16::try_from(NLA_HDR_LEN + payload.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(align(out.len()), 0);
}

fn begin_nest(out: &mut Vec<u8>, kind: u16) -> usize {
    let start = out.len();
    out.extend_from_slice(&0u16.to_ne_bytes()); // length, patched by end_nest
    out.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    start
}

fn end_nest(out: &mut [u8], start: usize) {
    let len = u16::try_from(out.len() - start).unwrap_or(u16::MAX);
    out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

/// One netlink message borrowed from a datagram. `offset` is where its payload starts.
struct Message<'a> {
    kind: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
    offset: usize,
}

/// The messages of one datagram, in order; stops at the first malformed header.
struct Messages<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Messages<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, ConntrackError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.bytes.get(self.pos..)?;
        if rest.is_empty() {
            return None;
        }
        let at = self.pos;
        // Whatever happens below, this iterator is finished unless a message is returned.
        self.pos = self.bytes.len();
        let Some(header) = rest.get(..NLMSG_HDR_LEN) else {
            return Some(Err(malformed("netlink header cut short", at)));
        };
        let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len < NLMSG_HDR_LEN || len > rest.len() {
            return Some(Err(malformed("netlink message length out of bounds", at)));
        }
        let message = Message {
            kind: u16::from_ne_bytes([header[4], header[5]]),
            flags: u16::from_ne_bytes([header[6], header[7]]),
            seq: u32::from_ne_bytes([header[8], header[9], header[10], header[11]]),
            payload: &rest[NLMSG_HDR_LEN..len],
            offset: at + NLMSG_HDR_LEN,
        };
        self.pos = at + align(len).min(rest.len());
        Some(Ok(message))
    }
}

/// One attribute: its type without the NESTED/BYTEORDER flags, its payload, and the payload's
/// offset in the datagram.
struct Attr<'a> {
    kind: u16,
    payload: &'a [u8],
    offset: usize,
}

/// The attributes in `bytes` (which start at datagram offset `base`); stops at the first
/// malformed one. Trailing bytes too short for an attribute header are an error: the kernel
/// always pads to a whole attribute.
struct Attrs<'a> {
    bytes: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> Attrs<'a> {
    fn new(bytes: &'a [u8], base: usize) -> Self {
        Self { bytes, pos: 0, base }
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<Attr<'a>, ConntrackError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.bytes.get(self.pos..)?;
        if rest.is_empty() {
            return None;
        }
        let start = self.pos;
        let at = self.base + start;
        self.pos = self.bytes.len();
        let Some(header) = rest.get(..NLA_HDR_LEN) else {
            return Some(Err(malformed("attribute header cut short", at)));
        };
        let len = usize::from(u16::from_ne_bytes([header[0], header[1]]));
        if len < NLA_HDR_LEN || len > rest.len() {
            return Some(Err(malformed("attribute length out of bounds", at)));
        }
        let attr = Attr {
            kind: u16::from_ne_bytes([header[2], header[3]]) & NLA_TYPE_MASK,
            payload: &rest[NLA_HDR_LEN..len],
            offset: at + NLA_HDR_LEN,
        };
        self.pos = start + align(len).min(rest.len());
        Some(Ok(attr))
    }
}

impl Attr<'_> {
    fn array<const N: usize>(&self, what: &'static str) -> Result<[u8; N], ConntrackError> {
        <[u8; N]>::try_from(self.payload).map_err(|_| malformed(what, self.offset))
    }

    fn u8(&self, what: &'static str) -> Result<u8, ConntrackError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn be16(&self, what: &'static str) -> Result<u16, ConntrackError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn be32(&self, what: &'static str) -> Result<u32, ConntrackError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }
}

/// Decodes the payload of one ctnetlink conntrack message (`nfgenmsg | attributes`) that starts
/// at datagram offset `base`. Needs CTA_TUPLE_ORIG with both addresses (of one family, matching
/// nfgenmsg's family) and the protocol number; reads CTA_ZONE and CTA_ID when present; ignores
/// every other attribute.
pub fn parse_connection(payload: &[u8], base: usize) -> Result<Connection, ConntrackError> {
    let Some(header) = payload.get(..NFGENMSG_LEN) else {
        return Err(malformed("nfgenmsg header cut short", base));
    };
    let family = header[0];
    let mut tuple = None;
    let mut zone = None;
    let mut id = None;
    for attr in Attrs::new(&payload[NFGENMSG_LEN..], base + NFGENMSG_LEN) {
        let attr = attr?;
        match attr.kind {
            CTA_TUPLE_ORIG => tuple = Some(parse_tuple(&attr)?),
            CTA_ZONE => zone = Some(attr.be16("CTA_ZONE is not 2 bytes")?),
            CTA_ID => id = Some(attr.be32("CTA_ID is not 4 bytes")?),
            _ => {}
        }
    }
    let Some(mut connection) = tuple else {
        return Err(malformed("conntrack entry without CTA_TUPLE_ORIG", base));
    };
    if connection.family() != family {
        return Err(malformed("tuple addresses do not match the message's family", base));
    }
    connection.zone = zone;
    connection.id = id;
    Ok(connection)
}

fn parse_tuple(tuple: &Attr<'_>) -> Result<Connection, ConntrackError> {
    let mut addresses = None;
    let mut proto = None;
    for attr in Attrs::new(tuple.payload, tuple.offset) {
        let attr = attr?;
        match attr.kind {
            CTA_TUPLE_IP => addresses = Some(parse_addresses(&attr)?),
            CTA_TUPLE_PROTO => proto = Some(parse_proto(&attr)?),
            _ => {}
        }
    }
    let Some((original_src, original_dst)) = addresses else {
        return Err(malformed("tuple without CTA_TUPLE_IP", tuple.offset));
    };
    let Some(proto) = proto else {
        return Err(malformed("tuple without CTA_TUPLE_PROTO", tuple.offset));
    };
    Ok(Connection {
        protocol: proto.number,
        original_src,
        original_dst,
        src_port: proto.src_port,
        dst_port: proto.dst_port,
        icmp: proto.icmp,
        zone: None,
        id: None,
    })
}

fn parse_addresses(ip: &Attr<'_>) -> Result<(IpAddr, IpAddr), ConntrackError> {
    let (mut src, mut dst) = (None, None);
    for attr in Attrs::new(ip.payload, ip.offset) {
        let attr = attr?;
        match attr.kind {
            CTA_IP_V4_SRC => src = Some(IpAddr::V4(Ipv4Addr::from(attr.array::<4>("IPv4 source size")?))),
            CTA_IP_V4_DST => dst = Some(IpAddr::V4(Ipv4Addr::from(attr.array::<4>("IPv4 dest size")?))),
            CTA_IP_V6_SRC => src = Some(IpAddr::V6(Ipv6Addr::from(attr.array::<16>("IPv6 source size")?))),
            CTA_IP_V6_DST => dst = Some(IpAddr::V6(Ipv6Addr::from(attr.array::<16>("IPv6 dest size")?))),
            _ => {}
        }
    }
    match (src, dst) {
        (Some(src), Some(dst)) if src.is_ipv4() == dst.is_ipv4() => Ok((src, dst)),
        (Some(_), Some(_)) => Err(malformed("tuple mixes IPv4 and IPv6", ip.offset)),
        _ => Err(malformed("tuple without both addresses", ip.offset)),
    }
}

struct Proto {
    number: u8,
    src_port: Option<u16>,
    dst_port: Option<u16>,
    icmp: Option<Icmp>,
}

fn parse_proto(proto: &Attr<'_>) -> Result<Proto, ConntrackError> {
    let mut number = None;
    let (mut src_port, mut dst_port) = (None, None);
    let (mut icmp_id, mut icmp_type, mut icmp_code) = (None, None, None);
    for attr in Attrs::new(proto.payload, proto.offset) {
        let attr = attr?;
        match attr.kind {
            CTA_PROTO_NUM => number = Some(attr.u8("CTA_PROTO_NUM is not 1 byte")?),
            CTA_PROTO_SRC_PORT => src_port = Some(attr.be16("source port is not 2 bytes")?),
            CTA_PROTO_DST_PORT => dst_port = Some(attr.be16("destination port is not 2 bytes")?),
            CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID => icmp_id = Some(attr.be16("ICMP id is not 2 bytes")?),
            CTA_PROTO_ICMP_TYPE | CTA_PROTO_ICMPV6_TYPE => icmp_type = Some(attr.u8("ICMP type size")?),
            CTA_PROTO_ICMP_CODE | CTA_PROTO_ICMPV6_CODE => icmp_code = Some(attr.u8("ICMP code size")?),
            _ => {}
        }
    }
    let Some(number) = number else {
        return Err(malformed("tuple without CTA_PROTO_NUM", proto.offset));
    };
    let icmp = match (icmp_id, icmp_type, icmp_code) {
        (Some(id), Some(kind), Some(code)) => Some(Icmp { id, kind, code }),
        (None, None, None) => None,
        // The kernel needs all three to find the entry again.
        _ => return Err(malformed("incomplete ICMP tuple", proto.offset)),
    };
    Ok(Proto { number, src_port, dst_port, icmp })
}

/// Reads the kernel's replies to one dump request (sequence number `seq`), datagram by datagram.
///
/// Messages with another sequence number (stale replies) are skipped. Every conntrack entry is
/// handed to the visitor as it is decoded: the reader itself stores nothing, so its memory does
/// not depend on the size of the table.
#[derive(Debug)]
pub struct DumpReader {
    seq: u32,
    interrupted: bool,
    done: bool,
}

/// Whether the dump needs more datagrams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DumpProgress {
    More,
    Done,
}

impl DumpReader {
    pub fn new(seq: u32) -> Self {
        Self { seq, interrupted: false, done: false }
    }

    /// Whether any message of this dump carried NLM_F_DUMP_INTR: the table changed while it was
    /// walked, so entries may be missing or repeated and the dump must be done again.
    pub fn interrupted(&self) -> bool {
        self.interrupted
    }

    /// Decodes one datagram, calling `visit` for each conntrack entry. Returns
    /// [`DumpProgress::Done`] once NLMSG_DONE is read (later bytes are ignored). A kernel error
    /// (NLMSG_ERROR, or NLMSG_DONE carrying one) becomes [`ConntrackError::Kernel`].
    pub fn feed(
        &mut self,
        datagram: &[u8],
        visit: &mut dyn FnMut(Connection),
    ) -> Result<DumpProgress, ConntrackError> {
        if self.done {
            return Ok(DumpProgress::Done);
        }
        for message in Messages::new(datagram) {
            let message = message?;
            if message.seq != self.seq {
                continue;
            }
            if message.flags & NLM_F_DUMP_INTR != 0 {
                self.interrupted = true;
            }
            match message.kind {
                NLMSG_NOOP => {}
                NLMSG_DONE => {
                    // The kernel puts the dump's final status (0 or -errno) in the payload.
                    if let Some(status) = message.payload.get(..4) {
                        let status = i32::from_ne_bytes([status[0], status[1], status[2], status[3]]);
                        if status < 0 {
                            return Err(kernel("dump", status));
                        }
                    }
                    self.done = true;
                    return Ok(DumpProgress::Done);
                }
                NLMSG_ERROR => {
                    let status = error_status(&message)?;
                    if status != 0 {
                        return Err(kernel("dump", status));
                    }
                }
                NLMSG_OVERRUN => return Err(malformed("NLMSG_OVERRUN from the kernel", message.offset)),
                kind if kind == ctnetlink_type(IPCTNL_MSG_CT_NEW)
                    || kind == ctnetlink_type(IPCTNL_MSG_CT_GET) =>
                {
                    visit(parse_connection(message.payload, message.offset)?);
                }
                _ => return Err(malformed("unexpected message type in a conntrack dump", message.offset)),
            }
        }
        Ok(DumpProgress::More)
    }
}

/// What conntrack accounting (`nf_conntrack_acct`) counted for one connection, both directions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub packets: u64,
    pub bytes: u64,
}

/// Calls `visit` for every destroyed entry in one datagram of the NFNLGRP_CONNTRACK_DESTROY
/// group, with its accounting when the kernel sent it (`None`: accounting is off). Other
/// messages are skipped. Malformed bytes give an error; entries before them were visited.
pub fn for_each_destroyed(
    datagram: &[u8],
    visit: &mut dyn FnMut(Connection, Option<Totals>),
) -> Result<(), ConntrackError> {
    for message in Messages::new(datagram) {
        let message = message?;
        if message.kind != ctnetlink_type(IPCTNL_MSG_CT_DELETE) {
            continue;
        }
        let connection = parse_connection(message.payload, message.offset)?;
        let totals = parse_totals(message.payload, message.offset)?;
        visit(connection, totals);
    }
    Ok(())
}

/// CTA_COUNTERS_ORIG and CTA_COUNTERS_REPLY of one conntrack message, summed (saturating);
/// `None` when neither is there.
fn parse_totals(payload: &[u8], base: usize) -> Result<Option<Totals>, ConntrackError> {
    let Some(attributes) = payload.get(NFGENMSG_LEN..) else {
        return Err(malformed("nfgenmsg header cut short", base));
    };
    let mut totals: Option<Totals> = None;
    for attr in Attrs::new(attributes, base + NFGENMSG_LEN) {
        let attr = attr?;
        if attr.kind != CTA_COUNTERS_ORIG && attr.kind != CTA_COUNTERS_REPLY {
            continue;
        }
        let sum = totals.get_or_insert_with(Totals::default);
        for counter in Attrs::new(attr.payload, attr.offset) {
            let counter = counter?;
            let value = match counter.kind {
                CTA_COUNTERS_PACKETS | CTA_COUNTERS_BYTES => {
                    u64::from_be_bytes(counter.array("counter is not 8 bytes")?)
                }
                CTA_COUNTERS32_PACKETS | CTA_COUNTERS32_BYTES => {
                    u64::from(counter.be32("counter is not 4 bytes")?)
                }
                _ => continue,
            };
            match counter.kind {
                CTA_COUNTERS_PACKETS | CTA_COUNTERS32_PACKETS => {
                    sum.packets = sum.packets.saturating_add(value)
                }
                _ => sum.bytes = sum.bytes.saturating_add(value),
            }
        }
    }
    Ok(totals)
}

/// The status in an NLMSG_ERROR payload: 0 for an ACK, else -errno.
fn error_status(message: &Message<'_>) -> Result<i32, ConntrackError> {
    let Some(status) = message.payload.get(..4) else {
        return Err(malformed("NLMSG_ERROR without a status", message.offset));
    };
    Ok(i32::from_ne_bytes([status[0], status[1], status[2], status[3]]))
}

fn kernel(operation: &'static str, status: i32) -> ConntrackError {
    ConntrackError::Kernel { operation, errno: Errno::from_raw(status.saturating_neg()) }
}

/// The outcome the kernel reported for one request sent with NLM_F_ACK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    pub seq: u32,
    /// `None`: success; `Some(errno)`: the request failed.
    pub error: Option<Errno>,
}

/// Calls `on_ack` for every NLMSG_ERROR (ACK or failure) in one datagram; other messages are
/// skipped. Malformed bytes give an error.
pub fn for_each_ack(datagram: &[u8], on_ack: &mut dyn FnMut(Ack)) -> Result<(), ConntrackError> {
    for message in Messages::new(datagram) {
        let message = message?;
        if message.kind == NLMSG_ERROR {
            let status = error_status(&message)?;
            let error = (status != 0).then(|| Errno::from_raw(status.saturating_neg()));
            on_ack(Ack { seq: message.seq, error });
        }
    }
    Ok(())
}
