//! AgentLogManager: the `uploader` thread sends the stored flow summaries to the PCE.
//!
//! Every upload interval (the spec's 10 minutes, jittered by ±10 % so that a fleet does not
//! upload in step) it sends what flow.db holds after the acknowledged cursor, oldest first, in
//! batches of at most [`ven_proto::MAX_FLOWS_PER_BATCH`], and moves the cursor only to what the
//! PCE answers it stored. Nothing is removed for the upload's sake: a failed upload leaves every
//! row where it was for the next round, and rows leave the store only by rotation. A suspended
//! or unpaired VEN uploads nothing. The thread sleeps in `poll` on its stop pipe between rounds.

use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use ven_proto::MAX_FLOWS_PER_BATCH;

use super::pce_client::ClientError;
use crate::flows::store::{FlowStore, StoreError};
use crate::state::{self, DataDir, Identity, RecordKind};

/// Most batches one round sends, so that a long backlog is spread over rounds instead of
/// holding the PCE (and the link) for minutes.
pub const MAX_BATCHES_PER_ROUND: usize = 50;

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pce(#[from] ClientError),
    #[error("the PCE acknowledged flows through {through} for a batch starting at {first}; it stored none")]
    NotStored { first: u64, through: u64 },
}

/// What the uploader has done since the agent started.
#[derive(Debug, Default)]
pub struct UploadStats {
    pub records: AtomicU64,
    pub batches: AtomicU64,
    pub failures: AtomicU64,
    /// Unix seconds of the last round that left nothing behind.
    pub last_success: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

/// A copy of [`UploadStats`] at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UploadCounters {
    pub records: u64,
    pub batches: u64,
    pub failures: u64,
    pub last_success: Option<u64>,
    pub last_error: Option<String>,
}

impl UploadStats {
    pub fn snapshot(&self) -> UploadCounters {
        let last_success = self.last_success.load(Ordering::Relaxed);
        UploadCounters {
            records: self.records.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            last_success: (last_success > 0).then_some(last_success),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }
}

/// The running `uploader` thread.
pub struct Uploader {
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
    stats: Arc<UploadStats>,
}

impl Uploader {
    /// Starts the thread, counting into `stats` (kept across restarts).
    pub fn start(
        data: DataDir,
        store: Arc<FlowStore>,
        interval: Duration,
        stats: Arc<UploadStats>,
    ) -> std::io::Result<Self> {
        let (stop_read, stop_write) = nix::unistd::pipe().map_err(std::io::Error::from)?;
        let thread_stats = Arc::clone(&stats);
        let thread = super::monitor::spawn("uploader", move || {
            run(&data, &store, interval, &stop_read, &thread_stats)
        })?;
        Ok(Self { stop: stop_write, thread: Some(thread), stats })
    }

    pub fn stats(&self) -> Arc<UploadStats> {
        Arc::clone(&self.stats)
    }

    pub fn stop(mut self) {
        self.stop_joined();
    }

    /// Stops and joins the thread; `Some(message)` when it had panicked.
    fn stop_joined(&mut self) -> Option<String> {
        let _ = nix::unistd::write(&self.stop, &[1]);
        self.thread.take().and_then(super::monitor::join)
    }
}

impl super::monitor::Worker for Uploader {
    fn ended(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }
    fn stop(mut self: Box<Self>) -> Option<String> {
        self.stop_joined()
    }
}

fn run(data: &DataDir, store: &FlowStore, interval: Duration, stop: &OwnedFd, stats: &UploadStats) {
    loop {
        let wait = super::jitter(interval);
        let mut fds = [PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
        if matches!(poll(&mut fds, PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX)), Ok(n) if n > 0) {
            return;
        }
        if data.suspended_path().exists() {
            continue;
        }
        let identity = match state::read_record::<Identity>(&data.identity_path(), RecordKind::Identity) {
            Ok(Some(identity)) => identity,
            Ok(None) => continue,
            Err(e) => {
                log::error!("flow upload: {e}");
                continue;
            }
        };
        match upload_round(
            store,
            &super::lifecycle::client(&identity, data, super::clone_token::agent_instance()),
            stats,
        ) {
            Ok(0) => stats.last_success.store(crate::clock::now(), Ordering::Relaxed),
            Ok(records) => {
                log::info!("uploaded {records} flow records to {}", identity.management_server);
                stats.last_success.store(crate::clock::now(), Ordering::Relaxed);
                if let Ok(mut last) = stats.last_error.lock() {
                    *last = None;
                }
            }
            Err(e) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                log::warn!("flow upload failed, the flows stay stored for the next round: {e}");
                if let Ok(mut last) = stats.last_error.lock() {
                    *last = Some(e.to_string());
                }
            }
        }
        // The round's batches, redb cache and connection are freed: give them back.
        crate::memory::release_freed();
    }
}

/// Sends pending batches until none is left or [`MAX_BATCHES_PER_ROUND`]; returns the records
/// the PCE stored.
pub fn upload_round(
    store: &FlowStore,
    client: &super::pce_client::PceClient,
    stats: &UploadStats,
) -> Result<u64, UploadError> {
    let mut uploaded = 0;
    for _ in 0..MAX_BATCHES_PER_ROUND {
        let Some(batch) = store.pending(MAX_FLOWS_PER_BATCH)? else { break };
        if batch.records.is_empty() {
            break;
        }
        let last = batch.first + batch.records.len() as u64 - 1;
        let mut ack = client.upload_flows(&batch)?;
        if ack.through > last {
            // The PCE already holds numbers past these: this store numbered its rows again from
            // a lower start (its files were lost), and the PCE skipped them as duplicates. Send
            // them again numbered after the PCE's, so that they are stored.
            crate::log_limited!(
                log::Level::Warn,
                "the PCE holds flow records through {} and this VEN's store is at {last} (its files \
                 were lost?); sending them again numbered after the PCE's",
                ack.through
            );
            let renumbered = ven_proto::FlowBatch { first: ack.through + 1, records: batch.records };
            let renumbered_last = renumbered.first + renumbered.records.len() as u64 - 1;
            let again = client.upload_flows(&renumbered)?;
            if again.through < renumbered_last {
                return Err(UploadError::NotStored { first: renumbered.first, through: again.through });
            }
            ack.through = last;
        }
        if ack.through < batch.first {
            return Err(UploadError::NotStored { first: batch.first, through: ack.through });
        }
        let through = ack.through.min(last);
        store.acknowledge(through)?;
        let stored = through - batch.first + 1;
        uploaded += stored;
        stats.records.fetch_add(stored, Ordering::Relaxed);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        if through < last {
            break;
        }
    }
    Ok(uploaded)
}
