//! `ven connectivity-test`, `ven status --all` and `ven gen-supportreport` with the real `pce`
//! and `ven` binaries in the lab's namespaces (the demo: web may reach db on 5432/tcp, both
//! enforced; db listens on 5432 and 22). Needs root, iproute2, iptables, ipset and tar; skipped
//! loudly without them, a failure under CI=true. All traffic stays in 198.18.0.0/24.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

#[path = "support/report_check.rs"]
mod report_check;

use ven_lab::scenario::{self, Host};
use ven_lab::{Binaries, Lab, LabOptions};

fn prerequisites(test: &str) -> Option<Binaries> {
    ven_lab::binaries::for_end_to_end_test(
        test,
        env!("CARGO_BIN_EXE_ven"),
        &["iptables-save", "ipset", "tar"],
    )
}

/// A value planted in the agents' configuration under a secret-looking key.
const PLANTED_SECRET: &str = "planted-release-passphrase-0d9f";

#[test]
fn connectivity_test_status_all_and_support_report_on_an_enforced_workload() {
    let Some(bins) = prerequisites("connectivity_test_status_all_and_support_report_on_an_enforced_workload")
    else {
        return;
    };
    let opts = LabOptions {
        name_prefix: "vencli".into(),
        ven_config: Some(format!("signing_passphrase = {PLANTED_SECRET}\n")),
        ..LabOptions::default()
    };
    let mut lab = Lab::new(bins, opts).expect("building the lab");
    let report = scenario::run_demo(&mut lab, &mut |line| eprintln!("{line}"))
        .unwrap_or_else(|e| panic!("the demo failed: {e}"));
    assert!(report.probes.iter().all(|p| p.ok()), "demo probes: {:?}", report.probes);
    let db = Host::Db.address().to_string();
    let (allowed, dropped) = (format!("{db}:5432"), format!("{db}:22"));

    // An allowed port and a dropped one: the allowing rule, the default deny, a failing exit.
    let both = lab.ven(Host::Web, &["connectivity-test", &allowed, &dropped]).expect("connectivity-test");
    let text = format!("{}{}", both.stdout, both.stderr);
    eprintln!("--- web: ven connectivity-test {allowed} {dropped} ---\n{text}");
    assert_eq!(both.status.code(), Some(1), "a dropped peer fails the command:\n{text}");
    let line = |target: &str| {
        text.lines().find(|l| l.contains(target)).unwrap_or_else(|| panic!("no line for {target}:\n{text}"))
    };
    assert!(line("PCE API").starts_with("ok"), "the PCE is reachable through the policy:\n{text}");
    assert!(line("PCE events").starts_with("ok"), "{text}");
    let ok = line(&allowed);
    assert!(ok.starts_with("ok") && ok.contains("connected") && ok.contains("allowed by rule"), "{text}");
    let fail = line(&dropped);
    assert!(fail.starts_with("fail") && fail.contains("dropped by the default deny"), "{text}");
    assert!(text.contains("a rule on the PCE must allow it"), "the hint for a dropped peer:\n{text}");
    // UDP is judged only; the allowed port alone passes.
    let udp = lab.ven(Host::Web, &["connectivity-test", &format!("{db}:53/udp")]).expect("udp");
    assert!(udp.stdout.contains("cannot be verified without an answer"), "{}", udp.stdout);
    assert_eq!(udp.status.code(), Some(0), "{}", udp.stdout);
    let one = lab.ven(Host::Web, &["connectivity-test", &allowed]).expect("connectivity-test");
    assert_eq!(one.status.code(), Some(0), "only the allowed peer:\n{}{}", one.stdout, one.stderr);
    let bad = lab.ven(Host::Web, &["connectivity-test", "db:99999"]).expect("bad target");
    assert_eq!(bad.status.code(), Some(2), "a bad argument is a usage error: {}", bad.stderr);

    // status --all: every component of a running agent, the event channel up, policy in sync.
    let all = lab.ven(Host::Web, &["status", "--all"]).expect("status --all");
    assert!(all.success(), "{}", all.stderr);
    eprintln!("--- web: ven status --all ---\n{}", all.stdout);
    for component in ["AgentManager", "EventSync", "PlatformHandler", "VtapServer", "AgentLogManager"] {
        let line = all.stdout.lines().find(|l| l.trim_start().starts_with(component));
        let line = line.unwrap_or_else(|| panic!("no {component} in:\n{}", all.stdout));
        assert!(line.contains("running"), "{component} should run:\n{}", all.stdout);
    }
    assert!(all.stdout.contains("in sync with the PCE"), "{}", all.stdout);
    assert!(all.stdout.contains("event channel:   up since"), "{}", all.stdout);
    assert!(all.stdout.contains("rows waiting for the PCE"), "the flow store's figures: {}", all.stdout);
    let json = lab.ven(Host::Web, &["status", "--all", "--json"]).expect("status --all --json");
    assert!(json.stdout.contains(r#""policy_in_sync":true"#), "{}", json.stdout);
    assert!(json.stdout.contains(r#""flow_store":{"bytes":"#), "{}", json.stdout);
    assert!(
        json.stdout.contains(r#""name":"VtapServer","thread":"flows","state":"running""#),
        "{}",
        json.stdout
    );

    // The support report: a tar the system's tar lists, mode 0600, with our chains and sets, and
    // neither the agent token, nor the activation code, nor the planted secret anywhere.
    let path = lab.workdir().join("web-report.tar");
    let path_text = path.to_str().expect("a UTF-8 work dir");
    let made = lab.ven(Host::Web, &["gen-supportreport", "--output", path_text]).expect("gen-supportreport");
    assert!(made.success(), "{}{}", made.stdout, made.stderr);
    assert!(made.stdout.contains("Support report written to"), "{}", made.stdout);
    let mode = std::fs::metadata(&path).expect("the report").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the report is root's only");
    let listed = report_check::listed_members(&path);
    let member = |name: &str| {
        let full = listed.lines().find(|l| l.ends_with(&format!("/{name}"))).expect("listed");
        let out = Command::new("tar").arg("-xOf").arg(&path).arg(full).output().expect("tar -xOf");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let iptables = member("firewall/iptables-save.txt");
    assert!(iptables.contains(":VEN-OUTPUT") && iptables.contains("-j VEN-INPUT"), "{iptables}");
    assert!(member("firewall/ipset-list.txt").contains("Name: ven-"), "our sets");
    assert!(member("status.json").contains(r#""components":["#));
    assert!(member("config.txt").contains("signing_passphrase = [redacted]"));

    let bytes = std::fs::read(&path).expect("read the report");
    report_check::assert_no_secrets(&lab, Host::Web, &bytes, &[("planted secret", PLANTED_SECRET)]);

    // With the PCE gone: the event channel goes down and says why, and connectivity-test fails on
    // the PCE while the policy still lets the allowed peer through.
    lab.stop_pce().expect("stop the PCE");
    let down =
        lab.wait_until("web's event channel reported down", std::time::Duration::from_secs(20), |lab| {
            let json = lab.ven(Host::Web, &["status", "--all", "--json"])?;
            Ok((!json.stdout.contains(r#""name":"EventSync","thread":"evsync","state":"degraded""#))
                .then_some(json.stdout))
        });
    down.unwrap_or_else(|e| panic!("{e}"));
    let all = lab.ven(Host::Web, &["status", "--all"]).expect("status --all");
    assert!(all.stdout.contains("event channel:   down:"), "{}", all.stdout);
    assert!(
        all.stdout.lines().any(|l| l.trim_start().starts_with("event channel ")),
        "a last error:\n{}",
        all.stdout
    );
    let offline = lab.ven(Host::Web, &["connectivity-test", &allowed]).expect("connectivity-test");
    assert_eq!(offline.status.code(), Some(1), "{}", offline.stdout);
    assert!(offline.stdout.lines().any(|l| l.starts_with("fail  PCE API")), "{}", offline.stdout);
    assert!(
        offline.stdout.lines().any(|l| l.starts_with("ok") && l.contains(&allowed)),
        "{}",
        offline.stdout
    );
}
