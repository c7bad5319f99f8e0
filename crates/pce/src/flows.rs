//! Flow summaries the VENs upload (`POST /ven/v1/flows`): the checks a batch passes, the
//! de-duplication by sequence number, a bounded store in memory and its append-only log
//! `DIR/flows.log`.
//!
//! Guarantees:
//! - A batch is checked whole before anything is stored ([`check_batch`]): one bad record rejects
//!   it and nothing changes.
//! - Per workload, the highest sequence number stored (its cursor) only grows. Records numbered
//!   at or below it are skipped, so a batch re-sent after a lost ack is stored once. A batch that
//!   starts past cursor + 1 (the VEN rotated unacknowledged records out) is stored, and the gap
//!   and the numbers missing are counted. Sequence numbers start at 1; cursor 0 means none yet.
//! - At most `capacity` flows ([`MAX_STORED_FLOWS`]) for the whole organisation, in the order
//!   received; the oldest go first and are counted, never a panic, never growth.
//! - Nothing is acknowledged before it is on disk: the records an upload adds are appended to the
//!   log as one entry and applied in memory, then the upload waits, outside the store's lock, for
//!   an fsync that covers its entry ([`Pending::wait`]): uploads that arrive during one fsync share
//!   the next (group commit). An upload costs O(batch) bytes of I/O.
//!   An append that fails is cut off again (or, if even that fails, the whole log is rewritten
//!   before the next append), so a failed upload leaves no half entry in front of later ones.
//! - The log is compacted (rewritten with the live flows: temp file, fsync, rename) once it holds
//!   more dead records than live ones and at least [`COMPACT_MIN_DEAD_RECORDS`]: it stays below
//!   about twice the live data plus that slack, and each compaction is paid for by at least as
//!   many appended records as it rewrites.
//! - At start the log is replayed up to the first torn or damaged entry (a crash mid-append);
//!   what follows is cut off, with a warning. Everything before it is kept.
//!
//! Log format: the 8 bytes [`MAGIC`], then entries, each a 4-byte little-endian payload length,
//! the first 8 bytes of the payload's SHA-256 and the payload: one postcard [`Entry`].

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;
use ven_proto::{FlowBatch, FlowRecord, FlowRecordV3, MAX_FLOWS_PER_BATCH};

pub const FLOWS_FILE: &str = "flows.log";
/// Flows the PCE keeps, all workloads together (about 100 bytes each in memory, at most 70 in
/// the log); the oldest received are dropped first, counted.
pub const MAX_STORED_FLOWS: usize = 1_000_000;
/// The log is compacted once it holds more dead records than live ones, and at least this many.
pub const COMPACT_MIN_DEAD_RECORDS: u64 = 200_000;
/// Start of the log file; the last byte is the format.
pub const MAGIC: &[u8; 8] = b"PCEFLOG1";
/// Largest log entry: a full batch of the largest records (84 bytes each) and a hostname fit
/// twice over.
const MAX_ENTRY_BYTES: usize = 4 * 1024 * 1024;
/// Cursors per log entry of a compacted log (at most 20 bytes each).
const CURSORS_PER_ENTRY: usize = 10_000;
const CHECKSUM_BYTES: usize = 8;
const FRAME_HEAD_BYTES: usize = 4 + CHECKSUM_BYTES;
/// Gap warnings (a VEN can cause one per upload) go out at most this often.
const GAP_WARNING_INTERVAL_S: u64 = 10;

const ICMP: u8 = 1;
const TCP: u8 = 6;
const UDP: u8 = 17;
const DCCP: u8 = 33;
const ICMPV6: u8 = 58;
const SCTP: u8 = 132;
const UDP_LITE: u8 = 136;

#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// The batch cannot be right; nothing was stored.
    #[error("{0}")]
    Rejected(String),
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "{path} is not a flow log this pce reads (it does not start with {:?})",
        String::from_utf8_lossy(MAGIC)
    )]
    Format { path: PathBuf },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// One flow as the PCE keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredFlow {
    pub workload_id: u64,
    /// The workload's hostname when it uploaded the flow (shared by the flows of one upload).
    pub hostname: Arc<str>,
    /// Unix seconds, the PCE's clock.
    pub received_at: u64,
    pub record: FlowRecord,
}

/// What an upload did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ingested {
    /// The workload's cursor afterwards: every record up to it is stored (the ack).
    pub through: u64,
    pub stored: usize,
    /// Records at or below the cursor, skipped.
    pub duplicates: usize,
    /// Sequence numbers between the cursor and the batch that never arrived.
    pub missed: u64,
}

/// Counters for the admin API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    pub stored: usize,
    pub capacity: usize,
    /// Flows dropped, oldest first, to stay within the capacity.
    pub dropped: u64,
    /// Uploads that started past their workload's cursor + 1, and the numbers they skipped.
    pub gaps: u64,
    pub missed: u64,
    /// Records skipped as stored already, since this PCE started.
    pub duplicates: u64,
    /// Workloads with a cursor.
    pub workloads: usize,
}

/// One log entry. Replaying the entries in order rebuilds the store exactly. Postcard encodes
/// the variant by index: new variants only ever go at the end, so logs written by older
/// versions stay readable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum Entry {
    /// First in a compacted log: the counters; no cursors yet.
    Header { dropped: u64, gaps: u64, missed: u64 },
    /// Cursors of a compacted log: (workload, highest sequence number stored).
    Cursors(Vec<(u64, u64)>),
    /// [`Entry::Batch`] as written before records carried packets and bytes (read only).
    BatchV3 {
        workload_id: u64,
        hostname: String,
        received_at: u64,
        through: u64,
        missed: u64,
        records: Vec<FlowRecordV3>,
    },
    /// [`Entry::Kept`] as written before records carried packets and bytes (read only).
    KeptV3 { workload_id: u64, hostname: String, received_at: u64, records: Vec<FlowRecordV3> },
    /// The workload unpaired: its cursor goes (its flows stay).
    Forget { workload_id: u64 },
    /// The records one upload added; moves the workload's cursor to `through`.
    Batch {
        workload_id: u64,
        hostname: String,
        received_at: u64,
        through: u64,
        missed: u64,
        records: Vec<FlowRecord>,
    },
    /// Flows of one upload, copied by a compaction (cursors untouched).
    Kept { workload_id: u64, hostname: String, received_at: u64, records: Vec<FlowRecord> },
}

impl Entry {
    fn records(&self) -> u64 {
        match self {
            Entry::Batch { records, .. } | Entry::Kept { records, .. } => records.len() as u64,
            Entry::BatchV3 { records, .. } | Entry::KeptV3 { records, .. } => records.len() as u64,
            Entry::Header { .. } | Entry::Cursors(_) | Entry::Forget { .. } => 0,
        }
    }

    /// The entry in this version's form: an old batch's records read with `packets = count`
    /// and bytes unknown.
    fn upgraded(self) -> Entry {
        let upgrade = |records: Vec<FlowRecordV3>| records.into_iter().map(FlowRecord::from).collect();
        match self {
            Entry::BatchV3 { workload_id, hostname, received_at, through, missed, records } => Entry::Batch {
                workload_id,
                hostname,
                received_at,
                through,
                missed,
                records: upgrade(records),
            },
            Entry::KeptV3 { workload_id, hostname, received_at, records } => {
                Entry::Kept { workload_id, hostname, received_at, records: upgrade(records) }
            }
            entry => entry,
        }
    }
}

/// The open log file.
struct Log {
    path: PathBuf,
    /// Opened for appending.
    file: File,
    /// The fsyncs of this file, which uploads wait for outside the store's lock.
    sync: Arc<SyncPoint>,
    /// Bytes of whole, valid entries (with the magic): where the next entry goes.
    len: u64,
    /// Flow records in the file, live or dropped since.
    records: u64,
    /// An append failed and could not be cut off: rewrite the whole log before the next one.
    broken: bool,
}

/// Group commit of one log file: how far it is written and how far synced. An upload's entry is
/// durable once `synced` reaches the end of its entry; whoever syncs covers every entry written
/// before, so uploads that wait meanwhile share one fsync.
struct SyncPoint {
    path: PathBuf,
    /// A second handle of the log file (fsync covers the file, whichever handle calls it).
    file: File,
    written: AtomicU64,
    /// Held during an fsync: the uploads behind it wait, then find their entry covered.
    synced: Mutex<u64>,
    /// An fsync failed: what was written since the last good one may be lost, so the store
    /// rewrites the whole log before its next append.
    failed: AtomicBool,
}

impl SyncPoint {
    fn new(path: &Path, file: &File, len: u64) -> io::Result<Arc<Self>> {
        Ok(Arc::new(SyncPoint {
            path: path.to_path_buf(),
            file: file.try_clone()?,
            written: AtomicU64::new(len),
            synced: Mutex::new(len),
            failed: AtomicBool::new(false),
        }))
    }
}

/// An appended entry not yet known to be on disk: [`Pending::wait`] before acknowledging it.
#[must_use = "an upload is acknowledged only after its entry is on disk"]
pub struct Pending {
    point: Option<Arc<SyncPoint>>,
    upto: u64,
}

impl Pending {
    /// Nothing to wait for (an in-memory store, or nothing appended).
    fn done() -> Self {
        Pending { point: None, upto: 0 }
    }

    /// Returns once the entry is on disk: at once when an fsync since covered it, else after an
    /// fsync of everything written so far.
    pub fn wait(self) -> Result<(), FlowError> {
        let Some(point) = self.point else { return Ok(()) };
        let mut synced = point.synced.lock().unwrap_or_else(PoisonError::into_inner);
        if *synced >= self.upto {
            return Ok(());
        }
        let target = point.written.load(Ordering::Acquire);
        match point.file.sync_data() {
            Ok(()) => {
                *synced = target.max(*synced);
                Ok(())
            }
            Err(source) => {
                point.failed.store(true, Ordering::Release);
                Err(FlowError::Write { path: point.path.clone(), source })
            }
        }
    }
}

pub struct FlowStore {
    capacity: usize,
    compact_min: u64,
    /// Oldest received first.
    flows: VecDeque<StoredFlow>,
    cursors: BTreeMap<u64, u64>,
    dropped: u64,
    gaps: u64,
    missed: u64,
    duplicates: u64,
    /// None: in memory only (tests, fuzzing).
    log: Option<Log>,
    last_gap_warning: u64,
}

impl FlowStore {
    /// Opens `dir/flows.log` (created when missing) with the production bounds.
    pub fn open(dir: &Path) -> Result<Self, FlowError> {
        Self::open_with(dir, MAX_STORED_FLOWS, COMPACT_MIN_DEAD_RECORDS)
    }

    /// Opens `dir/flows.log` with the given capacity and compaction slack, replaying it.
    pub fn open_with(dir: &Path, capacity: usize, compact_min: u64) -> Result<Self, FlowError> {
        let path = dir.join(FLOWS_FILE);
        let mut store = Self::in_memory(capacity);
        store.compact_min = compact_min;
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let len = store
                    .write_snapshot(&path)
                    .map_err(|source| FlowError::Write { path: path.clone(), source })?;
                let file =
                    open_append(&path).map_err(|source| FlowError::Write { path: path.clone(), source })?;
                let sync = SyncPoint::new(&path, &file, len)
                    .map_err(|source| FlowError::Write { path: path.clone(), source })?;
                store.log = Some(Log { path, file, sync, len, records: 0, broken: false });
                return Ok(store);
            }
            Err(source) => return Err(FlowError::Read { path, source }),
        };
        let Some(entries) = bytes.strip_prefix(MAGIC.as_slice()) else {
            return Err(FlowError::Format { path });
        };
        let (good, records) = store.replay(entries);
        let len = (MAGIC.len() + good) as u64;
        let file = open_append(&path).map_err(|source| FlowError::Write { path: path.clone(), source })?;
        if good < entries.len() {
            log::warn!(
                "{}: {} bytes after offset {len} are torn or damaged (a crash mid-write?); cut off, \
                 the {} flows before them are kept",
                path.display(),
                entries.len() - good,
                store.flows.len()
            );
            file.set_len(len)
                .and_then(|()| file.sync_all())
                .map_err(|source| FlowError::Write { path: path.clone(), source })?;
        }
        let sync = SyncPoint::new(&path, &file, len)
            .map_err(|source| FlowError::Write { path: path.clone(), source })?;
        store.log = Some(Log { path, file, sync, len, records, broken: false });
        Ok(store)
    }

    /// A store without a log (tests and fuzzing).
    pub fn in_memory(capacity: usize) -> Self {
        FlowStore {
            capacity,
            compact_min: COMPACT_MIN_DEAD_RECORDS,
            flows: VecDeque::new(),
            cursors: BTreeMap::new(),
            dropped: 0,
            gaps: 0,
            missed: 0,
            duplicates: 0,
            log: None,
            last_gap_warning: 0,
        }
    }

    /// The stored flows, oldest received first.
    pub fn flows(&self) -> &VecDeque<StoredFlow> {
        &self.flows
    }

    /// The highest sequence number stored for a workload (0: none).
    pub fn cursor(&self, workload_id: u64) -> u64 {
        self.cursors.get(&workload_id).copied().unwrap_or(0)
    }

    pub fn stats(&self) -> FlowStats {
        FlowStats {
            stored: self.flows.len(),
            capacity: self.capacity,
            dropped: self.dropped,
            gaps: self.gaps,
            missed: self.missed,
            duplicates: self.duplicates,
            workloads: self.cursors.len(),
        }
    }

    /// Stores the records of `batch` above the workload's cursor, received at `now`, durably.
    /// Rejects a batch [`check_batch`] refuses; fails, storing nothing, when the log cannot be
    /// written.
    pub fn ingest(
        &mut self,
        workload_id: u64,
        hostname: &str,
        batch: FlowBatch,
        now: u64,
    ) -> Result<Ingested, FlowError> {
        let (ingested, pending) = self.ingest_deferred(workload_id, hostname, batch, now)?;
        pending.wait()?;
        Ok(ingested)
    }

    /// [`FlowStore::ingest`] without the wait for the disk: the caller releases the store and
    /// then waits on the [`Pending`] before acknowledging (group commit).
    pub fn ingest_deferred(
        &mut self,
        workload_id: u64,
        hostname: &str,
        batch: FlowBatch,
        now: u64,
    ) -> Result<(Ingested, Pending), FlowError> {
        check_batch(&batch).map_err(FlowError::Rejected)?;
        let cursor = self.cursor(workload_id);
        let FlowBatch { first, mut records } = batch;
        let total = records.len();
        let duplicates = if first > cursor {
            0
        } else {
            usize::try_from(cursor - first).map_or(total, |n| n.saturating_add(1).min(total))
        };
        if duplicates == total {
            self.duplicates = self.duplicates.saturating_add(duplicates as u64);
            return Ok((Ingested { through: cursor, stored: 0, duplicates, missed: 0 }, Pending::done()));
        }
        records.drain(..duplicates);
        // check_batch: first >= 1 and the last number fits.
        let through = first + (total as u64 - 1);
        let missed = first.saturating_sub(cursor.saturating_add(1));
        let stored = records.len();
        let entry = Entry::Batch {
            workload_id,
            hostname: hostname.to_string(),
            received_at: now,
            through,
            missed,
            records,
        };
        let pending = self.append(&entry)?;
        self.apply(entry);
        self.duplicates = self.duplicates.saturating_add(duplicates as u64);
        if missed > 0 && now >= self.last_gap_warning.saturating_add(GAP_WARNING_INTERVAL_S) {
            self.last_gap_warning = now;
            log::warn!(
                "workload {workload_id} ({hostname:?}): flow records {}..={} never arrived (the VEN \
                 dropped them unsent); gaps so far: {}",
                first - missed,
                first - 1,
                self.gaps
            );
        }
        self.compact_if_due();
        Ok((Ingested { through, stored, duplicates, missed }, pending))
    }

    /// Drops a workload's cursor (it unpaired and can upload no more); its flows stay.
    pub fn forget(&mut self, workload_id: u64) -> Result<(), FlowError> {
        if !self.cursors.contains_key(&workload_id) {
            return Ok(());
        }
        let entry = Entry::Forget { workload_id };
        let pending = self.append(&entry)?;
        self.apply(entry);
        pending.wait()
    }

    /// Applies entries from `bytes` (a log after its magic) until the end or the first torn or
    /// damaged entry. Returns the length of the whole entries and the records they hold.
    fn replay(&mut self, bytes: &[u8]) -> (usize, u64) {
        let (mut offset, mut records) = (0, 0u64);
        while let Some((entry, used)) = bytes.get(offset..).and_then(next_entry) {
            records = records.saturating_add(entry.records());
            self.apply(entry);
            offset += used;
        }
        (offset, records)
    }

    /// Applies an entry written (or read back) from the log. Never fails.
    fn apply(&mut self, entry: Entry) {
        match entry {
            Entry::Header { dropped, gaps, missed } => {
                (self.dropped, self.gaps, self.missed) = (dropped, gaps, missed);
                self.cursors.clear();
            }
            Entry::Cursors(cursors) => self.cursors.extend(cursors),
            Entry::Batch { workload_id, hostname, received_at, through, missed, records } => {
                let cursor = self.cursors.entry(workload_id).or_insert(0);
                *cursor = (*cursor).max(through);
                if missed > 0 {
                    self.gaps = self.gaps.saturating_add(1);
                    self.missed = self.missed.saturating_add(missed);
                }
                self.push(workload_id, &hostname, received_at, records);
            }
            Entry::Kept { workload_id, hostname, received_at, records } => {
                self.push(workload_id, &hostname, received_at, records)
            }
            Entry::Forget { workload_id } => {
                self.cursors.remove(&workload_id);
            }
            old @ (Entry::BatchV3 { .. } | Entry::KeptV3 { .. }) => self.apply(old.upgraded()),
        }
    }

    fn push(&mut self, workload_id: u64, hostname: &str, received_at: u64, records: Vec<FlowRecord>) {
        let hostname: Arc<str> = Arc::from(hostname);
        for record in records {
            self.flows.push_back(StoredFlow { workload_id, hostname: hostname.clone(), received_at, record });
            if self.flows.len() > self.capacity {
                self.flows.pop_front();
                self.dropped = self.dropped.saturating_add(1);
            }
        }
    }

    /// Appends an entry; it is on disk once the returned [`Pending`] is waited for. On failure
    /// nothing of it remains in the log's valid part.
    fn append(&mut self, entry: &Entry) -> Result<Pending, FlowError> {
        match &self.log {
            None => return Ok(Pending::done()),
            Some(log) if log.broken || log.sync.failed.load(Ordering::Acquire) => self.compact()?,
            Some(_) => {}
        }
        let Some(log) = self.log.as_mut() else { return Ok(Pending::done()) };
        let frame = frame(entry);
        match log.file.write_all(&frame) {
            Ok(()) => {
                log.len += frame.len() as u64;
                log.records = log.records.saturating_add(entry.records());
                log.sync.written.store(log.len, Ordering::Release);
                Ok(Pending { point: Some(log.sync.clone()), upto: log.len })
            }
            Err(source) => {
                // Take back a partial entry, so that the next ones stay readable.
                if log.file.set_len(log.len).and_then(|()| log.file.sync_data()).is_err() {
                    log.broken = true;
                }
                Err(FlowError::Write { path: log.path.clone(), source })
            }
        }
    }

    fn compact_if_due(&mut self) {
        let Some(log) = &self.log else { return };
        let live = self.flows.len() as u64;
        if log.records.saturating_sub(live) <= live.max(self.compact_min) {
            return;
        }
        let started = Instant::now();
        match self.compact() {
            Ok(()) => log::info!("flow log compacted to {live} flows in {:?}", started.elapsed()),
            Err(e) => log::error!("compacting the flow log: {e} (tried again after the next upload)"),
        }
    }

    /// Rewrites the log with what the store holds now and reopens it.
    fn compact(&mut self) -> Result<(), FlowError> {
        let Some(path) = self.log.as_ref().map(|log| log.path.clone()) else { return Ok(()) };
        let written = self.write_snapshot(&path);
        let live = self.flows.len() as u64;
        let Some(log) = self.log.as_mut() else { return Ok(()) };
        let len = written.map_err(|source| FlowError::Write { path: path.clone(), source })?;
        // The rename replaced the file: the old handle points to the unlinked one. The new file
        // is on disk whole (the snapshot was synced).
        match open_append(&path).and_then(|file| Ok((SyncPoint::new(&path, &file, len)?, file))) {
            Ok((sync, file)) => {
                *log = Log { path, file, sync, len, records: live, broken: false };
                Ok(())
            }
            Err(source) => {
                log.broken = true;
                Err(FlowError::Write { path, source })
            }
        }
    }

    /// Writes the store as a compacted log to `path` (temp file, fsync, rename, directory fsync);
    /// returns its length.
    fn write_snapshot(&self, path: &Path) -> io::Result<u64> {
        let len = crate::fsutil::replace_file(path, 0o600, |file| {
            let mut out = BufWriter::new(file);
            let len = self.snapshot_to(&mut out)?;
            out.flush()?;
            Ok(len)
        })?;
        if let Err(e) = crate::fsutil::sync_parent(path) {
            // Old or new, either file is whole; only the rename's durability is in doubt.
            log::warn!("syncing the directory of {} after compacting the flow log: {e}", path.display());
        }
        Ok(len)
    }

    /// The store as a compacted log: magic, header, cursors, then the flows by upload.
    fn snapshot_to<W: Write>(&self, out: &mut W) -> io::Result<u64> {
        out.write_all(MAGIC)?;
        let mut len = MAGIC.len() as u64;
        let mut write = |out: &mut W, entry: &Entry| -> io::Result<()> {
            let frame = frame(entry);
            len += frame.len() as u64;
            out.write_all(&frame)
        };
        write(out, &Entry::Header { dropped: self.dropped, gaps: self.gaps, missed: self.missed })?;
        let cursors: Vec<(u64, u64)> = self.cursors.iter().map(|(id, seq)| (*id, *seq)).collect();
        for chunk in cursors.chunks(CURSORS_PER_ENTRY) {
            write(out, &Entry::Cursors(chunk.to_vec()))?;
        }
        let kept = |head: &StoredFlow, records: Vec<FlowRecord>| Entry::Kept {
            workload_id: head.workload_id,
            hostname: head.hostname.to_string(),
            received_at: head.received_at,
            records,
        };
        let mut run: Vec<FlowRecord> = Vec::new();
        let mut head: Option<&StoredFlow> = None;
        for flow in &self.flows {
            let same_upload = head.is_some_and(|head| {
                head.workload_id == flow.workload_id
                    && head.received_at == flow.received_at
                    && Arc::ptr_eq(&head.hostname, &flow.hostname)
            });
            if !same_upload || run.len() >= MAX_FLOWS_PER_BATCH {
                if let Some(head) = head {
                    write(out, &kept(head, std::mem::take(&mut run)))?;
                }
                head = Some(flow);
            }
            run.push(flow.record);
        }
        if let Some(head) = head {
            write(out, &kept(head, run))?;
        }
        Ok(len)
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().append(true).open(path)
}

fn checksum(payload: &[u8]) -> [u8; CHECKSUM_BYTES] {
    let digest = ring::digest::digest(&ring::digest::SHA256, payload);
    let mut sum = [0u8; CHECKSUM_BYTES];
    sum.copy_from_slice(&digest.as_ref()[..CHECKSUM_BYTES]);
    sum
}

fn frame(entry: &Entry) -> Vec<u8> {
    frame_payload(&ven_proto::encode(entry))
}

fn frame_payload(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEAD_BYTES + payload.len());
    // Entries are far below 4 GiB (a batch is at most MAX_FLOWS_PER_BATCH records).
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&checksum(payload));
    out.extend_from_slice(payload);
    out
}

/// The entry at the start of `bytes` and its length; None at the end or when torn or damaged.
fn next_entry(bytes: &[u8]) -> Option<(Entry, usize)> {
    let head = bytes.get(..FRAME_HEAD_BYTES)?;
    let len = usize::try_from(u32::from_le_bytes([head[0], head[1], head[2], head[3]])).ok()?;
    if len > MAX_ENTRY_BYTES {
        return None;
    }
    let payload = bytes.get(FRAME_HEAD_BYTES..FRAME_HEAD_BYTES + len)?;
    if checksum(payload) != head[4..] {
        return None;
    }
    let entry = ven_proto::decode(payload).ok()?;
    Some((entry, FRAME_HEAD_BYTES + len))
}

/// Checks a batch from a VEN: at most [`MAX_FLOWS_PER_BATCH`] records, sequence numbers from 1
/// that fit in 64 bits, and records that can be ([`check_record`]). An empty batch is fine (it
/// asks for the cursor).
pub fn check_batch(batch: &FlowBatch) -> Result<(), String> {
    let count = batch.records.len();
    if count > MAX_FLOWS_PER_BATCH {
        return Err(format!("{count} flow records in one batch; the limit is {MAX_FLOWS_PER_BATCH}"));
    }
    if count == 0 {
        return Ok(());
    }
    if batch.first == 0 {
        return Err("flow sequence numbers start at 1; this batch starts at 0".to_string());
    }
    if batch.first.checked_add(count as u64 - 1).is_none() {
        return Err(format!("a batch of {count} records from sequence number {} passes 2^64", batch.first));
    }
    for (index, record) in batch.records.iter().enumerate() {
        check_record(record).map_err(|e| {
            format!("flow record {index} (sequence number {}): {e}", batch.first + index as u64)
        })?;
    }
    Ok(())
}

/// What a record cannot be: seen last before first; source and destination of different
/// families; a port on a protocol without ports; an ICMP type above 255; ICMP over IPv6 or
/// ICMPv6 over IPv4. Overflow records (addresses unspecified) are held to the time and port
/// rules only. Counts, rules and sampling scales are taken as they come.
pub fn check_record(record: &FlowRecord) -> Result<(), String> {
    if record.first_seen > record.last_seen {
        return Err(format!("first_seen {} is after last_seen {}", record.first_seen, record.last_seen));
    }
    match record.protocol {
        TCP | UDP | DCCP | SCTP | UDP_LITE => {}
        ICMP | ICMPV6 if record.port > 255 => {
            return Err(format!("ICMP type {} is above 255", record.port));
        }
        ICMP | ICMPV6 => {}
        protocol if record.port != 0 => {
            return Err(format!("protocol {protocol} has no ports, yet port {} is given", record.port));
        }
        _ => {}
    }
    if record.overflow {
        return Ok(());
    }
    let family = |addr: IpAddr| if addr.is_ipv4() { "IPv4" } else { "IPv6" };
    if record.src.is_ipv4() != record.dst.is_ipv4() {
        return Err(format!(
            "source {} is {} but destination {} is {}",
            record.src,
            family(record.src),
            record.dst,
            family(record.dst)
        ));
    }
    match record.protocol {
        ICMP if !record.src.is_ipv4() => Err("ICMP (protocol 1) over IPv6; ICMPv6 is 58".to_string()),
        ICMPV6 if record.src.is_ipv4() => Err("ICMPv6 (protocol 58) over IPv4; ICMP is 1".to_string()),
        _ => Ok(()),
    }
}

/// Fuzzing: decodes `data` as a [`FlowBatch`] and uploads it twice to a small store in memory; the
/// second upload must store nothing and answer the same ack, the bound must hold. Returns the
/// store holding it, for a query to run over (`crate::fuzzing::flow_batch`).
#[doc(hidden)]
pub fn fuzz_flow_batch(data: &[u8]) -> Option<FlowStore> {
    const CAPACITY: usize = 64;
    let Ok(batch) = ven_proto::decode::<FlowBatch>(data) else { return None };
    let mut store = FlowStore::in_memory(CAPACITY);
    match store.ingest(7, "fuzz", batch.clone(), 1) {
        Ok(first) => {
            assert!(store.flows.len() <= CAPACITY);
            assert_eq!(store.cursor(7), first.through);
            let again = store.ingest(7, "fuzz", batch, 2).expect("a batch accepted once is accepted again");
            assert_eq!((again.through, again.stored, again.missed), (first.through, 0, 0));
        }
        Err(FlowError::Rejected(_)) => assert!(store.flows.is_empty() && store.cursors.is_empty()),
        Err(other) => panic!("an in-memory upload failed: {other}"),
    }
    Some(store)
}

/// Fuzzing: replays `data` as a flow log (after its magic), and as the payload of one entry with
/// a valid checksum (random bytes rarely pass one); what was read must survive a compaction and a
/// replay of it unchanged.
#[doc(hidden)]
pub fn fuzz_flow_log(data: &[u8]) {
    const CAPACITY: usize = 64;
    for log in [data.to_vec(), frame_payload(data)] {
        let mut store = FlowStore::in_memory(CAPACITY);
        let (good, _) = store.replay(&log);
        assert!(good <= log.len() && store.flows.len() <= CAPACITY);
        let mut compacted = Vec::new();
        store.snapshot_to(&mut compacted).expect("writing into memory");
        let mut again = FlowStore::in_memory(CAPACITY);
        let (read, _) = again.replay(&compacted[MAGIC.len()..]);
        assert_eq!(read, compacted.len() - MAGIC.len(), "a compacted log reads back whole");
        assert_eq!(again.flows, store.flows);
        assert_eq!(again.cursors, store.cursors);
        assert_eq!(again.stats(), FlowStats { duplicates: 0, ..store.stats() });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::fsutil::scratch_dir;
    use std::os::unix::fs::PermissionsExt;
    use ven_proto::FlowVerdict;

    /// A TCP flow from `src` to `dst`:`port`, seen at `at`.
    pub(crate) fn record(src: &str, dst: &str, port: u16, at: u32) -> FlowRecord {
        FlowRecord {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol: TCP,
            port,
            verdict: FlowVerdict::Allowed,
            rule: 1,
            count: 1,
            first_seen: at,
            last_seen: at + 5,
            sampling_scale: 1,
            overflow: false,
            packets: 1,
            bytes: None,
        }
    }

    /// `n` records numbered from `first`, with ports 1000 + their sequence number.
    fn batch(first: u64, n: u64) -> FlowBatch {
        let records = (first..first + n)
            .map(|seq| record("198.18.0.2", "198.18.0.3", 1000 + seq as u16, 100))
            .collect();
        FlowBatch { first, records }
    }

    fn ports(store: &FlowStore) -> Vec<u16> {
        store.flows().iter().map(|flow| flow.record.port).collect()
    }

    #[test]
    fn records_that_cannot_be_are_rejected() {
        let ok = record("198.18.0.2", "198.18.0.3", 443, 100);
        assert_eq!(check_record(&ok), Ok(()));
        let bad = |change: &dyn Fn(&mut FlowRecord)| {
            let mut record = ok;
            change(&mut record);
            check_record(&record).unwrap_err()
        };
        assert!(bad(&|r| r.last_seen = 99).contains("first_seen 100 is after last_seen 99"));
        assert!(bad(&|r| r.dst = "2001:db8::3".parse().unwrap()).contains("is IPv4 but destination"));
        assert!(bad(&|r| r.protocol = 47).contains("protocol 47 has no ports, yet port 443"));
        assert!(bad(&|r| r.protocol = ICMP).contains("ICMP type 443 is above 255"));
        let v6 = |r: &mut FlowRecord| {
            r.src = "2001:db8::2".parse().unwrap();
            r.dst = "2001:db8::3".parse().unwrap();
            r.port = 128;
        };
        assert!(
            bad(&|r| {
                v6(r);
                r.protocol = ICMP;
            })
            .contains("ICMP (protocol 1) over IPv6")
        );
        assert!(
            bad(&|r| {
                r.protocol = ICMPV6;
                r.port = 8;
            })
            .contains("ICMPv6 (protocol 58) over IPv4")
        );

        // What can be: ICMP echo, ICMPv6 echo, GRE without a port, SCTP with one, an overflow
        // record, zero counts and scales (taken as they come).
        let fine = |change: &dyn Fn(&mut FlowRecord)| {
            let mut record = ok;
            change(&mut record);
            check_record(&record)
        };
        assert_eq!(
            fine(&|r| {
                r.protocol = ICMP;
                r.port = 8;
            }),
            Ok(())
        );
        assert_eq!(
            fine(&|r| {
                v6(r);
                r.protocol = ICMPV6;
            }),
            Ok(())
        );
        assert_eq!(
            fine(&|r| {
                r.protocol = 47;
                r.port = 0;
            }),
            Ok(())
        );
        assert_eq!(fine(&|r| r.protocol = SCTP), Ok(()));
        assert_eq!(
            fine(&|r| {
                r.overflow = true;
                r.src = "0.0.0.0".parse().unwrap();
                r.dst = "::".parse().unwrap();
                r.protocol = 0;
                r.port = 0;
            }),
            Ok(())
        );
        assert_eq!(
            fine(&|r| {
                r.count = 0;
                r.sampling_scale = 0;
            }),
            Ok(())
        );
    }

    #[test]
    fn batches_are_checked_whole() {
        assert_eq!(
            check_batch(&FlowBatch { first: 0, records: vec![] }),
            Ok(()),
            "empty asks for the cursor"
        );
        assert!(check_batch(&batch(0, 1)).unwrap_err().contains("start at 1"));
        let past = FlowBatch { first: u64::MAX, records: batch(1, 2).records };
        assert!(check_batch(&past).unwrap_err().contains("passes 2^64"));
        assert_eq!(check_batch(&FlowBatch { first: u64::MAX, records: batch(1, 1).records }), Ok(()));
        let too_many = FlowBatch { first: 1, records: vec![batch(1, 1).records[0]; MAX_FLOWS_PER_BATCH + 1] };
        assert!(
            check_batch(&too_many)
                .unwrap_err()
                .contains("20001 flow records in one batch; the limit is 20000")
        );
        let mut one_bad = batch(5, 3);
        one_bad.records[2].first_seen = 1000;
        assert!(
            check_batch(&one_bad).unwrap_err().starts_with("flow record 2 (sequence number 7): first_seen")
        );

        let mut store = FlowStore::in_memory(10);
        store.ingest(1, "web", batch(1, 2), 50).unwrap();
        assert!(matches!(store.ingest(1, "web", one_bad, 51), Err(FlowError::Rejected(_))));
        assert_eq!((store.cursor(1), store.flows().len()), (2, 2), "a rejected batch changes nothing");
    }

    #[test]
    fn re_sent_and_overlapping_batches_are_stored_once() {
        let mut store = FlowStore::in_memory(100);
        let first = store.ingest(1, "web", batch(1, 3), 50).unwrap();
        assert_eq!(first, Ingested { through: 3, stored: 3, duplicates: 0, missed: 0 });
        let again = store.ingest(1, "web", batch(1, 3), 51).unwrap();
        assert_eq!(again, Ingested { through: 3, stored: 0, duplicates: 3, missed: 0 });
        let overlap = store.ingest(1, "web", batch(2, 4), 52).unwrap();
        assert_eq!(overlap, Ingested { through: 5, stored: 2, duplicates: 2, missed: 0 });
        assert_eq!(ports(&store), [1001, 1002, 1003, 1004, 1005]);
        let asked = store.ingest(1, "web", FlowBatch { first: 0, records: vec![] }, 53).unwrap();
        assert_eq!(asked.through, 5, "an empty batch answers the cursor");
        // Cursors are per workload.
        assert_eq!(store.ingest(2, "db", batch(1, 1), 54).unwrap().through, 1);
        assert_eq!((store.cursor(1), store.cursor(2), store.cursor(3)), (5, 1, 0));
        assert_eq!(store.stats().duplicates, 5);
        let received: Vec<u64> = store.flows().iter().map(|flow| flow.received_at).collect();
        assert_eq!(received, [50, 50, 50, 52, 52, 54]);
        assert_eq!(&*store.flows()[5].hostname, "db");
    }

    #[test]
    fn gaps_are_accepted_and_counted() {
        let mut store = FlowStore::in_memory(100);
        store.ingest(1, "web", batch(1, 2), 50).unwrap();
        let gap = store.ingest(1, "web", batch(10, 2), 51).unwrap();
        assert_eq!(gap, Ingested { through: 11, stored: 2, duplicates: 0, missed: 7 });
        // A first upload that does not start at 1 is a gap too: the VEN lost its oldest records.
        assert_eq!(store.ingest(2, "db", batch(4, 1), 52).unwrap().missed, 3);
        let stats = store.stats();
        assert_eq!((stats.gaps, stats.missed, stats.stored, stats.workloads), (2, 10, 5, 2));
    }

    #[test]
    fn the_capacity_drops_the_oldest_and_counts_them() {
        let dir = scratch_dir("flows-capacity");
        let mut store = FlowStore::open_with(&dir, 5, 1000).unwrap();
        store.ingest(1, "web", batch(1, 4), 50).unwrap();
        store.ingest(2, "db", batch(1, 3), 51).unwrap();
        assert_eq!(ports(&store), [1003, 1004, 1001, 1002, 1003]);
        assert_eq!(store.stats().dropped, 2);
        // A batch larger than the whole store keeps its newest records.
        store.ingest(1, "web", batch(5, 7), 52).unwrap();
        assert_eq!(ports(&store), [1007, 1008, 1009, 1010, 1011]);
        assert_eq!((store.stats().dropped, store.cursor(1)), (9, 11));
        let (flows, stats) = (store.flows().clone(), store.stats());
        drop(store);
        let reopened = FlowStore::open_with(&dir, 5, 1000).unwrap();
        assert_eq!((reopened.flows(), reopened.stats()), (&flows, FlowStats { duplicates: 0, ..stats }));
    }

    #[test]
    fn one_fsync_covers_the_uploads_appended_before_it() {
        let dir = scratch_dir("flows-group-commit");
        let mut store = FlowStore::open_with(&dir, 100, 1000).unwrap();
        let (first, pending_first) = store.ingest_deferred(1, "web", batch(1, 3), 50).unwrap();
        let (second, pending_second) = store.ingest_deferred(2, "db", batch(1, 2), 51).unwrap();
        assert_eq!((first.through, second.through), (3, 2));
        let upto_first = pending_first.upto;
        assert!(upto_first < pending_second.upto);
        // The later upload's fsync covers the earlier one, whose wait then syncs nothing.
        pending_second.wait().unwrap();
        let point = store.log.as_ref().unwrap().sync.clone();
        assert!(*point.synced.lock().unwrap() >= upto_first);
        pending_first.wait().unwrap();
        let (duplicate, nothing) = store.ingest_deferred(1, "web", batch(1, 3), 52).unwrap();
        assert_eq!(
            (duplicate.stored, nothing.point.is_none()),
            (0, true),
            "nothing appended, nothing to wait for"
        );
        drop(store);
        let store = FlowStore::open_with(&dir, 100, 1000).unwrap();
        assert_eq!(store.flows().len(), 5);
        assert_eq!((store.cursor(1), store.cursor(2)), (3, 2));
    }

    #[test]
    fn flows_and_cursors_survive_a_reopen_and_a_compaction() {
        let dir = scratch_dir("flows-reopen");
        let path = dir.join(FLOWS_FILE);
        let mut store = FlowStore::open_with(&dir, 6, 4).unwrap();
        let empty = fs::metadata(&path).unwrap();
        assert_eq!(
            (empty.len(), empty.permissions().mode() & 0o777),
            (MAGIC.len() as u64 + 12 + 4, 0o600),
            "magic and an empty header"
        );
        store.ingest(1, "web", batch(1, 4), 50).unwrap();
        store.ingest(2, "db", batch(3, 2), 51).unwrap();
        store.forget(2).unwrap();
        store.ingest(3, "lb", batch(1, 2), 52).unwrap();
        // 8 records in the log, 6 live: not yet more dead than live.
        let before = fs::metadata(&path).unwrap().len();
        let (flows, cursors, stats) = (store.flows().clone(), store.cursors.clone(), store.stats());
        assert_eq!(cursors.into_iter().collect::<Vec<_>>(), [(1, 4), (3, 2)]);
        drop(store);

        let mut store = FlowStore::open_with(&dir, 6, 4).unwrap();
        assert_eq!(store.flows(), &flows);
        assert_eq!(store.stats(), FlowStats { duplicates: 0, ..stats });
        assert_eq!(store.ingest(1, "web", batch(1, 4), 60).unwrap().stored, 0, "cursor kept");
        assert_eq!(store.log.as_ref().unwrap().records, 8);
        // 6 more: 14 in the log, 6 live, 8 dead > max(6, 4): compacted.
        store.ingest(1, "web", batch(5, 6), 61).unwrap();
        let log = store.log.as_ref().unwrap();
        assert_eq!((log.records, log.len), (6, fs::metadata(&path).unwrap().len()));
        assert!(log.len < before + 6 * 30);
        let (flows, cursors, stats) = (store.flows().clone(), store.cursors.clone(), store.stats());
        store.ingest(3, "lb", batch(3, 1), 62).unwrap();
        assert_eq!(store.flows().len(), 6);
        let (flows_after, cursors_after, stats_after) =
            (store.flows().clone(), store.cursors.clone(), store.stats());
        drop(store);

        let store = FlowStore::open_with(&dir, 6, 4).unwrap();
        assert_eq!(store.flows(), &flows_after);
        assert_eq!(store.cursors, cursors_after);
        assert_eq!(store.stats(), FlowStats { duplicates: 0, ..stats_after });
        assert_ne!(flows, flows_after);
        assert_eq!(cursors.get(&2), None, "forgotten before the compaction, not brought back");
        assert_eq!(stats.dropped + 1, stats_after.dropped);
        assert!(!dir.join("flows.log.tmp").exists());
    }

    #[test]
    fn a_torn_or_damaged_tail_is_cut_off_and_the_rest_kept() {
        let dir = scratch_dir("flows-torn");
        let path = dir.join(FLOWS_FILE);
        let mut store = FlowStore::open_with(&dir, 100, 1000).unwrap();
        store.ingest(1, "web", batch(1, 3), 50).unwrap();
        let good = fs::metadata(&path).unwrap().len();
        store.ingest(1, "web", batch(4, 3), 51).unwrap();
        drop(store);

        // A crash mid-append: the second entry is cut short.
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 7]).unwrap();
        let mut store = FlowStore::open_with(&dir, 100, 1000).unwrap();
        assert_eq!((ports(&store), store.cursor(1)), (vec![1001, 1002, 1003], 3));
        assert_eq!(fs::metadata(&path).unwrap().len(), good, "the torn entry is cut off");
        // Appends go on after the cut, and read back.
        assert_eq!(
            store.ingest(1, "web", batch(4, 3), 52).unwrap().stored,
            3,
            "the VEN re-sends what was lost"
        );
        drop(store);
        let store = FlowStore::open_with(&dir, 100, 1000).unwrap();
        assert_eq!(store.flows().len(), 6);
        drop(store);

        // A flipped bit in the last entry's payload: its checksum fails, it and what follows go.
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        let store = FlowStore::open_with(&dir, 100, 1000).unwrap();
        assert_eq!((store.flows().len(), store.cursor(1)), (3, 3));
    }

    #[test]
    fn a_foreign_file_is_an_error_and_kept() {
        let dir = scratch_dir("flows-foreign");
        fs::write(dir.join(FLOWS_FILE), b"{\"not\": \"ours\"}").unwrap();
        assert!(matches!(FlowStore::open(&dir), Err(FlowError::Format { .. })));
        assert_eq!(fs::read(dir.join(FLOWS_FILE)).unwrap(), b"{\"not\": \"ours\"}");
    }

    #[test]
    fn a_failed_append_stores_nothing() {
        let dir = scratch_dir("flows-readonly");
        let mut store = FlowStore::open_with(&dir, 100, 1000).unwrap();
        store.ingest(1, "web", batch(1, 1), 50).unwrap();
        // Swap the handle for a read-only one: writes fail as on a full disk.
        let log = store.log.as_mut().unwrap();
        log.file = File::open(&log.path).unwrap();
        assert!(matches!(store.ingest(1, "web", batch(2, 2), 51), Err(FlowError::Write { .. })));
        assert_eq!((store.cursor(1), store.flows().len()), (1, 1));
        // The next append rewrites the log first, since the failed one could not be cut off.
        assert!(store.log.as_ref().unwrap().broken);
        assert_eq!(store.ingest(1, "web", batch(2, 2), 52).unwrap().through, 3);
        drop(store);
        assert_eq!(FlowStore::open_with(&dir, 100, 1000).unwrap().cursor(1), 3);
    }

    #[test]
    fn fuzz_entry_points_hold_their_invariants_on_sample_input() {
        fuzz_flow_batch(&ven_proto::encode(&batch(1, 3)));
        fuzz_flow_batch(&ven_proto::encode(&batch(0, 3)));
        fuzz_flow_batch(b"\x01\x02garbage");
        let mut store = FlowStore::in_memory(100);
        store.ingest(1, "web", batch(1, 3), 50).unwrap();
        store.ingest(2, "db", batch(9, 2), 51).unwrap();
        let mut log = Vec::new();
        store.snapshot_to(&mut log).unwrap();
        fuzz_flow_log(&log[MAGIC.len()..]);
        fuzz_flow_log(&log[MAGIC.len()..log.len() - 1]);
        fuzz_flow_log(b"");
    }

    /// A log written before records carried packets and bytes (protocol version 3): its
    /// entries are encoded here exactly as that version's enum encoded them (variant 2 a batch
    /// of `FlowRecordV3`s). It replays with packets = count and bytes unknown, new uploads append
    /// beside it.
    #[test]
    fn a_log_written_before_packets_and_bytes_replays() {
        #[derive(Serialize)]
        #[allow(dead_code)]
        enum OldEntry {
            Header {
                dropped: u64,
                gaps: u64,
                missed: u64,
            },
            Cursors(Vec<(u64, u64)>),
            Batch {
                workload_id: u64,
                hostname: String,
                received_at: u64,
                through: u64,
                missed: u64,
                records: Vec<FlowRecordV3>,
            },
        }
        let dir = scratch_dir("flows-v3");
        let old: Vec<FlowRecordV3> = batch(1, 3)
            .records
            .into_iter()
            .map(|r| FlowRecordV3::from(FlowRecord { count: 4, ..r }))
            .collect();
        let entry = OldEntry::Batch {
            workload_id: 1,
            hostname: "web".into(),
            received_at: 50,
            through: 3,
            missed: 0,
            records: old,
        };
        let mut log = MAGIC.to_vec();
        log.extend_from_slice(&frame_payload(&ven_proto::encode(&entry)));
        fs::write(dir.join(FLOWS_FILE), &log).unwrap();

        let mut store = FlowStore::open_with(&dir, 100, 2).unwrap();
        assert_eq!(store.cursor(1), 3);
        assert_eq!(store.flows().len(), 3);
        assert!(
            store.flows().iter().all(|f| (f.record.count, f.record.packets, f.record.bytes) == (4, 4, None))
        );
        let newer = FlowBatch {
            first: 4,
            records: vec![FlowRecord { packets: 9, bytes: Some(540), ..batch(4, 1).records[0] }],
        };
        store.ingest(1, "web", newer, 60).unwrap();
        store.forget(1).unwrap();
        store.ingest(1, "web", batch(1, 6), 61).unwrap();
        drop(store);
        let store = FlowStore::open_with(&dir, 100, 2).unwrap();
        let flows = store.flows();
        assert_eq!(flows.len(), 4 + 6, "the old batch, the new one and the re-upload");
        assert_eq!((flows[3].record.packets, flows[3].record.bytes), (9, Some(540)));
        assert_eq!((flows[0].record.packets, flows[0].record.bytes), (4, None));
    }

    /// The seeds of the `flow_batches` fuzz target (fuzz/seeds/flow_batches/): a batch of this
    /// version, and a flow log whose entries are of this version. Built here and compared with
    /// the files; `VEN_WRITE_FUZZ_SEEDS=1 cargo test -p pce --lib fuzz_seeds` writes them again.
    #[test]
    fn fuzz_seeds_of_batches_and_logs_are_current() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/flow_batches");
        let mut records = batch(1, 2);
        records.records[0].bytes = Some(240);
        records.records[0].packets = 4;
        let batch_bytes = ven_proto::encode(&records);
        let mut log = MAGIC.to_vec();
        log.extend_from_slice(&frame(&Entry::Batch {
            workload_id: 1,
            hostname: "web".into(),
            received_at: 50,
            through: 2,
            missed: 0,
            records: records.records.clone(),
        }));
        // The fuzz target reads a log without its magic.
        let seeds = [("batch-v4", batch_bytes), ("log-v4", log[MAGIC.len()..].to_vec())];
        for (name, bytes) in &seeds {
            let path = dir.join(name);
            if std::env::var_os("VEN_WRITE_FUZZ_SEEDS").is_some() {
                fs::create_dir_all(&dir).unwrap();
                fs::write(&path, bytes).unwrap();
            }
            assert_eq!(&fs::read(&path).unwrap(), bytes, "{} is stale", path.display());
            fuzz_flow_batch(bytes);
            fuzz_flow_log(bytes);
        }
    }
}
