//! Asynchronous requests, as Illumio's clients make them.
//!
//! - A collection GET with `Prefer: respond-async` answers 202 with `Location: /orgs/1/jobs/ID`
//!   and `Retry-After`; the job (`GET /orgs/1/jobs/ID`) says `done` with the href of its
//!   datafile (`GET /orgs/1/datafiles/ID`), which holds the collection.
//! - An Explorer traffic query (`POST /orgs/1/traffic_flows/async_queries`) answers 202 with the
//!   query's href; the query (`GET` on it) says `completed` with the href of its results
//!   (`.../download`), a JSON array of flows in Illumio's TrafficFlow shape.
//!
//! This PCE computes the answer when the request arrives (a collection or a query over the
//! in-memory flows takes milliseconds), so a job is done when the client first looks. Results are
//! kept in a bounded table ([`crate::app::Jobs`]): at most `MAX_JOBS` jobs and `MAX_JOB_BYTES` of results, the
//! oldest dropped first (a client asking for a dropped job gets 404).

use super::{Answer, ORG, error, invalid_field, not_found, ok, parse_json};
use crate::app::{App, Job, JobKind};
use crate::clock;
use crate::flows::StoredFlow;
use crate::http::{Request, Response};
use crate::policy::host_addresses;
use crate::policy::model::ip_list_nets;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::IpAddr;
use ven_proto::{FlowVerdict, IpNet};

/// Largest `max_results` of a traffic query (Illumio's own limit).
pub const MAX_QUERY_RESULTS: usize = 100_000;

fn new_job_id() -> String {
    crate::crypto::random_hex(16).unwrap_or_else(|_| format!("{:032x}", clock::now()))
}

/// Whether the request asks for an asynchronous answer.
pub fn wants_async(request: &Request) -> bool {
    request.header("prefer").is_some_and(|prefer| prefer.split(',').any(|p| p.trim() == "respond-async"))
}

/// Turns the answer to a collection GET into a job: 202, `Location`, `Retry-After`.
pub fn defer_collection(app: &App, request: &Request, answer: Response) -> Response {
    if answer.status != 200 || !answer.body.starts_with(b"[") {
        return answer;
    }
    let count = serde_json::from_slice::<Vec<Value>>(&answer.body).map(|items| items.len()).unwrap_or(0);
    let id = new_job_id();
    let location = format!("/orgs/{ORG}/jobs/{id}");
    app.jobs().add(Job {
        id,
        kind: JobKind::Collection,
        request: json!({ "path": request.head.path, "query": request.head.query }),
        created_at: clock::now(),
        result: answer.body,
        count,
    });
    Response::with_body(202, "application/json", b"{}".to_vec())
        .header("location", location)
        .header("retry-after", "0".to_string())
}

/// `/orgs/1/jobs[/ID]` and `/orgs/1/datafiles/ID`.
pub fn route(app: &App, method: &str, segments: &[&str], request: &Request) -> Answer {
    let jobs = app.jobs();
    match (method, segments) {
        ("GET", ["jobs"]) => {
            let list: Vec<Value> =
                jobs.jobs.iter().filter(|j| j.kind == JobKind::Collection).map(job_json).collect();
            Ok(super::collection(list, request))
        }
        ("GET", ["jobs", id]) => {
            jobs.get(JobKind::Collection, id).map(|job| ok(200, job_json(job))).ok_or_else(not_found)
        }
        ("GET", ["datafiles", id]) => {
            let job = jobs.get(JobKind::Collection, id).ok_or_else(not_found)?;
            Ok(Response::with_body(200, "application/json", job.result.clone())
                .header("x-total-count", job.count.to_string()))
        }
        ("GET", ["traffic_flows", "async_queries"]) => {
            let list: Vec<Value> =
                jobs.jobs.iter().filter(|j| j.kind == JobKind::TrafficQuery).map(query_json).collect();
            Ok(super::collection(list, request))
        }
        ("GET", ["traffic_flows", "async_queries", id]) => {
            jobs.get(JobKind::TrafficQuery, id).map(|job| ok(200, query_json(job))).ok_or_else(not_found)
        }
        ("GET", ["traffic_flows", "async_queries", id, "download"]) => {
            let job = jobs.get(JobKind::TrafficQuery, id).ok_or_else(not_found)?;
            Ok(Response::with_body(200, "application/json", job.result.clone())
                .header("x-total-count", job.count.to_string()))
        }
        ("POST", ["traffic_flows", "async_queries"]) => {
            drop(jobs);
            traffic_query(app, request)
        }
        _ => Err(super::method_not_allowed(method, request)),
    }
}

fn job_json(job: &Job) -> Value {
    json!({
        "href": format!("/orgs/{ORG}/jobs/{}", job.id),
        "job_type": "async_collection",
        "status": "done",
        "requested_at": clock::rfc3339(job.created_at),
        "terminated_at": clock::rfc3339(job.created_at),
        "request": job.request,
        "result": { "href": format!("/orgs/{ORG}/datafiles/{}", job.id) },
    })
}

fn query_json(job: &Job) -> Value {
    let href = format!("/orgs/{ORG}/traffic_flows/async_queries/{}", job.id);
    json!({
        "href": href,
        "status": "completed",
        "created_at": clock::rfc3339(job.created_at),
        "updated_at": clock::rfc3339(job.created_at),
        "query_parameters": job.request,
        "flows_count": job.count,
        "matches_count": job.count,
        "result": format!("{href}/download"),
    })
}

/// One filter of an Explorer query: `{"label": {"href"}}`, `{"workload": {"href"}}`,
/// `{"ip_list": {"href"}}` or `{"ip_address": "..."}`.
#[derive(Deserialize)]
struct FilterBody {
    label: Option<super::Href>,
    workload: Option<super::Href>,
    ip_list: Option<super::Href>,
    ip_address: Option<String>,
    fqdn: Option<String>,
    transmission: Option<String>,
}

#[derive(Deserialize, Default)]
struct FilterBlock {
    #[serde(default)]
    include: Vec<Vec<FilterBody>>,
    #[serde(default)]
    exclude: Vec<FilterBody>,
}

#[derive(Deserialize, Default)]
struct ServiceBlock {
    #[serde(default)]
    include: Vec<super::services::PortBody>,
    #[serde(default)]
    exclude: Vec<super::services::PortBody>,
}

#[derive(Deserialize)]
struct QueryBody {
    start_date: Option<String>,
    end_date: Option<String>,
    #[serde(default)]
    sources: FilterBlock,
    #[serde(default)]
    destinations: FilterBlock,
    #[serde(default)]
    services: ServiceBlock,
    #[serde(default)]
    policy_decisions: Vec<String>,
    max_results: Option<usize>,
    query_name: Option<String>,
}

/// A filter resolved to the addresses it stands for.
type Nets = Vec<IpNet>;

/// The addresses each kind of reference stands for, from the store.
struct Resolver {
    by_label: HashMap<u64, Nets>,
    by_workload: HashMap<u64, Nets>,
    ip_lists: HashMap<u64, Nets>,
    /// Address -> (workload id, hostname, label ids), for the flows' endpoints.
    hosts: HashMap<IpAddr, (u64, String, Vec<u64>)>,
}

impl Resolver {
    fn new(app: &App) -> Resolver {
        let store = app.store();
        let state = store.state();
        let mut resolver = Resolver {
            by_label: HashMap::new(),
            by_workload: HashMap::new(),
            ip_lists: state.active.ip_lists.iter().map(|(id, list)| (*id, ip_list_nets(list))).collect(),
            hosts: HashMap::new(),
        };
        for workload in state.workloads.values() {
            let addresses = host_addresses(&workload.interfaces);
            for label in &workload.labels {
                resolver.by_label.entry(*label).or_default().extend(addresses.iter().copied());
            }
            for address in &addresses {
                resolver.hosts.insert(
                    address.addr(),
                    (workload.id, workload.hostname.clone(), workload.labels.clone()),
                );
            }
            resolver.by_workload.insert(workload.id, addresses);
        }
        resolver
    }

    fn filter(&self, filter: &FilterBody, field: &str) -> Result<Nets, Response> {
        let unsupported =
            filter.fqdn.as_ref().map(|_| "fqdn").or(filter.transmission.as_ref().map(|_| "transmission"));
        if let Some(kind) = unsupported {
            return Err(error(
                406,
                "unsupported_filter",
                &format!("{field}: {kind} filters are not supported"),
            ));
        }
        if let Some(label) = &filter.label {
            let id = super::href_id(&label.href, "labels")
                .ok_or_else(|| invalid_field(field, "not a label href"))?;
            return Ok(self.by_label.get(&id).cloned().unwrap_or_default());
        }
        if let Some(workload) = &filter.workload {
            let id = super::href_id(&workload.href, "workloads")
                .ok_or_else(|| invalid_field(field, "not a workload href"))?;
            return Ok(self.by_workload.get(&id).cloned().unwrap_or_default());
        }
        if let Some(list) = &filter.ip_list {
            let (kind, id) = super::sec_policy::object_in_href(&list.href)
                .ok_or_else(|| invalid_field(field, "not an ip_list href"))?;
            if kind != crate::policy::model::Kind::IpLists {
                return Err(invalid_field(field, "not an ip_list href"));
            }
            return Ok(self.ip_lists.get(&id).cloned().unwrap_or_default());
        }
        if let Some(address) = &filter.ip_address {
            let net: IpNet =
                address.parse().map_err(|_| invalid_field(field, "ip_address is not an address"))?;
            return Ok(vec![net]);
        }
        Err(invalid_field(field, "a filter names a label, workload, ip_list or ip_address"))
    }

    /// `include` (OR of ANDs; empty or `[[]]`: everything) less `exclude` (any), resolved.
    fn block(&self, block: &FilterBlock, side: &str) -> Result<(Vec<Vec<Nets>>, Vec<Nets>), Response> {
        let mut include = Vec::new();
        for (i, all) in block.include.iter().enumerate() {
            let resolved: Vec<Nets> = all
                .iter()
                .enumerate()
                .map(|(j, f)| self.filter(f, &format!("{side}.include[{i}][{j}]")))
                .collect::<Result<_, _>>()?;
            include.push(resolved);
        }
        let exclude = block
            .exclude
            .iter()
            .enumerate()
            .map(|(i, f)| self.filter(f, &format!("{side}.exclude[{i}]")))
            .collect::<Result<_, _>>()?;
        Ok((include, exclude))
    }

    fn endpoint(&self, addr: IpAddr) -> Value {
        match self.hosts.get(&addr) {
            Some((id, hostname, labels)) => json!({
                "ip": addr.to_string(),
                "workload": {
                    "href": super::workloads::href(*id),
                    "hostname": hostname,
                    "name": hostname,
                    "labels": labels.iter().map(|l| json!({ "href": super::labels::href(*l) })).collect::<Vec<_>>(),
                },
            }),
            None => json!({ "ip": addr.to_string() }),
        }
    }
}

fn covers(nets: &[IpNet], addr: IpAddr) -> bool {
    nets.iter().any(|net| crate::traffic::contains(*net, addr))
}

/// Whether `addr` passes a resolved block.
fn passes(addr: IpAddr, (include, exclude): &(Vec<Vec<Nets>>, Vec<Nets>)) -> bool {
    let included = include.iter().all(Vec::is_empty)
        || include.iter().any(|all| all.iter().all(|nets| covers(nets, addr)));
    included && !exclude.iter().any(|nets| covers(nets, addr))
}

fn decision(verdict: FlowVerdict) -> &'static str {
    match verdict {
        FlowVerdict::Allowed => "allowed",
        FlowVerdict::Dropped => "blocked",
        FlowVerdict::WouldDrop => "potentially_blocked",
        FlowVerdict::Observed => "unknown",
    }
}

fn parse_date(text: &Option<String>, field: &str) -> Result<Option<u64>, Response> {
    match text {
        None => Ok(None),
        Some(text) => crate::traffic::parse_time(text).map(Some).map_err(|e| invalid_field(field, &e)),
    }
}

fn traffic_query(app: &App, request: &Request) -> Answer {
    let body: QueryBody = parse_json(request)?;
    let raw: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
    let since = parse_date(&body.start_date, "start_date")?;
    let until = parse_date(&body.end_date, "end_date")?;
    let max_results = body.max_results.unwrap_or(MAX_QUERY_RESULTS);
    if max_results > MAX_QUERY_RESULTS {
        return Err(invalid_field("max_results", &format!("at most {MAX_QUERY_RESULTS}")));
    }
    let decisions: Vec<&str> = body.policy_decisions.iter().map(String::as_str).collect();
    if let Some(bad) =
        decisions.iter().find(|d| !["allowed", "blocked", "potentially_blocked", "unknown"].contains(d))
    {
        return Err(invalid_field(
            "policy_decisions",
            &format!("{bad:?} is not allowed, blocked, potentially_blocked or unknown"),
        ));
    }
    let parse_ports = |ports: &[super::services::PortBody], side: &str| {
        ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                super::services::parse_port(p)
                    .map_err(|e| invalid_field(&format!("services.{side}[{i}]"), &e))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let (include_ports, exclude_ports) =
        (parse_ports(&body.services.include, "include")?, parse_ports(&body.services.exclude, "exclude")?);
    let resolver = Resolver::new(app);
    let sources = resolver.block(&body.sources, "sources")?;
    let destinations = resolver.block(&body.destinations, "destinations")?;

    let service_matches = |port: &crate::policy::model::ServicePort, flow: &StoredFlow| {
        let protocol = match port.protocol {
            ven_proto::Protocol::Tcp => Some(6),
            ven_proto::Protocol::Udp => Some(17),
            ven_proto::Protocol::Icmp => Some(1),
            ven_proto::Protocol::Any => None,
        };
        protocol.is_none_or(|p| p == flow.record.protocol)
            && port.ports.is_none_or(|range| (range.first..=range.last).contains(&flow.record.port))
    };
    let flows = app.flows();
    let mut matched: Vec<Value> = Vec::new();
    let mut total = 0usize;
    for flow in flows.flows().iter().rev().filter(|flow| !flow.record.overflow) {
        let record = &flow.record;
        let fits = since.is_none_or(|since| u64::from(record.last_seen) >= since)
            && until.is_none_or(|until| u64::from(record.first_seen) <= until)
            && (decisions.is_empty() || decisions.contains(&decision(record.verdict)))
            && (include_ports.is_empty() || include_ports.iter().any(|p| service_matches(p, flow)))
            && !exclude_ports.iter().any(|p| service_matches(p, flow))
            && passes(record.src, &sources)
            && passes(record.dst, &destinations);
        if !fits {
            continue;
        }
        total += 1;
        if matched.len() < max_results {
            let reporter_is_dst =
                resolver.hosts.get(&record.dst).is_some_and(|(id, _, _)| *id == flow.workload_id);
            matched.push(json!({
                "src": resolver.endpoint(record.src),
                "dst": resolver.endpoint(record.dst),
                "service": { "port": record.port, "proto": record.protocol },
                "num_connections": record.count,
                // Illumio's bytes into the destination (from the logged packets, src -> dst);
                // packets and bytes as the VEN counted them (null: unknown).
                "dst_bi": record.bytes,
                "packets": record.packets,
                "bytes": record.bytes,
                "policy_decision": decision(record.verdict),
                "flow_direction": if reporter_is_dst { "inbound" } else { "outbound" },
                "timestamp_range": {
                    "first_detected": clock::rfc3339(u64::from(record.first_seen)),
                    "last_detected": clock::rfc3339(u64::from(record.last_seen)),
                },
                "state": "closed",
            }));
        }
    }
    drop(flows);
    let id = new_job_id();
    let href = format!("/orgs/{ORG}/traffic_flows/async_queries/{id}");
    let count = matched.len();
    let result = serde_json::to_vec(&matched).unwrap_or_default();
    log::info!(
        "traffic query {:?}: {count} of {total} matching flows",
        body.query_name.as_deref().unwrap_or("")
    );
    let job = Job { id, kind: JobKind::TrafficQuery, request: raw, created_at: clock::now(), result, count };
    let answer = json!({
        "href": href,
        "status": "queued",
        "created_at": clock::rfc3339(job.created_at),
        "query_parameters": job.request,
    });
    app.jobs().add(job);
    Ok(ok(202, answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_blocks_are_ors_of_ands_and_excludes_win() {
        let net = |text: &str| -> IpNet { text.parse().unwrap() };
        let addr = |text: &str| -> IpAddr { text.parse().unwrap() };
        let everything = (vec![vec![]], vec![]);
        assert!(passes(addr("198.18.0.1"), &everything));
        let block = (
            vec![vec![vec![net("198.18.0.0/24")], vec![net("198.18.0.0/25")]], vec![vec![net("198.18.9.9")]]],
            vec![vec![net("198.18.0.7")]],
        );
        assert!(passes(addr("198.18.0.1"), &block));
        assert!(!passes(addr("198.18.0.200"), &block), "in the /24 but not the /25: the AND fails");
        assert!(passes(addr("198.18.9.9"), &block));
        assert!(!passes(addr("198.18.0.7"), &block), "excluded");
    }
}
