//! Parsers for what the lab reads back from the real binaries: `pce serve`'s start-up lines,
//! `ven status --json`, `ven history --json`, `pce workload list --json` and `pce events --json`
//! (shapes in the shared command-line contract and the binaries' renderers).
//!
//! Parsing is lenient about fields the lab does not need and strict about the ones it decides on:
//! a missing or mistyped `policy_state` is an error, not a silent "not yet".

use serde_json::Value;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("{what} is not valid JSON: {cause}; got: {text}")]
    Json { what: &'static str, cause: String, text: String },
    #[error("{what}: field `{field}` is missing or not {expected}; got: {text}")]
    Field { what: &'static str, field: &'static str, expected: &'static str, text: String },
}

/// The lines `pce serve` prints on stdout (first start: pairing material; every start: listening).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PceStartup {
    pub activation_code: Option<String>,
    pub ca_fingerprint: Option<String>,
    /// The text after `listening: `, e.g. `api 198.18.0.1:8443 events 198.18.0.1:8444`.
    pub listening: Option<String>,
}

impl PceStartup {
    /// Reads whatever complete lines `text` holds; a trailing partial line is ignored.
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        let complete = match text.rfind('\n') {
            Some(end) => &text[..end],
            None => "",
        };
        for line in complete.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("activation code:") {
                out.activation_code = Some(rest.trim().to_string());
            } else if let Some(rest) = line.strip_prefix("CA fingerprint (SHA-256):") {
                out.ca_fingerprint = Some(rest.trim().to_string());
            } else if let Some(rest) = line.strip_prefix("listening:") {
                out.listening = Some(rest.trim().to_string());
            }
        }
        out
    }
}

/// Whether `text` is a SHA-256 fingerprint as the contract prints it (64 lowercase hex digits).
pub fn is_fingerprint(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `ven status --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VenStatus {
    pub activated: bool,
    pub agent_id: Option<u64>,
    pub hostname: Option<String>,
    pub agent_running: Option<bool>,
    pub connectivity: Option<String>,
    /// What the firewall carries now; `None` before any policy was applied.
    pub policy_state: Option<String>,
    pub policy_version: Option<u64>,
    pub last_apply_error: Option<String>,
    /// Tampering found (and repaired or not) since activation; `None` from agents that predate it.
    pub tamper_count: Option<u64>,
    /// What the last tampering was (`last_tamper.what`).
    pub last_tamper: Option<String>,
    /// The running agent's flow pipeline: (reading its NFLOG group, packets logged, packets lost).
    pub flows: Option<(bool, u64, u64)>,
    /// Flow records the running agent stored (`flows.records_stored`).
    pub flow_records_stored: Option<u64>,
    /// Flow records the running agent uploaded to the PCE (`flow_uploads.records`), and why the
    /// last upload failed (`flow_uploads.last_error`).
    pub flow_records_uploaded: Option<u64>,
    pub flow_upload_error: Option<String>,
    /// The running agent's supervised threads: (name, state, restarts); empty from older agents.
    pub workers: Vec<(String, String, u64)>,
}

impl VenStatus {
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        const WHAT: &str = "`ven status --json`";
        let value = parse_json(WHAT, text)?;
        if !value.is_object() {
            return Err(field_error(WHAT, "(top level)", "an object", text));
        }
        Ok(Self {
            activated: value
                .get("activated")
                .and_then(Value::as_bool)
                .ok_or_else(|| field_error(WHAT, "activated", "a boolean", text))?,
            agent_id: opt_u64(WHAT, &value, "agent_id", text)?,
            hostname: opt_str(WHAT, &value, "hostname", text)?,
            agent_running: opt_bool(WHAT, &value, "agent_running", text)?,
            connectivity: opt_str(WHAT, &value, "connectivity", text)?,
            policy_state: opt_str(WHAT, &value, "policy_state", text)?,
            policy_version: opt_u64(WHAT, &value, "policy_version", text)?,
            last_apply_error: opt_str(WHAT, &value, "last_apply_error", text)?,
            tamper_count: opt_u64(WHAT, &value, "tamper_count", text)?,
            last_tamper: match value.get("last_tamper") {
                None | Some(Value::Null) => None,
                Some(tamper) => Some(
                    tamper
                        .get("what")
                        .and_then(Value::as_str)
                        .ok_or_else(|| field_error(WHAT, "last_tamper", "{at, what} or null", text))?
                        .to_string(),
                ),
            },
            workers: value
                .get("workers")
                .and_then(Value::as_array)
                .map(|list| {
                    list.iter()
                        .map(|c| {
                            let text = |key: &str| {
                                c.get(key).and_then(Value::as_str).unwrap_or_default().to_string()
                            };
                            (
                                text("name"),
                                text("state"),
                                c.get("restarts").and_then(Value::as_u64).unwrap_or(0),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
            flow_records_stored: value.pointer("/flows/records_stored").and_then(Value::as_u64),
            flow_records_uploaded: value.pointer("/flow_uploads/records").and_then(Value::as_u64),
            flow_upload_error: value
                .pointer("/flow_uploads/last_error")
                .and_then(Value::as_str)
                .map(String::from),
            flows: match value.get("flows") {
                None | Some(Value::Null) => None,
                Some(flows) => {
                    let reading = flows.get("reading").and_then(Value::as_bool);
                    let events = flows.get("events").and_then(Value::as_u64);
                    let lost = flows.get("lost").and_then(Value::as_u64);
                    match (reading, events, lost) {
                        (Some(reading), Some(events), Some(lost)) => Some((reading, events, lost)),
                        _ => {
                            return Err(field_error(
                                WHAT,
                                "flows",
                                "{reading, events, lost, skipped} or null",
                                text,
                            ));
                        }
                    }
                }
            },
        })
    }
}

/// One element of `pce workload list --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub id: u64,
    pub hostname: String,
    /// (key, value) pairs.
    pub labels: Vec<(String, String)>,
    /// The state the PCE wants the workload in.
    pub policy_state: String,
    pub online: bool,
    pub policy_version: Option<u64>,
    pub applied_policy_version: Option<u64>,
    pub applied_state: Option<String>,
    pub apply_error: Option<String>,
    /// `online`, `offline` or `suspended` (the PCE's view of the agent).
    pub agent_status: Option<String>,
    pub suspended: Option<bool>,
    /// The addresses the PCE holds for the workload (its interfaces').
    pub addresses: Vec<String>,
}

impl Workload {
    pub fn parse_list(text: &str) -> Result<Vec<Self>, ParseError> {
        const WHAT: &str = "`pce workload list --json`";
        let value = parse_json(WHAT, text)?;
        let items = value.as_array().ok_or_else(|| field_error(WHAT, "(top level)", "an array", text))?;
        items.iter().map(|item| Self::from_value(WHAT, item, text)).collect()
    }

    fn from_value(what: &'static str, item: &Value, text: &str) -> Result<Self, ParseError> {
        let labels = match item.get("labels") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(labels)) => labels
                .iter()
                .map(|label| {
                    let key = label.get("key").and_then(Value::as_str);
                    let value = label.get("value").and_then(Value::as_str);
                    match (key, value) {
                        (Some(k), Some(v)) => Ok((k.to_string(), v.to_string())),
                        _ => Err(field_error(what, "labels", "a list of {key, value}", text)),
                    }
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(field_error(what, "labels", "an array", text)),
        };
        Ok(Self {
            id: item
                .get("id")
                .and_then(Value::as_u64)
                .ok_or_else(|| field_error(what, "id", "an integer", text))?,
            hostname: item
                .get("hostname")
                .and_then(Value::as_str)
                .ok_or_else(|| field_error(what, "hostname", "a string", text))?
                .to_string(),
            labels,
            policy_state: item
                .get("policy_state")
                .and_then(Value::as_str)
                .ok_or_else(|| field_error(what, "policy_state", "a string", text))?
                .to_string(),
            online: item
                .get("online")
                .and_then(Value::as_bool)
                .ok_or_else(|| field_error(what, "online", "a boolean", text))?,
            policy_version: opt_u64(what, item, "policy_version", text)?,
            applied_policy_version: opt_u64(what, item, "applied_policy_version", text)?,
            applied_state: opt_str(what, item, "applied_state", text)?,
            apply_error: opt_str(what, item, "apply_error", text)?,
            agent_status: opt_str(what, item, "agent_status", text)?,
            suspended: opt_bool(what, item, "suspended", text)?,
            addresses: match item.get("interfaces") {
                Some(Value::Array(interfaces)) => interfaces
                    .iter()
                    .filter_map(|i| i.get("address").and_then(Value::as_str).map(str::to_string))
                    .collect(),
                _ => Vec::new(),
            },
        })
    }

    /// The value of label `key`, if the workload carries one.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// One element of `pce events --json` (an organisation event).
#[derive(Debug, Clone, PartialEq)]
pub struct OrgEvent {
    pub id: u64,
    /// e.g. `tampering`, `server_suspended`, `server_unsuspended`.
    pub event_type: String,
    /// The workload's hostname, when the event concerns one.
    pub hostname: Option<String>,
    pub message: String,
    /// Machine-readable particulars (a JSON object, kept as is).
    pub details: Value,
}

impl OrgEvent {
    pub fn parse_list(text: &str) -> Result<Vec<Self>, ParseError> {
        const WHAT: &str = "`pce events --json`";
        let value = parse_json(WHAT, text)?;
        let items = value.as_array().ok_or_else(|| field_error(WHAT, "(top level)", "an array", text))?;
        items
            .iter()
            .map(|item| {
                let hostname = match item.get("workload") {
                    None | Some(Value::Null) => None,
                    Some(workload) => opt_str(WHAT, workload, "hostname", text)?,
                };
                Ok(Self {
                    id: item
                        .get("id")
                        .and_then(Value::as_u64)
                        .ok_or_else(|| field_error(WHAT, "id", "an integer", text))?,
                    event_type: item
                        .get("event_type")
                        .and_then(Value::as_str)
                        .ok_or_else(|| field_error(WHAT, "event_type", "a string", text))?
                        .to_string(),
                    hostname,
                    message: opt_str(WHAT, item, "message", text)?.unwrap_or_default(),
                    details: item.get("details").cloned().unwrap_or(Value::Null),
                })
            })
            .collect()
    }
}

/// One element of `pce support-report list --json` (a support report the PCE received).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupportReport {
    pub id: u64,
    pub request_id: u64,
    /// The workload's hostname when the report arrived.
    pub hostname: String,
    pub size_bytes: u64,
}

impl SupportReport {
    pub fn parse_list(text: &str) -> Result<Vec<Self>, ParseError> {
        const WHAT: &str = "`pce support-report list --json`";
        let value = parse_json(WHAT, text)?;
        let items = value.as_array().ok_or_else(|| field_error(WHAT, "(top level)", "an array", text))?;
        let number = |item: &Value, field: &'static str| {
            item.get(field)
                .and_then(Value::as_u64)
                .ok_or_else(|| field_error(WHAT, field, "an integer", text))
        };
        items
            .iter()
            .map(|item| {
                let workload = item.get("workload").cloned().unwrap_or(Value::Null);
                Ok(Self {
                    id: number(item, "id")?,
                    request_id: number(item, "request_id")?,
                    hostname: opt_str(WHAT, &workload, "hostname", text)?.unwrap_or_default(),
                    size_bytes: number(item, "size_bytes")?,
                })
            })
            .collect()
    }
}

/// One element of `ven history --json` (a recorded firewall change, or a file it cannot read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryItem {
    pub seq: u64,
    /// `policy_update`, `boot_restore`, `tamper_repair`, `suspend`, `unsuspend`, `deactivate`;
    /// `None` for an unreadable entry.
    pub reason: Option<String>,
    pub policy_version: Option<u64>,
    pub state: Option<String>,
    pub summary: Option<String>,
    /// Why the entry could not be read (`error`), for an unreadable one.
    pub error: Option<String>,
}

impl HistoryItem {
    pub fn parse_list(text: &str) -> Result<Vec<Self>, ParseError> {
        const WHAT: &str = "`ven history --json`";
        let value = parse_json(WHAT, text)?;
        let items = value.as_array().ok_or_else(|| field_error(WHAT, "(top level)", "an array", text))?;
        items
            .iter()
            .map(|item| {
                Ok(Self {
                    seq: item
                        .get("seq")
                        .and_then(Value::as_u64)
                        .ok_or_else(|| field_error(WHAT, "seq", "an integer", text))?,
                    reason: opt_str(WHAT, item, "reason", text)?,
                    policy_version: opt_u64(WHAT, item, "policy_version", text)?,
                    state: opt_str(WHAT, item, "state", text)?,
                    summary: opt_str(WHAT, item, "summary", text)?,
                    error: opt_str(WHAT, item, "error", text)?,
                })
            })
            .collect()
    }
}

fn parse_json(what: &'static str, text: &str) -> Result<Value, ParseError> {
    serde_json::from_str(text.trim()).map_err(|e| ParseError::Json {
        what,
        cause: e.to_string(),
        text: shorten(text),
    })
}

fn field_error(what: &'static str, field: &'static str, expected: &'static str, text: &str) -> ParseError {
    ParseError::Field { what, field, expected, text: shorten(text) }
}

/// Absent or null is `None`; present with another type is an error.
fn opt_u64(
    what: &'static str,
    v: &Value,
    field: &'static str,
    text: &str,
) -> Result<Option<u64>, ParseError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_u64().map(Some).ok_or_else(|| field_error(what, field, "an integer or null", text)),
    }
}

fn opt_str(
    what: &'static str,
    v: &Value,
    field: &'static str,
    text: &str,
) -> Result<Option<String>, ParseError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(field_error(what, field, "a string or null", text)),
    }
}

fn opt_bool(
    what: &'static str,
    v: &Value,
    field: &'static str,
    text: &str,
) -> Result<Option<bool>, ParseError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_bool().map(Some).ok_or_else(|| field_error(what, field, "a boolean or null", text)),
    }
}

/// Error messages quote at most this many characters of what a binary printed.
const MAX_QUOTE: usize = 600;

fn shorten(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(MAX_QUOTE) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "3f1c9a0e6b2d4f8a1c3e5b7d9f0a2c4e6b8d0f1a3c5e7b9d1f3a5c7e9b0d2f4a";

    #[test]
    fn first_start_lines_are_read() {
        let out = format!(
            "activation code: 1a2b3c4d5e\nCA fingerprint (SHA-256): {FP}\nadmin API key: k3y\n\
             listening: api 198.18.0.1:8443 events 198.18.0.1:8444\n"
        );
        let s = PceStartup::parse(&out);
        assert_eq!(s.activation_code.as_deref(), Some("1a2b3c4d5e"));
        assert_eq!(s.ca_fingerprint.as_deref(), Some(FP));
        assert_eq!(s.listening.as_deref(), Some("api 198.18.0.1:8443 events 198.18.0.1:8444"));
        assert!(is_fingerprint(s.ca_fingerprint.as_deref().unwrap()));
    }

    #[test]
    fn a_partial_last_line_is_not_taken() {
        let s = PceStartup::parse("activation code: abc\nlistening: api 198.18.0.1:84");
        assert_eq!(s.activation_code.as_deref(), Some("abc"));
        assert_eq!(s.listening, None);
        // A restart prints no pairing material.
        let s = PceStartup::parse("listening: api 0.0.0.0:8443 events 0.0.0.0:8444\n");
        assert_eq!(s.activation_code, None);
        assert!(s.listening.is_some());
    }

    #[test]
    fn fingerprints_are_64_lowercase_hex() {
        assert!(is_fingerprint(FP));
        assert!(!is_fingerprint(&FP.to_uppercase()));
        assert!(!is_fingerprint(&FP[1..]));
        assert!(!is_fingerprint(&format!("{}g", &FP[1..])));
    }

    #[test]
    fn ven_status_from_the_contract_example() {
        let text = r#"{"version":"0.1.0","activated":true,"agent_id":1,"hostname":"web",
            "management_server":"198.18.0.1:8443","agent_running":true,
            "connectivity":"online","policy_state":"enforced","policy_version":4,
            "last_heartbeat":"2026-11-27T12:00:00Z","last_apply_error":null}"#;
        let s = VenStatus::parse(text).unwrap();
        assert!(s.activated);
        assert_eq!(s.agent_id, Some(1));
        assert_eq!(s.hostname.as_deref(), Some("web"));
        assert_eq!(s.agent_running, Some(true));
        assert_eq!(s.connectivity.as_deref(), Some("online"));
        assert_eq!(s.policy_state.as_deref(), Some("enforced"));
        assert_eq!(s.policy_version, Some(4));
        assert_eq!(s.last_apply_error, None);
    }

    #[test]
    fn ven_status_before_activation_has_nulls() {
        let text = r#"{"version":"0.1.0","activated":false,"agent_id":null,"hostname":null,
            "management_server":null,"agent_running":false,"connectivity":"unpaired",
            "policy_state":null,"policy_version":null,"last_heartbeat":null,"last_apply_error":null}"#;
        let s = VenStatus::parse(text).unwrap();
        assert!(!s.activated);
        assert_eq!(s.policy_state, None);
        assert_eq!(s.connectivity.as_deref(), Some("unpaired"));
    }

    #[test]
    fn ven_status_rejects_wrong_types_and_garbage() {
        assert!(matches!(VenStatus::parse("not json"), Err(ParseError::Json { .. })));
        assert!(matches!(VenStatus::parse("[]"), Err(ParseError::Field { .. })));
        let err = VenStatus::parse(r#"{"activated":true,"policy_version":"4"}"#).unwrap_err();
        assert!(matches!(err, ParseError::Field { field: "policy_version", .. }), "{err}");
        let err = VenStatus::parse(r#"{"policy_state":"idle"}"#).unwrap_err();
        assert!(matches!(err, ParseError::Field { field: "activated", .. }), "{err}");
    }

    #[test]
    fn workload_list_from_the_contract_example() {
        let text = r#"[{"href":"/orgs/1/workloads/1","id":1,"hostname":"web",
            "labels":[{"href":"/orgs/1/labels/1","key":"role","value":"web"}],
            "policy_state":"enforced","online":true,"last_heartbeat_on":"2026-11-27T12:00:00Z",
            "policy_version":3,"applied_policy_version":3,"applied_state":"enforced",
            "apply_error":null,"interfaces":[{"name":"eth0","address":"198.18.0.2","cidr_block":24}]},
            {"href":"/orgs/1/workloads/2","id":2,"hostname":"db","labels":[],
            "policy_state":"idle","online":false,"last_heartbeat_on":null,
            "policy_version":null,"applied_policy_version":null,"applied_state":null,
            "apply_error":"iptables-restore: line 3 failed","interfaces":[]}]"#;
        let list = Workload::parse_list(text).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].hostname, "web");
        assert_eq!(list[0].label("role"), Some("web"));
        assert_eq!(list[0].policy_version, Some(3));
        assert_eq!(list[0].applied_policy_version, Some(3));
        assert!(list[0].online);
        assert_eq!(list[1].label("role"), None);
        assert_eq!(list[1].policy_version, None);
        assert_eq!(list[1].apply_error.as_deref(), Some("iptables-restore: line 3 failed"));
        assert_eq!(Workload::parse_list("[]\n").unwrap(), Vec::new());
    }

    #[test]
    fn workload_list_rejects_a_missing_hostname_and_an_object() {
        assert!(Workload::parse_list(r#"[{"id":1,"policy_state":"idle","online":true}]"#).is_err());
        assert!(Workload::parse_list(r#"{"id":1}"#).is_err());
    }

    #[test]
    fn long_outputs_are_shortened_in_errors() {
        let junk = "x".repeat(5000);
        let msg = VenStatus::parse(&junk).unwrap_err().to_string();
        assert!(msg.len() < 1000, "{}", msg.len());
    }

    #[test]
    fn events_from_the_admin_api_shape() {
        // `pce events --json` after a suspend, a tampering report and a PCE-wide event.
        let text = r#"[
          {"href":"/orgs/1/events/3","id":3,"timestamp":"2026-11-28T01:18:42Z",
           "event_type":"server_suspended","severity":"warning",
           "workload":{"href":"/orgs/1/workloads/2","id":2,"hostname":"db"},
           "message":"VEN suspended (its firewall was enforced)",
           "details":{"previous_state":"enforced"}},
          {"href":"/orgs/1/events/4","id":4,"timestamp":"2026-11-28T01:18:43Z",
           "event_type":"tampering","severity":"warning",
           "workload":{"href":"/orgs/1/workloads/2","id":2,"hostname":"db"},
           "message":"firewall tampering: v4: ... (repaired)",
           "details":{"summary":"v4: ...","repaired":true,"detected_at":"2026-11-28T01:18:43Z"}},
          {"href":"/orgs/1/events/5","id":5,"timestamp":"2026-11-28T01:18:44Z",
           "event_type":"agent_deactivated","severity":"info","workload":null,
           "message":"m","details":{}}
        ]"#;
        let events = OrgEvent::parse_list(text).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].event_type, "server_suspended");
        assert_eq!(events[0].hostname.as_deref(), Some("db"));
        assert_eq!(events[1].details["repaired"], Value::Bool(true));
        assert_eq!(events[2].hostname, None);
        assert!(OrgEvent::parse_list(r#"[{"id":1}]"#).is_err());
        assert!(OrgEvent::parse_list("{}").is_err());
    }

    #[test]
    fn support_reports_from_the_admin_api_shape() {
        let text = r#"[{"href":"/orgs/1/support_reports/2","id":2,"request_id":3,
            "workload":{"href":"/orgs/1/workloads/1","id":1,"hostname":"web"},
            "received_at":"2026-12-07T13:00:00Z","size_bytes":92160,"sha256":"ab",
            "download":"/orgs/1/support_reports/2/download"}]"#;
        let reports = SupportReport::parse_list(text).unwrap();
        assert_eq!(
            reports,
            vec![SupportReport { id: 2, request_id: 3, hostname: "web".into(), size_bytes: 92160 }]
        );
        assert!(SupportReport::parse_list(r#"[{"id":1}]"#).is_err());
        assert!(SupportReport::parse_list("{}").is_err());
    }

    #[test]
    fn history_from_the_renderer_shape() {
        let text = r#"[{"seq":7,"at":"2026-11-27T12:00:00Z","unix_time":1795780800,
            "reason":"policy_update","policy_version":12,"state":"enforced",
            "summary":"","ruleset_bytes":1234},
            {"seq":8,"error":"checksum mismatch","path":"/var/lib/ven/history/8"},
            {"seq":9,"at":"2026-11-27T12:00:00Z","unix_time":1795780800,"reason":"deactivate",
            "policy_version":null,"state":null,"summary":"deactivated, firewall open","ruleset_bytes":0}]"#;
        let items = HistoryItem::parse_list(text).unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!((items[0].seq, items[0].reason.as_deref()), (7, Some("policy_update")));
        assert_eq!(items[0].policy_version, Some(12));
        assert_eq!(items[1].reason, None);
        assert_eq!(items[1].error.as_deref(), Some("checksum mismatch"));
        assert_eq!(items[2].policy_version, None);
        assert!(HistoryItem::parse_list(r#"[{"reason":"suspend"}]"#).is_err());
    }

    #[test]
    fn tamper_fields_and_agent_status_are_read() {
        let text = r#"{"activated":true,"connectivity":"suspended","tamper_count":3,
            "last_tamper":{"at":"2026-11-28T01:18:43Z","what":"v4: chain VEN-INPUT differs"}}"#;
        let s = VenStatus::parse(text).unwrap();
        assert_eq!(s.tamper_count, Some(3));
        assert_eq!(s.last_tamper.as_deref(), Some("v4: chain VEN-INPUT differs"));
        assert!(VenStatus::parse(r#"{"activated":true,"last_tamper":{"at":1}}"#).is_err());
        let list = Workload::parse_list(
            r#"[{"id":2,"hostname":"db","policy_state":"enforced","online":true,
                "agent_status":"suspended","suspended":true}]"#,
        )
        .unwrap();
        assert_eq!(list[0].agent_status.as_deref(), Some("suspended"));
        assert_eq!(list[0].suspended, Some(true));
    }
}
