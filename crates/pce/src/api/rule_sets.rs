//! `/orgs/1/sec_policy/(draft|active)/rule_sets[/ID/sec_rules[/ID]]`: rule sets with their scopes
//! and rules. A rule names providers and consumers (labels, workloads, IP lists, or every
//! workload as `{"actors": "ams"}`) and its ingress services (a service href or
//! `{port, to_port, proto}`).

use super::sec_policy::{Version, href, id_in_href};
use super::{
    Answer, collection, href_id, invalid_field, method_not_allowed, not_found, ok, parse_id, parse_json,
    query_value, store_error,
};
use crate::app::App;
use crate::http::{Request, Response};
use crate::policy::model::{
    Actor, Kind, MAX_ACTORS, MAX_RULES_PER_SET, MAX_SCOPES, RuleSet, SecRule, ServiceRef,
};
use serde::Deserialize;
use serde_json::{Value, json};

pub fn route(app: &App, method: &str, version: Version, rest: &[&str], request: &Request) -> Answer {
    match (method, rest) {
        ("GET", []) => {
            let store = app.store();
            let name = query_value(&request.head.query, "name");
            let sets = version
                .objects(store.state())
                .rule_sets
                .values()
                .filter(|set| name.as_deref().is_none_or(|name| super::name_matches(&set.name, name)))
                .map(|set| json(version, set))
                .collect();
            Ok(collection(sets, request))
        }
        ("GET", [id]) => {
            let store = app.store();
            let set = parse_id(id).and_then(|id| version.objects(store.state()).rule_sets.get(&id));
            set.map(|set| ok(200, json(version, set))).ok_or_else(not_found)
        }
        ("POST", []) => {
            let body: RuleSetBody = parse_json(request)?;
            let set = body.into_rule_set(None)?;
            let created = app.store().create_rule_set(set).map_err(store_error)?;
            Ok(ok(201, json(Version::Draft, &created)))
        }
        ("PUT", [id]) => {
            let id = parse_id(id).ok_or_else(not_found)?;
            let body: RuleSetBody = parse_json(request)?;
            let current = app.store().state().draft.rule_sets.get(&id).cloned().ok_or_else(not_found)?;
            let set = body.into_rule_set(Some(current))?;
            app.store().update_rule_set(set).map_err(store_error)?;
            Ok(Response::empty(204))
        }
        ("DELETE", [id]) => {
            let id = parse_id(id).ok_or_else(not_found)?;
            app.store().delete_draft_object((Kind::RuleSets, id)).map_err(store_error)?;
            Ok(Response::empty(204))
        }
        ("GET", [id, "sec_rules"]) => {
            let store = app.store();
            let set = parse_id(id).and_then(|id| version.objects(store.state()).rule_sets.get(&id));
            let set = set.ok_or_else(not_found)?;
            Ok(collection(set.rules.iter().map(|rule| rule_json(version, set.id, rule)).collect(), request))
        }
        ("GET", [id, "sec_rules", rule]) => {
            let store = app.store();
            let set = parse_id(id).and_then(|id| version.objects(store.state()).rule_sets.get(&id));
            let rule_id: Option<u64> = parse_id(rule);
            let found =
                set.and_then(|set| set.rules.iter().find(|r| Some(r.id) == rule_id).map(|r| (set.id, r)));
            found.map(|(set, rule)| ok(200, rule_json(version, set, rule))).ok_or_else(not_found)
        }
        ("POST", [id, "sec_rules"]) => {
            let id = parse_id(id).ok_or_else(not_found)?;
            let body: RuleBody = parse_json(request)?;
            let rule = body.into_rule(None, "")?;
            let created = app.store().create_sec_rule(id, rule).map_err(store_error)?;
            Ok(ok(201, rule_json(Version::Draft, id, &created)))
        }
        ("PUT", [id, "sec_rules", rule]) => {
            let (Some(id), Some(rule_id)) = (parse_id::<u64>(id), parse_id::<u64>(rule)) else {
                return Err(not_found());
            };
            let body: RuleBody = parse_json(request)?;
            let current = {
                let store = app.store();
                let set = store.state().draft.rule_sets.get(&id).ok_or_else(not_found)?;
                set.rules.iter().find(|r| r.id == rule_id).cloned().ok_or_else(not_found)?
            };
            let rule = body.into_rule(Some(current), "")?;
            app.store().update_sec_rule(id, rule).map_err(store_error)?;
            Ok(Response::empty(204))
        }
        ("DELETE", [id, "sec_rules", rule]) => {
            let (Some(id), Some(rule_id)) = (parse_id(id), parse_id(rule)) else { return Err(not_found()) };
            app.store().delete_sec_rule(id, rule_id).map_err(store_error)?;
            Ok(Response::empty(204))
        }
        (_, [] | [_] | [_, "sec_rules"] | [_, "sec_rules", _]) => Err(method_not_allowed(method, request)),
        _ => Err(not_found()),
    }
}

#[derive(Deserialize)]
struct RuleSetBody {
    name: Option<String>,
    description: Option<String>,
    enabled: Option<bool>,
    scopes: Option<Vec<Vec<Value>>>,
    rules: Option<Vec<RuleBody>>,
}

impl RuleSetBody {
    fn into_rule_set(self, current: Option<RuleSet>) -> Result<RuleSet, Response> {
        let creating = current.is_none();
        let mut set = current.unwrap_or(RuleSet {
            id: 0,
            name: String::new(),
            description: String::new(),
            enabled: true,
            scopes: vec![Vec::new()],
            rules: Vec::new(),
        });
        match self.name {
            Some(name) => set.name = super::check_name("name", name)?,
            None if creating => return Err(invalid_field("name", "is required")),
            None => {}
        }
        if let Some(description) = self.description {
            set.description = super::check_text("description", description)?;
        }
        if let Some(enabled) = self.enabled {
            set.enabled = enabled;
        }
        if let Some(scopes) = self.scopes {
            if scopes.len() > MAX_SCOPES {
                return Err(invalid_field("scopes", &format!("at most {MAX_SCOPES} scopes")));
            }
            set.scopes = scopes
                .iter()
                .enumerate()
                .map(|(i, scope)| parse_scope(scope, &format!("scopes[{i}]")))
                .collect::<Result<_, _>>()?;
            if set.scopes.is_empty() {
                set.scopes = vec![Vec::new()];
            }
        }
        if let Some(rules) = self.rules {
            if rules.len() > MAX_RULES_PER_SET {
                return Err(invalid_field("rules", &format!("at most {MAX_RULES_PER_SET} rules")));
            }
            set.rules = rules
                .into_iter()
                .enumerate()
                .map(|(i, rule)| rule.into_rule(None, &format!("rules[{i}].")))
                .collect::<Result<_, _>>()?;
        }
        Ok(set)
    }
}

/// A scope: `[{"label": {"href": ...}}, ...]`, as label ids.
fn parse_scope(scope: &[Value], field: &str) -> Result<Vec<u64>, Response> {
    scope
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let href = entry.pointer("/label/href").and_then(Value::as_str);
            href.and_then(|href| href_id(href, "labels")).ok_or_else(|| {
                invalid_field(
                    &format!("{field}[{i}]"),
                    "must be {\"label\": {\"href\": \"/orgs/1/labels/ID\"}}",
                )
            })
        })
        .collect()
}

#[derive(Deserialize)]
struct RuleBody {
    enabled: Option<bool>,
    description: Option<String>,
    providers: Option<Vec<Value>>,
    consumers: Option<Vec<Value>>,
    ingress_services: Option<Vec<Value>>,
    unscoped_consumers: Option<bool>,
}

impl RuleBody {
    /// `prefix` names the rule in error messages (`rules[2].`), empty for a rule on its own.
    fn into_rule(self, current: Option<SecRule>, prefix: &str) -> Result<SecRule, Response> {
        let creating = current.is_none();
        let mut rule = current.unwrap_or(SecRule {
            id: 0,
            enabled: true,
            description: String::new(),
            providers: Vec::new(),
            consumers: Vec::new(),
            services: Vec::new(),
            unscoped_consumers: false,
        });
        if let Some(enabled) = self.enabled {
            rule.enabled = enabled;
        }
        if let Some(description) = self.description {
            rule.description = super::check_text(&format!("{prefix}description"), description)?;
        }
        if let Some(unscoped) = self.unscoped_consumers {
            rule.unscoped_consumers = unscoped;
        }
        for (side, given, slot) in [
            ("providers", self.providers, &mut rule.providers),
            ("consumers", self.consumers, &mut rule.consumers),
        ] {
            match given {
                Some(actors) => {
                    if actors.is_empty() || actors.len() > MAX_ACTORS {
                        return Err(invalid_field(
                            &format!("{prefix}{side}"),
                            &format!("1 to {MAX_ACTORS} actors"),
                        ));
                    }
                    *slot = actors
                        .iter()
                        .enumerate()
                        .map(|(i, actor)| parse_actor(actor, &format!("{prefix}{side}[{i}]")))
                        .collect::<Result<_, _>>()?;
                }
                None if creating => return Err(invalid_field(&format!("{prefix}{side}"), "is required")),
                None => {}
            }
        }
        match self.ingress_services {
            Some(services) => {
                if services.is_empty() || services.len() > crate::policy::MAX_SERVICES_PER_RULE {
                    let max = crate::policy::MAX_SERVICES_PER_RULE;
                    return Err(invalid_field(
                        &format!("{prefix}ingress_services"),
                        &format!("1 to {max} services"),
                    ));
                }
                rule.services = services
                    .iter()
                    .enumerate()
                    .map(|(i, service)| parse_service(service, &format!("{prefix}ingress_services[{i}]")))
                    .collect::<Result<_, _>>()?;
            }
            None if creating => {
                return Err(invalid_field(&format!("{prefix}ingress_services"), "is required"));
            }
            None => {}
        }
        Ok(rule)
    }
}

fn parse_actor(actor: &Value, field: &str) -> Result<Actor, Response> {
    if actor.get("actors").and_then(Value::as_str) == Some("ams") {
        return Ok(Actor::AllWorkloads);
    }
    let reference = |key: &str| actor.get(key).and_then(|r| r.get("href")).and_then(Value::as_str);
    if let Some(href) = reference("label") {
        return href_id(href, "labels")
            .map(Actor::Label)
            .ok_or_else(|| invalid_field(field, &format!("{href:?} is not a label href")));
    }
    if let Some(href) = reference("workload") {
        return href_id(href, "workloads")
            .map(Actor::Workload)
            .ok_or_else(|| invalid_field(field, &format!("{href:?} is not a workload href")));
    }
    if let Some(href) = reference("ip_list") {
        return id_in_href(href, Kind::IpLists, field).map(Actor::IpList);
    }
    Err(invalid_field(
        field,
        "must be {\"actors\": \"ams\"}, or a label, workload or ip_list {\"href\": ...}",
    ))
}

fn parse_service(service: &Value, field: &str) -> Result<ServiceRef, Response> {
    if let Some(href) = service.get("href").and_then(Value::as_str) {
        return id_in_href(href, Kind::Services, field).map(ServiceRef::Service);
    }
    let port: super::services::PortBody =
        serde_json::from_value(service.clone()).map_err(|e| invalid_field(field, &e.to_string()))?;
    super::services::parse_port(&port).map(ServiceRef::Port).map_err(|e| invalid_field(field, &e))
}

fn actor_json(version: Version, actor: &Actor) -> Value {
    match actor {
        Actor::AllWorkloads => json!({ "actors": "ams" }),
        Actor::Label(id) => json!({ "label": { "href": super::labels::href(*id) } }),
        Actor::Workload(id) => json!({ "workload": { "href": super::workloads::href(*id) } }),
        Actor::IpList(id) => json!({ "ip_list": { "href": href(version, Kind::IpLists, *id) } }),
    }
}

fn rule_json(version: Version, set_id: u64, rule: &SecRule) -> Value {
    let services: Vec<Value> = rule
        .services
        .iter()
        .map(|service| match service {
            ServiceRef::Service(id) => json!({ "href": href(version, Kind::Services, *id) }),
            ServiceRef::Port(port) => super::services::port_json(port),
        })
        .collect();
    json!({
        "href": format!("{}/sec_rules/{}", href(version, Kind::RuleSets, set_id), rule.id),
        "enabled": rule.enabled,
        "description": rule.description,
        "providers": rule.providers.iter().map(|a| actor_json(version, a)).collect::<Vec<_>>(),
        "consumers": rule.consumers.iter().map(|a| actor_json(version, a)).collect::<Vec<_>>(),
        "ingress_services": services,
        "unscoped_consumers": rule.unscoped_consumers,
        "consuming_security_principals": [],
        "resolve_labels_as": { "providers": ["workloads"], "consumers": ["workloads"] },
    })
}

pub fn json(version: Version, set: &RuleSet) -> Value {
    let scopes: Vec<Vec<Value>> = set
        .scopes
        .iter()
        .map(|scope| {
            scope.iter().map(|id| json!({ "label": { "href": super::labels::href(*id) } })).collect()
        })
        .collect();
    json!({
        "href": href(version, Kind::RuleSets, set.id),
        "name": set.name,
        "description": set.description,
        "enabled": set.enabled,
        "scopes": scopes,
        "rules": set.rules.iter().map(|rule| rule_json(version, set.id, rule)).collect::<Vec<_>>(),
        "ip_tables_rules": [],
    })
}
