//! `/orgs/1/sec_policy/(draft|active)/ip_lists`: named address lists (ranges, CIDRs, exclusions;
//! FQDNs are stored). In a rule they become ipsets on the VENs.

use super::sec_policy::{Version, href};
use super::{
    Answer, collection, invalid_field, method_not_allowed, not_found, ok, parse_id, parse_json, query_value,
    store_error,
};
use crate::app::App;
use crate::http::{Request, Response};
use crate::policy::model::{IpList, IpRange, Kind, MAX_FQDNS, MAX_RANGES};
use serde::Deserialize;
use serde_json::{Value, json};
use std::net::IpAddr;
use ven_proto::IpNet;

pub fn route(app: &App, method: &str, version: Version, rest: &[&str], request: &Request) -> Answer {
    match (method, rest) {
        ("GET", []) => {
            let store = app.store();
            let name = query_value(&request.head.query, "name");
            let lists = version
                .objects(store.state())
                .ip_lists
                .values()
                .filter(|list| name.as_deref().is_none_or(|name| super::name_matches(&list.name, name)))
                .map(|list| json(version, list))
                .collect();
            Ok(collection(lists, request))
        }
        ("GET", [id]) => {
            let store = app.store();
            let list = parse_id(id).and_then(|id| version.objects(store.state()).ip_lists.get(&id));
            list.map(|list| ok(200, json(version, list))).ok_or_else(not_found)
        }
        ("POST", []) => {
            let body: IpListBody = parse_json(request)?;
            let list = body.into_list(None)?;
            let created = app.store().create_ip_list(list).map_err(store_error)?;
            Ok(ok(201, json(Version::Draft, &created)))
        }
        ("PUT", [id]) => {
            let id = parse_id(id).ok_or_else(not_found)?;
            let body: IpListBody = parse_json(request)?;
            let current = app.store().state().draft.ip_lists.get(&id).cloned().ok_or_else(not_found)?;
            let list = body.into_list(Some(current))?;
            app.store().update_ip_list(list).map_err(store_error)?;
            Ok(Response::empty(204))
        }
        ("DELETE", [id]) => {
            let id = parse_id(id).ok_or_else(not_found)?;
            app.store().delete_draft_object((Kind::IpLists, id)).map_err(store_error)?;
            Ok(Response::empty(204))
        }
        (_, [] | [_]) => Err(method_not_allowed(method, request)),
        _ => Err(not_found()),
    }
}

#[derive(Deserialize)]
struct RangeBody {
    from_ip: String,
    to_ip: Option<String>,
    #[serde(default)]
    exclusion: bool,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
struct FqdnBody {
    fqdn: String,
}

#[derive(Deserialize)]
struct IpListBody {
    name: Option<String>,
    description: Option<String>,
    ip_ranges: Option<Vec<RangeBody>>,
    fqdns: Option<Vec<FqdnBody>>,
}

impl IpListBody {
    /// A new list from the body, or `current` with what the body changes.
    fn into_list(self, current: Option<IpList>) -> Result<IpList, Response> {
        let creating = current.is_none();
        let mut list = current.unwrap_or(IpList {
            id: 0,
            name: String::new(),
            description: String::new(),
            ranges: Vec::new(),
            fqdns: Vec::new(),
        });
        match self.name {
            Some(name) => list.name = super::check_name("name", name)?,
            None if creating => return Err(invalid_field("name", "is required")),
            None => {}
        }
        if let Some(description) = self.description {
            list.description = super::check_text("description", description)?;
        }
        if let Some(ranges) = self.ip_ranges {
            if ranges.len() > MAX_RANGES {
                return Err(invalid_field("ip_ranges", &format!("at most {MAX_RANGES} ranges")));
            }
            list.ranges = ranges
                .into_iter()
                .enumerate()
                .map(|(index, range)| {
                    parse_range(range).map_err(|e| invalid_field(&format!("ip_ranges[{index}]"), &e))
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(fqdns) = self.fqdns {
            if fqdns.len() > MAX_FQDNS {
                return Err(invalid_field("fqdns", &format!("at most {MAX_FQDNS} names")));
            }
            list.fqdns = fqdns
                .into_iter()
                .enumerate()
                .map(|(index, f)| super::check_name(&format!("fqdns[{index}].fqdn"), f.fqdn))
                .collect::<Result<_, _>>()?;
        }
        Ok(list)
    }
}

fn parse_range(body: RangeBody) -> Result<IpRange, String> {
    let from: IpNet = body.from_ip.trim().parse().map_err(|e| format!("from_ip {:?}: {e}", body.from_ip))?;
    let to = match body.to_ip.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        None => None,
        Some(text) => {
            let to: IpAddr = text.parse().map_err(|_| format!("to_ip {text:?} is not an address"))?;
            let host = IpNet::host(from.addr());
            if from != host {
                return Err("from_ip must be a single address when to_ip is given".to_string());
            }
            if to.is_ipv4() != from.is_ipv4() || to < from.addr() {
                return Err(format!("to_ip {to} must be of from_ip's family and not below it"));
            }
            Some(to)
        }
    };
    if body.description.len() > crate::policy::model::MAX_TEXT {
        return Err("description: too long".to_string());
    }
    Ok(IpRange { from, to, exclusion: body.exclusion, description: body.description })
}

pub fn json(version: Version, list: &IpList) -> Value {
    let ranges: Vec<Value> = list
        .ranges
        .iter()
        .map(|range| {
            let from = if range.from == IpNet::host(range.from.addr()) {
                range.from.addr().to_string()
            } else {
                format!("{}/{}", range.from.addr(), range.from.prefix())
            };
            let mut value = json!({ "from_ip": from, "exclusion": range.exclusion });
            if let Some(to) = range.to {
                value["to_ip"] = Value::String(to.to_string());
            }
            if !range.description.is_empty() {
                value["description"] = Value::String(range.description.clone());
            }
            value
        })
        .collect();
    json!({
        "href": href(version, Kind::IpLists, list.id),
        "name": list.name,
        "description": list.description,
        "ip_ranges": ranges,
        "fqdns": list.fqdns.iter().map(|f| json!({ "fqdn": f })).collect::<Vec<_>>(),
    })
}
