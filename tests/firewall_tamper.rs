//! Tamper detection and repair against the real kernel: each test applies an enforced policy in
//! a fresh lab (`common`) next to Docker-like foreign chains, rules and a set, damages our
//! objects the way an operator or another tool would, and checks that
//! - `verify` names the damage (quick where it can see it, full where only members changed),
//! - real traffic shows the damage,
//! - `repair` converges: nothing left to verify, traffic as the policy says, our chains and sets
//!   as the apply wrote them, and every foreign object byte for byte as it was.

mod common;

use common::*;
use ven::firewall::{CheckDepth, Family};
use ven_proto::PolicyState;

/// Docker-like objects of another tool, in both families (created before our apply).
const FOREIGN: &str = "\
    iptables -N DOCKER-USER && iptables -A DOCKER-USER -s 198.19.0.0/16 -j RETURN && \
    iptables -I FORWARD 1 -j DOCKER-USER && \
    iptables -A INPUT -s 198.19.1.1/32 -p tcp -m tcp --dport 9999 -j ACCEPT && \
    ip6tables -N DOCKER-USER && ip6tables -A DOCKER-USER -s 2001:2:0:99::/64 -j RETURN && \
    ip6tables -I FORWARD 1 -j DOCKER-USER && \
    ipset create docker-foreign hash:ip && ipset add docker-foreign 198.19.0.7";

/// A lab with the foreign objects and a freshly applied enforced policy, and what it looked like.
struct Fresh {
    lab: Lab,
    /// Our chains, jumps and sets (members sorted, without `initval`).
    ours: String,
    /// Everything else in table filter of both families, and `ipset save` of the foreign sets.
    foreign: String,
}

/// Our objects in B: both families' rules and jumps, then our sets, members sorted.
fn ours(lab: &Lab) -> String {
    let mut sets: Vec<String> = split_ours(&lab.sets()).0.lines().map(str::to_string).collect();
    sets.sort();
    format!(
        "{}\n# IPv6\n{}\n# sets\n{}",
        split_ours(&lab.filter(Family::V4)).0,
        split_ours(&lab.filter(Family::V6)).0,
        sets.join("\n")
    )
}

/// Everything not ours in B, byte for byte (foreign sets with their `initval`).
fn foreign(lab: &Lab) -> String {
    format!(
        "{}\n# IPv6\n{}\n# sets\n{}",
        split_ours(&lab.filter(Family::V4)).1,
        split_ours(&lab.filter(Family::V6)).1,
        split_ours(&lab.sets_raw()).1
    )
}

/// The position (1-based, as `iptables -D CHAIN N` takes it) of the one rule of `chain`
/// whose text contains every needle.
#[track_caller]
fn rule_number(lab: &Lab, family: Family, chain: &str, needles: &[&str]) -> usize {
    let tool = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    let output = lab.b.exec(tool, &["-S", chain]).expect("iptables -S");
    let text = String::from_utf8_lossy(&output.stdout);
    let rules: Vec<&str> = text.lines().filter(|line| line.starts_with("-A ")).collect();
    let found: Vec<usize> = rules
        .iter()
        .enumerate()
        .filter(|(_, rule)| needles.iter().all(|needle| rule.contains(needle)))
        .map(|(at, _)| at + 1)
        .collect();
    match found.as_slice() {
        [number] => *number,
        _ => panic!("{} rules of {chain} contain {needles:?}:\n{text}", found.len()),
    }
}

impl Fresh {
    fn new(prefix: &str) -> Self {
        let lab = Lab::new(prefix);
        lab.b_sh(FOREIGN);
        let summary = lab.apply(&policy(1, PolicyState::Enforced, &[A, A6])).unwrap();
        assert!(summary.changed);
        for depth in [CheckDepth::Quick, CheckDepth::Full] {
            assert_eq!(lab.verify(depth).unwrap(), Vec::<String>::new(), "fresh apply, {depth:?}");
        }
        Self { ours: ours(&lab), foreign: foreign(&lab), lab }
    }

    /// Runs `script` in B and checks what each depth of verify reports.
    #[track_caller]
    fn tamper(&self, script: &str, quick: &[&str], full: &[&str]) {
        self.lab.b_sh(script);
        assert_eq!(self.lab.verify(CheckDepth::Quick).unwrap(), quick, "quick verify after `{script}`");
        assert_eq!(self.lab.verify(CheckDepth::Full).unwrap(), full, "full verify after `{script}`");
    }

    /// Repairs and checks that everything is as the fresh apply left it; foreign objects must
    /// be exactly `foreign` (what the tampering left of them).
    #[track_caller]
    fn repaired(&self, foreign_now: &str) {
        let lab = &self.lab;
        let summary = lab.repair().unwrap();
        assert!(summary.changed, "repair wrote something: {summary:?}");
        for depth in [CheckDepth::Quick, CheckDepth::Full] {
            assert_eq!(lab.verify(depth).unwrap(), Vec::<String>::new(), "after repair, {depth:?}");
        }
        let mut probes = lab.inbound(ONLY_A);
        probes.extend([(&lab.b, addr(A, UNLISTED), Dropped), (&lab.b, addr(A, MANAGEMENT), Allowed)]);
        expect_tcp("after repair", &probes);
        assert_eq!(ours(lab), self.ours, "our chains and sets as the apply wrote them");
        assert_eq!(foreign(lab), foreign_now, "foreign objects untouched by repair");
        let again = lab.repair().unwrap();
        assert!(!again.changed, "a second repair has nothing to do: {again:?}");
    }
}

#[test]
fn a_deleted_rule_is_found_and_put_back() {
    if !require_kernel() {
        return;
    }
    let fresh = Fresh::new("fwt-del");
    let number = rule_number(&fresh.lab, Family::V4, "VEN-INPUT", &["--dport 7001 ", "-j ACCEPT"]);
    fresh.tamper(
        &format!("iptables -D VEN-INPUT {number}"),
        &["IPv4: VEN-INPUT: 1 rules missing, 0 unexpected"],
        &["IPv4: VEN-INPUT: 1 rules missing, 0 unexpected"],
    );
    let lab = &fresh.lab;
    expect_tcp(
        "rule 1's accept is gone from IPv4",
        &lab.inbound([Dropped, Dropped, Dropped, Allowed, Dropped]),
    );
    assert!(lab.logged(Family::V4, "VEN-INPUT", "ven:d:0") > 0, "A's connection fell through to the drop");
    fresh.repaired(&fresh.foreign);
}

#[test]
fn a_flushed_chain_is_found_and_refilled() {
    if !require_kernel() {
        return;
    }
    let fresh = Fresh::new("fwt-flush");
    let rules = fresh.lab.filter(Family::V4).lines().filter(|l| l.starts_with("-A VEN-INPUT ")).count();
    assert!(rules > 5, "{rules}");
    let drift = format!("IPv4: VEN-INPUT: {rules} rules missing, 0 unexpected");
    fresh.tamper("iptables -F VEN-INPUT", &[&drift], &[&drift]);
    expect_tcp(
        "an empty VEN-INPUT lets everyone in",
        &fresh.lab.inbound([Allowed, Allowed, Allowed, Allowed, Dropped]),
    );
    fresh.repaired(&fresh.foreign);
}

#[test]
fn a_deleted_jump_is_found_and_put_back_at_rule_one() {
    if !require_kernel() {
        return;
    }
    let fresh = Fresh::new("fwt-jump");
    let drift = "IPv4: jump from INPUT to VEN-INPUT missing";
    fresh.tamper("iptables -D INPUT -m comment --comment ven:jump -j VEN-INPUT", &[drift], &[drift]);
    expect_tcp(
        "without the jump IPv4 is open",
        &fresh.lab.inbound([Allowed, Allowed, Allowed, Allowed, Dropped]),
    );
    fresh.repaired(&fresh.foreign);
    let filter = fresh.lab.filter(Family::V4);
    let input: Vec<&str> = filter.lines().filter(|l| l.starts_with("-A INPUT ")).collect();
    assert_eq!(input[0], "-A INPUT -m comment --comment \"ven:jump\" -j VEN-INPUT", "{filter}");
}

#[test]
fn a_deleted_set_member_is_found_by_both_checks_and_put_back() {
    if !require_kernel() {
        return;
    }
    let fresh = Fresh::new("fwt-member");
    fresh.tamper(
        &format!("ipset del ven-1 {A}"),
        &["set ven-1 holds 0 members, not 1"],
        &["set ven-1: 1 members missing, 0 unexpected"],
    );
    expect_tcp(
        "A is no longer a peer over IPv4",
        &fresh.lab.inbound([Dropped, Dropped, Dropped, Allowed, Dropped]),
    );
    fresh.repaired(&fresh.foreign);
}

#[test]
fn a_replaced_set_member_is_found_by_the_full_check_only() {
    if !require_kernel() {
        return;
    }
    let fresh = Fresh::new("fwt-swap");
    fresh.tamper(
        &format!("ipset add ven-1 {C} && ipset del ven-1 {A}"),
        &[],
        &["set ven-1: 1 members missing, 1 unexpected"],
    );
    expect_tcp(
        "C took A's place over IPv4",
        &fresh.lab.inbound([Dropped, Dropped, Allowed, Allowed, Dropped]),
    );
    fresh.repaired(&fresh.foreign);
}

#[test]
fn a_flushed_table_and_deleted_chains_are_rebuilt() {
    if !require_kernel() {
        return;
    }
    let fresh = Fresh::new("fwt-table");
    let missing = [
        "IPv4: chain VEN-INPUT missing",
        "IPv4: jump from INPUT to VEN-INPUT missing",
        "IPv4: chain VEN-OUTPUT missing",
        "IPv4: jump from OUTPUT to VEN-OUTPUT missing",
    ];
    // -X needs the chains unreferenced: -F took the jumps (INPUT and OUTPUT are flushed too).
    fresh.tamper("iptables -F && iptables -X VEN-INPUT && iptables -X VEN-OUTPUT", &missing, &missing);
    let lab = &fresh.lab;
    let mut probes = lab.inbound([Allowed, Allowed, Allowed, Allowed, Dropped]);
    probes.push((&lab.b, addr(A, UNLISTED), Allowed));
    expect_tcp("IPv4 wide open", &probes);
    // The flush took the foreign rules too; repair must not bring them back or touch them.
    let foreign_now = foreign(lab);
    assert_ne!(foreign_now, fresh.foreign);
    assert!(foreign_now.contains(":DOCKER-USER -"), "{foreign_now}");
    fresh.repaired(&foreign_now);
}

#[test]
fn an_emptied_filter_table_and_destroyed_sets_are_rebuilt() {
    if !require_kernel() {
        return;
    }
    let fresh = Fresh::new("fwt-empty");
    let mut drift = Vec::new();
    for family in ["IPv4", "IPv6"] {
        for (chain, hook) in [("VEN-INPUT", "INPUT"), ("VEN-OUTPUT", "OUTPUT")] {
            drift.push(format!("{family}: chain {chain} missing"));
            drift.push(format!("{family}: jump from {hook} to {chain} missing"));
        }
    }
    drift.extend(["set ven-1 missing".to_string(), "set ven-1-6 missing".to_string()]);
    let drift: Vec<&str> = drift.iter().map(String::as_str).collect();
    fresh.tamper(
        "printf '*filter\\nCOMMIT\\n' | iptables-restore && printf '*filter\\nCOMMIT\\n' | ip6tables-restore && \
         ipset destroy ven-1 && ipset destroy ven-1-6",
        &drift,
        &drift,
    );
    let lab = &fresh.lab;
    expect_tcp("both families wide open", &lab.inbound(OPEN));
    let foreign_now = foreign(lab);
    assert!(!foreign_now.contains("DOCKER-USER"), "the restore deleted foreign chains too: {foreign_now}");
    assert!(foreign_now.contains("add docker-foreign 198.19.0.7"), "{foreign_now}");
    fresh.repaired(&foreign_now);
}

#[test]
fn an_inserted_rule_is_found_and_removed() {
    if !require_kernel() {
        return;
    }
    let fresh = Fresh::new("fwt-insert");
    let drift = "IPv4: VEN-INPUT: 0 rules missing, 1 unexpected";
    fresh.tamper(&format!("iptables -I VEN-INPUT 3 -s {C}/32 -j ACCEPT"), &[drift], &[drift]);
    let lab = &fresh.lab;
    let mut probes = lab.inbound(ONLY_A);
    probes[2].2 = Allowed;
    probes.push((&lab.c, addr(B, OTHER), Allowed));
    expect_tcp("the inserted rule lets C in", &probes);
    fresh.repaired(&fresh.foreign);
}

#[test]
fn foreign_chains_rules_and_sets_are_not_drift_and_survive_repair() {
    if !require_kernel() {
        return;
    }
    let fresh = Fresh::new("fwt-foreign");
    let lab = &fresh.lab;
    // Another tool starts after us. Names that merely start like ours (VENDOR-, vendor-) are
    // not ours either.
    lab.b_sh(
        "iptables -N VENDOR-LATE && iptables -A VENDOR-LATE -s 198.19.2.0/24 -j DROP && \
         iptables -A FORWARD -j VENDOR-LATE && iptables -A INPUT -s 198.19.3.3/32 -j DROP && \
         iptables -A OUTPUT -d 198.19.3.3/32 -j DROP && \
         ip6tables -N VENDOR-LATE && ip6tables -A VENDOR-LATE -s 2001:2:0:98::/64 -j DROP && \
         ip6tables -A FORWARD -j VENDOR-LATE && ip6tables -A INPUT -s 2001:2:0:97::3/128 -j DROP && \
         ipset create vendor-late hash:net && ipset add vendor-late 198.19.4.0/24 && \
         iptables -A VENDOR-LATE -m set --match-set vendor-late src -j DROP",
    );
    let foreign_now = foreign(lab);
    assert!(foreign_now.contains("VENDOR-LATE") && foreign_now.contains("vendor-late"), "{foreign_now}");
    for depth in [CheckDepth::Quick, CheckDepth::Full] {
        assert_eq!(
            lab.verify(depth).unwrap(),
            Vec::<String>::new(),
            "foreign objects are not drift ({depth:?})"
        );
    }
    let summary = lab.repair().unwrap();
    assert!(!summary.changed, "nothing of ours to repair: {summary:?}");
    assert_eq!(foreign(lab), foreign_now);
    assert_eq!(ours(lab), fresh.ours);

    // Now ours is damaged too: repair fixes it and still leaves every foreign object alone.
    let rules = lab.filter(Family::V4).lines().filter(|l| l.starts_with("-A VEN-OUTPUT ")).count();
    let drift = format!("IPv4: VEN-OUTPUT: {rules} rules missing, 0 unexpected");
    fresh.tamper("iptables -F VEN-OUTPUT", &[&drift], &[&drift]);
    expect_tcp("B's outbound is open", &[(&lab.b, addr(A, UNLISTED), Allowed)]);
    fresh.repaired(&foreign_now);
}

#[test]
fn a_deleted_ip6tables_rule_is_found_and_put_back() {
    if !require_kernel() {
        return;
    }
    let fresh = Fresh::new("fwt-six");
    let number = rule_number(&fresh.lab, Family::V6, "VEN-INPUT", &["-j DROP"]);
    let drift = "IPv6: VEN-INPUT: 1 rules missing, 0 unexpected";
    fresh.tamper(&format!("ip6tables -D VEN-INPUT {number}"), &[drift], &[drift]);
    expect_tcp("IPv6 no longer drops", &fresh.lab.inbound([Allowed, Dropped, Dropped, Allowed, Allowed]));
    fresh.repaired(&fresh.foreign);
}
