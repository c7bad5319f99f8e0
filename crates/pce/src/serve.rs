//! `pce serve`: prepares the data directory (PKI, admin key, state), binds the VEN/admin API and
//! the event service, and runs them until SIGTERM or SIGINT, then writes the state and returns.
//! This is the process only: what the handlers share is [`App`] (`app`).
//!
//! Threads: the main thread blocks both signals before any other thread exists (all inherit the
//! mask) and waits for them with sigwait; a few named executor threads run the connections; the
//! synchronous request handlers run on smol's blocking pool. The soft open-files limit is raised to
//! the hard one at start and each listener's connection cap is sized from it; past a cap, new
//! connections wait in the listen backlog. Who may hold those connections, and for how long
//! before authenticating, is `admission`'s business.

use crate::admission::{Gate, Ticket};
use crate::app::{self, App};
use crate::flows::{FlowError, FlowStore};
use crate::http::{self, Admission, Head, HttpError, Request, Response};
use crate::store::{Store, StoreError};
use crate::tls::{self, TlsError};
use crate::{api, clock, events, sessions, venapi};
use futures_rustls::TlsAcceptor;
use futures_rustls::server::TlsStream;
use nix::sys::signal::{SigSet, Signal};
use smol::net::{TcpListener, TcpStream};
use smol::{Executor, Timer};
use std::future::Future;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ven_proto::{ErrorKind, PROTOCOL_HEADER};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/pce";
/// Most concurrent connections to the VEN/admin API, whatever the open-files limit. A VEN opens
/// one per heartbeat and one per bolt, so a provision that touches the whole fleet brings a
/// burst of about one per agent; past the cap, connections wait in the listen backlog.
pub const MAX_API_CONNECTIONS: usize = 8192;
/// The API's cap never goes below this (unless the open-files limit itself is smaller).
const MIN_API_CONNECTIONS: usize = 256;
/// Most concurrent connections to the event service: every registered agent plus some in handshake.
pub const MAX_EVENT_CONNECTIONS: usize = sessions::MAX_EVENT_SESSIONS + 256;
/// Open files kept for what is not a connection: listeners, state, flow and log files.
const RESERVED_FILES: u64 = 64;
/// The soft open-files limit is raised to the hard one, but no higher than this (a hard limit
/// of "unlimited" cannot be set as a soft one).
const MAX_OPEN_FILES: u64 = 1 << 20;
const MAX_EXECUTOR_THREADS: usize = 4;

/// Everything `pce serve` needs, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: IpAddr,
    pub api_port: u16,
    pub event_port: u16,
    pub sans: Vec<String>,
    pub heartbeat_interval_s: u32,
    /// Silent heartbeat intervals before a workload goes offline (suspended ones never do).
    pub offline_after_heartbeats: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("creating the data directory {path}: {source}")]
    DataDir { path: PathBuf, source: io::Error },
    /// Another local user could change what the PCE reads or make it write elsewhere.
    #[error("refusing to use the data directory: {0}")]
    UnsafeDataDir(String),
    #[error(transparent)]
    App(#[from] app::AppError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Flows(#[from] FlowError),
    #[error(transparent)]
    SupportReports(#[from] crate::supportreports::SupportReportError),
    #[error(transparent)]
    Upgrades(#[from] crate::upgrades::UpgradeError),
    #[error("binding the {what} to {addr}: {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: io::Error },
    #[error("blocking SIGTERM and SIGINT: {0}")]
    Signals(nix::Error),
    #[error("starting thread {name}: {source}")]
    Thread { name: String, source: io::Error },
    #[error("writing to stdout: {0}")]
    Stdout(io::Error),
}

pub fn run(config: Config) -> Result<(), ServeError> {
    // INVARIANT: blocked before any thread starts, so that only sigwait below takes them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().map_err(ServeError::Signals)?;

    let dir = &config.data_dir;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| ServeError::DataDir { path: dir.clone(), source })?;
    crate::fsutil::check_private(dir).map_err(ServeError::UnsafeDataDir)?;
    let pki = tls::ensure(dir, &tls::server_names(config.listen, &config.sans), clock::now())?;
    let acceptor = TlsAcceptor::from(pki.server_config()?);
    let admin_key = app::admin_key(dir)?;
    let (store, created) = Store::open(dir)?;
    let flows = FlowStore::open(dir)?;
    let support_reports = crate::supportreports::SupportReports::open(dir)?;
    let mut upgrades = crate::upgrades::Upgrades::open(dir)?;
    // Orders of workloads removed while the PCE was down (none normally) go.
    upgrades.retain(|id| store.state().workloads.contains_key(&id))?;

    let mut stdout = io::stdout().lock();
    if created {
        let code =
            store.state().pairing_profiles.first().map(|p| p.activation_code.as_str()).unwrap_or_default();
        writeln!(stdout, "activation code: {code}").map_err(ServeError::Stdout)?;
        writeln!(stdout, "CA fingerprint (SHA-256): {}", pki.ca_fingerprint).map_err(ServeError::Stdout)?;
        writeln!(stdout, "admin API key: {admin_key}").map_err(ServeError::Stdout)?;
    }
    let caps = ConnectionCaps::from_open_files(raise_open_files_limit());
    log::info!("connection caps: {} API, {} event service", caps.api, caps.event);
    let api = bind("VEN and admin API", SocketAddr::new(config.listen, config.api_port))?;
    let event = bind("event service", SocketAddr::new(config.listen, config.event_port))?;
    let api_addr = api.local_addr().map_err(ServeError::Stdout)?;
    let event_addr = event.local_addr().map_err(ServeError::Stdout)?;
    writeln!(stdout, "listening: api {api_addr} events {event_addr}").map_err(ServeError::Stdout)?;
    stdout.flush().map_err(ServeError::Stdout)?;
    drop(stdout);
    log::info!(
        "data directory {}, {} workloads, {} flows",
        dir.display(),
        store.state().workloads.len(),
        flows.flows().len()
    );

    let app = Arc::new(App::new(
        store,
        flows,
        support_reports,
        upgrades,
        dir.clone(),
        &admin_key,
        config.heartbeat_interval_s,
        config.offline_after_heartbeats,
        event_addr.port(),
    ));
    let ex = Arc::new(Executor::new());
    let handler: Arc<dyn http::Handler> = Arc::new(Api(app.clone()));
    ex.spawn(accept_loop(
        api,
        acceptor.clone(),
        Gate::new("API", caps.api),
        ex.clone(),
        move |stream, mut ticket| {
            let handler = handler.clone();
            async move {
                if let Err(e) = http::serve(stream, handler, &mut ticket).await {
                    log::debug!("API connection: {e}");
                }
            }
        },
    ))
    .detach();
    let sessions_app = app.clone();
    ex.spawn(accept_loop(
        event,
        acceptor,
        Gate::new("event", caps.event),
        ex.clone(),
        move |stream, mut ticket| {
            let app = sessions_app.clone();
            async move {
                if let Err(e) = events::serve(stream, &app, &mut ticket).await {
                    log::debug!("event session: {e}");
                }
            }
        },
    ))
    .detach();
    let started_at = clock::now();
    let housekeeping_app = app.clone();
    ex.spawn(async move {
        loop {
            Timer::after(app::HOUSEKEEPING_INTERVAL).await;
            let app = housekeeping_app.clone();
            smol::unblock(move || app.housekeeping(started_at)).await;
        }
    })
    .detach();

    let (stop, stopped) = smol::channel::bounded::<()>(1);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_EXECUTOR_THREADS);
    let mut workers = Vec::with_capacity(threads);
    for index in 0..threads {
        let (ex, stopped) = (ex.clone(), stopped.clone());
        let name = format!("pce-exec-{index}");
        let worker = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || smol::block_on(ex.run(stopped.recv())))
            .map_err(|source| ServeError::Thread { name, source })?;
        workers.push(worker);
    }

    let signal = signals.wait();
    log::info!("{}: shutting down", signal.map_or_else(|e| e.to_string(), |s| s.as_str().to_string()));
    drop(stop);
    for worker in workers {
        let _ = worker.join();
    }
    app.store().save()?;
    Ok(())
}

/// Raises the soft open-files limit to the hard one (every connection is a file descriptor) and
/// returns the limit in force.
fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            log::warn!("reading the open-files limit: {e}; assuming 1024");
            return 1024;
        }
    };
    let wanted = hard.min(MAX_OPEN_FILES);
    if soft >= wanted {
        log::info!("open files: limit {soft}");
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, wanted, hard) {
        Ok(()) => {
            log::info!("open files: soft limit raised from {soft} to {wanted}");
            wanted
        }
        Err(e) => {
            log::warn!("open files: raising the soft limit {soft} to {wanted}: {e}; staying at {soft}");
            soft
        }
    }
}

/// How many connections each listener holds at once, sized from the open-files limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ConnectionCaps {
    api: usize,
    event: usize,
}

impl ConnectionCaps {
    /// A quarter of the usable descriptors for the API (its connections are short-lived), the
    /// rest for the event service (one long-lived session per agent), each within its own cap.
    fn from_open_files(open_files: u64) -> Self {
        let usable = usize::try_from(open_files.saturating_sub(RESERVED_FILES)).unwrap_or(usize::MAX).max(2);
        let api = (usable / 4).max(MIN_API_CONNECTIONS.min(usable / 2)).min(MAX_API_CONNECTIONS);
        let event = (usable - api).min(MAX_EVENT_CONNECTIONS);
        ConnectionCaps { api, event }
    }
}

/// Binds `addr` with the longest listen backlog the kernel allows (it caps the request at
/// `net.core.somaxconn`): a bolt to the whole fleet brings a burst of connections, and std's
/// backlog of 128 dropped SYNs that the VENs then resent only after a second.
fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
    let bind_error = |source| ServeError::Bind { what, addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(bind_error)?;
    // Linux takes a second listen() on a listening socket as a new backlog.
    nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::MAXALLOWABLE)
        .map_err(|errno| bind_error(io::Error::from(errno)))?;
    TcpListener::try_from(listener).map_err(bind_error)
}

/// Accepts connections, admits them (`admission`: slots, per-source limits, the deadline to
/// authenticate), completes the TLS handshake and hands each stream to `serve` in its own task.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    gate: Arc<Gate>,
    ex: Arc<Executor<'static>>,
    serve: F,
) where
    F: Fn(TlsStream<TcpStream>, Ticket) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (total, pending, per_source) = gate.caps();
    log::info!(
        "{} connections: {total} at once, {pending} of them not yet authenticated, {per_source} such from one source",
        gate.name()
    );
    let serve = Arc::new(serve);
    loop {
        let slot = gate.slot().await;
        gate.pending_room().await;
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Typically out of file descriptors: back off instead of spinning.
                gate.warn(&format!("accepting {} connections: {e}", gate.name()));
                drop(slot);
                Timer::after(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over a limit: closed at once, before any TLS work.
        let Ok(ticket) = gate.admit(slot, peer.ip()) else { continue };
        let _ = tcp.set_nodelay(true);
        let (acceptor, serve) = (acceptor.clone(), serve.clone());
        let evicted = ticket.eviction();
        let connection = async move {
            let deadline = ticket.pending_deadline().unwrap_or_else(Instant::now);
            let handshake =
                smol::future::or(async { acceptor.accept(tcp).await.map_err(|e| e.to_string()) }, async {
                    Timer::at(deadline).await;
                    Err("timed out".to_string())
                });
            match handshake.await {
                Ok(stream) => serve(stream, ticket).await,
                Err(e) => log::debug!("TLS handshake with {peer}: {e}"),
            }
        };
        // An eviction (only while not authenticated) drops the connection, closing it.
        ex.spawn(smol::future::or(connection, async move {
            evicted.await;
            log::debug!("connection from {peer} evicted before it authenticated");
        }))
        .detach();
    }
}

/// Routes API requests: `/ven/` to the VEN API, `/api/` to the admin API.
struct Api(Arc<App>);

impl http::Handler for Api {
    fn admit(&self, head: &Head) -> Admission {
        let path = head.path.as_str();
        let admission = if path.starts_with("/ven/") {
            venapi::admit(&self.0, head)
        } else if path.starts_with(api::PREFIX) {
            api::admit(&self.0, head)
        } else {
            Admission::Refused(Response::with_body(404, "text/plain", b"not found\n".to_vec()))
        };
        match admission {
            Admission::Refused(response) => {
                Admission::Refused(response.header(PROTOCOL_HEADER, ven_proto::PROTOCOL_VERSION.to_string()))
            }
            admitted => admitted,
        }
    }

    fn handle(&self, request: Request) -> Response {
        let path = request.head.path.as_str();
        let response = if path.starts_with("/ven/") {
            venapi::handle(&self.0, &request)
        } else if path.starts_with(api::PREFIX) {
            api::handle(&self.0, &request)
        } else {
            Response::with_body(404, "text/plain", b"not found\n".to_vec())
        };
        response.header(PROTOCOL_HEADER, ven_proto::PROTOCOL_VERSION.to_string())
    }

    fn large_answer_bytes(&self, head: &Head) -> usize {
        if head.path.starts_with("/ven/") { venapi::large_answer_bytes(&self.0, head) } else { 0 }
    }

    fn reject(&self, path: Option<&str>, error: &HttpError) -> Response {
        let status = error.status().unwrap_or(400);
        let message = error.to_string();
        let busy = matches!(error, HttpError::Busy);
        let (kind, token) = if busy {
            (ErrorKind::Internal, "server_busy")
        } else {
            (ErrorKind::BadRequest, "invalid_request")
        };
        let response = match path {
            Some(path) if path.starts_with("/ven/") => venapi::error(status, kind, message),
            Some(path) if path.starts_with(api::PREFIX) => api::error(status, token, &message),
            _ => Response::with_body(status, "text/plain", format!("{message}\n").into_bytes()),
        };
        response.header(PROTOCOL_HEADER, ven_proto::PROTOCOL_VERSION.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_caps_fit_the_open_files_limit() {
        // Debian's default soft limit: both listeners within it.
        let small = ConnectionCaps::from_open_files(1024);
        assert_eq!(small, ConnectionCaps { api: 256, event: 704 });
        // A 20,000 limit holds 10,000 agents' sessions and a burst of API connections.
        let fleet = ConnectionCaps::from_open_files(20_000);
        assert_eq!(fleet, ConnectionCaps { api: 4984, event: 14_952 });
        // A large limit: each listener at its own cap.
        let large = ConnectionCaps::from_open_files(1 << 20);
        assert_eq!(large, ConnectionCaps { api: MAX_API_CONNECTIONS, event: MAX_EVENT_CONNECTIONS });
        // Absurdly small limits still leave a connection to each.
        let tiny = ConnectionCaps::from_open_files(10);
        assert!(tiny.api >= 1 && tiny.event >= 1);
    }
}
