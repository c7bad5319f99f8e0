//! End to end, the AgentMonitor: a worker thread of the running agent that fails is counted,
//! reported to the PCE and started again with backoff, while the firewall stays in force. The
//! failure comes from the configuration's test-only fault switch (`test_fault`), which makes the
//! named thread panic (this test's debug build unwinds) or end at its first starts. Needs root
//! and iproute2, iptables and ipset; skipped loudly without them, a failure under CI=true.
//!
//! All traffic stays inside the lab's namespaces (198.18.0.0/24).

use std::time::Duration;

use ven_lab::scenario::{self, Host};
use ven_lab::{Binaries, Lab, LabError, LabOptions};

fn prerequisites(test: &str) -> Option<Binaries> {
    ven_lab::binaries::for_end_to_end_test(test, env!("CARGO_BIN_EXE_ven"), &["iptables-save", "ipset"])
}

fn must<T>(result: Result<T, LabError>, what: &str) -> T {
    result.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Long enough for two restarts (1 s, then 2 s of backoff) and the events' heartbeat.
const REACT: Duration = Duration::from_secs(20);

fn faulty_lab(prefix: &str, fault: &str, bins: Binaries) -> Lab {
    let opts = LabOptions {
        name_prefix: prefix.into(),
        ven_config: Some(format!("test_fault = {fault}\n")),
        ..LabOptions::default()
    };
    let mut lab = Lab::new(bins, opts).expect("building the lab");
    let report = scenario::run_demo(&mut lab, &mut |line| eprintln!("{line}")).expect("the demo");
    let unexpected: Vec<String> =
        report.baseline.iter().chain(&report.probes).filter(|p| !p.ok()).map(|p| p.to_string()).collect();
    assert!(unexpected.is_empty(), "demo probes not as expected: {unexpected:#?}");
    lab
}

/// Waits until `host`'s agent shows `name` running after `restarts` restarts.
fn wait_restarted(lab: &Lab, host: Host, name: &str, restarts: u64) {
    let done = lab.wait_until(&format!("{name} restarted {restarts} times and running"), REACT, |lab| {
        let status = lab.ven_status(host)?;
        let component = status.workers.iter().find(|(n, _, _)| n == name);
        Ok(match component {
            Some((_, state, n)) if state == "running" && *n == restarts => None,
            _ => Some(format!("components: {:?}", status.workers)),
        })
    });
    must(done, "the monitor's restarts");
}

/// Waits until the PCE holds `count` `agent_component_restarted` events of `host` for `name`.
fn wait_reported(lab: &Lab, host: &str, name: &str, count: usize) {
    let done = lab.wait_until(&format!("{count} restart events of {name} on the PCE"), REACT, |lab| {
        let events: Vec<_> = lab
            .events()?
            .into_iter()
            .filter(|e| {
                e.event_type == "agent_component_restarted"
                    && e.hostname.as_deref() == Some(host)
                    && e.details["component"] == name
            })
            .collect();
        Ok(if events.len() >= count { None } else { Some(format!("{events:#?}")) })
    });
    must(done, "restart events");
}

#[test]
fn a_panicking_flows_thread_is_restarted_and_reported_and_the_firewall_stays() {
    let Some(bins) =
        prerequisites("a_panicking_flows_thread_is_restarted_and_reported_and_the_firewall_stays")
    else {
        return;
    };
    let lab = faulty_lab("venmon-flows", "flows:panic:2", bins);
    wait_restarted(&lab, Host::Db, "flows", 2);
    wait_reported(&lab, "db", "flows", 2);
    let status = must(lab.ven_status(Host::Db), "ven status");
    // The restarted pipeline reads its NFLOG group again.
    let reading = lab.wait_until("db's flows thread reading NFLOG again", REACT, |lab| {
        let status = lab.ven_status(Host::Db)?;
        Ok(if status.flows.is_some_and(|(reading, _, _)| reading) {
            None
        } else {
            Some(format!("{status:?}"))
        })
    });
    must(reading, "flows after the restarts");
    // The other workers never failed; the policy stayed in force throughout.
    for (name, state, restarts) in &status.workers {
        if name != "flows" {
            assert_eq!((state.as_str(), *restarts), ("running", 0), "{name}: {:?}", status.workers);
        }
    }
    assert_eq!(status.policy_state.as_deref(), Some("enforced"), "{status:?}");
    let allowed = must(lab.probe(Host::Web, Host::Db, 5432), "probe web -> db:5432");
    assert!(allowed.connected(), "web -> db:5432 should connect after the restarts: {allowed}");
    must(lab.listen(Host::Db, 7000), "listening on db:7000");
    let blocked = must(lab.probe(Host::Pce, Host::Db, 7000), "probe pce -> db:7000");
    assert!(!blocked.connected(), "db still enforces after the restarts: {blocked}");
    let text = must(lab.ven_status_text(Host::Db), "ven status");
    assert!(text.contains("thread:          flows running, restarted 2 times"), "ven status:\n{text}");
    assert!(text.contains("panicked: test_fault"), "ven status names the cause:\n{text}");
    let all = must(lab.ven(Host::Db, &["status", "--all"]), "ven status --all").stdout;
    let line = all.lines().find(|l| l.trim_start().starts_with("VtapServer")).unwrap_or_default();
    assert!(
        line.contains("degraded") && line.contains("thread restarted 2 times"),
        "ven status --all:\n{all}"
    );
}

#[test]
fn an_event_thread_that_ends_is_restarted_and_carries_bolts_again() {
    let Some(bins) = prerequisites("an_event_thread_that_ends_is_restarted_and_carries_bolts_again") else {
        return;
    };
    let lab = faulty_lab("venmon-evs", "evsync:1", bins);
    wait_restarted(&lab, Host::Db, "evsync", 1);
    wait_reported(&lab, "db", "evsync", 1);
    // The restarted event channel carries lightning bolts again: a policy change reaches db
    // without waiting for the PCE's 5-minute heartbeat.
    let status = must(lab.ven_status(Host::Db), "ven status");
    let before = status.policy_version.unwrap_or(0);
    must(lab.pce(&["workload", "set", "db", "--state", "test"]), "pce workload set db --state test");
    let changed = lab.wait_until("db's new policy through the restarted event channel", REACT, |lab| {
        let status = lab.ven_status(Host::Db)?;
        Ok(match (status.policy_state.as_deref(), status.policy_version) {
            (Some("test"), Some(v)) if v > before => None,
            _ => Some(format!("{status:?}")),
        })
    });
    must(changed, "the bolt after the restart");
}
