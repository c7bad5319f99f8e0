//! The flow pipeline's threads: `flows` reads our NFLOG group and counts flows; `flowstore`
//! writes each flush to the stores.
//!
//! `flows` sleeps in `poll` on the NFLOG socket and a stop pipe. It wakes only for packets, for
//! the flush that follows the first packet of an interval, and once a second while sampling
//! decides, so an idle host costs no wake-ups (after traffic, one more: the connection table's
//! last sweep, once its tuples have expired). Each logged packet goes through the [`Sampler`]
//! into the [`Aggregator`]; every `flush_interval` the aggregator is drained into one batch of
//! [`FlowRecord`]s handed to `flowstore` over a channel of [`FLUSH_QUEUE_CAPACITY`] batches.
//! Storage never blocks reading: when `flowstore` is still busy with the previous flush, the
//! batch waits in one held slot; a batch that finds that slot taken too is dropped and counted.
//! `flowstore` keeps one failed batch and tries it again before the next one (a full disk loses
//! the oldest and counts it, never stops enforcement). On stop, the last interval is flushed
//! and written before the threads end.
//!
//! A group that cannot be bound (another program holds it, or the kernel has no nfnetlink_log)
//! is retried with backoff (1 s doubling to 60 s) without affecting enforcement. Counters are
//! shared atomics that `ven status` reads.

use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use ven_proto::{FlowRecord, FlowVerdict};

use super::accounting::{Accounting, DestroyEvents};
use super::aggregate::{Aggregator, Event, Summary, SummaryKey};
use super::connections::{Connections, Timeouts};
use super::nflog::NflogReader;
use super::sampling::{Sampler, Transition};
use crate::firewall::LogVerdict;

/// First and longest wait before binding the group again after a failure.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LONGEST_RETRY: Duration = Duration::from_secs(60);
/// Flushes waiting for `flowstore` (one more waits in the `flows` thread's held slot).
pub const FLUSH_QUEUE_CAPACITY: usize = 1;

/// How the pipeline runs (from the board config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PipelineSettings {
    pub group: u16,
    pub tracked_flows: usize,
    pub flush_interval: Duration,
    /// Logged packets per second above which, sustained, packets are sampled (0: never).
    pub sampling_threshold: u32,
    /// Most tuples the connection table tracks, and how long a tuple stays one connection.
    pub tracked_connections: usize,
    pub connection_timeouts: Timeouts,
    /// Most accepted connections waiting for conntrack's account of their bytes (0: none are:
    /// accepted flows' bytes stay unknown). See [`super::accounting`].
    pub accounted_connections: usize,
}

impl PipelineSettings {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            group: config.nflog_group,
            tracked_flows: config.flows.tracked_flows,
            flush_interval: config.flows.flush_interval,
            sampling_threshold: config.flows.sampling_threshold,
            tracked_connections: config.flows.tracked_connections.unwrap_or(config.flows.tracked_flows),
            connection_timeouts: config.flows.connection_timeouts,
            accounted_connections: config.flows.accounted_connections(),
        }
    }
}

/// Where flushed flow records go (the agent's [`super::store::FlowStore`]; tests use others).
pub trait FlowSink: Send + 'static {
    /// Stores one flush. An error keeps the records for one more attempt.
    fn store(&mut self, records: &[FlowRecord]) -> Result<(), String>;
}

/// The agent's sink: flow.db and flowsum.db in log/ (shared with the uploader).
impl FlowSink for Arc<super::store::FlowStore> {
    fn store(&mut self, records: &[FlowRecord]) -> Result<(), String> {
        let outcome = self.append(records).map_err(|e| e.to_string())?;
        for path in &outcome.rotated {
            log::info!("{} reached its size cap and was rotated to its backup", path.display());
        }
        for recovery in &outcome.recovered {
            log::error!(
                "{} was corrupt ({}); moved to {} and started anew",
                recovery.path.display(),
                recovery.cause,
                recovery.moved_to.display()
            );
        }
        if outcome.dropped_unacknowledged > 0 {
            log::warn!(
                "{} flow records left flow.db by rotation before the PCE acknowledged them",
                outcome.dropped_unacknowledged
            );
        }
        Ok(())
    }
}

/// What the pipeline has done since the agent started.
#[derive(Debug, Default)]
pub struct FlowStats {
    /// Logged packets decoded into flow keys.
    pub events: AtomicU64,
    /// Packets the kernel could not hand over (ENOBUFS, sequence gaps).
    pub lost: AtomicU64,
    /// Messages that did not parse, or carried a prefix that is not ours.
    pub skipped: AtomicU64,
    /// The group is bound and being read.
    pub reading: AtomicBool,
    /// Flows counted in the current interval, and events folded into overflow records because
    /// the table was full.
    pub tracked: AtomicU64,
    pub folded: AtomicU64,
    /// The connection table (issue 13): packets that started a tracked connection, packets of
    /// tracked connections, packets of tuples the full table could not track (each counted as a
    /// connection), tuples tracked now, tuples expired, and the table's capacity and bytes.
    /// Connections counted = `connections_new + connections_overflow`.
    pub connections_new: AtomicU64,
    pub connections_again: AtomicU64,
    pub connections_overflow: AtomicU64,
    pub connections_tracked: AtomicU64,
    pub connections_expired: AtomicU64,
    pub connections_capacity: AtomicU64,
    pub connections_table_bytes: AtomicU64,
    /// Conntrack accounting of accepted connections (`flows/accounting.rs`): whether destroy
    /// events are read, connections waiting for theirs, connections whose bytes were added,
    /// connections not remembered (table full), events lost or entries forgotten without
    /// theirs, and events that came without counters (`nf_conntrack_acct` off).
    pub accounting_on: AtomicBool,
    pub accounted_tracked: AtomicU64,
    pub accounted: AtomicU64,
    pub accounted_overflow: AtomicU64,
    pub accounted_lost: AtomicU64,
    pub accounted_without_counters: AtomicU64,
    /// 1 while every packet is counted, N while 1 in N is.
    pub sampling_scale: AtomicU32,
    /// Times sampling started.
    pub sampling_episodes: AtomicU64,
    /// Flushes stored and the records they held.
    pub flushes: AtomicU64,
    pub records_stored: AtomicU64,
    /// Records lost before the store took them: storage failed twice in a row, or was too slow.
    pub records_dropped: AtomicU64,
    pub store_failures: AtomicU64,
    pub last_store_error: Mutex<Option<String>>,
}

/// A copy of [`FlowStats`] at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowCounters {
    pub events: u64,
    pub lost: u64,
    pub skipped: u64,
    pub reading: bool,
    pub tracked: u64,
    pub folded: u64,
    pub connections_new: u64,
    pub connections_again: u64,
    pub connections_overflow: u64,
    pub connections_tracked: u64,
    pub connections_expired: u64,
    pub connections_capacity: u64,
    pub connections_table_bytes: u64,
    pub accounting_on: bool,
    pub accounted_tracked: u64,
    pub accounted: u64,
    pub accounted_overflow: u64,
    pub accounted_lost: u64,
    pub accounted_without_counters: u64,
    pub sampling_scale: u32,
    pub sampling_episodes: u64,
    pub flushes: u64,
    pub records_stored: u64,
    pub records_dropped: u64,
    pub store_failures: u64,
    pub last_store_error: Option<String>,
}

impl FlowStats {
    pub fn new() -> Self {
        Self { sampling_scale: AtomicU32::new(1), ..Self::default() }
    }

    pub fn snapshot(&self) -> FlowCounters {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        FlowCounters {
            events: load(&self.events),
            lost: load(&self.lost),
            skipped: load(&self.skipped),
            reading: self.reading.load(Ordering::Relaxed),
            tracked: load(&self.tracked),
            folded: load(&self.folded),
            connections_new: load(&self.connections_new),
            connections_again: load(&self.connections_again),
            connections_overflow: load(&self.connections_overflow),
            connections_tracked: load(&self.connections_tracked),
            connections_expired: load(&self.connections_expired),
            connections_capacity: load(&self.connections_capacity),
            connections_table_bytes: load(&self.connections_table_bytes),
            accounting_on: self.accounting_on.load(Ordering::Relaxed),
            accounted_tracked: load(&self.accounted_tracked),
            accounted: load(&self.accounted),
            accounted_overflow: load(&self.accounted_overflow),
            accounted_lost: load(&self.accounted_lost),
            accounted_without_counters: load(&self.accounted_without_counters),
            sampling_scale: self.sampling_scale.load(Ordering::Relaxed),
            sampling_episodes: load(&self.sampling_episodes),
            flushes: load(&self.flushes),
            records_stored: load(&self.records_stored),
            records_dropped: load(&self.records_dropped),
            store_failures: load(&self.store_failures),
            last_store_error: self.last_store_error.lock().ok().and_then(|e| e.clone()),
        }
    }

    fn count(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// The running pipeline threads.
pub struct FlowPipeline {
    stop: OwnedFd,
    reader: Option<JoinHandle<()>>,
    writer: Option<JoinHandle<()>>,
    stats: Arc<FlowStats>,
}

impl FlowPipeline {
    /// Starts `flows` on the settings' NFLOG group, in the calling thread's network namespace,
    /// and `flowstore` writing into `sink`.
    pub fn start(settings: PipelineSettings, sink: Box<dyn FlowSink>) -> std::io::Result<Self> {
        Self::start_counting(settings, sink, Arc::new(FlowStats::new()))
    }

    /// [`Self::start`], counting into `stats` (the agent keeps them across restarts). The
    /// threads are supervised ([`crate::agent::monitor`]): their end wakes the agent's manager.
    pub fn start_counting(
        settings: PipelineSettings,
        sink: Box<dyn FlowSink>,
        stats: Arc<FlowStats>,
    ) -> std::io::Result<Self> {
        use crate::agent::monitor;
        let (stop_read, stop_write) = nix::unistd::pipe().map_err(std::io::Error::from)?;
        let (flush_tx, flush_rx) = mpsc::sync_channel(FLUSH_QUEUE_CAPACITY);
        let writer_stats = Arc::clone(&stats);
        let writer = monitor::spawn("flowstore", move || write_flushes(&flush_rx, sink, &writer_stats))?;
        let reader_stats = Arc::clone(&stats);
        let reader =
            monitor::spawn("flows", move || Reader::new(settings, flush_tx, reader_stats).run(&stop_read))?;
        Ok(Self { stop: stop_write, reader: Some(reader), writer: Some(writer), stats })
    }

    pub fn stats(&self) -> Arc<FlowStats> {
        Arc::clone(&self.stats)
    }

    /// Stops reading, stores the last interval and waits for both threads.
    pub fn stop(mut self) {
        self.stop_joined();
    }

    /// Whether the reader or the writer thread has ended.
    pub fn ended(&self) -> bool {
        [&self.reader, &self.writer]
            .into_iter()
            .any(|thread| thread.as_ref().is_none_or(JoinHandle::is_finished))
    }

    /// [`Self::stop`]; `Some(message)` when a thread had panicked.
    pub fn stop_joined(&mut self) -> Option<String> {
        let _ = nix::unistd::write(&self.stop, &[1]);
        let mut panicked = None;
        for thread in [self.reader.take(), self.writer.take()].into_iter().flatten() {
            if let Some(message) = crate::agent::monitor::join(thread) {
                panicked.get_or_insert(message);
            }
        }
        panicked
    }
}

/// The `flows` thread's state.
struct Reader {
    settings: PipelineSettings,
    aggregator: Aggregator,
    connections: Connections,
    accounting: Accounting,
    /// The conntrack destroy events while they can be read.
    destroy_events: Option<DestroyEvents>,
    sampler: Sampler,
    /// When the current interval is flushed (`None`: nothing counted yet).
    flush_at: Option<Instant>,
    /// When the connection table is swept with no flush due (`None`: it is empty), so that an
    /// idle agent gives back what a burst grew it by: one wake-up after the last tuple expired.
    sweep_at: Option<Instant>,
    flush_tx: SyncSender<Vec<FlowRecord>>,
    /// A flush `flowstore` had no room for yet.
    held: Option<Vec<FlowRecord>>,
    stats: Arc<FlowStats>,
    started: Instant,
}

impl Reader {
    fn new(settings: PipelineSettings, flush_tx: SyncSender<Vec<FlowRecord>>, stats: Arc<FlowStats>) -> Self {
        let started = Instant::now();
        Self {
            aggregator: Aggregator::new(settings.tracked_flows),
            connections: Connections::new(settings.tracked_connections, settings.connection_timeouts),
            accounting: Accounting::new(settings.accounted_connections),
            destroy_events: None,
            sampler: Sampler::new(settings.sampling_threshold, 0),
            settings,
            flush_at: None,
            sweep_at: None,
            flush_tx,
            held: None,
            stats,
            started,
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Monotonic seconds since the thread started: the connection table's clock (a wall clock
    /// step must not end or prolong connections).
    fn now_mono_secs(&self) -> u32 {
        u32::try_from(self.started.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    /// Publishes the connection table's counters for `ven status`.
    fn publish_connections(&self) {
        let counters = self.connections.counters();
        let stats = &self.stats;
        stats.connections_new.store(counters.new, Ordering::Relaxed);
        stats.connections_again.store(counters.again, Ordering::Relaxed);
        stats.connections_overflow.store(counters.overflow, Ordering::Relaxed);
        stats.connections_tracked.store(counters.tracked as u64, Ordering::Relaxed);
        stats.connections_expired.store(counters.expired, Ordering::Relaxed);
        stats.connections_capacity.store(self.connections.capacity() as u64, Ordering::Relaxed);
        stats.connections_table_bytes.store(self.connections.table_bytes() as u64, Ordering::Relaxed);
    }

    fn run(mut self, stop: &OwnedFd) {
        let group = self.settings.group;
        let mut retry = FIRST_RETRY;
        loop {
            let reader = match NflogReader::open(group) {
                Ok(reader) => reader,
                Err(e) => {
                    log::warn!("{e}; flows are not recorded, retrying in {retry:?}");
                    if self.wait_or_stop(stop, retry) {
                        break;
                    }
                    retry = (retry * 2).min(LONGEST_RETRY);
                    continue;
                }
            };
            retry = FIRST_RETRY;
            if self.settings.accounted_connections > 0 && self.destroy_events.is_none() {
                match DestroyEvents::open() {
                    Ok(events) => self.destroy_events = Some(events),
                    Err(e) => log::warn!("{e}; accepted flows carry no bytes"),
                }
            }
            self.stats.reading.store(true, Ordering::Relaxed);
            log::info!("reading NFLOG group {group}");
            let stopped = self.read(reader, stop);
            self.stats.reading.store(false, Ordering::Relaxed);
            if stopped || self.wait_or_stop(stop, retry) {
                break;
            }
        }
        // Stopping: wait for the store rather than lose the last intervals.
        let last = self.drain_records();
        for records in [self.held.take(), Some(last)].into_iter().flatten() {
            if !records.is_empty() {
                let _ = self.flush_tx.send(records);
            }
        }
    }

    /// Waits `wait` for the stop pipe, flushing on time meanwhile; true when stopped.
    fn wait_or_stop(&mut self, stop: &OwnedFd, wait: Duration) -> bool {
        let until = Instant::now() + wait;
        loop {
            let now = Instant::now();
            if now >= until {
                return false;
            }
            let timeout = self.timeout(now).map_or(until - now, |t| t.min(until - now));
            let mut fds = [PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
            if matches!(poll(&mut fds, poll_timeout(Some(timeout))), Ok(n) if n > 0) {
                return true;
            }
            self.on_timers();
        }
    }

    /// Reads until stopped (true) or the socket fails (false).
    fn read(&mut self, mut reader: NflogReader, stop: &OwnedFd) -> bool {
        let group = self.settings.group;
        let mut counted = reader.loss();
        loop {
            let timeout = self.timeout(Instant::now());
            // Without destroy events, the stop pipe takes their place (read once, harmlessly).
            let destroy_fd = self.destroy_events.as_ref().map_or(stop.as_fd(), DestroyEvents::as_fd);
            let mut fds = [
                PollFd::new(reader.as_fd(), PollFlags::POLLIN),
                PollFd::new(stop.as_fd(), PollFlags::POLLIN),
                PollFd::new(destroy_fd, PollFlags::POLLIN),
            ];
            match poll(&mut fds, poll_timeout(timeout)) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("NFLOG group {group}: poll failed: {e}");
                    return false;
                }
            }
            let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|events| !events.is_empty());
            let (packets_ready, stopped, ended_ready) = (ready(&fds[0]), ready(&fds[1]), ready(&fds[2]));
            if stopped {
                return true;
            }
            // Destroy events first: a connection that ended is accounted before a packet of a
            // new one reusing its tuple is logged.
            if ended_ready && self.destroy_events.is_some() {
                self.read_destroy_events();
            }
            if packets_ready {
                let now_secs = crate::clock::now();
                let mono = self.now_mono_secs();
                let (aggregator, connections, sampler, accounting) =
                    (&mut self.aggregator, &mut self.connections, &mut self.sampler, &mut self.accounting);
                let accounting_on = self.destroy_events.is_some();
                let mut events = 0u64;
                let result = reader.read_batch(|event| {
                    events += 1;
                    if let Some(scale) = sampler.admit() {
                        let seen = connections.observe(&event.key, &event.packet, mono);
                        let dropped = event.key.verdict == LogVerdict::Dropped;
                        if accounting_on && !dropped && scale <= 1 {
                            accounting.logged(&event.key, &event.packet, seen.is_connection(), mono);
                        }
                        let counted = Event {
                            unix_secs: now_secs,
                            scale,
                            connection: seen.is_connection(),
                            // Dropped: every packet is logged, its length is the flow's. Else
                            // the bytes are conntrack's (accounting), not those of NEW packets.
                            length: if dropped { event.packet.length } else { 0 },
                        };
                        aggregator.record_event(&event.key, &counted);
                    }
                });
                FlowStats::count(&self.stats.events, events);
                if let Err(e) = result {
                    log::error!("{e}; binding the group again");
                    return false;
                }
                if events > 0 && self.flush_at.is_none() {
                    self.flush_at = Some(Instant::now() + self.settings.flush_interval);
                }
                let loss = reader.loss();
                FlowStats::count(&self.stats.lost, loss.lost().saturating_sub(counted.lost()));
                let skipped = |l: &super::LossCounters| l.malformed.saturating_add(l.unknown_prefix);
                FlowStats::count(&self.stats.skipped, skipped(&loss).saturating_sub(skipped(&counted)));
                if loss.lost() > counted.lost() {
                    crate::log_limited!(
                        log::Level::Warn,
                        "NFLOG group {group}: {} packets lost so far",
                        loss.lost()
                    );
                }
                counted = loss;
                let counters = self.aggregator.counters();
                self.stats.tracked.store(counters.tracked as u64, Ordering::Relaxed);
                self.stats.folded.store(counters.folded, Ordering::Relaxed);
                self.publish_connections();
            }
            self.on_timers();
        }
    }

    /// Adds the bytes of the accepted connections that ended to their flows.
    fn read_destroy_events(&mut self) {
        let Some(events) = self.destroy_events.as_mut() else { return };
        let now_secs = crate::clock::now();
        let (aggregator, accounting) = (&mut self.aggregator, &mut self.accounting);
        let mut added = false;
        let result = events.read(&mut |connection, totals| {
            if let Some((key, packets, bytes)) = accounting.ended(&connection, totals) {
                aggregator.record_accounted(&key, now_secs, packets, bytes);
                added = true;
            }
        });
        match result {
            Ok(lost) => self.accounting.lost(lost),
            Err(e) => {
                log::warn!("{e}; accepted flows carry no bytes from now on");
                self.destroy_events = None;
            }
        }
        if added && self.flush_at.is_none() {
            self.flush_at = Some(Instant::now() + self.settings.flush_interval);
        }
        self.publish_accounting();
    }

    /// Publishes the accounting counters for `ven status`.
    fn publish_accounting(&self) {
        let counters = self.accounting.counters();
        let stats = &self.stats;
        stats.accounting_on.store(self.destroy_events.is_some(), Ordering::Relaxed);
        stats.accounted_tracked.store(counters.tracked as u64, Ordering::Relaxed);
        stats.accounted.store(counters.accounted, Ordering::Relaxed);
        stats.accounted_overflow.store(counters.overflow, Ordering::Relaxed);
        stats.accounted_lost.store(counters.lost.saturating_add(counters.expired), Ordering::Relaxed);
        stats.accounted_without_counters.store(counters.without_counters, Ordering::Relaxed);
    }

    /// How long `poll` may sleep: until the flush or the connection table's sweep, or the next
    /// sampling window while sampling decides; `None` when nothing is due.
    fn timeout(&self, now: Instant) -> Option<Duration> {
        let flush = [self.flush_at, self.sweep_at].into_iter().flatten().min();
        let flush = flush.map(|at| at.saturating_duration_since(now));
        let window = self.sampler.needs_ticks().then_some(super::sampling::WINDOW);
        match (flush, window) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn on_timers(&mut self) {
        match self.sampler.tick(self.now_ms()) {
            Some(Transition::Sampling { scale, rate }) => {
                if self.stats.sampling_scale.load(Ordering::Relaxed) <= 1 {
                    FlowStats::count(&self.stats.sampling_episodes, 1);
                }
                self.stats.sampling_scale.store(u32::from(scale), Ordering::Relaxed);
                log::warn!(
                    "sampling mode: {rate} logged packets/s is over the threshold of {}; \
                     counting 1 in {scale}",
                    self.settings.sampling_threshold
                );
            }
            Some(Transition::Exact { rate }) => {
                self.stats.sampling_scale.store(1, Ordering::Relaxed);
                log::info!("sampling mode ended: {rate} logged packets/s; every packet is counted again");
            }
            None => {}
        }
        if self.flush_at.is_some_and(|at| at <= Instant::now()) {
            self.flush();
        }
        if self.sweep_at.is_some_and(|at| at <= Instant::now()) {
            self.sweep_connections();
        }
    }

    /// Forgets expired tuples and, while some are left, sets the next sweep to when they all
    /// will have expired unless seen again.
    fn sweep_connections(&mut self) {
        self.connections.sweep(self.now_mono_secs());
        self.publish_connections();
        self.sweep_at = (self.connections.counters().tracked > 0)
            .then(|| Instant::now() + self.settings.connection_timeouts.longest() + Duration::from_secs(1));
    }

    /// The interval's flows as records, converted one by one (the only copy beside the table).
    fn drain_records(&mut self) -> Vec<FlowRecord> {
        let mut records = Vec::with_capacity(self.aggregator.counters().tracked + 4);
        self.aggregator.flush_each(|summary| records.push(record_of(&summary)));
        records
    }

    /// Hands the interval's flows to `flowstore` without waiting for it.
    fn flush(&mut self) {
        self.flush_at = None;
        let mut records = self.drain_records();
        self.accounting.sweep(self.now_mono_secs());
        self.publish_accounting();
        self.stats.tracked.store(0, Ordering::Relaxed);
        // The flush timer sweeps too; after the last flush, one more wake-up at most.
        self.sweep_connections();
        if let Some(held) = self.held.take() {
            match self.flush_tx.try_send(held) {
                Ok(()) => {}
                Err(TrySendError::Full(held)) => {
                    FlowStats::count(&self.stats.records_dropped, held.len() as u64);
                    crate::log_limited!(
                        log::Level::Warn,
                        "flow store is too slow: {} flow records dropped",
                        held.len()
                    );
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
        if records.is_empty() {
            return;
        }
        match self.flush_tx.try_send(std::mem::take(&mut records)) {
            Ok(()) => {}
            Err(TrySendError::Full(records)) => self.held = Some(records),
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

fn poll_timeout(timeout: Option<Duration>) -> PollTimeout {
    match timeout {
        // Round up, so a wake-up never comes a hair early and spins.
        Some(t) => PollTimeout::try_from(t + Duration::from_micros(999)).unwrap_or(PollTimeout::MAX),
        None => PollTimeout::NONE,
    }
}

/// The `flowstore` thread: stores each flush, keeping one failed flush for another attempt.
fn write_flushes(flushes: &Receiver<Vec<FlowRecord>>, mut sink: Box<dyn FlowSink>, stats: &FlowStats) {
    let mut failed: Option<Vec<FlowRecord>> = None;
    while let Ok(records) = flushes.recv() {
        if let Some(retry) = failed.take() {
            if store(sink.as_mut(), &retry, stats).is_err() {
                // Still failing: keep the newest, count the oldest as lost.
                FlowStats::count(&stats.records_dropped, retry.len() as u64);
            }
        }
        if store(sink.as_mut(), &records, stats).is_err() {
            failed = Some(records);
        }
        // The store call freed its page cache; glibc keeps it unless asked (crate::memory).
        crate::memory::release_freed();
    }
    if let Some(retry) = failed {
        if store(sink.as_mut(), &retry, stats).is_err() {
            FlowStats::count(&stats.records_dropped, retry.len() as u64);
        }
    }
}

fn store(sink: &mut dyn FlowSink, records: &[FlowRecord], stats: &FlowStats) -> Result<(), ()> {
    match sink.store(records) {
        Ok(()) => {
            FlowStats::count(&stats.flushes, 1);
            FlowStats::count(&stats.records_stored, records.len() as u64);
            if let Ok(mut last) = stats.last_store_error.lock() {
                if last.take().is_some() {
                    log::info!("flow store writes again");
                }
            }
            Ok(())
        }
        Err(e) => {
            FlowStats::count(&stats.store_failures, 1);
            crate::log_limited!(log::Level::Error, "cannot store {} flow records: {e}", records.len());
            if let Ok(mut last) = stats.last_store_error.lock() {
                *last = Some(e);
            }
            Err(())
        }
    }
}

/// The wire and storage form of one aggregated flow.
pub fn record_of(summary: &Summary) -> FlowRecord {
    let unspecified = std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
    let (src, dst, protocol, port, verdict, rule, overflow) = match summary.key {
        SummaryKey::Flow(key) => (key.src, key.dst, key.protocol, key.port, key.verdict, key.rule, false),
        SummaryKey::Other(verdict) => (unspecified, unspecified, 0, 0, verdict, 0, true),
    };
    FlowRecord {
        src,
        dst,
        protocol,
        port,
        verdict: flow_verdict(verdict),
        rule,
        count: summary.count,
        first_seen: summary.first_seen,
        last_seen: summary.last_seen,
        sampling_scale: summary.scale,
        overflow,
        packets: u64::from(summary.packets),
        // Dropped traffic: every packet is logged, so the bytes are the flow's. Accepted
        // traffic is logged while NEW only: its bytes are conntrack's to tell, known once one
        // of its connections ended with accounting on (a connection is never 0 bytes).
        bytes: (verdict == LogVerdict::Dropped || summary.bytes > 0).then_some(summary.bytes),
    }
}

fn flow_verdict(verdict: LogVerdict) -> FlowVerdict {
    match verdict {
        LogVerdict::Allowed => FlowVerdict::Allowed,
        LogVerdict::Observed => FlowVerdict::Observed,
        LogVerdict::WouldDrop => FlowVerdict::WouldDrop,
        LogVerdict::Dropped => FlowVerdict::Dropped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stores batches, failing the calls whose number (from 0) is in `fail`.
    struct FlakySink {
        fail: Vec<usize>,
        calls: usize,
        stored: Arc<Mutex<Vec<u32>>>,
    }

    impl FlowSink for FlakySink {
        fn store(&mut self, records: &[FlowRecord]) -> Result<(), String> {
            let call = self.calls;
            self.calls += 1;
            if self.fail.contains(&call) {
                return Err(format!("disk full (call {call})"));
            }
            self.stored.lock().unwrap().extend(records.iter().map(|r| r.count));
            Ok(())
        }
    }

    fn batch(count: u32) -> Vec<FlowRecord> {
        let unspecified = std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
        vec![FlowRecord {
            src: unspecified,
            dst: unspecified,
            protocol: 6,
            port: 22,
            verdict: FlowVerdict::Dropped,
            rule: 0,
            count,
            first_seen: 1,
            last_seen: 2,
            sampling_scale: 1,
            overflow: false,
            packets: 1,
            bytes: None,
        }]
    }

    /// Runs `flowstore` over `batches` (each one record whose count names it) with a sink
    /// failing the given calls; returns what was stored and the counters.
    fn run(batches: &[u32], fail: &[usize]) -> (Vec<u32>, FlowCounters) {
        let stored = Arc::new(Mutex::new(Vec::new()));
        let sink = FlakySink { fail: fail.to_vec(), calls: 0, stored: Arc::clone(&stored) };
        let stats = FlowStats::new();
        let (tx, rx) = mpsc::sync_channel(batches.len());
        for &count in batches {
            tx.send(batch(count)).unwrap();
        }
        drop(tx);
        write_flushes(&rx, Box::new(sink), &stats);
        let stored = stored.lock().unwrap().clone();
        (stored, stats.snapshot())
    }

    #[test]
    fn a_failed_flush_is_tried_again_before_the_next_one() {
        // Calls: 0 stores 1; 1 fails 2; 2 retries 2; 3 stores 3.
        let (stored, counters) = run(&[1, 2, 3], &[1]);
        assert_eq!(stored, [1, 2, 3]);
        assert_eq!((counters.flushes, counters.records_stored), (3, 3));
        assert_eq!((counters.store_failures, counters.records_dropped), (1, 0));
        assert_eq!(counters.last_store_error, None, "cleared once storing works again");
    }

    #[test]
    fn a_flush_failing_twice_is_dropped_and_counted_and_the_newest_is_kept() {
        // Calls: 0 fails 1; 1 retry of 1 fails (dropped); 2 fails 2; 3 retry of 2 stores it;
        // 4 stores 3.
        let (stored, counters) = run(&[1, 2, 3], &[0, 1, 2]);
        assert_eq!(stored, [2, 3]);
        assert_eq!((counters.store_failures, counters.records_dropped), (3, 1));
    }

    #[test]
    fn a_store_that_never_works_loses_only_what_it_cannot_hold_and_says_why() {
        let (stored, counters) = run(&[1, 2, 3], &[0, 1, 2, 3, 4, 5]);
        assert!(stored.is_empty());
        assert_eq!(counters.records_dropped, 3, "every record counted as lost");
        assert!(
            counters.last_store_error.as_deref().is_some_and(|e| e.contains("disk full")),
            "{counters:?}"
        );
    }

    #[test]
    fn records_carry_the_flow_or_the_overflow_bucket() {
        let key = super::super::FlowKey {
            src: "198.18.0.1".parse().unwrap(),
            dst: "198.18.0.2".parse().unwrap(),
            protocol: 17,
            port: 53,
            verdict: LogVerdict::WouldDrop,
            rule: 0,
        };
        let mut aggregator = Aggregator::new(1);
        aggregator.record_sampled(&key, 100, 4);
        aggregator.record(&super::super::FlowKey { port: 54, ..key }, 101);
        let records: Vec<FlowRecord> = aggregator.drain().iter().map(record_of).collect();
        let flow = records.iter().find(|r| !r.overflow).expect("the tracked flow");
        assert_eq!(
            (flow.src, flow.port, flow.verdict, flow.count, flow.sampling_scale),
            (key.src, 53, FlowVerdict::WouldDrop, 4, 4)
        );
        let overflow = records.iter().find(|r| r.overflow).expect("the overflow bucket");
        assert_eq!(
            (overflow.src.is_unspecified(), overflow.port, overflow.verdict, overflow.count),
            (true, 0, FlowVerdict::WouldDrop, 1)
        );
    }
}
