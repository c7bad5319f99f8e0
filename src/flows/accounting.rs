//! Bytes (and packets) of accepted connections, from conntrack accounting (`nf_conntrack_acct`).
//!
//! Accepted, observed and would-drop traffic is logged while NEW only, so the log rules see a
//! connection's first packet and never its bytes. Conntrack counts both directions of every
//! connection; with accounting on, the kernel sends each entry's counters when the entry is
//! destroyed (multicast group NFNLGRP_CONNTRACK_DESTROY). [`Accounting`] remembers, for each
//! TCP or UDP connection the log rules counted (its 5-tuple as conntrack's original direction
//! has it), the flow it was counted under; the destroy event then adds the connection's bytes,
//! and its packets beyond those logged, to that flow in the current interval. So a flow's bytes
//! appear in the interval its connections end in (a long connection's in a later record with a
//! count of 0), and summed over time they are the connections' bytes.
//!
//! Bounds: at most `capacity` connections are remembered (a named setting,
//! `flow_accounted_connections`; 92 bytes an entry plus hashbrown's control byte and slack); past it a new connection's bytes are not counted, and that is
//! counted (`overflow`). An entry whose destroy event never came (the socket's buffer overflowed:
//! counted as `lost`) is forgotten after [`MAX_AGE`]. ICMP and other protocols are not
//! accounted: their records keep `bytes` unknown. Sampled packets are not remembered (a sampled
//! flow's bytes would be those of the sampled connections only).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use super::packet::{FlowKey, Packet, Transport};
use crate::conntrack::{Connection, Totals};
use crate::netlink::{NetfilterSocket, SocketError};

/// How long a connection is remembered without its destroy event: longer than the agent's
/// conntrack timeout for established TCP (8 h) and the kernel's default (5 days) alike, so only
/// entries whose event was lost are forgotten this way.
pub const MAX_AGE: Duration = Duration::from_secs(6 * 24 * 3600);
/// Receive buffer asked for the destroy events: a burst of 4 MiB / ~200 bytes = 20,000 ended
/// connections between two reads.
pub const RECEIVE_BUFFER_BYTES: usize = 4 << 20;
/// Datagrams read per wake-up before the NFLOG socket gets its turn.
pub const MAX_DATAGRAMS_PER_READ: usize = 256;
/// One destroy event is a few hundred bytes; the kernel sends one per datagram.
const DATAGRAM_BYTES: usize = 8 * 1024;

/// A connection as conntrack's original direction names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Tuple {
    src: IpAddr,
    dst: IpAddr,
    src_port: u16,
    dst_port: u16,
    protocol: u8,
}

/// What is remembered of one counted connection.
#[derive(Debug, Clone, Copy)]
struct Counted {
    key: FlowKey,
    /// Packets of it that the log rules saw (the NEW ones), so not added twice.
    logged: u32,
    /// Monotonic seconds when it was first seen.
    since: u32,
}

/// The accounting counters `ven status` shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountingCounters {
    /// Connections remembered now.
    pub tracked: usize,
    /// Ended connections whose bytes were added to their flow.
    pub accounted: u64,
    /// Connections not remembered because the table was full.
    pub overflow: u64,
    /// Destroy events the kernel could not deliver (socket buffer full), and entries forgotten
    /// after [`MAX_AGE`] because of them.
    pub lost: u64,
    pub expired: u64,
    /// Destroy events without counters: accounting is off in the kernel.
    pub without_counters: u64,
}

/// The connections waiting for their destroy event.
#[derive(Debug)]
pub struct Accounting {
    counted: HashMap<Tuple, Counted>,
    capacity: usize,
    counters: AccountingCounters,
}

impl Accounting {
    pub fn new(capacity: usize) -> Self {
        Self { counted: HashMap::new(), capacity, counters: AccountingCounters::default() }
    }

    pub fn counters(&self) -> AccountingCounters {
        AccountingCounters { tracked: self.counted.len(), ..self.counters }
    }

    /// A packet the log rules counted under `key` (not a drop, not sampled): remembers its
    /// connection when it is a new one, else counts it as logged for the one remembered.
    pub fn logged(&mut self, key: &FlowKey, packet: &Packet, new_connection: bool, now_mono: u32) {
        let Some(tuple) = tuple_of(packet) else { return };
        if let Some(counted) = self.counted.get_mut(&tuple) {
            counted.logged = counted.logged.saturating_add(1);
            if new_connection {
                // The tuple was reused by a new connection (the old one's event was lost).
                *counted = Counted { key: *key, logged: 1, since: now_mono };
            }
            return;
        }
        if !new_connection {
            return;
        }
        if self.counted.len() >= self.capacity {
            self.counters.overflow = self.counters.overflow.saturating_add(1);
            return;
        }
        self.counted.insert(tuple, Counted { key: *key, logged: 1, since: now_mono });
    }

    /// A destroyed conntrack entry: the flow it was counted under, the packets not logged and
    /// the bytes to add; `None` when it is not one we counted (or accounting is off).
    pub fn ended(&mut self, connection: &Connection, totals: Option<Totals>) -> Option<(FlowKey, u64, u64)> {
        let (Some(src_port), Some(dst_port)) = (connection.src_port, connection.dst_port) else {
            return None;
        };
        let tuple = Tuple {
            src: connection.original_src,
            dst: connection.original_dst,
            src_port,
            dst_port,
            protocol: connection.protocol,
        };
        let Some(totals) = totals else {
            self.counters.without_counters = self.counters.without_counters.saturating_add(1);
            return None;
        };
        let counted = self.counted.remove(&tuple)?;
        self.counters.accounted = self.counters.accounted.saturating_add(1);
        let unlogged = totals.packets.saturating_sub(u64::from(counted.logged));
        Some((counted.key, unlogged, totals.bytes))
    }

    /// Counts destroy events the kernel dropped.
    pub fn lost(&mut self, events: u64) {
        self.counters.lost = self.counters.lost.saturating_add(events);
    }

    /// Forgets connections remembered for longer than [`MAX_AGE`], and gives back the memory
    /// of a table that shrank.
    pub fn sweep(&mut self, now_mono: u32) {
        let max_age = u32::try_from(MAX_AGE.as_secs()).unwrap_or(u32::MAX);
        let before = self.counted.len();
        self.counted.retain(|_, counted| now_mono.saturating_sub(counted.since) < max_age);
        self.counters.expired = self.counters.expired.saturating_add((before - self.counted.len()) as u64);
        if self.counted.capacity() > 4 * self.counted.len().max(16) {
            self.counted.shrink_to(self.counted.len() * 2);
        }
    }
}

/// The 5-tuple of a TCP or UDP packet; `None` for other protocols and fragments.
fn tuple_of(packet: &Packet) -> Option<Tuple> {
    const TCP: u8 = 6;
    const UDP: u8 = 17;
    match packet.transport {
        Transport::Ports { src, dst } if packet.protocol == TCP || packet.protocol == UDP => Some(Tuple {
            src: packet.src,
            dst: packet.dst,
            src_port: src,
            dst_port: dst,
            protocol: packet.protocol,
        }),
        _ => None,
    }
}

/// A socket in the destroy-event group of the calling thread's network namespace.
pub struct DestroyEvents {
    socket: NetfilterSocket,
    buffer: Vec<u8>,
}

/// Why the destroy events cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("conntrack destroy events: {operation}: {cause}")]
pub struct AccountingError {
    operation: &'static str,
    cause: String,
}

impl DestroyEvents {
    pub fn open() -> Result<Self, AccountingError> {
        let fail = |operation| move |e: SocketError| AccountingError { operation, cause: format!("{e:?}") };
        let group = 1u32 << (crate::conntrack::NFNLGRP_CONNTRACK_DESTROY - 1);
        let socket =
            NetfilterSocket::open_subscribed(Duration::from_secs(1), group).map_err(fail("subscribing"))?;
        socket.set_receive_buffer(RECEIVE_BUFFER_BYTES).map_err(fail("receive buffer"))?;
        Ok(Self { socket, buffer: vec![0; DATAGRAM_BYTES] })
    }

    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Reads what is queued (at most [`MAX_DATAGRAMS_PER_READ`] datagrams), calling `visit` for
    /// each destroyed entry. Returns how many events the kernel dropped (ENOBUFS: counted once
    /// per overflow, the number itself is unknown); malformed datagrams are skipped.
    pub fn read(
        &mut self,
        visit: &mut dyn FnMut(Connection, Option<Totals>),
    ) -> Result<u64, AccountingError> {
        let mut lost = 0;
        for _ in 0..MAX_DATAGRAMS_PER_READ {
            match self.socket.try_receive(&mut self.buffer, "receive") {
                Ok(Some(len)) => {
                    if let Err(e) = crate::conntrack::for_each_destroyed(&self.buffer[..len], visit) {
                        crate::log_limited!(log::Level::Warn, "conntrack destroy event skipped: {e}");
                    }
                }
                Ok(None) => {}
                Err(SocketError::Timeout) => break,
                Err(SocketError::Os { errno: nix::errno::Errno::ENOBUFS, .. }) => lost += 1,
                Err(SocketError::Truncated) => {
                    crate::log_limited!(
                        log::Level::Warn,
                        "conntrack destroy event larger than {DATAGRAM_BYTES} bytes skipped"
                    );
                }
                Err(e) => return Err(AccountingError { operation: "receive", cause: format!("{e:?}") }),
            }
        }
        Ok(lost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::LogVerdict;

    fn packet(src_port: u16) -> Packet {
        Packet {
            src: "198.18.0.1".parse().unwrap(),
            dst: "198.18.0.2".parse().unwrap(),
            protocol: 6,
            transport: Transport::Ports { src: src_port, dst: 5432 },
            length: 60,
        }
    }

    fn key() -> FlowKey {
        FlowKey {
            src: "198.18.0.1".parse().unwrap(),
            dst: "198.18.0.2".parse().unwrap(),
            protocol: 6,
            port: 5432,
            verdict: LogVerdict::Allowed,
            rule: 3,
        }
    }

    fn ended(src_port: u16) -> Connection {
        Connection {
            protocol: 6,
            original_src: "198.18.0.1".parse().unwrap(),
            original_dst: "198.18.0.2".parse().unwrap(),
            src_port: Some(src_port),
            dst_port: Some(5432),
            icmp: None,
            zone: None,
            id: None,
        }
    }

    #[test]
    fn an_ended_connection_gives_its_flow_the_bytes_and_the_packets_not_logged() {
        let mut accounting = Accounting::new(8);
        accounting.logged(&key(), &packet(40000), true, 0);
        // A retransmitted SYN, logged too (still NEW).
        accounting.logged(&key(), &packet(40000), false, 1);
        let totals = Totals { packets: 12, bytes: 5_000 };
        assert_eq!(accounting.ended(&ended(40000), Some(totals)), Some((key(), 10, 5_000)));
        // Once only, and nothing for connections never counted.
        assert_eq!(accounting.ended(&ended(40000), Some(totals)), None);
        assert_eq!(accounting.ended(&ended(40001), Some(totals)), None);
        let counters = accounting.counters();
        assert_eq!((counters.tracked, counters.accounted), (0, 1));
    }

    #[test]
    fn a_full_table_counts_the_overflow_and_old_entries_expire() {
        let mut accounting = Accounting::new(2);
        for port in 1..=3 {
            accounting.logged(&key(), &packet(port), true, 0);
        }
        assert_eq!(accounting.counters().overflow, 1);
        assert_eq!(accounting.counters().tracked, 2);
        assert_eq!(accounting.ended(&ended(3), Some(Totals { packets: 1, bytes: 60 })), None);
        // Accounting off: counted, nothing added, the entry kept for when it is on again.
        assert_eq!(accounting.ended(&ended(1), None), None);
        assert_eq!(accounting.counters().without_counters, 1);
        let max_age = u32::try_from(MAX_AGE.as_secs()).unwrap();
        accounting.sweep(max_age - 1);
        assert_eq!(accounting.counters().tracked, 2);
        accounting.sweep(max_age);
        assert_eq!((accounting.counters().tracked, accounting.counters().expired), (0, 2));
    }

    /// What the memory note in ARCHITECTURE.md ("Accounting") rests on.
    #[test]
    fn an_entry_is_92_bytes_and_a_control_byte() {
        assert_eq!(std::mem::size_of::<(Tuple, Counted)>(), 92);
    }

    #[test]
    fn icmp_and_fragments_are_not_remembered() {
        let mut accounting = Accounting::new(8);
        let ping =
            Packet { protocol: 1, transport: Transport::Icmp { kind: 8, code: 0, id: 7 }, ..packet(0) };
        accounting.logged(&key(), &ping, true, 0);
        let fragment = Packet { transport: Transport::Fragment, ..packet(0) };
        accounting.logged(&key(), &fragment, true, 0);
        assert_eq!(accounting.counters().tracked, 0);
    }
}
