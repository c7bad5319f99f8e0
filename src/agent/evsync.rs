//! EventSync: the long-lived TLS connection to the PCE's event service, on a thread named
//! `evsync`. It says HELLO, expects ACK, answers pings, and passes events to the manager as
//! hints. Losing it costs nothing but latency: every heartbeat answer carries the policy version.

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ven_proto::frame::{self, FrameError, PceFrame, VenFrame};

use super::Input;
use super::tls::{self, TlsError};
use crate::state::Identity;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect delays double from the first to the last, with jitter.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(60);
/// A connection with no frame for this many ping intervals is dead.
const MISSED_PINGS: u32 = 3;

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("event service {server}: {cause}")]
    Frame { server: String, cause: FrameError },
    #[error("event service {server} refused the session: {reason}")]
    Refused { server: String, reason: String },
    #[error("event service {server} did not acknowledge HELLO")]
    NoAck { server: String },
}

/// The event channel as `ven status --all` shows it; shared by every session of the agent's
/// life (a new pairing starts a new [`EventSync`] on the same counters).
#[derive(Debug, Default)]
pub struct EventStats {
    pub connected: AtomicBool,
    /// Unix seconds when the current session (or the last one) was acknowledged.
    pub since: AtomicU64,
    /// Sessions acknowledged since the agent started.
    pub sessions: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl EventStats {
    pub fn snapshot(&self) -> super::status::EventChannel {
        let since = self.since.load(Ordering::Relaxed);
        super::status::EventChannel {
            connected: self.connected.load(Ordering::Relaxed),
            since: (since > 0).then_some(since),
            sessions: self.sessions.load(Ordering::Relaxed),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }
}

pub struct EventSync {
    stop: Arc<AtomicBool>,
    wake: SyncSender<()>,
    socket: Arc<Mutex<Option<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl EventSync {
    pub fn start(
        identity: &Identity,
        clone_token: super::clone_token::CloneToken,
        inputs: SyncSender<Input>,
        stats: Arc<EventStats>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let socket = Arc::new(Mutex::new(None));
        let (wake, sleeper) = mpsc::sync_channel(1);
        let session = Session {
            identity: identity.clone(),
            clone_token,
            host: identity.management_server.rsplit_once(':').map(|(h, _)| h.to_string()).unwrap_or_default(),
            inputs,
            stop: stop.clone(),
            socket: socket.clone(),
            stats,
        };
        let thread = super::monitor::spawn("evsync", move || session.run(&sleeper))?;
        Ok(Self { stop, wake, socket, thread: Some(thread) })
    }

    /// Closes the connection and joins the thread; `Some(message)` when it had panicked.
    fn stop_joined(&mut self) -> Option<String> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.try_send(());
        if let Ok(slot) = self.socket.lock() {
            if let Some(socket) = slot.as_ref() {
                let _ = socket.shutdown(Shutdown::Both);
            }
        }
        self.thread.take().and_then(super::monitor::join)
    }
}

impl super::monitor::Worker for EventSync {
    fn ended(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }
    fn stop(mut self: Box<Self>) -> Option<String> {
        self.stop_joined()
    }
}

struct Session {
    identity: Identity,
    clone_token: super::clone_token::CloneToken,
    host: String,
    inputs: SyncSender<Input>,
    stop: Arc<AtomicBool>,
    socket: Arc<Mutex<Option<TcpStream>>>,
    stats: Arc<EventStats>,
}

impl Session {
    fn run(self, sleeper: &Receiver<()>) {
        let mut retry = FIRST_RETRY;
        let mut last_error = String::new();
        while !self.stop.load(Ordering::SeqCst) {
            match self.connect_and_listen() {
                Ok(()) => retry = FIRST_RETRY,
                Err(e) => {
                    // Rate-limit: a PCE that stays down must not fill the log once a minute.
                    let message = e.to_string();
                    if let Ok(mut last) = self.stats.last_error.lock() {
                        *last = Some(message.clone());
                    }
                    if message != last_error {
                        log::warn!("{message}; retrying (policy still arrives with heartbeats)");
                        last_error = message;
                    }
                }
            }
            self.stats.connected.store(false, Ordering::Relaxed);
            if let Ok(mut slot) = self.socket.lock() {
                *slot = None;
            }
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            // Interruptible sleep: `stop()` wakes it.
            let _ = sleeper.recv_timeout(super::jitter(retry));
            retry = (retry * 2).min(LAST_RETRY);
        }
    }

    fn connect_and_listen(&self) -> Result<(), SessionError> {
        let server = format!("{}:{}", self.host, self.identity.event_port);
        let frame_error = |cause| SessionError::Frame { server: server.clone(), cause };
        let tcp = tls::connect(&self.host, self.identity.event_port, CONNECT_TIMEOUT)?;
        if let (Ok(mut slot), Ok(clone)) = (self.socket.lock(), tcp.try_clone()) {
            *slot = Some(clone);
        }
        if self.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let _ = tcp.set_read_timeout(Some(HELLO_TIMEOUT));
        let _ = tcp.set_write_timeout(Some(HELLO_TIMEOUT));
        let config = tls::client_config(&self.identity.ca_cert_der)?;
        let (name, _) = tls::split_server(&server)?;
        let connection = rustls::ClientConnection::new(config, name)
            .map_err(|e| TlsError::Handshake { server: server.clone(), cause: e.to_string() })?;
        let mut stream = rustls::StreamOwned::new(connection, tcp);
        // Once the PCE handed out a clone token (only one that knows CloneHello does), the
        // session says which copy of the agent opens it: a copy's must not replace the original's.
        let hello = match self.clone_token.current() {
            Some(clone_token) => VenFrame::CloneHello {
                protocol_version: ven_proto::PROTOCOL_VERSION,
                agent_id: self.identity.agent_id,
                agent_token: self.identity.agent_token.clone(),
                clone_token,
                instance: self.clone_token.instance().to_string(),
            },
            None => VenFrame::Hello {
                protocol_version: ven_proto::PROTOCOL_VERSION,
                agent_id: self.identity.agent_id,
                agent_token: self.identity.agent_token.clone(),
            },
        };
        frame::write_frame(&mut stream, &hello).map_err(frame_error)?;
        let mut buf = Vec::new();
        let ping_interval = match frame::read_frame(&mut stream, &mut buf).map_err(frame_error)? {
            PceFrame::Ack { ping_interval_s } => Duration::from_secs(u64::from(ping_interval_s.max(1))),
            PceFrame::Nack { reason } => return Err(SessionError::Refused { server, reason }),
            _ => return Err(SessionError::NoAck { server }),
        };
        log::info!("connected to the event service at {server}");
        self.stats.connected.store(true, Ordering::Relaxed);
        self.stats.since.store(crate::clock::now(), Ordering::Relaxed);
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        let _ = stream.sock.set_read_timeout(Some(ping_interval * MISSED_PINGS + CONNECT_TIMEOUT));
        loop {
            match frame::read_frame(&mut stream, &mut buf) {
                Ok(PceFrame::Ping { nonce }) => {
                    frame::write_frame(&mut stream, &VenFrame::Pong { nonce }).map_err(frame_error)?
                }
                Ok(PceFrame::Event(event)) => match self.inputs.try_send(Input::Event(event)) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => log::debug!("event dropped: the manager is busy"),
                    Err(TrySendError::Disconnected(_)) => return Ok(()),
                },
                Ok(PceFrame::Nack { reason }) => return Err(SessionError::Refused { server, reason }),
                Ok(PceFrame::Ack { .. }) => {}
                Err(_) if self.stop.load(Ordering::SeqCst) => return Ok(()),
                Err(cause) => return Err(frame_error(cause)),
            }
        }
    }
}
