//! `/orgs/1/workloads`: the paired workloads (list, get, update labels and policy state) and each
//! one's custom iptables rules, which apply at once without provisioning.

use super::{
    Answer, Href, collection, invalid, method_not_allowed, not_found, ok, org_href, parse_id, parse_json,
    store_error,
};
use crate::clock;
use crate::http::{Request, Response};
use crate::policy;
use crate::serve::App;
use crate::store::{Store, Workload};
use serde::Deserialize;
use serde_json::{Value, json};
use std::str::FromStr;
use ven_proto::{CustomChain, CustomRule, PolicyState, RuleFamily};

pub fn href(id: u64) -> String {
    org_href("workloads", id)
}

pub fn route(app: &App, method: &str, rest: &[&str], request: &Request) -> Answer {
    match (method, rest) {
        ("GET", []) => {
            let store = app.store();
            Ok(collection(store.state().workloads.values().map(|w| json(&store, w)).collect(), request))
        }
        ("GET", [id]) => {
            let store = app.store();
            let workload = parse_id(id).and_then(|id| store.state().workloads.get(&id));
            workload.map(|w| ok(200, json(&store, w))).ok_or_else(not_found)
        }
        ("PUT", [id]) => update(app, id, request),
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

#[derive(Deserialize)]
struct WorkloadUpdate {
    labels: Option<Vec<Href>>,
    policy_state: Option<String>,
}

fn update(app: &App, id: &str, request: &Request) -> Answer {
    let id = parse_id(id).ok_or_else(not_found)?;
    let update: WorkloadUpdate = parse_json(request)?;
    let state = match &update.policy_state {
        Some(text) => Some(PolicyState::from_str(text).map_err(|e| invalid(&e))?),
        None => None,
    };
    let changes = {
        let mut store = app.store();
        let labels = match &update.labels {
            Some(hrefs) => Some(
                hrefs
                    .iter()
                    .enumerate()
                    .map(|(i, h)| super::labels::existing(&store, &h.href, &format!("labels[{i}]")))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
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
    let labels: Vec<Value> =
        workload.labels.iter().filter_map(|id| store.label(*id)).map(super::labels::json).collect();
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
        "href": href(workload.id),
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

fn custom_rule_json(workload_id: u64, rule: &CustomRule) -> Value {
    json!({
        "href": format!("{}/custom_iptables_rules/{}", href(workload_id), rule.id),
        "id": rule.id,
        "chain": rule.chain.as_str(),
        "family": policy::family_name(rule.family),
        "rule": rule.rule,
    })
}
