//! The flow pipeline's thread (`flows`): reads our NFLOG group and counts what it sees.
//!
//! It sleeps in `poll` on the NFLOG socket and a stop pipe, so an idle host costs no wake-ups
//! and a stop is immediate. A group it cannot bind (another program holds it, or the kernel has
//! no nfnetlink_log) is retried with backoff (1 s doubling to 60 s) without affecting
//! enforcement. Counters are shared atomics that `ven status` reads. Aggregation and storage are
//! the next parts of issue 4; until then events are counted only.

use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::nflog::NflogReader;

/// First and longest wait before binding the group again after a failure.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LONGEST_RETRY: Duration = Duration::from_secs(60);

/// What the pipeline has seen since the agent started.
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
}

/// A copy of [`FlowStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowCounters {
    pub events: u64,
    pub lost: u64,
    pub skipped: u64,
    pub reading: bool,
}

impl FlowStats {
    pub fn snapshot(&self) -> FlowCounters {
        FlowCounters {
            events: self.events.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            reading: self.reading.load(Ordering::Relaxed),
        }
    }
}

/// The running pipeline thread.
pub struct FlowPipeline {
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
    stats: Arc<FlowStats>,
}

impl FlowPipeline {
    /// Starts the `flows` thread on NFLOG `group`, in the calling thread's network namespace.
    pub fn start(group: u16) -> std::io::Result<Self> {
        let (stop_read, stop_write) = nix::unistd::pipe().map_err(std::io::Error::from)?;
        let stats = Arc::new(FlowStats::default());
        let thread_stats = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("flows".into())
            .spawn(move || run(group, &stop_read, &thread_stats))?;
        Ok(Self { stop: stop_write, thread: Some(thread), stats })
    }

    pub fn stats(&self) -> Arc<FlowStats> {
        Arc::clone(&self.stats)
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        let _ = nix::unistd::write(&self.stop, &[1]);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Whether `stop` became readable within `timeout` (`None`: wait for it alone).
fn stopped(stop: &OwnedFd, timeout: PollTimeout) -> bool {
    let mut fds = [PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, timeout), Ok(n) if n > 0)
}

fn run(group: u16, stop: &OwnedFd, stats: &FlowStats) {
    let mut retry = FIRST_RETRY;
    loop {
        let mut reader = match NflogReader::open(group) {
            Ok(reader) => reader,
            Err(e) => {
                log::warn!("{e}; flows are not recorded, retrying in {retry:?}");
                let wait = PollTimeout::try_from(retry).unwrap_or(PollTimeout::MAX);
                if stopped(stop, wait) {
                    return;
                }
                retry = (retry * 2).min(LONGEST_RETRY);
                continue;
            }
        };
        retry = FIRST_RETRY;
        stats.reading.store(true, Ordering::Relaxed);
        log::info!("reading NFLOG group {group}");
        let mut counted = reader.loss();
        loop {
            let mut fds = [
                PollFd::new(reader.as_fd(), PollFlags::POLLIN),
                PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("NFLOG group {group}: poll failed: {e}");
                    break;
                }
            }
            if fds[1].revents().is_some_and(|events| !events.is_empty()) {
                stats.reading.store(false, Ordering::Relaxed);
                return;
            }
            let events = &stats.events;
            match reader.read_batch(|_event| {
                events.fetch_add(1, Ordering::Relaxed);
            }) {
                Ok(_) => {}
                Err(e) => {
                    log::error!("{e}; binding the group again");
                    break;
                }
            }
            let loss = reader.loss();
            stats.lost.fetch_add(loss.lost().saturating_sub(counted.lost()), Ordering::Relaxed);
            let skipped = |l: &super::LossCounters| l.malformed.saturating_add(l.unknown_prefix);
            stats.skipped.fetch_add(skipped(&loss).saturating_sub(skipped(&counted)), Ordering::Relaxed);
            if loss.lost() > counted.lost() {
                log::warn!("NFLOG group {group}: {} packets lost so far", loss.lost());
            }
            counted = loss;
        }
        stats.reading.store(false, Ordering::Relaxed);
        if stopped(stop, PollTimeout::try_from(retry).unwrap_or(PollTimeout::MAX)) {
            return;
        }
    }
}
