//! Who may hold a connection slot of a listener, and for how long before proving who they are.
//!
//! Each listener has `total` slots (sized from the open-files limit by `serve`). A connection is
//! *pending* from accept until it authenticates (API: a request head with good credentials; event
//! service: a good Hello). Guarantees:
//! - pending connections hold at most `total - total / RESERVED_DIVISOR` slots: the rest is kept
//!   for connections that authenticated (admins, VENs);
//! - one source (an IPv4 address, an IPv6 /64) holds at most [`MAX_PENDING_PER_SOURCE`] pending
//!   connections (never more than half the pending slots): past it, a new connection from that
//!   source is closed at once, without a TLS handshake;
//! - when the pending slots are all taken, a new connection evicts the oldest pending connection
//!   of the source that holds the most, if that source holds more than one; when every source
//!   holds one (a bolt's fetch storm looks like this, and so does an attack from many addresses),
//!   the oldest one is evicted once it has been pending for [`EVICTABLE_AFTER`], and until then
//!   new connections wait in the listen backlog. A fleet's burst is served late, never cut off,
//!   and an idle attacker holds a slot for at most that long while a client waits;
//! - a pending connection must complete TLS and authenticate within [`PENDING_DEADLINE`] of
//!   accept (a connection that stays anonymous, VEN activation, gets that long per request).
//!
//! Refusals and evictions are counted and logged at most every 10 seconds.
//!
//! Past `total`, new connections wait in the listen backlog, as before.

use smol::Timer;
use smol::channel::{Receiver, Sender};
use smol::lock::{Semaphore, SemaphoreGuardArc};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Time from accept to an authenticated request (TLS handshake, first request head) or Hello.
pub const PENDING_DEADLINE: Duration = Duration::from_secs(10);
/// Pending connections one source may hold at once (never more than half the pending share).
/// Eviction already keeps one source from locking others out; this bounds what one source costs
/// (TLS handshakes) while leaving room for VENs behind one NAT address that connect at once (a
/// policy bolt to all of them).
pub const MAX_PENDING_PER_SOURCE: usize = 1024;
/// How long a connection may be pending before a newcomer can evict it when every source holds
/// one pending connection: half the deadline. A VEN authenticates in milliseconds when the PCE is
/// idle, but under a whole fleet's fetch storm the handshakes queue for the CPU for seconds. With
/// the largest source's oldest evicted at once, a 10,000-agent provision in the fleet bench saw
/// 13,829 evictions and 21,637 client errors (11.6 s to deliver); after 1 s, 125,500 errors and
/// 48 s; after 5 s, none evicted and 7.9 s.
pub const EVICTABLE_AFTER: Duration = Duration::from_secs(5);
/// One slot in this many is kept for authenticated connections.
pub const RESERVED_DIVISOR: usize = 4;
/// Warnings about refusals go out at most this often (remote peers trigger them).
const WARNING_INTERVAL_S: u64 = 10;

/// Where a connection comes from, as far as the per-source limit goes: an IPv4 address, or the
/// /64 of an IPv6 one (one host commonly holds a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    V4([u8; 4]),
    V6Prefix([u8; 8]),
}

impl Source {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.octets()),
                None => {
                    let octets = v6.octets();
                    let mut prefix = [0u8; 8];
                    prefix.copy_from_slice(&octets[..8]);
                    Source::V6Prefix(prefix)
                }
            },
        }
    }
}

/// Why a connection was closed at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("its source already holds {0} connections that have not authenticated")]
    SourceFull(usize),
}

/// The admission state of one listener.
pub struct Gate {
    name: &'static str,
    total: usize,
    pending_max: usize,
    per_source_max: usize,
    slots: Arc<Semaphore>,
    /// Bounded by construction: at most `pending_max` connections, in at most as many sources.
    pending: Mutex<Pending>,
    /// Wakes the accept loop waiting in [`Gate::pending_room`] when a pending connection leaves.
    left: (Sender<()>, Receiver<()>),
    refused: AtomicU64,
    evicted: AtomicU64,
    /// Unix time of the last warning.
    last_warning: AtomicU64,
}

#[derive(Default)]
struct Pending {
    total: usize,
    /// Per source, its pending connections, oldest first.
    by_source: HashMap<Source, VecDeque<Waiter>>,
    /// Every pending connection by serial (oldest first) and when it was accepted.
    by_age: BTreeMap<u64, (Source, Instant)>,
    next_serial: u64,
}

/// What a newcomer may do when every pending slot is taken.
#[derive(Debug, PartialEq, Eq)]
enum Candidate {
    /// Evict the oldest pending connection of this source.
    Evict(Source),
    /// Nothing is evictable yet; the oldest will be after this long.
    WaitFor(Duration),
}

/// A pending connection as the gate knows it: dropping `evict` (or sending on it) ends it.
struct Waiter {
    serial: u64,
    evict: Sender<()>,
}

impl Gate {
    pub fn new(name: &'static str, total: usize) -> Arc<Self> {
        let total = total.max(1);
        let pending_max = (total - total / RESERVED_DIVISOR).max(1);
        let per_source_max = MAX_PENDING_PER_SOURCE.min(pending_max / 2).max(1);
        Arc::new(Gate {
            name,
            total,
            pending_max,
            per_source_max,
            slots: Arc::new(Semaphore::new(total)),
            pending: Mutex::new(Pending::default()),
            left: smol::channel::bounded(1),
            refused: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            last_warning: AtomicU64::new(0),
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// (total slots, most pending, most pending per source).
    pub fn caps(&self) -> (usize, usize, usize) {
        (self.total, self.pending_max, self.per_source_max)
    }

    /// A free slot; when there is none, waits for one, leaving new connections in the listen
    /// backlog (a burst of VENs is served late rather than refused).
    pub async fn slot(&self) -> SemaphoreGuardArc {
        if let Some(slot) = self.slots.try_acquire_arc() {
            return slot;
        }
        self.warn(&format!(
            "{} connections at their limit of {}; new ones wait in the listen backlog",
            self.name, self.total
        ));
        self.slots.acquire_arc().await
    }

    /// Returns when a new connection can be admitted as pending: a pending slot is free, or a
    /// pending connection may be evicted for it. Until then new connections wait in the listen
    /// backlog. Only the listener's accept loop admits, so the room found here is still there when
    /// it calls [`Gate::admit`].
    pub async fn pending_room(&self) {
        let mut warned = false;
        loop {
            let wait = {
                let pending = self.lock();
                if pending.total < self.pending_max {
                    return;
                }
                match pending.eviction_candidate(Instant::now()) {
                    Candidate::Evict(_) => return,
                    Candidate::WaitFor(wait) => wait,
                }
            };
            if !warned {
                warned = true;
                self.warn(&format!(
                    "{} connections not yet authenticated hold every slot they may, each from its own \
                     source; new ones wait in the listen backlog until one authenticates or has waited {} s",
                    self.name,
                    EVICTABLE_AFTER.as_secs_f32()
                ));
            }
            smol::future::or(
                async {
                    let _ = self.left.1.recv().await;
                },
                async {
                    Timer::after(wait).await;
                },
            )
            .await;
        }
    }

    /// Admits a connection accepted from `peer` into `slot` as pending (evicting a pending
    /// connection, as [`Gate::pending_room`] allows, when every pending slot is taken), or refuses
    /// it.
    pub fn admit(self: &Arc<Self>, slot: SemaphoreGuardArc, peer: IpAddr) -> Result<Ticket, Refusal> {
        let source = Source::of(peer);
        let (evict, receiver) = smol::channel::bounded(1);
        let admitted = {
            let mut pending = self.lock();
            let from_source = pending.by_source.get(&source).map_or(0, VecDeque::len);
            if from_source >= self.per_source_max {
                Err(Refusal::SourceFull(from_source))
            } else {
                let now = Instant::now();
                let evicted = match pending.total >= self.pending_max {
                    true => match pending.eviction_candidate(now) {
                        Candidate::Evict(victim) => pending.evict_oldest_of(victim),
                        // Only if admitted without waiting for room: over the share, not evicting.
                        Candidate::WaitFor(_) => None,
                    },
                    false => None,
                };
                pending.total += 1;
                pending.next_serial += 1;
                let serial = pending.next_serial;
                pending.by_source.entry(source).or_default().push_back(Waiter { serial, evict });
                pending.by_age.insert(serial, (source, now));
                Ok((serial, evicted))
            }
        };
        let (serial, evicted) = match admitted {
            Ok(admitted) => admitted,
            Err(refusal) => {
                let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
                self.warn(&format!(
                    "{} connection from {peer} closed: {refusal} ({refused} refused so far)",
                    self.name
                ));
                return Err(refusal);
            }
        };
        if let Some(victim) = evicted {
            let _ = victim.evict.try_send(());
            let evicted = self.evicted.fetch_add(1, Ordering::Relaxed) + 1;
            self.warn(&format!(
                "{} connections not yet authenticated hold every slot they may: the oldest of the \
                 largest source (or the one pending longest) closed for a new one from {peer} \
                 ({evicted} so far)",
                self.name
            ));
        }
        Ok(Ticket {
            gate: Some(self.clone()),
            source,
            serial,
            pending: true,
            deadline: Instant::now() + PENDING_DEADLINE,
            evicted: Some(receiver),
            _slot: Some(slot),
        })
    }

    /// Forgets the pending connection `serial` of `source`, unless it was evicted (and so
    /// forgotten) already.
    fn release(&self, source: Source, serial: u64) {
        let mut pending = self.lock();
        let Some(waiters) = pending.by_source.get_mut(&source) else { return };
        let Some(at) = waiters.iter().position(|waiter| waiter.serial == serial) else { return };
        waiters.remove(at);
        if waiters.is_empty() {
            pending.by_source.remove(&source);
        }
        pending.by_age.remove(&serial);
        pending.total = pending.total.saturating_sub(1);
        drop(pending);
        // Full means a wake-up is already queued for the accept loop.
        let _ = self.left.0.try_send(());
    }

    /// How many connections were refused and evicted so far.
    #[cfg(test)]
    fn counts(&self) -> (u64, u64) {
        (self.refused.load(Ordering::Relaxed), self.evicted.load(Ordering::Relaxed))
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Logs a warning unless one went out in the last [`WARNING_INTERVAL_S`] seconds.
    pub fn warn(&self, message: &str) {
        let now = crate::clock::now();
        let last = self.last_warning.load(Ordering::Relaxed);
        if now >= last + WARNING_INTERVAL_S
            && self.last_warning.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            log::warn!("{message}");
        }
    }
}

impl Pending {
    /// Whose pending connection a newcomer may evict at `now`: the source holding the most, when
    /// it holds more than one; else the connection pending longest, once it has been for
    /// [`EVICTABLE_AFTER`].
    fn eviction_candidate(&self, now: Instant) -> Candidate {
        let largest = self.by_source.iter().max_by_key(|(_, waiters)| waiters.len());
        if let Some((source, _)) = largest.filter(|(_, waiters)| waiters.len() > 1) {
            return Candidate::Evict(*source);
        }
        match self.by_age.first_key_value() {
            Some((_, (source, accepted))) => match EVICTABLE_AFTER.checked_sub(now.duration_since(*accepted))
            {
                Some(left) if !left.is_zero() => Candidate::WaitFor(left),
                _ => Candidate::Evict(*source),
            },
            // Nothing pending: nothing to wait for either (the caller found the share full, so
            // this does not happen).
            None => Candidate::WaitFor(EVICTABLE_AFTER),
        }
    }

    /// Takes the oldest pending connection of `source` (the caller evicts it).
    fn evict_oldest_of(&mut self, source: Source) -> Option<Waiter> {
        let waiters = self.by_source.get_mut(&source)?;
        let oldest = waiters.pop_front();
        if waiters.is_empty() {
            self.by_source.remove(&source);
        }
        if let Some(waiter) = &oldest {
            self.by_age.remove(&waiter.serial);
            self.total = self.total.saturating_sub(1);
        }
        oldest
    }
}

/// One admitted connection: its slot, and whether it still has to authenticate.
pub struct Ticket {
    gate: Option<Arc<Gate>>,
    source: Source,
    serial: u64,
    pending: bool,
    deadline: Instant,
    /// Fires when the gate evicts this connection (while pending).
    evicted: Option<Receiver<()>>,
    _slot: Option<SemaphoreGuardArc>,
}

impl Ticket {
    /// A ticket outside any gate, already authenticated (unit tests and fuzzing of the protocols).
    pub fn detached() -> Self {
        Ticket {
            gate: None,
            source: Source::V4([0; 4]),
            serial: 0,
            pending: false,
            deadline: Instant::now(),
            evicted: None,
            _slot: None,
        }
    }

    /// While pending: when the connection must have authenticated (or, for an anonymous request,
    /// have sent it whole).
    pub fn pending_deadline(&self) -> Option<Instant> {
        self.pending.then_some(self.deadline)
    }

    /// Completes when the gate evicts this connection; never once it authenticated (run the
    /// connection's work against it).
    pub fn eviction(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let receiver = self.evicted.clone();
        async move {
            match receiver {
                Some(receiver) if receiver.recv().await.is_ok() => {}
                // Authenticated or closed: the gate forgot the connection, no eviction comes.
                _ => std::future::pending::<()>().await,
            }
        }
    }

    /// An anonymous request was answered: the next one gets a deadline of its own.
    pub fn renew(&mut self) {
        if self.pending {
            self.deadline = Instant::now() + PENDING_DEADLINE;
        }
    }

    /// The connection proved who it is: it no longer counts as pending.
    pub fn authenticated(&mut self) {
        if self.pending {
            self.pending = false;
            if let Some(gate) = &self.gate {
                gate.release(self.source, self.serial);
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.authenticated();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn slot(gate: &Gate) -> SemaphoreGuardArc {
        gate.slots.try_acquire_arc().expect("a free slot")
    }

    #[test]
    fn one_source_cannot_take_every_pending_slot() {
        let gate = Gate::new("test", 16);
        assert_eq!(gate.caps(), (16, 12, 6));
        let mut held = Vec::new();
        for _ in 0..6 {
            held.push(gate.admit(slot(&gate), ip("127.0.0.2")).unwrap());
        }
        assert_eq!(gate.admit(slot(&gate), ip("127.0.0.2")).err(), Some(Refusal::SourceFull(6)));
        // Another source still gets in; an authenticated connection frees its source's share.
        let mut admin = gate.admit(slot(&gate), ip("127.0.0.1")).unwrap();
        admin.authenticated();
        held[0].authenticated();
        held.push(gate.admit(slot(&gate), ip("127.0.0.2")).unwrap());
        assert_eq!(gate.lock().total, 6);
        drop(held);
        assert_eq!(gate.lock().total, 0);
        assert!(gate.lock().by_source.is_empty());
    }

    #[test]
    fn a_full_pending_share_evicts_the_oldest_of_the_largest_source() {
        let gate = Gate::new("test", 8);
        assert_eq!(gate.caps(), (8, 6, 3));
        // Two attackers fill the pending share (3 + 2), a client makes it 6.
        let mut big: Vec<Ticket> = (0..3).map(|_| gate.admit(slot(&gate), ip("10.0.0.1")).unwrap()).collect();
        let small: Vec<Ticket> = (0..2).map(|_| gate.admit(slot(&gate), ip("10.0.0.2")).unwrap()).collect();
        let client = gate.admit(slot(&gate), ip("10.0.0.3")).unwrap();
        assert_eq!(gate.lock().total, 6);
        // The next one evicts the oldest of 10.0.0.1, not the client.
        let newcomer = gate.admit(slot(&gate), ip("10.0.0.4")).unwrap();
        assert_eq!(gate.counts(), (0, 1));
        assert_eq!(gate.lock().total, 6);
        let fired = |ticket: &Ticket| {
            smol::block_on(smol::future::or(
                async {
                    ticket.eviction().await;
                    true
                },
                async { false },
            ))
        };
        assert!(fired(&big[0]));
        assert!(!fired(&big[1]) && !fired(&small[0]) && !fired(&client) && !fired(&newcomer));
        // An evicted ticket's drop forgets nothing else; an authenticated one is never evicted.
        drop(big.remove(0));
        assert_eq!(gate.lock().total, 6);
        let mut client = client;
        client.authenticated();
        assert!(!fired(&client));
        assert_eq!(gate.lock().total, 5);
        drop((big, small, newcomer, client));
        assert_eq!(gate.lock().total, 0);
        assert!(gate.lock().by_source.is_empty());
    }

    #[test]
    fn one_connection_per_source_is_evicted_only_after_waiting_long_enough() {
        let gate = Gate::new("test", 8);
        assert_eq!(gate.caps(), (8, 6, 3));
        // A fetch storm: every source holds one pending connection.
        let held: Vec<Ticket> =
            (1..=6).map(|n| gate.admit(slot(&gate), ip(&format!("10.0.0.{n}"))).unwrap()).collect();
        let now = Instant::now();
        let oldest = Source::of(ip("10.0.0.1"));
        match gate.lock().eviction_candidate(now) {
            Candidate::WaitFor(left) => assert!(left > Duration::ZERO && left <= EVICTABLE_AFTER),
            other => panic!("a young pending connection is evictable: {other:?}"),
        }
        assert_eq!(gate.lock().eviction_candidate(now + EVICTABLE_AFTER), Candidate::Evict(oldest));
        // The accept loop waits for room: a connection that authenticates makes it at once.
        let mut held = held;
        let room = smol::block_on(smol::future::or(
            async {
                gate.pending_room().await;
                false
            },
            async {
                held[1].authenticated();
                Timer::after(Duration::from_secs(5)).await;
                true
            },
        ));
        assert!(!room, "pending_room did not return when a pending connection authenticated");
        // A second connection from a source makes that source the one to evict, at any age.
        let second = gate.admit(slot(&gate), ip("10.0.0.3")).unwrap();
        assert_eq!(gate.lock().eviction_candidate(now), Candidate::Evict(Source::of(ip("10.0.0.3"))));
        assert_eq!(gate.counts(), (0, 0));
        drop((held, second));
        assert_eq!(gate.lock().total, 0);
        assert!(gate.lock().by_age.is_empty());
    }

    #[test]
    fn sources_are_v4_addresses_and_v6_prefixes() {
        assert_eq!(Source::of(ip("::ffff:10.1.2.3")), Source::of(ip("10.1.2.3")));
        assert_eq!(Source::of(ip("2001:db8::1")), Source::of(ip("2001:db8::ffff:1")));
        assert_ne!(Source::of(ip("2001:db8::1")), Source::of(ip("2001:db8:0:1::1")));
    }

    #[test]
    fn detached_tickets_are_authenticated() {
        let mut ticket = Ticket::detached();
        assert!(ticket.pending_deadline().is_none());
        ticket.authenticated();
        ticket.renew();
    }
}
