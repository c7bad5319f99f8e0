//! The VEN API (paths under `/ven/v1/`): activation, heartbeats (with the VEN's events), policy,
//! goodbye, deactivation, suspend notices, flow uploads, listening services, support reports.
//!
//! Bodies are postcard messages from `ven_proto`; every request must name [`PROTOCOL_VERSION`] in
//! `x-ven-protocol` (else 409). Authenticated calls carry `Bearer <agent_id>.<token>`; anything
//! wrong there is 401 `Unauthorized`, so a VEN knows it is a lost agent. Errors carry an
//! [`ErrorBody`]. Sizes in host reports and agent events are bounded before anything reaches the
//! store; flow batches are checked whole by [`crate::flows::check_batch`] before any record is stored.
//!
//! Clones (issue 16, `store::clone_guard`): every authenticated call's clone token and instance
//! id headers decide whether it comes from the original copy of the agent. Only the original's
//! calls change the workload; another copy's heartbeat is answered without being recorded, its
//! goodbye ignored, its reports and uploads refused for now (503) and, once it is a suspected
//! clone, everything it asks refused with `SuspectedClone` (409).

use crate::app::App;
use crate::clock;
use crate::flows::FlowError;
use crate::http::{Admission, Head, Request, Response};
use crate::store::clone_guard::Standing;
use crate::store::{Activation, StoreError};
use crate::supportreports::SupportReportError;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::time::Instant;
use ven_proto::{
    ActivateRequest, ActivateResponse, AgentEventKind, ErrorBody, ErrorKind, FlowAck, FlowBatch, Goodbye,
    HeartbeatRequest, HeartbeatResponse, HostReport, MAX_EVENTS_PER_HEARTBEAT, MAX_SERVICES_PER_REPORT,
    PROTOCOL_HEADER, PROTOCOL_VERSION, ServicesReport, SupportReportUpload, SuspendNotice, path,
};
use ven_proto::{CLONE_TOKEN_HEADER, INSTANCE_HEADER, MAX_CLONE_FIELD_BYTES, NEXT_CLONE_TOKEN_HEADER};

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
        ("POST", path::REACTIVATE) => reactivate(app, request),
        ("POST", path::SUPPORT_REPORT) => support_report(app, request),
        ("GET", path::RELEASE) if version >= ven_proto::UPGRADE_PROTOCOL_VERSION => release(app, request),
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
            | path::REACTIVATE
            | path::SUPPORT_REPORT),
        ) => Err(error(405, ErrorKind::BadRequest, format!("{method} is not allowed on {known}"))),
        (method, path::RELEASE) if version >= ven_proto::UPGRADE_PROTOCOL_VERSION => {
            Err(error(405, ErrorKind::BadRequest, format!("{method} is not allowed on {}", path::RELEASE)))
        }
        // Before protocol 6 there are no releases to fetch: the endpoint does not exist.
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
    let (_, instance) = clone_headers(request)?;
    let waited = Instant::now();
    let mut store = app.store();
    let held = Instant::now();
    let now = clock::now();
    let activated = store.activate(&activation.activation_code, activation.host, now);
    // The activating agent holds the first clone token.
    let first_token = match (&activated, instance) {
        (Ok(activated), Some(_)) => store.present_clone_token(
            activated.agent_id,
            None,
            instance,
            now,
            app.clone_grace_s(),
            true,
            &|_| false,
        ),
        _ => Ok(Standing::Unguarded),
    };
    drop(store);
    let activated = activated.map_err(|e| match e {
        StoreError::Activation(why) => error(401, ErrorKind::BadActivationCode, why),
        other => store_error(other),
    })?;
    let first_token = first_token.map_err(store_error)?;
    // The store's time tells how pairing scales with the fleet (it recomputes and writes).
    log::info!(
        "activated workload {} ({hostname}): {} ms in the store after {} ms waiting for it",
        activated.agent_id,
        held.elapsed().as_millis(),
        held.duration_since(waited).as_millis()
    );
    Ok(paired(app, activated, first_token))
}

/// A suspected clone re-pairs as a workload of its own (issue 16): only a copy the PCE took for a
/// clone may, with the original's credentials; the new workload's first clone token goes to it.
fn reactivate(app: &App, request: &Request) -> Answer {
    let original = authenticate(app, request)?;
    let host: HostReport = decode(request)?;
    check_host(&host, true)?;
    let (token, instance) = clone_headers(request)?;
    let Some(instance) = instance else {
        return Err(error(400, ErrorKind::BadRequest, format!("{INSTANCE_HEADER} is required")));
    };
    let now = clock::now();
    let grace = app.clone_grace_s();
    let mut store = app.store();
    let live = |holder: &str| app.sessions.has_session(original, holder);
    let standing = store.present_clone_token(original, token, Some(instance), now, grace, false, &live);
    match standing.map_err(store_error)? {
        Standing::Clone => {}
        other => {
            let message = format!("only a suspected clone re-pairs; this copy is {other:?}");
            return Err(error(409, ErrorKind::BadRequest, message));
        }
    }
    let hostname = host.hostname.clone();
    let activated = store.reactivate_clone(original, instance, host, now).map_err(|e| match e {
        StoreError::Activation(why) => error(401, ErrorKind::BadActivationCode, why),
        other => store_error(other),
    })?;
    let first_token = store
        .present_clone_token(activated.agent_id, None, Some(instance), now, grace, true, &|_| false)
        .map_err(store_error)?;
    drop(store);
    log::info!(
        "a suspected clone of workload {original} re-paired as workload {} ({hostname})",
        activated.agent_id
    );
    Ok(paired(app, activated, first_token))
}

/// The answer to a pairing (activation or a clone's re-pairing): the peers told, the
/// credentials and the first clone token to the new workload's agent.
fn paired(app: &App, activated: Activation, first_token: Standing) -> Response {
    app.publish(&activated.changes);
    let response = message_response(
        200,
        &ActivateResponse {
            agent_id: activated.agent_id,
            agent_token: activated.agent_token,
            heartbeat_interval_s: app.heartbeat_interval_s,
            event_port: app.event_port,
        },
    );
    with_next_token(response, first_token)
}

fn heartbeat(app: &App, request: &Request, version: u16) -> Answer {
    let agent_id = authenticate(app, request)?;
    let mut report: HeartbeatRequest = if version < ven_proto::UPGRADE_PROTOCOL_VERSION {
        decode::<ven_proto::HeartbeatRequestV5>(request)?.into()
    } else {
        decode(request)?
    };
    // The target names a directory of the release store: only a well-formed triple is kept.
    if let Some(target) = &report.target {
        if ven_proto::release::check_target(target).is_err() {
            log::debug!("workload {agent_id}: heartbeat names no valid target; ignored");
            report.target = None;
        }
    }
    let standing = clone_standing(app, request, agent_id, true)?;
    if !standing.is_original() {
        // Answered (a restarted original waiting for the grace period keeps its footing), not
        // recorded: another copy's host report must not replace the original's.
        log::info!(
            "workload {agent_id}: heartbeat of another copy of its agent ignored: {}",
            standing.refusal()
        );
        let policy_version = app.store().policy_version(agent_id).unwrap_or(0);
        let response = HeartbeatResponse {
            policy_version,
            heartbeat_interval_s: app.heartbeat_interval_s,
            support_report_request: None,
            upgrade: None,
        };
        return Ok(heartbeat_answer(response, version));
    }
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
            AgentEventKind::Upgrade { version, detail, .. } => {
                truncate(version, MAX_EVENT_TEXT_BYTES);
                truncate(detail, MAX_EVENT_TEXT_BYTES);
            }
        }
    }
    let target = report.target.clone();
    let (changes, policy_version, agent_version) = {
        let mut store = app.store();
        let changes = store.heartbeat(agent_id, report, clock::now()).map_err(store_error)?;
        let agent_version = store.state().workloads.get(&agent_id).map(|w| w.agent_version.clone());
        (changes, store.policy_version(agent_id).unwrap_or(0), agent_version)
    };
    app.publish(&changes);
    let support_report_request = app.support_reports().pending(agent_id);
    let upgrade = if version >= ven_proto::UPGRADE_PROTOCOL_VERSION {
        upgrade_for(app, agent_id, target.as_deref(), agent_version.as_deref())
    } else {
        None
    };
    let response = HeartbeatResponse {
        policy_version,
        heartbeat_interval_s: app.heartbeat_interval_s,
        support_report_request,
        upgrade,
    };
    Ok(with_next_token(heartbeat_answer(response, version), standing))
}

/// The release workload `agent_id` is to upgrade to: the one it is ordered to run, when the store
/// holds it for the `target` its VEN names and the VEN runs another `agent_version`.
pub(crate) fn upgrade_for(
    app: &App,
    agent_id: u64,
    target: Option<&str>,
    agent_version: Option<&str>,
) -> Option<String> {
    let ordered = app.upgrades().order_for(agent_id).map(str::to_string)?;
    if agent_version == Some(ordered.as_str()) {
        return None;
    }
    match crate::releases::find(&app.data_dir, &ordered, target?) {
        Ok(Some(_)) => Some(ordered),
        Ok(None) => None,
        Err(e) => {
            log::error!("workload {agent_id}: the upgrade to {ordered} is held back: {e}");
            None
        }
    }
}

/// The bytes a release download will answer with (its manifest's length), for the server's
/// budget of large answers: when it is spent, the VEN hears 503 and asks again later.
pub fn large_answer_bytes(app: &App, head: &Head) -> usize {
    if head.method != "GET" || head.path != path::RELEASE {
        return 0;
    }
    let (Some(version), Some(target)) =
        (query_value(&head.query, "version"), query_value(&head.query, "target"))
    else {
        return 0;
    };
    match crate::releases::find(&app.data_dir, &version, &target) {
        Ok(Some(stored)) => stored.manifest.length as usize,
        _ => 0,
    }
}

/// `GET /ven/v1/release?version=V&target=T` (protocol 6): the release's binary as stored, its
/// signature in [`RELEASE_SIGNATURE_HEADER`](ven_proto::RELEASE_SIGNATURE_HEADER); checked
/// against its manifest first (500 when the store's copy is altered, never served).
fn release(app: &App, request: &Request) -> Answer {
    let agent_id = authenticate(app, request)?;
    // A suspected clone gets nothing new.
    clone_standing(app, request, agent_id, false)?;
    let query = &request.head.query;
    let (Some(version), Some(target)) = (query_value(query, "version"), query_value(query, "target")) else {
        return Err(error(400, ErrorKind::BadRequest, "give ?version=V&target=T"));
    };
    for check in [ven_proto::release::check_version(&version), ven_proto::release::check_target(&target)] {
        check.map_err(|e| error(400, ErrorKind::BadRequest, e.to_string()))?;
    }
    match crate::releases::read(&app.data_dir, &version, &target) {
        Ok((stored, bytes)) => {
            log::info!("workload {agent_id}: release {version} for {target} sent ({} bytes)", bytes.len());
            let signature = ven_proto::release::hex(&stored.signature);
            Ok(Response::with_body(200, "application/octet-stream", bytes)
                .header(ven_proto::RELEASE_SIGNATURE_HEADER, signature))
        }
        // ErrorKind has no NotFound (protocol 6 did not add one): the status tells, as for an
        // unknown endpoint.
        Err(e @ crate::releases::ReleaseStoreError::NotFound { .. }) => {
            Err(error(404, ErrorKind::BadRequest, e.to_string()))
        }
        Err(e) => {
            // Altered or damaged on the PCE's disk: never served; the operator must look.
            log::error!("VEN API: workload {agent_id} asked for release {version} for {target}: {e}");
            let message = match e {
                crate::releases::ReleaseStoreError::Altered { .. } => e.to_string(),
                _ => format!("the PCE could not read release {version} for {target}"),
            };
            Err(error(500, ErrorKind::Internal, message))
        }
    }
}

/// The first value of `key` in a query string, `%XX` escapes decoded (`+` stays: versions may
/// hold it). `None` when absent or not UTF-8 once decoded.
fn query_value(query: &str, key: &str) -> Option<String> {
    let raw = query.split('&').filter_map(|pair| pair.split_once('=')).find(|(k, _)| *k == key)?.1;
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                i += 3;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(decoded).ok()
}

/// The heartbeat answer in the shape a VEN of protocol `version` decodes: before 5 without the
/// support-report request, before 6 without the upgrade (it can do neither).
fn heartbeat_answer(response: HeartbeatResponse, version: u16) -> Response {
    if version < ven_proto::SUPPORT_REPORT_PROTOCOL_VERSION {
        message_response(200, &ven_proto::HeartbeatResponseV4::from(response))
    } else if version < ven_proto::UPGRADE_PROTOCOL_VERSION {
        message_response(200, &ven_proto::HeartbeatResponseV5::from(response))
    } else {
        message_response(200, &response)
    }
}

/// Stores the support report the PCE asked for; 409 when no such request waits for this
/// workload, 400 for an archive that is not whole, 413 past the size cap (nothing stored).
fn support_report(app: &App, request: &Request) -> Answer {
    let agent_id = authenticate(app, request)?;
    original_only(app, request, agent_id)?;
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
    // A suspected clone keeps its last-known-good policy and gets nothing new.
    clone_standing(app, request, agent_id, false)?;
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
    let standing = clone_standing(app, request, agent_id, false)?;
    if !standing.is_original() {
        log::info!("workload {agent_id}: goodbye ({reason}) of another copy of its agent ignored");
        return Ok(Response::empty(204));
    }
    let changes = app.store().goodbye(agent_id, &reason, clock::now()).map_err(store_error)?;
    log::info!("workload {agent_id} said goodbye ({reason}): offline");
    app.publish(&changes);
    Ok(Response::empty(204))
}

fn services(app: &App, request: &Request) -> Answer {
    let agent_id = authenticate(app, request)?;
    original_only(app, request, agent_id)?;
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
    original_only(app, request, agent_id)?;
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
    if let Err(e) = app.upgrades().forget(agent_id) {
        log::error!("forgetting the upgrade order of workload {agent_id}: {e}");
    }
    app.publish(&changes);
    Ok(Response::empty(204))
}

fn suspend(app: &App, request: &Request) -> Answer {
    let agent_id = authenticate(app, request)?;
    original_only(app, request, agent_id)?;
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
    original_only(app, request, agent_id)?;
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

/// The clone token and instance id a request carries (each bounded; 400 past the bound).
fn clone_headers(request: &Request) -> Result<(Option<&str>, Option<&str>), Response> {
    let token = request.header(CLONE_TOKEN_HEADER);
    let instance = request.header(INSTANCE_HEADER);
    if token.into_iter().chain(instance).any(|value| value.len() > MAX_CLONE_FIELD_BYTES) {
        let message = format!(
            "{CLONE_TOKEN_HEADER} and {INSTANCE_HEADER} are limited to {MAX_CLONE_FIELD_BYTES} bytes"
        );
        return Err(error(400, ErrorKind::BadRequest, message));
    }
    Ok((token, instance))
}

/// Which copy of the agent made the call (`store::clone_guard`); a suspected clone is refused
/// here (409 `SuspectedClone`). `rotate`: the call hands the original its next token.
fn clone_standing(app: &App, request: &Request, agent_id: u64, rotate: bool) -> Result<Standing, Response> {
    let (token, instance) = clone_headers(request)?;
    let live = |holder: &str| app.sessions.has_session(agent_id, holder);
    let standing = app
        .store()
        .present_clone_token(agent_id, token, instance, clock::now(), app.clone_grace_s(), rotate, &live)
        .map_err(store_error)?;
    if let (Standing::Holder { .. }, Some(instance)) = (&standing, instance) {
        app.sessions.adopt(agent_id, instance);
    }
    match standing {
        Standing::Clone => Err(error(409, ErrorKind::SuspectedClone, standing.refusal())),
        other => Ok(other),
    }
}

/// Lets only the original copy's calls through: another copy is told to try later (503: a
/// restarted original waits out the grace period and sends again) or refused as a clone.
fn original_only(app: &App, request: &Request, agent_id: u64) -> Result<(), Response> {
    let standing = clone_standing(app, request, agent_id, false)?;
    if standing.is_original() { Ok(()) } else { Err(error(503, ErrorKind::Internal, standing.refusal())) }
}

/// Adds the next clone token to the original's answer.
fn with_next_token(response: Response, standing: Standing) -> Response {
    match standing {
        Standing::Holder { next_token: Some(token) } => response.header(NEXT_CLONE_TOKEN_HEADER, token),
        _ => response,
    }
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
    fn release_queries_are_decoded() {
        assert_eq!(query_value("version=1.2.0%2Bb7&target=a-b", "version").as_deref(), Some("1.2.0+b7"));
        assert_eq!(query_value("version=1.2.0+b7", "version").as_deref(), Some("1.2.0+b7"));
        assert_eq!(query_value("target=a-b&target=c-d", "target").as_deref(), Some("a-b"));
        assert_eq!(query_value("version=%zz%4", "version").as_deref(), Some("%zz%4"));
        assert_eq!(query_value("version=%ff", "version"), None);
        assert_eq!(query_value("x=1", "version"), None);
    }

    #[test]
    fn errors_carry_a_postcard_error_body() {
        let response = error(401, ErrorKind::BadActivationCode, "no");
        let body: ErrorBody = ven_proto::decode(&response.body).unwrap();
        assert_eq!((response.status, body.kind), (401, ErrorKind::BadActivationCode));
    }
}
