//! The lab shared by the firewall kernel tests (`firewall_kernel.rs`, `firewall_tamper.rs`).
//!
//! Hosts A (198.18.0.1, 2001:2::1: in the policy's peer set), B (198.18.0.2, 2001:2::2: runs
//! the firewall) and C (198.18.0.3, 2001:2::3: never a member) on one segment. Namespace names
//! are unique (prefix, pid, counter), so tests run in parallel; everything goes when the lab
//! drops. One [`Firewall`] per lab, kept across calls, so verify and repair see what the last
//! apply wrote. Verdicts come from real connections: TCP handshakes and UDP datagrams.
// Each test crate uses a part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ven::firewall::{ApplySummary, CheckDepth, Family, Firewall, FirewallConfig, FirewallError, Safeguards};
use ven_lab::netns::{self, Netns, Segment};
use ven_lab::probe::{self, Verdict};
use ven_proto::{Direction, IpSet, Peers, Policy, PolicyState, PortRange, Protocol, Rule};

pub const A: &str = "198.18.0.1";
pub const B: &str = "198.18.0.2";
pub const C: &str = "198.18.0.3";
pub const A6: &str = "2001:2::1";
pub const B6: &str = "2001:2::2";
pub const C6: &str = "2001:2::3";
/// The TCP port policy rule 1 opens on B.
pub const RULED: u16 = 7001;
/// A TCP port on B no rule opens.
pub const OTHER: u16 = 7002;
/// A UDP port on B (rule 2 of [`policy_with_udp`] opens it).
pub const UDP_PORT: u16 = 7003;
/// The PCE's API port on A (a management endpoint).
pub const MANAGEMENT: u16 = 8443;
/// A port on A nothing allows B to reach.
pub const UNLISTED: u16 = 9000;

/// How long a probe expected to be dropped waits for an answer. On a veth segment an allowed
/// handshake completes in well under a millisecond; a dropped SYN never gets one.
pub const DROP_WAIT: Duration = Duration::from_millis(750);
/// How long a probe expected to get through may take (only reached when it does not).
pub const ALLOW_WAIT: Duration = Duration::from_secs(5);

/// Whether the namespaces and tools are here; skips loudly, except under CI, where it fails.
pub fn require_kernel() -> bool {
    require_tools(&["iptables-restore", "iptables-save", "ip6tables-restore", "ip6tables-save", "ipset"])
}

/// As [`require_kernel`], for extra tools.
pub fn require_tools(tools: &[&str]) -> bool {
    let missing = netns::available().err().or_else(|| {
        tools
            .iter()
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

/// What a connection should meet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// The handshake completes (or the datagram arrives).
    Allowed,
    /// No answer at all (a DROP, not a refusal).
    Dropped,
}

pub use Reach::{Allowed, Dropped};

pub fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().expect("address"), port)
}

/// A TCP listener made inside `host`; connections complete in its backlog.
pub fn listen(host: &Netns, ip: &str, port: u16) -> TcpListener {
    probe::listen(host, addr(ip, port)).expect("enter namespace").expect("listen")
}

/// Connects from every `(from, to, expected)` at once and fails listing every probe whose
/// verdict differs: one wait for all the drops.
#[track_caller]
pub fn expect_tcp(what: &str, probes: &[(&Netns, SocketAddr, Reach)]) {
    let verdicts: Vec<Verdict> = std::thread::scope(|scope| {
        let handles: Vec<_> = probes
            .iter()
            .map(|(from, to, reach)| {
                let wait = if *reach == Allowed { ALLOW_WAIT } else { DROP_WAIT };
                let (from, to) = (*from, *to);
                scope.spawn(move || probe::connect(from, to, wait).expect("enter namespace"))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("probe thread")).collect()
    });
    let wrong: Vec<String> = probes
        .iter()
        .zip(&verdicts)
        .filter(|((_, _, reach), verdict)| match reach {
            Allowed => **verdict != Verdict::Allowed,
            Dropped => **verdict != Verdict::Dropped,
        })
        .map(|((from, to, reach), verdict)| {
            format!("{} -> {to}: expected {reach:?}, got {verdict}", from.name())
        })
        .collect();
    assert!(wrong.is_empty(), "{what}:\n  {}", wrong.join("\n  "));
}

static NEXT_DATAGRAM: AtomicU64 = AtomicU64::new(0);

pub struct Lab {
    pub a: Netns,
    pub b: Netns,
    pub c: Netns,
    // Dropped after the hosts (fields drop in order), taking the bridge with it.
    pub segment: Segment,
    /// Kept open for the lab's lifetime; connections complete in the backlog.
    listeners: Vec<TcpListener>,
    /// B's UDP socket on [`UDP_PORT`].
    udp: UdpSocket,
    firewall: Arc<Firewall>,
}

impl Lab {
    /// The lab with the default firewall configuration (IPv6 on, fail-safe tcp/22).
    pub fn new(prefix: &str) -> Self {
        Self::with_config(prefix, FirewallConfig::default())
    }

    pub fn with_config(prefix: &str, config: FirewallConfig) -> Self {
        let segment = Segment::new(&format!("{prefix}s")).expect("segment");
        let a = Netns::new(&format!("{prefix}a")).expect("namespace a");
        let b = Netns::new(&format!("{prefix}b")).expect("namespace b");
        let c = Netns::new(&format!("{prefix}c")).expect("namespace c");
        for (host, v4, v6) in [(&a, A, A6), (&b, B, B6), (&c, C, C6)] {
            segment.attach(host, &format!("{v4}/24")).expect("attach");
            // nodad: usable at once, no duplicate address detection to wait for.
            host.ip(&["-6", "addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]).expect("ipv6");
        }
        let listeners = vec![
            listen(&b, B, RULED),
            listen(&b, B, OTHER),
            listen(&b, B6, RULED),
            listen(&b, B6, OTHER),
            listen(&a, A, MANAGEMENT),
            listen(&a, A, UNLISTED),
        ];
        let target = addr(B, UDP_PORT);
        let udp = b.run(move || UdpSocket::bind(target)).expect("enter namespace b").expect("udp");
        let firewall = Arc::new(Firewall::new(config));
        Self { a, b, c, segment, listeners, udp, firewall }
    }

    /// Keeps a listener for the lab's lifetime.
    pub fn keep(&mut self, listener: TcpListener) {
        self.listeners.push(listener);
    }

    /// Accepts and closes what waits in every listener's backlog (so it never fills up).
    pub fn drain(&self) {
        for listener in &self.listeners {
            probe::drain(listener);
        }
    }

    /// Applies `policy` on B with the lab's firewall.
    pub fn apply(&self, policy: &Policy) -> Result<ApplySummary, FirewallError> {
        let (firewall, policy) = (self.firewall.clone(), policy.clone());
        self.b.run(move || firewall.apply(&policy, &safeguards())).expect("enter namespace b")
    }

    /// Applies `policy` on B with a one-off firewall of another configuration.
    pub fn apply_with(&self, config: FirewallConfig, policy: &Policy) -> Result<ApplySummary, FirewallError> {
        let policy = policy.clone();
        self.b.run(move || Firewall::new(config).apply(&policy, &safeguards())).expect("enter namespace b")
    }

    pub fn verify(&self, depth: CheckDepth) -> Result<Vec<String>, FirewallError> {
        let firewall = self.firewall.clone();
        self.b.run(move || firewall.verify(depth)).expect("enter namespace b")
    }

    pub fn repair(&self) -> Result<ApplySummary, FirewallError> {
        let firewall = self.firewall.clone();
        self.b.run(move || firewall.repair()).expect("enter namespace b")
    }

    pub fn remove(&self) -> Result<usize, FirewallError> {
        let firewall = self.firewall.clone();
        self.b.run(move || firewall.remove()).expect("enter namespace b")
    }

    /// B's table filter of `family` as the save tool prints it, without comments and chain
    /// counters.
    pub fn filter(&self, family: Family) -> String {
        self.filter_of(save_tool(family))
    }

    /// Table filter as `program` (an iptables-save flavour) prints it in B, as [`Lab::filter`].
    pub fn filter_of(&self, program: &str) -> String {
        let output = self.b.exec(program, &["-t", "filter"]).expect(program);
        strip_counters(&String::from_utf8_lossy(&output.stdout))
    }

    /// Both families' table filter and the sets, as [`Lab::filter`] and [`Lab::sets`].
    pub fn everything(&self) -> String {
        format!("{}\n{}\n{}", self.filter(Family::V4), self.filter(Family::V6), self.sets())
    }

    /// B's sets as `ipset save` prints them, without the random `initval` of each hash (a set
    /// rebuilt and swapped in has a new one).
    pub fn sets(&self) -> String {
        self.sets_raw()
            .lines()
            .map(|line| match line.find(" initval ") {
                Some(at) => &line[..at],
                None => line,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `ipset save` in B, byte for byte.
    pub fn sets_raw(&self) -> String {
        let output = self.b.exec("ipset", &["save"]).expect("ipset save");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs a shell script in B; fails the test when it fails.
    #[track_caller]
    pub fn b_sh(&self, script: &str) {
        sh(&self.b, script);
    }

    /// Packet counters of the rules of `chain` in B, by rule text (`-A ...`), in chain order.
    pub fn counters(&self, family: Family, chain: &str) -> Vec<(String, u64)> {
        let output = self.b.exec(save_tool(family), &["-c", "-t", "filter"]).expect("save -c");
        let start = format!("-A {chain} ");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                let (counts, rule) = line.strip_prefix('[')?.split_once("] ")?;
                let packets = counts.split(':').next()?.parse().ok()?;
                rule.starts_with(&start).then(|| (rule.to_string(), packets))
            })
            .collect()
    }

    /// Packets counted by the one rule of `chain` whose text contains `needle`; fails when
    /// no rule or several rules match.
    #[track_caller]
    pub fn packets(&self, family: Family, chain: &str, needle: &str) -> u64 {
        let counters = self.counters(family, chain);
        let matching: Vec<&(String, u64)> =
            counters.iter().filter(|(rule, _)| rule.contains(needle)).collect();
        match matching.as_slice() {
            [(_, packets)] => *packets,
            _ => panic!("{} rules of {chain} ({family:?}) contain {needle:?}: {counters:#?}", matching.len()),
        }
    }

    /// Packets counted by the NFLOG rule of `chain` with this prefix (`ven:d:0`, `ven:a:1`, ...).
    #[track_caller]
    pub fn logged(&self, family: Family, chain: &str, prefix: &str) -> u64 {
        self.packets(family, chain, &format!("-j NFLOG --nflog-prefix \"{prefix}\" "))
    }

    /// The NFLOG counters of VEN-INPUT, by prefix (what the flow pipeline would have seen).
    pub fn input_logs(&self, family: Family) -> BTreeMap<String, u64> {
        self.counters(family, "VEN-INPUT")
            .into_iter()
            .filter_map(|(rule, packets)| {
                let at = rule.find("--nflog-prefix \"")? + "--nflog-prefix \"".len();
                let prefix = rule[at..].split('"').next()?.to_string();
                Some((prefix, packets))
            })
            .collect()
    }

    /// Sends one datagram from `from` to B's [`UDP_PORT`] and reports whether B's socket
    /// received it.
    pub fn udp_to_b(&self, from: &Netns, reach: Reach) -> Reach {
        let payload = format!("probe {}", NEXT_DATAGRAM.fetch_add(1, Ordering::Relaxed));
        let target = addr(B, UDP_PORT);
        let sent = payload.clone();
        from.run(move || {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.send_to(sent.as_bytes(), target)
        })
        .expect("enter namespace")
        .expect("send datagram");
        let wait = if reach == Allowed { ALLOW_WAIT } else { DROP_WAIT };
        self.udp.set_read_timeout(Some(wait)).expect("timeout");
        let mut buffer = [0u8; 64];
        // Bounded: a late datagram of an earlier probe is skipped, a handful at most.
        for _ in 0..16 {
            match self.udp.recv_from(&mut buffer) {
                Ok((length, _)) if &buffer[..length] == payload.as_bytes() => return Allowed,
                Ok(_) => continue,
                Err(_) => return Dropped,
            }
        }
        Dropped
    }

    /// The probes every test starts from: A reaches the ruled port (both families), A the
    /// other port, C the ruled port (both families).
    pub fn inbound(&self, expected: [Reach; 5]) -> Vec<(&Netns, SocketAddr, Reach)> {
        vec![
            (&self.a, addr(B, RULED), expected[0]),
            (&self.a, addr(B, OTHER), expected[1]),
            (&self.c, addr(B, RULED), expected[2]),
            (&self.a, addr(B6, RULED), expected[3]),
            (&self.c, addr(B6, RULED), expected[4]),
        ]
    }
}

/// Inbound as [`policy`] enforces it: A in on the ruled port only, in both families.
pub const ONLY_A: [Reach; 5] = [Allowed, Dropped, Dropped, Allowed, Dropped];
/// Nothing blocked.
pub const OPEN: [Reach; 5] = [Allowed; 5];

/// Runs a shell script in `host`; fails the test when it fails.
#[track_caller]
pub fn sh(host: &Netns, script: &str) {
    if let Err(e) = host.exec("sh", &["-c", script]) {
        panic!("{script}: {e}");
    }
}

pub fn save_tool(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables-save",
        Family::V6 => "ip6tables-save",
    }
}

/// Save output without comment lines (timestamps, warnings) and chain counters.
pub fn strip_counters(text: &str) -> String {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| match line.split_once(" [") {
            Some((declaration, _)) if line.starts_with(':') => declaration.to_string(),
            _ => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Lines of save output (iptables or ipset) that are ours and those that are not.
pub fn split_ours(text: &str) -> (String, String) {
    let (ours, foreign): (Vec<&str>, Vec<&str>) = text
        .lines()
        .partition(|line| line.contains("VEN-") || line.contains("ven:") || line.contains(" ven-"));
    (ours.join("\n"), foreign.join("\n"))
}

pub fn safeguards() -> Safeguards {
    Safeguards { management: vec![addr(A, MANAGEMENT)] }
}

pub fn rule(id: u32, direction: Direction, peers: Peers, protocol: Protocol, ports: Option<u16>) -> Rule {
    Rule { id, direction, peers, protocol, ports: ports.map(|port| PortRange { first: port, last: port }) }
}

/// Rule 1 lets the members of set 1 reach B's RULED port over TCP.
pub fn policy(version: u64, state: PolicyState, members: &[&str]) -> Policy {
    Policy {
        version,
        state,
        ip_sets: vec![IpSet { id: 1, members: members.iter().map(|m| m.parse().expect("member")).collect() }],
        rules: vec![rule(1, Direction::Inbound, Peers::Set(1), Protocol::Tcp, Some(RULED))],
        custom_rules: Vec::new(),
    }
}

/// As [`policy`], plus rule 2: the members of set 1 reach B's [`UDP_PORT`] over UDP.
pub fn policy_with_udp(version: u64, state: PolicyState, members: &[&str]) -> Policy {
    let mut policy = policy(version, state, members);
    policy.rules.push(rule(2, Direction::Inbound, Peers::Set(1), Protocol::Udp, Some(UDP_PORT)));
    policy
}
