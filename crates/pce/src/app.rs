//! What the request handlers and the event sessions share: [`App`] (the store, the flows, the
//! registry of connected agents, the finished jobs, the support reports, the admin key's hash),
//! its housekeeping, and the admin key file it is made from. `serve` builds one and runs the
//! listeners over it; `api`, `venapi` and `events` take it. It depends on the state below it
//! (`store`, `flows`, `sessions`, `supportreports`), never on the handlers.

use crate::flows::FlowStore;
use crate::sessions::Sessions;
use crate::store::{Changes, Store};
use crate::supportreports::SupportReports;
use crate::upgrades::Upgrades;
use crate::{clock, crypto};
use serde_json::Value;
use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

pub const ADMIN_KEY_FILE: &str = "admin.key";
const ADMIN_KEY_BYTES: usize = 32;
/// How often heartbeat bookkeeping is written and silent workloads are looked for.
pub const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(5);
/// Housekeeping that holds the store this long is logged (requests wait meanwhile).
const SLOW_HOUSEKEEPING: Duration = Duration::from_millis(50);
/// A workload silent for this many heartbeat intervals goes offline (the spec: 12 x 5 min = 1 h).
pub const DEFAULT_OFFLINE_AFTER_HEARTBEATS: u32 = 12;
/// Missed heartbeats after which the PCE raises an event (the spec: three).
const MISSED_HEARTBEATS_WARNING: u32 = 3;
/// Jobs kept, and bytes of results across them.
pub const MAX_JOBS: usize = 64;
pub const MAX_JOB_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("reading {path}: {source}")]
    ReadKey { path: PathBuf, source: io::Error },
    #[error("writing {path}: {source}")]
    WriteKey { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Random(#[from] crypto::RandomError),
}

/// Heartbeat intervals of the clone-token holder's silence after which another copy takes over.
pub const CLONE_GRACE_HEARTBEATS: u64 = 2;

/// What the request handlers and sessions share. No code holds two of `store`, `flows` and
/// `support_reports` at once.
pub struct App {
    store: Mutex<Store>,
    /// The uploaded flows: a lock of their own, so uploads and queries do not hold up heartbeats.
    flows: Mutex<FlowStore>,
    pub sessions: Sessions,
    admin_key_sha256: String,
    pub heartbeat_interval_s: u32,
    pub offline_after_heartbeats: u32,
    pub event_port: u16,
    /// When `pce serve` started (Unix seconds).
    started_at: u64,
    /// Finished asynchronous requests (bounded; see `api::jobs`).
    jobs: Mutex<Jobs>,
    /// Support reports asked for and received (a lock of their own: uploads write megabytes).
    support_reports: Mutex<SupportReports>,
    /// Upgrade orders (a lock of their own, never held with the store's).
    upgrades: Mutex<Upgrades>,
    /// The data directory: the release store is read from it when a VEN asks (`releases`).
    pub data_dir: PathBuf,
}

impl App {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        flows: FlowStore,
        support_reports: SupportReports,
        upgrades: Upgrades,
        data_dir: PathBuf,
        admin_key: &str,
        heartbeat_interval_s: u32,
        offline_after_heartbeats: u32,
        event_port: u16,
    ) -> Self {
        App {
            store: Mutex::new(store),
            flows: Mutex::new(flows),
            sessions: Sessions::default(),
            admin_key_sha256: crypto::sha256_hex(admin_key.as_bytes()),
            heartbeat_interval_s,
            offline_after_heartbeats,
            event_port,
            started_at: clock::now(),
            jobs: Mutex::default(),
            support_reports: Mutex::new(support_reports),
            upgrades: Mutex::new(upgrades),
            data_dir,
        }
    }

    /// Seconds the holder of a workload's newest clone token may be silent before another copy
    /// of its agent takes over (a crash restart, a restored backup): [`CLONE_GRACE_HEARTBEATS`]
    /// intervals, so a live agent (one heartbeat an interval, ±10 %) always comes back first.
    pub fn clone_grace_s(&self) -> u64 {
        CLONE_GRACE_HEARTBEATS * u64::from(self.heartbeat_interval_s)
    }

    /// Seconds since `pce serve` started.
    pub fn uptime_seconds(&self) -> u64 {
        clock::now().saturating_sub(self.started_at)
    }

    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn flows(&self) -> MutexGuard<'_, FlowStore> {
        self.flows.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn support_reports(&self) -> MutexGuard<'_, SupportReports> {
        self.support_reports.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn upgrades(&self) -> MutexGuard<'_, Upgrades> {
        self.upgrades.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn jobs(&self) -> MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn is_admin_key(&self, key: &str) -> bool {
        crypto::constant_time_eq(
            crypto::sha256_hex(key.as_bytes()).as_bytes(),
            self.admin_key_sha256.as_bytes(),
        )
    }

    /// Tells the connected agents among `changes` that their policy changed.
    pub fn publish(&self, changes: &Changes) {
        self.sessions.notify(changes);
    }

    /// Marks silent workloads offline and writes the heartbeat bookkeeping; every
    /// [`HOUSEKEEPING_INTERVAL`].
    pub fn housekeeping(&self, started_at: u64) {
        let quiet_for = u64::from(self.offline_after_heartbeats) * u64::from(self.heartbeat_interval_s);
        let waited = Instant::now();
        let mut store = self.store();
        let held = Instant::now();
        let warn_after = u64::from(MISSED_HEARTBEATS_WARNING) * u64::from(self.heartbeat_interval_s);
        let changes =
            store.sweep_offline(clock::now(), warn_after, quiet_for, started_at).unwrap_or_else(|e| {
                log::error!("marking silent workloads offline: {e}");
                Vec::new()
            });
        let swept = held.elapsed();
        // Heartbeat bookkeeping alone is written after the lock is released; anything else
        // pending is committed under it.
        let flush = store.take_workload_flush();
        if flush.is_none() {
            if let Err(e) = store.flush() {
                log::error!("{e}");
            }
        }
        drop(store);
        let hold = held.elapsed();
        self.publish(&changes);
        let written = Instant::now();
        let rows = match flush.map(|flush| flush.commit()) {
            None => 0,
            Some(Ok(rows)) => rows,
            Some(Err((e, unwritten))) => {
                log::error!("writing heartbeat bookkeeping: {e} (written again with the next change)");
                self.store().flush_failed(unwritten);
                0
            }
        };
        // Every request waits while this holds the store: say so when it is long.
        let wait = held.duration_since(waited);
        if hold >= SLOW_HOUSEKEEPING || written.elapsed() >= SLOW_HOUSEKEEPING {
            log::info!(
                "housekeeping held the store for {} ms (sweep {} ms) after waiting {} ms for it; \
                 {rows} workload records written in {} ms without it",
                hold.as_millis(),
                swept.as_millis(),
                wait.as_millis(),
                written.elapsed().as_millis()
            );
        }
    }
}

/// Reads `dir/admin.key`, creating it (0600) on first start.
pub fn admin_key(dir: &Path) -> Result<String, AppError> {
    let path = dir.join(ADMIN_KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(key) => Ok(key.trim().to_string()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = crypto::random_hex(ADMIN_KEY_BYTES)?;
            crate::fsutil::write_atomic(&path, format!("{key}\n").as_bytes(), 0o600)
                .map_err(|source| AppError::WriteKey { path, source })?;
            Ok(key)
        }
        Err(source) => Err(AppError::ReadKey { path, source }),
    }
}

// Finished asynchronous requests (`api::jobs` makes and serves them).

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobKind {
    Collection,
    TrafficQuery,
}

pub struct Job {
    pub id: String,
    pub kind: JobKind,
    /// What was asked: the collection's path, or the query as given.
    pub request: Value,
    pub created_at: u64,
    /// The JSON array of the answer.
    pub result: Vec<u8>,
    pub count: usize,
}

/// The finished jobs, oldest first.
#[derive(Default)]
pub struct Jobs {
    pub jobs: VecDeque<Job>,
    bytes: usize,
}

impl Jobs {
    pub fn add(&mut self, job: Job) {
        self.bytes += job.result.len();
        self.jobs.push_back(job);
        while self.jobs.len() > MAX_JOBS || (self.bytes > MAX_JOB_BYTES && self.jobs.len() > 1) {
            if let Some(old) = self.jobs.pop_front() {
                self.bytes -= old.result.len();
            }
        }
    }

    pub fn get(&self, kind: JobKind, id: &str) -> Option<&Job> {
        self.jobs.iter().find(|job| job.kind == kind && job.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, bytes: usize) -> Job {
        Job {
            id: id.into(),
            kind: JobKind::Collection,
            request: Value::Null,
            created_at: 0,
            result: vec![b' '; bytes],
            count: 0,
        }
    }

    #[test]
    fn the_job_table_keeps_the_newest_within_its_caps() {
        let mut jobs = Jobs::default();
        for i in 0..MAX_JOBS + 5 {
            jobs.add(job(&i.to_string(), 10));
        }
        assert_eq!(jobs.jobs.len(), MAX_JOBS);
        assert!(jobs.get(JobKind::Collection, "4").is_none() && jobs.get(JobKind::Collection, "5").is_some());
        jobs.add(job("big", MAX_JOB_BYTES));
        assert_eq!(jobs.jobs.len(), 1, "a job as large as the budget pushes out the rest");
        assert_eq!(jobs.bytes, MAX_JOB_BYTES);
    }
}
