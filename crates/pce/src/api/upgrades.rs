//! `/orgs/1/vens/upgrade`: upgrade orders (issue 16, self-upgrade), in the shape of Illumio's
//! VEN upgrade call.
//!
//! `PUT` `{"release": "1.2.0", "vens": [{"href": "/orgs/1/workloads/2"}]}` or
//! `{"release": "1.2.0", "all": true}` orders the upgrade; `{"cancel": true, "vens": [...]}` or
//! `{"cancel": true, "all": true}` cancels. An order is refused for a release the store holds for
//! no target (404), and for a workload that does not exist (404) or has no VEN (406). The answer
//! counts the VENs told now by a lightning bolt (connected, protocol 6) and those that learn at
//! their next heartbeat (which repeats the order while the VEN runs another version). `GET`
//! shows the orders: `{"all": "1.2.0" | null, "vens": [{"href", "hostname", "release"}]}`
//! (`release` null: exempt from the all-order).

use super::{Answer, Href, error, href_id, invalid, invalid_field, method_not_allowed, not_found, ok};
use super::{parse_json, workloads};
use crate::app::App;
use crate::sessions::Delivery;
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Order {
    release: Option<String>,
    #[serde(default)]
    cancel: bool,
    #[serde(default)]
    all: bool,
    vens: Option<Vec<Href>>,
}

pub fn route(app: &App, method: &str, rest: &[&str], request: &crate::http::Request) -> Answer {
    match (method, rest) {
        ("PUT", ["upgrade"]) => order(app, request),
        ("GET", ["upgrade"]) => Ok(list(app)),
        (_, ["upgrade"]) => Err(method_not_allowed(method, request)),
        _ => Err(not_found()),
    }
}

fn list(app: &App) -> crate::http::Response {
    // Copied first: the store's lock is taken after the orders' is released.
    let (all, own): (Option<String>, Vec<(u64, Option<String>)>) = {
        let orders = app.upgrades();
        (
            orders.all().map(str::to_string),
            orders.per_workload().map(|(id, v)| (id, v.map(str::to_string))).collect(),
        )
    };
    let store = app.store();
    let vens: Vec<_> = own
        .into_iter()
        .map(|(id, release)| {
            let hostname = store.state().workloads.get(&id).map(|w| w.hostname.clone());
            json!({ "href": workloads::href(id), "hostname": hostname, "release": release })
        })
        .collect();
    ok(200, json!({ "all": all, "vens": vens }))
}

fn order(app: &App, request: &crate::http::Request) -> Answer {
    let body: Order = parse_json(request)?;
    let hrefs = body.vens.unwrap_or_default();
    match (body.all, hrefs.is_empty()) {
        (true, false) => return Err(invalid("give \"all\": true or \"vens\", not both")),
        (false, true) => return Err(invalid("give \"all\": true or at least one VEN in \"vens\"")),
        _ => {}
    }
    let release = match (body.release, body.cancel) {
        (Some(release), false) => Some(release),
        (None, true) => None,
        _ => return Err(invalid("give \"release\" to order an upgrade or \"cancel\": true, one of them")),
    };
    if hrefs.len() > crate::store::MAX_WORKLOADS {
        return Err(invalid_field("vens", &format!("at most {}", crate::store::MAX_WORKLOADS)));
    }
    let mut ids = Vec::with_capacity(hrefs.len());
    for (i, href) in hrefs.iter().enumerate() {
        let id = href_id(&href.href, "workloads")
            .or_else(|| href_id(&href.href, "vens"))
            .ok_or_else(|| invalid_field(&format!("vens[{i}].href"), "must be /orgs/1/workloads/ID"))?;
        ids.push(id);
    }
    ids.sort_unstable();
    ids.dedup();
    // The targeted workloads as they are now: (id, agent version, target its VEN last named).
    let targeted: Vec<(u64, String, Option<String>)> = {
        let store = app.store();
        let facts = |id: u64| store.agent_facts(id).and_then(|f| f.target.clone());
        if body.all {
            let managed = store.state().workloads.values().filter(|w| w.managed);
            managed.map(|w| (w.id, w.agent_version.clone(), facts(w.id))).collect()
        } else {
            let mut targeted = Vec::with_capacity(ids.len());
            for id in &ids {
                match store.state().workloads.get(id) {
                    None => return Err(error(404, "not_found", &format!("no workload with id {id}"))),
                    Some(w) if !w.managed => {
                        let message = format!("workload {id} has no VEN (unmanaged): it cannot upgrade");
                        return Err(error(406, "no_agent", &message));
                    }
                    Some(w) => targeted.push((w.id, w.agent_version.clone(), facts(w.id))),
                }
            }
            targeted
        }
    };
    let Some(release) = release else {
        let cancelled = if body.all { app.upgrades().cancel_all() } else { app.upgrades().cancel(&ids) };
        cancelled.map_err(orders_error)?;
        log::info!(
            "upgrade orders cancelled for {}",
            if body.all { "all workloads".to_string() } else { format!("{ids:?}") }
        );
        return Ok(ok(200, json!({ "cancelled": true, "all": body.all, "vens": targeted.len() })));
    };
    ven_proto::release::check_version(&release).map_err(|e| invalid_field("release", &e.to_string()))?;
    let targets = crate::releases::targets_of(&app.data_dir, &release).map_err(|e| {
        log::error!("admin API: reading the release store: {e}");
        error(500, "internal_error", "the PCE could not read its release store")
    })?;
    if targets.is_empty() {
        let message = format!(
            "no release {release} in the PCE's store, for any target (add it with `pce release add`)"
        );
        return Err(error(404, "not_found", &message));
    }
    let ordered =
        if body.all { app.upgrades().order_all(&release) } else { app.upgrades().order(&ids, &release) };
    ordered.map_err(orders_error)?;

    // The bolt is a hint; every heartbeat answer repeats the order while it applies.
    let (mut bolt, mut heartbeat, mut too_old, mut running, mut no_build) = (0, 0, 0, 0, 0);
    for (id, agent_version, target) in &targeted {
        if app.upgrades().order_for(*id) != Some(release.as_str()) {
            continue; // exempt, or a per-workload order overrides the all-order
        }
        if *agent_version == release {
            running += 1;
            continue;
        }
        if target.as_ref().is_some_and(|target| !targets.contains(target)) {
            no_build += 1;
            continue;
        }
        match app.sessions.request_upgrade(*id, &release) {
            Delivery::Queued => bolt += 1,
            Delivery::NotConnected => heartbeat += 1,
            Delivery::TooOld { .. } => too_old += 1,
        }
    }
    log::info!(
        "upgrade to {release} ordered for {}: {bolt} told by bolt, {heartbeat} at their next heartbeat, \
         {too_old} too old, {running} already running it, {no_build} without a build for their target",
        if body.all { "all workloads".to_string() } else { format!("workloads {ids:?}") }
    );
    Ok(ok(
        200,
        json!({
            "release": release,
            "all": body.all,
            "targets": targets,
            "vens": targeted.len(),
            "told_by_bolt": bolt,
            "next_heartbeat": heartbeat,
            "too_old": too_old,
            "already_running": running,
            "no_release_for_target": no_build,
        }),
    ))
}

fn orders_error(e: crate::upgrades::UpgradeError) -> crate::http::Response {
    match e {
        crate::upgrades::UpgradeError::Full(message) => error(406, "too_many_orders", &message),
        other => {
            log::error!("admin API: {other}");
            error(500, "internal_error", "the PCE could not record the upgrade order")
        }
    }
}
