//! Kernel tests of the firewall: real iptables-restore, ip6tables-restore and ipset in fresh
//! network namespaces, judged by real TCP connections and UDP datagrams, and by the packet
//! counters of our NFLOG rules (what the flow pipeline would have been told).
//!
//! The lab (`common`) has hosts A (in the policy's peer set), B (runs the firewall) and C (never
//! a member), each with an IPv4 and an IPv6 address. Without namespaces the tests are skipped
//! loudly, except under CI, where they fail.

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use ven::firewall::backend::{self, Backend};
use ven::firewall::{
    Caps, CheckDepth, Family, FirewallConfig, FirewallError, Options, PolicyError, Service, ServiceDirection,
    Tools, validate,
};
use ven_lab::netns::Netns;
use ven_proto::{
    CustomChain, CustomRule, Direction, IpSet, Peers, Policy, PolicyState, PortRange, Protocol, Rule,
    RuleFamily,
};

#[test]
fn enforced_policy_allows_the_ruled_port_from_the_peer_set_only() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new("fwk-enf");
    expect_tcp("no firewall yet", &lab.inbound(OPEN));
    let summary = lab.apply(&policy(1, PolicyState::Enforced, &[A, A6])).unwrap();
    assert_eq!(summary.sets, 2, "ven-1 and its IPv6 twin ven-1-6");
    assert_eq!(summary.set_members_added, 2);
    let mut probes = lab.inbound(ONLY_A);
    probes.extend([
        (&lab.b, addr(A, MANAGEMENT), Allowed),
        (&lab.b, addr(A, UNLISTED), Dropped),
        (&lab.b, addr(B, OTHER), Allowed),
        (&lab.b, addr(B6, OTHER), Allowed),
    ]);
    expect_tcp("enforced: the management channel stays open, B reaches itself over loopback", &probes);
}

#[test]
fn every_state_allows_drops_and_logs_what_it_should() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new("fwk-log");
    let v4 = Family::V4;
    for state in [PolicyState::Build, PolicyState::Test, PolicyState::Enforced] {
        let summary = lab.apply(&policy_with_udp(1, state, &[A])).unwrap();
        assert!(summary.changed, "{state}");
        let logs = lab.input_logs(v4);
        let unruled = match state {
            PolicyState::Build => "ven:o:0",
            PolicyState::Test => "ven:w:0",
            _ => "ven:d:0",
        };
        assert_eq!(
            logs.keys().map(String::as_str).collect::<Vec<_>>(),
            ["ven:a:1", "ven:a:2", unruled],
            "{state}: one log rule per policy rule and one for the verdict"
        );
        assert!(
            logs.values().all(|&packets| packets == 0),
            "{state}: nothing logged before traffic: {logs:?}"
        );

        // A connection rule 1 allows: logged with its rule id, nothing else.
        expect_tcp(&format!("{state}: ruled"), &[(&lab.a, addr(B, RULED), Allowed)]);
        assert!(lab.logged(v4, "VEN-INPUT", "ven:a:1") > 0, "{state}: {:?}", lab.input_logs(v4));
        assert_eq!(
            lab.logged(v4, "VEN-INPUT", unruled),
            0,
            "{state}: the allowed connection is not {unruled}"
        );

        // Connections no rule allows: accepted and logged as observed / would-drop in build and
        // test; dropped and logged as dropped in enforced.
        let unruled_reach = if state == PolicyState::Enforced { Dropped } else { Allowed };
        expect_tcp(
            &format!("{state}: unruled"),
            &[(&lab.a, addr(B, OTHER), unruled_reach), (&lab.c, addr(B, RULED), unruled_reach)],
        );
        let unruled_packets = lab.logged(v4, "VEN-INPUT", unruled);
        assert!(unruled_packets >= 2, "{state}: both connections under {unruled}: {:?}", lab.input_logs(v4));
        if state != PolicyState::Enforced {
            // Only the first packet of a connection is logged: the handshake's ACK is not new.
            assert_eq!(unruled_packets, 2, "{state}: {:?}", lab.input_logs(v4));
        }

        // UDP: rule 2 lets A's datagrams in; C's meet the state's verdict.
        let before = lab.logged(v4, "VEN-INPUT", "ven:a:2");
        assert_eq!(lab.udp_to_b(&lab.a, Allowed), Allowed, "{state}: UDP from A");
        assert!(lab.logged(v4, "VEN-INPUT", "ven:a:2") > before, "{state}: {:?}", lab.input_logs(v4));
        assert_eq!(lab.udp_to_b(&lab.c, unruled_reach), unruled_reach, "{state}: UDP from C");
        assert!(lab.logged(v4, "VEN-INPUT", unruled) > unruled_packets, "{state}: {:?}", lab.input_logs(v4));
        lab.drain();
    }
}

/// A sequence of states that takes every ordered pair of distinct states once (an Eulerian
/// circuit of the complete directed graph on the four states), starting and ending idle.
const TOUR: [PolicyState; 13] = {
    use PolicyState::{Build, Enforced, Idle, Test};
    [Idle, Build, Idle, Test, Idle, Enforced, Build, Test, Build, Enforced, Test, Enforced, Idle]
};

#[test]
fn every_transition_between_states_enforces_the_target_and_reapplying_changes_nothing() {
    if !require_kernel() {
        return;
    }
    let mut pairs: Vec<(PolicyState, PolicyState)> = TOUR.windows(2).map(|w| (w[0], w[1])).collect();
    pairs.sort_by_key(|(from, to)| (from.to_string(), to.to_string()));
    pairs.dedup();
    assert_eq!(pairs.len(), 12, "the tour takes all 4 x 3 transitions");

    let lab = Lab::new("fwk-tour");
    let pristine = lab.everything();
    for (step, pair) in TOUR.windows(2).enumerate() {
        let (from, to) = (pair[0], pair[1]);
        let what = format!("step {step}: {from} -> {to}");
        let target = policy(step as u64 + 1, to, &[A, A6]);
        let summary = lab.apply(&target).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(summary.changed, "{what}: {summary:?}");
        let again = lab.apply(&target).unwrap_or_else(|e| panic!("{what}, again: {e}"));
        assert!(!again.changed, "{what}: applying the same policy again changed something: {again:?}");
        assert_eq!((again.set_members_added, again.set_members_removed), (0, 0), "{what}");

        let mut probes = lab.inbound(if to == PolicyState::Enforced { ONLY_A } else { OPEN });
        let outbound = if to == PolicyState::Enforced { Dropped } else { Allowed };
        probes.extend([(&lab.b, addr(A, UNLISTED), outbound), (&lab.b, addr(A, MANAGEMENT), Allowed)]);
        expect_tcp(&what, &probes);
        if to == PolicyState::Idle {
            assert_eq!(lab.everything(), pristine, "{what}: idle leaves nothing of ours");
            assert!(matches!(lab.verify(CheckDepth::Quick), Err(FirewallError::NothingApplied)), "{what}");
        } else {
            assert_eq!(lab.verify(CheckDepth::Full).unwrap(), Vec::<String>::new(), "{what}");
        }
        lab.drain();
    }
}

/// Port of the long-lived connection of the next test (rule 2 allows A to it).
const LONG: u16 = 7004;

#[test]
fn a_connection_opened_in_build_survives_the_switch_to_enforced() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new("fwk-estab");
    let listener = listen(&lab.b, B, LONG);
    let with_long = |version, state| {
        let mut policy = policy(version, state, &[A, A6]);
        policy.rules.push(Rule {
            id: 2,
            direction: Direction::Inbound,
            peers: Peers::Set(1),
            protocol: Protocol::Tcp,
            ports: Some(PortRange { first: LONG, last: LONG }),
        });
        policy
    };
    lab.apply(&with_long(1, PolicyState::Build)).unwrap();
    let target = addr(B, LONG);
    let mut client = lab
        .a
        .run(move || TcpStream::connect_timeout(&target, ALLOW_WAIT))
        .expect("enter namespace a")
        .expect("connect in build");
    // Bounded: the handshake completed, so the connection reaches the backlog at once.
    let mut server = (0..250)
        .find_map(|_| match listener.accept() {
            Ok((stream, _)) => Some(stream),
            Err(_) => {
                std::thread::sleep(Duration::from_millis(20));
                None
            }
        })
        .expect("accept");
    server.set_nonblocking(false).unwrap();
    for stream in [&client, &server] {
        stream.set_read_timeout(Some(ALLOW_WAIT)).unwrap();
    }
    let mut exchange = |round: &str| {
        let mut word = [0u8; 5];
        client.write_all(b"hello").unwrap();
        server.read_exact(&mut word).unwrap_or_else(|e| panic!("{round}: A -> B: {e}"));
        assert_eq!(&word, b"hello");
        server.write_all(b"again").unwrap();
        client.read_exact(&mut word).unwrap_or_else(|e| panic!("{round}: B -> A: {e}"));
        assert_eq!(&word, b"again");
    };
    exchange("build");

    lab.apply(&with_long(2, PolicyState::Enforced)).unwrap();
    expect_tcp("enforced", &lab.inbound(ONLY_A));
    exchange("enforced");
    assert!(lab.logged(Family::V4, "VEN-INPUT", "ven:d:0") > 0, "C's probes were dropped");
    assert_eq!(lab.logged(Family::V4, "VEN-INPUT", "ven:a:2"), 0, "the old connection is not new again");
}

#[test]
fn set_membership_changes_by_delta_and_an_emptied_set_blocks() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new("fwk-delta");
    lab.apply(&policy(1, PolicyState::Enforced, &[A, A6])).unwrap();

    let summary = lab.apply(&policy(2, PolicyState::Enforced, &[C, C6])).unwrap();
    assert_eq!((summary.set_members_added, summary.set_members_removed), (2, 2));
    expect_tcp("C in, A out", &lab.inbound([Dropped, Dropped, Allowed, Dropped, Allowed]));
    assert!(lab.sets().contains(&format!("add ven-1 {C}")));
    assert!(lab.sets().contains(&format!("add ven-1-6 {C6}")));

    let summary = lab.apply(&policy(3, PolicyState::Enforced, &[])).unwrap();
    assert_eq!((summary.set_members_added, summary.set_members_removed), (0, 2));
    let mut probes = lab.inbound([Dropped; 5]);
    probes.push((&lab.b, addr(A, MANAGEMENT), Allowed));
    expect_tcp("an emptied set allows nobody", &probes);
}

#[test]
fn invalid_policy_is_rejected_and_the_previous_ruleset_keeps_working() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new("fwk-inval");
    lab.apply(&policy(1, PolicyState::Enforced, &[A, A6])).unwrap();
    let before = lab.everything();

    let mut bad = policy(2, PolicyState::Enforced, &[A, C]);
    bad.rules.push(bad.rules[0].clone());
    bad.rules[1].ports = None;
    let err = lab.apply(&bad).unwrap_err();
    assert!(matches!(err, FirewallError::Policy(PolicyError::DuplicateRuleId(1))), "{err}");

    assert_eq!(lab.everything(), before);
    expect_tcp("the previous policy", &lab.inbound(ONLY_A));
}

/// An `iptables-restore` that rejects every input, as the kernel would a rule it cannot load.
struct RejectingRestore(PathBuf);

impl RejectingRestore {
    fn new(tag: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("ven-fwk-{}-{tag}-iptables-restore", std::process::id()));
        let script = "#!/bin/sh\ncat >/dev/null\necho 'iptables-restore: simulated rejection' >&2\necho 'Error occurred at line: 3' >&2\nexit 1\n";
        std::fs::write(&path, script).expect("write wrapper");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Self(path)
    }
}

impl Drop for RejectingRestore {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn kernel_rejection_leaves_the_previous_ruleset_and_sets_intact() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new("fwk-rej");
    lab.apply(&policy(1, PolicyState::Enforced, &[A, A6])).unwrap();
    let before = lab.everything();

    // The next policy changes set 1 (A out, C in) and adds set 2: all of it must be undone.
    let mut next = policy(2, PolicyState::Enforced, &[C, C6]);
    next.ip_sets.push(IpSet { id: 2, members: vec![A.parse().unwrap()] });
    next.rules.push(Rule {
        id: 2,
        direction: Direction::Inbound,
        peers: Peers::Set(2),
        protocol: Protocol::Tcp,
        ports: Some(PortRange { first: OTHER, last: OTHER }),
    });
    let rejecting = RejectingRestore::new("rej");
    let tools = Tools { iptables_restore: rejecting.0.clone(), ..Tools::plain() };
    let config = FirewallConfig { tools, ..FirewallConfig::default() };
    let err = lab.apply_with(config, &next).unwrap_err();
    match &err {
        FirewallError::Restore { table, stderr, input_excerpt, .. } => {
            assert_eq!(*table, "filter");
            assert!(stderr.contains("simulated rejection"), "{stderr}");
            assert!(input_excerpt.contains(">    3: "), "{input_excerpt}");
        }
        other => panic!("expected a restore error, got {other}"),
    }

    assert_eq!(lab.everything(), before, "rules and set contents as before, the new sets destroyed");
    expect_tcp("the previous policy", &lab.inbound(ONLY_A));

    // And the real tools still apply it afterwards.
    lab.apply(&next).unwrap();
    expect_tcp("the next policy", &lab.inbound([Dropped, Allowed, Allowed, Dropped, Allowed]));
}

#[test]
fn remove_leaves_nothing_of_ours_and_foreign_objects_untouched() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new("fwk-rm");
    lab.b_sh(
        "iptables -N DOCKER-LIKE && iptables -A DOCKER-LIKE -s 198.19.1.0/24 -j RETURN && \
         iptables -A INPUT -j DOCKER-LIKE && \
         ip6tables -N DOCKER-LIKE && ip6tables -A DOCKER-LIKE -s 2001:2:0:99::/64 -j RETURN && \
         ip6tables -A INPUT -j DOCKER-LIKE && \
         ipset create foreign-set hash:ip && ipset add foreign-set 198.19.0.1",
    );
    let foreign = lab.everything();

    lab.apply(&policy(1, PolicyState::Enforced, &[A, A6])).unwrap();
    for family in Family::ALL {
        let filter = lab.filter(family);
        assert!(filter.contains("-A DOCKER-LIKE -s "), "{filter}");
        let input: Vec<&str> = filter.lines().filter(|l| l.starts_with("-A INPUT ")).collect();
        assert_eq!(
            input,
            ["-A INPUT -m comment --comment \"ven:jump\" -j VEN-INPUT", "-A INPUT -j DOCKER-LIKE"],
            "{family:?}"
        );
    }
    assert!(lab.sets().contains("add foreign-set 198.19.0.1"), "foreign set untouched");

    // Someone slips a rule in front of our jump. A new version with the same chains only
    // changes set members (the fast path reads nothing back); the tamper check finds the jump
    // out of place and the repair puts it back at rule 1.
    lab.b_sh("iptables -I INPUT 1 -j DOCKER-LIKE");
    lab.apply(&policy(2, PolicyState::Enforced, &[A, A6])).unwrap();
    assert_eq!(
        lab.verify(CheckDepth::Quick).unwrap(),
        ["IPv4: jump from INPUT to VEN-INPUT not alone at rule 1"]
    );
    lab.repair().unwrap();
    let filter = lab.filter(Family::V4);
    let input: Vec<&str> = filter.lines().filter(|l| l.starts_with("-A INPUT ")).collect();
    assert_eq!(
        input,
        [
            "-A INPUT -m comment --comment \"ven:jump\" -j VEN-INPUT",
            "-A INPUT -j DOCKER-LIKE",
            "-A INPUT -j DOCKER-LIKE"
        ]
    );
    lab.b_sh("iptables -D INPUT 2");

    lab.remove().unwrap();
    assert_eq!(lab.everything(), foreign);
    assert!(!lab.everything().contains("VEN-") && !lab.everything().contains("ven:"));
    assert!(!lab.sets().contains("ven-"));
    expect_tcp("nothing of ours left", &lab.inbound(OPEN));

    lab.remove().expect("remove is idempotent");
    assert_eq!(lab.everything(), foreign);
}

#[test]
fn every_rule_shape_loads_into_the_kernel() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new("fwk-shape");
    let rule = |id, direction, peers, protocol, ports: Option<(u16, u16)>| Rule {
        id,
        direction,
        peers,
        protocol,
        ports: ports.map(|(first, last)| PortRange { first, last }),
    };
    let everything = Policy {
        version: 1,
        state: PolicyState::Enforced,
        ip_sets: vec![
            IpSet { id: 1, members: vec![A.parse().unwrap(), "198.18.4.7/22".parse().unwrap()] },
            IpSet { id: 2, members: vec!["0.0.0.0/0".parse().unwrap(), "2001:2::1".parse().unwrap()] },
            IpSet { id: 3, members: Vec::new() },
        ],
        rules: vec![
            rule(1, Direction::Inbound, Peers::Set(1), Protocol::Tcp, Some((RULED, RULED))),
            rule(2, Direction::Inbound, Peers::Any, Protocol::Tcp, Some((7100, 7200))),
            rule(3, Direction::Inbound, Peers::Set(2), Protocol::Udp, Some((53, 53))),
            rule(4, Direction::Inbound, Peers::Any, Protocol::Icmp, None),
            rule(5, Direction::Inbound, Peers::Set(3), Protocol::Any, None),
            rule(6, Direction::Outbound, Peers::Set(1), Protocol::Udp, None),
            rule(7, Direction::Outbound, Peers::Any, Protocol::Any, None),
        ],
        custom_rules: Vec::new(),
    };
    let summary = lab.apply(&everything).unwrap();
    assert_eq!(summary.sets, 6, "three sets in each family");
    let filter = format!("{}\n{}", lab.filter(Family::V4), lab.filter(Family::V6));
    let hashed = filter.lines().filter(|l| l.contains("--comment \"ven:") && !l.contains("ven:jump")).count();
    assert_eq!(hashed, summary.rules, "{filter}");
    assert!(lab.sets().contains("add ven-1 198.18.4.0/22"), "host bits cleared");
    assert!(lab.sets().contains("add ven-2 128.0.0.0/1"), "/0 held as two halves");
    expect_tcp(
        "enforced",
        &[
            (&lab.a, addr(B, RULED), Allowed),
            (&lab.a, addr(B, OTHER), Dropped),
            (&lab.c, addr(B, RULED), Dropped),
            // Rule 7 opens all outbound.
            (&lab.b, addr(A, UNLISTED), Allowed),
        ],
    );
}

#[test]
fn ipv6_peers_are_policed_and_neighbour_discovery_survives_enforcement() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new("fwk-six");
    let summary = lab.apply(&policy(1, PolicyState::Enforced, &[A, A6])).unwrap();
    assert_eq!(summary.sets, 2);
    assert!(lab.sets().contains(&format!("add ven-1-6 {A6}")), "{}", lab.sets());
    assert!(!lab.sets().contains(&format!("add ven-1 {A6}")), "{}", lab.sets());
    let v6 = Family::V6;
    assert_eq!(lab.logged(v6, "VEN-INPUT", "ven:a:1"), 0);
    assert_eq!(lab.logged(v6, "VEN-INPUT", "ven:d:0"), 0);

    expect_tcp(
        "IPv6 enforced",
        &[
            (&lab.a, addr(B6, RULED), Allowed),
            (&lab.a, addr(B6, OTHER), Dropped),
            (&lab.c, addr(B6, RULED), Dropped),
            (&lab.a, addr(B, RULED), Allowed),
        ],
    );
    assert!(lab.logged(v6, "VEN-INPUT", "ven:a:1") > 0, "{:?}", lab.input_logs(v6));
    assert!(lab.logged(v6, "VEN-INPUT", "ven:d:0") > 0, "{:?}", lab.input_logs(v6));
    assert_eq!(lab.logged(Family::V4, "VEN-INPUT", "ven:d:0"), 0, "IPv6 drops are not IPv4's");

    // Forget every neighbour: the next connection needs neighbour solicitations and
    // advertisements through both of B's chains, which must not drop them.
    let solicitations = |lab: &Lab| lab.packets(v6, "VEN-INPUT", "--icmpv6-type 135 ");
    let before = solicitations(&lab);
    for host in [&lab.a, &lab.b, &lab.c] {
        host.ip(&["-6", "neigh", "flush", "all"]).expect("neigh flush");
    }
    expect_tcp(
        "after the neighbour caches were flushed",
        &[(&lab.a, addr(B6, RULED), Allowed), (&lab.c, addr(B6, RULED), Dropped)],
    );
    assert!(solicitations(&lab) > before, "the neighbour solicitations passed our rule");
    let neighbours = lab.b.ip(&["-6", "neigh", "show", A6]).expect("neigh show");
    let neighbours = String::from_utf8_lossy(&neighbours.stdout);
    assert!(neighbours.contains("lladdr"), "B resolved A again: {neighbours}");
}

/// A fail-safe service port on B that no rule opens.
const FAILSAFE: u16 = 7022;
/// B's interface the board ignores, to host D.
const IGNORED: &str = "ign0";
const B_IGNORED: &str = "198.18.1.2";
const D: &str = "198.18.1.4";

#[test]
fn failsafe_services_and_ignored_interfaces_stay_open_under_enforcement() {
    if !require_kernel() {
        return;
    }
    let options = Options {
        failsafe: vec![Service {
            direction: ServiceDirection::Inbound,
            protocol: Protocol::Tcp,
            port: FAILSAFE,
        }],
        ignored_interfaces: vec![IGNORED.to_string()],
        ..Options::default()
    };
    let mut lab = Lab::with_config("fwk-safe", FirewallConfig { tools: Tools::plain(), options });
    // Host D on a second link of B's, the ignored one.
    let d = Netns::new("fwk-safed").expect("namespace d");
    d.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", IGNORED, "netns", lab.b.name()])
        .expect("veth to d");
    d.ip(&["addr", "add", &format!("{D}/24"), "dev", "eth0"]).unwrap();
    d.ip(&["link", "set", "eth0", "up"]).unwrap();
    lab.b.ip(&["addr", "add", &format!("{B_IGNORED}/24"), "dev", IGNORED]).unwrap();
    lab.b.ip(&["link", "set", IGNORED, "up"]).unwrap();
    // A reaches B's address on that link too, but over the policed eth0.
    lab.a.ip(&["route", "add", "198.18.1.0/24", "via", B]).unwrap();
    for listener in [
        listen(&lab.b, B, FAILSAFE),
        listen(&lab.b, B6, FAILSAFE),
        listen(&lab.b, B_IGNORED, OTHER),
        listen(&d, D, UNLISTED),
    ] {
        lab.keep(listener);
    }

    let empty = Policy {
        version: 1,
        state: PolicyState::Enforced,
        ip_sets: Vec::new(),
        rules: Vec::new(),
        custom_rules: Vec::new(),
    };
    lab.apply(&empty).unwrap();
    expect_tcp(
        "an enforced empty policy",
        &[
            (&lab.a, addr(B, FAILSAFE), Allowed),
            (&lab.c, addr(B, FAILSAFE), Allowed),
            (&lab.a, addr(B6, FAILSAFE), Allowed),
            (&lab.a, addr(B, RULED), Dropped),
            (&lab.a, addr(B6, OTHER), Dropped),
            (&d, addr(B_IGNORED, OTHER), Allowed),
            (&lab.a, addr(B_IGNORED, OTHER), Dropped),
            (&lab.b, addr(D, UNLISTED), Allowed),
            (&lab.b, addr(A, UNLISTED), Dropped),
        ],
    );
    assert!(
        lab.packets(Family::V4, "VEN-INPUT", &format!("-i {IGNORED} ")) > 0,
        "D's traffic returned early"
    );
    drop(d);
}

/// A port only a custom rule opens.
const CUSTOM: u16 = 7010;

fn custom(id: u32, family: RuleFamily, chain: CustomChain, rule: &str) -> CustomRule {
    CustomRule { id, family, chain, rule: rule.to_string() }
}

#[test]
fn custom_rules_open_ports_and_one_the_kernel_rejects_changes_nothing() {
    if !require_kernel() {
        return;
    }
    let mut lab = Lab::new("fwk-cust");
    lab.keep(listen(&lab.b, B, CUSTOM));
    lab.keep(listen(&lab.b, B6, CUSTOM));
    let mut with_custom = policy(1, PolicyState::Enforced, &[A, A6]);
    with_custom.custom_rules = vec![
        custom(1, RuleFamily::Both, CustomChain::Input, &format!("-p tcp --dport {CUSTOM} -j ACCEPT")),
        custom(2, RuleFamily::V4, CustomChain::Output, &format!("-p tcp --dport {UNLISTED} -j ACCEPT")),
    ];
    lab.apply(&with_custom).unwrap();
    let mut probes = lab.inbound(ONLY_A);
    probes.extend([
        (&lab.c, addr(B, CUSTOM), Allowed),
        (&lab.c, addr(B6, CUSTOM), Allowed),
        (&lab.b, addr(A, UNLISTED), Allowed),
    ]);
    expect_tcp("custom rules in force", &probes);
    assert!(lab.packets(Family::V4, "VEN-CUSTOM-IN", &format!("--dport {CUSTOM} ")) > 0);
    let before = lab.everything();

    // A port number the kernel refuses passes our validation: only the kernel can reject it.
    let bad_rule = "-p tcp --dport 99999 -j ACCEPT";
    for (bad_family, program) in
        [(RuleFamily::Both, "iptables-restore"), (RuleFamily::V6, "ip6tables-restore")]
    {
        let mut bad = with_custom.clone();
        bad.version = 2;
        bad.ip_sets[0].members.push(C.parse().unwrap());
        bad.ip_sets.push(IpSet { id: 2, members: vec![C6.parse().unwrap()] });
        // IPv4 changes too, so with the bad rule in IPv6 only, IPv4 is replaced and must go back.
        bad.custom_rules.push(custom(3, RuleFamily::V4, CustomChain::Input, "-p tcp --dport 7011 -j ACCEPT"));
        bad.custom_rules.push(custom(4, bad_family, CustomChain::Input, bad_rule));
        validate(&bad, &Caps::default()).expect("the bad rule has a valid shape");
        let err = lab.apply(&bad).unwrap_err();
        match &err {
            FirewallError::Restore { program: failed, table, stderr, .. } => {
                assert_eq!(failed, &PathBuf::from(program), "{err}");
                assert_eq!(*table, "filter");
                assert!(stderr.contains("99999"), "{stderr}");
            }
            other => panic!("{bad_family:?}: expected a restore error, got {other}"),
        }
        assert_eq!(lab.everything(), before, "{bad_family:?}: both families and every set as before");
        assert_eq!(lab.verify(CheckDepth::Full).unwrap(), Vec::<String>::new(), "{bad_family:?}");
    }
    expect_tcp("the previous policy still in force", &probes);
}

#[test]
fn backend_detection_and_a_legacy_apply_in_a_namespace() {
    if !require_kernel()
        || !require_tools(&["iptables-legacy", "iptables-legacy-save", "iptables-nft", "iptables-nft-save"])
    {
        return;
    }
    let detect_in = |host: &Netns| host.run(backend::detect).expect("enter namespace");

    let legacy = Netns::new("fwk-bel").expect("namespace");
    sh(&legacy, "iptables-legacy -A INPUT -s 198.19.0.1/32 -j ACCEPT");
    assert!(
        std::path::Path::new("/proc/net/ip_tables_names").exists(),
        "the legacy modules are loaded once a legacy rule exists"
    );
    assert_eq!(detect_in(&legacy), Backend::Legacy, "legacy holds more rules");

    let nft = Netns::new("fwk-ben").expect("namespace");
    sh(&nft, "iptables-nft -A INPUT -s 198.19.0.1/32 -j ACCEPT");
    assert_eq!(detect_in(&nft), Backend::Nft, "nft holds more rules");

    let hinted = Netns::new("fwk-beh").expect("namespace");
    sh(
        &hinted,
        "iptables-legacy -A INPUT -s 198.19.0.1/32 -j ACCEPT && iptables-legacy -A INPUT -s 198.19.0.2/32 -j ACCEPT && \
         iptables-nft -t mangle -N KUBE-IPTABLES-HINT",
    );
    assert_eq!(detect_in(&hinted), Backend::Nft, "Kubernetes' hint chain wins over rule counts");
    drop((legacy, nft, hinted));

    let config = FirewallConfig { tools: Tools::for_backend(Backend::Legacy), options: Options::default() };
    assert_eq!(config.tools.backend, Backend::Legacy);
    let lab = Lab::with_config("fwk-leg", config);
    lab.apply(&policy(1, PolicyState::Enforced, &[A, A6])).unwrap();
    expect_tcp("enforced through legacy tables", &lab.inbound(ONLY_A));
    for (legacy_save, nft_save) in
        [("iptables-legacy-save", "iptables-nft-save"), ("ip6tables-legacy-save", "ip6tables-nft-save")]
    {
        let legacy = lab.filter_of(legacy_save);
        assert!(
            legacy.contains("\n:VEN-INPUT -\n") && legacy.contains("ven:jump"),
            "{legacy_save}: {legacy}"
        );
        let nft = lab.filter_of(nft_save);
        assert!(!nft.contains("VEN-") && !nft.contains("ven:"), "{nft_save}: {nft}");
    }
    assert_eq!(lab.verify(CheckDepth::Full).unwrap(), Vec::<String>::new());
    lab.remove().unwrap();
    assert!(!lab.filter_of("iptables-legacy-save").contains("VEN-"));
    expect_tcp("removed", &lab.inbound(OPEN));
}

#[test]
fn snapshot_leaves_ours_out_and_restoring_it_brings_the_host_back() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new("fwk-snap");
    lab.b_sh(
        "iptables -N HOST-IN && iptables -A HOST-IN -s 198.19.5.0/24 -j DROP && iptables -A INPUT -j HOST-IN && \
         iptables -t nat -A POSTROUTING -s 198.19.6.0/24 -j MASQUERADE && \
         ip6tables -N HOST-IN && ip6tables -A HOST-IN -s 2001:2:0:5::/64 -j DROP && ip6tables -A INPUT -j HOST-IN && \
         ipset create host-set hash:ip && ipset add host-set 198.19.5.5",
    );
    let host = lab.everything();
    let nat = || {
        strip_counters(&String::from_utf8_lossy(&lab.b.exec("iptables-save", &["-t", "nat"]).unwrap().stdout))
    };
    let host_nat = nat();
    lab.apply(&policy(1, PolicyState::Enforced, &[A, A6])).unwrap();

    let firewall = std::sync::Arc::new(ven::firewall::Firewall::new(FirewallConfig::default()));
    let taker = firewall.clone();
    let snapshot = lab.b.run(move || taker.snapshot()).unwrap().unwrap();
    for text in [&snapshot.v4, snapshot.v6.as_ref().expect("IPv6 is on"), &snapshot.ipsets] {
        assert!(!text.contains("VEN-") && !text.contains("ven:") && !text.contains("ven-"), "{text}");
    }
    assert!(snapshot.v4.contains("-A HOST-IN -s 198.19.5.0/24 -j DROP"), "{}", snapshot.v4);
    assert!(snapshot.v4.contains("*nat"), "every table: {}", snapshot.v4);

    // The host's rules change after the snapshot; restoring it brings them back as they were.
    lab.b_sh(
        "iptables -D INPUT -j HOST-IN && iptables -t nat -F POSTROUTING && ipset del host-set 198.19.5.5",
    );
    lab.b.run(move || firewall.restore_snapshot(&snapshot)).unwrap().unwrap();
    assert_eq!(lab.everything(), host);
    assert_eq!(nat(), host_nat);
    expect_tcp("ours gone", &lab.inbound(OPEN));
}

#[test]
fn idle_after_a_policy_with_empty_sets_reports_a_change() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new("fwk-bug-idle");
    let pristine = lab.everything();
    lab.apply(&policy(1, PolicyState::Enforced, &[])).unwrap();
    let summary = lab.apply(&policy(2, PolicyState::Idle, &[])).unwrap();
    assert_eq!(lab.everything(), pristine, "idle removed our chains and sets");
    assert!(summary.changed, "the chains and sets went away, so the kernel changed: {summary:?}");
}

#[test]
fn turning_ipv6_off_takes_away_what_an_earlier_ipv6_apply_left() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new("fwk-bug-v6");
    lab.apply(&policy(1, PolicyState::Enforced, &[A, A6])).unwrap();
    // The board's configuration turns IPv6 off (e.g. the agent restarts with ipv6 = false).
    let v4_only =
        || FirewallConfig { tools: Tools::plain(), options: Options { ipv6: false, ..Options::default() } };
    lab.apply_with(v4_only(), &policy(2, PolicyState::Enforced, &[A, A6])).unwrap();
    let v6 = lab.filter(Family::V6);
    assert!(
        !v6.contains("VEN-") && !lab.sets().contains("ven-1-6"),
        "stale IPv6 policy left in force:\n{v6}"
    );
    let config = v4_only();
    let removed = lab.b.run(move || ven::firewall::Firewall::new(config).remove()).unwrap();
    assert!(removed.is_ok(), "{removed:?}");
    assert!(!lab.everything().contains("VEN-") && !lab.everything().contains("ven-"), "{}", lab.everything());
}
