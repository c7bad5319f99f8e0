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
        }
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
        Ok(report)
    }

    pub fn unpaired() -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION").to_string(),
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
                         \"last_store_error\":{},\"connections\":{}}}",
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
            (_, Some(state), Some(version)) => format!("{state} (version {version})"),
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
