//! Organisation events: what happened to the workloads (tampering reported by a VEN, suspension,
//! pairing, isolation), kept in a bounded ring and exportable as JSON, CEF and LEEF.
//!
//! Guarantees: the ring holds at most [`MAX_ORG_EVENTS`]; when full the oldest event is dropped
//! and counted ([`EventLog::dropped`]), never a panic, never growth. Ids increase by one per
//! event and are never reused, also across restarts (the store persists the log).

use crate::clock;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::VecDeque;
use ven_proto::UpgradeStep;

/// Events the PCE keeps; older ones are dropped (counted).
pub const MAX_ORG_EVENTS: usize = 10_000;

/// What kind of event it is. The names are the spec's where it has one (`server_suspended`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    /// A VEN found its firewall changed behind its back (details: summary, repaired).
    Tampering,
    /// The VEN was suspended: it enforces nothing, stays a peer and is not taken offline.
    ServerSuspended,
    ServerUnsuspended,
    /// The workload left its peers' policies (goodbye or missed heartbeats).
    WorkloadOffline,
    /// The workload came back into its peers' policies.
    WorkloadOnline,
    AgentActivated,
    AgentDeactivated,
    /// The VEN missed three heartbeats in a row (it stays a peer until it goes offline).
    AgentMissedHeartbeats,
    /// A worker thread of the VEN ended and was started again (details: component, cause).
    AgentComponentRestarted,
    /// A VEN presented its agent id with a wrong token (the spec's "lost agent": it must be
    /// reinstalled or paired again). At most one per agent per [`LOST_AGENT_WINDOW_S`].
    LostAgent,
    /// A second live copy of a workload's agent presented its credentials (a copied data
    /// directory): everything it sends that would change the workload is ignored.
    CloneDetected,
    /// A step of a VEN's self-upgrade (details: version, step, detail): staged, committed,
    /// deferred to the package manager, refused or rolled back.
    AgentUpgrade,
}

impl EventType {
    pub const ALL: [EventType; 12] = [
        Self::Tampering,
        Self::ServerSuspended,
        Self::ServerUnsuspended,
        Self::WorkloadOffline,
        Self::WorkloadOnline,
        Self::AgentActivated,
        Self::AgentDeactivated,
        Self::AgentMissedHeartbeats,
        Self::AgentComponentRestarted,
        Self::LostAgent,
        Self::CloneDetected,
        Self::AgentUpgrade,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tampering => "tampering",
            Self::ServerSuspended => "server_suspended",
            Self::ServerUnsuspended => "server_unsuspended",
            Self::WorkloadOffline => "workload_offline",
            Self::WorkloadOnline => "workload_online",
            Self::AgentActivated => "agent_activated",
            Self::AgentDeactivated => "agent_deactivated",
            Self::AgentMissedHeartbeats => "agent_missed_heartbeats",
            Self::AgentComponentRestarted => "agent_component_restarted",
            Self::LostAgent => "lost_agent",
            Self::CloneDetected => "clone_detected",
            Self::AgentUpgrade => "agent_upgrade",
        }
    }

    pub fn severity(self) -> Severity {
        match self {
            Self::Tampering
            | Self::ServerSuspended
            | Self::ServerUnsuspended
            | Self::WorkloadOffline
            | Self::AgentMissedHeartbeats
            | Self::AgentComponentRestarted
            | Self::LostAgent
            | Self::CloneDetected => Severity::Warning,
            Self::WorkloadOnline | Self::AgentActivated | Self::AgentDeactivated => Severity::Info,
            // Refusals and rollbacks are warnings: `OrgEvent::severity` reads the step.
            Self::AgentUpgrade => Severity::Info,
        }
    }
}

impl std::str::FromStr for EventType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| {
            let known: Vec<&str> = Self::ALL.iter().map(|t| t.as_str()).collect();
            format!("unknown event type {s:?} (expected one of {})", known.join(", "))
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
        }
    }

    /// CEF severity (0-10) and LEEF `sev` (1-10): info 3, warning 6.
    pub fn number(self) -> u8 {
        match self {
            Self::Info => 3,
            Self::Warning => 6,
        }
    }
}

/// One organisation event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrgEvent {
    pub id: u64,
    /// Unix seconds, the PCE's clock.
    pub at: u64,
    pub event_type: EventType,
    /// The workload concerned, if any, and its hostname at the time.
    pub workload_id: Option<u64>,
    pub hostname: Option<String>,
    /// One line for people and SIEMs.
    pub message: String,
    /// Machine-readable particulars (a JSON object).
    pub details: Map<String, Value>,
}

impl OrgEvent {
    /// The type's severity, except for an upgrade step that failed (`refused`, `rolled-back`):
    /// a warning.
    pub fn severity(&self) -> Severity {
        let failed_step = || {
            let step = self.details.get("step").and_then(Value::as_str);
            matches!(step, Some(step) if step == UpgradeStep::Refused.as_str() || step == UpgradeStep::RolledBack.as_str())
        };
        if self.event_type == EventType::AgentUpgrade && failed_step() {
            return Severity::Warning;
        }
        self.event_type.severity()
    }
}

/// The bounded ring of events, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EventLog {
    /// Id of the newest event ever recorded (0: none).
    pub last_id: u64,
    /// Events dropped because the ring was full.
    pub dropped: u64,
    events: VecDeque<OrgEvent>,
}

impl EventLog {
    /// Records an event at `at` about `workload` (id, hostname).
    pub fn record(
        &mut self,
        at: u64,
        event_type: EventType,
        workload: Option<(u64, &str)>,
        message: String,
        details: Map<String, Value>,
    ) {
        self.push(at, event_type, workload, message, details, MAX_ORG_EVENTS);
    }

    fn push(
        &mut self,
        at: u64,
        event_type: EventType,
        workload: Option<(u64, &str)>,
        message: String,
        details: Map<String, Value>,
        capacity: usize,
    ) {
        while self.events.len() >= capacity.max(1) {
            self.events.pop_front();
            self.dropped += 1;
            if self.dropped.is_power_of_two() {
                log::warn!("organisation events: ring of {capacity} full, {} dropped so far", self.dropped);
            }
        }
        self.last_id += 1;
        self.events.push_back(OrgEvent {
            id: self.last_id,
            at,
            event_type,
            workload_id: workload.map(|(id, _)| id),
            hostname: workload.map(|(_, host)| host.to_string()),
            message,
            details,
        });
    }

    /// Oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &OrgEvent> + ExactSizeIterator {
        self.events.iter()
    }

    /// The log from what a store kept: the counters and the events (any order; the newest
    /// [`MAX_ORG_EVENTS`] are kept).
    pub fn from_parts(last_id: u64, dropped: u64, mut events: Vec<OrgEvent>) -> Self {
        events.sort_by_key(|event| event.id);
        let excess = events.len().saturating_sub(MAX_ORG_EVENTS);
        let events: VecDeque<OrgEvent> = events.into_iter().skip(excess).collect();
        let last_id = last_id.max(events.back().map_or(0, |event| event.id));
        Self { last_id, dropped: dropped + excess as u64, events }
    }
}

/// A VEN whose credentials are refused retries (every 4 hours in the spec's lost agent state,
/// far more often when it loops): one `lost_agent` event per agent in this many seconds.
pub const LOST_AGENT_WINDOW_S: u64 = 3600;
/// Most `lost_agent` events in any [`LOST_AGENT_WINDOW_S`], all agents together: agent ids are
/// small consecutive numbers, so a client guessing them cannot push the other events out of
/// the ring.
pub const MAX_LOST_AGENT_EVENTS_PER_WINDOW: usize = 64;

/// Decides which authentication failures become `lost_agent` events: one per agent per
/// window, [`MAX_LOST_AGENT_EVENTS_PER_WINDOW`] in all. Kept in memory only (a restarted PCE
/// may raise one more).
#[derive(Debug, Default)]
pub struct LostAgentLimiter {
    /// (agent id, when raised) of the events raised in the last window, oldest first.
    /// INVARIANT: at most [`MAX_LOST_AGENT_EVENTS_PER_WINDOW`] entries.
    raised: VecDeque<(u64, u64)>,
    /// Failures not raised since the last event that was, reported in its details.
    suppressed: u64,
}

impl LostAgentLimiter {
    /// Whether the failure of `agent_id` at `now` is to be raised; `Some(n)` with the failures
    /// suppressed before it (any agent), `None` when it is suppressed itself.
    pub fn admit(&mut self, agent_id: u64, now: u64) -> Option<u64> {
        while self.raised.front().is_some_and(|&(_, at)| at.saturating_add(LOST_AGENT_WINDOW_S) <= now) {
            self.raised.pop_front();
        }
        let already = self.raised.iter().any(|&(id, _)| id == agent_id);
        if already || self.raised.len() >= MAX_LOST_AGENT_EVENTS_PER_WINDOW {
            self.suppressed += 1;
            return None;
        }
        self.raised.push_back((agent_id, now));
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// One CEF line: `CEF:0|ven|pce|<version>|<type>|<type>|<severity>|rt=<ms> externalId=<id>
/// dhost=<hostname> msg=<message>` (dhost only when a workload is concerned).
pub fn cef(event: &OrgEvent, version: &str) -> String {
    let name = event.event_type.as_str();
    let mut line = format!(
        "CEF:0|ven|pce|{}|{name}|{name}|{}|rt={} externalId={}",
        cef_header(version),
        event.severity().number(),
        event.at.saturating_mul(1000),
        event.id,
    );
    if let Some(host) = &event.hostname {
        line.push_str(&format!(" dhost={}", cef_value(host)));
    }
    line.push_str(&format!(" msg={}", cef_value(&event.message)));
    line
}

/// One LEEF 2.0 line: `LEEF:2.0|ven|pce|<version>|<type>|x09|` then tab-separated key=value:
/// devTime (RFC 3339, with its devTimeFormat), sev, cat (severity name), eventId, hostname and
/// workloadId when a workload is concerned, msg.
pub fn leef(event: &OrgEvent, version: &str) -> String {
    let mut fields = vec![
        format!("devTime={}", clock::rfc3339(event.at)),
        "devTimeFormat=yyyy-MM-dd'T'HH:mm:ssX".to_string(),
        format!("sev={}", event.severity().number()),
        format!("cat={}", event.severity().as_str()),
        format!("eventId={}", event.id),
    ];
    if let Some(host) = &event.hostname {
        fields.push(format!("hostname={}", leef_value(host)));
    }
    if let Some(id) = event.workload_id {
        fields.push(format!("workloadId={id}"));
    }
    fields.push(format!("msg={}", leef_value(&event.message)));
    format!(
        "LEEF:2.0|ven|pce|{}|{}|x09|{}",
        leef_value(version).replace('|', "/"),
        event.event_type.as_str(),
        fields.join("\t")
    )
}

/// CEF header field: `\` and `|` escaped, line breaks made spaces.
fn cef_header(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '|' => out.push_str("\\|"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// CEF extension value: `\` and `=` escaped, line breaks as `\n` / `\r`, other controls spaces.
fn cef_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '=' => out.push_str("\\="),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// LEEF value: no tab (the delimiter) or other control character survives.
fn leef_value(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// Fuzzing (the `pce_org_events` target): `data` as one stored event record (JSON, as the store
/// keeps it) and as a list of them. What decodes renders as one CEF and one LEEF line whatever its
/// hostname and message hold (a VEN chooses its hostname), and the ring keeps its bound.
#[doc(hidden)]
pub fn fuzz_events(data: &[u8]) {
    let version = std::str::from_utf8(data.get(..8).unwrap_or_default()).unwrap_or("18.1");
    let mut events = Vec::new();
    if let Ok(event) = serde_json::from_slice::<OrgEvent>(data) {
        events.push(event);
    }
    if let Ok(list) = serde_json::from_slice::<Vec<OrgEvent>>(data) {
        events.extend(list);
    }
    for event in &events {
        let cef = cef(event, version);
        assert!(!cef.contains(['\n', '\r']), "{cef:?}");
        let leef = leef(event, version);
        assert!(!leef.contains(['\n', '\r']), "{leef:?}");
        let fields = 5 + usize::from(event.hostname.is_some()) + usize::from(event.workload_id.is_some()) + 1;
        assert_eq!(leef.matches('\t').count(), fields - 1, "{leef:?}");
        let _ = serde_json::to_vec(event);
    }
    let count = events.len();
    let log = EventLog::from_parts(0, 0, events);
    assert_eq!(log.iter().count(), count.min(MAX_ORG_EVENTS));
    assert!(log.iter().zip(log.iter().skip(1)).all(|(a, b)| a.id <= b.id));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tampering() -> OrgEvent {
        let mut log = EventLog::default();
        let details = json!({ "summary": "chain VEN-INPUT changed", "repaired": true });
        log.record(
            1_795_780_800,
            EventType::Tampering,
            Some((3, "web")),
            "firewall tampering: a=b|c\\d\ne".to_string(),
            details.as_object().cloned().unwrap_or_default(),
        );
        log.iter().next().cloned().unwrap()
    }

    #[test]
    fn failed_upgrade_steps_are_warnings() {
        let event = |step: UpgradeStep| {
            let mut event = tampering();
            event.event_type = EventType::AgentUpgrade;
            event.details =
                json!({ "version": "1.2.0", "step": step.as_str() }).as_object().cloned().unwrap();
            event.severity()
        };
        assert_eq!(event(UpgradeStep::Refused), Severity::Warning);
        assert_eq!(event(UpgradeStep::RolledBack), Severity::Warning);
        assert_eq!(event(UpgradeStep::Committed), Severity::Info);
        assert_eq!(event(UpgradeStep::Staged), Severity::Info);
    }

    #[test]
    fn cef_lines_escape_extension_values() {
        assert_eq!(
            cef(&tampering(), "0.1.0"),
            "CEF:0|ven|pce|0.1.0|tampering|tampering|6|rt=1795780800000 externalId=1 dhost=web \
             msg=firewall tampering: a\\=b|c\\\\d\\ne"
        );
        let mut event = tampering();
        event.hostname = None;
        event.event_type = EventType::AgentActivated;
        let line = cef(&event, "1|2");
        assert!(line.starts_with("CEF:0|ven|pce|1\\|2|agent_activated|agent_activated|3|rt="), "{line}");
        assert!(!line.contains("dhost="));
    }

    #[test]
    fn leef_lines_are_tab_separated_without_stray_tabs() {
        let mut event = tampering();
        event.message = "a\tb\nc".to_string();
        assert_eq!(
            leef(&event, "0.1.0"),
            "LEEF:2.0|ven|pce|0.1.0|tampering|x09|devTime=2026-11-27T12:00:00Z\t\
             devTimeFormat=yyyy-MM-dd'T'HH:mm:ssX\tsev=6\tcat=warning\teventId=1\thostname=web\t\
             workloadId=3\tmsg=a b c"
        );
    }

    #[test]
    fn the_ring_drops_the_oldest_and_counts() {
        let mut log = EventLog::default();
        for at in 0..5 {
            log.push(at, EventType::WorkloadOnline, None, format!("{at}"), Map::new(), 3);
        }
        assert_eq!((log.iter().len(), log.dropped, log.last_id), (3, 2, 5));
        let ids: Vec<u64> = log.iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![3, 4, 5]);
    }

    #[test]
    fn lost_agent_events_are_limited_per_agent_and_in_all() {
        let mut limiter = LostAgentLimiter::default();
        assert_eq!(limiter.admit(7, 1000), Some(0));
        for second in 1..100 {
            assert_eq!(limiter.admit(7, 1000 + second), None, "a looping VEN raises one per window");
        }
        assert_eq!(limiter.admit(8, 1100), Some(99), "another agent is raised, with the count");
        assert_eq!(limiter.admit(7, 1000 + LOST_AGENT_WINDOW_S - 1), None);
        assert_eq!(limiter.admit(7, 1000 + LOST_AGENT_WINDOW_S), Some(1), "the next window");
        let mut flood = LostAgentLimiter::default();
        let raised = (0..10_000u64).filter(|id| flood.admit(*id, 5).is_some()).count();
        assert_eq!(raised, MAX_LOST_AGENT_EVENTS_PER_WINDOW, "guessed ids cannot flood the ring");
        assert!(flood.raised.len() <= MAX_LOST_AGENT_EVENTS_PER_WINDOW);
        assert_eq!(flood.admit(20_000, 5 + LOST_AGENT_WINDOW_S), Some(10_000 - 64));
    }

    #[test]
    fn event_types_parse_their_names_only() {
        for t in EventType::ALL {
            assert_eq!(t.as_str().parse::<EventType>(), Ok(t));
            assert_eq!(serde_json::to_value(t).unwrap(), json!(t.as_str()));
        }
        assert!("suspended".parse::<EventType>().unwrap_err().contains("server_suspended"));
    }
}
