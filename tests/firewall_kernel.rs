//! Kernel tests of the firewall: real iptables-restore and ipset in fresh network namespaces,
//! judged by real TCP connections.
//!
//! Each test builds its own lab: hosts A (198.18.0.1, in the policy's peer set), B (198.18.0.2,
//! runs the firewall) and C (198.18.0.3, never a member) on one segment. Namespace names are
//! unique (prefix, pid, counter), so tests run in parallel; everything goes when the lab drops.
//! Without namespaces the tests are skipped loudly, except under CI, where they fail.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::time::Duration;

use ven::firewall::{ApplySummary, Firewall, FirewallConfig, FirewallError, PolicyError, Safeguards, Tools};
use ven_lab::netns::{self, Netns, Segment};
use ven_proto::{Direction, IpSet, Peers, Policy, PolicyState, PortRange, Protocol, Rule};

const A: &str = "198.18.0.1";
const B: &str = "198.18.0.2";
const C: &str = "198.18.0.3";
/// The port policy rule 1 opens on B.
const RULED: u16 = 7001;
/// A port on B no rule opens.
const OTHER: u16 = 7002;
/// The PCE's API port on A (a management endpoint).
const MANAGEMENT: u16 = 8443;
/// A port on A nothing allows B to reach.
const UNLISTED: u16 = 9000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

fn require_kernel() -> bool {
    let missing = netns::available().err().or_else(|| {
        ["iptables-restore", "iptables-save", "ipset"]
            .into_iter()
            .find(|tool| netns::run(tool, &["--version"]).is_err())
            .map(|tool| format!("{tool} is not installed"))
    });
    match missing {
        None => true,
        Some(why) if std::env::var_os("CI").is_some() => {
            panic!("firewall kernel test cannot run under CI: {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED: firewall kernel test needs network namespaces, iptables and ipset: {why}");
            false
        }
    }
}

struct Lab {
    a: Netns,
    b: Netns,
    c: Netns,
    // Dropped after the hosts (fields drop in order), taking the bridge with it.
    _segment: Segment,
    /// Kept open for the lab's lifetime; connections complete in the backlog.
    _listeners: Vec<TcpListener>,
}

impl Lab {
    fn new(prefix: &str) -> Self {
        let segment = Segment::new(&format!("{prefix}s")).expect("segment");
        let a = Netns::new(&format!("{prefix}a")).expect("namespace a");
        let b = Netns::new(&format!("{prefix}b")).expect("namespace b");
        let c = Netns::new(&format!("{prefix}c")).expect("namespace c");
        for (host, address) in [(&a, A), (&b, B), (&c, C)] {
            segment.attach(host, &format!("{address}/24")).expect("attach");
        }
        let listeners = vec![
            listen(&b, B, RULED),
            listen(&b, B, OTHER),
            listen(&a, A, MANAGEMENT),
            listen(&a, A, UNLISTED),
        ];
        Self { a, b, c, _segment: segment, _listeners: listeners }
    }

    /// Applies `policy` on B with the real tools.
    fn apply(&self, policy: &Policy) -> Result<ApplySummary, FirewallError> {
        self.apply_with(FirewallConfig::default(), policy)
    }

    fn apply_with(&self, config: FirewallConfig, policy: &Policy) -> Result<ApplySummary, FirewallError> {
        let policy = policy.clone();
        self.b.run(move || Firewall::new(config).apply(&policy, &safeguards())).expect("enter namespace b")
    }

    fn remove(&self) -> Result<(), FirewallError> {
        self.b
            .run(|| Firewall::new(FirewallConfig::default()).remove().map(|_| ()))
            .expect("enter namespace b")
    }

    /// B's table filter as iptables-save prints it, without comments and counters.
    fn filter(&self) -> String {
        let output = self.b.exec("iptables-save", &["-t", "filter"]).expect("iptables-save");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| match line.split_once(" [") {
                Some((declaration, _)) if line.starts_with(':') => declaration.to_string(),
                _ => line.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// B's sets as `ipset save` prints them, without the random `initval` of each hash (a set
    /// rebuilt and swapped in has a new one).
    fn sets(&self) -> String {
        let output = self.b.exec("ipset", &["save"]).expect("ipset save");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| match line.find(" initval ") {
                Some(at) => &line[..at],
                None => line,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn b_sh(&self, script: &str) {
        self.b.exec("sh", &["-c", script]).expect(script);
    }

    /// Whether A, B's ruled port, B's other port and C reach what they should.
    fn inbound(&self) -> [bool; 3] {
        [connects(&self.a, B, RULED), connects(&self.a, B, OTHER), connects(&self.c, B, RULED)]
    }
}

fn listen(host: &Netns, address: &str, port: u16) -> TcpListener {
    let address: SocketAddr = format!("{address}:{port}").parse().expect("address");
    host.run(move || TcpListener::bind(address)).expect("enter namespace").expect("listen")
}

/// Whether a TCP connection from `from` to `address:port` completes within a second.
fn connects(from: &Netns, address: &str, port: u16) -> bool {
    let address: SocketAddr = format!("{address}:{port}").parse().expect("address");
    from.run(move || TcpStream::connect_timeout(&address, CONNECT_TIMEOUT).is_ok()).expect("enter namespace")
}

fn safeguards() -> Safeguards {
    Safeguards { management: vec![format!("{A}:{MANAGEMENT}").parse().expect("endpoint")] }
}

/// Enforced: rule 1 lets the members of set 1 reach B's RULED port.
fn policy(version: u64, members: &[&str]) -> Policy {
    Policy {
        version,
        state: PolicyState::Enforced,
        ip_sets: vec![IpSet { id: 1, members: members.iter().map(|m| m.parse().expect("member")).collect() }],
        rules: vec![Rule {
            id: 1,
            direction: Direction::Inbound,
            peers: Peers::Set(1),
            protocol: Protocol::Tcp,
            ports: Some(PortRange { first: RULED, last: RULED }),
        }],
        custom_rules: Vec::new(),
    }
}

const OPEN: [bool; 3] = [true, true, true];
/// A allowed on the ruled port; the other port and C dropped.
const ONLY_A: [bool; 3] = [true, false, false];

#[test]
fn enforced_policy_allows_the_ruled_port_from_the_peer_set_only() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new("fwk-enf");
    assert_eq!(lab.inbound(), OPEN, "no firewall yet");
    let summary = lab.apply(&policy(1, &[A])).unwrap();
    assert_eq!(summary.sets, 2, "ven-1 and its IPv6 twin ven-1-6");
    assert_eq!(summary.set_members_added, 1);
    assert_eq!(lab.inbound(), ONLY_A);
    assert!(connects(&lab.b, A, MANAGEMENT), "the management channel stays open outbound");
    assert!(!connects(&lab.b, A, UNLISTED), "other outbound connections are dropped");
    assert!(connects(&lab.b, B, OTHER), "B reaches itself over loopback");
}

#[test]
fn set_membership_changes_by_delta_and_an_emptied_set_blocks() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new("fwk-delta");
    lab.apply(&policy(1, &[A])).unwrap();
    assert_eq!(lab.inbound(), ONLY_A);

    let summary = lab.apply(&policy(2, &[C])).unwrap();
    assert_eq!((summary.set_members_added, summary.set_members_removed), (1, 1));
    assert_eq!(lab.inbound(), [false, false, true], "C in, A out");
    assert!(lab.sets().contains(&format!("add ven-1 {C}")));

    let summary = lab.apply(&policy(3, &[])).unwrap();
    assert_eq!((summary.set_members_added, summary.set_members_removed), (0, 1));
    assert_eq!(lab.inbound(), [false, false, false], "an emptied set allows nobody");
    assert!(connects(&lab.b, A, MANAGEMENT));
}

#[test]
fn invalid_policy_is_rejected_and_the_previous_ruleset_keeps_working() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new("fwk-inval");
    lab.apply(&policy(1, &[A])).unwrap();
    let (filter, sets) = (lab.filter(), lab.sets());

    let mut bad = policy(2, &[A, C]);
    bad.rules.push(bad.rules[0].clone());
    bad.rules[1].ports = None;
    let err = lab.apply(&bad).unwrap_err();
    assert!(matches!(err, FirewallError::Policy(PolicyError::DuplicateRuleId(1))), "{err}");

    assert_eq!(lab.filter(), filter);
    assert_eq!(lab.sets(), sets);
    assert_eq!(lab.inbound(), ONLY_A);
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
    lab.apply(&policy(1, &[A])).unwrap();
    let (filter, sets) = (lab.filter(), lab.sets());

    // The next policy changes set 1 (A out, C in) and adds set 2: all of it must be undone.
    let mut next = policy(2, &[C]);
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

    assert_eq!(lab.filter(), filter);
    assert_eq!(lab.sets(), sets, "set contents as before, the new set destroyed");
    assert_eq!(lab.inbound(), ONLY_A);

    // And the real tools still apply it afterwards.
    lab.apply(&next).unwrap();
    assert_eq!(lab.inbound(), [false, true, true]);
}

#[test]
fn remove_leaves_nothing_of_ours_and_foreign_objects_untouched() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new("fwk-rm");
    lab.b_sh(
        "iptables -N DOCKER-LIKE && iptables -A DOCKER-LIKE -s 10.1.0.0/16 -j RETURN && \
         iptables -A INPUT -j DOCKER-LIKE && \
         ipset create foreign-set hash:ip && ipset add foreign-set 10.0.0.1",
    );
    let foreign_filter = lab.filter();
    let foreign_sets = lab.sets();

    lab.apply(&policy(1, &[A])).unwrap();
    let filter = lab.filter();
    assert!(filter.contains("-A DOCKER-LIKE -s 10.1.0.0/16 -j RETURN"), "{filter}");
    assert!(lab.sets().starts_with(&foreign_sets), "foreign set untouched");
    let input: Vec<&str> = filter.lines().filter(|l| l.starts_with("-A INPUT ")).collect();
    assert_eq!(input, ["-A INPUT -m comment --comment \"ven:jump\" -j VEN-INPUT", "-A INPUT -j DOCKER-LIKE"]);

    // Someone slips a rule in front of our jump; the next apply puts the jump back at rule 1.
    lab.b_sh("iptables -I INPUT 1 -j DOCKER-LIKE");
    lab.apply(&policy(2, &[A])).unwrap();
    let filter = lab.filter();
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
    assert_eq!(lab.filter(), foreign_filter);
    assert_eq!(lab.sets(), foreign_sets);
    assert!(!lab.filter().contains("VEN-") && !lab.filter().contains("ven:"));
    assert!(!lab.sets().contains("ven-"));
    assert_eq!(lab.inbound(), OPEN);

    lab.remove().expect("remove is idempotent");
    assert_eq!(lab.filter(), foreign_filter);
}

#[test]
fn idle_state_removes_everything() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new("fwk-idle");
    let pristine = (lab.filter(), lab.sets());
    lab.apply(&policy(1, &[A])).unwrap();
    assert_eq!(lab.inbound(), ONLY_A);

    let mut idle = policy(2, &[A]);
    idle.state = PolicyState::Idle;
    let summary = lab.apply(&idle).unwrap();
    assert_eq!(summary.rules, 0);
    assert_eq!((lab.filter(), lab.sets()), pristine);
    assert_eq!(lab.inbound(), OPEN);
}

#[test]
fn build_and_test_states_block_nothing() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new("fwk-build");
    for state in [PolicyState::Build, PolicyState::Test] {
        let mut open = policy(1, &[A]);
        open.state = state;
        lab.apply(&open).unwrap();
        assert_eq!(lab.inbound(), OPEN, "{state}");
        assert!(connects(&lab.b, A, UNLISTED), "{state}");
        assert!(lab.filter().contains("-A INPUT -m comment --comment \"ven:jump\" -j VEN-INPUT"));
    }
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
            IpSet { id: 2, members: vec!["0.0.0.0/0".parse().unwrap(), "2001:db8::1".parse().unwrap()] },
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
    let v6 = lab.b.exec("ip6tables-save", &["-t", "filter"]).expect("ip6tables-save");
    let filter = format!("{}\n{}", lab.filter(), String::from_utf8_lossy(&v6.stdout));
    let hashed = filter.lines().filter(|l| l.contains("--comment \"ven:") && !l.contains("ven:jump")).count();
    assert_eq!(hashed, summary.rules, "{filter}");
    assert!(lab.sets().contains("add ven-1 198.18.4.0/22"), "host bits cleared");
    assert!(lab.sets().contains("add ven-2 128.0.0.0/1"), "/0 held as two halves");
    assert_eq!(lab.inbound(), [true, false, false]);
    assert!(connects(&lab.b, A, UNLISTED), "rule 7 opens all outbound");
}
