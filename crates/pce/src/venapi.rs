//! The VEN API (paths under `/ven/v1/`): activation, heartbeats (with the VEN's events), policy,
//! goodbye, deactivation, suspend notices, flow uploads, listening services, support reports.
//!
//! Bodies are postcard messages from `ven_proto`; every request must name [`PROTOCOL_VERSION`] in
//! `x-ven-protocol` (else 409). Authenticated calls carry `Bearer <agent_id>.<token>`; anything
//! wrong there is 401 `Unauthorized`, so a VEN knows it is a lost agent. Errors carry an
//! [`ErrorBody`]. Sizes in host reports and agent events are bounded before anything reaches the
//! store; flow batches are checked whole by [`crate::flows::check_batch`] before any record is stored.

use crate::app::App;
use crate::clock;
use crate::flows::FlowError;
use crate::http::{Admission, Head, Request, Response};
use crate::store::StoreError;
use crate::supportreports::SupportReportError;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::time::Instant;
use ven_proto::{
    ActivateRequest, ActivateResponse, AgentEventKind, ErrorBody, ErrorKind, FlowAck, FlowBatch, Goodbye,
    HeartbeatRequest, HeartbeatResponse, HostReport, MAX_EVENTS_PER_HEARTBEAT, MAX_SERVICES_PER_REPORT,
    PROTOCOL_HEADER, PROTOCOL_VERSION, ServicesReport, SupportReportUpload, SuspendNotice, path,
};

const MAX_INTERFACES: usize = 256;
const MAX_ADDRESSES_PER_INTERFACE: usize = 64;
const MAX_NAME_BYTES: usize = 255;
/// Longer apply errors are cut (a VEN may forward a whole iptables-restore complaint).
const MAX_APPLY_ERROR_BYTES: usize = 4096;
/// Longer texts in agent events (a tampering summary) and goodbye reasons are cut.
const MAX_EVENT_TEXT_BYTES: usize = 1024;

/// Checks a VEN API request's credentials on its head: activation needs none (its code is in the
/// body), every other call the agent's `Bearer <agent_id>.<token>`.
pub fn admit(app: &App, head: &Head) -> Admission {
    if head.path == path::ACTIVATE {
        return Admission::Anonymous;
    }
    match authenticate_header(app, head.header("authorization")) {
        Ok(_) => Admission::Authenticated,
        Err(response) => Admission::Refused(response),
    }
}

pub fn handle(app: &App, request: &Request) -> Response {
    let version = request.header(PROTOCOL_HEADER);
    // Version 3 (before packets and bytes in flow records) differs only in the flow batch.
    let Some(version) =
        version.and_then(|v| v.parse::<u16>().ok()).filter(|&v| ven_proto::protocol_supported(v))
    else {
        let message = format!(
            "this PCE speaks VEN protocol {}..={PROTOCOL_VERSION}; the request names {}",
            ven_proto::OLDEST_PROTOCOL_VERSION,
            version.map_or("none".to_string(), |v| format!("{v:?}"))
        );
        return error(409, ErrorKind::ProtocolMismatch, message);
    };
    let result = match (request.head.method.as_str(), request.head.path.as_str()) {
        ("POST", path::ACTIVATE) => activate(app, request),
        ("POST", path::HEARTBEAT) => heartbeat(app, request, version),
        ("GET", path::POLICY) => policy(app, request),
        ("POST", path::GOODBYE) => goodbye(app, request),
        ("POST", path::DEACTIVATE) => deactivate(app, request),
        ("POST", path::SUSPEND) => suspend(app, request),
        ("POST", path::FLOWS) => upload_flows(app, request, version),
        ("POST", path::SERVICES) => services(app, request),
        ("POST", path::SUPPORT_REPORT) => support_report(app, request),
        (
            method,
            known @ (path::ACTIVATE
            | path::HEARTBEAT
            | path::POLICY
            | path::GOODBYE
            | path::DEACTIVATE
            | path::SUSPEND
            | path::FLOWS
            | path::SERVICES
            | path::SUPPORT_REPORT),
        ) => Err(error(405, ErrorKind::BadRequest, format!("{method} is not allowed on {known}"))),
        (_, unknown) => Err(error(404, ErrorKind::BadRequest, format!("no VEN API endpoint {unknown}"))),
    };
    result.unwrap_or_else(|response| response)
}

/// An error answer with a postcard [`ErrorBody`].
pub fn error(status: u16, kind: ErrorKind, message: impl Into<String>) -> Response {
    message_response(status, &ErrorBody { kind, message: message.into() })
}

fn message_response<T: Serialize>(status: u16, message: &T) -> Response {
    Response::with_body(status, ven_proto::CONTENT_TYPE, ven_proto::encode(message))
}

type Answer = Result<Response, Response>;

fn activate(app: &App, request: &Request) -> Answer {
    let activation: ActivateRequest = decode(request)?;
    check_host(&activation.host, true)?;
    let hostname = activation.host.hostname.clone();
    let waited = Instant::now();
    let mut store = app.store();
    let held = Instant::now();
    let activated = store.activate(&activation.activation_code, activation.host, clock::now());
    drop(store);
    let activated = activated.map_err(|e| match e {
        StoreError::Activation(why) => error(401, ErrorKind::BadActivationCode, why),
        other => store_error(other),
    })?;
    // The store's time tells how pairing scales with the fleet (it recomputes and writes).
    log::info!(
        "activated workload {} ({hostname}): {} ms in the store after {} ms waiting for it",
        activated.agent_id,
        held.elapsed().as_millis(),
        held.duration_since(waited).as_millis()
    );
    app.publish(&activated.changes);
    Ok(message_response(
        200,
        &ActivateResponse {
            agent_id: activated.agent_id,
            agent_token: activated.agent_token,
            heartbeat_interval_s: app.heartbeat_interval_s,
            event_port: app.event_port,
        },
    ))
}

fn heartbeat(app: &App, request: &Request, version: u16) -> Answer {
    let agent_id = authenticate(app, request)?;
    let mut report: HeartbeatRequest = decode(request)?;
    if let Some(host) = &report.host {
        // A name the PCE took before this check existed stays accepted while it is unchanged.
        let unchanged =
            app.store().state().workloads.get(&agent_id).is_some_and(|w| w.hostname == host.hostname);
        check_host(host, !unchanged)?;
    }
    if let Some(message) = report.apply_error.as_mut() {
        truncate(message, MAX_APPLY_ERROR_BYTES);
    }
    if report.events.len() > MAX_EVENTS_PER_HEARTBEAT {
        let message = format!(
            "{} events in one heartbeat; the limit is {MAX_EVENTS_PER_HEARTBEAT}",
            report.events.len()
        );
        return Err(error(400, ErrorKind::BadRequest, message));
    }
    for event in &mut report.events {
        match &mut event.kind {
            AgentEventKind::Tampering { summary, .. } => truncate(summary, MAX_EVENT_TEXT_BYTES),
            AgentEventKind::ComponentRestarted { component, cause, .. } => {
                truncate(component, MAX_EVENT_TEXT_BYTES);
                truncate(cause, MAX_EVENT_TEXT_BYTES);
            }
        }
    }
    let (changes, policy_version) = {
        let mut store = app.store();
        let changes = store.heartbeat(agent_id, report, clock::now()).map_err(store_error)?;
        (changes, store.policy_version(agent_id).unwrap_or(0))
    };
    app.publish(&changes);
    let support_report_request = app.support_reports().pending(agent_id);
    let response = HeartbeatResponse {
        policy_version,
        heartbeat_interval_s: app.heartbeat_interval_s,
        support_report_request,
    };
    // A VEN before protocol 5 decodes the answer without the request (it cannot make reports).
    if version < ven_proto::SUPPORT_REPORT_PROTOCOL_VERSION {
        return Ok(message_response(200, &ven_proto::HeartbeatResponseV4::from(response)));
    }
    Ok(message_response(200, &response))
}

/// Stores the support report the PCE asked for; 409 when no such request waits for this
/// workload, 400 for an archive that is not whole, 413 past the size cap (nothing stored).
fn support_report(app: &App, request: &Request) -> Answer {
    let agent_id = authenticate(app, request)?;
    // The body's length prefix and bytes: more than the archive's cap is refused before decoding.
    if request.body.len() > ven_proto::MAX_SUPPORT_REPORT_BYTES + 32 {
        let message = format!(
            "a support report upload of {} bytes exceeds the limit of {}",
            request.body.len(),
            ven_proto::MAX_SUPPORT_REPORT_BYTES
        );
        return Err(error(413, ErrorKind::BadRequest, message));
    }
    let upload: SupportReportUpload = decode(request)?;
    let hostname = app.store().state().workloads.get(&agent_id).map(|workload| workload.hostname.clone());
    let Some(hostname) = hostname else {
        return Err(error(401, ErrorKind::Unauthorized, "unknown agent"));
    };
    let stored =
        app.support_reports().store(agent_id, &hostname, upload.request, &upload.report, clock::now());
    match stored {
        Ok(report) => {
            log::info!(
                "workload {agent_id} ({hostname}): support report {} received ({} bytes, request {})",
                report.id,
                report.bytes,
                report.request_id
            );
            Ok(Response::empty(204))
        }
        Err(e @ SupportReportError::NotWaiting { .. }) => {
            Err(error(409, ErrorKind::BadRequest, e.to_string()))
        }
        Err(SupportReportError::Rejected(message)) => Err(error(400, ErrorKind::BadRequest, message)),
        Err(other) => {
            log::error!("VEN API: storing the support report of workload {agent_id}: {other}");
            Err(error(500, ErrorKind::Internal, "the PCE could not store the support report"))
        }
    }
}

fn policy(app: &App, request: &Request) -> Answer {
    let agent_id = authenticate(app, request)?;
    // The encoding made once per version: the lock is held for a lookup only.
    let current = app.store().policy_bytes(agent_id);
    let Some((version, bytes)) = current else {
        return Err(error(401, ErrorKind::Unauthorized, "unknown agent"));
    };
    let known = request.header("if-none-match").map(|v| v.trim_matches('"'));
    if known == Some(version.to_string().as_str()) {
        return Ok(Response::empty(304));
    }
    Ok(Response::with_body(200, ven_proto::CONTENT_TYPE, bytes.to_vec()))
}

fn goodbye(app: &App, request: &Request) -> Answer {
    let agent_id = authenticate(app, request)?;
    // The reason is informative only; an agent that sends none is still let go.
    let mut reason = decode::<Goodbye>(request).map(|goodbye| goodbye.reason).unwrap_or_default();
    truncate(&mut reason, MAX_EVENT_TEXT_BYTES);
    let changes = app.store().goodbye(agent_id, &reason, clock::now()).map_err(store_error)?;
    log::info!("workload {agent_id} said goodbye ({reason}): offline");
    app.publish(&changes);
    Ok(Response::empty(204))
}

fn services(app: &App, request: &Request) -> Answer {
    let agent_id = authenticate(app, request)?;
    let report = decode::<ServicesReport>(request)?;
    if report.services.len() > MAX_SERVICES_PER_REPORT {
        let message = format!(
            "{} services in one report; the limit is {MAX_SERVICES_PER_REPORT}",
            report.services.len()
        );
        return Err(error(400, ErrorKind::BadRequest, message));
    }
    if let Some(service) =
        report.services.iter().find(|s| s.process.len() > MAX_NAME_BYTES || s.user.len() > MAX_NAME_BYTES)
    {
        let message =
            format!("service on port {}: names are limited to {MAX_NAME_BYTES} bytes", service.port);
        return Err(error(400, ErrorKind::BadRequest, message));
    }
    app.store().services(agent_id, report).map_err(store_error)?;
    Ok(Response::empty(204))
}

fn deactivate(app: &App, request: &Request) -> Answer {
    let agent_id = authenticate(app, request)?;
    let changes = app.store().deactivate(agent_id, clock::now()).map_err(store_error)?;
    log::info!("workload {agent_id} deactivated");
    // Its flows stay; the cursor of an agent that can upload no more goes.
    if let Err(e) = app.flows().forget(agent_id) {
        log::error!("forgetting the flow cursor of workload {agent_id}: {e}");
    }
    app.sessions.disconnect(agent_id);
    if let Err(e) = app.support_reports().cancel(agent_id) {
        log::error!("forgetting the support report request of workload {agent_id}: {e}");
    }
    app.publish(&changes);
    Ok(Response::empty(204))
}

fn suspend(app: &App, request: &Request) -> Answer {
    let agent_id = authenticate(app, request)?;
    let notice: SuspendNotice = decode(request)?;
    let changes = app
        .store()
        .suspend(agent_id, notice.suspended, notice.previous_state, clock::now())
        .map_err(store_error)?;
    let what = if notice.suspended { "suspended" } else { "unsuspended" };
    log::info!("workload {agent_id} {what}");
    app.publish(&changes);
    Ok(Response::empty(204))
}

/// Stores the records above the workload's cursor and acknowledges the cursor (see `flows`).
fn upload_flows(app: &App, request: &Request, version: u16) -> Answer {
    let agent_id = authenticate(app, request)?;
    let batch: FlowBatch = if version < PROTOCOL_VERSION {
        FlowBatch::from(decode::<ven_proto::FlowBatchV3>(request)?)
    } else {
        decode(request)?
    };
    let hostname = app.store().state().workloads.get(&agent_id).map(|workload| workload.hostname.clone());
    let Some(hostname) = hostname else {
        return Err(error(401, ErrorKind::Unauthorized, "unknown agent"));
    };
    let records = batch.records.len();
    // Appended under the flows' lock; the wait for the disk (shared with the uploads that arrive
    // meanwhile) comes after it is released, and before the ack.
    let deferred = app.flows().ingest_deferred(agent_id, &hostname, batch, clock::now());
    let ingested =
        deferred.and_then(|(ingested, pending)| pending.wait().map(|()| ingested)).map_err(|e| match e {
            FlowError::Rejected(message) => error(400, ErrorKind::BadRequest, message),
            other => {
                log::error!("VEN API: storing flows of workload {agent_id}: {other}");
                error(500, ErrorKind::Internal, "the PCE could not store the flows")
            }
        })?;
    log::debug!(
        "workload {agent_id}: {records} flow records, {} stored, {} already stored, through {}",
        ingested.stored,
        ingested.duplicates,
        ingested.through
    );
    Ok(message_response(200, &FlowAck { through: ingested.through }))
}

fn authenticate(app: &App, request: &Request) -> Result<u64, Response> {
    authenticate_header(app, request.header("authorization"))
}

fn authenticate_header(app: &App, authorization: Option<&str>) -> Result<u64, Response> {
    let credentials = authorization.and_then(ven_proto::parse_bearer);
    match credentials {
        Some((agent_id, token)) if app.store().authenticate(agent_id, token) => Ok(agent_id),
        Some((agent_id, _)) => {
            app.store().lost_agent(agent_id, "VEN API", clock::now());
            Err(error(401, ErrorKind::Unauthorized, "unknown agent or wrong token"))
        }
        None => Err(error(401, ErrorKind::Unauthorized, "missing or malformed agent credentials")),
    }
}

fn decode<T: DeserializeOwned>(request: &Request) -> Result<T, Response> {
    ven_proto::decode(&request.body).map_err(|e| error(400, ErrorKind::BadRequest, e.to_string()))
}

/// Checks a host report's sizes, and its hostname when `new_name` (RFC 1123, [`check_hostname`]).
fn check_host(host: &HostReport, new_name: bool) -> Result<(), Response> {
    let bad = |message: String| Err(error(400, ErrorKind::BadRequest, message));
    if host.hostname.len() > MAX_NAME_BYTES {
        return bad(format!("host.hostname: longer than {MAX_NAME_BYTES} bytes"));
    }
    if new_name {
        if let Err(problem) = check_hostname(&host.hostname) {
            return bad(format!("host.hostname {:?} is refused: {problem}", host.hostname));
        }
    }
    if host.os.len() > MAX_NAME_BYTES || host.agent_version.len() > MAX_NAME_BYTES {
        return bad(format!("os and agent_version are limited to {MAX_NAME_BYTES} bytes"));
    }
    if host.interfaces.len() > MAX_INTERFACES {
        return bad(format!("{} interfaces reported; the limit is {MAX_INTERFACES}", host.interfaces.len()));
    }
    for interface in &host.interfaces {
        if interface.name.len() > MAX_NAME_BYTES || interface.addresses.len() > MAX_ADDRESSES_PER_INTERFACE {
            return bad(format!(
                "interface {:?}: names are limited to {MAX_NAME_BYTES} bytes, addresses to {MAX_ADDRESSES_PER_INTERFACE}",
                interface.name
            ));
        }
    }
    Ok(())
}

/// Longest host name (RFC 1123, in its text form without the trailing dot).
pub const MAX_HOSTNAME_BYTES: usize = 253;
/// Longest label of a host name.
pub const MAX_HOSTNAME_LABEL_BYTES: usize = 63;

/// A host name as RFC 1123 has it: dot-separated labels of ASCII letters, digits and hyphens,
/// each of 1 to 63 bytes and neither starting nor ending with a hyphen; 253 bytes at most. What
/// an operator's terminal prints can then hold no escape sequence, newline or bidi control.
/// The agent checks its own name the same way (`src/agent/host.rs`).
pub fn check_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_HOSTNAME_BYTES {
        return Err(format!("a host name has 1 to {MAX_HOSTNAME_BYTES} bytes (RFC 1123)"));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > MAX_HOSTNAME_LABEL_BYTES {
            return Err(format!(
                "each dot-separated label has 1 to {MAX_HOSTNAME_LABEL_BYTES} bytes (RFC 1123)"
            ));
        }
        if let Some(c) = label.chars().find(|c| !c.is_ascii_alphanumeric() && *c != '-') {
            return Err(format!("{c:?} is not a letter, digit, hyphen or dot (RFC 1123)"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label neither starts nor ends with a hyphen (RFC 1123)".to_string());
        }
    }
    Ok(())
}

fn store_error(e: StoreError) -> Response {
    match e {
        StoreError::NoWorkload(_) => error(401, ErrorKind::Unauthorized, "unknown agent"),
        StoreError::Rejected(message) => error(400, ErrorKind::BadRequest, message),
        other => {
            log::error!("VEN API: {other}");
            error(500, ErrorKind::Internal, "the PCE could not record the change")
        }
    }
}

/// Cuts `text` to at most `max` bytes, on a character boundary.
fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_respects_characters() {
        let mut text = "aé".repeat(3);
        truncate(&mut text, 4);
        assert_eq!(text, "aéa");
        let mut short = "ok".to_string();
        truncate(&mut short, 4);
        assert_eq!(short, "ok");
    }

    #[test]
    fn hostnames_follow_rfc_1123() {
        let label63 = "a".repeat(63);
        let long = [label63.as_str(); 4].join(".");
        for good in ["web", "web-01.example.com", "1host", "A-b.C", &label63, &long[..253]] {
            assert_eq!(check_hostname(good), Ok(()), "{good:?}");
        }
        let label64 = "a".repeat(64);
        for bad in [
            "",
            "web\x1b[31m",
            "web\nfake row",
            "web\u{202e}gpj",
            "we b",
            "web_01",
            "-web",
            "web-",
            "a..b",
            ".web",
            "web.",
            &label64,
            &long,
        ] {
            assert!(check_hostname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn errors_carry_a_postcard_error_body() {
        let response = error(401, ErrorKind::BadActivationCode, "no");
        let body: ErrorBody = ven_proto::decode(&response.body).unwrap();
        assert_eq!((response.status, body.kind), (401, ErrorKind::BadActivationCode));
    }
}
