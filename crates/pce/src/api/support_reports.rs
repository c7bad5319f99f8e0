//! `/orgs/1/support_report_requests` and `/orgs/1/support_reports`: asking a workload's VEN for
//! a support report (a lightning bolt to VENs of protocol 5 that are connected, and the heartbeat
//! answer for every VEN of protocol 5, so a lost bolt loses nothing) and the reports received.
//!
//! `POST support_report_requests` `{"workload": {"href": "/orgs/1/workloads/2"}}` -> 201 with the
//! request (the one already waiting for that workload, if any); `GET support_report_requests`
//! lists those waiting; `GET support_reports[/ID]` the reports, newest last; `GET
//! support_reports/ID/download` the archive (`application/x-tar`).

use super::{Answer, Href, collection, error, href_id, invalid_field, method_not_allowed, not_found, ok};
use super::{org_href, parse_id, parse_json};
use crate::app::App;
use crate::clock;
use crate::http::{Request, Response};
use crate::sessions::Delivery;
use crate::supportreports::{Report, SupportReportError};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewRequest {
    workload: Href,
}

pub fn requests(app: &App, method: &str, rest: &[&str], request: &Request) -> Answer {
    match (method, rest) {
        ("POST", []) => create(app, request),
        ("GET", []) => {
            // Copied first: the store's lock is taken for each hostname, never both at once.
            let waiting = app.support_reports().pending_requests().to_vec();
            let items = waiting
                .iter()
                .map(|r| {
                    json!({
                        "href": org_href("support_report_requests", r.id),
                        "id": r.id,
                        "workload": workload_json(app, r.workload_id),
                        "requested_at": clock::rfc3339(r.requested_at),
                    })
                })
                .collect();
            Ok(collection(items, request))
        }
        (_, []) => Err(method_not_allowed(method, request)),
        _ => Err(not_found()),
    }
}

pub fn reports(app: &App, method: &str, rest: &[&str], request: &Request) -> Answer {
    match (method, rest) {
        ("GET", []) => {
            let list: Vec<Report> = app.support_reports().list().to_vec();
            Ok(collection(list.iter().map(report_json).collect(), request))
        }
        ("GET", [id]) => {
            let id = parse_id::<u64>(id).ok_or_else(not_found)?;
            let list = app.support_reports();
            list.list().iter().find(|r| r.id == id).map(|r| ok(200, report_json(r))).ok_or_else(not_found)
        }
        ("GET", [id, "download"]) => {
            let id = parse_id::<u64>(id).ok_or_else(not_found)?;
            let read = app.support_reports().read(id);
            match read {
                Ok((_, bytes)) => Ok(Response::with_body(200, "application/x-tar", bytes)),
                Err(SupportReportError::NoReport(_)) => Err(not_found()),
                Err(other) => {
                    log::error!("admin API: {other}");
                    Err(error(500, "internal_error", "the PCE could not read the support report"))
                }
            }
        }
        (_, [] | [_] | [_, "download"]) => Err(method_not_allowed(method, request)),
        _ => Err(not_found()),
    }
}

/// Asks the workload's VEN for a report: 404 for a workload that does not exist, 406 for one
/// without a VEN (unmanaged).
fn create(app: &App, request: &Request) -> Answer {
    let body: NewRequest = parse_json(request)?;
    let workload_id = href_id(&body.workload.href, "workloads")
        .ok_or_else(|| invalid_field("workload.href", "must be /orgs/1/workloads/ID"))?;
    let managed = app.store().state().workloads.get(&workload_id).map(|w| w.managed);
    match managed {
        None => return Err(error(404, "not_found", &format!("no workload with id {workload_id}"))),
        Some(false) => {
            let message = format!("workload {workload_id} has no VEN (unmanaged): it cannot send a report");
            return Err(error(406, "no_agent", &message));
        }
        Some(true) => {}
    }
    let asked = app.support_reports().request(workload_id, clock::now());
    let (asked, new) = match asked {
        Ok(asked) => asked,
        Err(SupportReportError::Rejected(message)) => return Err(error(406, "too_many_requests", &message)),
        Err(other) => {
            log::error!("admin API: {other}");
            return Err(error(500, "internal_error", "the PCE could not record the request"));
        }
    };
    // The bolt is a hint; the heartbeat answer carries the request until the report arrives.
    let delivery = match app.sessions.request_support_report(workload_id, asked.id) {
        Delivery::Queued => "lightning_bolt".to_string(),
        Delivery::NotConnected => "next_heartbeat".to_string(),
        Delivery::TooOld { protocol_version } => {
            format!("none: the VEN speaks protocol {protocol_version}, which has no support report requests")
        }
    };
    log::info!("support report {} asked of workload {workload_id} (delivery: {delivery})", asked.id);
    Ok(ok(
        if new { 201 } else { 200 },
        json!({
            "href": org_href("support_report_requests", asked.id),
            "id": asked.id,
            "workload": workload_json(app, workload_id),
            "requested_at": clock::rfc3339(asked.requested_at),
            "delivery": delivery,
        }),
    ))
}

fn workload_json(app: &App, id: u64) -> Value {
    let hostname = app.store().state().workloads.get(&id).map(|w| w.hostname.clone());
    json!({ "href": super::workloads::href(id), "id": id, "hostname": hostname })
}

fn report_json(report: &Report) -> Value {
    json!({
        "href": org_href("support_reports", report.id),
        "id": report.id,
        "request_id": report.request_id,
        "workload": {
            "href": super::workloads::href(report.workload_id),
            "id": report.workload_id,
            "hostname": report.hostname,
        },
        "received_at": clock::rfc3339(report.received_at),
        "size_bytes": report.bytes,
        "sha256": report.sha256,
        "download": format!("{}/download", org_href("support_reports", report.id)),
    })
}
