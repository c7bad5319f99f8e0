//! The agent: activation, the daemon's threads, and deactivation.
//!
//! Threads of a running agent (all named, all joined on stop):
//! - `main` runs the [`manager::Manager`] loop: heartbeats, policy fetch and apply, status;
//! - `control` serves the CLI on the data directory's Unix socket ([`control`]);
//! - `evsync` holds the event-service connection ([`evsync`]);
//! - `signals` turns SIGTERM/SIGINT into an orderly stop;
//! - `flows` reads the firewall's NFLOG group and `flowstore` stores its flushes
//!   ([`crate::flows::FlowPipeline`]);
//! - `uploader` sends the stored flows to the PCE ([`uploader`]);
//! - `netwatch` hints the manager when interfaces or addresses change ([`netwatch`]).
//!
//! They talk to the manager over one bounded channel of [`Input`]s ([`INPUT_QUEUE_CAPACITY`]).
//! The manager supervises `control`, `flows`/`flowstore`, `uploader`, `netwatch` and `evsync`
//! ([`monitor`]):
//! one that ends is counted, reported and started again with backoff.

pub mod clone_token;
pub mod control;
pub mod evsync;
pub mod host;
pub mod lifecycle;
pub mod manager;
pub mod monitor;
pub mod netwatch;
pub mod notify;
pub mod pce_client;
pub mod services;
pub mod status;
pub mod supportreport;
pub mod tls;
pub mod upgrade;
pub mod uploader;

use std::path::PathBuf;
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};

use crate::config::{Config, ConfigError};
use crate::firewall::{Firewall, FirewallConfig, FirewallError};
use crate::history::History;
use crate::state::{self, DataDir, Identity, RecordKind, StateError};
use control::{ControlError, ControlRequest, ControlServer};
pub use lifecycle::{BootRestore, FirewallAfter};
use pce_client::ClientError;

use status::StatusReport;
use tls::TlsError;

/// Capacity of the manager's input queue. Events are hints and are dropped when it is full;
/// control requests and the stop signal wait for room.
pub const INPUT_QUEUE_CAPACITY: usize = 16;
const TLS_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the manager reacts to besides its own heartbeat timer.
pub enum Input {
    Event(ven_proto::frame::Event),
    Control(ControlRequest, SyncSender<control::ControlResponse>),
    /// A supervised thread ended (its name); the manager's monitor takes it from there.
    WorkerEnded(&'static str),
    /// The host's interfaces or addresses changed (`netwatch`): report them to the PCE now.
    HostChanged,
    Stop,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Service(#[from] crate::cli::service::ServiceError),
    /// `ven check-env` found a failing check (each is printed with its hint).
    #[error("some checks failed; see the hints above")]
    ChecksFailed,
    #[error(transparent)]
    SupportReport(#[from] crate::cli::supportreport::SupportError),
    #[error("upgrade: {0}")]
    Upgrade(String),
    #[error("cannot start {} agent after an upgrade step: {cause}", binary.display())]
    Relaunch { binary: std::path::PathBuf, cause: std::io::Error },
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Pce(#[from] ClientError),
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    #[error("this VEN is already activated as agent {agent_id} with {server}; run `ven deactivate` first")]
    AlreadyActivated { agent_id: u64, server: String },
    #[error("this VEN is not activated")]
    NotActivated,
    #[error("no firewall was saved at activation; deactivate with --firewall open")]
    NoSavedFirewall,
    #[error("this VEN is already suspended (`ven unsuspend` resumes it)")]
    AlreadySuspended,
    #[error("this VEN is not suspended")]
    NotSuspended,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    History(#[from] crate::history::HistoryError),
    #[error(transparent)]
    Flows(#[from] crate::flows::store::StoreError),
    #[error("no firewall change number {0} in the history (`ven history` lists them)")]
    NoHistoryEntry(u64),
    #[error("the agent refused: {0}")]
    Refused(String),
    #[error("cannot start the {thread} thread: {cause}")]
    Thread { thread: &'static str, cause: std::io::Error },
    #[error("cannot block termination signals: {0}")]
    Signals(nix::Error),
}

/// How `ven activate` establishes trust in the PCE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// SHA-256 of the PCE's CA certificate, normalised lowercase hex.
    CaFingerprint(String),
    CaFile(PathBuf),
}

/// The firewall as the configuration describes it (backend detected when `auto`).
pub fn firewall(config: &Config) -> Firewall {
    Firewall::new(FirewallConfig::from_config(config))
}

/// The pieces an offline command needs: the identity, its client and the firewall.
struct Offline {
    identity: Identity,
    firewall: Firewall,
    history: History,
}

impl Offline {
    fn load(data: &DataDir, config: &Config) -> Result<Self, AgentError> {
        let identity: Identity = state::read_record(&data.identity_path(), RecordKind::Identity)?
            .ok_or(AgentError::NotActivated)?;
        Ok(Self { identity, firewall: firewall(config), history: History::new(data) })
    }
}

/// Deactivation without a running agent.
pub fn deactivate_offline(
    data: &DataDir,
    config: &Config,
    after: FirewallAfter,
) -> Result<Option<String>, AgentError> {
    let offline = Offline::load(data, config)?;
    lifecycle::deactivate(
        data,
        &offline.firewall,
        &lifecycle::client(&offline.identity, data, clone_token::one_shot_instance()),
        after,
        &offline.history,
    )
}

/// Suspension without a running agent.
pub fn suspend_offline(data: &DataDir, config: &Config) -> Result<Option<String>, AgentError> {
    let offline = Offline::load(data, config)?;
    let applied = state::read_record::<ven_proto::Policy>(&data.policy_path(), RecordKind::Policy)?;
    lifecycle::suspend(
        data,
        &offline.firewall,
        &lifecycle::client(&offline.identity, data, clone_token::one_shot_instance()),
        applied.as_ref(),
        &offline.history,
    )
}

/// Unsuspension without a running agent.
pub fn unsuspend_offline(data: &DataDir, config: &Config) -> Result<Option<String>, AgentError> {
    let offline = Offline::load(data, config)?;
    let safeguards = lifecycle::safeguards(&offline.identity);
    let (_, notice) = lifecycle::unsuspend(
        data,
        &offline.firewall,
        &lifecycle::client(&offline.identity, data, clone_token::one_shot_instance()),
        &safeguards,
        &offline.history,
    )?;
    Ok(notice)
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(data: DataDir, config: Config) -> Result<(), AgentError> {
    data.ensure()?;
    // Files in log/ from now on; stderr too when something captures it (procd, systemd) or an
    // operator watches it.
    let also_stderr = crate::logging::supervised() || std::io::IsTerminal::is_terminal(&std::io::stderr());
    if let Err(e) = crate::logging::init_daemon(&data.log_dir(), config.logs, also_stderr) {
        log::error!("{e}; logging to stderr only");
    }
    // Before any thread and before the signals are blocked: this process may become a release
    // on trial, or roll one back (issue 16).
    upgrade::launch(&data, &config);
    // INVARIANT: the signals are blocked before any thread starts, so every thread inherits the
    // mask and only the `signals` thread ever receives them.
    let mut termination = SigSet::empty();
    termination.add(Signal::SIGTERM);
    termination.add(Signal::SIGINT);
    termination.thread_block().map_err(AgentError::Signals)?;

    let (inputs_tx, inputs_rx) = mpsc::sync_channel(INPUT_QUEUE_CAPACITY);
    monitor::set_fault(config.test_fault.clone());
    monitor::set_wake(Some(inputs_tx.clone()));
    let mut workers = monitor::Monitor::default();
    let status = Arc::new(Mutex::new(StatusReport::unpaired()));
    let live_counters = Arc::new(std::sync::OnceLock::new());
    let socket = data.socket_path();
    let (control_status, control_live, control_inputs) =
        (status.clone(), Arc::clone(&live_counters), inputs_tx.clone());
    let start_control = move || {
        ControlServer::start(
            &socket,
            control_status.clone(),
            Arc::clone(&control_live),
            control_inputs.clone(),
        )
    };
    // The first start's refusal (another agent serves this data directory) stops this one.
    let control = start_control()?;
    workers.adopt(
        "control",
        Some(Box::new(control)),
        Box::new(move || {
            Ok(Box::new(start_control().map_err(std::io::Error::other)?) as Box<dyn monitor::Worker>)
        }),
    );
    let signal_inputs = inputs_tx.clone();
    let signals = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(signal) = termination.wait() {
                log::info!("{signal:?} received, stopping");
            }
            let _ = signal_inputs.send(Input::Stop);
        })
        .map_err(|cause| AgentError::Thread { thread: "signals", cause })?;

    upgrade::identify_running_release(&data);
    log::info!(
        "ven {} ({}) starting with data directory {}",
        upgrade::agent_version(),
        env!("CARGO_PKG_VERSION"),
        data.root().display()
    );
    for key in &config.unknown_keys {
        log::warn!("configuration: unknown key {key} ignored (a newer or older version's setting?)");
    }
    let firewall_config = FirewallConfig::from_config(&config);
    log::info!(
        "firewall: iptables backend {} ({}), IPv6 {}",
        firewall_config.tools.backend.as_str(),
        firewall_config.tools.iptables_restore.display(),
        if firewall_config.options.ipv6 { "on" } else { "off" }
    );
    let backend = firewall_config.tools.backend.as_str();
    let firewall = Firewall::new(firewall_config);
    // The flow pipeline is best effort: without it the firewall still enforces.
    let flow_settings = crate::flows::PipelineSettings::from_config(&config);
    // One store for both writers, so that their calls are serialised by it rather than by
    // redb's file lock.
    let store = Arc::new(crate::flows::store::FlowStore::new(&data.log_dir(), config.logs));
    // Counted across restarts of their threads.
    let flow_stats = Arc::new(crate::flows::FlowStats::new());
    let upload_stats = Arc::new(uploader::UploadStats::default());
    let (flows_store, flows_stats) = (Arc::clone(&store), Arc::clone(&flow_stats));
    workers.start(
        "flows",
        Box::new(move || {
            let sink = Box::new(Arc::clone(&flows_store));
            let pipeline =
                crate::flows::FlowPipeline::start_counting(flow_settings, sink, Arc::clone(&flows_stats))?;
            Ok(Box::new(pipeline) as Box<dyn monitor::Worker>)
        }),
    );
    let status_store = Arc::clone(&store);
    let (upload_data, upload_interval, uploads) =
        (data.clone(), config.flows.upload_interval, Arc::clone(&upload_stats));
    workers.start(
        "uploader",
        Box::new(move || {
            let uploader = uploader::Uploader::start(
                upload_data.clone(),
                Arc::clone(&store),
                upload_interval,
                Arc::clone(&uploads),
            )?;
            Ok(Box::new(uploader) as Box<dyn monitor::Worker>)
        }),
    );
    let netwatch_inputs = inputs_tx.clone();
    workers.start(
        "netwatch",
        Box::new(move || {
            Ok(Box::new(netwatch::NetWatch::start(netwatch_inputs.clone())?) as Box<dyn monitor::Worker>)
        }),
    );
    let event_stats = Arc::new(evsync::EventStats::default());
    let _ = live_counters.set(control::LiveCounters {
        flows: Some(Arc::clone(&flow_stats)),
        uploads: Some(Arc::clone(&upload_stats)),
        config_warnings: config.unknown_keys.clone(),
        events: Some(Arc::clone(&event_stats)),
        store: Some(status_store),
    });
    // The manager stops the workers when it stops.
    let relaunch = manager::Manager::new(data, config, firewall, status, inputs_tx)
        .with_flow_stats(Some(flow_stats), Some(upload_stats))
        .with_monitor(workers)
        .with_status_all(event_stats, backend)
        .run(inputs_rx);
    monitor::set_wake(None);
    if !signals.is_finished() {
        // The manager stopped for another reason: wake the signal thread so it can be joined.
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGTERM);
    }
    let _ = signals.join();
    if let Some(binary) = relaunch {
        // An upgrade staged or rolled back: the installed binary takes this process over.
        return Err(AgentError::Relaunch { binary: binary.clone(), cause: upgrade::relaunch(&binary) });
    }
    Ok(())
}

/// `d` with up to ±10 % of random jitter, so that many VENs do not beat in step.
pub fn jitter(d: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
    let factor = 0.9 + f64::from(byte[0]) / 255.0 * 0.2;
    d.mul_f64(factor)
}
