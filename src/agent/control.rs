//! The running agent's control socket: a root-only Unix socket in the data directory over which
//! the CLI asks for status and hands over work that must not race the agent (deactivation, a new
//! identity). One request per connection, postcard frames as on the event service.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use ven_proto::frame::{self, FrameError};

use super::Input;
use super::status::StatusReport;

/// How long a client waits for the agent; deactivation talks to the PCE, so it gets longer.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(3);
pub const WORK_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    Status,
    /// `ven activate` wrote a new identity: load it and start talking to the PCE.
    IdentityChanged,
    /// Unpair, leave the firewall open (or as it was saved at activation when `saved`) and
    /// forget the identity.
    Deactivate {
        saved: bool,
    },
    /// Remove everything ven programmed and stop working until `Unsuspend`.
    Suspend,
    /// Put the last-known-good policy back and resume.
    Unsuspend,
    /// Upgrade to release `version` (default: the one the PCE ordered), even one rolled back.
    Upgrade {
        version: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlResponse {
    Status(Box<StatusReport>),
    Done,
    /// Deactivated; `pce_notice` says why the PCE could not be told, if it could not.
    Deactivated {
        pce_notice: Option<String>,
    },
    /// Suspended or unsuspended; `pce_notice` says why the PCE could not be told, if it could not.
    Suspended {
        pce_notice: Option<String>,
    },
    Unsuspended {
        pce_notice: Option<String>,
    },
    Failed(String),
    /// The upgrade order was taken: what is being done.
    Upgrading(String),
}

/// Counters the worker threads update as they go. A status request reads them at the moment it
/// is answered, not from the manager's last published report (which is only as fresh as the
/// manager's last wake-up). Set once, after the flow threads start.
#[derive(Default)]
pub struct LiveCounters {
    pub flows: Option<Arc<crate::flows::FlowStats>>,
    pub uploads: Option<Arc<super::uploader::UploadStats>>,
    /// Configuration keys the agent ignored (fixed for its life).
    pub config_warnings: Vec<String>,
    /// The event channel and the flow store (`ven status --all`).
    pub events: Option<Arc<super::evsync::EventStats>>,
    pub store: Option<Arc<crate::flows::store::FlowStore>>,
}

impl LiveCounters {
    /// `report` with the counters as they are now.
    fn refresh(&self, report: &mut StatusReport) {
        if let Some(flows) = &self.flows {
            report.flows = Some(flows.snapshot());
        }
        if let Some(uploads) = &self.uploads {
            report.flow_uploads = Some(uploads.snapshot());
        }
        report.config_warnings.clone_from(&self.config_warnings);
        // The channel comes and goes without waking the manager: read it now (only once paired,
        // when the manager shows a channel at all).
        if let (Some(events), Some(detail)) = (&self.events, report.detail.as_mut()) {
            if detail.event_channel.is_some() {
                detail.event_channel = Some(events.snapshot());
            }
        }
        if let (Some(store), Some(detail)) = (&self.store, report.detail.as_mut()) {
            detail.flow_store = Some(store.usage().into());
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no agent is running on {0}")]
    NotRunning(PathBuf),
    #[error("another agent is already running on {0}")]
    AlreadyRunning(PathBuf),
    #[error("control socket {path}: {cause}")]
    Socket { path: PathBuf, cause: io::Error },
    #[error("control socket {path}: {cause}")]
    Frame { path: PathBuf, cause: FrameError },
}

/// The serving side, on a thread named `control`.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Binds the socket (refusing when another agent answers on it) and starts serving. Status is
    /// answered from `status` directly, with the counters in `live` read at that moment; other
    /// requests go to the manager through `inputs`.
    pub fn start(
        path: &Path,
        status: Arc<Mutex<StatusReport>>,
        live: Arc<OnceLock<LiveCounters>>,
        inputs: SyncSender<Input>,
    ) -> Result<Self, ControlError> {
        let socket_error = |cause| ControlError::Socket { path: path.to_path_buf(), cause };
        if UnixStream::connect(path).is_ok() {
            return Err(ControlError::AlreadyRunning(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(socket_error)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(socket_error)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread =
            super::monitor::spawn("control", move || serve(listener, &thread_stop, &status, &live, &inputs))
                .map_err(socket_error)?;
        Ok(Self { path: path.to_path_buf(), stop, thread: Some(thread) })
    }

    /// Stops serving, joins the thread and removes the socket.
    pub fn stop(mut self) {
        self.stop_joined();
    }

    /// [`Self::stop`]; `Some(message)` when the thread had panicked.
    fn stop_joined(&mut self) -> Option<String> {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = UnixStream::connect(&self.path);
        let panicked = self.thread.take().and_then(super::monitor::join);
        let _ = std::fs::remove_file(&self.path);
        panicked
    }
}

impl super::monitor::Worker for ControlServer {
    fn ended(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }
    fn stop(mut self: Box<Self>) -> Option<String> {
        self.stop_joined()
    }
}

fn serve(
    listener: UnixListener,
    stop: &AtomicBool,
    status: &Mutex<StatusReport>,
    live: &OnceLock<LiveCounters>,
    inputs: &SyncSender<Input>,
) {
    for connection in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut stream) = connection else { continue };
        let _ = stream.set_read_timeout(Some(STATUS_TIMEOUT));
        let _ = stream.set_write_timeout(Some(STATUS_TIMEOUT));
        let request: ControlRequest = match frame::read_frame(&mut stream, &mut Vec::new()) {
            Ok(request) => request,
            Err(e) => {
                log::warn!("control socket: bad request: {e}");
                continue;
            }
        };
        let response = match request {
            ControlRequest::Status => match status.lock() {
                Ok(report) => {
                    let mut report = Box::new(report.clone());
                    if let Some(live) = live.get() {
                        live.refresh(&mut report);
                    }
                    ControlResponse::Status(report)
                }
                Err(_) => ControlResponse::Failed("status unavailable".into()),
            },
            work => {
                let (reply_tx, reply_rx) = mpsc::sync_channel(1);
                if inputs.send(Input::Control(work, reply_tx)).is_err() {
                    ControlResponse::Failed("the agent is stopping".into())
                } else {
                    reply_rx.recv_timeout(WORK_TIMEOUT).unwrap_or_else(|_| {
                        ControlResponse::Failed("the agent did not answer in time".into())
                    })
                }
            }
        };
        if let Err(e) = frame::write_frame(&mut stream, &response) {
            log::warn!("control socket: cannot answer: {e}");
        }
    }
}

/// Sends one request to the agent serving `path` and waits up to `timeout` for its answer.
pub fn request(
    path: &Path,
    request: &ControlRequest,
    timeout: Duration,
) -> Result<ControlResponse, ControlError> {
    let mut stream = match UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
            return Err(ControlError::NotRunning(path.to_path_buf()));
        }
        Err(cause) => return Err(ControlError::Socket { path: path.to_path_buf(), cause }),
    };
    let frame_error = |cause| ControlError::Frame { path: path.to_path_buf(), cause };
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|cause| ControlError::Socket { path: path.into(), cause })?;
    frame::write_frame(&mut stream, request).map_err(frame_error)?;
    frame::read_frame(&mut stream, &mut Vec::new()).map_err(frame_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ven-control-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn status_over_socket(path: &Path) -> StatusReport {
        match request(path, &ControlRequest::Status, STATUS_TIMEOUT).unwrap() {
            ControlResponse::Status(report) => *report,
            other => panic!("expected a status, got {other:?}"),
        }
    }

    #[test]
    fn status_reads_the_flow_counters_at_the_moment_it_is_asked() {
        let dir = scratch_dir("live");
        let path = dir.join("control.sock");
        let (inputs, _inputs_rx) = mpsc::sync_channel(1);
        let published = Arc::new(Mutex::new(StatusReport::unpaired()));
        let live = Arc::new(OnceLock::new());
        let server = ControlServer::start(&path, published, Arc::clone(&live), inputs).unwrap();

        // Before the flow threads start there is nothing live to read.
        assert_eq!(status_over_socket(&path).flows, None);

        let flows = Arc::new(crate::flows::FlowStats::default());
        let uploads = Arc::new(crate::agent::uploader::UploadStats::default());
        let warnings = vec!["future_setting (line 2)".to_string()];
        let counters = LiveCounters {
            flows: Some(Arc::clone(&flows)),
            uploads: Some(uploads.clone()),
            config_warnings: warnings,
            events: None,
            store: None,
        };
        assert!(live.set(counters).is_ok());
        flows.events.store(42, Ordering::Relaxed);
        flows.tracked.store(3, Ordering::Relaxed);
        uploads.records.store(7, Ordering::Relaxed);

        // The published report was never updated: the answer comes from the counters themselves.
        let report = status_over_socket(&path);
        let counters = report.flows.expect("flow counters");
        assert_eq!((counters.events, counters.tracked), (42, 3));
        assert_eq!(report.flow_uploads.expect("upload counters").records, 7);
        assert_eq!(report.config_warnings, ["future_setting (line 2)"]);

        flows.events.store(43, Ordering::Relaxed);
        assert_eq!(status_over_socket(&path).flows.unwrap().events, 43);
        server.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
