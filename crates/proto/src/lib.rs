//! Wire types shared by the `ven` agent and the `pce`.
//!
//! Two channels carry them, both over TLS 1.3 with the PCE's own CA:
//! - the VEN API (HTTPS, default port 8443): request and response bodies are postcard-encoded
//!   messages from this crate, and every request names [`PROTOCOL_VERSION`] in [`PROTOCOL_HEADER`];
//! - the event service (default port 8444): length-prefixed postcard frames ([`frame`]).
//!
//! Compatibility rule: postcard encodes enums by variant index and structs by field order, with no
//! field names and no defaults for missing fields. New enum variants are only ever appended (an
//! old message still decodes); any new field, or any other change of the encoding, bumps
//! [`PROTOCOL_VERSION`].
#![forbid(unsafe_code)]

pub mod clock;
pub mod frame;
mod net;
pub mod release;

pub use net::{IpNet, IpNetError};

use serde::{Deserialize, Serialize};

/// Version of the messages in this crate. A PCE answers a request carrying another version with
/// `409 Conflict` and an [`ErrorBody`] of kind [`ErrorKind::ProtocolMismatch`].
// History: 1 = walking skeleton; 2 = custom rules in policies, agent events in heartbeats,
// suspend notices; 3 = flow uploads; 4 = flow records carry packets and bytes (a PCE still takes
// version 3 requests: only the flow batch changed, see [`FlowBatchV3`]); 5 = support reports the
// PCE requests: the heartbeat answer names a pending request ([`HeartbeatResponseV4`] is what
// older VENs get), the bolt [`frame::Event::SupportReportRequested`] (sent only to VENs whose
// Hello says 5 or more), and [`path::SUPPORT_REPORT`]; 6 = signed self-upgrade: the heartbeat
// answer names the release the PCE wants the VEN to run ([`HeartbeatResponseV5`] for older VENs),
// the bolt [`frame::Event::UpgradeRequested`], [`path::RELEASE`], [`AgentEventKind::Upgrade`],
// and the heartbeat carries the host's uptime and the agent's target ([`HeartbeatRequestV5`] is
// what older VENs send).
pub const PROTOCOL_VERSION: u16 = 6;
/// Oldest version a PCE still answers: version 3 differs only in [`FlowRecordV3`] and
/// [`HeartbeatResponseV4`], version 4 in the latter.
pub const OLDEST_PROTOCOL_VERSION: u16 = 3;
/// First version that knows support-report requests (heartbeat field, bolt, upload).
pub const SUPPORT_REPORT_PROTOCOL_VERSION: u16 = 5;
/// First version that knows upgrades (heartbeat fields, bolt, release download).
pub const UPGRADE_PROTOCOL_VERSION: u16 = 6;

/// Whether a PCE of this version answers a request naming `version`.
pub fn protocol_supported(version: u16) -> bool {
    (OLDEST_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version)
}
/// HTTP header carrying [`PROTOCOL_VERSION`] on every VEN API request and response.
pub const PROTOCOL_HEADER: &str = "x-ven-protocol";
/// Content type of postcard bodies on the VEN API.
pub const CONTENT_TYPE: &str = "application/x-ven-postcard";
/// Largest VEN API body either side accepts (a policy for a large host fits comfortably).
pub const MAX_BODY_BYTES: u64 = 16 * 1024 * 1024;
/// Request header: the clone token the VEN holds (issue 16; absent before the PCE handed one).
/// Headers, not bodies, so the protocol version stays.
pub const CLONE_TOKEN_HEADER: &str = "x-ven-clone-token";
/// Request header: the agent process's instance id, random at every start and never stored.
pub const INSTANCE_HEADER: &str = "x-ven-instance";
/// Response header: the next clone token; the VEN persists it before presenting it.
pub const NEXT_CLONE_TOKEN_HEADER: &str = "x-ven-clone-token-next";
/// Longest clone token or instance id either side accepts.
pub const MAX_CLONE_FIELD_BYTES: usize = 64;

/// Default port of the VEN API.
pub const DEFAULT_API_PORT: u16 = 8443;
/// Default port of the event service.
pub const DEFAULT_EVENT_PORT: u16 = 8444;

/// Paths of the VEN API. Authenticated requests carry `authorization: Bearer <agent_id>.<token>`.
pub mod path {
    /// POST [`ActivateRequest`](super::ActivateRequest) -> [`ActivateResponse`](super::ActivateResponse). No credentials.
    pub const ACTIVATE: &str = "/ven/v1/activate";
    /// POST [`HeartbeatRequest`](super::HeartbeatRequest) -> [`HeartbeatResponse`](super::HeartbeatResponse).
    pub const HEARTBEAT: &str = "/ven/v1/heartbeat";
    /// GET -> [`Policy`](super::Policy); with `if-none-match: <version>` answers 304 when unchanged.
    pub const POLICY: &str = "/ven/v1/policy";
    /// POST [`Goodbye`](super::Goodbye) -> empty 204: the agent is stopping (PCE marks it offline).
    pub const GOODBYE: &str = "/ven/v1/goodbye";
    /// POST -> empty 204: the agent unpairs; the PCE forgets it.
    pub const DEACTIVATE: &str = "/ven/v1/deactivate";
    /// POST [`SuspendNotice`](super::SuspendNotice) -> empty 204: the VEN was suspended or
    /// unsuspended (a suspended VEN sends no heartbeats and is not taken offline for it).
    pub const SUSPEND: &str = "/ven/v1/suspend";
    /// POST [`FlowBatch`](super::FlowBatch) -> [`FlowAck`](super::FlowAck): flow summaries,
    /// oldest first; the VEN forgets nothing before the PCE acknowledges it.
    pub const FLOWS: &str = "/ven/v1/flows";
    /// POST [`ServicesReport`](super::ServicesReport) -> empty 204: the listening services,
    /// when they changed (a PCE without it answers 404; the VEN then stops sending them).
    pub const SERVICES: &str = "/ven/v1/services";
    /// POST [`SupportReportUpload`](super::SupportReportUpload) -> empty 204: the support report
    /// the PCE asked for (protocol 5); 409 when no such request is pending for this workload.
    pub const SUPPORT_REPORT: &str = "/ven/v1/support_report";
    /// POST [`HostReport`](super::HostReport) -> [`ActivateResponse`](super::ActivateResponse):
    /// a suspected clone (issue 16) re-pairs as a new workload from the pairing profile the
    /// original came from, when that profile allows it (else 401 `BadActivationCode`, why).
    pub const REACTIVATE: &str = "/ven/v1/reactivate";
    /// GET `?version=V&target=T` -> the release's binary as it is (`application/octet-stream`),
    /// its detached signature in [`RELEASE_SIGNATURE_HEADER`](super::RELEASE_SIGNATURE_HEADER)
    /// (protocol 6). 404 `NotFound` when the PCE holds no such release. The VEN trusts none of it
    /// until the signature verifies with its pinned release key.
    pub const RELEASE: &str = "/ven/v1/release";
}

/// Response header of [`path::RELEASE`]: the release's Ed25519 signature, 128 hex digits.
pub const RELEASE_SIGNATURE_HEADER: &str = "x-ven-release-signature";

/// Builds the `authorization` header value for an agent.
pub fn bearer(agent_id: u64, agent_token: &str) -> String {
    format!("Bearer {agent_id}.{agent_token}")
}

/// Parses an `authorization` header value built by [`bearer`].
pub fn parse_bearer(value: &str) -> Option<(u64, &str)> {
    let credentials = value.strip_prefix("Bearer ")?;
    let (id, token) = credentials.split_once('.')?;
    Some((id.parse().ok()?, token))
}

/// How the VEN's policy acts on the host's firewall (the spec's workload policy states).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PolicyState {
    /// The firewall is left as the host has it; the VEN only reports.
    Idle,
    /// Nothing is blocked; new connections are logged.
    Build,
    /// Nothing is blocked; what enforcement would block is logged as such.
    Test,
    /// Default deny: only what the rules allow passes; drops are logged.
    Enforced,
}

impl PolicyState {
    pub const ALL: [PolicyState; 4] = [Self::Idle, Self::Build, Self::Test, Self::Enforced];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Build => "build",
            Self::Test => "test",
            Self::Enforced => "enforced",
        }
    }
}

impl std::fmt::Display for PolicyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PolicyState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("unknown policy state {s:?} (expected idle, build, test or enforced)"))
    }
}

/// One network interface of the host and its addresses (with prefix length).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    pub addresses: Vec<IpNet>,
}

/// What the VEN reports about its host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReport {
    pub hostname: String,
    /// `uname -srm`-like description of the OS.
    pub os: String,
    pub agent_version: String,
    pub interfaces: Vec<Interface>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivateRequest {
    pub activation_code: String,
    pub host: HostReport,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivateResponse {
    pub agent_id: u64,
    /// Secret for every later request; the PCE keeps only its hash.
    pub agent_token: String,
    pub heartbeat_interval_s: u32,
    pub event_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    /// Version of the policy the firewall carries now (0: none yet).
    pub applied_policy_version: u64,
    /// State the firewall is in now.
    pub applied_state: PolicyState,
    /// Why the last apply failed, while the previous policy stays in force.
    pub apply_error: Option<String>,
    /// Sent when the host's interfaces changed since the last report.
    pub host: Option<HostReport>,
    /// What happened on the VEN since the last accepted heartbeat, oldest first (at most
    /// [`MAX_EVENTS_PER_HEARTBEAT`]); the VEN drops them only once a heartbeat is accepted.
    pub events: Vec<AgentEvent>,
    /// Seconds since the host booted (`None` from VENs before protocol 6).
    pub host_uptime_s: Option<u64>,
    /// The Rust target triple the agent was built for: the releases it can run (`None` from VENs
    /// before protocol 6).
    pub target: Option<String>,
}

/// [`HeartbeatRequest`] as VENs of protocol versions 3 to 5 encode it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRequestV5 {
    pub applied_policy_version: u64,
    pub applied_state: PolicyState,
    pub apply_error: Option<String>,
    pub host: Option<HostReport>,
    pub events: Vec<AgentEvent>,
}

impl From<HeartbeatRequestV5> for HeartbeatRequest {
    fn from(old: HeartbeatRequestV5) -> Self {
        let HeartbeatRequestV5 { applied_policy_version, applied_state, apply_error, host, events } = old;
        Self {
            applied_policy_version,
            applied_state,
            apply_error,
            host,
            events,
            host_uptime_s: None,
            target: None,
        }
    }
}

/// Most [`AgentEvent`]s one heartbeat carries.
pub const MAX_EVENTS_PER_HEARTBEAT: usize = 16;

/// Something the VEN noticed that the PCE records as an organisation event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentEvent {
    /// Unix seconds.
    pub at: u64,
    pub kind: AgentEventKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentEventKind {
    /// The firewall differed from the applied policy (`summary` says how); `repaired` tells
    /// whether the VEN put it back.
    Tampering { summary: String, repaired: bool },
    /// A worker thread of the agent (`component`: flows, uploader, evsync, ...) ended and is
    /// being started again; `restarts` counts them since the agent started.
    ComponentRestarted { component: String, restarts: u64, cause: String },
    /// A step of a self-upgrade to release `version` (protocol 6); `detail` says what happened
    /// (why it was refused, what it rolled back from).
    Upgrade { version: String, step: UpgradeStep, detail: String },
}

/// The steps of a self-upgrade a VEN reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpgradeStep {
    /// The VEN was installed by a package manager and leaves upgrades to it (configuration).
    Deferred,
    /// The release was downloaded, verified and written beside the running binary.
    Staged,
    /// The download or a check failed (length, digest, signature, architecture, disk); the
    /// running binary stays.
    Refused,
    /// The new binary reported healthy and replaced the old one.
    Committed,
    /// The new binary did not report healthy in time, or stopped: the old one runs again.
    RolledBack,
}

impl UpgradeStep {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deferred => "deferred",
            Self::Staged => "staged",
            Self::Refused => "refused",
            Self::Committed => "committed",
            Self::RolledBack => "rolled-back",
        }
    }
}

/// Sent when the operator suspends (`suspended: true`) or unsuspends the VEN.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuspendNotice {
    pub suspended: bool,
    /// Policy state the firewall carried before the suspension (when suspending).
    pub previous_state: Option<PolicyState>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// The policy version the PCE holds for this VEN; the VEN fetches it when it differs.
    pub policy_version: u64,
    pub heartbeat_interval_s: u32,
    /// A support report the PCE asked for and has not received yet (its request id): repeated in
    /// every answer until the upload arrives, so a lost bolt loses no request.
    pub support_report_request: Option<u64>,
    /// The release the PCE wants this VEN to run (only one the PCE holds for the VEN's target),
    /// repeated in every answer while the VEN runs another version.
    pub upgrade: Option<String>,
}

/// [`HeartbeatResponse`] as VENs of protocol version 5 decode it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponseV5 {
    pub policy_version: u64,
    pub heartbeat_interval_s: u32,
    pub support_report_request: Option<u64>,
}

impl From<HeartbeatResponse> for HeartbeatResponseV5 {
    fn from(response: HeartbeatResponse) -> Self {
        Self {
            policy_version: response.policy_version,
            heartbeat_interval_s: response.heartbeat_interval_s,
            support_report_request: response.support_report_request,
        }
    }
}

/// [`HeartbeatResponse`] as VENs of protocol versions 3 and 4 decode it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponseV4 {
    pub policy_version: u64,
    pub heartbeat_interval_s: u32,
}

impl From<HeartbeatResponse> for HeartbeatResponseV4 {
    fn from(response: HeartbeatResponse) -> Self {
        Self { policy_version: response.policy_version, heartbeat_interval_s: response.heartbeat_interval_s }
    }
}

/// Largest support report a VEN uploads and a PCE accepts (the VEN's own cap is 4 MiB).
pub const MAX_SUPPORT_REPORT_BYTES: usize = 8 * 1024 * 1024;

/// A support report (`ven gen-supportreport`'s tar) answering request `request`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupportReportUpload {
    pub request: u64,
    /// The archive, at most [`MAX_SUPPORT_REPORT_BYTES`] (postcard: a length, then the bytes).
    pub report: Vec<u8>,
}

/// A process accepting connections on the host: a TCP socket in LISTEN or an unconnected UDP
/// socket.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ListeningService {
    /// IP protocol number (6 TCP, 17 UDP).
    pub protocol: u8,
    /// The local address it is bound to (unspecified: every address).
    pub address: std::net::IpAddr,
    pub port: u16,
    /// The owner's `comm`, pid and user name (uid when it has no name); empty and 0 when the
    /// owner could not be found (a socket of a process in another PID namespace).
    pub process: String,
    pub pid: u32,
    pub user: String,
}

/// Every listening service of the host, sent when it changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicesReport {
    pub services: Vec<ListeningService>,
    /// Services left out because the VEN sends at most [`MAX_SERVICES_PER_REPORT`].
    pub omitted: u32,
}

/// Most services one [`ServicesReport`] carries.
pub const MAX_SERVICES_PER_REPORT: usize = 256;

/// Sent when the agent stops, so that the PCE marks the workload offline at once; unless the
/// reason is [`GOODBYE_RESTART`]: then the agent is coming back, and the PCE keeps the workload in
/// its peers' policies for a grace period.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goodbye {
    pub reason: String,
}

/// The [`Goodbye`] reason of an agent that stops to start again (`ven restart`, an upgrade). An
/// older PCE takes it as any goodbye.
pub const GOODBYE_RESTART: &str = "restart";

/// The whole policy of one host, computed by the PCE.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Increases whenever anything in the policy changes; never 0.
    pub version: u64,
    pub state: PolicyState,
    /// Address lists that rules refer to by id; the VEN programs each as one ipset.
    pub ip_sets: Vec<IpSet>,
    pub rules: Vec<Rule>,
    /// The operator's own iptables rules for this host, kept in chains of their own.
    pub custom_rules: Vec<CustomRule>,
}

/// Address family a custom rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RuleFamily {
    V4,
    V6,
    Both,
}

/// Which traffic a custom rule sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CustomChain {
    /// Traffic to this host.
    Input,
    /// Traffic from this host.
    Output,
    /// Traffic the host routes (only programmed on boards that route).
    Forward,
}

impl CustomChain {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Input => "input",
            Self::Output => "output",
            Self::Forward => "forward",
        }
    }
}

impl std::str::FromStr for CustomChain {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "input" => Ok(Self::Input),
            "output" => Ok(Self::Output),
            "forward" => Ok(Self::Forward),
            _ => Err(format!("unknown chain {s:?} (expected input, output or forward)")),
        }
    }
}

/// One custom iptables rule: matches and a target as `iptables -A` takes them after the chain
/// name, for example `-p tcp --dport 9000 -j ACCEPT`. The VEN accepts only plain matches and the
/// targets ACCEPT, DROP, REJECT and RETURN; the kernel checks the rest when it is applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomRule {
    /// Unique among the policy's custom rules.
    pub id: u32,
    pub family: RuleFamily,
    pub chain: CustomChain,
    pub rule: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpSet {
    /// Unique within the policy.
    pub id: u32,
    pub members: Vec<IpNet>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Direction {
    /// Connections the host accepts (the host is the provider).
    Inbound,
    /// Connections the host opens (the host is the consumer).
    Outbound,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    Any,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
            Self::Any => "any",
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" | "6" => Ok(Self::Tcp),
            "udp" | "17" => Ok(Self::Udp),
            "icmp" | "1" => Ok(Self::Icmp),
            "any" => Ok(Self::Any),
            _ => Err(format!("unknown protocol {s:?} (expected tcp, udp, icmp or any)")),
        }
    }
}

/// Who is on the other end of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Peers {
    Any,
    /// The members of the [`IpSet`] with this id.
    Set(u32),
}

/// An inclusive range of ports; a single port has `first == last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// One allow rule. Anything no rule allows is dropped in the enforced state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Unique within the policy; carried into log prefixes and flow records.
    pub id: u32,
    pub direction: Direction,
    pub peers: Peers,
    pub protocol: Protocol,
    /// Destination ports (TCP and UDP only); `None` means all ports.
    pub ports: Option<PortRange>,
}

/// What the firewall did with the traffic of a flow (the verdict of the log rule that saw it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FlowVerdict {
    /// Allowed by a policy rule.
    Allowed,
    /// No rule allows it; passed because the state is build.
    Observed,
    /// No rule allows it; passed because the state is test, enforcement would drop it.
    WouldDrop,
    /// Dropped by enforcement.
    Dropped,
}

impl FlowVerdict {
    pub const ALL: [FlowVerdict; 4] = [Self::Allowed, Self::Observed, Self::WouldDrop, Self::Dropped];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Observed => "observed",
            Self::WouldDrop => "would-drop",
            Self::Dropped => "dropped",
        }
    }

    /// Whether the flow belongs in the spec's drop views: dropped, or not allowed by any rule.
    pub fn is_unallowed(self) -> bool {
        self != Self::Allowed
    }
}

impl std::str::FromStr for FlowVerdict {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|verdict| verdict.as_str() == text)
            .ok_or_else(|| format!("{text:?} is not a verdict (allowed, observed, would-drop, dropped)"))
    }
}

/// One flow summary: the traffic of one (source, destination, protocol, destination port,
/// verdict) seen during one flush interval of the VEN.
///
/// `count` is connections: a packet whose 5-tuple (ICMP: type, code, echo id) the VEN saw within
/// the protocol's unreplied timeout counts a packet, not a connection. `packets` and `bytes`
/// are what the log rules saw (every packet of dropped traffic, the first packets of accepted
/// connections), or conntrack's accounting of accepted connections when the host enables it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FlowRecord {
    /// Unspecified (0.0.0.0) in an overflow record.
    pub src: std::net::IpAddr,
    pub dst: std::net::IpAddr,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, ...).
    pub protocol: u8,
    /// Destination port for TCP and UDP, ICMP type for ICMP and ICMPv6, else 0.
    pub port: u16,
    pub verdict: FlowVerdict,
    /// Policy rule that allowed it (0: none).
    pub rule: u32,
    /// Connections, scaled when sampled.
    pub count: u32,
    /// Unix seconds of the first and last packet seen.
    pub first_seen: u32,
    pub last_seen: u32,
    /// 1 when every event was counted; N when 1 in N was counted and scaled (sampling mode).
    pub sampling_scale: u16,
    /// The VEN's table of flows was full: this record folds every flow it could not track,
    /// with this verdict, into one (addresses unspecified, port and protocol 0).
    pub overflow: bool,
    /// Packets, scaled when sampled (at least `count` for records of this version; a record
    /// of protocol version 3 reads with `packets = count`).
    pub packets: u64,
    /// Bytes of those packets (IP length), `None` when unknown: accepted traffic without
    /// conntrack accounting, and records of protocol version 3.
    pub bytes: Option<u64>,
}

/// [`FlowRecord`] as protocol version 3 and the stores written by it encode it: no packets or
/// bytes, `count` being connections or dropped packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FlowRecordV3 {
    pub src: std::net::IpAddr,
    pub dst: std::net::IpAddr,
    pub protocol: u8,
    pub port: u16,
    pub verdict: FlowVerdict,
    pub rule: u32,
    pub count: u32,
    pub first_seen: u32,
    pub last_seen: u32,
    pub sampling_scale: u16,
    pub overflow: bool,
}

impl From<FlowRecordV3> for FlowRecord {
    fn from(old: FlowRecordV3) -> Self {
        let FlowRecordV3 {
            src,
            dst,
            protocol,
            port,
            verdict,
            rule,
            count,
            first_seen,
            last_seen,
            sampling_scale,
            overflow,
        } = old;
        Self {
            src,
            dst,
            protocol,
            port,
            verdict,
            rule,
            count,
            first_seen,
            last_seen,
            sampling_scale,
            overflow,
            packets: u64::from(count),
            bytes: None,
        }
    }
}

impl From<FlowRecord> for FlowRecordV3 {
    fn from(record: FlowRecord) -> Self {
        let FlowRecord {
            src,
            dst,
            protocol,
            port,
            verdict,
            rule,
            count,
            first_seen,
            last_seen,
            sampling_scale,
            overflow,
            ..
        } = record;
        Self {
            src,
            dst,
            protocol,
            port,
            verdict,
            rule,
            count,
            first_seen,
            last_seen,
            sampling_scale,
            overflow,
        }
    }
}

/// Stored flow records (the VEN's flow stores, the PCE's flow log) are tagged so that records of
/// older versions stay readable: a stored record of this version is [`FLOW_ROW_TAG`] followed by
/// its postcard encoding; one of version 3 is the bare postcard [`FlowRecordV3`], whose first
/// byte (the source address's variant, 0 or 1) is never the tag.
pub mod flow_row {
    use super::{DecodeError, FlowRecord, FlowRecordV3};

    /// First byte of a stored record carrying packets and bytes.
    pub const FLOW_ROW_TAG: u8 = 0x02;
    /// Largest stored record: the tag, two IPv6 addresses (17 bytes each) and every varint at
    /// its widest (tested).
    pub const MAX_ROW_BYTES: usize = 85;

    /// Encodes `record` as a stored row into `buffer` (empty only if it did not fit, which
    /// [`MAX_ROW_BYTES`] rules out).
    pub fn encode<'b>(record: &FlowRecord, buffer: &'b mut [u8; MAX_ROW_BYTES]) -> &'b [u8] {
        let (tag, rest) = buffer.split_at_mut(1);
        tag[0] = FLOW_ROW_TAG;
        match postcard::to_slice(record, rest) {
            Ok(body) => {
                let len = body.len() + 1;
                &buffer[..len]
            }
            Err(_) => &[],
        }
    }

    /// Encodes `record` as a stored row at the end of `out`.
    pub fn encode_into(record: &FlowRecord, out: &mut Vec<u8>) {
        let mut buffer = [0; MAX_ROW_BYTES];
        out.extend_from_slice(encode(record, &mut buffer));
    }

    /// Decodes the stored row at the start of `bytes` (this version's or version 3's) and
    /// returns it with the bytes after it. Never panics.
    pub fn take(bytes: &[u8]) -> Result<(FlowRecord, &[u8]), DecodeError> {
        match bytes.split_first() {
            Some((&FLOW_ROW_TAG, rest)) => postcard::take_from_bytes::<FlowRecord>(rest).map_err(DecodeError),
            _ => postcard::take_from_bytes::<FlowRecordV3>(bytes)
                .map(|(old, rest)| (FlowRecord::from(old), rest))
                .map_err(DecodeError),
        }
    }
}

/// Most records in one [`FlowBatch`] (about 45 bytes each on the wire).
pub const MAX_FLOWS_PER_BATCH: usize = 20_000;

/// A run of the VEN's flow records, numbered by the VEN: `records[i]` has sequence number
/// `first + i`. Sequence numbers only grow, so a batch sent twice is stored once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowBatch {
    pub first: u64,
    pub records: Vec<FlowRecord>,
}

/// [`FlowBatch`] as a VEN of protocol version 3 uploads it; the PCE reads it with
/// `packets = count` and bytes unknown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowBatchV3 {
    pub first: u64,
    pub records: Vec<FlowRecordV3>,
}

impl From<FlowBatchV3> for FlowBatch {
    fn from(old: FlowBatchV3) -> Self {
        Self { first: old.first, records: old.records.into_iter().map(FlowRecord::from).collect() }
    }
}

/// The PCE stored every record up to and including sequence number `through`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowAck {
    pub through: u64,
}

/// Error body of every non-2xx VEN API answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The activation code is unknown, expired or used up.
    BadActivationCode,
    /// The agent credentials are unknown or wrong (the VEN is a lost agent).
    Unauthorized,
    ProtocolMismatch,
    BadRequest,
    Internal,
    /// Another live copy of this agent holds the workload (a copied data directory): the PCE
    /// ignores this one, which must re-pair. Appended: only a VEN that sends an instance id gets it.
    SuspectedClone,
}

/// Encodes a message for the wire.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Serialising these types into a Vec cannot fail: no maps with fallible keys, no I/O.
    postcard::to_allocvec(message).unwrap_or_default()
}

/// Decodes a message from untrusted bytes.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, DecodeError> {
    postcard::from_bytes(bytes).map_err(DecodeError)
}

#[derive(Debug, thiserror::Error)]
#[error("malformed message: {0}")]
pub struct DecodeError(postcard::Error);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_round_trips_and_rejects_garbage() {
        let header = bearer(42, "abc");
        assert_eq!(parse_bearer(&header), Some((42, "abc")));
        assert_eq!(parse_bearer("Bearer 42"), None);
        assert_eq!(parse_bearer("Basic 42.abc"), None);
        assert_eq!(parse_bearer("Bearer x.abc"), None);
    }

    #[test]
    fn policy_round_trips_through_postcard() {
        let policy = Policy {
            version: 7,
            state: PolicyState::Enforced,
            ip_sets: vec![IpSet { id: 1, members: vec!["198.18.0.2/32".parse().unwrap()] }],
            rules: vec![Rule {
                id: 3,
                direction: Direction::Inbound,
                peers: Peers::Set(1),
                protocol: Protocol::Tcp,
                ports: Some(PortRange { first: 5432, last: 5432 }),
            }],
            custom_rules: vec![CustomRule {
                id: 1,
                family: RuleFamily::Both,
                chain: CustomChain::Input,
                rule: "-p tcp --dport 9000 -j ACCEPT".into(),
            }],
        };
        let bytes = encode(&policy);
        assert_eq!(decode::<Policy>(&bytes).unwrap(), policy);
        assert!(decode::<Policy>(&bytes[..bytes.len() - 1]).is_err());
    }

    fn record(src: &str, dst: &str) -> FlowRecord {
        FlowRecord {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol: 6,
            port: 5432,
            verdict: FlowVerdict::Dropped,
            rule: 0,
            count: 1,
            first_seen: 1_700_000_000,
            last_seen: 1_700_000_004,
            sampling_scale: 1,
            overflow: false,
            packets: 4,
            bytes: Some(240),
        }
    }

    #[test]
    fn flow_rows_of_both_versions_decode() {
        let new = record("198.18.0.2", "198.18.0.3");
        let old = FlowRecordV3::from(record("2001:2::2", "2001:2::3"));
        let mut bytes = Vec::new();
        flow_row::encode_into(&new, &mut bytes);
        assert_eq!(bytes[0], flow_row::FLOW_ROW_TAG);
        bytes.extend_from_slice(&encode(&old));
        let (first, rest) = flow_row::take(&bytes).unwrap();
        assert_eq!(first, new);
        let (second, rest) = flow_row::take(rest).unwrap();
        assert!(rest.is_empty());
        assert_eq!((second.count, second.packets, second.bytes), (1, 1, None), "old rows: packets = count");
        assert_eq!(FlowRecordV3::from(second), old);
        assert!(flow_row::take(&[flow_row::FLOW_ROW_TAG]).is_err());
        assert!(flow_row::take(&[7, 1, 2]).is_err());
        assert!(flow_row::take(&[]).is_err());
    }

    #[test]
    fn the_widest_flow_row_fits_its_buffer() {
        let widest = FlowRecord {
            src: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap(),
            dst: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap(),
            protocol: u8::MAX,
            port: u16::MAX,
            verdict: FlowVerdict::Dropped,
            rule: u32::MAX,
            count: u32::MAX,
            first_seen: u32::MAX,
            last_seen: u32::MAX,
            sampling_scale: u16::MAX,
            overflow: true,
            packets: u64::MAX,
            bytes: Some(u64::MAX),
        };
        let mut buffer = [0; flow_row::MAX_ROW_BYTES];
        let row = flow_row::encode(&widest, &mut buffer);
        assert_eq!(row.len(), flow_row::MAX_ROW_BYTES);
        assert_eq!(flow_row::take(row).unwrap().0, widest);
    }

    #[test]
    fn a_version_3_batch_reads_as_this_version() {
        let old =
            FlowBatchV3 { first: 7, records: vec![FlowRecordV3::from(record("198.18.0.2", "198.18.0.3"))] };
        let batch = FlowBatch::from(decode::<FlowBatchV3>(&encode(&old)).unwrap());
        assert_eq!((batch.first, batch.records[0].packets, batch.records[0].bytes), (7, 1, None));
        assert!(protocol_supported(3) && protocol_supported(PROTOCOL_VERSION));
        assert!(!protocol_supported(2) && !protocol_supported(PROTOCOL_VERSION + 1));
    }

    #[test]
    fn older_vens_get_the_heartbeat_answer_they_decode() {
        let answer = HeartbeatResponse {
            policy_version: 9,
            heartbeat_interval_s: 300,
            support_report_request: Some(4),
            upgrade: Some("1.2.0".into()),
        };
        let v5 = decode::<HeartbeatResponseV5>(&encode(&HeartbeatResponseV5::from(answer.clone()))).unwrap();
        assert_eq!(v5.support_report_request, Some(4));
        let old = decode::<HeartbeatResponseV4>(&encode(&HeartbeatResponseV4::from(answer.clone()))).unwrap();
        assert_eq!((old.policy_version, old.heartbeat_interval_s), (9, 300));
        assert_eq!(decode::<HeartbeatResponse>(&encode(&answer)).unwrap(), answer);
        assert!(protocol_supported(4) && SUPPORT_REPORT_PROTOCOL_VERSION <= PROTOCOL_VERSION);
        let upload = SupportReportUpload { request: 4, report: vec![0, 1, 255] };
        let bytes = encode(&upload);
        assert_eq!(bytes.len(), 1 + 1 + 3, "a length and the bytes as they are");
        assert_eq!(decode::<SupportReportUpload>(&bytes).unwrap(), upload);
        assert!(decode::<SupportReportUpload>(&bytes[..bytes.len() - 1]).is_err(), "a truncated upload");
    }

    #[test]
    fn a_pce_reads_the_heartbeat_of_a_ven_before_protocol_6() {
        let old = HeartbeatRequestV5 {
            applied_policy_version: 3,
            applied_state: PolicyState::Test,
            apply_error: None,
            host: None,
            events: vec![AgentEvent {
                at: 1,
                kind: AgentEventKind::Tampering { summary: "x".into(), repaired: true },
            }],
        };
        let read = HeartbeatRequest::from(decode::<HeartbeatRequestV5>(&encode(&old)).unwrap());
        assert_eq!((read.applied_policy_version, read.host_uptime_s, read.target), (3, None, None));
        assert_eq!(read.events, old.events);
        // The new shape does not decode as the old (the header's version tells them apart).
        let new = HeartbeatRequest { host_uptime_s: Some(86_400), target: Some("a-b".into()), ..read };
        assert_eq!(decode::<HeartbeatRequest>(&encode(&new)).unwrap(), new);
    }

    #[test]
    fn policy_state_parses_its_own_names_only() {
        for state in PolicyState::ALL {
            assert_eq!(state.as_str().parse::<PolicyState>(), Ok(state));
        }
        assert!("enforcing".parse::<PolicyState>().is_err());
    }
}
