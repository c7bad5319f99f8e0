//! The support report the PCE asks for (the bolt `SupportReportRequested`, repeated by every
//! heartbeat answer until the report arrives): built with `ven gen-supportreport`'s code
//! ([`crate::cli::supportreport::build`], which keeps every token, key and activation code out)
//! on a thread of its own named `supportreport`, so that the manager keeps answering meanwhile
//! (the report asks it for `status --all`), then uploaded (`POST /ven/v1/support_report`).
//!
//! One report at a time. A request already uploaded, or being answered, is not started again
//! (the bolt and the heartbeat answer both name it); a failed upload is tried again when a later
//! heartbeat answer names the request again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::state::{DataDir, Identity};

/// How long the upload of one report may take (4 MiB at most, over a slow link).
pub const UPLOAD_TIMEOUT: Duration = Duration::from_secs(60);

pub struct SupportReporter {
    data: DataDir,
    /// The request being answered and its thread.
    running: Option<(u64, JoinHandle<()>)>,
    /// The last request whose report the PCE took (0: none).
    uploaded: Arc<AtomicU64>,
}

impl SupportReporter {
    pub fn new(data: DataDir) -> Self {
        Self { data, running: None, uploaded: Arc::new(AtomicU64::new(0)) }
    }

    /// Starts answering `request` unless it was answered or is being answered; returns whether
    /// it started.
    pub fn request(&mut self, request: u64, identity: &Identity) -> bool {
        if self.uploaded.load(Ordering::SeqCst) == request {
            return false;
        }
        if let Some((_, thread)) = &self.running {
            if !thread.is_finished() {
                return false;
            }
        }
        self.reap();
        let (data, identity, uploaded) = (self.data.clone(), identity.clone(), self.uploaded.clone());
        let spawned = std::thread::Builder::new()
            .name("supportreport".into())
            .spawn(move || answer(&data, &identity, request, &uploaded));
        match spawned {
            Ok(thread) => {
                log::info!("the PCE asks for a support report (request {request}): building it");
                self.running = Some((request, thread));
                true
            }
            Err(e) => {
                log::error!("cannot start the support report thread: {e}");
                false
            }
        }
    }

    /// Joins a finished report thread.
    fn reap(&mut self) {
        if let Some((request, thread)) = self.running.take() {
            if thread.join().is_err() {
                log::error!("the support report thread for request {request} panicked");
            }
        }
    }

    /// At shutdown: joins a finished thread; one still building is left to end with the process
    /// (its commands have their own time limits, and the PCE asks again if it gets nothing).
    pub fn stop(&mut self) {
        match &self.running {
            Some((_, thread)) if thread.is_finished() => self.reap(),
            Some((request, _)) => log::info!("support report for request {request} abandoned: stopping"),
            None => {}
        }
    }
}

/// Builds the report and uploads it as the answer to `request`.
fn answer(data: &DataDir, identity: &Identity, request: u64, uploaded: &AtomicU64) {
    let archive = match crate::cli::supportreport::build(data, crate::clock::now()) {
        Ok(archive) => archive,
        Err(e) => {
            log::error!("support report for request {request}: {e}");
            return;
        }
    };
    let bytes = archive.len();
    let upload = ven_proto::SupportReportUpload { request, report: archive };
    match super::lifecycle::client(identity, data, super::clone_token::agent_instance())
        .upload_support_report(&upload, UPLOAD_TIMEOUT)
    {
        Ok(()) => {
            uploaded.store(request, Ordering::SeqCst);
            log::info!("support report for request {request} uploaded ({bytes} bytes)");
        }
        Err(e) => log::warn!("support report for request {request} not uploaded: {e}; the PCE asks again"),
    }
}
