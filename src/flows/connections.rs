//! Which logged packets are new connections: a bounded table of the 5-tuples seen recently.
//!
//! The enforced default deny logs every packet it drops, and the log rules of accepted and
//! test-mode traffic see a connection's first packets again when the client retransmits them
//! (conntrack keeps them NEW until a reply). A dropped connection is counted as conntrack would
//! have counted it had it been accepted: the packet's 5-tuple (addresses, protocol, source and
//! destination port; ICMP: type, code and echo id), with the verdict and rule it was logged
//! with, seen again within the protocol's unreplied timeout is the same connection. The first
//! packet counts a connection; later ones only packets. Every packet refreshes the timeout, as
//! conntrack's does.
//!
//! Guarantees:
//! - **Memory follows the tuples tracked, never past the cap.** As [`super::aggregate`]: open
//!   addressing with linear probing, SipHash keyed per instance (a sender choosing addresses
//!   cannot aim collisions), `capacity * 3 / 2` slots at the cap, halved while the table keeps
//!   [`INITIAL_SLOTS`]; it doubles when a new tuple would load it past 2/3. A slot is 48 bytes:
//!   72 bytes per tuple at the cap ([`Connections::bytes_per_tuple`]).
//! - **Expired tuples are swept, never polled for**: [`Connections::sweep`] runs on the
//!   pipeline's flush timer, once more when every tuple left will have expired (so an idle
//!   agent gives the memory back), and when a new tuple finds the table full, at most once a
//!   second. A sweep rebuilds the table at the size the live tuples need, so
//!   memory shrinks back after a flood.
//! - **Overflow never undercounts.** With the table full of live tuples, a new tuple counts as
//!   a new connection (each of its packets does) and is counted in
//!   [`ConnectionCounters::overflow`]; tracked tuples keep their state. No tuple is evicted
//!   early, so a full table can only overcount, and says by how many packets at most.
//! - Times are the caller's monotonic seconds; nothing here panics on any input.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::time::Duration;

use super::packet::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, Transport};
use super::{FlowKey, Packet};
use crate::firewall::LogVerdict;

/// Largest number of tracked tuples (about 72 MB of table); larger capacities are clamped.
pub const MAX_CAPACITY: usize = 1_000_000;
/// Fewest slots of a table (unless the cap is smaller), as [`super::aggregate::INITIAL_SLOTS`].
pub const INITIAL_SLOTS: usize = 64;
/// Least time between two sweeps that a full table asks for (a flood at the cap must not
/// sweep once per packet).
pub const FULL_SWEEP_SPACING_S: u32 = 1;

/// How long a tuple stays one connection after its last packet, per protocol (the kernel's
/// unreplied timeouts by default: `nf_conntrack_tcp_timeout_syn_sent`,
/// `nf_conntrack_udp_timeout`, `nf_conntrack_icmp_timeout`). Protocols other than TCP, UDP and
/// ICMP use the UDP timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp: Duration,
    pub udp: Duration,
    pub icmp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { tcp: Duration::from_secs(120), udp: Duration::from_secs(30), icmp: Duration::from_secs(30) }
    }
}

impl Timeouts {
    /// The longest of the three: after it, every tuple not seen again has expired.
    pub fn longest(&self) -> Duration {
        self.tcp.max(self.udp).max(self.icmp)
    }

    fn seconds(&self, protocol: u8) -> u32 {
        let timeout = match protocol {
            PROTO_TCP => self.tcp,
            PROTO_ICMP | PROTO_ICMPV6 => self.icmp,
            _ => self.udp,
        };
        u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX).max(1)
    }
}

/// What one packet is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// The first packet of its tuple within the timeout: a connection.
    New,
    /// A later packet of a tracked connection.
    Again,
    /// A tuple the full table could not track: counted as a new connection.
    Overflow,
}

impl Seen {
    /// Whether the packet counts a connection.
    pub fn is_connection(self) -> bool {
        self != Seen::Again
    }
}

/// The table's counters (for `ven status`), since construction except `tracked`. They add up:
/// `new + again + overflow` packets were looked at, and `new + overflow` connections counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionCounters {
    /// Packets that started a tracked connection.
    pub new: u64,
    /// Packets of a connection tracked already (counted as packets only).
    pub again: u64,
    /// Packets of tuples the full table could not track, each counted as a connection.
    pub overflow: u64,
    /// Tuples tracked now (some may have expired since the last sweep), and the most ever.
    pub tracked: usize,
    pub high_water: usize,
    /// Tuples removed by sweeps because their timeout passed, and the sweeps.
    pub expired: u64,
    pub sweeps: u64,
}

/// One tracked tuple: 48 bytes (the verdict's niche makes the `Option` of a slot free).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tuple {
    src: [u8; 16],
    dst: [u8; 16],
    rule: u32,
    /// Source port, or the ICMP echo id.
    src_port: u16,
    /// Destination port, or the ICMP type and code.
    dst_port: u16,
    protocol: u8,
    verdict: LogVerdict,
    /// 4 or 6: an IPv4 address is stored mapped, this keeps it apart from `::ffff:a.b.c.d`.
    family: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    tuple: Tuple,
    /// Monotonic second after which the tuple is a new connection again.
    expires: u32,
}

fn octets(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Hashed as one packed buffer: one SipHash write instead of one per field (`observe` in a full
/// 100k table: 270 -> 130 ns, flows bench).
impl std::hash::Hash for Tuple {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut bytes = [0u8; 44];
        bytes[..16].copy_from_slice(&self.src);
        bytes[16..32].copy_from_slice(&self.dst);
        bytes[32..36].copy_from_slice(&self.rule.to_ne_bytes());
        bytes[36..38].copy_from_slice(&self.src_port.to_ne_bytes());
        bytes[38..40].copy_from_slice(&self.dst_port.to_ne_bytes());
        bytes[40] = self.protocol;
        bytes[41] = self.verdict as u8;
        bytes[42] = self.family;
        state.write(&bytes);
    }
}

impl Tuple {
    fn new(key: &FlowKey, packet: &Packet) -> Self {
        let (src_port, dst_port) = match packet.transport {
            Transport::Ports { src, dst } => (src, dst),
            Transport::Icmp { kind, code, id } => (id, u16::from_be_bytes([kind, code])),
            Transport::Fragment | Transport::Other => (0, 0),
        };
        Self {
            src: octets(key.src),
            dst: octets(key.dst),
            rule: key.rule,
            src_port,
            dst_port,
            protocol: key.protocol,
            verdict: key.verdict,
            family: if key.src.is_ipv4() { 4 } else { 6 },
        }
    }
}

/// The bounded table of recent tuples. See the module doc.
#[derive(Debug)]
pub struct Connections<S = RandomState> {
    // INVARIANT: `slots.len() == max_slots >> shift`, and more slots than `tracked` (below
    // `max_slots` the load stays at most 2/3; `max_slots > capacity >= tracked`), so a probe
    // always reaches an empty slot or the tuple.
    slots: Vec<Option<Slot>>,
    capacity: usize,
    max_slots: usize,
    shift: u32,
    initial_shift: u32,
    timeouts: Timeouts,
    hasher: S,
    counters: ConnectionCounters,
    /// When a full table last swept (monotonic seconds).
    last_full_sweep: Option<u32>,
}

impl Connections<RandomState> {
    /// A table for `capacity` tuples (clamped to [`MAX_CAPACITY`]); 0 tracks nothing and
    /// counts every packet as a connection (overflow).
    pub fn new(capacity: usize, timeouts: Timeouts) -> Self {
        Self::with_hasher(capacity, timeouts, RandomState::new())
    }
}

impl<S: BuildHasher> Connections<S> {
    pub fn with_hasher(capacity: usize, timeouts: Timeouts, hasher: S) -> Self {
        let capacity = capacity.min(MAX_CAPACITY);
        let max_slots = if capacity == 0 { 0 } else { (capacity + capacity / 2).max(capacity + 1) };
        let mut initial_shift = 0;
        while max_slots >> (initial_shift + 1) >= INITIAL_SLOTS {
            initial_shift += 1;
        }
        Self {
            slots: vec![None; max_slots >> initial_shift],
            capacity,
            max_slots,
            shift: initial_shift,
            initial_shift,
            timeouts,
            hasher,
            counters: ConnectionCounters::default(),
            last_full_sweep: None,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn counters(&self) -> ConnectionCounters {
        self.counters
    }

    /// Bytes of table per tracked tuple with the table at its cap.
    pub fn bytes_per_tuple(&self) -> usize {
        (self.max_slots * size_of::<Option<Slot>>()).checked_div(self.capacity).unwrap_or(0)
    }

    /// Bytes the table holds now, and at its cap.
    pub fn table_bytes(&self) -> usize {
        self.slots.capacity() * size_of::<Option<Slot>>()
    }

    pub fn max_table_bytes(&self) -> usize {
        self.max_slots * size_of::<Option<Slot>>()
    }

    /// Looks at one logged packet of `key` at monotonic second `now`: whether it counts a
    /// connection. Refreshes the tuple's timeout.
    pub fn observe(&mut self, key: &FlowKey, packet: &Packet, now: u32) -> Seen {
        let tuple = Tuple::new(key, packet);
        let expires = now.saturating_add(self.timeouts.seconds(tuple.protocol));
        let seen = self.observe_tuple(tuple, now, expires);
        let counter = match seen {
            Seen::New => &mut self.counters.new,
            Seen::Again => &mut self.counters.again,
            Seen::Overflow => &mut self.counters.overflow,
        };
        *counter = counter.saturating_add(1);
        seen
    }

    fn observe_tuple(&mut self, tuple: Tuple, now: u32, expires: u32) -> Seen {
        let hash = self.hasher.hash_one(tuple);
        if let Some(seen) = self.probe(hash, tuple, now, expires) {
            return seen;
        }
        // Full of tuples: some may have expired since the last sweep.
        let due = self.last_full_sweep.is_none_or(|at| now.saturating_sub(at) >= FULL_SWEEP_SPACING_S);
        if self.capacity > 0 && due {
            self.last_full_sweep = Some(now);
            self.sweep(now);
            if let Some(seen) = self.probe(hash, tuple, now, expires) {
                return seen;
            }
        }
        Seen::Overflow
    }

    /// Finds or inserts the tuple; `None` when it is not tracked and the table is full.
    fn probe(&mut self, hash: u64, tuple: Tuple, now: u32, expires: u32) -> Option<Seen> {
        let len = self.slots.len();
        if len == 0 {
            return None;
        }
        let mut index = reduce(hash, len);
        for _ in 0..len {
            match &mut self.slots[index] {
                Some(slot) if slot.tuple == tuple => {
                    let seen = if now > slot.expires { Seen::New } else { Seen::Again };
                    slot.expires = expires;
                    return Some(seen);
                }
                Some(_) => index = if index + 1 == len { 0 } else { index + 1 },
                None => {
                    if self.counters.tracked >= self.capacity {
                        return None;
                    }
                    let slot = Slot { tuple, expires };
                    if self.needs_growth() {
                        self.resize(self.shift - 1);
                        self.insert_new(hash, slot);
                    } else {
                        self.slots[index] = Some(slot);
                    }
                    self.counters.tracked += 1;
                    self.counters.high_water = self.counters.high_water.max(self.counters.tracked);
                    return Some(Seen::New);
                }
            }
        }
        None
    }

    fn needs_growth(&self) -> bool {
        let len = self.slots.len();
        len < self.max_slots && (self.counters.tracked + 1) * 3 > len * 2
    }

    /// Rebuilds the table with `max_slots >> shift` slots, moving every tuple.
    fn resize(&mut self, shift: u32) {
        self.shift = shift;
        let old = std::mem::replace(&mut self.slots, vec![None; self.max_slots >> shift]);
        for slot in old.into_iter().flatten() {
            let hash = self.hasher.hash_one(slot.tuple);
            self.insert_new(hash, slot);
        }
    }

    fn insert_new(&mut self, hash: u64, slot: Slot) {
        let len = self.slots.len();
        let mut index = reduce(hash, len);
        // The invariant guarantees a free slot: the loop ends within `len` steps.
        while self.slots[index].is_some() {
            index = if index + 1 == len { 0 } else { index + 1 };
        }
        self.slots[index] = Some(slot);
    }

    /// Forgets the tuples whose timeout passed by monotonic second `now` and gives back the
    /// memory the others do not need (the table shrinks to the smallest size that holds them
    /// at most 2/3 full). One pass over the table; nothing to do when nothing expired.
    pub fn sweep(&mut self, now: u32) {
        self.counters.sweeps = self.counters.sweeps.saturating_add(1);
        let mut expired = 0u64;
        for slot in &mut self.slots {
            if slot.is_some_and(|s| now > s.expires) {
                *slot = None;
                expired += 1;
            }
        }
        if expired == 0 {
            return;
        }
        self.counters.expired = self.counters.expired.saturating_add(expired);
        self.counters.tracked = self.counters.tracked.saturating_sub(expired as usize);
        // Emptied slots break linear probing's chains: rebuild, at the size the rest needs.
        let mut shift = self.initial_shift;
        while shift > 0 && self.counters.tracked * 3 > (self.max_slots >> shift) * 2 {
            shift -= 1;
        }
        self.resize(shift);
    }
}

/// Maps a hash onto `0..len` without a division (Lemire's multiply-shift).
fn reduce(hash: u64, len: usize) -> usize {
    ((u128::from(hash) * len as u128) >> 64) as usize
}

#[cfg(test)]
mod tests {
    use std::hash::{BuildHasherDefault, Hasher};
    use std::net::Ipv6Addr;

    use super::*;
    use crate::flows::packet::PROTO_UDP;

    fn event(
        src: &str,
        dst: &str,
        protocol: u8,
        transport: Transport,
        verdict: LogVerdict,
    ) -> (FlowKey, Packet) {
        let packet =
            Packet { src: src.parse().unwrap(), dst: dst.parse().unwrap(), protocol, transport, length: 60 };
        let port = match transport {
            Transport::Ports { dst, .. } => dst,
            Transport::Icmp { kind, .. } => u16::from(kind),
            _ => 0,
        };
        let key = FlowKey { src: packet.src, dst: packet.dst, protocol, port, verdict, rule: 0 };
        (key, packet)
    }

    fn syn(src_port: u16) -> (FlowKey, Packet) {
        event(
            "198.18.0.1",
            "198.18.0.2",
            PROTO_TCP,
            Transport::Ports { src: src_port, dst: 5432 },
            LogVerdict::Dropped,
        )
    }

    #[derive(Default)]
    struct Colliding;
    impl Hasher for Colliding {
        fn finish(&self) -> u64 {
            u64::MAX
        }
        fn write(&mut self, _: &[u8]) {}
    }

    #[test]
    fn a_slot_fits_its_budget() {
        assert_eq!(size_of::<Option<Slot>>(), 48);
        assert_eq!(Connections::new(100_000, Timeouts::default()).bytes_per_tuple(), 72);
    }

    #[test]
    fn retransmissions_are_one_connection_until_the_timeout_passes() {
        let mut table = Connections::new(16, Timeouts::default());
        let (key, packet) = syn(40000);
        // SYNs at 0, 1, 3, 7, 15 s: one connect retried by the kernel.
        let seen: Vec<Seen> = [0, 1, 3, 7, 15].iter().map(|&t| table.observe(&key, &packet, t)).collect();
        assert_eq!(seen, [Seen::New, Seen::Again, Seen::Again, Seen::Again, Seen::Again]);
        // Each packet refreshed the 120 s: 15 + 120 is still the same connection, later is not.
        assert_eq!(table.observe(&key, &packet, 135), Seen::Again);
        assert_eq!(table.observe(&key, &packet, 256), Seen::New);
        // Another source port is another connection.
        let (other, other_packet) = syn(40001);
        assert_eq!(table.observe(&other, &other_packet, 256), Seen::New);
        let counters = table.counters();
        assert_eq!((counters.new, counters.again, counters.overflow, counters.tracked), (3, 5, 0, 2));
    }

    #[test]
    fn icmp_tuples_are_type_code_and_echo_id_and_verdicts_stay_apart() {
        let mut table = Connections::new(16, Timeouts::default());
        let ping = |id| {
            event(
                "2001:2::1",
                "2001:2::2",
                PROTO_ICMPV6,
                Transport::Icmp { kind: 128, code: 0, id },
                LogVerdict::Dropped,
            )
        };
        let (key, packet) = ping(7);
        assert_eq!(table.observe(&key, &packet, 0), Seen::New);
        assert_eq!(table.observe(&key, &packet, 1), Seen::Again);
        let (key8, packet8) = ping(8);
        assert_eq!(table.observe(&key8, &packet8, 2), Seen::New);
        assert_eq!(table.observe(&key, &packet, 31), Seen::Again, "refreshed at 1 for 30 s");
        assert_eq!(table.observe(&key, &packet, 63), Seen::New);
        let would = FlowKey { verdict: LogVerdict::WouldDrop, ..key };
        assert_eq!(table.observe(&would, &packet, 63), Seen::New);
    }

    #[test]
    fn timeouts_are_per_protocol_and_configurable() {
        let timeouts = Timeouts {
            tcp: Duration::from_secs(5),
            udp: Duration::from_secs(2),
            icmp: Duration::from_secs(3),
        };
        let mut table = Connections::new(16, timeouts);
        let (udp, udp_packet) = event(
            "198.18.0.1",
            "198.18.0.2",
            PROTO_UDP,
            Transport::Ports { src: 1, dst: 53 },
            LogVerdict::Dropped,
        );
        assert_eq!(table.observe(&udp, &udp_packet, 10), Seen::New);
        assert_eq!(table.observe(&udp, &udp_packet, 12), Seen::Again);
        assert_eq!(table.observe(&udp, &udp_packet, 15), Seen::New);
        let (tcp, tcp_packet) = syn(1);
        assert_eq!(table.observe(&tcp, &tcp_packet, 10), Seen::New);
        assert_eq!(table.observe(&tcp, &tcp_packet, 15), Seen::Again);
        assert_eq!(table.observe(&tcp, &tcp_packet, 21), Seen::New);
    }

    #[test]
    fn sweeps_forget_expired_tuples_and_shrink_the_table() {
        let mut table = Connections::new(10_000, Timeouts::default());
        let first = table.table_bytes();
        for port in 0..5_000 {
            let (key, packet) = syn(port);
            assert_eq!(table.observe(&key, &packet, 0), Seen::New);
        }
        assert!(table.table_bytes() > first);
        table.sweep(100);
        assert_eq!(table.counters().tracked, 5_000, "nothing expired yet");
        // Half of them refreshed at 100 s.
        for port in 0..2_500 {
            let (key, packet) = syn(port);
            assert_eq!(table.observe(&key, &packet, 100), Seen::Again);
        }
        table.sweep(121);
        let counters = table.counters();
        assert_eq!((counters.tracked, counters.expired), (2_500, 2_500));
        for port in 0..5_000 {
            let (key, packet) = syn(port);
            let expected = if port < 2_500 { Seen::Again } else { Seen::New };
            assert_eq!(table.observe(&key, &packet, 122), expected, "port {port}");
        }
        table.sweep(1_000);
        assert_eq!(table.counters().tracked, 0);
        assert_eq!(table.table_bytes(), first, "back to the first size");
    }

    #[test]
    fn a_full_table_counts_new_tuples_as_connections_and_sweeps_at_most_once_a_second() {
        let mut table =
            Connections::with_hasher(100, Timeouts::default(), BuildHasherDefault::<Colliding>::default());
        for port in 0..100 {
            let (key, packet) = syn(port);
            assert_eq!(table.observe(&key, &packet, 0), Seen::New);
        }
        // Full of live tuples: new ones overflow, every packet of them a connection.
        for _ in 0..3 {
            let (key, packet) = syn(1000);
            assert_eq!(table.observe(&key, &packet, 1), Seen::Overflow);
        }
        let (key, packet) = syn(5);
        assert_eq!(table.observe(&key, &packet, 1), Seen::Again, "tracked tuples keep their state");
        assert_eq!(table.counters().sweeps, 1, "one sweep in second 1");
        // Past the timeout the full table sweeps and tracks the new tuple.
        let (key, packet) = syn(1000);
        assert_eq!(table.observe(&key, &packet, 200), Seen::New);
        let counters = table.counters();
        assert_eq!((counters.overflow, counters.tracked, counters.expired), (3, 1, 100));
        assert_eq!(counters.new + counters.overflow, 104);
    }

    #[test]
    fn hostile_unique_sources_never_grow_memory_past_the_cap_and_add_up() {
        const CAPACITY: usize = 1000;
        let mut table = Connections::new(CAPACITY, Timeouts::default());
        let mut connections = 0u64;
        for n in 0..100_000u32 {
            let src = IpAddr::V6(Ipv6Addr::from(u128::from(n) << 64 | 1));
            let packet = Packet {
                src,
                dst: "2001:2::1".parse().unwrap(),
                protocol: PROTO_UDP,
                transport: Transport::Ports { src: 53, dst: 53 },
                length: 80,
            };
            let key = FlowKey {
                src,
                dst: packet.dst,
                protocol: PROTO_UDP,
                port: 53,
                verdict: LogVerdict::Dropped,
                rule: 0,
            };
            connections += u64::from(table.observe(&key, &packet, n / 1000).is_connection());
            assert!(table.table_bytes() <= table.max_table_bytes());
            assert!(table.counters().tracked <= CAPACITY);
        }
        let counters = table.counters();
        assert_eq!(connections, 100_000, "every unique source is a connection");
        assert_eq!(counters.new + counters.overflow, connections);
        assert_eq!(counters.again, 0);
        assert!(counters.overflow > 0 && counters.new > CAPACITY as u64, "{counters:?}");
        assert_eq!(table.slots.len(), table.max_slots);
    }

    #[test]
    fn zero_capacity_counts_every_packet_as_a_connection() {
        let mut table = Connections::new(0, Timeouts::default());
        let (key, packet) = syn(1);
        assert_eq!(table.observe(&key, &packet, 0), Seen::Overflow);
        assert_eq!(table.observe(&key, &packet, 0), Seen::Overflow);
        assert_eq!(table.bytes_per_tuple(), 0);
    }
}
