//! The agent: activation, the daemon's threads, and deactivation.
//!
//! Threads of a running agent (all named, all joined on stop):
//! - `main` runs the [`manager::Manager`] loop: heartbeats, policy fetch and apply, status;
//! - `control` serves the CLI on the data directory's Unix socket ([`control`]);
//! - `evsync` holds the event-service connection ([`evsync`]);
//! - `signals` turns SIGTERM/SIGINT into an orderly stop.
//!
//! They talk to the manager over one bounded channel of [`Input`]s ([`INPUT_QUEUE_CAPACITY`]).

pub mod control;
pub mod evsync;
pub mod host;
pub mod manager;
pub mod pce_client;
pub mod status;
pub mod tls;

use std::path::PathBuf;
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};

use crate::firewall::{Firewall, FirewallConfig, FirewallError};
use crate::state::{self, DataDir, Identity, RecordKind, StateError};
use control::{ControlError, ControlRequest, ControlServer};
use pce_client::{ClientError, PceClient};
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
    Stop,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    State(#[from] StateError),
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

/// Pairs with the PCE and stores the identity; nothing is written unless the PCE accepted us
/// over a connection verified against the trusted CA.
pub fn activate(
    data: &DataDir,
    server: &str,
    activation_code: &str,
    trust: &Trust,
    hostname: &str,
) -> Result<Identity, AgentError> {
    if let Some(identity) = state::read_record::<Identity>(&data.identity_path(), RecordKind::Identity)? {
        return Err(AgentError::AlreadyActivated {
            agent_id: identity.agent_id,
            server: identity.management_server,
        });
    }
    tls::split_server(server)?;
    let ca_cert_der = match trust {
        Trust::CaFile(path) => tls::read_ca_file(path)?,
        Trust::CaFingerprint(expected) => tls::fetch_ca_by_fingerprint(server, expected, TLS_PROBE_TIMEOUT)?,
    };
    let client = PceClient::new(server, &ca_cert_der);
    let request = ven_proto::ActivateRequest {
        activation_code: activation_code.to_string(),
        host: host::report(hostname),
    };
    let response = client.activate(&request)?;
    let identity = Identity {
        agent_id: response.agent_id,
        agent_token: response.agent_token,
        hostname: hostname.to_string(),
        management_server: server.to_string(),
        event_port: response.event_port,
        ca_cert_der,
        heartbeat_interval_s: response.heartbeat_interval_s,
        activated_at: crate::clock::now(),
    };
    data.ensure()?;
    state::write_record(&data.identity_path(), RecordKind::Identity, &identity, 0o600)?;
    Ok(identity)
}

/// Tells the PCE we leave, opens the firewall (removes everything ven owns) and forgets the
/// pairing and policy. The PCE being unreachable does not stop a local deactivation: the
/// returned notice says so. A firewall that cannot be opened does: the identity is kept.
pub fn deactivate(
    data: &DataDir,
    firewall: &Firewall,
    client: &PceClient,
) -> Result<Option<String>, AgentError> {
    let pce_notice = client.deactivate().err().map(|e| e.to_string());
    firewall.remove()?;
    state::remove_record(&data.policy_path())?;
    state::remove_record(&data.status_path())?;
    state::remove_record(&data.identity_path())?;
    Ok(pce_notice)
}

/// Deactivation without a running agent.
pub fn deactivate_offline(data: &DataDir) -> Result<Option<String>, AgentError> {
    let identity: Identity =
        state::read_record(&data.identity_path(), RecordKind::Identity)?.ok_or(AgentError::NotActivated)?;
    let client = PceClient::new(&identity.management_server, &identity.ca_cert_der)
        .with_credentials(identity.agent_id, &identity.agent_token);
    deactivate(data, &Firewall::new(FirewallConfig::default()), &client)
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(data: DataDir) -> Result<(), AgentError> {
    data.ensure()?;
    // INVARIANT: the signals are blocked before any thread starts, so every thread inherits the
    // mask and only the `signals` thread ever receives them.
    let mut termination = SigSet::empty();
    termination.add(Signal::SIGTERM);
    termination.add(Signal::SIGINT);
    termination.thread_block().map_err(AgentError::Signals)?;

    let (inputs_tx, inputs_rx) = mpsc::sync_channel(INPUT_QUEUE_CAPACITY);
    let status = Arc::new(Mutex::new(StatusReport::unpaired()));
    let control = ControlServer::start(&data.socket_path(), status.clone(), inputs_tx.clone())?;
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

    log::info!("ven {} starting with data directory {}", env!("CARGO_PKG_VERSION"), data.root().display());
    manager::Manager::new(data, Firewall::new(FirewallConfig::default()), status, inputs_tx).run(inputs_rx);
    control.stop();
    if !signals.is_finished() {
        // The manager stopped for another reason: wake the signal thread so it can be joined.
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGTERM);
    }
    let _ = signals.join();
    Ok(())
}

/// `d` with up to ±10 % of random jitter, so that many VENs do not beat in step.
pub fn jitter(d: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
    let factor = 0.9 + f64::from(byte[0]) / 255.0 * 0.2;
    d.mul_f64(factor)
}
