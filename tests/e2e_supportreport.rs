//! Support reports the PCE asks for, end to end with the real binaries in the lab's namespaces:
//! `pce support-report request web` reaches web's agent as a lightning bolt, the agent builds the
//! report (`ven gen-supportreport`'s code) and uploads it, and `pce support-report get` writes a
//! tar that the system's tar lists with the expected members and that holds neither the agent's
//! token nor the activation code. A request made while the agent is stopped is answered when it
//! comes back (the heartbeat answer and the new event session carry it). Bad input is refused with
//! a clear error. Needs root, iproute2, iptables, ipset and tar; skipped loudly without them.

use std::time::Duration;

#[path = "support/report_check.rs"]
mod report_check;

use ven_lab::scenario::Host;
use ven_lab::{Binaries, Lab, LabOptions};

fn prerequisites(test: &str) -> Option<Binaries> {
    ven_lab::binaries::for_end_to_end_test(
        test,
        env!("CARGO_BIN_EXE_ven"),
        &["iptables-save", "ipset", "tar"],
    )
}

/// Waits until web's agent is online with its event channel up.
fn wait_connected(lab: &Lab) {
    let connected = lab.wait_until("web online with its event channel up", Duration::from_secs(30), |lab| {
        let json = lab.ven(Host::Web, &["status", "--all", "--json"])?.stdout;
        let up = json.contains(r#""connectivity":"online""#)
            && json.contains(r#""event_channel":{"connected":true"#);
        Ok((!up).then_some(json))
    });
    connected.unwrap_or_else(|e| panic!("{e}\n{}", lab.diagnostics()));
}

/// The reports the PCE holds: (id, hostname), oldest first.
fn reports(lab: &Lab) -> Vec<(u64, String)> {
    let listed = lab.support_reports().expect("pce support-report list --json");
    listed.into_iter().map(|r| (r.id, r.hostname)).collect()
}

fn wait_reports(lab: &Lab, count: usize) -> Vec<(u64, String)> {
    let arrived =
        lab.wait_until(&format!("{count} support report(s) at the PCE"), Duration::from_secs(90), |lab| {
            let listed = reports(lab);
            Ok((listed.len() < count).then(|| format!("{listed:?}")))
        });
    arrived.unwrap_or_else(|e| panic!("{e}\n{}", lab.diagnostics()));
    reports(lab)
}

#[test]
fn the_pce_asks_for_a_support_report_and_gets_one_without_secrets() {
    let Some(bins) = prerequisites("the_pce_asks_for_a_support_report_and_gets_one_without_secrets") else {
        return;
    };
    let opts = LabOptions { name_prefix: "venrep".into(), ..LabOptions::default() };
    let mut lab = Lab::new(bins, opts).expect("building the lab");
    lab.start_pce().expect("start the PCE");
    lab.activate(Host::Web).expect("activate web");
    lab.start_agent(Host::Web).expect("start web's agent");
    wait_connected(&lab);

    // Bad input first: nothing to ask, nothing to get, and nothing stored.
    let nobody = lab.run(lab.pce_command(&["support-report", "request", "nosuchhost"])).expect("run pce");
    assert!(!nobody.success(), "an unknown workload is an error: {}", nobody.stdout);
    assert!(nobody.stderr.contains("no workload"), "a clear error: {}", nobody.stderr);
    let output = lab.workdir().join("web-report.tar");
    let output_text = output.to_str().expect("a UTF-8 work dir");
    let missing = lab
        .run(lab.pce_command(&["support-report", "get", "999", "--output", output_text]))
        .expect("run pce");
    assert!(!missing.success() && missing.stderr.contains("404"), "{}", missing.stderr);
    assert!(!output.exists(), "nothing written for a report that does not exist");
    assert!(reports(&lab).is_empty());

    // The bolt: the agent is connected, so the request goes as one.
    let asked = lab.pce(&["support-report", "request", "web"]).expect("pce support-report request web");
    assert!(asked.stdout.contains("delivery: lightning_bolt"), "{}", asked.stdout);
    let listed = wait_reports(&lab, 1);
    assert_eq!(listed[0].1, "web");
    let id = listed[0].0.to_string();
    let got =
        lab.pce(&["support-report", "get", &id, "--output", output_text]).expect("pce support-report get");
    assert!(got.stdout.contains("written to"), "{}", got.stdout);
    report_check::listed_members(&output);
    let bytes = std::fs::read(&output).expect("the report");
    report_check::assert_no_secrets(&lab, Host::Web, &bytes, &[]);
    // Answered once: the request no longer waits, and no second report comes for it.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(reports(&lab).len(), 1, "one report per request");

    // Asked while the agent is stopped: no bolt can go, the request waits and is answered when
    // the agent is back.
    lab.stop_agent(Host::Web).expect("stop web's agent");
    let asked = lab.pce(&["support-report", "request", "web"]).expect("request while stopped");
    assert!(asked.stdout.contains("delivery: next_heartbeat"), "{}", asked.stdout);
    lab.start_agent(Host::Web).expect("start web's agent again");
    let listed = wait_reports(&lab, 2);
    assert!(listed.iter().all(|(_, host)| host == "web"), "{listed:?}");
}
