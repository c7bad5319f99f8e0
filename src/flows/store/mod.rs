//! The flow stores in log/: `flow.db` (raw rows, one per flushed flow record, numbered for the
//! upload to the PCE) and `flowsum.db` (the same records aggregated by source, destination,
//! protocol, port and verdict), both redb, each with one backup (`.1`) and at most one
//! `.corrupt` copy. Read by the agent (upload) and by `ven flows` (the four views).
//!
//! ```text
//! flow.db     table "flows"     u64 sequence number of a chunk's first row -> postcard
//!                               FlowRecords back to back (at most 4080 bytes: see `rows`)
//!             table "meta"      format, next_seq, acknowledged, first_seq, backup_first_seq
//! flowsum.db  table "summaries" 38-byte key (src, dst, protocol, port, verdict) -> postcard
//!                               FlowRecord (the aggregate)
//!             table "meta"      format, next_seq (a second copy of the high-water mark)
//! ```
//!
//! Guarantees:
//! - **No open handle between calls.** Every call opens the files it needs, works, and drops
//!   them: `ven flows` can read while the agent runs (redb locks a file while it is open), and
//!   an idle agent keeps no page cache. A file another process holds is retried for about two
//!   seconds, then [`StoreError::Busy`]. Calls on one [`FlowStore`] are serialised.
//! - **Size caps.** No file (backup and corrupt copy included) passes
//!   [`LogCaps::per_file_bytes`]: redb grows its file by doubling, only through `set_len`, and
//!   the backend refuses a length over the cap, which fails that transaction before the file
//!   grows; the store then rotates (`flow.db` -> `flow.db.1`, replacing the old backup) and
//!   writes the flush into a fresh file. A flush too big for an empty file is split. So log/
//!   stays within its total by construction ([`crate::logdir`]). A file over the cap (the cap
//!   was lowered) is deleted when it would become the backup.
//! - **Crash consistency.** One committed transaction per file per flush (Immediate
//!   durability): a crash loses at most the flush being written (tested with SIGKILL).
//!   `flow.db` is written first; if `flowsum.db` then fails, the error says so
//!   ([`StoreError::SummaryNotMerged`]) and the raw rows stay. Every file is closed the way a
//!   killed process leaves it and every open runs redb's crash recovery, which verifies each
//!   page's checksum: a clean close would write redb's 3 MB allocator snapshot each call (see
//!   `file`, which measures both).
//! - **Full disk.** An I/O error fails the call, never panics; the handle (which redb latches
//!   into a failed state) is dropped, and the next call reopens. What was committed stays.
//! - **Corruption.** A file that is not a flow store (garbage, truncated, damaged pages, other
//!   tables) is moved to `<name>.corrupt` (replacing an older one) and replaced by a new file
//!   by the agent's calls (append, pending, acknowledge), reported in
//!   [`AppendOutcome::recovered`] (those found by pending and acknowledge at the next append).
//!   A query never moves files: it fails with [`StoreError::Corrupt`] naming the file, since
//!   `ven flows` should not change the agent's files under it. Busy and I/O errors are never
//!   taken for corruption.
//! - **Sequence numbers** only grow: `next_seq` lives in `flow.db`'s meta, is carried into
//!   every new `flow.db`, and is kept a second time in `flowsum.db`; a `flow.db` that is new or
//!   was corrupt starts above everything its backup and both summary files know. The
//!   acknowledged cursor is carried the same way. Rows rotated out before the PCE acknowledged
//!   them are counted ([`AppendOutcome::dropped_unacknowledged`]).
//! - **Untrusted bytes.** A stored row that does not decode is skipped and counted
//!   ([`StoreUsage::undecodable_rows`]), never a panic (fuzzed: `flow_store_rows`).
//!
//! Aggregation merges counts (saturating), the earliest `first_seen`, the latest `last_seen`,
//! the largest sampling scale and the overflow flag; `rule` is the latest appended one. A flush
//! is merged in key order (windows of `MERGE_WINDOW`), so each B-tree leaf is rewritten once
//! per window rather than once per record (a 10k-record flush wrote 45 MB unsorted, 5.5 MB
//! sorted). Each summary file aggregates what was written to it: after a rotation the same
//! flow has a row in the backup and one in the current file (a query lists the backup's first).
//!
//! Measured (`cargo bench --bench flow_store`, x86 NVMe, release): 303,000 raw rows per file
//! under the 15 MB cap (30.5 bytes a row; the file rotates at 9.25 MB, since redb's next growth
//! would reach 18 MB), a flush of 1,000 records 17 ms (1.1 MB written), of 10,000 records
//! 69 ms (5.5 MB), a query of a full raw view 78 ms.

mod file;
mod rows;
#[cfg(test)]
mod tests;

use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use redb::{Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use ven_proto::{FlowBatch, FlowRecord, IpNet};

use crate::logdir::{self, LogCaps};
use file::{Failure, Mode, Opened};

/// Most rows a query returns (about 80 bytes each in memory); larger limits are clamped.
pub const MAX_QUERY_ROWS: usize = 100_000;
/// Smallest per-file cap a store can live in (measured: redb's new file is 1,064,960 bytes and
/// its first growth passes 1.58 MB whatever is written); a file rotates at about 1.25 MB and
/// 28,000 rows under it. Smaller caps make every append fail with [`StoreError::CapTooSmall`].
pub const MIN_FILE_BYTES: u64 = 1_600_000;
/// Records merged into flowsum.db per sorted window (a key and a reference each: ~800 KB).
const MERGE_WINDOW: usize = 16_384;
/// Corrupt files found outside an append, kept to be reported by the next append.
const MAX_QUEUED_RECOVERIES: usize = 8;
/// Times one call moves a corrupt file aside before giving up (a file made corrupt again at
/// once is someone else's doing).
const MAX_RECOVERIES_PER_CALL: usize = 4;
/// Version of the tables' layout, in each file's meta; another version is treated as corrupt.
const FORMAT: u64 = 1;

const FLOWS: TableDefinition<u64, &[u8]> = TableDefinition::new("flows");
const SUMMARIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("summaries");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_FORMAT: &str = "format";
const META_NEXT_SEQ: &str = "next_seq";
const META_ACKNOWLEDGED: &str = "acknowledged";
const META_FIRST_SEQ: &str = "first_seq";
const META_BACKUP_FIRST_SEQ: &str = "backup_first_seq";

/// Which store a query reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum View {
    /// flow.db: every flushed record with its sequence number.
    Raw,
    /// flowsum.db: one row per (src, dst, protocol, port, verdict).
    Aggregated,
}

/// Which verdicts a query keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VerdictFilter {
    Allowed,
    /// Anything no rule allowed ([`ven_proto::FlowVerdict::is_unallowed`]): the spec's drop views.
    Unallowed,
    Any,
}

/// A query of one of the four views (raw or aggregated, allowed or not), with filters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowQuery {
    pub view: View,
    pub verdicts: VerdictFilter,
    /// Only records whose `last_seen >= since`.
    pub since: Option<u32>,
    pub src: Option<IpNet>,
    pub dst: Option<IpNet>,
    pub port: Option<u16>,
    pub protocol: Option<u8>,
    /// Most rows returned (clamped to [`MAX_QUERY_ROWS`]).
    pub limit: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryResult {
    /// Backup file's rows first, then the current file's; raw rows by sequence number,
    /// aggregated rows by key.
    pub rows: Vec<StoredFlow>,
    /// Further rows that matched beyond the limit.
    pub more: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFlow {
    /// Sequence number (raw view only).
    pub seq: Option<u64>,
    pub record: FlowRecord,
}

/// What one [`FlowStore::append`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Records appended (to flow.db, and merged into flowsum.db).
    pub rows: usize,
    /// Files rotated to their backup before this write (a file may appear twice when one
    /// flush fills more than a file).
    pub rotated: Vec<PathBuf>,
    /// Corrupt files moved aside (by this append, or by pending/acknowledge since the last).
    pub recovered: Vec<Recovery>,
    /// Raw rows the PCE had not acknowledged that left with a replaced backup.
    pub dropped_unacknowledged: u64,
}

/// A corrupt file moved aside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    pub path: PathBuf,
    pub moved_to: PathBuf,
    pub cause: String,
}

/// Sizes and counters for `ven status`. Counters run since this [`FlowStore`] was made.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreUsage {
    /// flow.db and flow.db.1.
    pub raw_bytes: u64,
    /// flowsum.db and flowsum.db.1.
    pub summary_bytes: u64,
    /// flow.db.corrupt and flowsum.db.corrupt.
    pub corrupt_bytes: u64,
    pub total_bytes: u64,
    /// No store file passes this.
    pub file_cap_bytes: u64,
    pub rows_appended: u64,
    pub rotations: u64,
    pub recoveries: u64,
    pub dropped_unacknowledged: u64,
    /// Stored rows that did not decode (skipped).
    pub undecodable_rows: u64,
    /// Last sequence number written, and acknowledged, as last seen by this store (0: none).
    pub last_seq: u64,
    pub acknowledged: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path} is held open by another process (waited {} ms)", file::BUSY_WAIT.as_millis())]
    Busy { path: PathBuf },
    #[error("{path} is not a usable flow store: {cause}")]
    Corrupt { path: PathBuf, cause: String },
    #[error("{path}: the disk is full: {source}")]
    NoSpace { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Database { path: PathBuf, source: Box<redb::Error> },
    #[error("{path}: the per-file cap of {cap} bytes cannot hold a flow store (at least {MIN_FILE_BYTES})")]
    CapTooSmall { path: PathBuf, cap: u64 },
    #[error("{path}: only {stored} of {of} records were stored: {source}")]
    PartlyStored { path: PathBuf, stored: usize, of: usize, source: Box<StoreError> },
    #[error(
        "{path}: the flows were stored in flow.db (sequence {first}..={last}) but not aggregated: {source}"
    )]
    SummaryNotMerged { path: PathBuf, first: u64, last: u64, source: Box<StoreError> },
}

impl StoreError {
    /// The failure of a write split in parts, after the first `stored` of `of` records were
    /// committed: [`StoreError::PartlyStored`] when some were, the failure itself when none.
    fn after_parts(path: PathBuf, cap: u64, failure: Failure, stored: usize, of: usize) -> Self {
        let error = Self::from_failure(&path, cap, failure);
        if stored == 0 {
            return error;
        }
        Self::PartlyStored { path, stored, of, source: Box::new(error) }
    }

    fn from_failure(path: &Path, cap: u64, failure: Failure) -> Self {
        let path = path.to_path_buf();
        match failure {
            Failure::Busy => Self::Busy { path },
            Failure::Corrupt(cause) => Self::Corrupt { path, cause },
            Failure::CapReached => Self::CapTooSmall { path, cap },
            Failure::Io(source) if is_no_space(&source) => Self::NoSpace { path, source },
            Failure::Io(source) => Self::Io { path, source },
            Failure::Db(source) => Self::Database { path, source },
        }
    }

    fn io(path: &Path, source: io::Error) -> Self {
        Self::from_failure(path, 0, Failure::Io(source))
    }
}

fn is_no_space(error: &io::Error) -> bool {
    let no_space = [nix::errno::Errno::ENOSPC as i32, nix::errno::Errno::EDQUOT as i32];
    error.raw_os_error().is_some_and(|code| no_space.contains(&code))
}

/// flow.db's bookkeeping, carried from file to file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Meta {
    /// Sequence number of the next row (1 + the largest ever written).
    next_seq: u64,
    /// The PCE stored every row through this one (0: none).
    acknowledged: u64,
    /// `next_seq` when this file was made: its rows are `first_seq..next_seq`.
    first_seq: u64,
    /// `first_seq` of the backup: its rows are `backup_first_seq..first_seq`.
    backup_first_seq: u64,
}

impl Meta {
    /// Rows of the backup the PCE has not acknowledged (counted from the numbers, not read).
    fn unacknowledged_in_backup(&self) -> u64 {
        let from = self.backup_first_seq.max(self.acknowledged.saturating_add(1));
        self.first_seq.saturating_sub(from)
    }

    /// Rows of this file the PCE has not acknowledged.
    fn unacknowledged_here(&self) -> u64 {
        let from = self.first_seq.max(self.acknowledged.saturating_add(1));
        self.next_seq.saturating_sub(from)
    }

    /// The meta of the file that follows this one at a rotation.
    fn rotated(&self) -> Self {
        Self { first_seq: self.next_seq, backup_first_seq: self.first_seq, ..*self }
    }
}

/// Reads a file's meta table: `Ok(None)` when it has none yet.
fn read_meta(table: &impl ReadableTable<&'static str, u64>) -> Result<Option<Meta>, Failure> {
    let get = |key: &str| -> Result<Option<u64>, Failure> {
        let value = table.get(key)?;
        Ok(value.map(|guard| guard.value()))
    };
    if let Some(format) = get(META_FORMAT)? {
        if format != FORMAT {
            return Err(Failure::Corrupt(format!("store format {format}, expected {FORMAT}")));
        }
    }
    let Some(next_seq) = get(META_NEXT_SEQ)? else {
        return Ok(None);
    };
    let acknowledged = get(META_ACKNOWLEDGED)?.unwrap_or(0);
    let first_seq = get(META_FIRST_SEQ)?.unwrap_or(next_seq);
    let backup_first_seq = get(META_BACKUP_FIRST_SEQ)?.unwrap_or(first_seq);
    Ok(Some(Meta { next_seq: next_seq.max(1), acknowledged, first_seq, backup_first_seq }))
}

fn write_meta(table: &mut redb::Table<&'static str, u64>, meta: &Meta) -> Result<(), redb::StorageError> {
    table.insert(META_FORMAT, FORMAT)?;
    table.insert(META_NEXT_SEQ, meta.next_seq)?;
    table.insert(META_ACKNOWLEDGED, meta.acknowledged)?;
    table.insert(META_FIRST_SEQ, meta.first_seq)?;
    table.insert(META_BACKUP_FIRST_SEQ, meta.backup_first_seq)?;
    Ok(())
}

/// A write transaction as every store write is made: durable at commit. Not quick-repair:
/// that would write redb's 3 MB allocator snapshot at every commit (see `file`).
fn begin_write(opened: &Opened) -> Result<redb::WriteTransaction, Failure> {
    let mut txn = opened.db.begin_write().map_err(|error| opened.classify(error.into()))?;
    txn.set_durability(Durability::Immediate);
    Ok(txn)
}

/// Why a write into one file did not happen.
enum WriteFailure {
    /// The file would have to grow past the cap; `empty`: it held no rows.
    Full {
        empty: bool,
    },
    Other(Failure),
}

impl From<Failure> for WriteFailure {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::CapReached => Self::Full { empty: false },
            failure => Self::Other(failure),
        }
    }
}

/// Counters shared with [`FlowStore::usage`], which never waits for a call in progress.
#[derive(Debug, Default)]
struct Counters {
    rows_appended: AtomicU64,
    rotations: AtomicU64,
    recoveries: AtomicU64,
    dropped_unacknowledged: AtomicU64,
    undecodable_rows: AtomicU64,
    last_seq: AtomicU64,
    acknowledged: AtomicU64,
}

/// What calls share under the lock.
#[derive(Debug, Default)]
struct Inner {
    /// Found by pending/acknowledge, reported by the next append (at most
    /// [`MAX_QUEUED_RECOVERIES`]).
    queued: Vec<Recovery>,
}

/// The flow stores of one log/ directory. Holds no open database between calls.
#[derive(Debug)]
pub struct FlowStore {
    dir: PathBuf,
    cap: u64,
    inner: Mutex<Inner>,
    counters: Counters,
}

impl FlowStore {
    /// `dir` is the data directory's log/ (created if missing); the per-file cap is
    /// `caps.per_file_bytes()`.
    pub fn new(dir: &Path, caps: LogCaps) -> Self {
        Self {
            dir: dir.to_path_buf(),
            cap: caps.per_file_bytes(),
            inner: Mutex::new(Inner::default()),
            counters: Counters::default(),
        }
    }

    fn raw_path(&self) -> PathBuf {
        self.dir.join(logdir::FLOW_DBS[0])
    }

    fn summary_path(&self) -> PathBuf {
        self.dir.join(logdir::FLOW_DBS[1])
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// One flush: appends `records` to flow.db as raw rows numbered by a sequence number that
    /// only grows, and merges them into flowsum.db. One write transaction per file (more only
    /// when a flush needs a rotation midway or is bigger than a file).
    pub fn append(&self, records: &[FlowRecord]) -> Result<AppendOutcome, StoreError> {
        let mut inner = self.lock();
        let mut outcome =
            AppendOutcome { recovered: std::mem::take(&mut inner.queued), ..Default::default() };
        let result = self.append_locked(records, &mut outcome);
        if result.is_err() {
            // Not lost: the next append reports them.
            inner.queued = std::mem::take(&mut outcome.recovered);
            inner.queued.truncate(MAX_QUEUED_RECOVERIES);
        }
        result.map(|()| outcome)
    }

    fn append_locked(&self, records: &[FlowRecord], outcome: &mut AppendOutcome) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(&self.dir)
            .map_err(|e| StoreError::io(&self.dir, e))?;
        let raw_path = self.raw_path();
        let (first, last) = self.append_raw(records, outcome)?;
        self.merge_summaries(records, last.saturating_add(1), outcome).map_err(|source| {
            StoreError::SummaryNotMerged { path: self.summary_path(), first, last, source: Box::new(source) }
        })?;
        outcome.rows = records.len();
        self.counters.rows_appended.fetch_add(records.len() as u64, Ordering::Relaxed);
        log::debug!("{}: appended sequence {first}..={last}", raw_path.display());
        Ok(())
    }

    /// Writes the records to flow.db; returns the first and last sequence numbers given.
    fn append_raw(
        &self,
        records: &[FlowRecord],
        outcome: &mut AppendOutcome,
    ) -> Result<(u64, u64), StoreError> {
        let path = self.raw_path();
        let mut first = None;
        let mut last = 0;
        let mut start = 0;
        let mut take = records.len();
        let mut recoveries = 0;
        while start < records.len() {
            let part = &records[start..records.len().min(start + take)];
            let result = self.write_raw_part(part, outcome, &mut recoveries);
            match result {
                Ok((part_first, part_last)) => {
                    first.get_or_insert(part_first);
                    last = part_last;
                    start += part.len();
                }
                Err(WriteFailure::Full { empty: true }) if part.len() > 1 => take = part.len() / 2,
                Err(WriteFailure::Full { empty: true }) => {
                    return Err(StoreError::CapTooSmall { path, cap: self.cap });
                }
                Err(WriteFailure::Full { empty: false }) => self.rotate_raw(outcome, &mut recoveries)?,
                Err(WriteFailure::Other(failure)) => {
                    return Err(StoreError::after_parts(path, self.cap, failure, start, records.len()));
                }
            }
        }
        Ok((first.unwrap_or(last), last))
    }

    /// One transaction on flow.db: rows `next_seq..`, and the meta after them.
    fn write_raw_part(
        &self,
        part: &[FlowRecord],
        outcome: &mut AppendOutcome,
        recoveries: &mut usize,
    ) -> Result<(u64, u64), WriteFailure> {
        let path = self.raw_path();
        if file::len(&path) > self.cap {
            // Written under a larger cap: it leaves before anything is added.
            return Err(WriteFailure::Full { empty: false });
        }
        // A new file that does not fit under the cap: no rotation helps (CapTooSmall).
        let (opened, meta) =
            self.open_raw(&mut outcome.recovered, recoveries).map_err(WriteFailure::Other)?;
        let txn = begin_write(&opened)?;
        let failure = |failure: Failure| WriteFailure::from(opened.classify(failure));
        let mut empty = false;
        let written = (|| -> Result<Meta, Failure> {
            let mut table = txn.open_table(FLOWS)?;
            empty = table.is_empty()?;
            let mut seq = meta.next_seq;
            // The last chunk is continued when it is whole, not full, and ends right here.
            let mut chunk = Vec::with_capacity(rows::CHUNK_BYTES);
            let mut chunk_first = seq;
            if let Some((first, bytes)) = table.last()? {
                let (first, bytes) = (first.value(), bytes.value());
                let whole = rows::whole_chunk_rows(bytes);
                if bytes.len() < rows::CHUNK_BYTES && whole.is_some_and(|n| first.saturating_add(n) == seq) {
                    chunk.extend_from_slice(bytes);
                    chunk_first = first;
                }
            }
            let mut buffer = [0; rows::ROW_BUFFER_BYTES];
            for record in part {
                let row = rows::encode_row(record, &mut buffer);
                if chunk.len() + row.len() > rows::CHUNK_BYTES {
                    table.insert(chunk_first, chunk.as_slice())?;
                    chunk.clear();
                    chunk_first = seq;
                }
                chunk.extend_from_slice(row);
                seq = seq.saturating_add(1);
            }
            if !chunk.is_empty() {
                table.insert(chunk_first, chunk.as_slice())?;
            }
            let after = Meta { next_seq: seq, ..meta };
            write_meta(&mut txn.open_table(META)?, &after)?;
            Ok(after)
        })();
        let after = match written {
            Ok(after) => after,
            Err(error) => {
                return Err(match failure(error) {
                    WriteFailure::Full { .. } => WriteFailure::Full { empty },
                    other => other,
                });
            }
        };
        if let Err(error) = txn.commit() {
            return Err(match failure(error.into()) {
                WriteFailure::Full { .. } => WriteFailure::Full { empty },
                other => other,
            });
        }
        self.counters.last_seq.store(after.next_seq - 1, Ordering::Relaxed);
        Ok((meta.next_seq, after.next_seq - 1))
    }

    /// Opens flow.db for writing (making it, or replacing a corrupt one) with its meta; a new
    /// file gets its meta from what the other files know.
    fn open_raw(
        &self,
        recovered: &mut Vec<Recovery>,
        recoveries: &mut usize,
    ) -> Result<(Opened, Meta), Failure> {
        let path = self.raw_path();
        loop {
            let attempt = file::open(&path, self.cap, Mode::Create)
                .and_then(|opened| opened.ok_or_else(|| Failure::Io(io::ErrorKind::NotFound.into())))
                .and_then(|opened| {
                    let meta = read_meta_of(&opened)?;
                    Ok((opened, meta))
                });
            match attempt {
                Ok((opened, Some(meta))) => return Ok((opened, meta)),
                Ok((opened, None)) => {
                    // A new file (or one that never got its meta: a crash right after redb
                    // made it). Its own rows, if any, count too.
                    let highest = last_key(&opened)?;
                    let meta = self.recover_meta(recovered, highest);
                    return Ok((opened, meta));
                }
                Err(Failure::CapReached) if file::len(&path) == 0 => return Err(Failure::CapReached),
                Err(Failure::CapReached) => {
                    self.recover(
                        &path,
                        "cannot be opened within the per-file cap".into(),
                        recovered,
                        recoveries,
                    )?;
                }
                Err(Failure::Corrupt(cause)) => self.recover(&path, cause, recovered, recoveries)?,
                Err(other) => return Err(other),
            }
        }
    }

    /// Moves a corrupt file aside (bounded per call) and records it.
    fn recover(
        &self,
        path: &Path,
        cause: String,
        recovered: &mut Vec<Recovery>,
        recoveries: &mut usize,
    ) -> Result<(), Failure> {
        *recoveries += 1;
        if *recoveries > MAX_RECOVERIES_PER_CALL {
            return Err(Failure::Corrupt(format!("{cause} (and again after being replaced)")));
        }
        let recovery = file::move_aside(path, self.cap, cause).map_err(Failure::Io)?;
        log::warn!(
            "{} was corrupt ({}): moved to {}",
            path.display(),
            recovery.cause,
            recovery.moved_to.display()
        );
        self.counters.recoveries.fetch_add(1, Ordering::Relaxed);
        if recovered.len() < MAX_QUEUED_RECOVERIES {
            recovered.push(recovery);
        }
        Ok(())
    }

    /// The meta for a new flow.db: above every sequence number the backup and both summary
    /// files know (and `highest`, the new file's own rows), with the backup's cursor.
    fn recover_meta(&self, recovered: &mut Vec<Recovery>, highest: u64) -> Meta {
        let mut next_seq = highest.saturating_add(1);
        let mut acknowledged = 0;
        let mut backup_first = None;
        let backup = file::backup(&self.raw_path());
        match file::open(&backup, self.cap, Mode::Existing) {
            Ok(Some(opened)) => match read_meta_of(&opened).and_then(|meta| Ok((meta, last_key(&opened)?))) {
                Ok((meta, last)) => {
                    next_seq = next_seq.max(last.saturating_add(1));
                    if let Some(meta) = meta {
                        next_seq = next_seq.max(meta.next_seq);
                        acknowledged = meta.acknowledged;
                        backup_first = Some(meta.first_seq);
                    }
                }
                Err(Failure::Corrupt(cause)) => {
                    drop(opened);
                    let _ = self.recover(&backup, cause, recovered, &mut 0);
                }
                Err(failure) => log::warn!(
                    "{}: {}",
                    backup.display(),
                    StoreError::from_failure(&backup, self.cap, failure)
                ),
            },
            Ok(None) => {}
            Err(Failure::Corrupt(cause)) => {
                let _ = self.recover(&backup, cause, recovered, &mut 0);
            }
            Err(failure) => {
                log::warn!("{}: {}", backup.display(), StoreError::from_failure(&backup, self.cap, failure))
            }
        }
        let summary = self.summary_path();
        for path in [file::backup(&summary), summary] {
            // Read only: a damaged summary file is the summary writer's to move aside.
            if let Ok(Some(opened)) = file::open(&path, self.cap, Mode::Existing) {
                if let Ok(Some(meta)) = read_meta_of(&opened) {
                    next_seq = next_seq.max(meta.next_seq);
                }
            }
        }
        let next_seq = next_seq.max(1);
        Meta {
            next_seq,
            acknowledged: acknowledged.min(next_seq - 1),
            first_seq: next_seq,
            backup_first_seq: backup_first.unwrap_or(next_seq),
        }
    }

    /// Moves flow.db to flow.db.1 (replacing the old backup, whose unacknowledged rows are
    /// counted) and starts a new flow.db carrying the sequence number and the cursor.
    fn rotate_raw(&self, outcome: &mut AppendOutcome, recoveries: &mut usize) -> Result<(), StoreError> {
        let path = self.raw_path();
        let backup = file::backup(&path);
        let meta = match self.open_raw(&mut outcome.recovered, recoveries) {
            Ok((opened, meta)) => {
                drop(opened);
                meta
            }
            Err(failure) => return Err(StoreError::from_failure(&path, self.cap, failure)),
        };
        let mut dropped = 0;
        if file::exists(&backup) {
            dropped += meta.unacknowledged_in_backup();
        }
        if file::len(&path) > self.cap {
            // Written under a larger cap: it may not become the backup.
            dropped += meta.unacknowledged_here();
            std::fs::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
            if file::exists(&backup) {
                std::fs::remove_file(&backup).map_err(|e| StoreError::io(&backup, e))?;
            }
        } else {
            file::rename(&path, &backup).map_err(|e| StoreError::io(&path, e))?;
        }
        outcome.rotated.push(path.clone());
        outcome.dropped_unacknowledged += dropped;
        self.counters.rotations.fetch_add(1, Ordering::Relaxed);
        self.counters.dropped_unacknowledged.fetch_add(dropped, Ordering::Relaxed);
        if dropped > 0 {
            log::warn!("{}: {dropped} flow records not yet uploaded were rotated out", path.display());
        }
        // The new file carries the numbers; a crash before this commit is recovered from the
        // backup (see recover_meta).
        let fresh = |opened: &Opened| -> Result<(), Failure> {
            let txn = begin_write(opened)?;
            let written = (|| -> Result<(), Failure> {
                txn.open_table(FLOWS)?;
                write_meta(&mut txn.open_table(META)?, &meta.rotated())?;
                txn.commit()?;
                Ok(())
            })();
            written.map_err(|failure| opened.classify(failure))
        };
        let result = file::open(&path, self.cap, Mode::Create)
            .and_then(|opened| opened.ok_or_else(|| Failure::Io(io::ErrorKind::NotFound.into())))
            .and_then(|opened| fresh(&opened));
        result.map_err(|failure| StoreError::from_failure(&path, self.cap, failure))
    }

    /// Merges the records into flowsum.db; `next_seq` is recorded there as a second copy.
    fn merge_summaries(
        &self,
        records: &[FlowRecord],
        next_seq: u64,
        outcome: &mut AppendOutcome,
    ) -> Result<(), StoreError> {
        let path = self.summary_path();
        let mut start = 0;
        let mut take = records.len();
        let mut recoveries = 0;
        while start < records.len() {
            let part = &records[start..records.len().min(start + take)];
            match self.merge_part(part, next_seq, outcome, &mut recoveries) {
                Ok(()) => start += part.len(),
                Err(WriteFailure::Full { empty: true }) if part.len() > 1 => take = part.len() / 2,
                Err(WriteFailure::Full { empty: true }) => {
                    return Err(StoreError::CapTooSmall { path, cap: self.cap });
                }
                Err(WriteFailure::Full { empty: false }) => {
                    let backup = file::backup(&path);
                    if file::len(&path) > self.cap {
                        std::fs::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
                        if file::exists(&backup) {
                            std::fs::remove_file(&backup).map_err(|e| StoreError::io(&backup, e))?;
                        }
                    } else {
                        file::rename(&path, &backup).map_err(|e| StoreError::io(&path, e))?;
                    }
                    outcome.rotated.push(path.clone());
                    self.counters.rotations.fetch_add(1, Ordering::Relaxed);
                }
                Err(WriteFailure::Other(failure)) => {
                    return Err(StoreError::after_parts(path, self.cap, failure, start, records.len()));
                }
            }
        }
        Ok(())
    }

    fn merge_part(
        &self,
        part: &[FlowRecord],
        next_seq: u64,
        outcome: &mut AppendOutcome,
        recoveries: &mut usize,
    ) -> Result<(), WriteFailure> {
        let path = self.summary_path();
        if file::len(&path) > self.cap {
            return Err(WriteFailure::Full { empty: false });
        }
        let opened = loop {
            match file::open(&path, self.cap, Mode::Create) {
                Ok(Some(opened)) => match read_meta_of(&opened) {
                    Ok(_) => break opened,
                    Err(Failure::Corrupt(cause)) => {
                        drop(opened);
                        self.recover(&path, cause, &mut outcome.recovered, recoveries)?;
                    }
                    Err(failure) => return Err(failure.into()),
                },
                Ok(None) => return Err(WriteFailure::Other(Failure::Io(io::ErrorKind::NotFound.into()))),
                Err(Failure::CapReached) if file::len(&path) == 0 => {
                    return Err(WriteFailure::Full { empty: true });
                }
                Err(Failure::CapReached) => self.recover(
                    &path,
                    "cannot be opened within the per-file cap".into(),
                    &mut outcome.recovered,
                    recoveries,
                )?,
                Err(Failure::Corrupt(cause)) => {
                    self.recover(&path, cause, &mut outcome.recovered, recoveries)?
                }
                Err(failure) => return Err(failure.into()),
            }
        };
        let txn = begin_write(&opened)?;
        let mut empty = false;
        let mut undecodable = 0;
        let written = (|| -> Result<(), Failure> {
            let mut summaries = txn.open_table(SUMMARIES)?;
            empty = summaries.is_empty()?;
            let mut buffer = [0; rows::ROW_BUFFER_BYTES];
            // In key order (arrival order among equal keys, so the latest rule wins): each leaf
            // is then rewritten once per window, not once per record that lands in it.
            let mut order = Vec::with_capacity(part.len().min(MERGE_WINDOW));
            for window in part.chunks(MERGE_WINDOW) {
                order.clear();
                order.extend(window.iter().map(|record| (rows::summary_key(record), record)));
                order.sort_by_key(|(key, _)| *key);
                for (key, record) in &order {
                    let stored = summaries.get(&key[..])?.map(|guard| rows::decode_row(guard.value()));
                    let merged = match stored {
                        Some(Some(stored)) => rows::merge(&stored, record),
                        Some(None) => {
                            undecodable += 1;
                            **record
                        }
                        None => **record,
                    };
                    summaries.insert(&key[..], rows::encode_row(&merged, &mut buffer))?;
                }
            }
            let mut meta = txn.open_table(META)?;
            let known = meta.get(META_NEXT_SEQ)?.map(|guard| guard.value()).unwrap_or(0);
            meta.insert(META_FORMAT, FORMAT)?;
            meta.insert(META_NEXT_SEQ, known.max(next_seq))?;
            Ok(())
        })();
        let result = written.and_then(|()| Ok(txn.commit()?));
        self.counters.undecodable_rows.fetch_add(undecodable, Ordering::Relaxed);
        result.map_err(|failure| match WriteFailure::from(opened.classify(failure)) {
            WriteFailure::Full { .. } => WriteFailure::Full { empty },
            other => other,
        })
    }

    /// Rows of one of the four views, backup file first then current, filtered; at most
    /// `query.limit` rows (and how many more matched). Never moves or writes a file (beyond
    /// redb's own header): a corrupt one is an error naming it.
    pub fn query(&self, query: &FlowQuery) -> Result<QueryResult, StoreError> {
        // One call at a time per store, as for the writers.
        let _serialised = self.lock();
        let limit = query.limit.min(MAX_QUERY_ROWS);
        let current = match query.view {
            View::Raw => self.raw_path(),
            View::Aggregated => self.summary_path(),
        };
        let mut result = QueryResult { rows: Vec::new(), more: 0 };
        let mut undecodable = 0;
        for path in [file::backup(&current), current] {
            let read = |result: &mut QueryResult, undecodable: &mut u64| -> Result<(), Failure> {
                let Some(opened) = file::open(&path, self.cap, Mode::Existing)? else {
                    return Ok(());
                };
                let txn = opened.db.begin_read()?;
                read_meta_in(&txn)?;
                let mut keep = |seq: Option<u64>, record: Option<FlowRecord>| match record {
                    Some(record) if rows::matches(query, &record) => {
                        if result.rows.len() < limit {
                            result.rows.push(StoredFlow { seq, record });
                        } else {
                            result.more += 1;
                        }
                    }
                    Some(_) => {}
                    None => *undecodable += 1,
                };
                match query.view {
                    View::Raw => {
                        let Some(table) = open_read_table(&txn, FLOWS)? else {
                            return Ok(());
                        };
                        for chunk in table.iter()? {
                            let (first, bytes) = chunk?;
                            rows::decode_chunk(first.value(), bytes.value(), |seq, record| {
                                keep(Some(seq), record);
                                true
                            });
                        }
                    }
                    View::Aggregated => {
                        let Some(table) = open_read_table(&txn, SUMMARIES)? else {
                            return Ok(());
                        };
                        for row in table.iter()? {
                            let (_, bytes) = row?;
                            keep(None, rows::decode_row(bytes.value()));
                        }
                    }
                }
                Ok(())
            };
            read(&mut result, &mut undecodable)
                .map_err(|failure| StoreError::from_failure(&path, self.cap, failure))?;
        }
        self.counters.undecodable_rows.fetch_add(undecodable, Ordering::Relaxed);
        Ok(result)
    }

    /// Oldest raw rows not yet acknowledged (from flow.db.1 then flow.db), at most `max` (and
    /// at most [`ven_proto::MAX_FLOWS_PER_BATCH`]), as a batch of consecutive sequence numbers
    /// (it stops at a gap or at a row that does not decode). None when nothing is pending.
    pub fn pending(&self, max: usize) -> Result<Option<FlowBatch>, StoreError> {
        let mut inner = self.lock();
        let path = self.raw_path();
        let backup = file::backup(&path);
        let mut recoveries = 0;
        let mut recovered = Vec::new();
        // The cursor lives in flow.db; without one, the backup's (it was flow.db once).
        let (current, current_meta) = self.open_existing(&path, &mut recovered, &mut recoveries)?;
        let (backup_db, backup_meta) = self.open_existing(&backup, &mut recovered, &mut recoveries)?;
        let meta = current_meta.or(backup_meta);
        let acknowledged = meta.map_or(0, |meta| meta.acknowledged);
        self.counters.acknowledged.store(acknowledged, Ordering::Relaxed);
        let mut batch = rows::BatchBuilder::new(acknowledged, max);
        for (opened, path) in [(backup_db, &backup), (current, &path)] {
            let Some(opened) = opened else { continue };
            feed(&opened, acknowledged, &mut batch)
                .map_err(|f| StoreError::from_failure(path, self.cap, f))?;
        }
        let (batch, undecodable) = batch.finish();
        self.counters.undecodable_rows.fetch_add(undecodable, Ordering::Relaxed);
        queue(&mut inner.queued, recovered);
        Ok(batch)
    }

    /// Opens a file that may be missing (`None`), with its meta, moving it aside when corrupt.
    fn open_existing(
        &self,
        path: &Path,
        recovered: &mut Vec<Recovery>,
        recoveries: &mut usize,
    ) -> Result<(Option<Opened>, Option<Meta>), StoreError> {
        loop {
            let opened = file::open(path, self.cap, Mode::Existing).and_then(|opened| match opened {
                Some(opened) => read_meta_of(&opened).map(|meta| (Some(opened), meta)),
                None => Ok((None, None)),
            });
            match opened {
                Ok(opened) => return Ok(opened),
                Err(Failure::Corrupt(cause)) => self
                    .recover(path, cause, recovered, recoveries)
                    .map_err(|failure| StoreError::from_failure(path, self.cap, failure))?,
                Err(failure) => return Err(StoreError::from_failure(path, self.cap, failure)),
            }
        }
    }

    /// The PCE stored everything through `through`: persisted in flow.db, so [`Self::pending`]
    /// never returns those rows again. A cursor beyond the last row written is held to it; one
    /// below the stored cursor changes nothing.
    pub fn acknowledge(&self, through: u64) -> Result<(), StoreError> {
        let mut inner = self.lock();
        DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(&self.dir)
            .map_err(|e| StoreError::io(&self.dir, e))?;
        let path = self.raw_path();
        let mut recovered = Vec::new();
        let mut recoveries = 0;
        let mut rotated = AppendOutcome::default();
        let mut result = Ok(());
        for _ in 0..2 {
            result = self.write_cursor(through, &mut recovered, &mut recoveries);
            match result {
                Err(WriteFailure::Full { .. }) => {
                    if let Err(error) = self.rotate_raw(&mut rotated, &mut recoveries) {
                        queue(&mut inner.queued, recovered);
                        return Err(error);
                    }
                }
                _ => break,
            }
        }
        recovered.append(&mut rotated.recovered);
        queue(&mut inner.queued, recovered);
        result.map_err(|failure| match failure {
            WriteFailure::Full { .. } => StoreError::CapTooSmall { path: path.clone(), cap: self.cap },
            WriteFailure::Other(failure) => StoreError::from_failure(&path, self.cap, failure),
        })
    }

    fn write_cursor(
        &self,
        through: u64,
        recovered: &mut Vec<Recovery>,
        recoveries: &mut usize,
    ) -> Result<(), WriteFailure> {
        let (opened, meta) = self.open_raw(recovered, recoveries)?;
        let acknowledged = meta.acknowledged.max(through.min(meta.next_seq - 1));
        self.counters.acknowledged.store(acknowledged, Ordering::Relaxed);
        if acknowledged == meta.acknowledged {
            return Ok(());
        }
        let txn = begin_write(&opened)?;
        let written = (|| -> Result<(), Failure> {
            txn.open_table(FLOWS)?;
            write_meta(&mut txn.open_table(META)?, &Meta { acknowledged, ..meta })?;
            txn.commit()?;
            Ok(())
        })();
        written.map_err(|failure| opened.classify(failure).into())
    }

    /// Sizes of the store's files and counters, for `ven status`. Never opens a database and
    /// never waits for a call in progress.
    pub fn usage(&self) -> StoreUsage {
        let size = |path: PathBuf| file::len(&file::backup(&path)) + file::len(&path);
        let corrupt = |path: PathBuf| file::len(&logdir::corrupt_path(&path));
        let raw_bytes = size(self.raw_path());
        let summary_bytes = size(self.summary_path());
        let corrupt_bytes = corrupt(self.raw_path()) + corrupt(self.summary_path());
        let counters = &self.counters;
        StoreUsage {
            raw_bytes,
            summary_bytes,
            corrupt_bytes,
            total_bytes: raw_bytes + summary_bytes + corrupt_bytes,
            file_cap_bytes: self.cap,
            rows_appended: counters.rows_appended.load(Ordering::Relaxed),
            rotations: counters.rotations.load(Ordering::Relaxed),
            recoveries: counters.recoveries.load(Ordering::Relaxed),
            dropped_unacknowledged: counters.dropped_unacknowledged.load(Ordering::Relaxed),
            undecodable_rows: counters.undecodable_rows.load(Ordering::Relaxed),
            last_seq: counters.last_seq.load(Ordering::Relaxed),
            acknowledged: counters.acknowledged.load(Ordering::Relaxed),
        }
    }
}

fn queue(queued: &mut Vec<Recovery>, recovered: Vec<Recovery>) {
    for recovery in recovered {
        if queued.len() < MAX_QUEUED_RECOVERIES {
            queued.push(recovery);
        }
    }
}

/// Offers a file's rows after `acknowledged` to the batch, in order, until it is full.
fn feed(opened: &Opened, acknowledged: u64, batch: &mut rows::BatchBuilder) -> Result<(), Failure> {
    let txn = opened.db.begin_read()?;
    let Some(table) = open_read_table(&txn, FLOWS)? else {
        return Ok(());
    };
    // From the chunk holding the first row not acknowledged.
    let wanted = acknowledged.saturating_add(1);
    let start = match table.range(..=wanted)?.next_back() {
        Some(chunk) => chunk?.0.value(),
        None => wanted,
    };
    for chunk in table.range(start..)? {
        let (first, bytes) = chunk?;
        let mut more = true;
        rows::decode_chunk(first.value(), bytes.value(), |seq, record| {
            more = batch.offer(seq, record);
            more
        });
        if !more {
            break;
        }
    }
    Ok(())
}

/// A table in a read transaction; `None` when the file does not have it yet.
fn open_read_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    definition: TableDefinition<K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, Failure> {
    match txn.open_table(definition) {
        Ok(table) => Ok(Some(table)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

fn read_meta_in(txn: &redb::ReadTransaction) -> Result<Option<Meta>, Failure> {
    match open_read_table(txn, META)? {
        Some(table) => read_meta(&table),
        None => Ok(None),
    }
}

/// A file's meta, checking the tables are ours (wrong types or format: corrupt).
fn read_meta_of(opened: &Opened) -> Result<Option<Meta>, Failure> {
    use redb::TableHandle;
    let txn = opened.db.begin_read()?;
    let known = [FLOWS.name(), SUMMARIES.name(), META.name()];
    for table in txn.list_tables()? {
        if !known.contains(&table.name()) {
            return Err(Failure::Corrupt(format!("wrong tables: unknown table {:?}", table.name())));
        }
    }
    // Opening each table checks its key and value types.
    open_read_table(&txn, FLOWS)?;
    open_read_table(&txn, SUMMARIES)?;
    read_meta_in(&txn)
}

/// Largest sequence number in a raw file (0: none).
fn last_key(opened: &Opened) -> Result<u64, Failure> {
    let txn = opened.db.begin_read()?;
    let Some(table) = open_read_table(&txn, FLOWS)? else {
        return Ok(0);
    };
    let Some(chunk) = table.last()? else {
        return Ok(0);
    };
    let (first, bytes) = (chunk.0.value(), chunk.1.value());
    let mut last = first;
    rows::decode_chunk(first, bytes, |seq, _| {
        last = seq;
        true
    });
    Ok(last)
}

/// For the `flow_store_rows` fuzz target: decodes one stored chunk of raw rows as the store
/// does; the rows with their sequence numbers, and how many did not decode (0 or 1).
#[doc(hidden)]
pub fn decode_stored_chunk(first: u64, bytes: &[u8]) -> (Vec<(u64, FlowRecord)>, u64) {
    let mut decoded = Vec::new();
    let mut undecodable = 0;
    rows::decode_chunk(first, bytes, |seq, record| {
        match record {
            Some(record) => decoded.push((seq, record)),
            None => undecodable += 1,
        }
        true
    });
    (decoded, undecodable)
}

/// For the `flow_store_rows` fuzz target: decodes one stored aggregate as the store does.
#[doc(hidden)]
pub fn decode_stored_summary(bytes: &[u8]) -> Option<FlowRecord> {
    rows::decode_row(bytes)
}

/// For the `flow_store_rows` fuzz target: assembles an upload batch from stored chunks (first
/// sequence number and bytes, in order) as [`FlowStore::pending`] does; returns it and the count
/// of rows that did not decode.
#[doc(hidden)]
pub fn batch_from_chunks<'a>(
    acknowledged: u64,
    max: usize,
    chunks: impl IntoIterator<Item = (u64, &'a [u8])>,
) -> (Option<FlowBatch>, u64) {
    let mut batch = rows::BatchBuilder::new(acknowledged, max);
    for (first, bytes) in chunks {
        let mut more = true;
        rows::decode_chunk(first, bytes, |seq, record| {
            more = batch.offer(seq, record);
            more
        });
        if !more {
            break;
        }
    }
    batch.finish()
}
