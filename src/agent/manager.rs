//! AgentManager: the agent's main loop. It owns the pairing, heartbeats, fetching and applying
//! the policy, the tamper checks, suspension and the connectivity state; everything else reaches
//! it as an [`Input`] on one bounded channel, so it never races itself.
//!
//! Timers (one thread, no busy loop: it sleeps until the earliest is due or an input arrives):
//! the heartbeat (the PCE's interval, jittered), the quick tamper check (`canary_interval`) and
//! the full tamper check (`tamper_check_interval`, the spec's 10 minutes). A suspended agent has
//! no timers: it only answers the control socket.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ven_proto::frame::Event;
use ven_proto::{
    AgentEvent, AgentEventKind, HeartbeatRequest, HostReport, MAX_EVENTS_PER_HEARTBEAT, Policy, PolicyState,
};

use super::control::{ControlRequest, ControlResponse};
use super::evsync::EventSync;
use super::lifecycle::{self, FirewallAfter};
use super::monitor::{Monitor, Worker};
use super::pce_client::{ClientError, PceClient};
use super::status::{Connectivity, HeartbeatTracker, StatusReport};
use super::{Input, host, jitter};
use crate::config::Config;
use crate::firewall::{CheckDepth, Firewall, FirewallError, Safeguards};
use crate::history::{ChangeReason, History};
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
/// How long a suspended agent sleeps when nothing arrives (it has no work of its own).
const SUSPENDED_WAIT: Duration = Duration::from_secs(3600);
/// Events kept for the PCE while it is unreachable; the oldest are dropped (and counted) beyond.
const PENDING_EVENTS_CAPACITY: usize = 64;
/// A tamper check waits at least this many times the last check's duration after it.
const CHECK_COST_FACTOR: u32 = 50;
/// Longest tamper summary kept (drift lines are joined into it).
const MAX_TAMPER_SUMMARY_CHARS: usize = 1000;

struct Pairing {
    identity: Identity,
    client: PceClient,
    safeguards: Safeguards,
}

pub struct Manager {
    data: DataDir,
    config: Config,
    firewall: Firewall,
    history: History,
    status: Arc<Mutex<StatusReport>>,
    inputs: SyncSender<Input>,
    pairing: Option<Pairing>,
    /// The policy the firewall carries now (also the last-known-good record on disk).
    applied: Option<Policy>,
    apply_error: Option<String>,
    heartbeats: HeartbeatTracker,
    heartbeat_interval: Duration,
    next_heartbeat: Instant,
    next_quick_check: Instant,
    next_full_check: Instant,
    last_heartbeat: Option<u64>,
    /// The PCE took this copy of the agent for a clone (kept in `state/clone-suspected`).
    suspected_clone: Option<state::CloneSuspicion>,
    reported_host: Option<HostReport>,
    /// When the full host report is due again, changed or not (`interface_report_interval`).
    next_host_report: Instant,
    /// The listening services, read every `service_report_interval`; `None` once the PCE said
    /// it does not take them.
    services: Option<super::services::Scanner>,
    next_services_scan: Instant,
    /// The last scan's services have not reached the PCE yet.
    services_unsent: bool,
    /// A version the firewall rejected is fetched again only after this instant (one heartbeat
    /// interval), so that reporting the rejection cannot turn into a fetch-and-fail loop.
    rejected: Option<(u64, Instant)>,
    suspended: bool,
    /// Events for the PCE, oldest first, at most [`PENDING_EVENTS_CAPACITY`].
    pending_events: VecDeque<AgentEvent>,
    dropped_events: u64,
    tamper_count: u64,
    last_tamper: Option<(u64, String)>,
    /// The flow pipeline's counters, when it runs.
    flow_stats: Option<Arc<crate::flows::FlowStats>>,
    upload_stats: Option<Arc<super::uploader::UploadStats>>,
    /// The supervised worker threads (`evsync` is added while paired); stopped last.
    monitor: Monitor,
    /// What `ven status --all` adds (issue 16).
    all: AllFigures,
    /// The support report the PCE asked for, built and uploaded on a thread of its own.
    support_reports: super::supportreport::SupportReporter,
    /// Releases the PCE orders, downloaded and staged on a thread of its own.
    upgrader: super::upgrade::Upgrader,
    /// The last release the PCE ordered (what `ven upgrade` without a version asks for).
    upgrade_order: Option<String>,
    /// This process is a new release on trial: it commits once healthy, or rolls back.
    trial: Option<super::upgrade::Trial>,
    /// The binary to start when the manager stops (an upgrade staged or rolled back).
    relaunch: Option<std::path::PathBuf>,
    /// The last self-upgrade, for `ven status`.
    upgrade_note: Option<String>,
}

/// The manager's figures behind `ven status --all` ([`super::status::AgentDetail`]).
#[derive(Default)]
struct AllFigures {
    started_at: u64,
    firewall_backend: &'static str,
    event_stats: Arc<super::evsync::EventStats>,
    last_heartbeat_error: Option<(u64, String)>,
    pce_policy_version: Option<u64>,
    policy_applied_at: Option<u64>,
    tamper_checks: u64,
    last_tamper_check: Option<u64>,
    last_tamper_check_error: Option<String>,
}

impl Manager {
    pub fn new(
        data: DataDir,
        config: Config,
        firewall: Firewall,
        status: Arc<Mutex<StatusReport>>,
        inputs: SyncSender<Input>,
    ) -> Self {
        let history = History::new(&data);
        let data_for_reports = data.clone();
        let upgrader = super::upgrade::Upgrader::new(data.clone(), config.clone());
        let now = Instant::now();
        Self {
            data,
            next_quick_check: now + config.canary_interval,
            next_full_check: now + config.tamper_check_interval,
            config,
            firewall,
            history,
            status,
            inputs,
            pairing: None,
            applied: None,
            apply_error: None,
            heartbeats: HeartbeatTracker::new(),
            heartbeat_interval: Duration::from_secs(300),
            next_heartbeat: now,
            last_heartbeat: None,
            suspected_clone: None,
            reported_host: None,
            next_host_report: now,
            services: Some(super::services::Scanner::new("/proc", "/etc/passwd")),
            next_services_scan: now,
            services_unsent: false,
            rejected: None,
            suspended: false,
            pending_events: VecDeque::with_capacity(PENDING_EVENTS_CAPACITY),
            dropped_events: 0,
            tamper_count: 0,
            last_tamper: None,
            flow_stats: None,
            upload_stats: None,
            monitor: Monitor::default(),
            all: AllFigures { started_at: crate::clock::now(), ..AllFigures::default() },
            upgrader,
            upgrade_order: None,
            trial: None,
            relaunch: None,
            upgrade_note: None,
            support_reports: super::supportreport::SupportReporter::new(data_for_reports),
        }
    }

    /// For `ven status --all`: the event channel's figures (shared with the control socket)
    /// and the iptables backend in use.
    pub fn with_status_all(mut self, events: Arc<super::evsync::EventStats>, backend: &'static str) -> Self {
        self.all.event_stats = events;
        self.all.firewall_backend = backend;
        self
    }

    /// Shows the flow pipeline's counters in the status.
    pub fn with_flow_stats(
        mut self,
        stats: Option<Arc<crate::flows::FlowStats>>,
        uploads: Option<Arc<super::uploader::UploadStats>>,
    ) -> Self {
        self.flow_stats = stats;
        self.upload_stats = uploads;
        self
    }

    /// Supervises `monitor`'s workers (and stops them when the manager stops).
    pub fn with_monitor(mut self, monitor: Monitor) -> Self {
        self.monitor = monitor;
        self
    }

    /// Runs until stopped; returns the binary to start in this process's place when an upgrade
    /// asks for it (staged, or rolled back).
    pub fn run(mut self, inputs: Receiver<Input>) -> Option<std::path::PathBuf> {
        let mut supervisor = super::notify::Supervisor::from_env();
        // An announcement that no stopping agent consumed is stale.
        let _ = std::fs::remove_file(self.data.restarting_path());
        self.set_conntrack_timeout();
        self.set_conntrack_accounting();
        self.load_saved_status();
        self.suspended = self.data.suspended_path().exists();
        if self.suspended {
            log::info!("suspended: the firewall stays as it is until `ven unsuspend`");
        } else {
            self.load_identity();
            self.restore_last_known_good();
        }
        self.start_upgrade_bookkeeping();
        self.publish_status();
        // Up: the last-known-good policy is in force (or there is none to restore).
        supervisor.ready(&self.state_line());
        loop {
            let now = Instant::now();
            let due = [self.next_deadline(), self.monitor.next_deadline()].into_iter().flatten().min();
            let wait = due.map_or(SUSPENDED_WAIT, |due| due.saturating_duration_since(now));
            // INVARIANT: the init system's watchdog is fed from this loop, never from a thread
            // of its own, so a manager stuck in one operation gets restarted.
            let wait = supervisor.until_next_ping(now).map_or(wait, |ping| wait.min(ping));
            match inputs.recv_timeout(wait) {
                Ok(Input::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(Input::Event(event)) => self.on_event(event),
                Ok(Input::Control(request, reply)) => {
                    let response = self.on_control(request);
                    let _ = reply.try_send(response);
                }
                // The check below collects it.
                Ok(Input::WorkerEnded(_)) => {}
                Ok(Input::HostChanged) => self.on_host_changed(),
                Err(RecvTimeoutError::Timeout) => self.on_timer(),
            }
            self.supervise();
            self.poll_upgrade();
            if self.relaunch.is_some() {
                break;
            }
            self.publish_status();
            supervisor.ping_if_due(Instant::now());
            supervisor.status(&self.state_line());
        }
        supervisor.stopping();
        self.shutdown()
    }

    /// At start: the outcome of an upgrade settled while no agent ran goes to the PCE, and a
    /// trial says it started.
    fn start_upgrade_bookkeeping(&mut self) {
        if let Some(event) = super::upgrade::unreported_outcome(&self.data) {
            self.push_event(event);
        }
        self.trial = super::upgrade::Trial::of_this_process(&self.data);
        if let Some(trial) = &self.trial {
            self.push_event(trial.started_event());
        }
        self.upgrade_note =
            super::upgrade::read_record(&self.data).ok().flatten().as_ref().map(super::upgrade::describe);
    }

    /// The PCE (or `ven upgrade`, `forced`) orders release `version`.
    fn order_upgrade(&mut self, version: &str, forced: bool) -> Result<super::upgrade::Ordered, String> {
        let Some(pairing) = &self.pairing else { return Err("not paired with a PCE".to_string()) };
        // A suspended agent sends no heartbeats: a trial could never report healthy.
        if self.suspended {
            return Err("the VEN is suspended; `ven unsuspend` first".to_string());
        }
        if self.trial.is_some() {
            return Err(format!("release {} is on trial; it settles first", super::upgrade::agent_version()));
        }
        let client =
            super::lifecycle::client(&pairing.identity, &self.data, super::clone_token::agent_instance());
        let answer = self.upgrader.order(version, client, forced);
        // Said once per order, not at every heartbeat that repeats it.
        let new_order = self.upgrade_order.as_deref() != Some(version);
        match &answer {
            Ok(deferred @ super::upgrade::Ordered::Deferred(_)) if new_order => {
                log::info!("{deferred}");
                self.push_event(super::upgrade::step_event(
                    version,
                    ven_proto::UpgradeStep::Deferred,
                    deferred.to_string(),
                ));
            }
            Ok(super::upgrade::Ordered::Deferred(_)) => {}
            Ok(done) if new_order || forced => log::info!("upgrade: {done}"),
            Ok(_) => {}
            Err(why) if new_order || forced => {
                log::warn!("upgrade to {version}: {why}")
            }
            Err(_) => {}
        }
        self.upgrade_order = Some(version.to_string());
        answer
    }

    /// A finished download: the trial starts (this agent stops and the installed binary
    /// launches it), or the refusal is reported.
    fn poll_upgrade(&mut self) {
        match self.upgrader.poll() {
            super::upgrade::Outcome::Relaunch(binary) => self.relaunch = Some(binary),
            super::upgrade::Outcome::Report(Some(event)) => {
                if let ven_proto::AgentEventKind::Upgrade { version, detail, .. } = &event.kind {
                    self.upgrade_note = Some(format!("{version} refused: {detail}"));
                }
                self.push_event(event);
            }
            super::upgrade::Outcome::Report(None) => {}
        }
    }

    /// A trial that is healthy (a heartbeat accepted, no apply error) commits.
    fn commit_trial_if_healthy(&mut self) {
        // The test-only switch keeps a trial unhealthy until its deadline.
        if self.apply_error.is_some() || self.config.test_upgrade_unhealthy {
            return;
        }
        let Some(trial) = self.trial.take() else { return };
        match trial.commit(&self.data, &self.config) {
            Ok((event, note)) => {
                self.upgrade_note = Some(note);
                self.push_event(event);
                // Report it now rather than a heartbeat interval later.
                self.next_heartbeat = Instant::now();
            }
            Err(e) => {
                log::error!("upgrade to {}: cannot commit: {e}; rolling back", trial.version());
                self.relaunch = Some(trial.roll_back(&self.data, &self.config));
            }
        }
    }

    /// One line for the init system (`systemctl status`): connectivity and what is enforced.
    fn state_line(&self) -> String {
        if self.suspended {
            return "suspended: ven's rules are removed until `ven unsuspend`".into();
        }
        if self.pairing.is_none() {
            return "unpaired: waiting for `ven activate`".into();
        }
        let policy = self.applied.as_ref().map_or_else(
            || "no policy yet".to_string(),
            |p| format!("policy version {} ({})", p.version, p.state),
        );
        let error = if self.apply_error.is_some() { ", last apply failed" } else { "" };
        format!("{}; {policy}{error}", self.heartbeats.connectivity().as_str())
    }

    /// The earliest timer, or `None` when the agent has nothing to do on its own.
    fn next_deadline(&self) -> Option<Instant> {
        if self.suspended {
            return None;
        }
        let heartbeat = match self.pairing {
            Some(_) => self.next_exchange(),
            None => Instant::now() + UNPAIRED_RECHECK,
        };
        let checks = self.enforcing().then(|| self.next_quick_check.min(self.next_full_check));
        let services = (self.pairing.is_some() && self.services.is_some()).then_some(self.next_services_scan);
        let trial = self.trial.as_ref().map(super::upgrade::Trial::deadline);
        let due = [Some(heartbeat), checks, services, trial].into_iter().flatten().min();
        Some(due.unwrap_or(heartbeat))
    }

    /// When the next heartbeat goes: its own schedule, or earlier when the full host report is
    /// due; a lost agent keeps its 4-hour retry.
    fn next_exchange(&self) -> Instant {
        if self.heartbeats.connectivity().is_refused() {
            self.next_heartbeat
        } else {
            self.next_heartbeat.min(self.next_host_report)
        }
    }

    /// Whether a policy of ours is in the firewall (something to check for tampering).
    fn enforcing(&self) -> bool {
        self.applied.as_ref().is_some_and(|policy| policy.state != PolicyState::Idle)
    }

    fn on_timer(&mut self) {
        // INVARIANT: a suspended agent does no work of its own (no checks, no heartbeats) until
        // `unsuspend`; its long wait only ends here when nothing arrived.
        if self.suspended {
            return;
        }
        let now = Instant::now();
        if self.trial.as_ref().is_some_and(|trial| now >= trial.deadline()) {
            // Not healthy in time: the old binary is started again.
            if let Some(trial) = self.trial.take() {
                self.relaunch = Some(trial.roll_back(&self.data, &self.config));
            }
            return;
        }
        if self.enforcing() && now >= self.next_full_check {
            self.check_tamper(CheckDepth::Full);
        } else if self.enforcing() && now >= self.next_quick_check {
            self.check_tamper(CheckDepth::Quick);
        }
        if self.pairing.is_none() {
            self.load_identity();
        } else if now >= self.next_exchange() {
            self.heartbeat();
        }
        if self.pairing.is_some() && now >= self.next_services_scan {
            self.report_services();
        }
    }

    fn set_conntrack_accounting(&self) {
        if !self.config.conntrack_accounting || self.config.flows.accounted_connections() == 0 {
            return;
        }
        match crate::conntrack::set_accounting(true) {
            Ok(()) => log::info!(target: "platform", "nf_conntrack_acct set to 1 (accepted flows' bytes)"),
            Err(e) => log::warn!(target: "platform", "cannot turn conntrack accounting on: {e}"),
        }
    }

    fn set_conntrack_timeout(&self) {
        if let Some(seconds) = self.config.conntrack_established_timeout {
            match crate::conntrack::set_established_timeout(seconds) {
                Ok(()) => {
                    log::info!(target: "platform", "nf_conntrack_tcp_timeout_established set to {seconds} s")
                }
                Err(e) => log::warn!(target: "platform", "cannot set the conntrack established timeout: {e}"),
            }
        }
    }

    fn load_saved_status(&mut self) {
        if let Ok(Some(saved)) =
            state::read_record::<SavedStatus>(&self.data.status_path(), RecordKind::Status)
        {
            self.last_heartbeat = saved.last_heartbeat;
            self.tamper_count = saved.tamper_count;
            self.last_tamper = saved.last_tamper;
        }
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
        self.stop_events();
        let client = lifecycle::client(&identity, &self.data, super::clone_token::agent_instance());
        let safeguards = lifecycle::safeguards(&identity);
        // Without it, policy still arrives with the heartbeats.
        let (events_identity, events_inputs) = (identity.clone(), self.inputs.clone());
        let events_clone_token =
            super::clone_token::CloneToken::new(&self.data, super::clone_token::agent_instance());
        let event_stats = Arc::clone(&self.all.event_stats);
        self.monitor.start(
            "evsync",
            Box::new(move || {
                let events = EventSync::start(
                    &events_identity,
                    events_clone_token.clone(),
                    events_inputs.clone(),
                    Arc::clone(&event_stats),
                )?;
                Ok(Box::new(events) as Box<dyn Worker>)
            }),
        );
        log::info!("paired as agent {} with PCE {}", identity.agent_id, identity.management_server);
        self.heartbeat_interval =
            Duration::from_secs(u64::from(identity.heartbeat_interval_s)).max(MIN_HEARTBEAT);
        self.pairing = Some(Pairing { identity, client, safeguards });
        self.suspected_clone = super::status::read_clone_suspicion(&self.data);
        self.heartbeats = HeartbeatTracker::new();
        self.next_heartbeat = Instant::now();
    }

    fn stop_events(&mut self) {
        self.monitor.remove("evsync");
    }

    /// Reads the listening services and sends them when they changed (or the last send failed).
    fn report_services(&mut self) {
        self.next_services_scan = Instant::now() + self.config.service_report_interval;
        let (Some(pairing), Some(scanner)) = (&self.pairing, self.services.as_mut()) else { return };
        if scanner.scan() {
            self.services_unsent = true;
        }
        if !self.services_unsent || self.heartbeats.connectivity().is_refused() {
            return;
        }
        let report = ven_proto::ServicesReport {
            services: scanner.services().to_vec(),
            omitted: u32::try_from(scanner.omitted()).unwrap_or(u32::MAX),
        };
        match pairing.client.report_services(&report) {
            Ok(()) => self.services_unsent = false,
            Err(e) if e.is_not_found() => {
                log::info!("the PCE does not take listening services ({e}); not sending them again");
                self.services = None;
            }
            Err(e) => crate::log_limited!(log::Level::Warn, "listening services not reported: {e}"),
        }
    }

    /// `netwatch` saw interfaces or addresses change: a heartbeat carries the new report now
    /// (the PCE recomputes the peers' policies), unless nothing the PCE sees changed.
    fn on_host_changed(&mut self) {
        let Some(pairing) = &self.pairing else { return };
        if self.suspended || self.heartbeats.connectivity().is_refused() {
            return;
        }
        let host = host::report(&pairing.identity.hostname);
        if self.reported_host.as_ref() != Some(&host) {
            log::info!("interfaces changed: reporting them to the PCE");
            self.heartbeat();
        }
    }

    /// Restarts the workers whose backoff is over and reports those that ended to the PCE.
    fn supervise(&mut self) {
        for ended in self.monitor.check(Instant::now()) {
            let kind = AgentEventKind::ComponentRestarted {
                component: ended.name.to_string(),
                restarts: ended.restarts,
                cause: ended.cause,
            };
            self.push_event(AgentEvent { at: crate::clock::now(), kind });
        }
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
            Ok(summary) => {
                log::info!(target: "platform", "restored last-known-good policy version {} ({})", policy.version, policy.state);
                if summary.changed {
                    self.record_history(ChangeReason::BootRestore, &policy, "");
                }
                self.applied = Some(policy);
            }
            Err(e) => {
                log::error!(target: "platform", "cannot restore last-known-good policy version {}: {e}", policy.version);
                self.apply_error = Some(format!("version {}: {e}", policy.version));
            }
        }
    }

    fn applied_version(&self) -> u64 {
        self.applied.as_ref().map_or(0, |p| p.version)
    }

    fn heartbeat(&mut self) {
        let Some(pairing) = &self.pairing else { return };
        let host = host::report(&pairing.identity.hostname);
        // Changed, or due again: the PCE's view heals even if it lost or mixed up a report.
        // INVARIANT: the due time moves on whatever the answer, so a failing PCE is retried on
        // the heartbeat's own schedule, never in a loop.
        let now = Instant::now();
        let report_due = now >= self.next_host_report;
        if report_due {
            self.next_host_report = now + self.config.interface_report_interval;
        }
        let host_changed = report_due || self.reported_host.as_ref() != Some(&host);
        let sent_events = self.pending_events.len().min(MAX_EVENTS_PER_HEARTBEAT);
        let request = HeartbeatRequest {
            applied_policy_version: self.applied_version(),
            applied_state: self.applied.as_ref().map_or(PolicyState::Idle, |p| p.state),
            apply_error: self.apply_error.clone(),
            host: host_changed.then(|| host.clone()),
            events: self.pending_events.iter().take(sent_events).cloned().collect(),
            host_uptime_s: host::uptime_s(),
            target: Some(crate::cli::TARGET.to_string()),
        };
        match pairing.client.heartbeat(&request) {
            Ok(response) => {
                if self.heartbeats.connectivity() != Connectivity::Online {
                    log::info!("heartbeat accepted by {}", pairing.client.server());
                }
                self.pending_events.drain(..sent_events);
                self.heartbeats.success();
                if self.suspected_clone.take().is_some() {
                    log::info!("the PCE accepts this copy of the agent again");
                    if let Err(e) = state::remove_record(&self.data.clone_suspected_path()) {
                        log::error!("{e}");
                    }
                }
                self.last_heartbeat = Some(crate::clock::now());
                self.all.pce_policy_version = Some(response.policy_version);
                self.reported_host = Some(host);
                self.heartbeat_interval = Duration::from_secs(u64::from(response.heartbeat_interval_s))
                    .clamp(MIN_HEARTBEAT, MAX_HEARTBEAT);
                // More events than one heartbeat carries: the rest go at once.
                self.next_heartbeat = if self.pending_events.is_empty() {
                    Instant::now() + jitter(self.heartbeat_interval)
                } else {
                    Instant::now()
                };
                if response.policy_version != self.applied_version()
                    && !self.recently_rejected(response.policy_version)
                {
                    self.sync_policy(response.policy_version);
                }
                // Repeated until the report arrives: a lost bolt loses no request.
                if let Some(request) = response.support_report_request {
                    self.support_report(request);
                }
                if self.trial.is_some() {
                    self.commit_trial_if_healthy();
                } else if let Some(version) = response.upgrade {
                    // Repeated while this agent runs another release.
                    let _ = self.order_upgrade(&version, false);
                }
            }
            Err(e) if e.is_suspected_clone() => {
                log::error!(
                    "{e}: this copy of the agent is taken for a clone; keeping policy version {} and \
                     retrying every 4 hours ({})",
                    self.applied_version(),
                    super::status::SUSPECTED_CLONE_ADVICE
                );
                self.all.last_heartbeat_error = Some((crate::clock::now(), e.to_string()));
                self.heartbeats.suspected_clone();
                self.next_heartbeat = Instant::now() + LOST_AGENT_RETRY;
                let reactivation = if self.config.clone_reactivate {
                    match self.reactivate_clone() {
                        Ok(()) => return,
                        Err(why) => format!("; re-pairing failed: {why}"),
                    }
                } else {
                    String::new()
                };
                self.record_clone_suspicion(&e, &reactivation);
            }
            Err(e) if e.is_unauthorized() => {
                log::error!("{e}: this VEN is a lost agent; retrying every 4 hours (re-activate to recover)");
                self.all.last_heartbeat_error = Some((crate::clock::now(), e.to_string()));
                self.heartbeats.unauthorized();
                self.next_heartbeat = Instant::now() + LOST_AGENT_RETRY;
            }
            Err(e) => {
                self.heartbeats.miss();
                self.all.last_heartbeat_error = Some((crate::clock::now(), e.to_string()));
                let misses = self.heartbeats.misses_in_a_row();
                let retry =
                    FIRST_HEARTBEAT_RETRY.saturating_mul(1 << misses.min(8)).min(self.heartbeat_interval);
                log::warn!(
                    "heartbeat failed ({misses} in a row, {}): {e}; enforcing policy version {} meanwhile",
                    self.heartbeats.connectivity().as_str(),
                    self.applied_version()
                );
                self.next_heartbeat = Instant::now() + jitter(retry);
                // INVARIANT: at most one retry at once per change of the name's addresses, so a
                // PCE that is down (same addresses) is retried on the backoff above, never in a loop.
                if matches!(e, ClientError::Unreachable { .. }) && self.follow_management_server() {
                    self.next_heartbeat = Instant::now();
                }
            }
        }
    }

    /// Keeps the PCE's verdict in the data directory, so `ven status` says it with no agent too.
    fn record_clone_suspicion(&mut self, error: &ClientError, reactivation: &str) {
        let message = match error {
            ClientError::Refused { message, .. } => format!("{message}{reactivation}"),
            other => format!("{other}{reactivation}"),
        };
        if self.suspected_clone.as_ref().is_some_and(|s| s.message == message) {
            return;
        }
        let suspicion = state::CloneSuspicion { since: crate::clock::now(), message };
        if let Err(e) = state::write_record(
            &self.data.clone_suspected_path(),
            RecordKind::CloneSuspected,
            &suspicion,
            0o600,
        ) {
            log::error!("{e}");
        }
        self.suspected_clone = Some(suspicion);
    }

    /// Re-pairs this copy, which the PCE takes for a clone, as a workload of its own from the
    /// pairing profile the original came from (`clone_reactivate`, issue 16): the new identity is
    /// written, the event channel and client start over with it, and a heartbeat goes at once.
    /// The host's own name is reported when the PCE would take it, else the copied one.
    fn reactivate_clone(&mut self) -> Result<(), String> {
        let Some(pairing) = &self.pairing else { return Err("not paired".to_string()) };
        let own_name = host::system_hostname();
        let hostname = if host::check_hostname(&own_name).is_ok() {
            own_name
        } else {
            pairing.identity.hostname.clone()
        };
        let response = pairing.client.reactivate(&host::report(&hostname)).map_err(|e| e.to_string())?;
        let identity = Identity {
            agent_id: response.agent_id,
            agent_token: response.agent_token,
            hostname,
            event_port: response.event_port,
            heartbeat_interval_s: response.heartbeat_interval_s,
            activated_at: crate::clock::now(),
            ..pairing.identity.clone()
        };
        state::write_record(&self.data.identity_path(), RecordKind::Identity, &identity, 0o600)
            .map_err(|e| e.to_string())?;
        log::warn!(
            "this copy of agent {} was taken for a clone and re-paired as agent {} ({})",
            pairing.identity.agent_id,
            identity.agent_id,
            identity.hostname
        );
        if let Err(e) = state::remove_record(&self.data.clone_suspected_path()) {
            log::error!("{e}");
        }
        self.suspected_clone = None;
        self.load_identity();
        Ok(())
    }

    /// The PCE did not answer: when its name now resolves to other addresses (the PCE moved, or
    /// DNS fails over), lets the firewall's management channel follow, so that the next
    /// connection (which resolves the name again) gets through an enforced outbound policy. A
    /// name that resolves to nothing keeps the addresses known before. True when they changed.
    fn follow_management_server(&mut self) -> bool {
        let Some(pairing) = &self.pairing else { return false };
        let resolved = match lifecycle::resolve_safeguards(&pairing.identity) {
            Ok(resolved) => resolved,
            Err(e) => {
                log::warn!("{e}; keeping the PCE's addresses known before");
                return false;
            }
        };
        if resolved == pairing.safeguards {
            return false;
        }
        let addresses = |safeguards: &Safeguards| {
            safeguards.management.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        };
        log::info!(
            "the PCE {} now resolves to {} (was {}): the management channel follows",
            pairing.identity.management_server,
            addresses(&resolved),
            addresses(&pairing.safeguards)
        );
        if let Some(policy) = self.applied.clone() {
            if let Err(e) = self.firewall.apply(&policy, &resolved) {
                log::error!("cannot open the management channel to the PCE's new addresses: {e}");
                return false;
            }
            self.record_history(
                ChangeReason::PolicyUpdate,
                &policy,
                &format!("management channel moved to {}", addresses(&resolved)),
            );
        }
        if let Some(pairing) = &mut self.pairing {
            pairing.safeguards = resolved;
        }
        true
    }

    fn on_event(&mut self, event: Event) {
        if self.suspended {
            return;
        }
        if let Event::PolicyChanged { version } = event {
            self.all.pce_policy_version = Some(version);
        }
        if ignored_while(self.heartbeats.connectivity(), &event) {
            log::info!("ignoring {event:?} while diminished");
            return;
        }
        match event {
            Event::PolicyChanged { version } => {
                if version != self.applied_version() && !self.recently_rejected(version) {
                    self.sync_policy(version);
                }
            }
            Event::SupportReportRequested { request } => self.support_report(request),
            Event::UpgradeRequested { version } => {
                log::info!("the PCE asks for an upgrade to {version}");
                let _ = self.order_upgrade(&version, false);
            }
        }
    }

    /// Answers the PCE's support report request `request` (unless it is answered or being
    /// answered: the bolt and the heartbeat answer both name it).
    fn support_report(&mut self, request: u64) {
        if let Some(pairing) = &self.pairing {
            self.support_reports.request(request, &pairing.identity);
        }
    }

    /// Fetches the policy the PCE announced as `announced` and applies it.
    fn sync_policy(&mut self, announced: u64) {
        let Some(pairing) = &self.pairing else { return };
        match pairing.client.policy(self.applied_version()) {
            Ok(Some(policy)) => self.apply(policy),
            Ok(None) => {}
            Err(e) if e.is_unauthorized() => self.heartbeats.unauthorized(),
            // A policy that does not even decode (an unknown protocol, a bad address, a port
            // beyond 65535) is rejected like one the firewall refuses: reported, not retried
            // before an interval, and the last-known-good policy stays in force.
            Err(e @ ClientError::Malformed { .. }) => {
                log::error!(
                    target: "platform",
                    "policy version {announced} rejected, version {} stays in force: {e}",
                    self.applied_version()
                );
                self.apply_error = Some(format!("version {announced}: {e}"));
                self.rejected = Some((announced, Instant::now() + self.heartbeat_interval));
                self.next_heartbeat = Instant::now();
            }
            Err(e) => log::warn!("cannot fetch the policy: {e}"),
        }
    }

    fn apply(&mut self, policy: Policy) {
        let Some(pairing) = &self.pairing else { return };
        match self.firewall.apply(&policy, &pairing.safeguards) {
            Ok(summary) => {
                log::info!(
                    target: "platform",
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
                        target: "platform",
                        "policy version {} is in force but not saved for the next boot: {e}",
                        policy.version
                    );
                }
                if summary.changed {
                    self.record_history(ChangeReason::PolicyUpdate, &policy, "");
                }
                if self.config.conntrack_cut_on_tighten && tightens(self.applied.as_ref(), &policy, &summary)
                {
                    self.cut_connections(&policy, pairing.safeguards.clone());
                }
                self.applied = Some(policy);
                self.apply_error = None;
                self.rejected = None;
                self.all.policy_applied_at = Some(crate::clock::now());
                self.next_quick_check = Instant::now() + self.config.canary_interval;
                self.save_status();
            }
            Err(e) => {
                log::error!(
                    target: "platform",
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

    /// Ends the open connections the new policy no longer allows, so a tightened policy also
    /// cuts what it used to allow.
    fn cut_connections(&self, policy: &Policy, safeguards: Safeguards) {
        let input = crate::conntrack::CutInput {
            policy,
            local_addresses: host::local_addresses(),
            management: safeguards.management,
            failsafe_inbound: self
                .firewall
                .options()
                .failsafe
                .iter()
                .filter(|service| service.direction == crate::config::ServiceDirection::Inbound)
                .map(|service| (service.protocol, service.port))
                .collect(),
        };
        match crate::conntrack::cut_disallowed(&input) {
            Ok(summary) if summary.deleted > 0 => log::info!(
                target: "platform",
                "ended {} of {} tracked connections the policy no longer allows",
                summary.deleted,
                summary.examined
            ),
            Ok(_) => {}
            Err(e) => {
                log::warn!(target: "platform", "cannot end connections the policy no longer allows: {e}")
            }
        }
    }

    /// Compares the firewall with the applied policy and puts it back when it differs.
    ///
    /// A check that reads the tables back costs about 25 us per rule (0.5 s for 20k rules; on
    /// nf_tables an unchanged generation id skips that read), so the next check of the same
    /// depth waits at least [`CHECK_COST_FACTOR`] times what this one took: at most about 2 % of
    /// a core goes to checking, whatever the size of the ruleset (Felix bounds its refreshes the
    /// same way).
    fn check_tamper(&mut self, depth: CheckDepth) {
        let started = Instant::now();
        let result = self.firewall.check_and_repair(depth);
        let now = Instant::now();
        self.all.tamper_checks += 1;
        self.all.last_tamper_check = Some(crate::clock::now());
        self.all.last_tamper_check_error = match &result {
            Err(e) if !matches!(e, FirewallError::NothingApplied) => Some(e.to_string()),
            _ => None,
        };
        // Spaced by the cost of a clean check; after a repair the next check comes at the
        // configured interval, to see that the repair held.
        let spacing = match &result {
            Ok(None) => (now - started).saturating_mul(CHECK_COST_FACTOR),
            _ => Duration::ZERO,
        };
        self.next_quick_check = now + self.config.canary_interval.max(spacing);
        if depth == CheckDepth::Full {
            self.next_full_check = now + self.config.tamper_check_interval.max(spacing);
        }
        let repair = match result {
            Ok(None) | Err(FirewallError::NothingApplied) => return,
            Ok(Some(repair)) => repair,
            Err(e) => {
                log::warn!(target: "platform", "tamper check failed: {e}");
                return;
            }
        };
        let mut summary = repair.drift.join("; ");
        if summary.len() > MAX_TAMPER_SUMMARY_CHARS {
            summary = summary.chars().take(MAX_TAMPER_SUMMARY_CHARS).collect::<String>() + "...";
        }
        let repaired = match repair.result {
            Ok(_) => {
                log::warn!(target: "platform", "firewall tampering found and repaired: {summary}");
                true
            }
            Err(e) => {
                log::error!(target: "platform", "firewall tampering found ({summary}) and the repair failed: {e}");
                false
            }
        };
        let at = crate::clock::now();
        self.tamper_count += 1;
        self.last_tamper = Some((at, summary.clone()));
        if let Some(policy) = self.applied.clone() {
            self.record_history(ChangeReason::TamperRepair, &policy, &summary);
        }
        self.push_event(AgentEvent { at, kind: AgentEventKind::Tampering { summary, repaired } });
        self.save_status();
    }

    /// Queues an event for the PCE and asks for a heartbeat to carry it soon.
    fn push_event(&mut self, event: AgentEvent) {
        if self.pending_events.len() == PENDING_EVENTS_CAPACITY {
            self.pending_events.pop_front();
            self.dropped_events += 1;
            log::warn!("event queue full: {} events dropped so far", self.dropped_events);
        }
        self.pending_events.push_back(event);
        if self.pairing.is_some() && !self.heartbeats.connectivity().is_refused() {
            self.next_heartbeat = self.next_heartbeat.min(Instant::now());
        }
    }

    fn record_history(&self, reason: ChangeReason, policy: &Policy, note: &str) {
        let ruleset = self.firewall.applied_text();
        lifecycle::record(&self.history, reason, policy.version, Some(policy.state), &ruleset, note);
    }

    fn recently_rejected(&self, version: u64) -> bool {
        matches!(self.rejected, Some((rejected, until)) if rejected == version && Instant::now() < until)
    }

    fn on_control(&mut self, request: ControlRequest) -> ControlResponse {
        match request {
            ControlRequest::Status => self.status.lock().map_or_else(
                |_| ControlResponse::Failed("status unavailable".into()),
                |report| ControlResponse::Status(Box::new(report.clone())),
            ),
            ControlRequest::IdentityChanged => {
                self.load_identity();
                match self.pairing {
                    Some(_) => ControlResponse::Done,
                    None => ControlResponse::Failed("no identity found in the data directory".into()),
                }
            }
            ControlRequest::Deactivate { saved } => self.deactivate(saved),
            ControlRequest::Suspend => self.suspend(),
            ControlRequest::Unsuspend => self.unsuspend(),
            ControlRequest::Upgrade { version } => {
                let Some(version) = version.or_else(|| self.upgrade_order.clone()) else {
                    return ControlResponse::Failed(
                        "the PCE has ordered no release; name one: `ven upgrade VERSION`".into(),
                    );
                };
                match self.order_upgrade(&version, true) {
                    Ok(what) => ControlResponse::Upgrading(what.to_string()),
                    Err(why) => ControlResponse::Failed(why),
                }
            }
        }
    }

    fn deactivate(&mut self, saved: bool) -> ControlResponse {
        self.stop_events();
        let Some(pairing) = self.pairing.take() else {
            return ControlResponse::Failed("this VEN is not activated".into());
        };
        let after = if saved { FirewallAfter::Saved } else { FirewallAfter::Open };
        match lifecycle::deactivate(&self.data, &self.firewall, &pairing.client, after, &self.history) {
            Ok(pce_notice) => {
                self.applied = None;
                self.apply_error = None;
                self.last_heartbeat = None;
                self.suspended = false;
                self.heartbeats = HeartbeatTracker::new();
                self.pending_events.clear();
                self.tamper_count = 0;
                self.last_tamper = None;
                ControlResponse::Deactivated { pce_notice }
            }
            Err(e) => {
                // Keep the pairing: the operator can retry once the cause is fixed.
                self.load_identity();
                ControlResponse::Failed(e.to_string())
            }
        }
    }

    fn suspend(&mut self) -> ControlResponse {
        let Some(pairing) = &self.pairing else {
            return ControlResponse::Failed("this VEN is not activated".into());
        };
        match lifecycle::suspend(
            &self.data,
            &self.firewall,
            &pairing.client,
            self.applied.as_ref(),
            &self.history,
        ) {
            Ok(pce_notice) => {
                log::warn!(target: "platform", "suspended: ven's rules are removed until `ven unsuspend`");
                self.suspended = true;
                self.stop_events();
                ControlResponse::Suspended { pce_notice }
            }
            Err(e) => ControlResponse::Failed(e.to_string()),
        }
    }

    fn unsuspend(&mut self) -> ControlResponse {
        if self.pairing.is_none() {
            self.load_identity();
        }
        let Some(pairing) = &self.pairing else {
            return ControlResponse::Failed("this VEN is not activated".into());
        };
        match lifecycle::unsuspend(
            &self.data,
            &self.firewall,
            &pairing.client,
            &pairing.safeguards,
            &self.history,
        ) {
            Ok((policy, pce_notice)) => {
                log::info!(
                    target: "platform",
                    "unsuspended: policy version {} is back in force",
                    policy.as_ref().map_or(0, |p| p.version)
                );
                self.applied = policy;
                self.suspended = false;
                // Restart the event channel and ask the PCE at once: the policy state may have
                // changed while suspended.
                self.load_identity();
                let now = Instant::now();
                self.next_quick_check = now + self.config.canary_interval;
                self.next_full_check = now + self.config.tamper_check_interval;
                ControlResponse::Unsuspended { pce_notice }
            }
            Err(e) => ControlResponse::Failed(e.to_string()),
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
        if self.suspended {
            report.connectivity = Connectivity::Suspended;
        } else {
            report.policy_state = self.applied.as_ref().map(|p| p.state);
            report.policy_version = self.applied.as_ref().map(|p| p.version);
        }
        report.last_heartbeat = self.last_heartbeat;
        report.last_apply_error = self.apply_error.clone();
        report.tamper_count = self.tamper_count;
        report.last_tamper = self.last_tamper.clone();
        report.pending_events = self.pending_events.len();
        report.suspected_clone = self.suspected_clone.clone();
        report.upgrade = self.upgrade_note.clone();
        report.flows = self.flow_stats.as_ref().map(|stats| stats.snapshot());
        report.flow_uploads = self.upload_stats.as_ref().map(|stats| stats.snapshot());
        report.workers = self.monitor.components();
        report.detail = Some(super::status::AgentDetail {
            pid: std::process::id(),
            started_at: self.all.started_at,
            firewall_backend: self.all.firewall_backend.to_string(),
            heartbeat_interval_s: self.heartbeat_interval.as_secs(),
            heartbeat_misses: self.heartbeats.misses_in_a_row(),
            last_heartbeat_error: self.all.last_heartbeat_error.clone(),
            pce_policy_version: self.all.pce_policy_version,
            policy_applied_at: self.all.policy_applied_at,
            tamper_checks: self.all.tamper_checks,
            last_tamper_check: self.all.last_tamper_check,
            last_tamper_check_error: self.all.last_tamper_check_error.clone(),
            events_dropped: self.dropped_events,
            event_channel: self.pairing.as_ref().map(|_| self.all.event_stats.snapshot()),
            flow_store: None,
        });
    }

    fn save_status(&self) {
        if self.pairing.is_none() {
            return;
        }
        let saved = SavedStatus {
            last_heartbeat: self.last_heartbeat,
            last_apply_error: self.apply_error.clone(),
            tamper_count: self.tamper_count,
            last_tamper: self.last_tamper.clone(),
        };
        if let Err(e) = state::write_record(&self.data.status_path(), RecordKind::Status, &saved, 0o600) {
            log::warn!("{e}");
        }
    }

    /// Says goodbye so the PCE marks the workload offline at once (unless suspended: the PCE
    /// already knows). The firewall stays as it is: enforcement does not depend on the agent
    /// running.
    fn shutdown(mut self) -> Option<std::path::PathBuf> {
        self.save_status();
        self.stop_events();
        if let Some(pairing) = self.pairing.take() {
            if !self.suspended {
                // A restart is not a goodbye: the PCE keeps the workload in its peers' policies
                // for a grace period. An upgrade's start of another binary is a restart.
                let announced = crate::cli::service::restart_announced(&self.data);
                let restarting = announced || self.relaunch.is_some();
                let reason = if restarting { ven_proto::GOODBYE_RESTART } else { "agent stopped" };
                match pairing.client.goodbye(reason) {
                    Ok(()) if restarting => log::info!("told the PCE this agent restarts"),
                    Ok(()) => log::info!("said goodbye to the PCE"),
                    Err(e) => log::warn!("could not say goodbye: {e}"),
                }
            }
        }
        self.monitor.stop_all();
        self.support_reports.stop();
        log::info!("stopped; the firewall keeps policy version {}", self.applied_version());
        self.relaunch
    }
}

/// Whether `event` is ignored in `connectivity`. INVARIANT (the spec): a diminished VEN ignores
/// every bolt but software upgrades and support reports; heartbeats still sync the policy.
fn ignored_while(connectivity: Connectivity, event: &Event) -> bool {
    connectivity == Connectivity::Diminished
        && !matches!(event, Event::SupportReportRequested { .. } | Event::UpgradeRequested { .. })
}

/// Whether going from `previous` to `next` can end connections: `next` enforces, and either
/// enforcement starts, the rules change or set members went. A change that only adds members
/// allows a superset of what was allowed, so the conntrack dump it would cost finds nothing.
fn tightens(previous: Option<&Policy>, next: &Policy, summary: &crate::firewall::ApplySummary) -> bool {
    if next.state != PolicyState::Enforced {
        return false;
    }
    match previous {
        Some(previous) => {
            previous.state != PolicyState::Enforced
                || previous.rules != next.rules
                || previous.custom_rules != next.custom_rules
                || summary.set_members_removed > 0
        }
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::ApplySummary;

    fn policy(state: PolicyState) -> Policy {
        Policy { version: 1, state, ip_sets: Vec::new(), rules: Vec::new(), custom_rules: Vec::new() }
    }

    #[test]
    fn a_diminished_ven_ignores_bolts_but_support_reports_and_upgrades() {
        let policy = Event::PolicyChanged { version: 3 };
        let report = Event::SupportReportRequested { request: 1 };
        let upgrade = Event::UpgradeRequested { version: "9.9.9".into() };
        assert!(ignored_while(Connectivity::Diminished, &policy));
        assert!(!ignored_while(Connectivity::Diminished, &report), "the spec's exception");
        assert!(!ignored_while(Connectivity::Diminished, &upgrade), "the spec's other exception");
        for connectivity in [Connectivity::Online, Connectivity::Offline] {
            assert!(!ignored_while(connectivity, &policy) && !ignored_while(connectivity, &report));
        }
    }

    #[test]
    fn only_a_change_that_can_end_connections_costs_a_conntrack_dump() {
        let enforced = policy(PolicyState::Enforced);
        let added = ApplySummary { set_members_added: 3, ..ApplySummary::default() };
        let removed = ApplySummary { set_members_removed: 1, ..ApplySummary::default() };
        assert!(tightens(None, &enforced, &added), "first policy");
        assert!(tightens(Some(&policy(PolicyState::Build)), &enforced, &added), "enforcement starts");
        assert!(!tightens(Some(&enforced), &enforced, &added), "members only added");
        assert!(tightens(Some(&enforced), &enforced, &removed), "members went");
        let mut fewer_rules = enforced.clone();
        fewer_rules.rules.push(ven_proto::Rule {
            id: 1,
            direction: ven_proto::Direction::Inbound,
            peers: ven_proto::Peers::Any,
            protocol: ven_proto::Protocol::Tcp,
            ports: None,
        });
        assert!(tightens(Some(&fewer_rules), &enforced, &added), "rules changed");
        assert!(!tightens(Some(&enforced), &policy(PolicyState::Test), &removed), "test blocks nothing");
    }
}
