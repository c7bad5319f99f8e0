//! What `ven status` shows, and the heartbeat state machine behind its connectivity line.

use serde::{Deserialize, Serialize};
use ven_proto::PolicyState;

use crate::state::{self, DataDir, Identity, RecordKind, SavedStatus, StateError};

/// The VEN's connection to its PCE, as the spec's heartbeat mechanism defines it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Connectivity {
    /// No identity: `ven activate` has not been run (or `ven deactivate` was).
    Unpaired,
    /// The agent is not running, or has not reached the PCE since it started.
    Offline,
    Online,
    /// Two heartbeats in a row failed; only upgrade and support-report bolts are obeyed until two
    /// heartbeats in a row succeed again.
    Diminished,
    /// The PCE rejected our credentials; it is tried only every four hours.
    LostAgent,
    /// `ven suspend`: the firewall holds nothing of ours and the agent waits for `unsuspend`.
    Suspended,
    /// The PCE takes this copy of the agent for a clone of another live one (a copied data
    /// directory, issue 16): it keeps its last-known-good policy, takes nothing new and is
    /// tried only every four hours, until it is re-paired.
    SuspectedClone,
}

impl Connectivity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unpaired => "unpaired",
            Self::Offline => "offline",
            Self::Online => "online",
            Self::Diminished => "diminished",
            Self::LostAgent => "lost agent",
            Self::Suspended => "suspended",
            Self::SuspectedClone => "suspected clone",
        }
    }

    /// The PCE refuses this agent's calls (lost agent or suspected clone): only the slow retry.
    pub fn is_refused(self) -> bool {
        matches!(self, Self::LostAgent | Self::SuspectedClone)
    }
}

/// Heartbeats missed in a row before the VEN is diminished, and successes needed to recover.
pub const DIMINISHED_AFTER_MISSES: u32 = 2;
pub const RECOVERED_AFTER_SUCCESSES: u32 = 2;

/// Connectivity from the outcomes of heartbeats.
#[derive(Clone, Debug)]
pub struct HeartbeatTracker {
    connectivity: Connectivity,
    misses_in_a_row: u32,
    successes_in_a_row: u32,
}

impl HeartbeatTracker {
    pub fn new() -> Self {
        Self { connectivity: Connectivity::Offline, misses_in_a_row: 0, successes_in_a_row: 0 }
    }

    pub fn connectivity(&self) -> Connectivity {
        self.connectivity
    }

    pub fn misses_in_a_row(&self) -> u32 {
        self.misses_in_a_row
    }

    pub fn success(&mut self) {
        self.misses_in_a_row = 0;
        self.successes_in_a_row = self.successes_in_a_row.saturating_add(1);
        self.connectivity = match self.connectivity {
            Connectivity::Diminished if self.successes_in_a_row < RECOVERED_AFTER_SUCCESSES => {
                Connectivity::Diminished
            }
            _ => Connectivity::Online,
        };
    }

    pub fn miss(&mut self) {
        self.successes_in_a_row = 0;
        self.misses_in_a_row = self.misses_in_a_row.saturating_add(1);
        if self.connectivity == Connectivity::Online && self.misses_in_a_row >= DIMINISHED_AFTER_MISSES {
            self.connectivity = Connectivity::Diminished;
        }
    }

    pub fn unauthorized(&mut self) {
        self.successes_in_a_row = 0;
        self.connectivity = Connectivity::LostAgent;
    }

    pub fn suspected_clone(&mut self) {
        self.successes_in_a_row = 0;
        self.connectivity = Connectivity::SuspectedClone;
    }
}

impl Default for HeartbeatTracker {
    fn default() -> Self {
        Self::new()
    }
}

/// Everything `ven status` prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub agent_id: Option<u64>,
    pub hostname: Option<String>,
    pub management_server: Option<String>,
    pub agent_running: bool,
    pub connectivity: Connectivity,
    /// State and version of the policy the firewall carries now.
    pub policy_state: Option<PolicyState>,
    pub policy_version: Option<u64>,
    pub last_heartbeat: Option<u64>,
    pub last_apply_error: Option<String>,
    /// Times the firewall was found tampered with and repaired.
    pub tamper_count: u64,
    /// When the last tampering was found, and what differed.
    pub last_tamper: Option<(u64, String)>,
    /// Events waiting for the next accepted heartbeat.
    pub pending_events: usize,
    /// The flow pipeline's counters (a running agent only).
    pub flows: Option<crate::flows::FlowCounters>,
    /// The uploader's counters (a running agent only).
    pub flow_uploads: Option<super::uploader::UploadCounters>,
    /// Configuration keys the running agent ignored because it does not know them.
    pub config_warnings: Vec<String>,
    /// `ven disable` was run: the boot entry points do nothing.
    pub disabled: bool,
    /// The supervised worker threads (a running agent only).
    pub workers: Vec<super::monitor::ComponentStatus>,
    /// What only `ven status --all` shows (a running agent only).
    pub detail: Option<AgentDetail>,
    /// The PCE takes this copy for a clone (issue 16): since when and its words.
    pub suspected_clone: Option<state::CloneSuspicion>,
    /// The last self-upgrade: release, phase, from which, when and how it went.
    pub upgrade: Option<String>,
}

/// What to do about a suspected clone, for `ven status`.
pub const SUSPECTED_CLONE_ADVICE: &str = "another live copy of this agent's data directory holds this \
     workload at the PCE; this copy keeps its last-known-good policy and takes nothing new. Re-pair \
     it: `ven deactivate`, then `ven activate` with a pairing code (or set `clone_reactivate = true`)";

/// The clone-suspicion record, if any (a damaged one is logged and reads as none).
pub fn read_clone_suspicion(data: &DataDir) -> Option<state::CloneSuspicion> {
    state::read_record(&data.clone_suspected_path(), RecordKind::CloneSuspected).unwrap_or_else(|e| {
        log::warn!("{e}");
        None
    })
}

impl StatusReport {
    /// What the data directory says while no agent runs.
    pub fn from_data_dir(data: &DataDir) -> Result<Self, StateError> {
        let identity: Option<Identity> = state::read_record(&data.identity_path(), RecordKind::Identity)?;
        let policy: Option<ven_proto::Policy> = state::read_record(&data.policy_path(), RecordKind::Policy)?;
        // A status record of an older format only costs the figures it held.
        let saved: SavedStatus = state::read_record(&data.status_path(), RecordKind::Status)
            .unwrap_or_else(|e| {
                log::warn!("{e}");
                None
            })
            .unwrap_or_default();
        let suspended = data.suspended_path().exists();
        let suspected_clone = read_clone_suspicion(data);
        // The installed binary (this one) may be a release an upgrade put in place.
        super::upgrade::identify_running_release(data);
        let mut report = Self::unpaired();
        report.connectivity = match (&identity, suspended) {
            (None, _) => Connectivity::Unpaired,
            (Some(_), true) => Connectivity::Suspended,
            (Some(_), false) => Connectivity::Offline,
        };
        if let Some(identity) = identity {
            report.set_identity(&identity);
        }
        report.policy_state = policy.as_ref().map(|p| p.state);
        report.policy_version = policy.as_ref().map(|p| p.version);
        report.last_heartbeat = saved.last_heartbeat;
        report.last_apply_error = saved.last_apply_error;
        report.tamper_count = saved.tamper_count;
        report.last_tamper = saved.last_tamper;
        if suspended {
            report.policy_state = None;
        }
        if suspected_clone.is_some() && report.connectivity == Connectivity::Offline {
            report.connectivity = Connectivity::SuspectedClone;
        }
        report.suspected_clone = suspected_clone;
        report.upgrade =
            super::upgrade::read_record(data).ok().flatten().as_ref().map(super::upgrade::describe);
        Ok(report)
    }

    pub fn unpaired() -> Self {
        Self {
            version: super::upgrade::agent_version().to_string(),
            agent_id: None,
            hostname: None,
            management_server: None,
            agent_running: false,
            connectivity: Connectivity::Unpaired,
            policy_state: None,
            policy_version: None,
            last_heartbeat: None,
            last_apply_error: None,
            tamper_count: 0,
            last_tamper: None,
            pending_events: 0,
            flows: None,
            flow_uploads: None,
            config_warnings: Vec::new(),
            disabled: false,
            workers: Vec::new(),
            detail: None,
            suspected_clone: None,
            upgrade: None,
        }
    }

    pub fn set_identity(&mut self, identity: &Identity) {
        self.agent_id = Some(identity.agent_id);
        self.hostname = Some(identity.hostname.clone());
        self.management_server = Some(identity.management_server.clone());
    }

    pub fn to_json(&self) -> String {
        let fields = [
            ("version", json_string(&self.version)),
            ("activated", self.agent_id.is_some().to_string()),
            ("agent_id", json_option(self.agent_id.map(|id| id.to_string()))),
            ("hostname", json_option(self.hostname.as_deref().map(json_string))),
            ("management_server", json_option(self.management_server.as_deref().map(json_string))),
            ("agent_running", self.agent_running.to_string()),
            ("connectivity", json_string(self.connectivity.as_str())),
            (
                "suspected_clone",
                json_option(self.suspected_clone.as_ref().map(|c| {
                    format!(
                        "{{\"since\":{},\"message\":{},\"advice\":{}}}",
                        json_string(&crate::clock::rfc3339(c.since)),
                        json_string(&c.message),
                        json_string(SUSPECTED_CLONE_ADVICE)
                    )
                })),
            ),
            ("upgrade", json_option(self.upgrade.as_deref().map(json_string))),
            ("policy_state", json_option(self.policy_state.map(|s| json_string(s.as_str())))),
            ("policy_version", json_option(self.policy_version.map(|v| v.to_string()))),
            (
                "last_heartbeat",
                json_option(self.last_heartbeat.map(|t| json_string(&crate::clock::rfc3339(t)))),
            ),
            ("last_apply_error", json_option(self.last_apply_error.as_deref().map(json_string))),
            ("tamper_count", self.tamper_count.to_string()),
            (
                "last_tamper",
                json_option(self.last_tamper.as_ref().map(|(at, what)| {
                    format!(
                        "{{\"at\":{},\"what\":{}}}",
                        json_string(&crate::clock::rfc3339(*at)),
                        json_string(what)
                    )
                })),
            ),
            ("pending_events", self.pending_events.to_string()),
            (
                "flows",
                json_option(self.flows.as_ref().map(|f| {
                    format!(
                        "{{\"reading\":{},\"events\":{},\"lost\":{},\"skipped\":{},\"tracked\":{},\
                         \"folded\":{},\"sampling\":{},\"sampling_scale\":{},\"sampling_episodes\":{},\
                         \"flushes\":{},\"records_stored\":{},\"records_dropped\":{},\"store_failures\":{},\
                         \"last_store_error\":{},\"connections\":{},\"accounting\":{}}}",
                        f.reading,
                        f.events,
                        f.lost,
                        f.skipped,
                        f.tracked,
                        f.folded,
                        f.sampling_scale > 1,
                        f.sampling_scale,
                        f.sampling_episodes,
                        f.flushes,
                        f.records_stored,
                        f.records_dropped,
                        f.store_failures,
                        json_option(f.last_store_error.as_deref().map(json_string)),
                        connections_json(f),
                        accounting_json(f),
                    )
                })),
            ),
            (
                "flow_uploads",
                json_option(self.flow_uploads.as_ref().map(|u| {
                    format!(
                        "{{\"records\":{},\"batches\":{},\"failures\":{},\"last_success\":{},\"last_error\":{}}}",
                        u.records,
                        u.batches,
                        u.failures,
                        json_option(u.last_success.map(|t| json_string(&crate::clock::rfc3339(t)))),
                        json_option(u.last_error.as_deref().map(json_string)),
                    )
                })),
            ),
            ("disabled", self.disabled.to_string()),
            (
                "workers",
                format!(
                    "[{}]",
                    self.workers
                        .iter()
                        .map(|c| format!(
                            "{{\"name\":{},\"state\":{},\"restarts\":{},\"last_failure\":{}}}",
                            json_string(&c.name),
                            json_string(c.state.as_str()),
                            c.restarts,
                            json_option(c.last_failure.as_ref().map(|(at, cause)| format!(
                                "{{\"at\":{},\"cause\":{}}}",
                                json_string(&crate::clock::rfc3339(*at)),
                                json_string(cause)
                            ))),
                        ))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            ),
            (
                "config_warnings",
                format!("[{}]", self.config_warnings.iter().map(|w| json_string(w)).collect::<Vec<_>>().join(",")),
            ),
        ];
        let body: Vec<String> = fields.iter().map(|(key, value)| format!("\"{key}\":{value}")).collect();
        format!("{{{}}}", body.join(","))
    }

    pub fn to_human(&self, now: u64) -> String {
        let pairing = match (self.agent_id, &self.hostname) {
            (Some(id), Some(host)) => format!("activated as agent {id} ({host})"),
            _ => "not activated (run `ven activate`)".to_string(),
        };
        let agent = if self.agent_running { "running" } else { "not running" };
        let policy = match (self.connectivity, self.policy_state, self.policy_version) {
            (Connectivity::Suspended, _, _) => {
                "suspended: nothing of ven's is in the firewall (`ven unsuspend` restores it)".to_string()
            }
            (_, Some(state), Some(version)) => {
                // The spec's status names the most recent policy change: when, and whether the
                // PCE has a newer one (a running agent knows both).
                let mut line = format!("{state} (version {version}");
                if let Some(at) = self.detail.as_ref().and_then(|d| d.policy_applied_at) {
                    line.push_str(&format!(", applied {}", crate::clock::rfc3339(at)));
                }
                line.push(')');
                if self.policy_in_sync() == Some(false) {
                    if let Some(newer) = self.detail.as_ref().and_then(|d| d.pce_policy_version) {
                        line.push_str(&format!("; the PCE has version {newer}"));
                    }
                }
                line
            }
            _ => "none applied; the firewall is untouched".to_string(),
        };
        let heartbeat = match self.last_heartbeat {
            Some(t) => format!("{} ({} s ago)", crate::clock::rfc3339(t), now.saturating_sub(t)),
            None => "never".to_string(),
        };
        let mut lines = vec![
            format!("ven {}", self.version),
            format!("  pairing:         {pairing}"),
            format!("  PCE:             {}", self.management_server.as_deref().unwrap_or("-")),
            format!("  agent:           {agent}, {}", self.connectivity.as_str()),
            format!("  policy:          {policy}"),
            format!("  last heartbeat:  {heartbeat}"),
        ];
        let tampering = match &self.last_tamper {
            Some((at, what)) => format!(
                "{} times, last at {} ({what}), repaired",
                self.tamper_count,
                crate::clock::rfc3339(*at)
            ),
            None => "none found".to_string(),
        };
        lines.push(format!("  tampering:       {tampering}"));
        if let Some(suspicion) = &self.suspected_clone {
            lines.push(format!(
                "  suspected clone: since {}: {}",
                crate::clock::rfc3339(suspicion.since),
                suspicion.message
            ));
            lines.push(format!("                   {SUSPECTED_CLONE_ADVICE}"));
        }
        if let Some(upgrade) = &self.upgrade {
            lines.push(format!("  last upgrade:    {upgrade}"));
        }
        if let Some(flows) = &self.flows {
            let reading = if flows.reading { "reading NFLOG" } else { "NFLOG not bound" };
            lines.push(format!(
                "  flows:           {reading}: {} packets logged, {} lost, {} skipped",
                flows.events, flows.lost, flows.skipped
            ));
            let sampling = if flows.sampling_scale > 1 {
                format!("sampling mode: 1 in {} packets counted", flows.sampling_scale)
            } else {
                "every packet counted".to_string()
            };
            lines.push(format!(
                "                   {} flows this interval, {} packets folded into overflow; {sampling}",
                flows.tracked, flows.folded
            ));
            lines.push(connections_line(flows));
            lines.push(accounting_line(flows));
            let mut store = format!(
                "                   {} flow records stored in {} flushes, {} dropped",
                flows.records_stored, flows.flushes, flows.records_dropped
            );
            if let Some(error) = &flows.last_store_error {
                store.push_str(&format!("; storing fails: {error}"));
            }
            lines.push(store);
        }
        if let Some(uploads) = &self.flow_uploads {
            let mut line =
                format!("  flow upload:     {} records sent in {} batches", uploads.records, uploads.batches);
            if let Some(at) = uploads.last_success {
                line.push_str(&format!(", last complete {}", crate::clock::rfc3339(at)));
            }
            if let Some(error) = &uploads.last_error {
                line.push_str(&format!("; failing: {error}"));
            }
            lines.push(line);
        }
        if self.pending_events > 0 {
            lines.push(format!("  events:          {} waiting for the PCE", self.pending_events));
        }
        if let Some(error) = &self.last_apply_error {
            lines.push(format!("  last apply error: {error} (the previous policy stays in force)"));
        }
        // Only what needs attention: a worker that ended at least once.
        for component in self.workers.iter().filter(|c| c.restarts > 0) {
            let mut line = format!(
                "  thread:          {} {}, restarted {} times",
                component.name,
                component.state.as_str(),
                component.restarts
            );
            if let Some((at, cause)) = &component.last_failure {
                line.push_str(&format!(", last at {} ({cause})", crate::clock::rfc3339(*at)));
            }
            lines.push(line);
        }
        if self.disabled {
            lines.push("  boot:            disabled: does not start at boot (`ven enable`)".to_string());
        }
        if !self.config_warnings.is_empty() {
            lines.push(format!(
                "  configuration:   unknown keys ignored: {}",
                self.config_warnings.join(", ")
            ));
        }
        lines.join("\n")
    }
}

fn json_option(value: Option<String>) -> String {
    value.unwrap_or_else(|| "null".to_string())
}

/// A JSON string literal with the escapes RFC 8259 requires (the agent's few JSON outputs are
/// written by hand: no serializer goes into the binary for them).
pub(crate) fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---- `ven status --all` (issue 16): the running agent's detail, its components, last errors ----

/// What a running agent adds for `ven status --all`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentDetail {
    pub pid: u32,
    /// Unix seconds when the agent started.
    pub started_at: u64,
    /// The iptables backend in use (`legacy` or `nft`).
    pub firewall_backend: String,
    pub heartbeat_interval_s: u64,
    pub heartbeat_misses: u32,
    /// The last failed heartbeat: when, and why.
    pub last_heartbeat_error: Option<(u64, String)>,
    /// The policy version the PCE last announced (heartbeat answer or event).
    pub pce_policy_version: Option<u64>,
    /// When this agent put the policy in force in the firewall.
    pub policy_applied_at: Option<u64>,
    /// Tamper checks (quick and full) since the agent started, the last one's time and failure.
    pub tamper_checks: u64,
    pub last_tamper_check: Option<u64>,
    pub last_tamper_check_error: Option<String>,
    /// Events for the PCE dropped because their queue was full.
    pub events_dropped: u64,
    /// The event channel; `None` until the agent is paired.
    pub event_channel: Option<EventChannel>,
    /// The flow stores in log/ (read when the status is asked for).
    pub flow_store: Option<FlowStoreFigures>,
}

/// The flow stores as the running agent's store last saw them (`FlowStore::usage`; no database
/// is opened for it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowStoreFigures {
    /// flow.db, flowsum.db, their backups and corrupt copies.
    pub bytes: u64,
    /// No store file passes this.
    pub file_cap_bytes: u64,
    pub rows_appended: u64,
    pub rotations: u64,
    /// Rows rotated away before the PCE acknowledged them.
    pub dropped_unacknowledged: u64,
    /// Rows written and not yet acknowledged by the PCE (as this agent last saw the store: 0
    /// until it writes or uploads once).
    pub pending_upload: u64,
}

impl From<crate::flows::store::StoreUsage> for FlowStoreFigures {
    fn from(usage: crate::flows::store::StoreUsage) -> Self {
        Self {
            bytes: usage.total_bytes,
            file_cap_bytes: usage.file_cap_bytes,
            rows_appended: usage.rows_appended,
            rotations: usage.rotations,
            dropped_unacknowledged: usage.dropped_unacknowledged,
            pending_upload: usage.last_seq.saturating_sub(usage.acknowledged),
        }
    }
}

/// The event service connection (EventSync), read when the status is asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventChannel {
    pub connected: bool,
    /// When the current (or last) session was acknowledged.
    pub since: Option<u64>,
    /// Sessions acknowledged since the agent started.
    pub sessions: u64,
    pub last_error: Option<String>,
}

/// One of the agent's components: the spec's name, our thread, its state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Component {
    pub name: &'static str,
    pub thread: &'static str,
    pub state: ComponentState,
    pub detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComponentState {
    Running,
    /// Running, but something is wrong (the detail says what).
    Degraded,
    /// Not needed now (unpaired, suspended, no policy).
    Idle,
    Stopped,
}

impl ComponentState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Degraded => "degraded",
            Self::Idle => "idle",
            Self::Stopped => "stopped",
        }
    }
}

/// The components in the order `ven status --all` lists them.
const COMPONENTS: [(&str, &str); 6] = [
    ("AgentManager", "main"),
    ("EventSync", "evsync"),
    ("PlatformHandler", "main"),
    ("VtapServer", "flows"),
    ("AgentLogManager", "uploader"),
    ("Control", "control"),
];

fn time(at: u64) -> String {
    crate::clock::rfc3339(at)
}

impl StatusReport {
    /// Each component and its state, from the report's figures.
    pub fn components(&self) -> Vec<Component> {
        use ComponentState::{Degraded, Idle, Running, Stopped};
        let component = |index: usize, state, detail: String| Component {
            name: COMPONENTS[index].0,
            thread: COMPONENTS[index].1,
            state,
            detail,
        };
        if !self.agent_running {
            return (0..COMPONENTS.len())
                .map(|i| component(i, Stopped, "the agent is not running".to_string()))
                .collect();
        }
        let detail = self.detail.clone().unwrap_or_default();
        let manager_state = match self.connectivity {
            Connectivity::Online | Connectivity::Unpaired | Connectivity::Suspended => Running,
            Connectivity::Offline
            | Connectivity::Diminished
            | Connectivity::LostAgent
            | Connectivity::SuspectedClone => Degraded,
        };
        let manager = component(
            0,
            manager_state,
            format!("{}; heartbeat every {} s", self.connectivity.as_str(), detail.heartbeat_interval_s),
        );
        let events = match (self.connectivity, &detail.event_channel) {
            (Connectivity::Unpaired, _) => component(1, Idle, "not paired".into()),
            (Connectivity::Suspended, _) => component(1, Idle, "suspended: no event channel".into()),
            (_, Some(channel)) if channel.connected => component(
                1,
                Running,
                format!("connected since {}", channel.since.map_or_else(|| "-".to_string(), time)),
            ),
            (_, Some(channel)) => component(
                1,
                Degraded,
                format!("disconnected: {}", channel.last_error.as_deref().unwrap_or("not connected yet")),
            ),
            (_, None) => component(1, Stopped, "not started (see agent.log)".into()),
        };
        let firewall = match (&self.last_apply_error, self.policy_state, self.policy_version) {
            (Some(error), _, _) => component(2, Degraded, format!("last apply failed: {error}")),
            (None, _, _) if self.connectivity == Connectivity::Suspended => {
                component(2, Idle, "suspended: nothing of ven's in the firewall".into())
            }
            (None, Some(PolicyState::Idle), _) | (None, None, _) => {
                component(2, Idle, "no policy to enforce; the firewall is the host's".into())
            }
            (None, Some(state), version) => component(
                2,
                Running,
                format!(
                    "policy version {} ({state}) in force, iptables backend {}",
                    version.unwrap_or(0),
                    detail.firewall_backend
                ),
            ),
        };
        let flows = match &self.flows {
            None => component(3, Stopped, "not started (see agent.log)".into()),
            Some(f) if !f.reading => component(3, Degraded, "NFLOG not bound: no flows recorded".into()),
            Some(f) => match &f.last_store_error {
                Some(error) => component(3, Degraded, format!("storing flows fails: {error}")),
                None => component(3, Running, format!("reading NFLOG, {} flows this interval", f.tracked)),
            },
        };
        let uploads = match &self.flow_uploads {
            None => component(4, Stopped, "not started (see agent.log)".into()),
            Some(u) => match &u.last_error {
                Some(error) => component(4, Degraded, format!("uploads fail: {error}")),
                None => component(
                    4,
                    Running,
                    match u.last_success {
                        Some(at) => format!("last complete upload {}", time(at)),
                        None => "no upload round yet".to_string(),
                    },
                ),
            },
        };
        let control = component(5, Running, "answering on agent.sock".into());
        let mut components = vec![manager, events, firewall, flows, uploads, control];
        // What the monitor saw of each supervised thread.
        for c in &mut components {
            let Some(worker) = self.workers.iter().find(|w| w.name == c.thread) else { continue };
            if worker.state == super::monitor::ComponentState::Restarting {
                c.state = Stopped;
                c.detail = "its thread ended; restarting after a backoff".to_string();
            } else if worker.restarts > 0 && c.state == Running {
                c.state = Degraded;
            }
            if worker.restarts > 0 {
                c.detail.push_str(&format!("; thread restarted {} times", worker.restarts));
                if let Some((at, cause)) = &worker.last_failure {
                    c.detail.push_str(&format!(", last at {} ({cause})", time(*at)));
                }
            }
        }
        components
    }

    /// The last error of each part that has one, newest information first.
    pub fn last_errors(&self) -> Vec<(&'static str, String)> {
        let mut errors = Vec::new();
        if let Some(detail) = &self.detail {
            if let Some((at, error)) = &detail.last_heartbeat_error {
                errors.push(("heartbeat", format!("{} {error}", time(*at))));
            }
            if let Some(error) = detail.event_channel.as_ref().and_then(|c| c.last_error.as_ref()) {
                errors.push(("event channel", error.clone()));
            }
            if let Some(error) = &detail.last_tamper_check_error {
                errors.push(("tamper check", error.clone()));
            }
        }
        if let Some(error) = &self.last_apply_error {
            errors.push(("policy apply", error.clone()));
        }
        if let Some(error) = self.flows.as_ref().and_then(|f| f.last_store_error.as_ref()) {
            errors.push(("flow store", error.clone()));
        }
        if let Some(error) = self.flow_uploads.as_ref().and_then(|u| u.last_error.as_ref()) {
            errors.push(("flow upload", error.clone()));
        }
        errors
    }

    /// Whether the policy in force is the one the PCE last announced (`None`: not known).
    pub fn policy_in_sync(&self) -> Option<bool> {
        let announced = self.detail.as_ref()?.pce_policy_version?;
        Some(self.policy_version == Some(announced) && self.last_apply_error.is_none())
    }

    /// `ven status --all --json`: [`StatusReport::to_json`] plus `components`, `detail` and
    /// `last_errors`.
    pub fn to_json_all(&self) -> String {
        let base = self.to_json();
        let base = base.strip_suffix('}').unwrap_or(&base);
        let components: Vec<String> = self
            .components()
            .iter()
            .map(|c| {
                format!(
                    "{{\"name\":{},\"thread\":{},\"state\":{},\"detail\":{}}}",
                    json_string(c.name),
                    json_string(c.thread),
                    json_string(c.state.as_str()),
                    json_string(&c.detail)
                )
            })
            .collect();
        let at = |t: Option<u64>| json_option(t.map(|t| json_string(&time(t))));
        let detail = self.detail.as_ref().map(|d| {
            let channel = d.event_channel.as_ref().map(|c| {
                format!(
                    "{{\"connected\":{},\"since\":{},\"sessions\":{},\"last_error\":{}}}",
                    c.connected,
                    at(c.since),
                    c.sessions,
                    json_option(c.last_error.as_deref().map(json_string))
                )
            });
            format!(
                "{{\"pid\":{},\"started_at\":{},\"firewall_backend\":{},\"heartbeat_interval_s\":{},\
                 \"heartbeat_misses\":{},\"last_heartbeat_error\":{},\"pce_policy_version\":{},\
                 \"policy_in_sync\":{},\"policy_applied_at\":{},\"tamper_checks\":{},\
                 \"last_tamper_check\":{},\"last_tamper_check_error\":{},\"events_dropped\":{},\
                 \"event_channel\":{},\"flow_store\":{}}}",
                d.pid,
                json_string(&time(d.started_at)),
                json_string(&d.firewall_backend),
                d.heartbeat_interval_s,
                d.heartbeat_misses,
                json_option(d.last_heartbeat_error.as_ref().map(|(t, e)| {
                    format!("{{\"at\":{},\"error\":{}}}", json_string(&time(*t)), json_string(e))
                })),
                json_option(d.pce_policy_version.map(|v| v.to_string())),
                json_option(self.policy_in_sync().map(|b| b.to_string())),
                at(d.policy_applied_at),
                d.tamper_checks,
                at(d.last_tamper_check),
                json_option(d.last_tamper_check_error.as_deref().map(json_string)),
                d.events_dropped,
                json_option(channel),
                json_option(d.flow_store.as_ref().map(|f| format!(
                    "{{\"bytes\":{},\"file_cap_bytes\":{},\"rows_appended\":{},\"rotations\":{},\
                     \"dropped_unacknowledged\":{},\"pending_upload\":{}}}",
                    f.bytes,
                    f.file_cap_bytes,
                    f.rows_appended,
                    f.rotations,
                    f.dropped_unacknowledged,
                    f.pending_upload
                ))),
            )
        });
        let errors: Vec<String> = self
            .last_errors()
            .iter()
            .map(|(what, error)| {
                format!("{{\"what\":{},\"error\":{}}}", json_string(what), json_string(error))
            })
            .collect();
        format!(
            "{base},\"components\":[{}],\"detail\":{},\"last_errors\":[{}]}}",
            components.join(","),
            json_option(detail),
            errors.join(",")
        )
    }

    /// `ven status --all`: the plain status, then the components, connectivity, policy sync,
    /// tampering checks and the last errors.
    pub fn to_human_all(&self, now: u64) -> String {
        let mut lines = vec![self.to_human(now), String::new(), "components:".to_string()];
        for c in self.components() {
            lines.push(format!("  {:<16} {:<9} {:<9} {}", c.name, c.thread, c.state.as_str(), c.detail));
        }
        let Some(detail) = &self.detail else {
            lines.push(String::new());
            lines.push("(the agent is not running: the figures above are the saved ones)".to_string());
            return lines.join("\n");
        };
        let ago = |t: u64| format!("{} ({} s ago)", time(t), now.saturating_sub(t));
        lines.push(String::new());
        lines.push(format!("agent:             pid {}, started {}", detail.pid, ago(detail.started_at)));
        lines.push("connectivity:".to_string());
        lines.push(format!("  PCE:             {}", self.management_server.as_deref().unwrap_or("-")));
        let mut heartbeat = match self.last_heartbeat {
            Some(t) => format!("last success {}", ago(t)),
            None => "no success yet".to_string(),
        };
        heartbeat.push_str(&format!(
            ", every {} s, {} missed in a row",
            detail.heartbeat_interval_s, detail.heartbeat_misses
        ));
        lines.push(format!("  heartbeat:       {heartbeat}"));
        let channel = match &detail.event_channel {
            Some(c) if c.connected => format!(
                "up since {} ({} sessions)",
                c.since.map_or_else(|| "-".to_string(), time),
                c.sessions
            ),
            Some(c) => format!("down: {}", c.last_error.as_deref().unwrap_or("not connected yet")),
            None => "none (not paired)".to_string(),
        };
        lines.push(format!("  event channel:   {channel}"));
        lines.push("policy:".to_string());
        let applied = match (self.policy_version, detail.policy_applied_at) {
            (Some(v), Some(at)) => format!("version {v}, applied {}", time(at)),
            (Some(v), None) => format!("version {v} (restored at start)"),
            (None, _) => "none".to_string(),
        };
        lines.push(format!("  in force:        {applied}"));
        let sync = match (detail.pce_policy_version, self.policy_in_sync()) {
            (Some(v), Some(true)) => format!("in sync with the PCE (version {v})"),
            (Some(v), _) => format!("out of sync: the PCE has version {v}"),
            (None, _) => "not known yet (no heartbeat answer)".to_string(),
        };
        lines.push(format!("  sync:            {sync}"));
        lines.push("tampering:".to_string());
        lines.push(format!(
            "  checks:          {} since start, last {}",
            detail.tamper_checks,
            detail.last_tamper_check.map_or_else(|| "never".to_string(), time)
        ));
        lines.push(format!("  repairs:         {} since activation", self.tamper_count));
        if let Some(store) = &detail.flow_store {
            lines.push(format!(
                "flow store:        {} bytes in log/ (each file capped at {}), {} rows written since \
                 start, {} rotations, {} rows lost unacknowledged",
                store.bytes,
                store.file_cap_bytes,
                store.rows_appended,
                store.rotations,
                store.dropped_unacknowledged
            ));
            let failures = self.flow_uploads.as_ref().map_or(0, |u| u.failures);
            lines.push(format!(
                "uploads:           {} rows waiting for the PCE, {failures} failed rounds",
                store.pending_upload
            ));
        }
        if detail.events_dropped > 0 {
            lines.push(format!("events dropped:    {} (queue full)", detail.events_dropped));
        }
        let errors = self.last_errors();
        lines.push(format!("last errors:{}", if errors.is_empty() { "       none" } else { "" }));
        for (what, error) in errors {
            lines.push(format!("  {what:<16} {error}"));
        }
        lines.join("\n")
    }
}

// Issue 13: the connection table's figures (kept together; `status --all` is elsewhere).

/// `ven status --json`'s `flows.connections`: `counted` = `new` + `overflow` (each an
/// admitted logged packet that counted a connection), `again` the packets of connections
/// counted already, so `new + again + overflow` is every admitted packet.
fn connections_json(f: &crate::flows::FlowCounters) -> String {
    format!(
        "{{\"counted\":{},\"new\":{},\"again\":{},\"overflow\":{},\"tracked\":{},\"capacity\":{},\
         \"expired\":{},\"table_bytes\":{}}}",
        f.connections_new.saturating_add(f.connections_overflow),
        f.connections_new,
        f.connections_again,
        f.connections_overflow,
        f.connections_tracked,
        f.connections_capacity,
        f.connections_expired,
        f.connections_table_bytes,
    )
}

/// `ven status --json`'s `flows.accounting`: conntrack's bytes of accepted connections.
fn accounting_json(f: &crate::flows::FlowCounters) -> String {
    format!(
        "{{\"on\":{},\"accounted\":{},\"waiting\":{},\"overflow\":{},\"lost\":{},\"without_counters\":{}}}",
        f.accounting_on,
        f.accounted,
        f.accounted_tracked,
        f.accounted_overflow,
        f.accounted_lost,
        f.accounted_without_counters,
    )
}

/// The text form of [`accounting_json`].
fn accounting_line(f: &crate::flows::FlowCounters) -> String {
    if !f.accounting_on {
        return "                   accepted flows' bytes: off (no conntrack destroy events)".to_string();
    }
    let mut line = format!(
        "                   accepted flows' bytes: {} connections accounted, {} open; {} not tracked (table full), {} lost",
        f.accounted, f.accounted_tracked, f.accounted_overflow, f.accounted_lost
    );
    if f.accounted_without_counters > 0 {
        line.push_str(&format!(
            "; {} ended without counters (net.netfilter.nf_conntrack_acct is 0)",
            f.accounted_without_counters
        ));
    }
    line
}

/// The text form of [`connections_json`].
fn connections_line(f: &crate::flows::FlowCounters) -> String {
    format!(
        "                   {} connections counted ({} tracked + {} overflow, table full), {} repeated packets; \
         {} of {} tuples tracked ({} KiB)",
        f.connections_new.saturating_add(f.connections_overflow),
        f.connections_new,
        f.connections_overflow,
        f.connections_again,
        f.connections_tracked,
        f.connections_capacity,
        f.connections_table_bytes / 1024,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_misses_diminish_and_two_successes_recover() {
        let mut tracker = HeartbeatTracker::new();
        assert_eq!(tracker.connectivity(), Connectivity::Offline);
        tracker.success();
        assert_eq!(tracker.connectivity(), Connectivity::Online);
        tracker.miss();
        assert_eq!(tracker.connectivity(), Connectivity::Online);
        tracker.miss();
        assert_eq!(tracker.connectivity(), Connectivity::Diminished);
        tracker.success();
        assert_eq!(tracker.connectivity(), Connectivity::Diminished);
        tracker.miss();
        tracker.success();
        assert_eq!(tracker.connectivity(), Connectivity::Diminished, "successes must be in a row");
        tracker.success();
        assert_eq!(tracker.connectivity(), Connectivity::Online);
    }

    #[test]
    fn lost_agent_leaves_on_the_first_success() {
        let mut tracker = HeartbeatTracker::new();
        tracker.unauthorized();
        assert_eq!(tracker.connectivity(), Connectivity::LostAgent);
        tracker.miss();
        assert_eq!(tracker.connectivity(), Connectivity::LostAgent);
        tracker.success();
        assert_eq!(tracker.connectivity(), Connectivity::Online);
    }

    #[test]
    fn a_suspected_clone_says_so_and_what_to_do_without_an_agent() {
        let dir = std::env::temp_dir().join(format!("ven-status-clone-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let data = DataDir::new(&dir);
        data.ensure().unwrap();
        let identity = Identity {
            agent_id: 3,
            agent_token: "t".into(),
            hostname: "db".into(),
            management_server: "198.18.0.1:8443".into(),
            event_port: 8444,
            ca_cert_der: Vec::new(),
            heartbeat_interval_s: 300,
            activated_at: 0,
        };
        state::write_record(&data.identity_path(), RecordKind::Identity, &identity, 0o600).unwrap();
        assert_eq!(StatusReport::from_data_dir(&data).unwrap().connectivity, Connectivity::Offline);
        let suspicion = state::CloneSuspicion { since: 0, message: "suspected clone: re-pair".into() };
        state::write_record(&data.clone_suspected_path(), RecordKind::CloneSuspected, &suspicion, 0o600)
            .unwrap();
        let report = StatusReport::from_data_dir(&data).unwrap();
        assert_eq!(report.connectivity, Connectivity::SuspectedClone);
        let text = report.to_human(0);
        assert!(text.contains("suspected clone") && text.contains(SUSPECTED_CLONE_ADVICE), "{text}");
        let json = report.to_json();
        assert!(json.contains(r#""connectivity":"suspected clone""#), "{json}");
        assert!(json.contains(r#""suspected_clone":{"since":"1970-01-01T00:00:00Z""#), "{json}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn json_has_every_field_and_escapes_strings() {
        let mut report = StatusReport::unpaired();
        report.agent_id = Some(4);
        report.hostname = Some("we\"b".into());
        report.policy_state = Some(PolicyState::Enforced);
        report.policy_version = Some(9);
        report.last_heartbeat = Some(0);
        report.last_apply_error = Some("line1\nline2".into());
        let json = report.to_json();
        assert!(json.contains(r#""activated":true"#), "{json}");
        assert!(json.contains(r#""hostname":"we\"b""#), "{json}");
        assert!(json.contains(r#""policy_state":"enforced""#), "{json}");
        assert!(json.contains(r#""policy_version":9"#), "{json}");
        assert!(json.contains(r#""last_heartbeat":"1970-01-01T00:00:00Z""#), "{json}");
        assert!(json.contains(r#""last_apply_error":"line1\nline2""#), "{json}");
        assert!(json.contains(r#""management_server":null"#), "{json}");
    }

    #[test]
    fn all_names_each_component_and_the_last_errors() {
        let mut report = StatusReport::unpaired();
        assert!(report.components().iter().all(|c| c.state == ComponentState::Stopped));
        assert!(report.to_human_all(0).contains("the agent is not running"));
        report.agent_running = true;
        report.agent_id = Some(1);
        report.connectivity = Connectivity::Diminished;
        report.policy_state = Some(PolicyState::Enforced);
        report.policy_version = Some(3);
        report.detail = Some(AgentDetail {
            firewall_backend: "nft".into(),
            heartbeat_interval_s: 300,
            heartbeat_misses: 2,
            last_heartbeat_error: Some((0, "connection refused".into())),
            pce_policy_version: Some(4),
            event_channel: Some(EventChannel {
                last_error: Some("event service down".into()),
                ..Default::default()
            }),
            ..AgentDetail::default()
        });
        let components = report.components();
        let names: Vec<&str> = components.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            ["AgentManager", "EventSync", "PlatformHandler", "VtapServer", "AgentLogManager", "Control"]
        );
        assert_eq!(components[0].state, ComponentState::Degraded, "diminished");
        assert_eq!(components[1].state, ComponentState::Degraded, "channel down");
        assert!(
            components[2].detail.contains("version 3 (enforced)") && components[2].detail.contains("nft")
        );
        assert_eq!(components[3].state, ComponentState::Stopped, "no flow pipeline");
        assert_eq!(report.policy_in_sync(), Some(false));
        let text = report.to_human_all(100);
        assert!(text.contains("policy:          enforced (version 3); the PCE has version 4"), "{text}");
        assert!(text.contains("out of sync: the PCE has version 4"), "{text}");
        assert!(text.contains("heartbeat") && text.contains("connection refused"), "{text}");
        let json = report.to_json_all();
        assert!(json.contains(r#""name":"EventSync","thread":"evsync","state":"degraded""#), "{json}");
        assert!(json.contains(r#""policy_in_sync":false"#), "{json}");
        assert!(json.contains(r#""what":"event channel","error":"event service down""#), "{json}");
        assert!(json.ends_with("]}") && json.starts_with('{'), "{json}");
    }

    /// Issue 13: the connection table's figures, in JSON and text, add up.
    #[test]
    fn connection_figures_show_counted_as_new_plus_overflow() {
        let mut report = StatusReport::unpaired();
        report.flows = Some(crate::flows::FlowCounters {
            events: 12,
            connections_new: 5,
            connections_again: 4,
            connections_overflow: 3,
            connections_tracked: 5,
            connections_capacity: 100,
            connections_table_bytes: 4608,
            ..Default::default()
        });
        let json = report.to_json();
        assert!(
            json.contains(
                r#""connections":{"counted":8,"new":5,"again":4,"overflow":3,"tracked":5,"capacity":100,"expired":0,"table_bytes":4608}"#
            ),
            "{json}"
        );
        let line = connections_line(report.flows.as_ref().unwrap());
        assert!(
            line.contains("8 connections counted (5 tracked + 3 overflow, table full), 4 repeated packets"),
            "{line}"
        );
        assert!(line.contains("5 of 100 tuples tracked (4 KiB)"), "{line}");
    }
}
