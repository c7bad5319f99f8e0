//! End to end: the real `pce` and two real `ven` agents in network namespaces (the lab), driven
//! only through their command lines. Needs root and iproute2; skipped loudly without them, and a
//! failure under CI=true. The `pce` binary comes from `cargo build --workspace --bins` (or PCE_BIN);
//! `ven` is the one cargo built for this test (or VEN_BIN).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ven_lab::process::Captured;
use ven_lab::scenario::{self, Host, find_workload, management_server};
use ven_lab::{Binaries, Lab, LabOptions};

/// The binaries, or `None` (after saying why) when this machine cannot run the test.
fn prerequisites(test: &str) -> Option<Binaries> {
    ven_lab::binaries::for_end_to_end_test(test, env!("CARGO_BIN_EXE_ven"), &[])
}

fn say(line: &str) {
    eprintln!("{line}");
}

#[test]
fn provisioned_rule_is_enforced_and_idle_opens_the_firewall_again() {
    let Some(bins) = prerequisites("provisioned_rule_is_enforced_and_idle_opens_the_firewall_again") else {
        return;
    };
    let mut lab = Lab::new(bins, LabOptions { name_prefix: "vene2e".into(), ..LabOptions::default() })
        .expect("building the lab");
    let report = scenario::run_demo(&mut lab, &mut say).unwrap_or_else(|e| panic!("the demo failed: {e}"));
    let listing =
        |probes: &[scenario::ProbeResult]| probes.iter().map(|p| format!("\n  {p}")).collect::<String>();
    assert!(
        report.baseline.iter().all(|p| p.ok()),
        "before enforcement (both idle), every probe should connect:{}",
        listing(&report.baseline)
    );
    assert!(report.probes.iter().all(|p| p.ok()), "with both workloads enforced:{}", listing(&report.probes));

    // Right after the probes, long before the manager's next wake-up or a flush: db's status
    // counts the packets its firewall logged (the allowed 5432 connection and the dropped probe).
    let db = lab.ven_status(Host::Db).expect("db's ven status");
    match db.flows {
        Some((true, logged, _)) => assert!(logged >= 2, "db's status right after the probes: {db:?}"),
        other => panic!("db's flow pipeline should be reading NFLOG, got {other:?}"),
    }

    // Both agents say they are online, and the PCE agrees and has heard what they applied.
    let limit = Duration::from_secs(10);
    let agents_online = lab.wait_until("both agents reporting connectivity online", limit, |lab| {
        let mut pending = Vec::new();
        for host in Host::AGENTS {
            let status = lab.ven_status(host)?;
            if !status.activated || status.connectivity.as_deref() != Some("online") {
                pending.push(format!("{host}: {status:?}"));
            }
        }
        Ok(if pending.is_empty() { None } else { Some(pending.join("; ")) })
    });
    if let Err(e) = agents_online {
        panic!("{e}");
    }
    let pce_view =
        lab.wait_until("the PCE showing both workloads online with their policy applied", limit, |lab| {
            let workloads = lab.workloads()?;
            let mut pending = Vec::new();
            for host in Host::AGENTS {
                match find_workload(&workloads, host) {
                    Some(w)
                        if w.online
                            && w.policy_version.is_some()
                            && w.applied_policy_version == w.policy_version
                            && w.policy_state == "enforced"
                            && w.label("role") == Some(host.name()) => {}
                    Some(w) => pending.push(format!("{host}: {w:?}")),
                    None => pending.push(format!("{host}: missing from `pce workload list`")),
                }
            }
            Ok(if pending.is_empty() { None } else { Some(pending.join("; ")) })
        });
    if let Err(e) = pce_view {
        panic!("{e}");
    }

    // Back to idle, db first: its firewall goes, so db:22 answers again. The probe comes from the
    // PCE host, which runs no agent: web is still enforced, and an enforced workload's outbound
    // policy is default deny too (it may reach db only on 5432).
    lab.set_state(Host::Db, "idle").expect("pce workload set db --state idle");
    lab.wait_for_policy(&[Host::Db], "idle", lab.options().policy_timeout)
        .unwrap_or_else(|e| panic!("db going back to idle: {e}"));
    let verdict = lab.probe(Host::Pce, Host::Db, 22).expect("probe pce -> db:22");
    assert!(
        verdict.connected(),
        "with db idle, pce -> db:22 should connect (db's firewall removed), was {verdict}"
    );
    let verdict = lab.probe(Host::Web, Host::Db, 5432).expect("probe web -> db:5432");
    assert!(verdict.connected(), "with db idle, web -> db:5432 should still connect, was {verdict}");

    // Then web: with both idle, no firewall is left and everything that was dropped connects.
    lab.set_state(Host::Web, "idle").expect("pce workload set web --state idle");
    lab.wait_for_policy(&[Host::Web], "idle", lab.options().policy_timeout)
        .unwrap_or_else(|e| panic!("web going back to idle: {e}"));
    for (from, to, port) in [(Host::Web, Host::Db, 22), (Host::Db, Host::Web, 5432)] {
        let verdict =
            lab.probe(from, to, port).unwrap_or_else(|e| panic!("probe {from} -> {to}:{port}: {e}"));
        assert!(
            verdict.connected(),
            "with both idle, {from} -> {to}:{port} should connect again, was {verdict}"
        );
    }

    // `ven check-env` on a paired host: every check passes, the PCE's certificate verifies
    // against the pinned CA; with the PCE gone, that check fails and so does the command.
    let checked = lab.ven(Host::Db, &["check-env"]).expect("ven check-env");
    assert!(checked.success(), "check-env on db:\n{}{}", checked.stdout, checked.stderr);
    assert!(checked.stdout.contains("certificate verified by the pinned CA"), "{}", checked.stdout);
    lab.stop_pce().expect("stop the PCE");
    let checked = lab.ven(Host::Db, &["check-env"]).expect("ven check-env");
    assert!(!checked.success(), "with the PCE down check-env must fail:\n{}", checked.stdout);
    assert!(checked.stdout.lines().any(|l| l.starts_with("fail  PCE API")), "{}", checked.stdout);
}

#[test]
fn activation_failures_are_clear_and_leave_no_identity() {
    let Some(bins) = prerequisites("activation_failures_are_clear_and_leave_no_identity") else {
        return;
    };
    let mut lab = Lab::new(bins, LabOptions { name_prefix: "venact".into(), ..LabOptions::default() })
        .expect("building the lab");
    let pairing = lab.start_pce().unwrap_or_else(|e| panic!("starting the PCE: {e}"));
    let data_dir = lab.data_dir(Host::Web);
    let server = management_server();

    let wrong_code = lab.try_activate(Host::Web, &server, "wrong-activation-code", &pairing.ca_fingerprint);
    let wrong_code = wrong_code.unwrap_or_else(|e| panic!("activation with a wrong code did not end: {e}"));
    assert_failed_clearly(&wrong_code, &["activation", "code", "reject", "denied", "unauthori", "invalid"]);
    assert_no_identity(&lab, &data_dir, "after a wrong activation code");

    // Port 9 on the PCE host: nothing listens there, the connection is refused.
    let closed = format!("{}:9", Host::Pce.address());
    let no_server = lab.try_activate(Host::Web, &closed, &pairing.activation_code, &pairing.ca_fingerprint);
    let no_server = no_server.unwrap_or_else(|e| panic!("activation against a closed port did not end: {e}"));
    assert_failed_clearly(&no_server, &["refused", "connect", "unreachable", &closed]);
    assert_no_identity(&lab, &data_dir, "after activating against a closed port");

    let zeros = "0".repeat(64);
    let wrong_ca = lab.try_activate(Host::Web, &server, &pairing.activation_code, &zeros);
    let wrong_ca =
        wrong_ca.unwrap_or_else(|e| panic!("activation with a wrong CA fingerprint did not end: {e}"));
    assert_failed_clearly(&wrong_ca, &["fingerprint", "certificate", "tls", "trust", "issuer", "handshake"]);
    assert_no_identity(&lab, &data_dir, "after a wrong CA fingerprint");

    // The failures used nothing up: the right material still pairs, and then there is an identity.
    let done = lab.activate(Host::Web).unwrap_or_else(|e| panic!("activation with the right material: {e}"));
    assert!(done.success());
    let status = lab.ven_status(Host::Web).unwrap_or_else(|e| panic!("ven status after activation: {e}"));
    assert!(status.activated, "after a successful activation: {status:?}");
    assert!(
        !identity_files(&data_dir).is_empty(),
        "a successful activation should leave an identity file (state/identity) in {}",
        data_dir.display()
    );
}

/// Non-zero exit, a message on stderr naming the problem (one of `words`), no panic.
fn assert_failed_clearly(done: &Captured, words: &[&str]) {
    assert!(!done.success(), "`{}` should fail, but exited 0; stdout: {}", done.command, done.stdout);
    let message = done.stderr.trim();
    assert!(!message.is_empty(), "`{}` failed ({}) without a message on stderr", done.command, done.status);
    assert!(!message.contains("panicked"), "`{}` panicked: {message}", done.command);
    let lower = message.to_lowercase();
    assert!(
        words.iter().any(|w| lower.contains(&w.to_lowercase())),
        "`{}` failed, but its message names none of {words:?}: {message}",
        done.command
    );
    eprintln!("as expected, `{}` failed: {message}", done.command);
}

fn assert_no_identity(lab: &Lab, data_dir: &Path, when: &str) {
    let found = identity_files(data_dir);
    assert!(found.is_empty(), "{when}: identity written: {found:?}");
    // Whatever else `ven status` says without an identity, it must not claim a pairing.
    if let Ok(status) = lab.ven_status(Host::Web) {
        assert!(!status.activated, "{when}: `ven status --json` says activated: {status:?}");
    }
}

/// Files under `dir` named like an identity (`state/identity` in the data dir layout).
fn identity_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    // Bounded walk: a fresh data dir holds a handful of entries.
    let mut budget = 10_000;
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            budget -= 1;
            if budget == 0 {
                return found;
            }
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => pending.push(path),
                Ok(_) if entry.file_name().to_string_lossy().contains("identity") => found.push(path),
                _ => {}
            }
        }
    }
    found
}

/// Waits (bounded) until web -> db:5432 is `connects`; the wait names `why`.
fn wait_for_web_to_db(lab: &Lab, connects: bool, why: &str, limit: Duration) {
    let what = format!("web -> db:5432 {} ({why})", if connects { "connecting" } else { "blocked" });
    let waited = lab.wait_until(&what, limit, |lab| {
        let verdict = lab.probe(Host::Web, Host::Db, 5432)?;
        Ok((verdict.connected() != connects).then(|| format!("probe: {verdict}")))
    });
    if let Err(e) = waited {
        panic!("{e}");
    }
}

fn event_count(lab: &Lab, event_type: &str, host: &str) -> usize {
    let events = lab.events().expect("pce events");
    events.iter().filter(|e| e.event_type == event_type && e.hostname.as_deref() == Some(host)).count()
}

/// The spec's isolation, with real traffic: a workload that stops (goodbye) or falls silent (12
/// missed heartbeats; an event after 3) leaves its peers' policies, so db stops admitting web;
/// when web's agent is back, so is its access.
#[test]
fn a_stopped_or_silent_workload_is_isolated_and_welcomed_back() {
    let Some(bins) = prerequisites("a_stopped_or_silent_workload_is_isolated_and_welcomed_back") else {
        return;
    };
    // One-second heartbeats: silence is noticed after 3 s and isolated after 12 s.
    let opts =
        LabOptions { name_prefix: "veniso".into(), heartbeat_interval: Some(1), ..LabOptions::default() };
    let mut lab = Lab::new(bins, opts).expect("building the lab");
    let report = scenario::run_demo(&mut lab, &mut say).unwrap_or_else(|e| panic!("the demo failed: {e}"));
    assert!(report.all_as_expected(), "the demo's probes");
    let limit = Duration::from_secs(30);

    // Goodbye: isolated at once.
    lab.stop_agent(Host::Web).expect("stop web's agent");
    wait_for_web_to_db(&lab, false, "web said goodbye", limit);
    assert!(event_count(&lab, "workload_offline", "web") >= 1, "the PCE records web going offline");
    lab.start_agent(Host::Web).expect("start web's agent");
    wait_for_web_to_db(&lab, true, "web is back", limit);

    // Silence (a crash: no goodbye): a warning after three heartbeats, isolation after twelve.
    lab.kill_agent(Host::Web).expect("kill web's agent");
    let warned = lab.wait_until("the PCE warning of web's missed heartbeats", limit, |lab| {
        Ok((event_count(lab, "agent_missed_heartbeats", "web") == 0).then(|| "no event yet".to_string()))
    });
    if let Err(e) = warned {
        panic!("{e}");
    }
    wait_for_web_to_db(&lab, false, "web missed 12 heartbeats", limit);
    assert!(event_count(&lab, "workload_offline", "web") >= 2);
    lab.start_agent(Host::Web).expect("start web's agent again");
    wait_for_web_to_db(&lab, true, "web heartbeats again", limit);
    assert!(event_count(&lab, "workload_online", "web") >= 2);
}
