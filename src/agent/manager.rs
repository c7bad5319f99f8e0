//! AgentManager: the agent's main loop. It owns the pairing, heartbeats, fetching and applying
//! the policy, and the connectivity state; everything else reaches it as an [`Input`] on one
//! bounded channel, so it never races itself.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ven_proto::frame::Event;
use ven_proto::{HeartbeatRequest, HostReport, Policy, PolicyState};

use super::control::{ControlRequest, ControlResponse};
use super::evsync::EventSync;
use super::pce_client::PceClient;
use super::status::{Connectivity, HeartbeatTracker, StatusReport};
use super::{Input, host, jitter};
use crate::firewall::{Firewall, Safeguards};
use crate::state::{self, DataDir, Identity, RecordKind, SavedStatus};

/// The PCE's interval is honoured within these bounds.
const MIN_HEARTBEAT: Duration = Duration::from_secs(1);
const MAX_HEARTBEAT: Duration = Duration::from_secs(3600);
/// After a failed heartbeat the next try comes sooner than the interval: 15 s, 30 s, ...
const FIRST_HEARTBEAT_RETRY: Duration = Duration::from_secs(15);
/// The spec's lost-agent retry period.
const LOST_AGENT_RETRY: Duration = Duration::from_secs(4 * 3600);
/// How long an unpaired agent sleeps between checks for an identity (`ven activate` also wakes it).
const UNPAIRED_RECHECK: Duration = Duration::from_secs(60);

struct Pairing {
    identity: Identity,
    client: PceClient,
    safeguards: Safeguards,
    events: Option<EventSync>,
}

pub struct Manager {
    data: DataDir,
    firewall: Firewall,
    status: Arc<Mutex<StatusReport>>,
    inputs: SyncSender<Input>,
    pairing: Option<Pairing>,
    /// The policy the firewall carries now (also the last-known-good record on disk).
    applied: Option<Policy>,
    apply_error: Option<String>,
    heartbeats: HeartbeatTracker,
    heartbeat_interval: Duration,
    next_heartbeat: Instant,
    last_heartbeat: Option<u64>,
    reported_host: Option<HostReport>,
    /// A version the firewall rejected is fetched again only after this instant (one heartbeat
    /// interval), so that reporting the rejection cannot turn into a fetch-and-fail loop.
    rejected: Option<(u64, Instant)>,
}

impl Manager {
    pub fn new(
        data: DataDir,
        firewall: Firewall,
        status: Arc<Mutex<StatusReport>>,
        inputs: SyncSender<Input>,
    ) -> Self {
        Self {
            data,
            firewall,
            status,
            inputs,
            pairing: None,
            applied: None,
            apply_error: None,
            heartbeats: HeartbeatTracker::new(),
            heartbeat_interval: Duration::from_secs(300),
            next_heartbeat: Instant::now(),
            last_heartbeat: None,
            reported_host: None,
            rejected: None,
        }
    }

    pub fn run(mut self, inputs: Receiver<Input>) {
        self.load_identity();
        self.restore_last_known_good();
        self.publish_status();
        loop {
            let wait = match self.pairing {
                Some(_) => self.next_heartbeat.saturating_duration_since(Instant::now()),
                None => UNPAIRED_RECHECK,
            };
            match inputs.recv_timeout(wait) {
                Ok(Input::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(Input::Event(event)) => self.on_event(event),
                Ok(Input::Control(request, reply)) => {
                    let response = self.on_control(request);
                    let _ = reply.try_send(response);
                }
                Err(RecvTimeoutError::Timeout) if self.pairing.is_some() => self.heartbeat(),
                Err(RecvTimeoutError::Timeout) => self.load_identity(),
            }
            self.publish_status();
        }
        self.shutdown();
    }

    fn load_identity(&mut self) {
        let identity = match state::read_record::<Identity>(&self.data.identity_path(), RecordKind::Identity)
        {
            Ok(Some(identity)) => identity,
            Ok(None) => return,
            Err(e) => {
                log::error!("{e}; run `ven deactivate` and activate again");
                return;
            }
        };
        if let Some(old) = self.pairing.take() {
            if let Some(events) = old.events {
                events.stop();
            }
        }
        let client = PceClient::new(&identity.management_server, &identity.ca_cert_der)
            .with_credentials(identity.agent_id, &identity.agent_token);
        let safeguards = Safeguards { management: management_endpoints(&identity) };
        let events = match EventSync::start(&identity, self.inputs.clone()) {
            Ok(events) => Some(events),
            Err(e) => {
                log::error!("cannot start the event thread: {e}; policy arrives with heartbeats only");
                None
            }
        };
        log::info!("paired as agent {} with PCE {}", identity.agent_id, identity.management_server);
        self.heartbeat_interval =
            Duration::from_secs(u64::from(identity.heartbeat_interval_s)).max(MIN_HEARTBEAT);
        self.pairing = Some(Pairing { identity, client, safeguards, events });
        self.heartbeats = HeartbeatTracker::new();
        self.next_heartbeat = Instant::now();
    }

    /// Puts the last-known-good policy back in force before the PCE is asked anything, so that a
    /// restarted agent enforces at once and keeps enforcing while the PCE is unreachable.
    fn restore_last_known_good(&mut self) {
        let Some(pairing) = &self.pairing else { return };
        let policy = match state::read_record::<Policy>(&self.data.policy_path(), RecordKind::Policy) {
            Ok(Some(policy)) => policy,
            Ok(None) => return,
            Err(e) => {
                log::error!("{e}; waiting for the PCE's policy");
                return;
            }
        };
        match self.firewall.apply(&policy, &pairing.safeguards) {
            Ok(_) => {
                log::info!("restored last-known-good policy version {} ({})", policy.version, policy.state);
                self.applied = Some(policy);
            }
            Err(e) => {
                log::error!("cannot restore last-known-good policy version {}: {e}", policy.version);
                self.apply_error = Some(format!("version {}: {e}", policy.version));
            }
        }
        if let Ok(Some(saved)) =
            state::read_record::<SavedStatus>(&self.data.status_path(), RecordKind::Status)
        {
            self.last_heartbeat = saved.last_heartbeat;
        }
    }

    fn applied_version(&self) -> u64 {
        self.applied.as_ref().map_or(0, |p| p.version)
    }

    fn heartbeat(&mut self) {
        let Some(pairing) = &self.pairing else { return };
        let host = host::report(&pairing.identity.hostname);
        let host_changed = self.reported_host.as_ref() != Some(&host);
        let request = HeartbeatRequest {
            applied_policy_version: self.applied_version(),
            applied_state: self.applied.as_ref().map_or(PolicyState::Idle, |p| p.state),
            apply_error: self.apply_error.clone(),
            host: host_changed.then(|| host.clone()),
            events: Vec::new(),
        };
        match pairing.client.heartbeat(&request) {
            Ok(response) => {
                if self.heartbeats.connectivity() != Connectivity::Online {
                    log::info!("heartbeat accepted by {}", pairing.client.server());
                }
                self.heartbeats.success();
                self.last_heartbeat = Some(crate::clock::now());
                self.reported_host = Some(host);
                self.heartbeat_interval = Duration::from_secs(u64::from(response.heartbeat_interval_s))
                    .clamp(MIN_HEARTBEAT, MAX_HEARTBEAT);
                self.next_heartbeat = Instant::now() + jitter(self.heartbeat_interval);
                if response.policy_version != self.applied_version()
                    && !self.recently_rejected(response.policy_version)
                {
                    self.sync_policy();
                }
            }
            Err(e) if e.is_unauthorized() => {
                log::error!("{e}: this VEN is a lost agent; retrying every 4 hours (re-activate to recover)");
                self.heartbeats.unauthorized();
                self.next_heartbeat = Instant::now() + LOST_AGENT_RETRY;
            }
            Err(e) => {
                self.heartbeats.miss();
                let misses = self.heartbeats.misses_in_a_row();
                let retry =
                    FIRST_HEARTBEAT_RETRY.saturating_mul(1 << misses.min(8)).min(self.heartbeat_interval);
                log::warn!(
                    "heartbeat failed ({misses} in a row, {}): {e}; enforcing policy version {} meanwhile",
                    self.heartbeats.connectivity().as_str(),
                    self.applied_version()
                );
                self.next_heartbeat = Instant::now() + jitter(retry);
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            // INVARIANT: a diminished VEN ignores policy bolts (the spec); heartbeats still sync.
            Event::PolicyChanged { version } => {
                if self.heartbeats.connectivity() == Connectivity::Diminished {
                    log::info!("ignoring policy event for version {version} while diminished");
                } else if version != self.applied_version() && !self.recently_rejected(version) {
                    self.sync_policy();
                }
            }
        }
    }

    fn sync_policy(&mut self) {
        let Some(pairing) = &self.pairing else { return };
        match pairing.client.policy(self.applied_version()) {
            Ok(Some(policy)) => self.apply(policy),
            Ok(None) => {}
            Err(e) if e.is_unauthorized() => self.heartbeats.unauthorized(),
            Err(e) => log::warn!("cannot fetch the policy: {e}"),
        }
    }

    fn apply(&mut self, policy: Policy) {
        let Some(pairing) = &self.pairing else { return };
        match self.firewall.apply(&policy, &pairing.safeguards) {
            Ok(summary) => {
                log::info!(
                    "applied policy version {} ({}): {} rules, {} sets (+{} -{} members)",
                    policy.version,
                    policy.state,
                    summary.rules,
                    summary.sets,
                    summary.set_members_added,
                    summary.set_members_removed
                );
                if let Err(e) =
                    state::write_record(&self.data.policy_path(), RecordKind::Policy, &policy, 0o600)
                {
                    log::error!(
                        "policy version {} is in force but not saved for the next boot: {e}",
                        policy.version
                    );
                }
                self.applied = Some(policy);
                self.apply_error = None;
                self.rejected = None;
                self.save_status();
            }
            Err(e) => {
                log::error!(
                    "policy version {} rejected, version {} stays in force: {e}",
                    policy.version,
                    self.applied_version()
                );
                self.apply_error = Some(format!("version {}: {e}", policy.version));
                self.rejected = Some((policy.version, Instant::now() + self.heartbeat_interval));
            }
        }
        // Tell the PCE what the firewall carries now rather than at the next interval.
        self.next_heartbeat = Instant::now();
    }

    fn recently_rejected(&self, version: u64) -> bool {
        matches!(self.rejected, Some((rejected, until)) if rejected == version && Instant::now() < until)
    }

    fn on_control(&mut self, request: ControlRequest) -> ControlResponse {
        match request {
            ControlRequest::Status => self.status.lock().map_or_else(
                |_| ControlResponse::Failed("status unavailable".into()),
                |report| ControlResponse::Status(report.clone()),
            ),
            ControlRequest::IdentityChanged => {
                self.load_identity();
                match self.pairing {
                    Some(_) => ControlResponse::Done,
                    None => ControlResponse::Failed("no identity found in the data directory".into()),
                }
            }
            ControlRequest::Deactivate => {
                let Some(pairing) = self.pairing.take() else {
                    return ControlResponse::Failed("this VEN is not activated".into());
                };
                if let Some(events) = pairing.events {
                    events.stop();
                }
                match super::deactivate(&self.data, &self.firewall, &pairing.client) {
                    Ok(pce_notice) => {
                        self.applied = None;
                        self.apply_error = None;
                        self.last_heartbeat = None;
                        self.heartbeats = HeartbeatTracker::new();
                        ControlResponse::Deactivated { pce_notice }
                    }
                    Err(e) => {
                        // Keep the pairing: the operator can retry once the cause is fixed.
                        self.load_identity();
                        ControlResponse::Failed(e.to_string())
                    }
                }
            }
        }
    }

    fn publish_status(&self) {
        let Ok(mut report) = self.status.lock() else { return };
        *report = StatusReport::unpaired();
        report.agent_running = true;
        report.connectivity = Connectivity::Unpaired;
        if let Some(pairing) = &self.pairing {
            report.set_identity(&pairing.identity);
            report.connectivity = self.heartbeats.connectivity();
        }
        report.policy_state = self.applied.as_ref().map(|p| p.state);
        report.policy_version = self.applied.as_ref().map(|p| p.version);
        report.last_heartbeat = self.last_heartbeat;
        report.last_apply_error = self.apply_error.clone();
    }

    fn save_status(&self) {
        if self.pairing.is_none() {
            return;
        }
        let saved =
            SavedStatus { last_heartbeat: self.last_heartbeat, last_apply_error: self.apply_error.clone() };
        if let Err(e) = state::write_record(&self.data.status_path(), RecordKind::Status, &saved, 0o600) {
            log::warn!("{e}");
        }
    }

    /// Says goodbye so the PCE marks the workload offline at once. The firewall stays as it is:
    /// enforcement does not depend on the agent running.
    fn shutdown(mut self) {
        self.save_status();
        if let Some(pairing) = self.pairing.take() {
            if let Some(events) = pairing.events {
                events.stop();
            }
            match pairing.client.goodbye("agent stopped") {
                Ok(()) => log::info!("said goodbye to the PCE"),
                Err(e) => log::warn!("could not say goodbye: {e}"),
            }
        }
        log::info!("stopped; the firewall keeps policy version {}", self.applied_version());
    }
}

/// Outbound endpoints that must stay open: the VEN API and the event service, on every address
/// the management server's name resolves to now.
fn management_endpoints(identity: &Identity) -> Vec<SocketAddr> {
    let (host, api_port) = match identity.management_server.rsplit_once(':') {
        Some((host, port)) => (host.trim_start_matches('[').trim_end_matches(']'), port.parse().unwrap_or(0)),
        None => return Vec::new(),
    };
    let mut endpoints = Vec::new();
    for port in [api_port, identity.event_port] {
        match (host, port).to_socket_addrs() {
            Ok(addrs) => endpoints.extend(addrs),
            Err(e) => log::error!("cannot resolve the PCE {host}: {e}; its channel cannot be safeguarded"),
        }
    }
    endpoints.sort();
    endpoints.dedup();
    endpoints
}
