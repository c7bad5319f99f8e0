//! The admin API: JSON under `/api/v2`, shaped after the public Illumio REST API v2 (labels with
//! href/key/value, draft rules with consumers/providers/ingress_services, provisioning by POST to
//! `/sec_policy`, pairing profiles with their activation code, organisation events), plus each
//! workload's custom iptables rules under `/workloads/<id>/custom_iptables_rules` and the flows the
//! VENs uploaded under `/traffic_flows` (also `/orgs/1/traffic_flows`, Illumio's prefix; this PCE
//! has one organisation): parameters and answer in `traffic.rs`.
//!
//! Every call needs `authorization: Bearer <admin key>` (compared in constant time). Collections
//! answer with `X-Total-Count`; errors are a JSON array `[{"token": ..., "message": ...}]`.
//! `GET /events?format=cef|leef` answers `text/plain`, one line per event.

use crate::clock;
use crate::http::{Request, Response};
use crate::orgevents::{self, EventType, OrgEvent};
use crate::policy::{self, Label, RuleDef, Service};
use crate::serve::App;
use crate::store::{PairingProfile, Store, StoreError, Workload};
use crate::traffic::{self, Query};
use serde::Deserialize;
use serde_json::{Value, json};
use std::str::FromStr;
use ven_proto::{CustomChain, CustomRule, PolicyState, PortRange, Protocol, RuleFamily};

pub const PREFIX: &str = "/api/v2/";
/// The one organisation, for paths in Illumio's `/orgs/<org>/...` form.
const ORG: &str = "1";
const MAX_LABEL_TEXT: usize = 255;

pub fn handle(app: &App, request: &Request) -> Response {
    let key = request.header("authorization").and_then(|value| value.strip_prefix("Bearer "));
    if !key.is_some_and(|key| app.is_admin_key(key)) {
        return error(401, "authentication_failed", "missing or wrong admin API key");
    }
    let path = request.head.path.strip_prefix(PREFIX).unwrap_or_default().trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').collect();
    let result = match (request.head.method.as_str(), segments.as_slice()) {
        ("GET", ["labels"]) => Ok(collection(app.store().state().labels.iter().map(label_json).collect())),
        ("POST", ["labels"]) => create_label(app, request),
        ("GET", ["labels", id]) => {
            let store = app.store();
            id.parse()
                .ok()
                .and_then(|id| store.label(id))
                .map(|label| ok(200, label_json(label)))
                .ok_or_else(not_found)
        }
        ("GET", ["workloads"]) => {
            let store = app.store();
            Ok(collection(store.state().workloads.values().map(|w| workload_json(&store, w)).collect()))
        }
        ("GET", ["workloads", id]) => {
            let store = app.store();
            let workload = id.parse().ok().and_then(|id| store.state().workloads.get(&id));
            workload.map(|w| ok(200, workload_json(&store, w))).ok_or_else(not_found)
        }
        ("PUT", ["workloads", id]) => update_workload(app, id, request),
        ("GET", ["workloads", id, "custom_iptables_rules"]) => {
            let store = app.store();
            let workload = id.parse().ok().and_then(|id| store.state().workloads.get(&id));
            workload
                .map(|w| collection(w.custom_rules.iter().map(|r| custom_rule_json(w.id, r)).collect()))
                .ok_or_else(not_found)
        }
        ("POST", ["workloads", id, "custom_iptables_rules"]) => add_custom_rule(app, id, request),
        ("DELETE", ["workloads", id, "custom_iptables_rules", rule]) => remove_custom_rule(app, id, rule),
        ("GET", ["events"]) => list_events(app, &request.head.query),
        ("GET", ["traffic_flows"] | ["orgs", ORG, "traffic_flows"]) => {
            traffic_flows(app, &request.head.query)
        }
        ("GET", ["sec_policy", version @ ("draft" | "active"), "rules"]) => {
            let store = app.store();
            let rules =
                if *version == "draft" { &store.state().draft_rules } else { &store.state().active_rules };
            Ok(collection(rules.iter().map(|rule| rule_json(version, rule)).collect()))
        }
        ("POST", ["sec_policy", "draft", "rules"]) => add_rule(app, request),
        ("POST", ["sec_policy"]) => provision(app),
        ("GET", ["pairing_profiles"]) => {
            Ok(collection(app.store().state().pairing_profiles.iter().map(profile_json).collect()))
        }
        (
            method,
            ["labels"]
            | ["labels", _]
            | ["workloads"]
            | ["workloads", _]
            | ["workloads", _, "custom_iptables_rules"]
            | ["workloads", _, "custom_iptables_rules", _]
            | ["events"]
            | ["traffic_flows"]
            | ["orgs", ORG, "traffic_flows"]
            | ["sec_policy"]
            | ["sec_policy", _, "rules"]
            | ["pairing_profiles"],
        ) => Err(error(
            405,
            "method_not_allowed",
            &format!("{method} is not allowed on {}", request.head.path),
        )),
        _ => Err(not_found()),
    };
    result.unwrap_or_else(|response| response)
}

/// An error answer: `[{"token": ..., "message": ...}]`.
pub fn error(status: u16, token: &str, message: &str) -> Response {
    ok(status, json!([{ "token": token, "message": message }]))
}

fn ok(status: u16, body: Value) -> Response {
    Response::with_body(status, "application/json", body.to_string().into_bytes())
}

fn collection(items: Vec<Value>) -> Response {
    let count = items.len();
    ok(200, Value::Array(items)).header("x-total-count", count.to_string())
}

fn not_found() -> Response {
    error(404, "not_found", "no such object or endpoint")
}

fn invalid(message: &str) -> Response {
    error(400, "input_validation_error", message)
}

fn store_error(e: StoreError) -> Response {
    match e {
        StoreError::Rejected(message) => invalid(&message),
        StoreError::NoWorkload(_) => not_found(),
        e @ StoreError::NoCustomRule { .. } => error(404, "not_found", &e.to_string()),
        other => {
            log::error!("admin API: {other}");
            error(500, "internal_error", "the PCE could not record the change")
        }
    }
}

type Answer = Result<Response, Response>;

fn parse_json<'a, T: Deserialize<'a>>(request: &'a Request) -> Result<T, Response> {
    serde_json::from_slice(&request.body)
        .map_err(|e| error(400, "invalid_json", &format!("request body: {e}")))
}

fn provision(app: &App) -> Answer {
    let (version, changes) = app.store().provision().map_err(store_error)?;
    log::info!("provisioned security policy version {version}");
    app.publish(&changes);
    Ok(ok(201, json!({ "version": version })))
}

#[derive(Deserialize)]
struct NewLabel {
    key: String,
    value: String,
}

fn create_label(app: &App, request: &Request) -> Answer {
    let new: NewLabel = parse_json(request)?;
    for (what, text, forbidden) in [("key", &new.key, &['=', ','][..]), ("value", &new.value, &[','][..])] {
        if text.is_empty() || text.len() > MAX_LABEL_TEXT || text.chars().any(|c| c.is_control()) {
            return Err(invalid(&format!(
                "the label {what} must have 1 to {MAX_LABEL_TEXT} bytes, no control characters"
            )));
        }
        if let Some(c) = text.chars().find(|c| forbidden.contains(c)) {
            return Err(invalid(&format!("the label {what} {text:?} must not contain {c:?}")));
        }
    }
    let label = app.store().create_label(&new.key, &new.value).map_err(store_error)?;
    Ok(ok(201, label_json(&label)))
}

#[derive(Deserialize)]
struct Href {
    href: String,
}

#[derive(Deserialize)]
struct WorkloadUpdate {
    labels: Option<Vec<Href>>,
    policy_state: Option<String>,
}

fn update_workload(app: &App, id: &str, request: &Request) -> Answer {
    let Ok(id) = id.parse::<u64>() else { return Err(not_found()) };
    let update: WorkloadUpdate = parse_json(request)?;
    let state = match &update.policy_state {
        Some(text) => Some(PolicyState::from_str(text).map_err(|e| invalid(&e))?),
        None => None,
    };
    let changes = {
        let mut store = app.store();
        let labels = match &update.labels {
            Some(hrefs) => {
                Some(hrefs.iter().map(|h| label_id(&store, &h.href)).collect::<Result<Vec<_>, _>>()?)
            }
            None => None,
        };
        store.update_workload(id, labels, state).map_err(store_error)?
    };
    app.publish(&changes);
    Ok(Response::empty(204))
}

#[derive(Deserialize)]
struct NewCustomRule {
    chain: String,
    /// Default: both.
    family: Option<String>,
    rule: String,
}

/// Custom rules apply at once (no provisioning): see [`Store::add_custom_rule`].
fn add_custom_rule(app: &App, id: &str, request: &Request) -> Answer {
    let Ok(id) = id.parse::<u64>() else { return Err(not_found()) };
    let new: NewCustomRule = parse_json(request)?;
    let chain = CustomChain::from_str(&new.chain).map_err(|e| invalid(&e))?;
    let family = match &new.family {
        Some(text) => policy::parse_family(text).map_err(|e| invalid(&e))?,
        None => RuleFamily::Both,
    };
    let (rule, changes) = app.store().add_custom_rule(id, family, chain, &new.rule).map_err(store_error)?;
    log::info!("workload {id}: custom rule {} added", rule.id);
    app.publish(&changes);
    Ok(ok(201, custom_rule_json(id, &rule)))
}

fn remove_custom_rule(app: &App, id: &str, rule: &str) -> Answer {
    let (Ok(id), Ok(rule)) = (id.parse::<u64>(), rule.parse::<u32>()) else { return Err(not_found()) };
    let changes = app.store().remove_custom_rule(id, rule).map_err(store_error)?;
    log::info!("workload {id}: custom rule {rule} removed");
    app.publish(&changes);
    Ok(Response::empty(204))
}

/// What `GET /events` was asked for.
#[derive(Debug, PartialEq)]
struct EventQuery {
    event_type: Option<EventType>,
    max_results: Option<usize>,
    format: EventFormat,
}

#[derive(Debug, PartialEq, Clone, Copy)]
enum EventFormat {
    Json,
    Cef,
    Leef,
}

/// `event_type=T`, `max_results=N` (the newest N), `format=json|cef|leef`; other keys are ignored.
fn event_query(query: &str) -> Result<EventQuery, String> {
    let mut parsed = EventQuery { event_type: None, max_results: None, format: EventFormat::Json };
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "event_type" => parsed.event_type = Some(EventType::from_str(value)?),
            "max_results" => {
                let max = value.parse().map_err(|_| format!("max_results {value:?} is not a number"))?;
                parsed.max_results = Some(max);
            }
            "format" => {
                parsed.format = match value {
                    "json" => EventFormat::Json,
                    "cef" => EventFormat::Cef,
                    "leef" => EventFormat::Leef,
                    _ => return Err(format!("unknown format {value:?} (expected json, cef or leef)")),
                }
            }
            _ => {}
        }
    }
    Ok(parsed)
}

/// The events, oldest first; `X-Total-Count` counts all that match, before `max_results`.
fn list_events(app: &App, query: &str) -> Answer {
    let query = event_query(query).map_err(|e| invalid(&e))?;
    let store = app.store();
    let matching: Vec<&OrgEvent> = store
        .events()
        .iter()
        .filter(|event| query.event_type.is_none_or(|wanted| event.event_type == wanted))
        .collect();
    let total = matching.len();
    let newest = &matching[total - query.max_results.unwrap_or(total).min(total)..];
    let version = env!("CARGO_PKG_VERSION");
    let response = match query.format {
        EventFormat::Json => ok(200, Value::Array(newest.iter().map(|e| event_json(e)).collect())),
        EventFormat::Cef | EventFormat::Leef => {
            let format = if query.format == EventFormat::Cef { orgevents::cef } else { orgevents::leef };
            let text: String = newest.iter().map(|e| format!("{}\n", format(e, version))).collect();
            Response::with_body(200, "text/plain; charset=utf-8", text.into_bytes())
        }
    };
    Ok(response.header("x-total-count", total.to_string()))
}

/// The matching flows, newest first: `{"total", "returned", "more", "flows": [...], "store": {...}}`
/// with `X-Total-Count`. The flows are copied out, so the JSON is built without the lock.
fn traffic_flows(app: &App, query: &str) -> Answer {
    let query = Query::parse(query).map_err(|e| invalid(&e))?;
    let (selection, stats) = {
        let flows = app.flows();
        (traffic::select(&flows, &query), flows.stats())
    };
    let total = selection.total;
    let body = traffic::answer_json(&selection, &stats);
    Ok(Response::with_body(200, "application/json", body).header("x-total-count", total.to_string()))
}

#[derive(Deserialize)]
struct Actor {
    label: Href,
}

#[derive(Deserialize)]
struct IngressService {
    port: i64,
    to_port: Option<i64>,
    proto: Value,
}

#[derive(Deserialize)]
struct NewRule {
    consumers: Vec<Actor>,
    providers: Vec<Actor>,
    ingress_services: Vec<IngressService>,
}

fn add_rule(app: &App, request: &Request) -> Answer {
    let new: NewRule = parse_json(request)?;
    let services = new
        .ingress_services
        .iter()
        .enumerate()
        .map(|(index, service)| {
            parse_service(service).map_err(|e| invalid(&format!("ingress_services[{index}]: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut store = app.store();
    let actors =
        |list: &[Actor]| list.iter().map(|a| label_id(&store, &a.label.href)).collect::<Result<Vec<_>, _>>();
    let (consumers, providers) = (actors(&new.consumers)?, actors(&new.providers)?);
    let rule = store.add_draft_rule(consumers, providers, services).map_err(store_error)?;
    Ok(ok(201, rule_json("draft", &rule)))
}

fn parse_service(service: &IngressService) -> Result<Service, String> {
    let protocol = match &service.proto {
        Value::String(name) => Protocol::from_str(name)?,
        Value::Number(number) => Protocol::from_str(&number.to_string())?,
        other => return Err(format!("proto must be \"tcp\", \"udp\", 6 or 17, not {other}")),
    };
    if !matches!(protocol, Protocol::Tcp | Protocol::Udp) {
        return Err(format!("proto {} is not supported here (tcp or udp)", protocol.as_str()));
    }
    let port = |value: i64| u16::try_from(value).ok().filter(|port| *port >= 1);
    let first = port(service.port).ok_or(format!("port {} is out of range 1..=65535", service.port))?;
    let last = match service.to_port {
        Some(to_port) => port(to_port).ok_or(format!("to_port {to_port} is out of range 1..=65535"))?,
        None => first,
    };
    if last < first {
        return Err(format!("to_port {last} is below port {first}"));
    }
    Ok(Service { ports: PortRange { first, last }, protocol })
}

fn label_id(store: &Store, href: &str) -> Result<u64, Response> {
    let id = href.strip_prefix("/api/v2/labels/").and_then(|id| id.parse().ok());
    id.filter(|id| store.label(*id).is_some()).ok_or_else(|| invalid(&format!("label {href} does not exist")))
}

fn label_href(id: u64) -> String {
    format!("/api/v2/labels/{id}")
}

fn label_json(label: &Label) -> Value {
    json!({ "href": label_href(label.id), "key": label.key, "value": label.value })
}

fn workload_json(store: &Store, workload: &Workload) -> Value {
    let labels: Vec<Value> =
        workload.labels.iter().filter_map(|id| store.label(*id)).map(label_json).collect();
    let interfaces: Vec<Value> = workload
        .interfaces
        .iter()
        .flat_map(|i| i.addresses.iter().map(|a| json!({ "name": i.name, "address": a.to_string() })))
        .collect();
    let agent_status = if workload.suspended {
        "suspended"
    } else if workload.online {
        "online"
    } else {
        "offline"
    };
    json!({
        "href": workload_href(workload.id),
        "id": workload.id,
        "hostname": workload.hostname,
        "os": workload.os,
        "agent_version": workload.agent_version,
        "labels": labels,
        "policy_state": workload.policy_state.as_str(),
        "online": workload.online,
        "agent_status": agent_status,
        "suspended": workload.suspended,
        "last_heartbeat_on": workload.last_heartbeat.map(clock::rfc3339),
        "policy_version": workload.policy_version,
        "applied_policy_version": workload.applied_policy_version,
        "applied_state": workload.applied_state.map(PolicyState::as_str),
        "apply_error": workload.apply_error,
        "interfaces": interfaces,
    })
}

fn workload_href(id: u64) -> String {
    format!("/api/v2/workloads/{id}")
}

fn custom_rule_json(workload_id: u64, rule: &CustomRule) -> Value {
    json!({
        "href": format!("{}/custom_iptables_rules/{}", workload_href(workload_id), rule.id),
        "id": rule.id,
        "chain": rule.chain.as_str(),
        "family": policy::family_name(rule.family),
        "rule": rule.rule,
    })
}

fn event_json(event: &OrgEvent) -> Value {
    let workload = event
        .workload_id
        .map(|id| json!({ "href": workload_href(id), "id": id, "hostname": event.hostname }));
    json!({
        "href": format!("/api/v2/events/{}", event.id),
        "id": event.id,
        "timestamp": clock::rfc3339(event.at),
        "event_type": event.event_type.as_str(),
        "severity": event.severity().as_str(),
        "workload": workload,
        "message": event.message,
        "details": event.details,
    })
}

fn rule_json(version: &str, rule: &RuleDef) -> Value {
    let actors = |ids: &[u64]| -> Vec<Value> {
        ids.iter().map(|id| json!({ "label": { "href": label_href(*id) } })).collect()
    };
    let services: Vec<Value> = rule
        .services
        .iter()
        .map(|s| json!({ "port": s.ports.first, "to_port": s.ports.last, "proto": s.protocol.as_str() }))
        .collect();
    json!({
        "href": format!("/api/v2/sec_policy/{version}/rules/{}", rule.id),
        "consumers": actors(&rule.consumers),
        "providers": actors(&rule.providers),
        "ingress_services": services,
    })
}

fn profile_json(profile: &PairingProfile) -> Value {
    json!({
        "href": format!("/api/v2/pairing_profiles/{}", profile.id),
        "name": profile.name,
        "policy_state": profile.policy_state.as_str(),
        "activation_code": profile.activation_code,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(port: i64, to_port: Option<i64>, proto: Value) -> Result<Service, String> {
        parse_service(&IngressService { port, to_port, proto })
    }

    #[test]
    fn services_are_validated() {
        let pg = service(5432, None, json!("tcp")).unwrap();
        assert_eq!((pg.ports.first, pg.ports.last, pg.protocol), (5432, 5432, Protocol::Tcp));
        assert_eq!(service(1000, Some(2000), json!(17)).unwrap().protocol, Protocol::Udp);
        assert!(service(0, None, json!("tcp")).unwrap_err().contains("port 0"));
        assert!(service(70000, None, json!("tcp")).unwrap_err().contains("70000"));
        assert!(service(80, Some(79), json!("tcp")).unwrap_err().contains("below"));
        assert!(service(80, None, json!("sctp")).unwrap_err().contains("sctp"));
        assert!(service(80, None, json!("icmp")).unwrap_err().contains("not supported"));
        assert!(service(80, None, json!(null)).is_err());
    }

    #[test]
    fn event_queries_are_validated() {
        assert_eq!(
            event_query("").unwrap(),
            EventQuery { event_type: None, max_results: None, format: EventFormat::Json }
        );
        assert_eq!(
            event_query("event_type=tampering&max_results=5&format=cef&other=1").unwrap(),
            EventQuery {
                event_type: Some(EventType::Tampering),
                max_results: Some(5),
                format: EventFormat::Cef
            }
        );
        assert!(event_query("event_type=nope").unwrap_err().contains("unknown event type"));
        assert!(event_query("max_results=-1").unwrap_err().contains("max_results"));
        assert!(event_query("format=xml").unwrap_err().contains("cef"));
    }

    #[test]
    fn errors_are_an_array_of_token_and_message() {
        let response = error(404, "not_found", "nope");
        let body: Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(body, json!([{ "token": "not_found", "message": "nope" }]));
    }
}
