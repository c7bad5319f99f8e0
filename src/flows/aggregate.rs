//! Bounded in-memory aggregation of logged packets into flow summaries, between two flushes.
//!
//! Every NFLOG event's [`FlowKey`] is counted in a fixed-capacity open-addressing table (linear
//! probing, SipHash keyed per instance through [`RandomState`], so a sender choosing source
//! addresses cannot aim collisions at the table). The flush drains it into [`Summary`] records
//! and leaves it empty with its memory kept.
//!
//! Guarantees:
//! - **Memory follows the flows tracked, never past the cap.** The table's sizes are its cap,
//!   `capacity * 3 / 2` slots for `capacity` flows (from the board config, clamped to
//!   [`MAX_CAPACITY`]), halved: it starts at the smallest that keeps [`INITIAL_SLOTS`] (64 to
//!   127 slots, at most 7 KiB) and doubles whenever a new flow would load it past 2/3, so the
//!   last step lands exactly on the cap and never past it. Each flush empties it and gives the
//!   grown table back, so an idle agent holds the initial table whatever flood came before. A
//!   slot is 72 bytes: at the cap one tracked flow costs 108 bytes of table (target: 128;
//!   [`Aggregator::bytes_per_flow`]); while growing, at most 216 (just after a doubling), and a
//!   doubling briefly holds the old half beside the new table.
//! - **No allocation per event** beyond that amortised growth: log2(capacity / 64) doublings
//!   per interval at most, each moving every tracked flow once.
//! - **Overflow is counted, never evicted.** Once `capacity` flows are tracked, events of new
//!   keys fold into one "other" bucket per verdict ([`SummaryKey::Other`]) and into
//!   [`Counters::folded`]; flows already tracked keep counting.
//! - Counts saturate at `u32::MAX`; nothing here panics on any input.
//!
//! What is counted: logged packets ([`Event`]), and among them the connections, which
//! [`super::connections`] tells apart (the enforced default deny logs every dropped packet, the
//! other log rules the first packets of each connection): `count` is connections for every
//! verdict, `packets` and `bytes` what the log rules saw.
//!
//! Times are Unix seconds as `u32` (valid until 2106; later times saturate), so a summary needs
//! no epoch beside it and the kernel's NFLOG timestamps go in as they are. `first_seen` and
//! `last_seen` are the least and greatest times recorded, so events of a batch may come in any
//! order.
//!
//! Sampling (issue 4, later): [`Aggregator::record_sampled`] counts an event kept 1 in `scale` as
//! `scale` events; a summary's `scale` is the largest factor that went into it (1: every event was
//! counted, the count is exact).
//!
//! Why not `heapless` (named in the design card): its collections take their capacity as a
//! const generic, fixed at compile time and allocated whole, while ours comes from the board
//! config at run time and should cost memory only when flows come. A `Vec` grown by doubling
//! up to a hard cap gives the same bound (checked by the hostile-pattern test) without a
//! dependency.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::FlowKey;
use crate::firewall::LogVerdict;

/// Largest number of tracked flows an aggregator accepts (about 108 MB of table); larger
/// configured capacities are clamped to it.
pub const MAX_CAPACITY: usize = 1_000_000;

/// Fewest slots of a fresh table, and of the table after each flush (unless the cap is
/// smaller): the cap is halved while it keeps at least this many, so an idle host's aggregator
/// costs 3.5 to 7 KiB whatever its configured capacity.
pub const INITIAL_SLOTS: usize = 64;

/// Verdicts in the order of the "other" buckets.
const VERDICTS: [LogVerdict; 4] =
    [LogVerdict::Allowed, LogVerdict::Observed, LogVerdict::WouldDrop, LogVerdict::Dropped];

fn verdict_index(verdict: LogVerdict) -> usize {
    match verdict {
        LogVerdict::Allowed => 0,
        LogVerdict::Observed => 1,
        LogVerdict::WouldDrop => 2,
        LogVerdict::Dropped => 3,
    }
}

/// Address family of a compact key: IPv4 addresses are stored IPv4-mapped, and the tag keeps
/// them apart from the IPv6 address `::ffff:a.b.c.d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Family {
    V4,
    V6,
}

/// A [`FlowKey`] in 44 bytes (an `IpAddr` pair alone takes 34 plus padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CompactKey {
    src: [u8; 16],
    dst: [u8; 16],
    rule: u32,
    port: u16,
    protocol: u8,
    verdict: LogVerdict,
    // INVARIANT: one family for both addresses (a packet has one IP version).
    family: Family,
}

/// Hashed as one packed buffer: one SipHash write instead of one per field (half the hashing
/// time, measured in the flows bench).
impl std::hash::Hash for CompactKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut bytes = [0u8; 41];
        bytes[..16].copy_from_slice(&self.src);
        bytes[16..32].copy_from_slice(&self.dst);
        bytes[32..36].copy_from_slice(&self.rule.to_ne_bytes());
        bytes[36..38].copy_from_slice(&self.port.to_ne_bytes());
        bytes[38] = self.protocol;
        bytes[39] = self.verdict as u8;
        bytes[40] = self.family as u8;
        state.write(&bytes);
    }
}

impl CompactKey {
    fn new(key: &FlowKey) -> Self {
        let (src, dst, family) = match (key.src, key.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                (src.to_ipv6_mapped().octets(), dst.to_ipv6_mapped().octets(), Family::V4)
            }
            // Mixed families do not occur in one packet; were they given, both are kept as IPv6
            // (an IPv4 one mapped), which still keeps the key distinct and loses nothing.
            (src, dst) => (v6_octets(src), v6_octets(dst), Family::V6),
        };
        Self {
            src,
            dst,
            rule: key.rule,
            port: key.port,
            protocol: key.protocol,
            verdict: key.verdict,
            family,
        }
    }

    fn flow_key(&self) -> FlowKey {
        let addr = |octets: [u8; 16]| match self.family {
            Family::V4 => {
                let [.., a, b, c, d] = octets;
                IpAddr::V4(Ipv4Addr::new(a, b, c, d))
            }
            Family::V6 => IpAddr::V6(Ipv6Addr::from(octets)),
        };
        FlowKey {
            src: addr(self.src),
            dst: addr(self.dst),
            protocol: self.protocol,
            port: self.port,
            verdict: self.verdict,
            rule: self.rule,
        }
    }
}

fn v6_octets(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// One logged packet as the aggregator counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// Unix seconds.
    pub unix_secs: u64,
    /// Sampling factor: the packet stands for this many (0 is taken as 1).
    pub scale: u16,
    /// Whether it is a new connection ([`super::connections::Seen::is_connection`]).
    pub connection: bool,
    /// Bytes of the packet from its IP header.
    pub length: u32,
}

/// What is counted for one key (or one "other" bucket) during an interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tally {
    count: u32,
    packets: u32,
    bytes: u64,
    first_seen: u32,
    last_seen: u32,
    scale: u16,
}

/// What one call adds to a flow: a logged packet, or conntrack's account of a connection that
/// ended.
#[derive(Debug, Clone, Copy)]
enum Change<'a> {
    Logged(&'a Event),
    /// Packets not logged (the connection's, less those its log rule saw) and all its bytes.
    Accounted {
        packets: u64,
        bytes: u64,
    },
}

impl Tally {
    fn new(now: u32, change: Change<'_>) -> Self {
        let mut tally = Self { count: 0, packets: 0, bytes: 0, first_seen: now, last_seen: now, scale: 1 };
        tally.apply(now, change);
        tally
    }

    fn apply(&mut self, now: u32, change: Change<'_>) {
        match change {
            Change::Logged(event) => self.add(now, event),
            Change::Accounted { packets, bytes } => {
                let packets = u32::try_from(packets).unwrap_or(u32::MAX);
                self.packets = self.packets.saturating_add(packets);
                self.bytes = self.bytes.saturating_add(bytes);
                self.first_seen = self.first_seen.min(now);
                self.last_seen = self.last_seen.max(now);
            }
        }
    }

    fn add(&mut self, now: u32, event: &Event) {
        let scale = event.scale.max(1);
        if event.connection {
            self.count = self.count.saturating_add(u32::from(scale));
        }
        self.packets = self.packets.saturating_add(u32::from(scale));
        self.bytes = self.bytes.saturating_add(u64::from(event.length) * u64::from(scale));
        self.first_seen = self.first_seen.min(now);
        self.last_seen = self.last_seen.max(now);
        self.scale = self.scale.max(scale);
    }
}

/// One tracked flow: a slot of the table is `Option<Entry>` (the verdict's niche makes the
/// `Option` free). The key's and the tally's fields side by side share their padding: 72 bytes;
/// a test holds it to at most 128 per flow at the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    src: [u8; 16],
    dst: [u8; 16],
    bytes: u64,
    rule: u32,
    count: u32,
    packets: u32,
    first_seen: u32,
    last_seen: u32,
    port: u16,
    scale: u16,
    protocol: u8,
    verdict: LogVerdict,
    family: Family,
}

impl Entry {
    fn new(key: CompactKey, tally: Tally) -> Self {
        let CompactKey { src, dst, rule, port, protocol, verdict, family } = key;
        let Tally { count, packets, bytes, first_seen, last_seen, scale } = tally;
        Self {
            src,
            dst,
            bytes,
            rule,
            count,
            packets,
            first_seen,
            last_seen,
            port,
            scale,
            protocol,
            verdict,
            family,
        }
    }

    fn key(&self) -> CompactKey {
        let Self { src, dst, rule, port, protocol, verdict, family, .. } = *self;
        CompactKey { src, dst, rule, port, protocol, verdict, family }
    }

    fn tally(&self) -> Tally {
        let Self { count, packets, bytes, first_seen, last_seen, scale, .. } = *self;
        Tally { count, packets, bytes, first_seen, last_seen, scale }
    }

    fn apply(&mut self, now: u32, change: Change<'_>) {
        let mut tally = self.tally();
        tally.apply(now, change);
        let Tally { count, packets, bytes, first_seen, last_seen, scale } = tally;
        (self.count, self.packets, self.bytes) = (count, packets, bytes);
        (self.first_seen, self.last_seen, self.scale) = (first_seen, last_seen, scale);
    }
}

/// What a summary counts: one flow, or everything of one verdict that found the table full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SummaryKey {
    Flow(FlowKey),
    Other(LogVerdict),
}

/// One flow's aggregate over a flush interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub key: SummaryKey,
    /// Connections (see the module doc), scaled when sampled; saturates at `u32::MAX`.
    pub count: u32,
    /// Logged packets and their bytes (IP length), scaled when sampled; saturate.
    pub packets: u32,
    pub bytes: u64,
    /// Unix seconds of the earliest and latest event.
    pub first_seen: u32,
    pub last_seen: u32,
    /// Largest sampling factor among the events counted; 1: not sampled.
    pub scale: u16,
}

impl Summary {
    fn new(key: SummaryKey, tally: Tally) -> Self {
        let Tally { count, packets, bytes, first_seen, last_seen, scale } = tally;
        Self { key, count, packets, bytes, first_seen, last_seen, scale }
    }

    /// Whether any event in it was sampled (its count is an estimate).
    pub fn sampled(&self) -> bool {
        self.scale > 1
    }
}

/// The aggregator's counters (for `ven status`). All but `tracked` run since construction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Events recorded (each once, whatever its sampling scale).
    pub events: u64,
    /// Flows in the table now.
    pub tracked: usize,
    /// Events folded into an "other" bucket because the table was full.
    pub folded: u64,
    /// Most flows the table ever held at once.
    pub high_water: usize,
}

/// The bounded table of flows of the current interval. See the module doc.
#[derive(Debug)]
pub struct Aggregator<S = RandomState> {
    // INVARIANT: `slots.len() == max_slots >> shift` with `shift <= initial_shift`, and it
    // holds more than `tracked` slots: below `max_slots` the load stays at most 2/3 (the table
    // grows first), and `max_slots > capacity >= tracked`. So a probe always reaches an empty
    // slot or the key.
    slots: Vec<Option<Entry>>,
    capacity: usize,
    /// The size the table stops growing at: `capacity * 3 / 2` (load 2/3 at the cap).
    max_slots: usize,
    /// The table has `max_slots >> shift` slots; it starts (and restarts at each flush) at
    /// `initial_shift`, the largest shift that keeps [`INITIAL_SLOTS`] (0 for small caps).
    shift: u32,
    initial_shift: u32,
    other: [Option<Tally>; 4],
    hasher: S,
    counters: Counters,
}

impl Aggregator<RandomState> {
    /// A table for `capacity` flows (clamped to [`MAX_CAPACITY`]), hashed with a fresh random
    /// key. Capacity 0 folds everything into the "other" buckets.
    pub fn new(capacity: usize) -> Self {
        Self::with_hasher(capacity, RandomState::new())
    }
}

impl<S: BuildHasher> Aggregator<S> {
    /// As [`Aggregator::new`] with a given hasher (tests use a constant one to force collisions).
    pub fn with_hasher(capacity: usize, hasher: S) -> Self {
        let capacity = capacity.min(MAX_CAPACITY);
        let max_slots = if capacity == 0 { 0 } else { (capacity + capacity / 2).max(capacity + 1) };
        let mut initial_shift = 0;
        while max_slots >> (initial_shift + 1) >= INITIAL_SLOTS {
            initial_shift += 1;
        }
        Self {
            slots: empty_table(max_slots >> initial_shift),
            capacity,
            max_slots,
            shift: initial_shift,
            initial_shift,
            other: [None; 4],
            hasher,
            counters: Counters::default(),
        }
    }

    /// Most flows tracked between two flushes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes of table per tracked flow with the table at its cap (slots are more than flows).
    pub fn bytes_per_flow(&self) -> usize {
        let table = self.max_slots * size_of::<Option<Entry>>();
        table.checked_div(self.capacity).unwrap_or(0)
    }

    /// Bytes the table holds now (it grows with the flows tracked, up to the cap).
    pub fn table_bytes(&self) -> usize {
        self.slots.capacity() * size_of::<Option<Entry>>()
    }

    /// Bytes the table holds when grown to its cap.
    pub fn max_table_bytes(&self) -> usize {
        self.max_slots * size_of::<Option<Entry>>()
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Counts one event of `key` at `unix_secs`.
    pub fn record(&mut self, key: &FlowKey, unix_secs: u64) {
        self.record_sampled(key, unix_secs, 1);
    }

    /// Counts one event kept by sampling 1 in `scale` as `scale` events (0 is taken as 1), each
    /// a new connection of 0 bytes.
    pub fn record_sampled(&mut self, key: &FlowKey, unix_secs: u64, scale: u16) {
        self.record_event(key, &Event { unix_secs, scale, connection: true, length: 0 });
    }

    /// Counts one logged packet: a connection or a packet of one counted already.
    pub fn record_event(&mut self, key: &FlowKey, event: &Event) {
        self.counters.events = self.counters.events.saturating_add(1);
        self.update(key, event.unix_secs, Change::Logged(event));
    }

    /// Adds what conntrack accounting counted for one ended connection of `key` (whose first
    /// packet was counted already, maybe in an earlier interval): `packets` beyond those logged,
    /// and `bytes`. No connection is counted.
    pub fn record_accounted(&mut self, key: &FlowKey, unix_secs: u64, packets: u64, bytes: u64) {
        self.update(key, unix_secs, Change::Accounted { packets, bytes });
    }

    fn update(&mut self, key: &FlowKey, unix_secs: u64, change: Change<'_>) {
        let now = u32::try_from(unix_secs).unwrap_or(u32::MAX);
        let compact = CompactKey::new(key);
        let len = self.slots.len();
        if len > 0 {
            let hash = self.hasher.hash_one(compact);
            let mut index = reduce(hash, len);
            for _ in 0..len {
                match &mut self.slots[index] {
                    Some(entry) if entry.key() == compact => {
                        entry.apply(now, change);
                        return;
                    }
                    Some(_) => index = if index + 1 == len { 0 } else { index + 1 },
                    None => {
                        if self.counters.tracked >= self.capacity {
                            break;
                        }
                        let entry = Entry::new(compact, Tally::new(now, change));
                        if self.needs_growth() {
                            self.grow();
                            self.insert_new(hash, entry);
                        } else {
                            self.slots[index] = Some(entry);
                        }
                        self.counters.tracked += 1;
                        self.counters.high_water = self.counters.high_water.max(self.counters.tracked);
                        return;
                    }
                }
            }
        }
        self.counters.folded = self.counters.folded.saturating_add(1);
        match &mut self.other[verdict_index(key.verdict)] {
            Some(tally) => tally.apply(now, change),
            bucket @ None => *bucket = Some(Tally::new(now, change)),
        }
    }

    /// Whether one more flow would load the table past 2/3 while it may still grow.
    fn needs_growth(&self) -> bool {
        let len = self.slots.len();
        len < self.max_slots && (self.counters.tracked + 1) * 3 > len * 2
    }

    /// Doubles the table (the next size towards `max_slots`) and moves every tracked flow
    /// into it.
    fn grow(&mut self) {
        self.shift -= 1;
        let old = std::mem::replace(&mut self.slots, empty_table(self.max_slots >> self.shift));
        for entry in old.into_iter().flatten() {
            let hash = self.hasher.hash_one(entry.key());
            self.insert_new(hash, entry);
        }
    }

    /// Puts an entry whose key is not in the table into the first free slot of its probe.
    fn insert_new(&mut self, hash: u64, entry: Entry) {
        let len = self.slots.len();
        let mut index = reduce(hash, len);
        // The invariant guarantees a free slot: the loop ends within `len` steps.
        while self.slots[index].is_some() {
            index = if index + 1 == len { 0 } else { index + 1 };
        }
        self.slots[index] = Some(entry);
    }

    /// Appends every flow of the interval, then the non-empty "other" buckets, to `out`, and
    /// empties the table, giving back what it grew by (it starts again at [`INITIAL_SLOTS`]).
    /// `out` grows by at most `capacity + 4`; a caller that reserved that once never
    /// allocates here.
    pub fn flush_into(&mut self, out: &mut Vec<Summary>) {
        self.flush_each(|summary| out.push(summary));
    }

    /// [`Aggregator::flush_into`] one summary at a time, for callers that convert them (no
    /// second vector of all the summaries beside the table and the converted ones).
    pub fn flush_each(&mut self, mut emit: impl FnMut(Summary)) {
        if self.counters.tracked > 0 {
            for slot in &mut self.slots {
                if let Some(entry) = slot.take() {
                    emit(Summary::new(SummaryKey::Flow(entry.key().flow_key()), entry.tally()));
                }
            }
        }
        if self.shift < self.initial_shift {
            self.shift = self.initial_shift;
            self.slots = empty_table(self.max_slots >> self.shift);
        }
        self.counters.tracked = 0;
        for (verdict, bucket) in VERDICTS.into_iter().zip(&mut self.other) {
            if let Some(tally) = bucket.take() {
                emit(Summary::new(SummaryKey::Other(verdict), tally));
            }
        }
    }

    /// [`Aggregator::flush_into`] a new `Vec`.
    pub fn drain(&mut self) -> Vec<Summary> {
        let mut out = Vec::with_capacity(self.counters.tracked + self.other.len());
        self.flush_into(&mut out);
        out
    }
}

/// A table of `len` empty slots, allocated to exactly that size.
fn empty_table(len: usize) -> Vec<Option<Entry>> {
    vec![None; len]
}

/// Maps a hash onto `0..len` without a division (Lemire's multiply-shift).
fn reduce(hash: u64, len: usize) -> usize {
    // The product shifted by 64 is below `len`, so it fits in usize.
    ((u128::from(hash) * len as u128) >> 64) as usize
}

#[cfg(test)]
mod tests {
    use std::hash::{BuildHasherDefault, Hasher};

    use super::*;
    use crate::flows::packet::{PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

    fn v4(src: [u8; 4], port: u16, verdict: LogVerdict, rule: u32) -> FlowKey {
        FlowKey {
            src: IpAddr::from(src),
            dst: IpAddr::from([10, 0, 0, 1]),
            protocol: PROTO_TCP,
            port,
            verdict,
            rule,
        }
    }

    fn nth(n: u32) -> FlowKey {
        v4(n.to_be_bytes(), 443, LogVerdict::Dropped, 0)
    }

    fn flows(summaries: &[Summary]) -> Vec<(FlowKey, Summary)> {
        summaries
            .iter()
            .filter_map(|s| match s.key {
                SummaryKey::Flow(key) => Some((key, *s)),
                SummaryKey::Other(_) => None,
            })
            .collect()
    }

    fn other(summaries: &[Summary], verdict: LogVerdict) -> Option<Summary> {
        summaries.iter().copied().find(|s| s.key == SummaryKey::Other(verdict))
    }

    /// Every key hashes alike: all probes collide, the worst case of linear probing.
    #[derive(Default)]
    struct Colliding;
    impl Hasher for Colliding {
        fn finish(&self) -> u64 {
            u64::MAX
        }
        fn write(&mut self, _: &[u8]) {}
    }

    #[test]
    fn entry_fits_the_per_flow_budget() {
        assert_eq!(size_of::<Entry>(), 72);
        assert_eq!(size_of::<Option<Entry>>(), size_of::<Entry>());
        assert!(size_of::<Option<Entry>>() <= 128);
        // (A cap of 1 has 2 slots: 144 bytes for its one flow, 144 bytes in all.)
        for capacity in [2, 3, 100, 1000, 4096, 100_000] {
            let aggregator = Aggregator::new(capacity);
            assert!(aggregator.bytes_per_flow() <= 128, "{capacity}: {}", aggregator.bytes_per_flow());
        }
        assert_eq!(Aggregator::new(1000).bytes_per_flow(), 108);
    }

    #[test]
    fn repeated_keys_aggregate() {
        let mut aggregator = Aggregator::new(16);
        let key = v4([192, 168, 1, 2], 22, LogVerdict::Allowed, 7);
        for t in 0..5 {
            aggregator.record(&key, 1_700_000_000 + t);
        }
        let out = aggregator.drain();
        assert_eq!(
            out,
            [Summary {
                key: SummaryKey::Flow(key),
                count: 5,
                packets: 5,
                bytes: 0,
                first_seen: 1_700_000_000,
                last_seen: 1_700_000_004,
                scale: 1,
            }]
        );
        assert!(!out[0].sampled());
        assert_eq!(aggregator.counters(), Counters { events: 5, tracked: 0, folded: 0, high_water: 1 });
    }

    #[test]
    fn verdicts_rules_ports_and_protocols_kept_apart() {
        let mut aggregator = Aggregator::new(16);
        let base = v4([192, 168, 1, 2], 22, LogVerdict::Allowed, 7);
        let keys = [
            base,
            FlowKey { verdict: LogVerdict::Dropped, ..base },
            FlowKey { verdict: LogVerdict::WouldDrop, rule: 0, ..base },
            FlowKey { rule: 8, ..base },
            FlowKey { port: 23, ..base },
            FlowKey { protocol: PROTO_UDP, ..base },
            FlowKey { dst: IpAddr::from([10, 0, 0, 2]), ..base },
        ];
        for (i, key) in keys.iter().enumerate() {
            for _ in 0..=i {
                aggregator.record(key, 100);
            }
        }
        let out = flows(&aggregator.drain());
        assert_eq!(out.len(), keys.len());
        for (i, key) in keys.iter().enumerate() {
            let (_, summary) = out.iter().find(|(k, _)| k == key).expect("key kept");
            assert_eq!(summary.count as usize, i + 1, "{key:?}");
        }
    }

    #[test]
    fn ipv4_and_ipv6_round_trip_and_stay_apart() {
        let mut aggregator = Aggregator::new(16);
        let four = v4([1, 2, 3, 4], 53, LogVerdict::Allowed, 1);
        let mapped = FlowKey {
            src: IpAddr::V6(Ipv4Addr::new(1, 2, 3, 4).to_ipv6_mapped()),
            dst: IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped()),
            ..four
        };
        let six = FlowKey {
            src: "2001:db8::1".parse().expect("address"),
            dst: "fe80::1:2".parse().expect("address"),
            protocol: PROTO_ICMPV6,
            port: 128,
            verdict: LogVerdict::Observed,
            rule: 0,
        };
        aggregator.record(&four, 1);
        aggregator.record(&mapped, 2);
        aggregator.record(&mapped, 3);
        aggregator.record(&six, 4);
        let out = flows(&aggregator.drain());
        assert_eq!(out.len(), 3);
        let count = |key: FlowKey| out.iter().find(|(k, _)| *k == key).map(|(_, s)| s.count);
        assert_eq!(count(four), Some(1));
        assert_eq!(count(mapped), Some(2));
        assert_eq!(count(six), Some(1));
    }

    #[test]
    fn full_table_folds_into_other_per_verdict() {
        let mut aggregator = Aggregator::new(3);
        for n in 0..3 {
            aggregator.record(&nth(n), 10);
        }
        // Full: new keys fold, by verdict; tracked keys keep counting.
        for n in 3..10 {
            aggregator.record(&nth(n), 20 + u64::from(n));
        }
        let allowed = v4([9, 9, 9, 9], 80, LogVerdict::Allowed, 4);
        aggregator.record(&allowed, 50);
        aggregator.record(&allowed, 51);
        aggregator.record(&nth(1), 60);
        assert_eq!(aggregator.counters(), Counters { events: 13, tracked: 3, folded: 9, high_water: 3 });

        let out = aggregator.drain();
        let tracked = flows(&out);
        assert_eq!(tracked.len(), 3);
        assert_eq!(tracked.iter().map(|(_, s)| s.count).sum::<u32>(), 4);
        let dropped = other(&out, LogVerdict::Dropped).expect("dropped bucket");
        assert_eq!((dropped.count, dropped.first_seen, dropped.last_seen), (7, 23, 29));
        let allowed = other(&out, LogVerdict::Allowed).expect("allowed bucket");
        assert_eq!((allowed.count, allowed.first_seen, allowed.last_seen), (2, 50, 51));
        assert_eq!(other(&out, LogVerdict::Observed), None);
        assert_eq!(other(&out, LogVerdict::WouldDrop), None);
        assert_eq!(out.len(), 5);
    }

    #[test]
    fn zero_capacity_folds_everything() {
        let mut aggregator = Aggregator::new(0);
        aggregator.record(&nth(1), 5);
        aggregator.record(&nth(2), 6);
        let out = aggregator.drain();
        assert_eq!(out.len(), 1);
        assert_eq!(other(&out, LogVerdict::Dropped).map(|s| s.count), Some(2));
        assert_eq!(aggregator.counters().folded, 2);
        assert_eq!(aggregator.bytes_per_flow(), 0);
    }

    #[test]
    fn drain_resets_and_gives_the_grown_table_back() {
        let mut aggregator = Aggregator::new(4);
        let slots = aggregator.slots.capacity();
        for n in 0..6 {
            aggregator.record(&nth(n), 1);
        }
        let mut out = Vec::with_capacity(aggregator.capacity() + 4);
        aggregator.flush_into(&mut out);
        assert_eq!(out.len(), 5);
        out.clear();
        aggregator.flush_into(&mut out);
        assert!(out.is_empty(), "a second flush has nothing: {out:?}");
        assert_eq!(aggregator.slots.capacity(), slots, "a table that never grew is kept");
        assert!(aggregator.slots.iter().all(Option::is_none));

        // The next interval starts from nothing: the 4 slots are free again, no "other".
        for n in 10..14 {
            aggregator.record(&nth(n), 2);
        }
        aggregator.flush_into(&mut out);
        assert_eq!(flows(&out).len(), 4);
        assert_eq!(other(&out, LogVerdict::Dropped), None);
        assert_eq!(aggregator.counters(), Counters { events: 10, tracked: 0, folded: 2, high_water: 4 });

        // A grown table goes back to its initial size at the flush.
        let mut aggregator = Aggregator::new(10_000);
        for n in 0..5_000 {
            aggregator.record(&nth(n), 3);
        }
        assert!(aggregator.slots.len() >= 5_000 * 3 / 2, "{}", aggregator.slots.len());
        out.clear();
        aggregator.flush_into(&mut out);
        assert_eq!(out.len(), 5_000);
        assert_eq!(aggregator.slots.len(), 15_000 >> 7, "the cap halved while >= 64 slots");
        assert_eq!(aggregator.table_bytes(), 117 * size_of::<Option<Entry>>());
    }

    #[test]
    fn the_table_grows_by_doubling_up_to_the_cap_and_no_further() {
        const CAPACITY: usize = 1000;
        let mut aggregator = Aggregator::new(CAPACITY);
        assert_eq!(aggregator.slots.len(), 93, "nothing big is reserved at start: 1500 >> 4");
        assert_eq!(aggregator.max_table_bytes(), 1500 * 72);
        let mut sizes = vec![aggregator.slots.len()];
        for n in 0..CAPACITY as u32 {
            aggregator.record(&nth(n), 1);
            let len = aggregator.slots.len();
            if sizes.last() != Some(&len) {
                sizes.push(len);
            }
            let tracked = aggregator.counters().tracked;
            assert_eq!(tracked, n as usize + 1);
            assert!(len == aggregator.max_slots || tracked * 3 <= len * 2, "{tracked} flows in {len} slots");
            assert_eq!(aggregator.table_bytes(), len * size_of::<Option<Entry>>(), "no slack allocated");
        }
        assert_eq!(sizes, [93, 187, 375, 750, 1500], "each step doubles, the last lands on the cap");

        // At the cap: new keys fold, tracked keys keep counting, the table stays.
        for n in CAPACITY as u32..2 * CAPACITY as u32 {
            aggregator.record(&nth(n), 2);
            aggregator.record(&nth(n - CAPACITY as u32), 2);
        }
        assert_eq!(aggregator.slots.len(), 1500);
        assert_eq!(aggregator.table_bytes(), aggregator.max_table_bytes());
        let counters = aggregator.counters();
        assert_eq!((counters.tracked, counters.folded, counters.high_water), (CAPACITY, 1000, CAPACITY));
        let out = aggregator.drain();
        let tracked = flows(&out);
        assert_eq!(tracked.len(), CAPACITY);
        assert!(tracked.iter().all(|(_, s)| s.count == 2 && (s.first_seen, s.last_seen) == (1, 2)));
        let folded = other(&out, LogVerdict::Dropped).expect("overflow bucket");
        assert_eq!((folded.count, folded.first_seen, folded.last_seen), (1000, 2, 2));
    }

    #[test]
    fn counts_stay_exact_across_growth_even_when_every_hash_collides() {
        // Every key probes from the last slot, so each growth moves one long wrapped cluster.
        let mut aggregator = Aggregator::with_hasher(300, BuildHasherDefault::<Colliding>::default());
        let mut expected = std::collections::HashMap::new();
        for round in 0..4u64 {
            // Keys 0..100*(round+1): the old ones again while the new ones make the table grow.
            for n in 0..100 * (round as u32 + 1) {
                aggregator.record(&nth(n), 10 + round);
                *expected.entry(n).or_insert(0u32) += 1;
            }
        }
        // 400 keys for a cap of 300: keys 300..400 fold.
        let out = aggregator.drain();
        let tracked = flows(&out);
        assert_eq!(tracked.len(), 300);
        for (key, summary) in &tracked {
            let IpAddr::V4(src) = key.src else { panic!("{key:?}") };
            let n = u32::from(src);
            assert_eq!(summary.count, expected[&n], "key {n}");
            assert_eq!(summary.first_seen, 10 + n / 100, "key {n} first came in round n / 100");
            assert_eq!(summary.last_seen, 13);
        }
        assert_eq!(other(&out, LogVerdict::Dropped).map(|s| s.count), Some(100));
        let events: u32 = expected.values().sum();
        assert_eq!(aggregator.counters().events, u64::from(events));
        assert_eq!(aggregator.counters().folded, 100);
    }

    #[test]
    fn the_first_table_is_the_cap_halved_while_it_keeps_64_slots() {
        for (capacity, slots) in [(0, 0), (1, 2), (3, 4), (16, 24), (42, 63), (43, 64), (44, 66), (100, 75)] {
            let aggregator = Aggregator::new(capacity);
            assert_eq!(aggregator.slots.len(), slots, "capacity {capacity}");
        }
    }

    #[test]
    fn first_and_last_seen_are_min_and_max() {
        let mut aggregator = Aggregator::new(4);
        let key = nth(1);
        for t in [50, 40, 70, 60] {
            aggregator.record(&key, t);
        }
        // Past 2106 saturates rather than wrapping.
        aggregator.record(&nth(2), u64::MAX);
        let out = flows(&aggregator.drain());
        let summary = |key: FlowKey| out.iter().find(|(k, _)| *k == key).map(|(_, s)| *s);
        let one = summary(nth(1)).expect("tracked");
        assert_eq!((one.first_seen, one.last_seen, one.count), (40, 70, 4));
        let two = summary(nth(2)).expect("tracked");
        assert_eq!((two.first_seen, two.last_seen), (u32::MAX, u32::MAX));
    }

    #[test]
    fn sampled_events_scale_and_counts_saturate() {
        let mut aggregator = Aggregator::with_hasher(1, BuildHasherDefault::<Colliding>::default());
        let key = nth(1);
        aggregator.record(&key, 1);
        aggregator.record_sampled(&key, 2, 100);
        aggregator.record_sampled(&key, 3, 0);
        let out = aggregator.drain();
        assert_eq!((out[0].count, out[0].scale), (102, 100));
        assert!(out[0].sampled());

        for _ in 0..70_000 {
            aggregator.record_sampled(&key, 1, u16::MAX);
            aggregator.record_sampled(&nth(2), 1, u16::MAX);
        }
        let out = aggregator.drain();
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|s| s.count == u32::MAX && s.scale == u16::MAX), "{out:?}");
        assert_eq!(aggregator.counters().events, 3 + 140_000);
        assert_eq!(aggregator.counters().folded, 70_000);
    }

    #[test]
    fn colliding_hashes_still_find_every_key() {
        // Every key starts at the last slot, so probes wrap around to slot 0.
        let mut aggregator = Aggregator::with_hasher(20, BuildHasherDefault::<Colliding>::default());
        for round in 1..=3 {
            for n in 0..25 {
                aggregator.record(&nth(n), round);
            }
        }
        let out = aggregator.drain();
        let tracked = flows(&out);
        assert_eq!(tracked.len(), 20);
        assert!(tracked.iter().all(|(_, s)| s.count == 3 && s.first_seen == 1 && s.last_seen == 3));
        assert_eq!(other(&out, LogVerdict::Dropped).map(|s| s.count), Some(15));
    }

    #[test]
    fn hostile_unique_sources_never_grow_memory_past_the_cap_and_add_up() {
        const CAPACITY: usize = 1000;
        const SOURCES: u32 = 100_000;
        let mut aggregator = Aggregator::new(CAPACITY);
        let max_slots = aggregator.max_slots;
        let mut out = Vec::with_capacity(CAPACITY + 4);
        let out_capacity = out.capacity();
        for interval in 0..3u64 {
            for n in 0..SOURCES {
                let key = FlowKey {
                    src: IpAddr::V6(Ipv6Addr::from(u128::from(n) << 64 | 1)),
                    dst: "2001:db8::1".parse().expect("address"),
                    protocol: PROTO_UDP,
                    port: 53,
                    verdict: LogVerdict::Allowed,
                    rule: 3,
                };
                aggregator.record(&key, interval);
                // A repeat of a key tracked early in the interval.
                if n % 10 == 0 {
                    aggregator.record(&nth(0), interval);
                }
                assert!(aggregator.counters().tracked <= CAPACITY);
                assert!(aggregator.table_bytes() <= aggregator.max_table_bytes());
            }
            assert_eq!(aggregator.slots.capacity(), max_slots, "grown to the cap, not past it");
            assert_eq!(aggregator.slots.len(), max_slots);

            out.clear();
            aggregator.flush_into(&mut out);
            assert_eq!(out.capacity(), out_capacity, "the caller's buffer was enough");
            let events = u64::from(SOURCES + SOURCES / 10);
            let total: u64 = out.iter().map(|s| u64::from(s.count)).sum();
            assert_eq!(total, events);
            assert_eq!(flows(&out).len(), CAPACITY);
            let folded = other(&out, LogVerdict::Allowed).expect("overflow counted").count;
            // nth(0) arrives second, so it is tracked; of the sources, CAPACITY - 1 are.
            assert_eq!(u64::from(folded), u64::from(SOURCES) - (CAPACITY as u64 - 1));
            assert_eq!(
                aggregator.counters(),
                Counters {
                    events: events * (interval + 1),
                    tracked: 0,
                    folded: u64::from(folded) * (interval + 1),
                    high_water: CAPACITY,
                }
            );
        }
    }

    #[test]
    fn configured_capacity_is_clamped() {
        let aggregator = Aggregator::with_hasher(usize::MAX, BuildHasherDefault::<Colliding>::default());
        assert_eq!(aggregator.capacity(), MAX_CAPACITY);
        assert!(aggregator.bytes_per_flow() <= 128);
        assert_eq!(aggregator.slots.len(), 1_500_000 >> 14);
        assert_eq!(aggregator.table_bytes(), 91 * size_of::<Option<Entry>>());
    }
}
