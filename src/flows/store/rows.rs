//! The pure part of the flow stores: how rows are encoded and decoded, the key flows are
//! aggregated by, how two aggregates merge, what a query matches, and which raw rows form the
//! next upload batch. No I/O here; everything is unit tested in `super::tests`.
//!
//! Raw rows are stored in chunks: one value of flow.db's "flows" table holds consecutive rows
//! (tagged postcard records back to back, [`ven_proto::flow_row`], at most [`CHUNK_BYTES`])
//! under the sequence number of its
//! first row. redb splits a full leaf page in the middle, so rows stored one per key leave
//! sequential appends' leaves half full (measured: 107 bytes a row on disk); a chunk fills a
//! leaf on its own, and the last chunk is continued by the next flush.

use std::net::IpAddr;

use ven_proto::{FlowRecord, FlowVerdict, IpNet, MAX_FLOWS_PER_BATCH};

use super::{FlowQuery, VerdictFilter};

/// Bytes of an aggregation key: per address a family byte and 16 address bytes (IPv4 mapped),
/// then protocol, port (big-endian, so keys sort by port) and verdict.
pub(super) const SUMMARY_KEY_BYTES: usize = 2 * 17 + 1 + 2 + 1;

/// Largest encoded row: the tag, two IPv6 addresses (17 bytes each) and every varint at its
/// widest make 85 bytes (tested in ven_proto).
pub(super) const ROW_BUFFER_BYTES: usize = ven_proto::flow_row::MAX_ROW_BYTES;

/// Encodes one flow record as a stored row (the tag, then postcard as on the wire) into
/// `buffer`. Rows written before packets and bytes (protocol version 3, no tag) still decode.
pub(super) fn encode_row<'b>(record: &FlowRecord, buffer: &'b mut [u8; ROW_BUFFER_BYTES]) -> &'b [u8] {
    // INVARIANT: every record fits the buffer, so this never yields the empty row (which would
    // be stored as an undecodable one rather than panic).
    ven_proto::flow_row::encode(record, buffer)
}

/// Most bytes of rows in one chunk: alone it fills a redb leaf page (4096 bytes, less 4 of
/// page header, 4 of value length and 8 of key).
pub(super) const CHUNK_BYTES: usize = 4096 - 4 - 4 - 8;

/// Decodes the chunk whose first row is numbered `first`: `each(seq, Some(record))` for every
/// row in order, and `each(seq, None)` once for a row that does not decode, which ends the chunk
/// (the rows after it cannot be located). Stops when `each` returns false. Never panics.
pub(super) fn decode_chunk(first: u64, chunk: &[u8], mut each: impl FnMut(u64, Option<FlowRecord>) -> bool) {
    let mut rest = chunk;
    let mut seq = first;
    while !rest.is_empty() {
        match ven_proto::flow_row::take(rest) {
            Ok((record, tail)) => {
                if !each(seq, Some(record)) {
                    return;
                }
                rest = tail;
                seq = seq.saturating_add(1);
            }
            Err(_) => {
                each(seq, None);
                return;
            }
        }
    }
}

/// Rows in a chunk when all of it decodes (so it may be continued), else `None`.
pub(super) fn whole_chunk_rows(chunk: &[u8]) -> Option<u64> {
    let mut rows = 0;
    let mut whole = true;
    decode_chunk(0, chunk, |_, record| {
        whole = record.is_some();
        rows += u64::from(whole);
        whole
    });
    whole.then_some(rows)
}

/// Decodes a stored aggregate; `None` when the bytes are not exactly one record (garbage,
/// truncated, trailing bytes). Never panics.
pub fn decode_row(bytes: &[u8]) -> Option<FlowRecord> {
    match ven_proto::flow_row::take(bytes) {
        Ok((record, [])) => Some(record),
        _ => None,
    }
}

/// The key a flow is aggregated by in flowsum.db: source, destination, protocol, port and
/// verdict. The rule, counts, times, scale and overflow flag are what gets merged.
pub(super) fn summary_key(record: &FlowRecord) -> [u8; SUMMARY_KEY_BYTES] {
    let mut key = [0; SUMMARY_KEY_BYTES];
    put_addr(&mut key[0..17], record.src);
    put_addr(&mut key[17..34], record.dst);
    key[34] = record.protocol;
    key[35..37].copy_from_slice(&record.port.to_be_bytes());
    key[37] = verdict_byte(record.verdict);
    key
}

fn put_addr(out: &mut [u8], addr: IpAddr) {
    let (family, octets) = match addr {
        IpAddr::V4(v4) => (4, v4.to_ipv6_mapped().octets()),
        IpAddr::V6(v6) => (6, v6.octets()),
    };
    out[0] = family;
    out[1..17].copy_from_slice(&octets);
}

fn verdict_byte(verdict: FlowVerdict) -> u8 {
    match verdict {
        FlowVerdict::Allowed => 0,
        FlowVerdict::Observed => 1,
        FlowVerdict::WouldDrop => 2,
        FlowVerdict::Dropped => 3,
    }
}

/// Folds `newer` into the aggregate `stored` of the same key: counts, packets and bytes add
/// (saturating; the known bytes add up, unknown only when neither knows: an accepted flow's
/// bytes come from conntrack in the interval its connections end in, so the record of the
/// interval its first packet was logged in has none of its own), the earliest first and latest last
/// sighting, the largest sampling scale, overflow if either was, and the rule of `newer` (the
/// latest appended).
pub(super) fn merge(stored: &FlowRecord, newer: &FlowRecord) -> FlowRecord {
    FlowRecord {
        count: stored.count.saturating_add(newer.count),
        packets: stored.packets.saturating_add(newer.packets),
        bytes: match (stored.bytes, newer.bytes) {
            (Some(a), Some(b)) => Some(a.saturating_add(b)),
            (known @ Some(_), None) | (None, known) => known,
        },
        first_seen: stored.first_seen.min(newer.first_seen),
        last_seen: stored.last_seen.max(newer.last_seen),
        sampling_scale: stored.sampling_scale.max(newer.sampling_scale),
        overflow: stored.overflow || newer.overflow,
        rule: newer.rule,
        ..*newer
    }
}

/// Whether `addr` is inside `net` (its host bits ignored); never across families.
pub(super) fn net_contains(net: &IpNet, addr: IpAddr) -> bool {
    match (net.network().addr(), addr) {
        (IpAddr::V4(network), IpAddr::V4(addr)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(net.prefix())).unwrap_or(0);
            u32::from(addr) & mask == u32::from(network)
        }
        (IpAddr::V6(network), IpAddr::V6(addr)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(net.prefix())).unwrap_or(0);
            u128::from(addr) & mask == u128::from(network)
        }
        _ => false,
    }
}

/// Whether a stored record is one the query asks for (the view is chosen by the file read).
pub(super) fn matches(query: &FlowQuery, record: &FlowRecord) -> bool {
    let verdict = match query.verdicts {
        VerdictFilter::Allowed => record.verdict == FlowVerdict::Allowed,
        VerdictFilter::Unallowed => record.verdict.is_unallowed(),
        VerdictFilter::Any => true,
    };
    verdict
        && query.since.is_none_or(|since| record.last_seen >= since)
        && query.src.as_ref().is_none_or(|net| net_contains(net, record.src))
        && query.dst.as_ref().is_none_or(|net| net_contains(net, record.dst))
        && query.port.is_none_or(|port| record.port == port)
        && query.protocol.is_none_or(|protocol| record.protocol == protocol)
}

/// Gathers the next upload batch from raw rows offered in ascending sequence order (the backup
/// file's, then the current file's): rows after `acknowledged`, consecutive, at most `max`.
/// A row that does not decode before the batch starts is skipped (counted); one inside the batch
/// ends it, as a missing sequence number does.
#[derive(Debug)]
pub(super) struct BatchBuilder {
    acknowledged: u64,
    max: usize,
    first: u64,
    records: Vec<FlowRecord>,
    /// Rows that did not decode.
    pub(super) undecodable: u64,
    closed: bool,
}

impl BatchBuilder {
    /// `max` is clamped to [`MAX_FLOWS_PER_BATCH`], the most the PCE takes at once.
    pub(super) fn new(acknowledged: u64, max: usize) -> Self {
        let max = max.min(MAX_FLOWS_PER_BATCH);
        Self { acknowledged, max, first: 0, records: Vec::new(), undecodable: 0, closed: max == 0 }
    }

    /// Offers the row numbered `seq` (`None`: it did not decode); false once the batch takes no
    /// more rows.
    pub(super) fn offer(&mut self, seq: u64, record: Option<FlowRecord>) -> bool {
        if self.closed {
            return false;
        }
        if seq <= self.acknowledged {
            return true;
        }
        if self.records.is_empty() {
            match record {
                Some(record) => {
                    self.first = seq;
                    self.records.push(record);
                }
                None => self.undecodable += 1,
            }
        } else {
            let next = self.first.saturating_add(self.records.len() as u64);
            match record {
                Some(record) if seq == next => self.records.push(record),
                Some(_) => self.closed = true,
                None => {
                    self.undecodable += 1;
                    self.closed = true;
                }
            }
        }
        if self.records.len() >= self.max {
            self.closed = true;
        }
        !self.closed
    }

    /// The batch, `None` when no row was taken.
    pub(super) fn finish(self) -> (Option<ven_proto::FlowBatch>, u64) {
        let batch = (!self.records.is_empty())
            .then_some(ven_proto::FlowBatch { first: self.first, records: self.records });
        (batch, self.undecodable)
    }
}
