//! `/orgs/1/workloads`: managed workloads (paired VENs) and unmanaged ones (created here: a
//! hostname, interfaces and labels, peers in policy without a VEN); labels and enforcement mode
//! of either; each managed one's custom iptables rules, which apply at once.

use super::{
    Answer, Href, collection, invalid, invalid_field, method_not_allowed, not_found, ok, org_href, parse_id,
    parse_json, store_error,
};
use crate::app::App;
use crate::clock;
use crate::http::{Request, Response};
use crate::policy;
use crate::store::{Store, Workload};
use serde::Deserialize;
use serde_json::{Value, json};
use std::net::IpAddr;
use std::str::FromStr;
use ven_proto::{CustomChain, CustomRule, Interface, IpNet, PolicyState, RuleFamily};

pub fn href(id: u64) -> String {
    org_href("workloads", id)
}

pub fn route(app: &App, method: &str, rest: &[&str], request: &Request) -> Answer {
    match (method, rest) {
        ("GET", []) => {
            let store = app.store();
            let names = hostname_counts(&store);
            let items =
                store.state().workloads.values().map(|w| flagged(json(&store, w), &names, w)).collect();
            Ok(collection(items, request))
        }
        ("GET", [id]) => {
            let store = app.store();
            let names = hostname_counts(&store);
            let workload = parse_id(id).and_then(|id| store.state().workloads.get(&id));
            workload.map(|w| ok(200, flagged(json(&store, w), &names, w))).ok_or_else(not_found)
        }
        ("POST", []) => create_unmanaged(app, request),
        ("PUT", [id]) => update(app, id, request),
        ("DELETE", [id]) => {
            let id = parse_id(id).ok_or_else(not_found)?;
            let changes = app.store().delete_unmanaged_workload(id).map_err(store_error)?;
            app.publish(&changes);
            Ok(Response::empty(204))
        }
        ("GET", [id, "custom_iptables_rules"]) => {
            let store = app.store();
            let workload = parse_id(id).and_then(|id| store.state().workloads.get(&id));
            workload
                .map(|w| {
                    collection(w.custom_rules.iter().map(|r| custom_rule_json(w.id, r)).collect(), request)
                })
                .ok_or_else(not_found)
        }
        ("POST", [id, "custom_iptables_rules"]) => add_custom_rule(app, id, request),
        ("DELETE", [id, "custom_iptables_rules", rule]) => remove_custom_rule(app, id, rule),
        (_, [] | [_] | [_, "custom_iptables_rules"] | [_, "custom_iptables_rules", _]) => {
            Err(method_not_allowed(method, request))
        }
        _ => Err(not_found()),
    }
}

/// `{"name": "eth0", "address": "198.18.0.9", "cidr_block": 24}`.
#[derive(Deserialize)]
struct InterfaceBody {
    name: String,
    address: String,
    cidr_block: Option<u8>,
}

/// Most interfaces an unmanaged workload may list.
const MAX_INTERFACES: usize = 64;

fn parse_interfaces(interfaces: &[InterfaceBody]) -> Result<Vec<Interface>, Response> {
    if interfaces.len() > MAX_INTERFACES {
        return Err(invalid_field("interfaces", &format!("at most {MAX_INTERFACES}")));
    }
    let mut parsed: Vec<Interface> = Vec::new();
    for (i, interface) in interfaces.iter().enumerate() {
        let field = format!("interfaces[{i}]");
        let name = super::check_name(&format!("{field}.name"), interface.name.clone())?;
        let addr: IpAddr = interface
            .address
            .parse()
            .map_err(|_| invalid_field(&format!("{field}.address"), "is not an IP address"))?;
        let prefix = interface.cidr_block.unwrap_or(if addr.is_ipv4() { 32 } else { 128 });
        let net = IpNet::new(addr, prefix)
            .map_err(|e| invalid_field(&format!("{field}.cidr_block"), &e.to_string()))?;
        match parsed.iter_mut().find(|existing| existing.name == name) {
            Some(existing) => existing.addresses.push(net),
            None => parsed.push(Interface { name, addresses: vec![net] }),
        }
    }
    Ok(parsed)
}

#[derive(Deserialize)]
struct WorkloadBody {
    name: Option<String>,
    hostname: Option<String>,
    interfaces: Option<Vec<InterfaceBody>>,
    labels: Option<Vec<Href>>,
    policy_state: Option<String>,
    enforcement_mode: Option<String>,
}

impl WorkloadBody {
    /// The hostname given (`hostname`, else Illumio's `name`), checked as RFC 1123 allows.
    fn hostname(&self) -> Result<Option<String>, Response> {
        match self.hostname.as_ref().or(self.name.as_ref()) {
            None => Ok(None),
            // The same rules as for the names VENs report.
            Some(name) => match crate::venapi::check_hostname(name) {
                Ok(()) => Ok(Some(name.clone())),
                Err(why) => Err(invalid_field("hostname", &why)),
            },
        }
    }

    fn labels(&self, store: &Store) -> Result<Option<Vec<u64>>, Response> {
        let Some(hrefs) = &self.labels else { return Ok(None) };
        hrefs
            .iter()
            .enumerate()
            .map(|(i, h)| super::labels::existing(store, &h.href, &format!("labels[{i}]")))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn state(&self) -> Result<Option<PolicyState>, Response> {
        if let Some(mode) = &self.enforcement_mode {
            return super::pairing::parse_enforcement_mode(mode)
                .map(Some)
                .map_err(|e| invalid_field("enforcement_mode", &e));
        }
        match &self.policy_state {
            Some(text) => {
                PolicyState::from_str(text).map(Some).map_err(|e| invalid_field("policy_state", &e))
            }
            None => Ok(None),
        }
    }
}

/// How many workloads carry each hostname: duplicates are allowed (clones, re-imaged hosts)
/// but flagged.
fn hostname_counts(store: &Store) -> std::collections::HashMap<&str, usize> {
    let mut counts = std::collections::HashMap::new();
    for workload in store.state().workloads.values() {
        *counts.entry(workload.hostname.as_str()).or_insert(0) += 1;
    }
    counts
}

/// `value` (a workload's JSON) with `duplicate_hostname` set.
fn flagged(mut value: Value, names: &std::collections::HashMap<&str, usize>, workload: &Workload) -> Value {
    value["duplicate_hostname"] = json!(names.get(workload.hostname.as_str()).is_some_and(|n| *n > 1));
    value
}

fn create_unmanaged(app: &App, request: &Request) -> Answer {
    let body: WorkloadBody = parse_json(request)?;
    let hostname = body.hostname()?.ok_or_else(|| invalid_field("hostname", "is required"))?;
    let interfaces = parse_interfaces(body.interfaces.as_deref().unwrap_or_default())?;
    if body.state()?.is_some() {
        return Err(invalid_field("enforcement_mode", "an unmanaged workload has no VEN to enforce"));
    }
    let (id, changes) = {
        let mut store = app.store();
        let labels = body.labels(&store)?.unwrap_or_default();
        store.create_unmanaged_workload(&hostname, interfaces, labels, clock::now()).map_err(store_error)?
    };
    log::info!("unmanaged workload {id} ({hostname}) created");
    app.publish(&changes);
    let store = app.store();
    let workload = store.state().workloads.get(&id).ok_or_else(not_found)?;
    Ok(ok(201, json(&store, workload)))
}

fn update(app: &App, id: &str, request: &Request) -> Answer {
    let id = parse_id(id).ok_or_else(not_found)?;
    let body: WorkloadBody = parse_json(request)?;
    let state = body.state()?;
    let hostname = body.hostname()?;
    let interfaces = body.interfaces.as_deref().map(parse_interfaces).transpose()?;
    let mut changes = {
        let mut store = app.store();
        let labels = body.labels(&store)?;
        let managed = store.state().workloads.get(&id).ok_or_else(not_found)?.managed;
        if state.is_some() && !managed {
            return Err(invalid_field("enforcement_mode", "an unmanaged workload has no VEN to enforce"));
        }
        let mut changes = Vec::new();
        if hostname.is_some() || interfaces.is_some() {
            changes = store.update_unmanaged_workload(id, hostname, interfaces).map_err(store_error)?;
        }
        changes.extend(store.update_workload(id, labels, state).map_err(store_error)?);
        changes
    };
    changes.sort_unstable();
    changes.dedup_by_key(|change| change.0);
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
    let id = parse_id(id).ok_or_else(not_found)?;
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
    let (Some(id), Some(rule)) = (parse_id::<u64>(id), parse_id::<u32>(rule)) else {
        return Err(not_found());
    };
    let changes = app.store().remove_custom_rule(id, rule).map_err(store_error)?;
    log::info!("workload {id}: custom rule {rule} removed");
    app.publish(&changes);
    Ok(Response::empty(204))
}

pub fn json(store: &Store, workload: &Workload) -> Value {
    let facts = store.agent_facts(workload.id);
    let labels: Vec<Value> =
        workload.labels.iter().filter_map(|id| store.label(*id)).map(super::labels::json).collect();
    let interfaces: Vec<Value> = workload
        .interfaces
        .iter()
        .flat_map(|i| {
            i.addresses
                .iter()
                .map(|a| json!({ "name": i.name, "address": a.addr().to_string(), "cidr_block": a.prefix() }))
        })
        .collect();
    let agent_status = if workload.suspended {
        "suspended"
    } else if workload.online {
        "online"
    } else {
        "offline"
    };
    // Illumio's agent block: empty for an unmanaged workload (no href), else the VEN's status and
    // its mode in the older vocabulary pylo reads (illuminated = build/test, log_traffic = test).
    let agent = if workload.managed {
        let sync = if workload.apply_error.is_some() {
            "error"
        } else if workload.applied_policy_version == workload.policy_version {
            "active"
        } else {
            "syncing"
        };
        let status = match (workload.suspended, workload.online) {
            (true, _) => "suspended",
            (false, true) => "active",
            (false, false) => "stopped",
        };
        let (mode, log_traffic) = match workload.policy_state {
            PolicyState::Idle => ("idle", false),
            PolicyState::Build => ("illuminated", false),
            PolicyState::Test => ("illuminated", true),
            PolicyState::Enforced => ("enforced", true),
        };
        json!({
            "href": org_href("agents", workload.id),
            "status": {
                "status": status,
                "agent_version": workload.agent_version,
                "last_heartbeat_on": workload.last_heartbeat.map(clock::rfc3339),
                "uptime_seconds": workload.online_since.map(|since| clock::now().saturating_sub(since)),
                "security_policy_sync_state": sync,
                "security_policy_applied_at": null,
            },
            "config": { "mode": mode, "log_traffic": log_traffic },
        })
    } else {
        json!({})
    };
    json!({
        "href": href(workload.id),
        "id": workload.id,
        "name": workload.hostname,
        "managed": workload.managed,
        "deleted": false,
        "enforcement_mode": super::pairing::enforcement_mode(workload.policy_state),
        "agent": agent,
        "hostname": workload.hostname,
        "os": workload.os,
        "agent_version": workload.agent_version,
        // From the VEN's last protocol-6 heartbeat (memory only: unknown after a PCE restart
        // until the next one): the target its releases must be built for, the host's uptime.
        "agent_target": facts.and_then(|f| f.target.clone()),
        "host_uptime_seconds": facts.and_then(|f| f.host_uptime_s.map(|up| up + clock::now().saturating_sub(f.reported_at))),
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
        // Illumio's shape: what the VEN reported listening (process name, user, port).
        "services": {
            "uptime_seconds": workload.online_since.map(|since| clock::now().saturating_sub(since)),
            "open_service_ports": workload.services.iter().map(|s| json!({
                "protocol": s.protocol,
                "address": s.address.to_string(),
                "port": s.port,
                "process_name": s.process,
                "pid": s.pid,
                "user": s.user,
            })).collect::<Vec<_>>(),
            "omitted": workload.services_omitted,
        },
    })
}

fn custom_rule_json(workload_id: u64, rule: &CustomRule) -> Value {
    json!({
        "href": format!("{}/custom_iptables_rules/{}", href(workload_id), rule.id),
        "id": rule.id,
        "chain": rule.chain.as_str(),
        "family": policy::family_name(rule.family),
        "rule": rule.rule,
    })
}
