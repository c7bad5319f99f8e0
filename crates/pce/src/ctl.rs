//! The admin commands: a small HTTPS/JSON client of the admin API (ureq, TLS 1.3 with the ring
//! provider, trusting only the PCE's CA), and the tables it prints.

use crate::app::ADMIN_KEY_FILE;
use crate::orgevents::EventType;
use crate::policy;
use crate::tls::{self, CA_CERT_FILE, TlsError};
use crate::traffic;
use serde_json::{Value, json};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
use ven_proto::{CustomChain, PolicyState, Protocol, RuleFamily};

const TIMEOUT: Duration = Duration::from_secs(30);

/// `println!` that ends the program quietly when stdout is a closed pipe (`pce traffic | head`);
/// other write errors are reported on stderr, once, before exiting with status 1.
macro_rules! out {
    ($($arg:tt)*) => {
        write_line(format_args!($($arg)*))
    };
}

fn write_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = writeln!(io::stdout().lock(), "{line}") {
        if e.kind() == io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("pce: writing to stdout: {e}");
        std::process::exit(1);
    }
}
/// The administrator's API keys (a global path, outside `/orgs/1/`).
const API_KEYS: &str = "users/1/api_keys";

/// Where the admin API is and how to reach it.
pub struct Target {
    pub data_dir: PathBuf,
    /// HOST:PORT.
    pub server: String,
    /// Default: `DIR/admin.key`.
    pub api_key: Option<String>,
    /// Default: `DIR/ca.pem`.
    pub ca_cert: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelRef {
    pub key: String,
    pub value: String,
}

impl std::fmt::Display for LabelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceSpec {
    pub first: u16,
    pub last: u16,
    pub protocol: Protocol,
}

/// How `pce events` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventFormat {
    Table,
    Json,
    /// One CEF line per event, formatted by the PCE.
    Cef,
    /// One LEEF 2.0 line per event, formatted by the PCE.
    Leef,
}

pub enum Command {
    ActivationCode,
    CaFingerprint,
    ApiKeyCreate {
        name: String,
        description: String,
    },
    ApiKeyList {
        json: bool,
    },
    ApiKeyDelete {
        key_id: String,
    },
    LabelCreate {
        key: String,
        value: String,
    },
    LabelList {
        json: bool,
    },
    WorkloadList {
        json: bool,
    },
    WorkloadSet {
        host: String,
        labels: Vec<LabelRef>,
        state: Option<PolicyState>,
    },
    CustomRuleList {
        host: String,
        json: bool,
    },
    WorkloadServices {
        host: String,
        json: bool,
    },
    CustomRuleAdd {
        host: String,
        chain: CustomChain,
        family: RuleFamily,
        rule: String,
    },
    CustomRuleRemove {
        host: String,
        id: u32,
    },
    RuleAdd {
        consumers: Vec<LabelRef>,
        providers: Vec<LabelRef>,
        services: Vec<ServiceSpec>,
    },
    Provision,
    Events {
        format: EventFormat,
        event_type: Option<EventType>,
        max: Option<usize>,
    },
    Traffic {
        query: traffic::Query,
        json: bool,
    },
    SupportReportRequest {
        host: String,
    },
    SupportReportList {
        json: bool,
    },
    SupportReportGet {
        id: u64,
        output: PathBuf,
    },
    WorkloadShow {
        host: String,
        json: bool,
    },
    /// An upgrade order (`version`), or its cancellation (`None`), for all or for `hosts`.
    Upgrade {
        version: Option<String>,
        all: bool,
        hosts: Vec<String>,
    },
}

/// The admin API path of upgrade orders.
const UPGRADE: &str = "vens/upgrade";

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("reading {path}: {source} (give --data-dir, or --api-key and --ca-cert)")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} holds no PEM certificate")]
    Cert { path: PathBuf },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{method} {url}: {source}")]
    Request { method: &'static str, url: String, source: ureq::Error },
    #[error("{method} {path}: HTTP {status}: {message}")]
    Api { method: &'static str, path: String, status: u16, message: String },
    #[error("{method} {path}: unexpected answer: {reason}")]
    Answer { method: &'static str, path: String, reason: String },
    #[error("{0}")]
    NotFound(String),
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

pub fn run(target: Target, command: Command) -> Result<(), CtlError> {
    if let Command::CaFingerprint = command {
        let path = target.ca_cert.unwrap_or_else(|| target.data_dir.join(CA_CERT_FILE));
        out!("{}", tls::fingerprint_file(&path)?);
        return Ok(());
    }
    let client = Client::new(&target)?;
    match command {
        Command::CaFingerprint => {}
        Command::ActivationCode => {
            let profiles = client.get("pairing_profiles")?;
            let profiles = profiles.as_array().map(Vec::as_slice).unwrap_or_default();
            let default = profiles.iter().find(|p| p["name"] == "default").or(profiles.first());
            let code = default.and_then(|p| p["activation_code"].as_str());
            out!("{}", code.ok_or_else(|| CtlError::NotFound("the PCE has no pairing profile".into()))?);
        }
        Command::ApiKeyCreate { name, description } => {
            let body = json!({ "name": name, "description": description });
            let key = client.send("POST", API_KEYS, &body)?;
            out!("key id:        {}", text(&key["key_id"]));
            out!("auth_username: {}", text(&key["auth_username"]));
            out!("secret:        {}", text(&key["secret"]));
        }
        Command::ApiKeyList { json } => {
            let keys = client.get(API_KEYS)?;
            if json {
                out!("{keys:#}");
            } else {
                let rows = items(&keys)
                    .map(|k| {
                        let cells = ["key_id", "auth_username", "name", "created_at"];
                        cells.iter().map(|field| text(&k[*field])).collect()
                    })
                    .collect();
                print_table(&["KEY ID", "AUTH USERNAME", "NAME", "CREATED"], rows);
            }
        }
        Command::ApiKeyDelete { key_id } => {
            client.send("DELETE", &format!("{API_KEYS}/{key_id}"), &Value::Null)?;
            out!("API key {key_id} deleted");
        }
        Command::LabelCreate { key, value } => {
            let label = client.send("POST", "labels", &json!({ "key": key, "value": value }))?;
            out!("{}", label["href"].as_str().unwrap_or_default());
        }
        Command::LabelList { json } => {
            let labels = client.get("labels")?;
            if json {
                out!("{labels:#}");
            } else {
                let rows = items(&labels)
                    .map(|l| vec![text(&l["href"]), text(&l["key"]), text(&l["value"])])
                    .collect();
                print_table(&["HREF", "KEY", "VALUE"], rows);
            }
        }
        Command::WorkloadList { json } => {
            let workloads = client.get("workloads")?;
            if json {
                out!("{workloads:#}");
            } else {
                print_table(
                    &[
                        "ID",
                        "HOSTNAME",
                        "STATE",
                        "STATUS",
                        "POLICY",
                        "APPLIED",
                        "LABELS",
                        "ADDRESSES",
                        "LAST HEARTBEAT",
                    ],
                    items(&workloads).map(workload_row).collect(),
                );
            }
        }
        Command::WorkloadSet { host, labels, state } => set_workload(&client, &host, &labels, state)?,
        Command::WorkloadServices { host, json } => {
            let workload = find_workload(&client, &host)?;
            let services = &workload["services"];
            if json {
                out!("{services:#}");
            } else {
                let rows = items(&services["open_service_ports"])
                    .map(|s| {
                        let protocol = match s["protocol"].as_u64() {
                            Some(6) => "tcp".to_string(),
                            Some(17) => "udp".to_string(),
                            _ => text(&s["protocol"]),
                        };
                        vec![
                            protocol,
                            text(&s["address"]),
                            text(&s["port"]),
                            text(&s["process_name"]),
                            text(&s["pid"]),
                            text(&s["user"]),
                        ]
                    })
                    .collect();
                print_table(&["PROTO", "ADDRESS", "PORT", "PROCESS", "PID", "USER"], rows);
                if services["omitted"].as_u64().is_some_and(|n| n > 0) {
                    out!(
                        "({} more not reported: the VEN sends at most {})",
                        services["omitted"],
                        ven_proto::MAX_SERVICES_PER_REPORT
                    );
                }
            }
        }
        Command::SupportReportRequest { host } => {
            let workload = find_workload(&client, &host)?;
            let body = json!({ "workload": { "href": workload["href"] } });
            let asked = client.send("POST", "support_report_requests", &body)?;
            out!(
                "support report request {} for {} (delivery: {})",
                text(&asked["id"]),
                text(&workload["hostname"]),
                text(&asked["delivery"])
            );
        }
        Command::WorkloadShow { host, json } => {
            let workload = find_workload(&client, &host)?;
            if json {
                out!("{workload:#}");
            } else {
                show_workload(&client, &workload)?;
            }
        }
        Command::Upgrade { version, all, hosts } => {
            let mut body = serde_json::Map::new();
            match &version {
                Some(version) => body.insert("release".into(), json!(version)),
                None => body.insert("cancel".into(), json!(true)),
            };
            let mut names = Vec::new();
            if all {
                body.insert("all".into(), json!(true));
            } else {
                let mut vens = Vec::new();
                for host in &hosts {
                    let workload = find_workload(&client, host)?;
                    names.push(text(&workload["hostname"]));
                    vens.push(json!({ "href": workload["href"] }));
                }
                body.insert("vens".into(), Value::Array(vens));
            }
            let answer = client.send("PUT", UPGRADE, &Value::Object(body))?;
            let whom = if all { "all workloads".to_string() } else { names.join(", ") };
            match version {
                Some(version) => out!(
                    "upgrade to {version} ordered for {whom}: {} told by lightning bolt, {} at their next heartbeat, {} with a VEN too old to upgrade itself",
                    answer["told_by_bolt"],
                    answer["next_heartbeat"],
                    answer["too_old"]
                ),
                None => out!("upgrade orders cancelled for {whom}"),
            }
        }
        Command::SupportReportList { json } => {
            let reports = client.get("support_reports")?;
            if json {
                out!("{reports:#}");
            } else {
                let rows = items(&reports)
                    .map(|r| {
                        vec![
                            text(&r["id"]),
                            text(&r["workload"]["hostname"]),
                            text(&r["received_at"]),
                            text(&r["size_bytes"]),
                            text(&r["request_id"]),
                        ]
                    })
                    .collect();
                print_table(&["ID", "HOSTNAME", "RECEIVED", "BYTES", "REQUEST"], rows);
            }
        }
        Command::SupportReportGet { id, output } => {
            let bytes = client.get_bytes(&format!("support_reports/{id}/download"))?;
            crate::fsutil::write_atomic(&output, &bytes, 0o600)
                .map_err(|source| CtlError::Write { path: output.clone(), source })?;
            out!("support report {id} written to {} ({} bytes)", output.display(), bytes.len());
        }
        Command::CustomRuleList { host, json } => {
            let workload = find_workload(&client, &host)?;
            let rules = client.get(&format!("workloads/{}/custom_iptables_rules", workload["id"]))?;
            if json {
                out!("{rules:#}");
            } else {
                let rows = items(&rules)
                    .map(|r| vec![text(&r["id"]), text(&r["chain"]), text(&r["family"]), text(&r["rule"])])
                    .collect();
                print_table(&["ID", "CHAIN", "FAMILY", "RULE"], rows);
            }
        }
        Command::CustomRuleAdd { host, chain, family, rule } => {
            let workload = find_workload(&client, &host)?;
            let body =
                json!({ "chain": chain.as_str(), "family": policy::family_name(family), "rule": rule });
            let added =
                client.send("POST", &format!("workloads/{}/custom_iptables_rules", workload["id"]), &body)?;
            out!("{}", added["href"].as_str().unwrap_or_default());
        }
        Command::CustomRuleRemove { host, id } => {
            let workload = find_workload(&client, &host)?;
            let workload_id = &workload["id"];
            client.send(
                "DELETE",
                &format!("workloads/{workload_id}/custom_iptables_rules/{id}"),
                &Value::Null,
            )?;
            out!("removed custom rule {id} from workload {workload_id} ({})", text(&workload["hostname"]));
        }
        Command::Events { format, event_type, max } => {
            let mut query = vec![format!(
                "format={}",
                match format {
                    EventFormat::Cef => "cef",
                    EventFormat::Leef => "leef",
                    EventFormat::Table | EventFormat::Json => "json",
                }
            )];
            query.extend(event_type.map(|t| format!("event_type={}", t.as_str())));
            query.extend(max.map(|max| format!("max_results={max}")));
            let path = format!("events?{}", query.join("&"));
            match format {
                EventFormat::Cef | EventFormat::Leef => {
                    // LEEF separates its attributes with tabs: those stay, fields are made safe.
                    for line in client.get_text(&path)?.lines() {
                        out!("{}", line.split('\t').map(printable).collect::<Vec<_>>().join("\t"));
                    }
                }
                EventFormat::Json => out!("{:#}", client.get(&path)?),
                EventFormat::Table => {
                    let events = client.get(&path)?;
                    let rows = items(&events)
                        .map(|e| {
                            vec![
                                text(&e["id"]),
                                text(&e["timestamp"]),
                                text(&e["event_type"]),
                                text(&e["severity"]),
                                text(&e["workload"]["hostname"]),
                                text(&e["message"]),
                            ]
                        })
                        .collect();
                    print_table(&["ID", "TIMESTAMP", "TYPE", "SEVERITY", "WORKLOAD", "MESSAGE"], rows);
                }
            }
        }
        Command::Traffic { query, json } => {
            let answer = client.get(&format!("traffic_flows?{}", query.to_query_string()))?;
            if json {
                out!("{answer:#}");
            } else {
                print_table(
                    &[
                        "LAST SEEN",
                        "WORKLOAD",
                        "SRC",
                        "DST",
                        "PROTO",
                        "PORT",
                        "VERDICT",
                        "RULE",
                        "COUNT",
                        "PACKETS",
                        "BYTES",
                    ],
                    items(&answer["flows"]).map(flow_row).collect(),
                );
                if answer["more"] == true {
                    out!(
                        "({} of {} matching flows shown, the newest; see --limit)",
                        answer["returned"],
                        answer["total"]
                    );
                }
            }
        }
        Command::RuleAdd { consumers, providers, services } => {
            let labels = client.get("labels")?;
            let actors = |refs: &[LabelRef]| -> Result<Vec<Value>, CtlError> {
                refs.iter().map(|r| Ok(json!({ "label": { "href": find_label(&labels, r)? } }))).collect()
            };
            let services: Vec<Value> = services
                .iter()
                .map(|s| json!({ "port": s.first, "to_port": s.last, "proto": s.protocol.as_str() }))
                .collect();
            let body = json!({ "consumers": actors(&consumers)?, "providers": actors(&providers)?, "ingress_services": services });
            let rule_set = default_rule_set(&client)?;
            let rule = client.send("POST", &format!("{}/sec_rules", api_path(&rule_set)), &body)?;
            out!("{}", rule["href"].as_str().unwrap_or_default());
        }
        Command::Provision => {
            let answer = client.send("POST", "sec_policy", &json!({}))?;
            out!("provisioned version {}", answer["version"]);
        }
    }
    Ok(())
}

/// The href of the draft rule set `pce rule add` adds to (global scope), created when missing.
fn default_rule_set(client: &Client) -> Result<String, CtlError> {
    let name = crate::store::DEFAULT_RULE_SET;
    let sets = client.get("sec_policy/draft/rule_sets")?;
    if let Some(set) = items(&sets).find(|set| set["name"] == name) {
        return Ok(text(&set["href"]));
    }
    let body = json!({ "name": name, "description": "rules added with pce rule add", "scopes": [[]] });
    let created = client.send("POST", "sec_policy/draft/rule_sets", &body)?;
    Ok(text(&created["href"]))
}

/// The admin API path (under `/api/v2/`) of an href (`/orgs/1/...`).
fn api_path(href: &str) -> &str {
    href.trim_start_matches('/')
}

/// `pce workload show`: one field a line.
fn show_workload(client: &Client, w: &Value) -> Result<(), CtlError> {
    let row = workload_row(w);
    let orders = client.get(UPGRADE)?;
    let own = items(&orders["vens"]).find(|o| o["href"] == w["href"]).map(|o| text(&o["release"]));
    let order = match own {
        Some(order) => order,
        None => text(&orders["all"]),
    };
    let uptime = match w["host_uptime_seconds"].as_u64() {
        Some(seconds) => format!("{seconds} s ({})", duration(seconds)),
        None => "-".to_string(),
    };
    let fields = [
        ("id", row[0].clone()),
        ("hostname", row[1].clone()),
        ("os", text(&w["os"])),
        ("agent version", text(&w["agent_version"])),
        ("agent target", text(&w["agent_target"])),
        ("host uptime", uptime),
        ("upgrade order", order),
        ("policy state", row[2].clone()),
        ("status", row[3].clone()),
        ("policy version", row[4].clone()),
        ("applied", row[5].clone()),
        ("labels", row[6].clone()),
        ("addresses", row[7].clone()),
        ("last heartbeat", row[8].clone()),
    ];
    for (name, value) in fields {
        out!("{:<16}{value}", format!("{name}:"));
    }
    Ok(())
}

/// `3d 4h 5m`.
fn duration(seconds: u64) -> String {
    let (days, hours, minutes) = (seconds / 86_400, seconds / 3600 % 24, seconds / 60 % 60);
    match (days, hours) {
        (0, 0) => format!("{minutes}m"),
        (0, _) => format!("{hours}h {minutes}m"),
        _ => format!("{days}d {hours}h {minutes}m"),
    }
}

/// The workload whose id or (unique) hostname is `host`, as the admin API shows it.
fn find_workload(client: &Client, host: &str) -> Result<Value, CtlError> {
    let workloads = client.get("workloads")?;
    let by_id = host.parse::<u64>().ok().and_then(|id| items(&workloads).find(|w| w["id"] == id));
    if let Some(workload) = by_id {
        return Ok(workload.clone());
    }
    let mut named = items(&workloads).filter(|w| w["hostname"] == host);
    match (named.next(), named.next()) {
        (Some(workload), None) => Ok(workload.clone()),
        (None, _) => Err(CtlError::NotFound(format!("no workload with hostname or id {host:?}"))),
        (Some(_), Some(_)) => {
            Err(CtlError::NotFound(format!("several workloads are named {host:?}; give the id")))
        }
    }
}

fn set_workload(
    client: &Client,
    host: &str,
    wanted: &[LabelRef],
    state: Option<PolicyState>,
) -> Result<(), CtlError> {
    let workload = find_workload(client, host)?;
    let mut body = serde_json::Map::new();
    if !wanted.is_empty() {
        let labels = client.get("labels")?;
        // Current labels by key, each then replaced by a wanted label of the same key.
        let mut current: Vec<(String, String)> =
            items(&workload["labels"]).map(|l| (text(&l["key"]), text(&l["href"]))).collect();
        for label in wanted {
            let href = find_label(&labels, label)?;
            current.retain(|(key, _)| *key != label.key);
            current.push((label.key.clone(), href));
        }
        body.insert("labels".into(), current.into_iter().map(|(_, href)| json!({ "href": href })).collect());
    }
    if let Some(state) = state {
        body.insert("policy_state".into(), json!(state.as_str()));
    }
    let id = &workload["id"];
    client.send("PUT", &format!("workloads/{id}"), &Value::Object(body))?;
    out!("updated workload {id} ({})", text(&workload["hostname"]));
    Ok(())
}

fn find_label(labels: &Value, wanted: &LabelRef) -> Result<String, CtlError> {
    items(labels)
        .find(|l| l["key"] == wanted.key.as_str() && l["value"] == wanted.value.as_str())
        .map(|l| text(&l["href"]))
        .ok_or_else(|| {
            CtlError::NotFound(format!(
                "no label {wanted}; create it first with: pce label create {} {}",
                wanted.key, wanted.value
            ))
        })
}

fn workload_row(w: &Value) -> Vec<String> {
    let labels: Vec<String> =
        items(&w["labels"]).map(|l| format!("{}={}", text(&l["key"]), text(&l["value"]))).collect();
    let addresses: Vec<String> =
        items(&w["interfaces"]).map(|i| format!("{}/{}", text(&i["address"]), i["cidr_block"])).collect();
    let applied = match w["applied_state"].as_str() {
        Some(state) => format!("{} {state}", w["applied_policy_version"]),
        None => "-".to_string(),
    };
    let applied = if w["apply_error"].is_string() { format!("{applied} (error)") } else { applied };
    // Allowed, but an operator should know (a clone, a re-imaged host).
    let hostname = if w["duplicate_hostname"] == true {
        format!("{} (duplicate)", text(&w["hostname"]))
    } else {
        text(&w["hostname"])
    };
    vec![
        text(&w["id"]),
        hostname,
        text(&w["policy_state"]),
        text(&w["agent_status"]),
        text(&w["policy_version"]),
        applied,
        labels.join(","),
        addresses.join(","),
        w["last_heartbeat_on"].as_str().unwrap_or("-").to_string(),
    ]
}

fn flow_row(flow: &Value) -> Vec<String> {
    let overflow = flow["overflow"] == true;
    let address = |key: &str| if overflow { "(overflow)".to_string() } else { text(&flow[key]) };
    let scale = flow["sampling_scale"].as_u64().unwrap_or(1);
    let count =
        if scale > 1 { format!("~{} (1:{scale})", text(&flow["count"])) } else { text(&flow["count"]) };
    vec![
        text(&flow["last_seen_on"]),
        text(&flow["workload"]["hostname"]),
        address("src"),
        address("dst"),
        text(&flow["proto_name"]),
        text(&flow["port"]),
        text(&flow["verdict"]),
        text(&flow["rule"]),
        count,
        text(&flow["packets"]),
        text(&flow["bytes"]),
    ]
}

fn items(value: &Value) -> impl Iterator<Item = &Value> {
    value.as_array().into_iter().flatten()
}

/// A JSON scalar as plain text (strings without quotes).
/// A JSON value as a table cell or message: strings shown through [`printable`].
fn text(value: &Value) -> String {
    match value {
        Value::String(s) => printable(s),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

/// `text` safe for a terminal: control characters (escape sequences, newlines that would fake
/// table rows) and bidirectional overrides (U+202E and kin, which reorder what is shown) become
/// `\u{...}`. Anything a VEN reports (hostnames, messages) passes through here.
pub fn printable(text: &str) -> String {
    let hostile = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(hostile) {
        return text.to_string();
    }
    text.chars()
        .map(|c| if hostile(c) { format!("\\u{{{:x}}}", u32::from(c)) } else { c.to_string() })
        .collect()
}

fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> =
            cells.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        out!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

struct Client {
    agent: ureq::Agent,
    base: String,
    authorization: String,
}

impl Client {
    fn new(target: &Target) -> Result<Self, CtlError> {
        let key = match &target.api_key {
            Some(key) => key.clone(),
            None => {
                let path = target.data_dir.join(ADMIN_KEY_FILE);
                std::fs::read_to_string(&path)
                    .map_err(|source| CtlError::Read { path, source })?
                    .trim()
                    .to_string()
            }
        };
        let ca_path = target.ca_cert.clone().unwrap_or_else(|| target.data_dir.join(CA_CERT_FILE));
        let pem =
            std::fs::read(&ca_path).map_err(|source| CtlError::Read { path: ca_path.clone(), source })?;
        let ca = Certificate::from_pem(&pem).map_err(|_| CtlError::Cert { path: ca_path })?;
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(tls::provider())
            .root_certs(RootCerts::Specific(Arc::new(vec![ca])))
            .build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .timeout_global(Some(TIMEOUT))
            .build()
            .new_agent();
        Ok(Client {
            agent,
            base: format!("https://{}/api/v2/", target.server),
            authorization: format!("Bearer {key}"),
        })
    }

    fn get(&self, path: &str) -> Result<Value, CtlError> {
        let url = format!("{}{path}", self.base);
        let answer = self.agent.get(&url).header("authorization", &self.authorization).call();
        self.answer("GET", path, &url, answer)
    }

    /// GET an answer that is not JSON (CEF or LEEF lines).
    fn get_text(&self, path: &str) -> Result<String, CtlError> {
        let url = format!("{}{path}", self.base);
        let answer = self.agent.get(&url).header("authorization", &self.authorization).call();
        self.answer_text("GET", path, &url, answer)
    }

    /// GET an answer that is bytes (a support report's archive), within the largest report.
    fn get_bytes(&self, path: &str) -> Result<Vec<u8>, CtlError> {
        let url = format!("{}{path}", self.base);
        let answer = self.agent.get(&url).header("authorization", &self.authorization).call();
        let request_error = |source| CtlError::Request { method: "GET", url: url.clone(), source };
        let mut response = answer.map_err(request_error)?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            // Errors are small JSON; answer_text reads and words them.
            return Err(self.answer_text("GET", path, &url, Ok(response)).err().unwrap_or(
                CtlError::Answer {
                    method: "GET",
                    path: format!("/api/v2/{path}"),
                    reason: format!("HTTP {status}"),
                },
            ));
        }
        let limit = ven_proto::MAX_SUPPORT_REPORT_BYTES as u64;
        response.body_mut().with_config().limit(limit).read_to_vec().map_err(request_error)
    }

    /// POST or PUT a JSON body, or DELETE; returns the answer's JSON (null when empty).
    fn send(&self, method: &'static str, path: &str, body: &Value) -> Result<Value, CtlError> {
        let url = format!("{}{path}", self.base);
        let answer = if method == "DELETE" {
            self.agent.delete(&url).header("authorization", &self.authorization).call()
        } else {
            let request = if method == "PUT" { self.agent.put(&url) } else { self.agent.post(&url) };
            request
                .header("authorization", &self.authorization)
                .header("content-type", "application/json")
                .send(body.to_string())
        };
        self.answer(method, path, &url, answer)
    }

    fn answer(
        &self,
        method: &'static str,
        path: &str,
        url: &str,
        answer: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value, CtlError> {
        let body = self.answer_text(method, path, url, answer)?;
        if body.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&body).map_err(|e| CtlError::Answer {
            method,
            path: format!("/api/v2/{path}"),
            reason: format!("{e}: {body}"),
        })
    }

    /// The body of a 2xx answer; anything else is an error carrying the API's messages.
    fn answer_text(
        &self,
        method: &'static str,
        path: &str,
        url: &str,
        answer: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<String, CtlError> {
        let mut response =
            answer.map_err(|source| CtlError::Request { method, url: url.to_string(), source })?;
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().map_err(|source| CtlError::Request {
            method,
            url: url.to_string(),
            source,
        })?;
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let json: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let messages: Vec<String> = items(&json).map(|e| text(&e["message"])).collect();
        let message = if messages.is_empty() { body } else { messages.join("; ") };
        Err(CtlError::Api { method, path: format!("/api/v2/{path}"), status, message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_vens_report_is_made_safe_for_a_terminal() {
        assert_eq!(printable("db-01"), "db-01");
        assert_eq!(printable("web\u{1b}[31m\nfake row"), "web\\u{1b}[31m\\u{a}fake row");
        assert_eq!(printable("evil\u{202e}gnp.exe"), "evil\\u{202e}gnp.exe");
        assert_eq!(text(&json!("a\u{2066}b")), "a\\u{2066}b");
        assert_eq!(text(&Value::Null), "-");
    }
}
