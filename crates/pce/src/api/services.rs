//! `/orgs/1/sec_policy/(draft|active)/services`: named lists of protocols and ports that rules
//! name in their `ingress_services`.

use super::sec_policy::{Version, href};
use super::{
    Answer, collection, invalid_field, method_not_allowed, not_found, ok, parse_id, parse_json, query_value,
    store_error,
};
use crate::app::App;
use crate::http::{Request, Response};
use crate::policy::model::{Kind, MAX_SERVICE_PORTS, ServiceDef, ServicePort};
use serde::Deserialize;
use serde_json::{Value, json};
use ven_proto::{PortRange, Protocol};

pub fn route(app: &App, method: &str, version: Version, rest: &[&str], request: &Request) -> Answer {
    match (method, rest) {
        ("GET", []) => {
            let store = app.store();
            let name = query_value(&request.head.query, "name");
            let services = version
                .objects(store.state())
                .services
                .values()
                .filter(|service| name.as_deref().is_none_or(|name| super::name_matches(&service.name, name)))
                .map(|service| json(version, service))
                .collect();
            Ok(collection(services, request))
        }
        ("GET", [id]) => {
            let store = app.store();
            let service = parse_id(id).and_then(|id| version.objects(store.state()).services.get(&id));
            service.map(|service| ok(200, json(version, service))).ok_or_else(not_found)
        }
        ("POST", []) => {
            let body: ServiceBody = parse_json(request)?;
            let service = body.into_service(None)?;
            let created = app.store().create_service(service).map_err(store_error)?;
            Ok(ok(201, json(Version::Draft, &created)))
        }
        ("PUT", [id]) => {
            let id = parse_id(id).ok_or_else(not_found)?;
            let body: ServiceBody = parse_json(request)?;
            let current = app.store().state().draft.services.get(&id).cloned().ok_or_else(not_found)?;
            let service = body.into_service(Some(current))?;
            app.store().update_service(service).map_err(store_error)?;
            Ok(Response::empty(204))
        }
        ("DELETE", [id]) => {
            let id = parse_id(id).ok_or_else(not_found)?;
            app.store().delete_draft_object((Kind::Services, id)).map_err(store_error)?;
            Ok(Response::empty(204))
        }
        (_, [] | [_]) => Err(method_not_allowed(method, request)),
        _ => Err(not_found()),
    }
}

/// `{"port": 80, "to_port": 90, "proto": 6}`; `proto` also `"tcp"`, `-1` is every protocol.
#[derive(Deserialize)]
pub struct PortBody {
    port: Option<i64>,
    to_port: Option<i64>,
    proto: Value,
}

#[derive(Deserialize)]
struct ServiceBody {
    name: Option<String>,
    description: Option<String>,
    service_ports: Option<Vec<PortBody>>,
}

impl ServiceBody {
    fn into_service(self, current: Option<ServiceDef>) -> Result<ServiceDef, Response> {
        let creating = current.is_none();
        let mut service = current.unwrap_or(ServiceDef {
            id: 0,
            name: String::new(),
            description: String::new(),
            ports: Vec::new(),
        });
        match self.name {
            Some(name) => service.name = super::check_name("name", name)?,
            None if creating => return Err(invalid_field("name", "is required")),
            None => {}
        }
        if let Some(description) = self.description {
            service.description = super::check_text("description", description)?;
        }
        match self.service_ports {
            Some(ports) => {
                if ports.is_empty() || ports.len() > MAX_SERVICE_PORTS {
                    return Err(invalid_field("service_ports", &format!("1 to {MAX_SERVICE_PORTS} entries")));
                }
                service.ports = ports
                    .iter()
                    .enumerate()
                    .map(|(i, port)| {
                        parse_port(port).map_err(|e| invalid_field(&format!("service_ports[{i}]"), &e))
                    })
                    .collect::<Result<_, _>>()?;
            }
            None if creating => return Err(invalid_field("service_ports", "is required")),
            None => {}
        }
        Ok(service)
    }
}

/// One protocol and port range, checked: ports 1-65535 on TCP and UDP only, `to_port` not below
/// `port`.
pub fn parse_port(body: &PortBody) -> Result<ServicePort, String> {
    let protocol = match &body.proto {
        Value::Number(number) if number.as_i64() == Some(-1) => Protocol::Any,
        Value::Number(number) => number.to_string().parse::<Protocol>()?,
        Value::String(name) => name.parse::<Protocol>()?,
        other => return Err(format!("proto must be a protocol number or name, not {other}")),
    };
    let in_range = |value: i64| u16::try_from(value).ok().filter(|port| *port >= 1);
    let ports = match (body.port, body.to_port) {
        (None, None) => None,
        (None, Some(_)) => return Err("to_port needs port".to_string()),
        (Some(port), to_port) => {
            if !matches!(protocol, Protocol::Tcp | Protocol::Udp) {
                return Err(format!("ports are for tcp and udp, not {}", protocol.as_str()));
            }
            let first = in_range(port).ok_or(format!("port {port} is out of range 1..=65535"))?;
            let last = match to_port {
                Some(to_port) => {
                    in_range(to_port).ok_or(format!("to_port {to_port} is out of range 1..=65535"))?
                }
                None => first,
            };
            if last < first {
                return Err(format!("to_port {last} is below port {first}"));
            }
            Some(PortRange { first, last })
        }
    };
    Ok(ServicePort { protocol, ports })
}

pub fn port_json(port: &ServicePort) -> Value {
    let proto = match port.protocol {
        Protocol::Tcp => json!(6),
        Protocol::Udp => json!(17),
        Protocol::Icmp => json!(1),
        Protocol::Any => json!(-1),
    };
    let mut value = json!({ "proto": proto });
    // TCP and UDP always carry a port (every port is 1-65535), as Illumio shows them; ICMP
    // carries its (any) type and code.
    let ports = match port.protocol {
        Protocol::Tcp | Protocol::Udp => Some(port.ports.unwrap_or(PortRange { first: 1, last: 65535 })),
        Protocol::Icmp | Protocol::Any => None,
    };
    if let Some(ports) = ports {
        value["port"] = json!(ports.first);
        if ports.last != ports.first {
            value["to_port"] = json!(ports.last);
        }
    }
    if port.protocol == Protocol::Icmp {
        value["icmp_type"] = Value::Null;
        value["icmp_code"] = Value::Null;
    }
    value
}

pub fn json(version: Version, service: &ServiceDef) -> Value {
    json!({
        "href": href(version, Kind::Services, service.id),
        "name": service.name,
        "description": service.description,
        "service_ports": service.ports.iter().map(port_json).collect::<Vec<_>>(),
        "process_name": null,
        "deleted_at": null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(port: Option<i64>, to_port: Option<i64>, proto: Value) -> Result<ServicePort, String> {
        parse_port(&PortBody { port, to_port, proto })
    }

    #[test]
    fn ports_are_checked() {
        let pg = port(Some(5432), None, json!(6)).unwrap();
        assert_eq!((pg.protocol, pg.ports), (Protocol::Tcp, Some(PortRange { first: 5432, last: 5432 })));
        assert_eq!(port(Some(1000), Some(2000), json!("udp")).unwrap().ports.unwrap().last, 2000);
        assert_eq!(
            port(None, None, json!(-1)).unwrap(),
            ServicePort { protocol: Protocol::Any, ports: None }
        );
        assert_eq!(port(None, None, json!(1)).unwrap().protocol, Protocol::Icmp);
        assert!(port(Some(0), None, json!(6)).unwrap_err().contains("port 0"));
        assert!(port(Some(70000), None, json!(6)).unwrap_err().contains("70000"));
        assert!(port(Some(80), Some(79), json!(6)).unwrap_err().contains("below"));
        assert!(port(Some(80), None, json!(1)).unwrap_err().contains("tcp and udp"));
        assert!(port(None, Some(80), json!(6)).unwrap_err().contains("needs port"));
        assert!(port(Some(80), None, json!(99)).is_err());
        assert!(port(Some(80), None, json!(null)).is_err());
    }
}
