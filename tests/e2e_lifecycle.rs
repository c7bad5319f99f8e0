//! End to end, the VEN's life cycle with the real `pce` and `ven` binaries in the namespace lab:
//! suspend and unsuspend, tamper repair by the running agent, `deactivate --firewall saved|open`,
//! the boot-time `ven restore` with the firewall history, and a SIGKILL in the middle of an
//! apply. Needs root and iproute2 (and iptables, ip6tables, ipset); skipped loudly without them,
//! a failure under CI=true. The `pce` binary comes from `cargo build --workspace --bins` (or
//! PCE_BIN); `ven` is the one cargo built for this test (or VEN_BIN).
//!
//! All traffic stays inside the lab's namespaces (198.18.0.0/24); addresses used only as rule
//! and set contents are in 198.19.0.0/16 (the same benchmarking range) and 2001:db8::/32.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use ven_lab::firewall::{self, FirewallDump};
use ven_lab::process::{Captured, KillOutcome};
use ven_lab::scenario::{self, Host, find_workload};
use ven_lab::{Binaries, Lab, LabError, LabOptions};
use ven_proto::{Direction, IpNet, IpSet, Peers, Policy, PortRange, Protocol, Rule};

/// The binaries, or `None` (after saying why) when this machine cannot run the test.
fn prerequisites(test: &str) -> Option<Binaries> {
    ven_lab::binaries::for_end_to_end_test(
        test,
        env!("CARGO_BIN_EXE_ven"),
        &["iptables-save", "ip6tables-save", "ipset"],
    )
}

/// How long the agents get to react to something (a repair, a notice, a heartbeat).
const REACT: Duration = Duration::from_secs(10);
/// Agent configuration with tamper checks every second (quick) and every 2 s (full).
const FAST_CHECKS: &str = "canary_interval_s = 1\ntamper_check_interval_s = 2\n";
/// A port no policy rule opens; db listens on it and a custom rule opens it.
const CUSTOM_PORT: u16 = 9000;
/// A port db listens on that neither the policy nor the fail-safe services (tcp/22 on a generic
/// host) open: enforced, it is dropped.
const CLOSED_PORT: u16 = 7000;
/// The custom rule of the suspend test (iptables syntax, both families).
const CUSTOM_RULE: &str = "-p tcp --dport 9000 -j ACCEPT";

fn lab(bins: Binaries, prefix: &str, opts: LabOptions) -> Lab {
    Lab::new(bins, LabOptions { name_prefix: prefix.into(), ..opts }).expect("building the lab")
}

/// The README's demo: web may reach db on 5432/tcp, both enforced. Panics unless every probe
/// was as expected.
fn enforce_web_and_db(lab: &mut Lab) {
    let report = scenario::run_demo(lab, &mut |line| eprintln!("{line}"))
        .unwrap_or_else(|e| panic!("the demo failed: {e}"));
    let unexpected: Vec<String> =
        report.baseline.iter().chain(&report.probes).filter(|p| !p.ok()).map(|p| p.to_string()).collect();
    assert!(unexpected.is_empty(), "demo probes not as expected: {unexpected:#?}");
    must(lab.listen(Host::Db, CLOSED_PORT), "listening on db:7000");
    expect_probe(lab, Host::Pce, Host::Db, CLOSED_PORT, false, "db enforced");
}

/// `result`'s value, or a panic naming `what` and the lab error.
fn must<T>(result: Result<T, LabError>, what: &str) -> T {
    result.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// A one-shot command that must have exited 0.
fn succeeded(done: Captured) -> Captured {
    assert!(
        done.success(),
        "`{}` failed ({}):\nstdout: {}\nstderr: {}",
        done.command,
        done.status,
        done.stdout,
        done.stderr
    );
    done
}

/// One TCP probe that must connect (`connect`) or must not.
fn expect_probe(lab: &Lab, from: Host, to: Host, port: u16, connect: bool, when: &str) {
    let verdict = must(lab.probe(from, to, port), &format!("probe {from} -> {to}:{port}"));
    let wanted = if connect { "connect" } else { "be blocked" };
    assert_eq!(verdict.connected(), connect, "{when}: {from} -> {to}:{port} should {wanted}, was {verdict}");
}

/// Waits (bounded) until `check` holds on `host`'s firewall; the last dump is in the failure.
fn wait_for_firewall(
    lab: &Lab,
    host: Host,
    what: &str,
    limit: Duration,
    check: impl Fn(&FirewallDump) -> Result<(), String>,
) {
    let waited = lab.wait_until(what, limit, |lab| Ok(check(&lab.firewall(host)?).err()));
    if let Err(e) = waited {
        panic!("{e}");
    }
}

/// Rule hashes of ven's chains in one family's `*-save` output, chain by chain.
fn ven_hashes(save: &str) -> Vec<(String, Vec<String>)> {
    firewall::chains(save)
        .into_iter()
        .filter(|chain| chain.starts_with(firewall::CHAIN_PREFIX))
        .map(|chain| {
            let hashes = firewall::rule_hashes(save, &chain);
            (chain, hashes)
        })
        .collect()
}

/// ven's sets in `ipset save` output, normalised (name, type, family, members).
fn ven_sets(ipsets: &str) -> String {
    let ours: String = ipsets
        .lines()
        .filter(|line| {
            line.split_whitespace().nth(1).is_some_and(|name| name.starts_with(firewall::SET_PREFIX))
        })
        .map(|line| format!("{line}\n"))
        .collect();
    firewall::normalize_ipsets(&ours)
}

fn assert_no_ven_objects(dump: &FirewallDump, when: &str) {
    let left = dump.ven_objects();
    assert!(left.is_empty(), "{when}: ven's objects are still there: {left:#?}\n{}{}", dump.v4, dump.ipsets);
}

// ---------------------------------------------------------------------------------------------

#[test]
fn suspend_and_unsuspend_restore_policy_and_custom_rules() {
    let Some(bins) = prerequisites("suspend_and_unsuspend_restore_policy_and_custom_rules") else {
        return;
    };
    // Fast tamper checks: a suspended agent must not take them for tampering and "repair".
    let mut lab =
        lab(bins, "venlc-susp", LabOptions { ven_config: Some(FAST_CHECKS.into()), ..LabOptions::default() });
    enforce_web_and_db(&mut lab);
    must(lab.listen(Host::Db, CUSTOM_PORT), "listening on db:9000");
    // The PCE host runs no agent: what it reaches on db is db's input policy alone. (web's own
    // enforced outbound policy only lets it reach db on 5432, so web cannot tell db's input
    // rules on other ports apart.)
    expect_probe(&lab, Host::Pce, Host::Db, CUSTOM_PORT, false, "enforced, before the custom rule");

    let before = find_workload(&must(lab.workloads(), "pce workload list"), Host::Db)
        .and_then(|w| w.policy_version)
        .expect("db has a policy version");
    must(
        lab.pce(&[
            "workload",
            "custom-rule",
            "add",
            "db",
            "--chain",
            "input",
            "--family",
            "both",
            "--rule",
            CUSTOM_RULE,
        ]),
        "pce workload custom-rule add db",
    );
    let carried = lab.wait_until("db carrying the policy with its custom rule", REACT, |lab| {
        let workload = find_workload(&lab.workloads()?, Host::Db).cloned();
        let agent = lab.ven_status(Host::Db)?;
        Ok(match workload {
            Some(w) if w.policy_version > Some(before) && agent.policy_version == w.policy_version => None,
            other => Some(format!("PCE {other:?}, agent {agent:?}")),
        })
    });
    must(carried, "the custom rule reaching db");
    let with_custom = must(lab.firewall(Host::Db), "db's firewall");
    for (family, save) in [("v4", &with_custom.v4), ("v6", &with_custom.v6)] {
        let custom = firewall::chain_rules(save, "VEN-CUSTOM-IN");
        assert!(
            custom.iter().any(|rule| rule.contains("--dport 9000") && rule.contains("-j ACCEPT")),
            "{family}: VEN-CUSTOM-IN should hold the custom rule: {custom:#?}\n{save}"
        );
    }
    expect_probe(&lab, Host::Pce, Host::Db, CUSTOM_PORT, true, "with the custom rule");
    expect_probe(&lab, Host::Pce, Host::Db, CLOSED_PORT, false, "enforced (no rule opens db:7000)");

    // Suspend: everything of ven's goes, custom rules included; the PCE is told.
    let suspended_at = Instant::now();
    let suspended = succeeded(must(lab.ven(Host::Db, &["suspend"]), "ven suspend"));
    assert!(
        suspended.stdout.contains("The VEN has been suspended. PCE was notified."),
        "ven suspend said: {}",
        suspended.stdout
    );
    let workloads = must(lab.workloads(), "pce workload list");
    let db = find_workload(&workloads, Host::Db).expect("db on the PCE");
    assert_eq!(db.agent_status.as_deref(), Some("suspended"), "the PCE's view of db: {db:?}");
    let dump = must(lab.firewall(Host::Db), "db's firewall");
    assert_no_ven_objects(&dump, "after ven suspend");
    expect_probe(&lab, Host::Pce, Host::Db, CLOSED_PORT, true, "suspended (nothing of ven's enforces)");
    expect_probe(&lab, Host::Pce, Host::Db, CUSTOM_PORT, true, "suspended");
    // A suspended VEN stays in its peers' policies: web (still enforced) may still reach it.
    expect_probe(&lab, Host::Web, Host::Db, 5432, true, "db suspended, web enforced");
    let status = must(lab.ven_status(Host::Db), "ven status --json");
    assert_eq!(status.connectivity.as_deref(), Some("suspended"), "{status:?}");
    // Several full tamper checks later, the agent has put nothing back and counted nothing.
    std::thread::sleep(Duration::from_secs(5).saturating_sub(suspended_at.elapsed()));
    assert_no_ven_objects(&must(lab.firewall(Host::Db), "db's firewall"), "5 s after ven suspend");
    let status = must(lab.ven_status(Host::Db), "ven status --json");
    assert_eq!(status.tamper_count, Some(0), "a suspended firewall is not tampering: {status:?}");
    let again = must(lab.ven(Host::Db, &["suspend"]), "ven suspend, twice");
    assert!(
        !again.success() && again.stderr.contains("already suspended"),
        "a second suspend should fail and say so: {again:?}"
    );

    // Unsuspend: the same policy and custom rule, rule for rule, and the PCE is told.
    let unsuspended = succeeded(must(lab.ven(Host::Db, &["unsuspend"]), "ven unsuspend"));
    assert!(
        unsuspended.stdout.contains("The VEN has been unsuspended. PCE was notified."),
        "ven unsuspend said: {}",
        unsuspended.stdout
    );
    let back = must(lab.firewall(Host::Db), "db's firewall");
    assert_eq!(ven_hashes(&back.v4), ven_hashes(&with_custom.v4), "v4 chains after unsuspend\n{}", back.v4);
    assert_eq!(ven_hashes(&back.v6), ven_hashes(&with_custom.v6), "v6 chains after unsuspend\n{}", back.v6);
    assert_eq!(ven_sets(&back.ipsets), ven_sets(&with_custom.ipsets), "ven's sets after unsuspend");
    expect_probe(&lab, Host::Pce, Host::Db, CUSTOM_PORT, true, "unsuspended (custom rule back)");
    expect_probe(&lab, Host::Pce, Host::Db, CLOSED_PORT, false, "unsuspended (policy back)");
    expect_probe(&lab, Host::Web, Host::Db, 5432, true, "unsuspended");
    let online = lab.wait_until("db online again on the PCE and in ven status", REACT, |lab| {
        let workload = find_workload(&lab.workloads()?, Host::Db).cloned();
        let agent = lab.ven_status(Host::Db)?;
        Ok(match workload {
            Some(w)
                if w.online
                    && w.agent_status.as_deref() == Some("online")
                    && agent.connectivity.as_deref() == Some("online") =>
            {
                None
            }
            other => Some(format!("PCE {other:?}, agent {agent:?}")),
        })
    });
    must(online, "db back online");
    // The tamper checks run again: a flush of the custom chain is put back.
    must(lab.exec_ok(Host::Db, "iptables", &["-F", "VEN-CUSTOM-IN"]), "iptables -F VEN-CUSTOM-IN");
    let want = ven_hashes(&with_custom.v4);
    wait_for_firewall(&lab, Host::Db, "VEN-CUSTOM-IN repaired after unsuspend", REACT, |dump| {
        let now = ven_hashes(&dump.v4);
        if now == want { Ok(()) } else { Err(format!("ven's chains: {now:?}, want {want:?}")) }
    });

    let events = must(lab.events(), "pce events --json");
    let db_events: Vec<_> = events.iter().filter(|e| e.hostname.as_deref() == Some("db")).collect();
    let position = |kind: &str| db_events.iter().position(|e| e.event_type == kind);
    let (Some(suspend), Some(unsuspend)) = (position("server_suspended"), position("server_unsuspended"))
    else {
        panic!("pce events should hold server_suspended and server_unsuspended for db: {db_events:#?}");
    };
    assert!(suspend < unsuspend, "suspended before unsuspended: {db_events:#?}");
    assert_eq!(
        db_events[suspend].details["previous_state"], "enforced",
        "the suspension notice names the state db was in: {:?}",
        db_events[suspend]
    );
    let reasons: Vec<String> = must(lab.history(Host::Db), "ven history --json")
        .into_iter()
        .filter_map(|item| item.reason)
        .collect();
    let suspend_at = reasons.iter().rposition(|r| r == "suspend");
    let unsuspend_at = reasons.iter().rposition(|r| r == "unsuspend");
    assert!(
        matches!((suspend_at, unsuspend_at), (Some(s), Some(u)) if s < u),
        "ven history should list suspend, then unsuspend: {reasons:?}"
    );
}

#[test]
fn the_running_agent_repairs_tampering_and_reports_it() {
    let Some(bins) = prerequisites("the_running_agent_repairs_tampering_and_reports_it") else {
        return;
    };
    let opts = LabOptions { ven_config: Some(FAST_CHECKS.into()), ..LabOptions::default() };
    let mut lab = lab(bins, "venlc-tamp", opts);
    enforce_web_and_db(&mut lab);
    // The host's own rules: a chain of its own (Docker's), and a rule in INPUT after our jump.
    // Tamper repair must leave them exactly as they are.
    must(
        lab.sh(
            Host::Db,
            "iptables -N DOCKER-USER && iptables -A DOCKER-USER -s 198.19.0.0/16 -j RETURN && \
             iptables -A FORWARD -j DOCKER-USER && iptables -A INPUT -s 198.19.9.9/32 -j DROP",
        ),
        "adding foreign rules on db",
    );
    let intact = must(lab.firewall(Host::Db), "db's firewall");
    let foreign = firewall::without_ven(&intact.v4);
    let ours = ven_hashes(&intact.v4);
    let jump = "-A INPUT -m comment --comment \"ven:jump\" -j VEN-INPUT";
    assert_eq!(firewall::chain_rules(&intact.v4, "INPUT").first().map(String::as_str), Some(jump));
    let web = Host::Web.address().to_string();
    let db_set = firewall::set_names(&intact.ipsets)
        .into_iter()
        .find(|set| {
            set.starts_with(firewall::SET_PREFIX) && firewall::set_members(&intact.ipsets, set).contains(&web)
        })
        .unwrap_or_else(|| panic!("db's policy should hold web's address in a set:\n{}", intact.ipsets));
    let same_chains = |dump: &FirewallDump| {
        let now = ven_hashes(&dump.v4);
        if now == ours { Ok(()) } else { Err(format!("ven's chains: {now:?}, want {ours:?}")) }
    };

    // (a) Our chain flushed.
    must(lab.exec_ok(Host::Db, "iptables", &["-F", "VEN-INPUT"]), "iptables -F VEN-INPUT");
    wait_for_firewall(&lab, Host::Db, "VEN-INPUT repaired after a flush", REACT, same_chains);
    expect_probe(&lab, Host::Pce, Host::Db, CLOSED_PORT, false, "after repairing the flushed VEN-INPUT");
    expect_probe(&lab, Host::Web, Host::Db, 5432, true, "after repairing the flushed VEN-INPUT");

    // (b) Our jump deleted.
    must(
        lab.exec_ok(
            Host::Db,
            "iptables",
            &["-D", "INPUT", "-m", "comment", "--comment", "ven:jump", "-j", "VEN-INPUT"],
        ),
        "deleting the INPUT jump",
    );
    wait_for_firewall(&lab, Host::Db, "the INPUT jump back at position 1", REACT, |dump| {
        let input = firewall::chain_rules(&dump.v4, "INPUT");
        if input.first().map(String::as_str) == Some(jump) {
            Ok(())
        } else {
            Err(format!("INPUT: {input:?}"))
        }
    });
    expect_probe(&lab, Host::Pce, Host::Db, CLOSED_PORT, false, "after repairing the INPUT jump");

    // (c) A member taken out of our set: web's own address.
    must(lab.exec_ok(Host::Db, "ipset", &["del", &db_set, &web]), "ipset del");
    wait_for_firewall(&lab, Host::Db, "web's address back in db's set", REACT, |dump| {
        if firewall::set_members(&dump.ipsets, &db_set).contains(&web) {
            Ok(())
        } else {
            Err(format!("{db_set}: {:?}", firewall::set_members(&dump.ipsets, &db_set)))
        }
    });
    expect_probe(&lab, Host::Web, Host::Db, 5432, true, "after repairing db's set");

    // Counted, reported to the PCE, recorded in the history.
    let status = must(lab.ven_status(Host::Db), "ven status --json");
    assert!(status.tamper_count.unwrap_or(0) >= 3, "ven status should count 3 repairs: {status:?}");
    assert!(status.last_tamper.is_some(), "ven status should say what the last tampering was: {status:?}");
    let reported = lab.wait_until("3 tampering events for db on the PCE", REACT, |lab| {
        let tampering: Vec<_> = lab
            .events()?
            .into_iter()
            .filter(|e| e.event_type == "tampering" && e.hostname.as_deref() == Some("db"))
            .collect();
        Ok(if tampering.len() >= 3 { None } else { Some(format!("{tampering:#?}")) })
    });
    must(reported, "tampering events");
    for event in must(lab.events(), "pce events --json").iter().filter(|e| e.event_type == "tampering") {
        assert_eq!(event.details["repaired"], true, "every tampering was repaired: {event:?}");
    }
    let repairs = must(lab.history(Host::Db), "ven history --json")
        .iter()
        .filter(|i| i.reason.as_deref() == Some("tamper_repair"))
        .count();
    assert!(repairs >= 3, "ven history should list 3 tamper_repair entries, has {repairs}");
    let table = succeeded(must(lab.ven(Host::Db, &["history"]), "ven history"));
    assert!(table.stdout.contains("tamper_repair"), "ven history:\n{}", table.stdout);

    // The host's own rules came through every repair byte for byte.
    let after = must(lab.firewall(Host::Db), "db's firewall");
    assert_eq!(
        firewall::without_ven(&after.v4),
        foreign,
        "foreign rules changed by the repairs:\n{}",
        after.v4
    );
    assert_eq!(firewall::chain_rules(&after.v4, "INPUT").first().map(String::as_str), Some(jump));
}

#[test]
fn deactivate_saved_restores_the_pre_activation_firewall() {
    let Some(bins) = prerequisites("deactivate_saved_restores_the_pre_activation_firewall") else {
        return;
    };
    let mut lab = lab(bins, "venlc-save", LabOptions::default());
    must(lab.start_pce(), "starting the PCE");
    // The host's own firewall before ven: several tables, both families, a set and a rule using it.
    for host in Host::AGENTS {
        must(
            lab.sh(
                host,
                "ipset create foreign-set hash:ip && ipset add foreign-set 198.19.3.1 && \
                 iptables -N FOREIGN-IN && \
                 iptables -A FOREIGN-IN -m set --match-set foreign-set src -j DROP && \
                 iptables -A FOREIGN-IN -s 198.19.1.0/24 -j DROP && iptables -A INPUT -j FOREIGN-IN && \
                 iptables -t nat -A POSTROUTING -s 198.19.2.0/24 -j RETURN && \
                 iptables -t mangle -A PREROUTING -s 198.19.5.0/24 -j RETURN && \
                 ip6tables -A INPUT -s 2001:db8:1::/48 -j DROP",
            ),
            &format!("the foreign firewall on {host}"),
        );
    }
    let db_before = must(lab.firewall(Host::Db), "db's firewall before activation");

    for host in Host::AGENTS {
        succeeded(must(lab.activate(host), "ven activate"));
        must(lab.start_agent(host), "starting the agent");
    }
    for (host, port) in scenario::LISTENERS.into_iter().chain([(Host::Db, CLOSED_PORT)]) {
        must(lab.listen(host, port), "listening");
    }
    must(lab.configure_policy(), "configuring the policy");
    for host in Host::AGENTS {
        must(lab.set_state(host, "enforced"), "enforcing");
    }
    must(lab.wait_for_policy(&Host::AGENTS, "enforced", lab.options().policy_timeout), "enforcement");
    expect_probe(&lab, Host::Web, Host::Db, 5432, true, "enforced");
    expect_probe(&lab, Host::Pce, Host::Db, CLOSED_PORT, false, "enforced");

    // The host changes its firewall after activation; "saved" is what it was before.
    for host in Host::AGENTS {
        must(
            lab.sh(
                host,
                "iptables -A FOREIGN-IN -s 198.19.4.0/24 -j DROP && ipset create foreign-late hash:ip && \
                 ipset add foreign-set 198.19.3.2",
            ),
            "a foreign rule after activation",
        );
    }
    let late_rule = "-A FOREIGN-IN -s 198.19.4.0/24 -j DROP";

    let done = succeeded(must(lab.ven(Host::Db, &["deactivate", "--firewall", "saved"]), "deactivate saved"));
    assert!(done.stdout.contains("as it was before activation"), "ven deactivate said: {}", done.stdout);
    let db_after = must(lab.firewall(Host::Db), "db's firewall after deactivate --firewall saved");
    assert_no_ven_objects(&db_after, "after deactivate --firewall saved");
    assert!(
        !firewall::chain_rules(&db_after.v4, "FOREIGN-IN").iter().any(|r| r == late_rule),
        "the rule added after activation should be gone:\n{}",
        db_after.v4
    );
    assert_eq!(
        firewall::normalize_save(&db_after.v4),
        firewall::normalize_save(&db_before.v4),
        "iptables-save (all tables) should be as before activation"
    );
    assert_eq!(
        firewall::normalize_save(&db_after.v6),
        firewall::normalize_save(&db_before.v6),
        "ip6tables-save (all tables) should be as before activation"
    );
    assert_eq!(
        firewall::normalize_ipsets(&db_after.ipsets),
        firewall::normalize_ipsets(&db_before.ipsets),
        "the sets should be exactly as before activation (foreign-set with 198.19.3.1 only, no \
         foreign-late)"
    );
    expect_probe(
        &lab,
        Host::Pce,
        Host::Db,
        CLOSED_PORT,
        true,
        "db deactivated (saved firewall drops only 198.19.x)",
    );

    // web, deactivated with `open`: keeps every foreign rule (also the late one), loses ours.
    let web_before = must(lab.firewall(Host::Web), "web's firewall");
    let done = succeeded(must(lab.ven(Host::Web, &["deactivate", "--firewall", "open"]), "deactivate open"));
    assert!(done.stdout.contains("the firewall is open"), "ven deactivate said: {}", done.stdout);
    let web_after = must(lab.firewall(Host::Web), "web's firewall after deactivate --firewall open");
    assert_no_ven_objects(&web_after, "after deactivate --firewall open");
    assert_eq!(firewall::without_ven(&web_after.v4), firewall::without_ven(&web_before.v4), "web v4");
    assert_eq!(firewall::without_ven(&web_after.v6), firewall::without_ven(&web_before.v6), "web v6");
    assert!(firewall::chain_rules(&web_after.v4, "FOREIGN-IN").iter().any(|r| r == late_rule));
    let sets = firewall::set_names(&web_after.ipsets);
    assert!(
        sets.contains(&"foreign-set".to_string()) && sets.contains(&"foreign-late".to_string()),
        "web's foreign sets: {sets:?}"
    );
    let workloads = must(lab.workloads(), "pce workload list");
    assert!(
        find_workload(&workloads, Host::Web).is_none() && find_workload(&workloads, Host::Db).is_none(),
        "both workloads should be gone from the PCE: {workloads:#?}"
    );

    // `saved` without a snapshot: refused with a clear error, and the VEN stays activated.
    succeeded(must(lab.activate(Host::Web), "ven activate web again"));
    let snapshot = lab.data_dir(Host::Web).join("state/firewall-saved");
    assert!(snapshot.exists(), "activation should snapshot the firewall to {}", snapshot.display());
    std::fs::remove_file(&snapshot).expect("removing the snapshot");
    let refused = must(lab.ven(Host::Web, &["deactivate", "--firewall", "saved"]), "deactivate saved");
    assert!(!refused.success(), "deactivate --firewall saved without a snapshot should fail: {refused:?}");
    assert!(
        refused.stderr.contains("no firewall was saved") && refused.stderr.contains("--firewall open"),
        "the error should say why and what to do instead: {}",
        refused.stderr
    );
    let status = must(lab.ven_status(Host::Web), "ven status --json");
    assert!(status.activated, "web should still be activated: {status:?}");
    assert!(
        find_workload(&must(lab.workloads(), "pce workload list"), Host::Web).is_some(),
        "the PCE should not have been told anything"
    );
    let done = succeeded(must(lab.ven(Host::Web, &["deactivate", "--firewall", "open"]), "deactivate open"));
    assert!(done.stdout.contains("Deactivated"), "{}", done.stdout);
}

#[test]
fn restore_at_boot_and_history() {
    let Some(bins) = prerequisites("restore_at_boot_and_history") else {
        return;
    };
    let mut lab = lab(bins, "venlc-boot", LabOptions::default());
    enforce_web_and_db(&mut lab);
    // web idle (no firewall of its own), so that the probes from web see db's firewall alone:
    // once db's agent says goodbye, web's enforced policy would no longer let it reach db.
    must(lab.set_state(Host::Web, "idle"), "pce workload set web --state idle");
    must(lab.wait_for_policy(&[Host::Web], "idle", REACT), "web going idle");
    let enforced = must(lab.firewall(Host::Db), "db's firewall");
    let version = must(lab.ven_status(Host::Db), "ven status").policy_version.expect("db's policy version");
    must(lab.stop_agent(Host::Db), "stopping db's agent");
    let status = must(lab.ven_status(Host::Db), "ven status --json");
    assert_eq!(status.agent_running, Some(false), "{status:?}");

    // A reboot: the kernel comes up with no rules and no sets.
    must(
        lab.sh(
            Host::Db,
            "iptables -F && iptables -X && ip6tables -F && ip6tables -X && \
             for set in $(ipset list -n | grep '^ven-'); do ipset destroy \"$set\" || exit 1; done",
        ),
        "flushing db's firewall",
    );
    assert_no_ven_objects(&must(lab.firewall(Host::Db), "db's firewall"), "after the flush");
    expect_probe(&lab, Host::Pce, Host::Db, CLOSED_PORT, true, "after the flush (nothing enforces)");

    let restored = succeeded(must(lab.ven(Host::Db, &["restore"]), "ven restore"));
    assert_eq!(restored.stdout.trim(), format!("Restored policy version {version} (enforced)."));
    let dump = must(lab.firewall(Host::Db), "db's firewall after ven restore");
    assert!(firewall::chains(&dump.v4).contains(&"VEN-INPUT".to_string()), "{}", dump.v4);
    assert_eq!(ven_hashes(&dump.v4), ven_hashes(&enforced.v4), "v4 chains after restore");
    assert_eq!(ven_hashes(&dump.v6), ven_hashes(&enforced.v6), "v6 chains after restore");
    assert_eq!(ven_sets(&dump.ipsets), ven_sets(&enforced.ipsets), "ven's sets after restore");
    let when = "after ven restore";
    expect_probe(&lab, Host::Web, Host::Db, 5432, true, when);
    expect_probe(&lab, Host::Pce, Host::Db, 5432, false, when);
    expect_probe(&lab, Host::Web, Host::Db, CLOSED_PORT, false, when);
    expect_probe(&lab, Host::Pce, Host::Db, CLOSED_PORT, false, when);
    expect_probe(&lab, Host::Db, Host::Web, 5432, false, when);

    let history = must(lab.history(Host::Db), "ven history --json");
    let boot: Vec<_> = history.iter().filter(|i| i.reason.as_deref() == Some("boot_restore")).collect();
    let last = boot.last().unwrap_or_else(|| panic!("ven history should list a boot_restore: {history:#?}"));
    assert_eq!((last.policy_version, last.state.as_deref()), (Some(version), Some("enforced")), "{last:?}");
    let table = succeeded(must(lab.ven(Host::Db, &["history"]), "ven history"));
    assert!(table.stdout.contains("boot_restore"), "ven history:\n{}", table.stdout);
    let shown = succeeded(must(
        lab.ven(Host::Db, &["history", "--show", &last.seq.to_string()]),
        "ven history --show",
    ));
    assert!(
        shown.stdout.contains("*filter")
            && shown.stdout.contains("VEN-INPUT")
            && shown.stdout.contains("boot_restore"),
        "ven history --show {}:\n{}",
        last.seq,
        shown.stdout
    );

    // Nothing to do the second time: same answer, the firewall and the history unchanged.
    let again = succeeded(must(lab.ven(Host::Db, &["restore"]), "ven restore, twice"));
    assert_eq!(again.stdout.trim(), format!("Restored policy version {version} (enforced)."));
    assert_eq!(must(lab.history(Host::Db), "ven history --json"), history, "an idle restore records nothing");
    // With the agent running, restore leaves the firewall to it.
    let running = succeeded(must(lab.ven(Host::Web, &["restore"]), "ven restore on web"));
    assert!(
        running.stdout.contains("nothing to restore"),
        "ven restore with a running agent: {}",
        running.stdout
    );
}

// ---------------------------------------------------------------------------------------------

/// Rules and set members of the large policy of the crash test.
const BIG_RULES: u16 = 2000;
const BIG_SET_MEMBERS: u32 = 20_000;

/// `old` plus one set of 20,000 addresses (198.19.0.0 upwards) and 2,000 inbound rules from it,
/// one port each (10000 upwards).
fn big_policy(old: &Policy) -> Policy {
    let set_id = old.ip_sets.iter().map(|s| s.id).max().unwrap_or(0) + 1;
    let first_rule = old.rules.iter().map(|r| r.id).max().unwrap_or(0) + 1;
    let base = u32::from(Ipv4Addr::new(198, 19, 0, 0));
    let members =
        (0..BIG_SET_MEMBERS).map(|i| IpNet::host(IpAddr::V4(Ipv4Addr::from(base + i)))).collect::<Vec<_>>();
    let mut big = old.clone();
    big.version = old.version + 1;
    big.ip_sets.push(IpSet { id: set_id, members });
    for i in 0..BIG_RULES {
        big.rules.push(Rule {
            id: first_rule + u32::from(i),
            direction: Direction::Inbound,
            peers: Peers::Set(set_id),
            protocol: Protocol::Tcp,
            ports: Some(PortRange { first: 10_000 + i, last: 10_000 + i }),
        });
    }
    big
}

/// Which complete ruleset a family's chains are: `old`, `new`, or neither (a torn apply).
fn which(save: &str, old: &str, new: &str) -> &'static str {
    let now = ven_hashes(save);
    if now == ven_hashes(old) {
        "old"
    } else if now == ven_hashes(new) {
        "new"
    } else {
        "TORN"
    }
}

/// The whole firewall in comparable form (filter tables of both families, every set).
fn comparable(dump: &FirewallDump) -> (String, String, String) {
    (
        firewall::normalize_save(&dump.v4),
        firewall::normalize_save(&dump.v6),
        firewall::normalize_ipsets(&dump.ipsets),
    )
}

fn temp_sets(dump: &FirewallDump) -> Vec<String> {
    firewall::set_names(&dump.ipsets)
        .into_iter()
        .filter(|s| s.starts_with(firewall::SET_PREFIX) && s.ends_with(firewall::TEMP_SET_SUFFIX))
        .collect()
}

#[test]
fn sigkill_during_apply_leaves_a_consistent_ruleset() {
    let Some(bins) = prerequisites("sigkill_during_apply_leaves_a_consistent_ruleset") else {
        return;
    };
    let mut lab = lab(bins, "venlc-kill", LabOptions::default());
    enforce_web_and_db(&mut lab);
    must(lab.stop_agent(Host::Db), "stopping db's agent");
    let policy_path = lab.data_dir(Host::Db).join("state/policy");
    let old: Policy = ven::state::read_record(&policy_path, ven::state::RecordKind::Policy)
        .expect("reading db's last-known-good policy")
        .expect("db has a last-known-good policy");
    let big = big_policy(&old);
    let write = |policy: &Policy| {
        ven::state::write_record(&policy_path, ven::state::RecordKind::Policy, policy, 0o600)
            .expect("writing db's last-known-good policy")
    };
    let restore = |lab: &Lab| {
        let done = succeeded(must(lab.ven(Host::Db, &["restore"]), "ven restore"));
        assert!(done.stdout.starts_with("Restored policy version"), "ven restore said: {}", done.stdout);
    };
    let old_fw = must(lab.firewall(Host::Db), "db's firewall");

    // The reference: the large policy applied once, cleanly, from the old one.
    write(&big);
    let started = Instant::now();
    restore(&lab);
    let full = started.elapsed();
    let new_fw = must(lab.firewall(Host::Db), "db's firewall with the large policy");
    let new_rules = firewall::chain_rules(&new_fw.v4, "VEN-INPUT").len();
    assert!(new_rules > 2 * usize::from(BIG_RULES), "VEN-INPUT should hold the 2,000 rules: {new_rules}");
    let big_set = firewall::set_names(&new_fw.ipsets)
        .into_iter()
        .find(|s| firewall::set_members(&new_fw.ipsets, s).len() == BIG_SET_MEMBERS as usize)
        .unwrap_or_else(|| panic!("no set holds the 20,000 addresses after a clean apply"));
    assert!(temp_sets(&new_fw).is_empty(), "temp sets left by a clean apply: {:?}", temp_sets(&new_fw));
    let reference = comparable(&new_fw);
    eprintln!(
        "the large policy takes {full:?} to apply from the old one ({new_rules} rules in v4 VEN-INPUT)"
    );

    // Kill at 5 ms, then spread over the apply's duration. Bounded: 6 rounds of a complete run
    // back to the old policy, one killed run (at most 3 s) and a complete run to converge.
    let mut delays = vec![Duration::from_millis(5)];
    delays.extend([0.15, 0.3, 0.45, 0.6, 0.8].iter().map(|f| full.mul_f64(*f).min(Duration::from_secs(3))));
    let mut seen = Vec::new();
    for delay in delays {
        write(&old);
        restore(&lab);
        let reset = must(lab.firewall(Host::Db), "db's firewall");
        assert_eq!(which(&reset.v4, &old_fw.v4, &new_fw.v4), "old", "reset to the old policy (v4)");
        assert_eq!(ven_sets(&reset.ipsets), ven_sets(&old_fw.ipsets), "reset to the old policy (sets)");

        write(&big);
        let outcome = must(lab.ven_killed_after(Host::Db, &["restore"], delay), "ven restore, killed");
        let killed = match &outcome {
            KillOutcome::Killed { after } => format!("killed after {after:?}"),
            KillOutcome::Finished(done) => format!("finished first ({})", succeeded(done.clone()).status),
        };
        let torn = must(lab.firewall(Host::Db), "db's firewall after the kill");
        let v4 = which(&torn.v4, &old_fw.v4, &new_fw.v4);
        let v6 = which(&torn.v6, &old_fw.v6, &new_fw.v6);
        eprintln!("delay {delay:?}: {killed}; v4 {v4}, v6 {v6}, temp sets {:?}", temp_sets(&torn));
        assert!(
            v4 != "TORN" && v6 != "TORN",
            "after a SIGKILL at {delay:?} ({killed}) a family holds neither the old nor the new ruleset:\n\
             v4 {:?}\nv6 {:?}",
            ven_hashes(&torn.v4),
            ven_hashes(&torn.v6)
        );
        // The sets match the chains in force: the iptables step comes after the sets, so new
        // rules never see a half-filled set; and the old rules' sets keep their old members.
        if v4 == "new" {
            let members = firewall::set_members(&torn.ipsets, &big_set).len();
            assert_eq!(members, BIG_SET_MEMBERS as usize, "new rules in force over a partial {big_set}");
        }
        if v4 == "old" {
            for (name, members) in ven_set_members(&old_fw) {
                let now = firewall::set_members(&torn.ipsets, &name);
                assert!(
                    members.is_subset(&now),
                    "old set {name} lost members while the old rules are in force"
                );
            }
        }
        seen.push((delay, outcome, v4, v6));

        // The next complete run converges to exactly the clean apply's firewall.
        restore(&lab);
        let converged = must(lab.firewall(Host::Db), "db's firewall after a complete ven restore");
        assert!(
            temp_sets(&converged).is_empty(),
            "temp sets left after a complete run: {:?}",
            temp_sets(&converged)
        );
        let now = comparable(&converged);
        assert!(
            now.0 == reference.0,
            "v4 filter after recovering from a kill at {delay:?} differs from the clean apply"
        );
        assert!(
            now.1 == reference.1,
            "v6 filter after recovering from a kill at {delay:?} differs from the clean apply"
        );
        assert!(
            now.2 == reference.2,
            "sets after recovering from a kill at {delay:?} differ from the clean apply"
        );
    }
    let kills =
        seen.iter().filter(|(_, outcome, _, _)| matches!(outcome, KillOutcome::Killed { .. })).count();
    assert!(kills >= 3, "most runs should have been killed mid-way, not finished: {seen:#?}");
}

/// ven's sets in `dump` and their members.
fn ven_set_members(dump: &FirewallDump) -> Vec<(String, BTreeSet<String>)> {
    firewall::set_names(&dump.ipsets)
        .into_iter()
        .filter(|s| s.starts_with(firewall::SET_PREFIX))
        .map(|s| {
            let members = firewall::set_members(&dump.ipsets, &s);
            (s, members)
        })
        .collect()
}

/// The bad input, end to end: a policy the VEN refuses (here a custom rule the PCE
/// accepts but the VEN's stricter check does not: it carries a comment, which could forge our
/// rule hashes) is rejected whole, reported to the PCE in the heartbeat's apply_error, and the
/// last-known-good policy stays in force; the next good version applies and clears the error.
#[test]
fn a_rejected_policy_is_reported_and_the_previous_one_stays() {
    let Some(bins) = prerequisites("a_rejected_policy_is_reported_and_the_previous_one_stays") else {
        return;
    };
    let mut lab = lab(bins, "venlc-rej", LabOptions::default());
    enforce_web_and_db(&mut lab);
    let db = |lab: &Lab| find_workload(&must(lab.workloads(), "pce workload list"), Host::Db).cloned();
    let applied = db(&lab).and_then(|w| w.applied_policy_version).expect("db applied a policy");
    let firewall_before = must(lab.firewall(Host::Db), "db's firewall");

    let added = succeeded(must(
        lab.pce(&[
            "workload",
            "custom-rule",
            "add",
            "db",
            "--chain",
            "input",
            "--rule",
            "-p tcp --dport 7000 -m comment --comment hello -j ACCEPT",
        ]),
        "pce workload custom-rule add db",
    ));
    let rule_id = added.stdout.trim().rsplit('/').next().expect("the rule's href").to_string();
    let reported = lab.wait_until("db reporting the rejection to the PCE", REACT, |lab| {
        Ok(match find_workload(&lab.workloads()?, Host::Db) {
            Some(w)
                if w.policy_version > Some(applied)
                    && w.applied_policy_version == Some(applied)
                    && w.apply_error.as_deref().is_some_and(|e| e.contains("custom rule")) =>
            {
                None
            }
            other => Some(format!("{other:?}")),
        })
    });
    must(reported, "the rejection reported");
    let status = must(lab.ven_status(Host::Db), "ven status on db");
    assert_eq!(status.policy_version, Some(applied), "the agent keeps the previous version: {status:?}");
    let firewall_after = must(lab.firewall(Host::Db), "db's firewall");
    assert_eq!(ven_hashes(&firewall_after.v4), ven_hashes(&firewall_before.v4), "IPv4 chains unchanged");
    assert_eq!(ven_hashes(&firewall_after.v6), ven_hashes(&firewall_before.v6), "IPv6 chains unchanged");
    expect_probe(&lab, Host::Pce, Host::Db, CLOSED_PORT, false, "the refused rule did not open 7000");
    expect_probe(&lab, Host::Web, Host::Db, 5432, true, "the previous policy still allows web");

    // The operator fixes it: the next version applies and the error goes.
    succeeded(must(
        lab.pce(&["workload", "custom-rule", "remove", "db", &rule_id]),
        "pce workload custom-rule remove db",
    ));
    let recovered = lab.wait_until("db applying the next good version", REACT, |lab| {
        Ok(match find_workload(&lab.workloads()?, Host::Db) {
            Some(w)
                if w.applied_policy_version == w.policy_version
                    && w.applied_policy_version > Some(applied)
                    && w.apply_error.is_none() =>
            {
                None
            }
            other => Some(format!("{other:?}")),
        })
    });
    must(recovered, "recovery after the fix");
}

/// The flow pipeline's first part in the running agent: it binds the firewall's NFLOG group and
/// counts the packets the log rules hand it, with nothing lost, and `ven status` shows it.
#[test]
fn the_running_agent_reads_its_nflog_group() {
    let Some(bins) = prerequisites("the_running_agent_reads_its_nflog_group") else {
        return;
    };
    let mut lab = lab(bins, "venlc-flow", LabOptions::default());
    enforce_web_and_db(&mut lab);
    let before = must(lab.ven_status(Host::Db), "ven status on db").flows.expect("db's agent reports flows");
    assert!(before.0, "db's agent reads its NFLOG group: {before:?}");
    // Dropped by db's enforced input policy: logged as ven:d:0 (SYN retries make more packets).
    for _ in 0..3 {
        expect_probe(&lab, Host::Pce, Host::Db, CLOSED_PORT, false, "enforced");
    }
    let counted = lab.wait_until("db's agent counting the logged packets", REACT, |lab| {
        let flows = lab.ven_status(Host::Db)?.flows;
        Ok(match flows {
            Some((true, events, 0)) if events >= before.1 + 3 => None,
            other => Some(format!("{other:?}, before {before:?}")),
        })
    });
    must(counted, "flow events counted");
    let human = must(lab.ven_status_text(Host::Db), "ven status on db");
    assert!(human.contains("flows:           reading NFLOG"), "{human}");
}
