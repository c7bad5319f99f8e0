//! `/orgs/1/sec_policy`: the draft and active rules, and provisioning (`POST /sec_policy`), which
//! makes the draft active and recomputes the affected workloads' policies.

use super::{
    Answer, Href, ORG, collection, invalid, method_not_allowed, not_found, ok, parse_json, store_error,
};
use crate::http::Request;
use crate::policy::{RuleDef, Service};
use crate::serve::App;
use serde::Deserialize;
use serde_json::{Value, json};
use std::str::FromStr;
use ven_proto::{PortRange, Protocol};

pub fn route(app: &App, method: &str, rest: &[&str], request: &Request) -> Answer {
    match (method, rest) {
        ("POST", []) => provision(app),
        ("GET", [version @ ("draft" | "active"), "rules"]) => {
            let store = app.store();
            let state = store.state();
            let rules = if *version == "draft" { &state.draft_rules } else { &state.active_rules };
            Ok(collection(rules.iter().map(|rule| rule_json(version, rule)).collect(), request))
        }
        ("POST", ["draft", "rules"]) => add(app, request),
        (_, [] | ["draft" | "active", "rules"]) => Err(method_not_allowed(method, request)),
        _ => Err(not_found()),
    }
}

fn provision(app: &App) -> Answer {
    let (version, changes) = app.store().provision().map_err(store_error)?;
    log::info!("provisioned security policy version {version}");
    app.publish(&changes);
    Ok(ok(201, json!({ "version": version })))
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

fn add(app: &App, request: &Request) -> Answer {
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
    let actors = |side: &str, list: &[Actor]| {
        list.iter()
            .enumerate()
            .map(|(i, a)| super::labels::existing(&store, &a.label.href, &format!("{side}[{i}].label")))
            .collect::<Result<Vec<_>, _>>()
    };
    let (consumers, providers) = (actors("consumers", &new.consumers)?, actors("providers", &new.providers)?);
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

fn rule_json(version: &str, rule: &RuleDef) -> Value {
    let actors = |ids: &[u64]| -> Vec<Value> {
        ids.iter().map(|id| json!({ "label": { "href": super::labels::href(*id) } })).collect()
    };
    let services: Vec<Value> = rule
        .services
        .iter()
        .map(|s| json!({ "port": s.ports.first, "to_port": s.ports.last, "proto": s.protocol.as_str() }))
        .collect();
    json!({
        "href": format!("/orgs/{ORG}/sec_policy/{version}/rules/{}", rule.id),
        "consumers": actors(&rule.consumers),
        "providers": actors(&rule.providers),
        "ingress_services": services,
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
}
