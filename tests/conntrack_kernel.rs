//! Kernel tests of the conntrack module: the timeout sysctl and the cut, over real ctnetlink in
//! fresh network namespaces, judged by the kernel's own conntrack table.
//!
//! The lab: host A (198.18.0.1, 2001:2::1) and host B (198.18.0.2, 2001:2::2; the firewall host)
//! on one segment. A fresh namespace tracks nothing until a conntrack match is hooked, so B gets
//! `iptables -A INPUT -m conntrack --ctstate ESTABLISHED -j ACCEPT` (and the ip6tables twin)
//! first. Every socket and the ctnetlink client run on threads inside the namespaces
//! (`Netns::run`). Without namespaces the tests are skipped loudly, except under CI, where they
//! fail.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};

use ven::conntrack::{self, Connection, CutInput, CutSummary};
use ven_lab::netns::{self, Netns, Segment};
use ven_proto::{Direction, IpSet, Peers, Policy, PolicyState, PortRange, Protocol, Rule};

const A4: &str = "198.18.0.1";
const B4: &str = "198.18.0.2";
const A6: &str = "2001:2::1";
const B6: &str = "2001:2::2";
/// The port on B the policy allows from A.
const ALLOWED: u16 = 7001;
/// A port on B no rule allows.
const CUT: u16 = 7002;
/// The PCE's API port on A (a management endpoint): B's connection to it is never cut.
const MANAGEMENT: u16 = 8443;
/// Most entries a test lists (a fresh namespace holds a handful).
const LIST_LIMIT: usize = 1024;

fn require_kernel() -> bool {
    let missing = netns::available().err().or_else(|| {
        ["iptables", "ip6tables"]
            .into_iter()
            .find(|tool| netns::run(tool, &["--version"]).is_err())
            .map(|tool| format!("{tool} is not installed"))
    });
    match missing {
        None => true,
        Some(why) if std::env::var_os("CI").is_some() => {
            panic!("conntrack kernel test cannot run under CI: {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED: conntrack kernel test needs network namespaces and iptables: {why}");
            false
        }
    }
}

struct Lab {
    a: Netns,
    b: Netns,
    // Dropped after the hosts (fields drop in order), taking the bridge with it.
    _segment: Segment,
}

impl Lab {
    fn new(prefix: &str) -> Self {
        let segment = Segment::new(&format!("{prefix}s")).expect("segment");
        let a = Netns::new(&format!("{prefix}a")).expect("namespace a");
        let b = Netns::new(&format!("{prefix}b")).expect("namespace b");
        for (host, v4, v6) in [(&a, A4, A6), (&b, B4, B6)] {
            segment.attach(host, &format!("{v4}/24")).expect("attach");
            host.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]).expect("IPv6 address");
        }
        // Hooks conntrack into B's namespace, so that B tracks its connections.
        for tool in ["iptables", "ip6tables"] {
            b.exec(tool, &["-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED", "-j", "ACCEPT"])
                .expect("hook conntrack");
        }
        Self { a, b, _segment: segment }
    }

    /// B's conntrack table, read with our own client on a thread inside B.
    fn b_table(&self) -> Vec<Connection> {
        let list = self.b.run(|| conntrack::list_connections(LIST_LIMIT)).expect("enter b").expect("dump");
        assert_eq!(list.over_limit, 0);
        list.connections
    }
}

/// A connected, exercised TCP connection from `client` to `server` at `address`; both ends are
/// returned so that it stays open.
fn connect(client: &Netns, server: &Netns, address: SocketAddr) -> (TcpStream, TcpStream) {
    let listener = server.run(move || TcpListener::bind(address)).expect("enter server").expect("listen");
    let accepting = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut word = [0u8; 4];
        stream.read_exact(&mut word).expect("read ping");
        stream.write_all(b"pong").expect("write pong");
        stream
    });
    let client_end = client
        .run(move || {
            let mut stream = TcpStream::connect(address).expect("connect");
            stream.write_all(b"ping").expect("write ping");
            let mut word = [0u8; 4];
            stream.read_exact(&mut word).expect("read pong");
            assert_eq!(&word, b"pong");
            stream
        })
        .expect("enter client");
    (client_end, accepting.join().expect("server thread"))
}

fn socket(address: &str, port: u16) -> SocketAddr {
    SocketAddr::new(address.parse().expect("address"), port)
}

/// Whether `table` holds the TCP entry from `src` to `dst` (original direction).
fn holds(table: &[Connection], src: SocketAddr, dst: SocketAddr) -> bool {
    table.iter().any(|c| {
        c.protocol == 6
            && c.original_src == src.ip()
            && c.src_port == Some(src.port())
            && c.original_dst == dst.ip()
            && c.dst_port == Some(dst.port())
    })
}

/// Enforced: A (both families) may reach B's ALLOWED port over TCP; nothing else is allowed.
fn policy() -> Policy {
    Policy {
        version: 2,
        state: PolicyState::Enforced,
        ip_sets: vec![IpSet {
            id: 1,
            members: vec![A4.parse().expect("member"), A6.parse().expect("member")],
        }],
        rules: vec![Rule {
            id: 1,
            direction: Direction::Inbound,
            peers: Peers::Set(1),
            protocol: Protocol::Tcp,
            ports: Some(PortRange { first: ALLOWED, last: ALLOWED }),
        }],
        custom_rules: Vec::new(),
    }
}

/// Runs the cut inside B with B's addresses as local and A:MANAGEMENT as the PCE.
fn cut_in_b(lab: &Lab, policy: Policy) -> CutSummary {
    lab.b
        .run(move || {
            let input = CutInput {
                policy: &policy,
                local_addresses: [B4, B6].iter().map(|a| a.parse::<IpAddr>().expect("address")).collect(),
                management: vec![socket(A4, MANAGEMENT)],
                failsafe_inbound: Vec::new(),
            };
            conntrack::cut_disallowed(&input)
        })
        .expect("enter b")
        .expect("cut")
}

#[test]
fn established_timeout_is_set_per_namespace() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new("ctk-tmo");
    let host_before = conntrack::established_timeout().ok();
    let read_back = lab
        .b
        .run(|| {
            conntrack::set_established_timeout(conntrack::ESTABLISHED_TIMEOUT_S)?;
            conntrack::established_timeout()
        })
        .expect("enter b")
        .expect("set and read back the timeout");
    assert_eq!(read_back, 28800);
    assert_eq!(conntrack::established_timeout().ok(), host_before, "the host's namespace is untouched");
    let zero = lab.b.run(|| conntrack::set_established_timeout(0)).expect("enter b");
    assert!(matches!(zero, Err(conntrack::ConntrackError::ZeroTimeout)));
}

#[test]
fn tightened_policy_cuts_disallowed_connections_and_keeps_the_rest() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new("ctk-cut");
    lab.b
        .run(|| conntrack::set_established_timeout(conntrack::ESTABLISHED_TIMEOUT_S))
        .expect("enter b")
        .unwrap();

    let v4_allowed = connect(&lab.a, &lab.b, socket(B4, ALLOWED));
    let v4_cut = connect(&lab.a, &lab.b, socket(B4, CUT));
    let v6_allowed = connect(&lab.a, &lab.b, socket(B6, ALLOWED));
    let v6_cut = connect(&lab.a, &lab.b, socket(B6, CUT));
    let management = connect(&lab.b, &lab.a, socket(A4, MANAGEMENT));
    let endpoints = |(client, _): &(TcpStream, TcpStream)| {
        (client.local_addr().expect("local"), client.peer_addr().expect("peer"))
    };
    let [v4_allowed, v4_cut, v6_allowed, v6_cut, management] =
        [&v4_allowed, &v4_cut, &v6_allowed, &v6_cut, &management].map(endpoints);

    let before = lab.b_table();
    for (src, dst) in [v4_allowed, v4_cut, v6_allowed, v6_cut, management] {
        assert!(holds(&before, src, dst), "B tracks {src} -> {dst} before the cut: {before:#?}");
    }

    let summary = cut_in_b(&lab, policy());
    assert!(summary.examined >= 5, "{summary:?}");
    assert!(summary.deleted >= 2, "the IPv4 and IPv6 connections to port {CUT}: {summary:?}");
    assert_eq!(summary.skipped_over_cap, 0);

    let after = lab.b_table();
    for (src, dst) in [v4_cut, v6_cut] {
        assert!(!holds(&after, src, dst), "{src} -> {dst} is cut: {after:#?}");
    }
    for (src, dst) in [v4_allowed, v6_allowed, management] {
        assert!(holds(&after, src, dst), "{src} -> {dst} survives: {after:#?}");
    }

    // A second cut finds nothing more to delete.
    assert_eq!(cut_in_b(&lab, policy()).deleted, 0);
}

#[test]
fn non_enforced_policy_cuts_nothing() {
    if !require_kernel() {
        return;
    }
    let lab = Lab::new("ctk-test");
    let open = connect(&lab.a, &lab.b, socket(B4, CUT));
    let (src, dst) = (open.0.local_addr().expect("local"), open.0.peer_addr().expect("peer"));
    let summary = cut_in_b(&lab, Policy { state: PolicyState::Test, ..policy() });
    assert_eq!(summary, CutSummary::default());
    assert!(holds(&lab.b_table(), src, dst));
}

/// Whether data still flows both ways on an open connection: the client writes and the server
/// echoes within a second.
fn still_flows(client: &Netns, client_end: &TcpStream, server_end: &TcpStream) -> bool {
    let mut server = server_end.try_clone().expect("clone server end");
    let echo = std::thread::spawn(move || {
        server.set_read_timeout(Some(std::time::Duration::from_secs(1))).expect("timeout");
        let mut word = [0u8; 4];
        if server.read_exact(&mut word).is_ok() {
            let _ = server.write_all(&word);
        }
    });
    let mut stream = client_end.try_clone().expect("clone client end");
    let flowed = client
        .run(move || {
            stream.set_read_timeout(Some(std::time::Duration::from_secs(1))).expect("timeout");
            let mut word = [0u8; 4];
            stream.write_all(b"more").is_ok() && stream.read_exact(&mut word).is_ok() && &word == b"more"
        })
        .expect("enter client");
    let _ = echo.join();
    flowed
}

/// The whole story of issue 3's "a tightened policy cuts an open TCP connection": the real
/// firewall enforces a policy allowing A to reach B:ALLOWED; a connection is opened and used;
/// the next policy no longer allows it. The firewall alone lets it go on (established traffic is
/// accepted); with the cut the agent makes after an apply, the connection stops carrying data.
#[test]
fn a_tightened_policy_ends_an_open_connection_once_cut() {
    use ven::firewall::{Firewall, FirewallConfig, Safeguards};
    if !require_kernel() {
        return;
    }
    let lab = Lab::new("ctk-end");
    let apply = |policy: Policy| {
        lab.b
            .run(move || {
                let safeguards = Safeguards { management: vec![socket(A4, MANAGEMENT)] };
                Firewall::new(FirewallConfig::default()).apply(&policy, &safeguards).map(|_| ())
            })
            .expect("enter b")
            .expect("apply")
    };
    apply(policy());
    let kept = connect(&lab.a, &lab.b, socket(B4, ALLOWED));
    let ended = connect(&lab.a, &lab.b, socket(B6, ALLOWED));
    assert!(still_flows(&lab.a, &kept.0, &kept.1));

    // Tightened: only IPv4 peers may reach ALLOWED now.
    let mut tightened = policy();
    tightened.version += 1;
    tightened.ip_sets[0].members.retain(|member| member.is_ipv4());
    apply(tightened.clone());
    assert!(still_flows(&lab.a, &ended.0, &ended.1), "without the cut, conntrack keeps it established");

    let summary = cut_in_b(&lab, tightened);
    assert_eq!(summary.deleted, 1, "{summary:?}");
    assert!(!still_flows(&lab.a, &ended.0, &ended.1), "the IPv6 connection should carry no more data");
    assert!(still_flows(&lab.a, &kept.0, &kept.1), "the IPv4 connection is still allowed");
}
