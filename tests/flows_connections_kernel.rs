//! Kernel tests of issue 13: flow counts are connections, for dropped traffic too. Real
//! traffic that an enforced policy drops (every dropped packet is logged) goes through the
//! agent's pipeline inside B, and the stored records must count one connection per 5-tuple
//! (ICMP: type, code, echo id) within its timeout, with every packet and its bytes beside.
//!
//! The lab is `common`'s: A (198.18.0.1, 2001:2::1; allowed to the ruled port), B (198.18.0.2,
//! 2001:2::2; the firewall and the pipeline) and C (198.18.0.3, 2001:2::3; never allowed), each
//! a uniquely named network namespace removed on drop. Without namespaces the tests are skipped
//! loudly, except under CI, where they fail.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{A, A6, B, B6, C, C6, Lab, RULED, UDP_PORT, UNLISTED, policy_with_udp};
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrStorage, sendto, socket,
};
use ven::flows::store::{FlowQuery, FlowStore, VerdictFilter, View};
use ven::flows::{FlowCounters, FlowPipeline, PipelineSettings, Timeouts};
use ven::logdir::LogCaps;
use ven_lab::probe::Verdict;
use ven_proto::{FlowRecord, FlowVerdict, PolicyState};

const GROUP: u16 = 7;
/// How long the kernel's last NFLOG batch (100 ms) and a flush take to land.
const QUIET: Duration = Duration::from_millis(800);
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

fn ip(text: &str) -> IpAddr {
    text.parse().expect("address")
}

fn settings(timeouts: Timeouts) -> PipelineSettings {
    PipelineSettings {
        group: GROUP,
        tracked_flows: 1000,
        flush_interval: Duration::from_millis(500),
        sampling_threshold: 0,
        tracked_connections: 1000,
        connection_timeouts: timeouts,
        accounted_connections: 0,
    }
}

/// Runs the pipeline inside B writing into a store in `dir` while `traffic` runs, stops it, and
/// returns the aggregated records and the counters.
fn run_pipeline(
    lab: &Lab,
    dir: &std::path::Path,
    settings: PipelineSettings,
    traffic: impl FnOnce(),
) -> (Vec<FlowRecord>, FlowCounters) {
    run_pipeline_then(lab, dir, settings, traffic, |_| {})
}

/// [`run_pipeline`], calling `settle` with the running pipeline's counters before it stops.
fn run_pipeline_then(
    lab: &Lab,
    dir: &std::path::Path,
    settings: PipelineSettings,
    traffic: impl FnOnce(),
    settle: impl FnOnce(&ven::flows::FlowStats),
) -> (Vec<FlowRecord>, FlowCounters) {
    let store = Arc::new(FlowStore::new(dir, LogCaps::default()));
    let pipeline =
        lab.b.run(move || FlowPipeline::start(settings, Box::new(store))).expect("enter b").expect("start");
    let started = Instant::now();
    while !pipeline.stats().reading.load(Ordering::Relaxed) {
        assert!(started.elapsed() < Duration::from_secs(5), "the pipeline never bound group {GROUP}");
        std::thread::sleep(Duration::from_millis(20));
    }
    traffic();
    std::thread::sleep(QUIET);
    let stats = pipeline.stats();
    settle(&stats);
    pipeline.stop();
    let counters = stats.snapshot();
    assert_eq!((counters.lost, counters.skipped, counters.records_dropped), (0, 0, 0), "{counters:?}");
    let query = FlowQuery {
        view: View::Aggregated,
        verdicts: VerdictFilter::Any,
        since: None,
        src: None,
        dst: None,
        port: None,
        protocol: None,
        limit: 10_000,
    };
    let store = FlowStore::new(dir, LogCaps::default());
    let rows = store.query(&query).expect("query").rows.into_iter().map(|row| row.record).collect();
    (rows, counters)
}

#[track_caller]
fn find(rows: &[FlowRecord], src: &str, dst: &str, protocol: u8, port: u16) -> FlowRecord {
    let found: Vec<&FlowRecord> = rows
        .iter()
        .filter(|r| r.src == ip(src) && r.dst == ip(dst) && r.protocol == protocol && r.port == port)
        .collect();
    assert_eq!(found.len(), 1, "one row for {src} -> {dst} {protocol}/{port} in {rows:#?}");
    *found[0]
}

/// The packets and bytes of every row add up to what the pipeline saw, and the connections to
/// the connection table's figures.
#[track_caller]
fn assert_adds_up(rows: &[FlowRecord], counters: &FlowCounters) {
    let packets: u64 = rows.iter().map(|r| r.packets).sum();
    let connections: u64 = rows.iter().map(|r| u64::from(r.count)).sum();
    assert_eq!(packets, counters.events, "{rows:#?}");
    assert_eq!(
        counters.connections_new + counters.connections_again + counters.connections_overflow,
        packets
    );
    assert_eq!(counters.connections_new + counters.connections_overflow, connections, "{counters:?}");
    assert_eq!(counters.connections_overflow, 0, "{counters:?}");
}

/// One `connect()` from `from` to `to`, which the policy drops: the client's kernel sends the
/// SYN again (1 s, then 2 s later) until the timeout.
fn dropped_connect(from: &ven_lab::netns::Netns, to: SocketAddr, timeout: Duration) {
    let verdict = ven_lab::probe::connect(from, to, timeout).expect("enter namespace");
    assert_eq!(verdict, Verdict::Dropped, "{to}");
}

/// One connect retried by the kernel is one connection and several packets; two connects from
/// two source ports are two. IPv4 and IPv6.
#[test]
fn a_retried_connect_is_one_connection_and_two_connects_are_two() {
    if !common::require_kernel() {
        return;
    }
    let lab = Lab::new("fck-tcp");
    let dir = ven_lab::workdir::scratch("fck-tcp");
    lab.apply(&policy_with_udp(1, PolicyState::Enforced, &[A, A6])).expect("apply");
    let (rows, counters) = run_pipeline(&lab, dir.path(), settings(Timeouts::default()), || {
        // SYNs at 0, 1 and 3 s: one connection, 3 packets.
        dropped_connect(&lab.c, common::addr(B, RULED), Duration::from_millis(3_500));
        dropped_connect(&lab.c, common::addr(B6, RULED), Duration::from_millis(3_500));
        // Two connects, two source ports (SYNs at 0 and 1 s each).
        dropped_connect(&lab.a, common::addr(B, UNLISTED), Duration::from_millis(1_500));
        dropped_connect(&lab.a, common::addr(B, UNLISTED), Duration::from_millis(1_500));
    });
    for (src, dst) in [(C, B), (C6, B6)] {
        let retried = find(&rows, src, dst, TCP, RULED);
        assert_eq!(retried.verdict, FlowVerdict::Dropped);
        assert_eq!(retried.count, 1, "one connect, retried by the kernel: {retried:?}");
        assert!(retried.packets >= 3, "SYNs at 0, 1 and 3 s: {retried:?}");
        // A SYN is 60 bytes over IPv4 and 80 over IPv6 (options included).
        let per_packet = if dst == B { 60 } else { 80 };
        assert_eq!(retried.bytes, Some(retried.packets * per_packet), "{retried:?}");
    }
    let two = find(&rows, A, B, TCP, UNLISTED);
    assert_eq!(two.count, 2, "two connects from two source ports: {two:?}");
    assert!(two.packets >= 4, "{two:?}");
    assert_adds_up(&rows, &counters);
}

/// Datagrams from one socket within the timeout are one connection; from new sockets, one each;
/// the same tuple after the (short, configured) timeout is a connection again.
#[test]
fn udp_sockets_count_once_within_the_timeout_and_again_after_it() {
    if !common::require_kernel() {
        return;
    }
    let lab = Lab::new("fck-udp");
    let dir = ven_lab::workdir::scratch("fck-udp");
    lab.apply(&policy_with_udp(1, PolicyState::Enforced, &[A, A6])).expect("apply");
    let timeouts = Timeouts { udp: Duration::from_secs(2), ..Timeouts::default() };
    let (rows, counters) = run_pipeline(&lab, dir.path(), settings(timeouts), || {
        lab.c
            .run(|| {
                let send = |socket: &UdpSocket, to: SocketAddr, n: usize| {
                    for _ in 0..n {
                        socket.send_to(b"issue 13", to).expect("send");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                };
                // One socket, 5 datagrams, then 3 new sockets, one each (v4 and v6).
                for (bind, dst) in [("0.0.0.0:0", B), ("[::]:0", B6)] {
                    let to = common::addr(dst, UDP_PORT);
                    // All kept open until the end: four distinct source ports.
                    let sockets: Vec<UdpSocket> =
                        (0..4).map(|_| UdpSocket::bind(bind).expect("bind")).collect();
                    send(&sockets[0], to, 5);
                    for socket in &sockets[1..] {
                        send(socket, to, 1);
                    }
                }
                // One socket: a datagram, 3.5 s of silence (past the 2 s timeout), another.
                let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
                let to = common::addr(B, UNLISTED);
                send(&socket, to, 2);
                std::thread::sleep(Duration::from_millis(3_500));
                send(&socket, to, 2);
            })
            .expect("enter c");
    });
    for (src, dst) in [(C, B), (C6, B6)] {
        let udp = find(&rows, src, dst, UDP, UDP_PORT);
        assert_eq!((udp.count, udp.packets), (4, 8), "1 socket of 5 datagrams + 3 sockets of 1: {udp:?}");
        // 8 bytes of payload, 8 of UDP, 20 or 40 of IP.
        let per_packet = if dst == B { 36 } else { 56 };
        assert_eq!(udp.bytes, Some(8 * per_packet), "{udp:?}");
    }
    let again = find(&rows, C, B, UDP, UNLISTED);
    assert_eq!((again.count, again.packets), (2, 4), "the tuple after its timeout is new: {again:?}");
    assert_adds_up(&rows, &counters);
}

/// Echo requests of one id (one `ping` process: the id is its own, the sequence number grows)
/// are one connection; another id is another. ICMP and ICMPv6.
#[test]
fn pings_of_one_process_count_one_connection() {
    if !common::require_kernel() {
        return;
    }
    let lab = Lab::new("fck-icmp");
    let dir = ven_lab::workdir::scratch("fck-icmp");
    lab.apply(&policy_with_udp(1, PolicyState::Enforced, &[A, A6])).expect("apply");
    let (rows, counters) = run_pipeline(&lab, dir.path(), settings(Timeouts::default()), || {
        for to in [B, B6] {
            for seq in 1..=4 {
                echo(&lab.c, to, 0x1234, seq);
            }
            echo(&lab.c, to, 0x4321, 1);
        }
    });
    for (src, dst, protocol, kind) in [(C, B, ICMP, 8), (C6, B6, ICMPV6, 128)] {
        let ping = find(&rows, src, dst, protocol, kind);
        assert_eq!((ping.count, ping.packets), (2, 5), "ids 0x1234 (4 requests) and 0x4321 (1): {ping:?}");
        // 12 bytes of ICMP message, 20 or 40 of IP.
        let per_packet = if dst == B { 32 } else { 52 };
        assert_eq!(ping.bytes, Some(5 * per_packet), "{ping:?}");
    }
    assert_adds_up(&rows, &counters);
}

/// One echo request of `id` and `seq` from `from` to `to` over a raw socket (what `ping` sends;
/// the image has no `ping` binary). The kernel computes the ICMPv6 checksum; ours for ICMP.
fn echo(from: &ven_lab::netns::Netns, to: &str, id: u16, seq: u16) {
    let to = ip(to);
    from.run(move || {
        let (family, protocol, kind) = match to {
            IpAddr::V4(_) => (AddressFamily::Inet, SockProtocol::Icmp, 8u8),
            IpAddr::V6(_) => (AddressFamily::Inet6, SockProtocol::IcmpV6, 128u8),
        };
        let fd = socket(family, SockType::Raw, SockFlag::SOCK_CLOEXEC, protocol).expect("raw socket");
        let [i0, i1] = id.to_be_bytes();
        let [s0, s1] = seq.to_be_bytes();
        let mut message = [kind, 0, 0, 0, i0, i1, s0, s1, b'v', b'e', b'n', b'!'];
        if to.is_ipv4() {
            let sum = message
                .chunks(2)
                .fold(0u32, |sum, pair| sum + u32::from(u16::from_be_bytes([pair[0], pair[1]])));
            let folded = (sum & 0xffff) + (sum >> 16);
            message[2..4].copy_from_slice(&(!(folded as u16)).to_be_bytes());
        }
        let address = SockaddrStorage::from(SocketAddr::new(to, 0));
        sendto(fd.as_raw_fd(), &message, &address, MsgFlags::empty()).expect("send echo request");
    })
    .expect("enter namespace");
}

/// A flood of new tuples (a new source port per datagram, as a port scan or a spoofing sender
/// makes) against a small table: memory stays at the table's cap, every datagram of an
/// untracked tuple still counts a connection, and the figures `ven status` shows add up
/// (connections = tracked + overflow).
#[test]
fn a_flood_of_new_tuples_stays_within_the_cap_and_adds_up() {
    if !common::require_kernel() {
        return;
    }
    const CAPACITY: usize = 64;
    const DATAGRAMS: u64 = 2_000;
    let lab = Lab::new("fck-flood");
    let dir = ven_lab::workdir::scratch("fck-flood");
    lab.apply(&policy_with_udp(1, PolicyState::Enforced, &[A, A6])).expect("apply");
    let settings = PipelineSettings { tracked_connections: CAPACITY, ..settings(Timeouts::default()) };
    let (rows, counters) = run_pipeline(&lab, dir.path(), settings, || {
        let sent = lab
            .c
            .run(|| {
                let to = common::addr(B, UDP_PORT);
                let started = Instant::now();
                let mut sent = 0u64;
                // Bounded in count and time; paced so the kernel's log queue never overflows.
                while sent < DATAGRAMS && started.elapsed() < Duration::from_secs(20) {
                    // A distinct source port each (an ephemeral one may come again).
                    let port = 30_000 + u16::try_from(sent).expect("small");
                    let socket = UdpSocket::bind(("0.0.0.0", port)).expect("bind");
                    socket.send_to(b"flood", to).expect("send");
                    sent += 1;
                    if sent % 100 == 0 {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                sent
            })
            .expect("enter c");
        assert_eq!(sent, DATAGRAMS, "the flood was sent whole");
    });
    let flood = find(&rows, C, B, UDP, UDP_PORT);
    assert_eq!(u64::from(flood.count), DATAGRAMS, "every new tuple is a connection: {flood:?}");
    assert_eq!(flood.packets, DATAGRAMS);
    assert!(counters.connections_tracked <= CAPACITY as u64, "{counters:?}");
    assert_eq!(counters.connections_capacity, CAPACITY as u64);
    let cap_bytes = ven::flows::Connections::new(CAPACITY, Timeouts::default()).max_table_bytes() as u64;
    assert!(counters.connections_table_bytes <= cap_bytes, "{counters:?} over {cap_bytes} bytes");
    assert_eq!(counters.connections_new, CAPACITY as u64, "{counters:?}");
    assert_eq!(counters.connections_overflow, DATAGRAMS - CAPACITY as u64, "{counters:?}");
    let packets: u64 = rows.iter().map(|r| r.packets).sum();
    let connections: u64 = rows.iter().map(|r| u64::from(r.count)).sum();
    assert_eq!(
        counters.connections_new + counters.connections_again + counters.connections_overflow,
        packets
    );
    assert_eq!(counters.connections_new + counters.connections_overflow, connections);
}

/// Test mode: nothing is dropped, and what enforcement would drop is logged while conntrack
/// keeps it NEW, so unanswered datagrams of one socket reach the would-drop log rule each time.
/// They are one connection, as dropped ones are.
#[test]
fn would_drop_datagrams_of_one_socket_are_one_connection() {
    if !common::require_kernel() {
        return;
    }
    let lab = Lab::new("fck-test");
    let dir = ven_lab::workdir::scratch("fck-test");
    lab.apply(&policy_with_udp(1, PolicyState::Test, &[A, A6])).expect("apply");
    let (rows, counters) = run_pipeline(&lab, dir.path(), settings(Timeouts::default()), || {
        lab.c
            .run(|| {
                let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
                for _ in 0..5 {
                    socket.send_to(b"issue 13", common::addr(B, UNLISTED)).expect("send");
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
            .expect("enter c");
    });
    let would = find(&rows, C, B, UDP, UNLISTED);
    assert_eq!(would.verdict, FlowVerdict::WouldDrop, "{would:?}");
    assert_eq!((would.count, would.packets), (1, 5), "{would:?}");
    assert_eq!(would.bytes, None, "passed traffic: its bytes are conntrack's to tell");
    assert_adds_up(&rows, &counters);
}

/// After a burst, an idle agent gives the connection table's memory back: once every tuple's
/// timeout passed, one sweep (no traffic, no flush due) empties the table and shrinks it to its
/// first size.
#[test]
fn an_idle_agent_sweeps_expired_tuples_and_shrinks_the_table() {
    if !common::require_kernel() {
        return;
    }
    const TUPLES: u16 = 500;
    let lab = Lab::new("fck-idle");
    let dir = ven_lab::workdir::scratch("fck-idle");
    lab.apply(&policy_with_udp(1, PolicyState::Enforced, &[A, A6])).expect("apply");
    let second = Duration::from_secs(1);
    let timeouts = Timeouts { tcp: second, udp: second, icmp: second };
    let first_size = ven::flows::Connections::new(1000, timeouts).table_bytes() as u64;
    let mut grown = 0;
    let (rows, _) = run_pipeline_then(
        &lab,
        dir.path(),
        settings(timeouts),
        || {
            lab.c
                .run(|| {
                    for n in 0..TUPLES {
                        let socket = UdpSocket::bind(("0.0.0.0", 30_000 + n)).expect("bind");
                        socket.send_to(b"burst", common::addr(B, UDP_PORT)).expect("send");
                    }
                })
                .expect("enter c");
        },
        |stats| {
            grown = stats.connections_table_bytes.load(Ordering::Relaxed);
            let started = Instant::now();
            // Bounded: the timeout is 1 s, the sweep comes 1 s after the last flush's tuples
            // would have expired.
            while stats.connections_tracked.load(Ordering::Relaxed) > 0 {
                assert!(started.elapsed() < Duration::from_secs(10), "never swept: {:?}", stats.snapshot());
                std::thread::sleep(Duration::from_millis(100));
            }
            assert_eq!(
                stats.connections_table_bytes.load(Ordering::Relaxed),
                first_size,
                "{:?}",
                stats.snapshot()
            );
            assert_eq!(stats.connections_expired.load(Ordering::Relaxed), u64::from(TUPLES));
        },
    );
    assert!(grown > first_size, "{TUPLES} tuples grew the table: {grown} bytes");
    assert_eq!(find(&rows, C, B, UDP, UDP_PORT).count, u32::from(TUPLES));
}

/// Sets the conntrack sysctl `name` (below net/netfilter) to `value` in `host`'s namespace.
fn conntrack_sysctl(host: &ven_lab::netns::Netns, name: &'static str, value: &'static str) {
    host.run(move || std::fs::write(format!("/proc/sys/net/netfilter/{name}"), value))
        .expect("enter namespace")
        .unwrap_or_else(|e| panic!("setting {name}: {e}"));
}

/// Accepted connections carry their bytes from conntrack accounting once they end: UDP
/// datagrams (every one logged while unreplied) exactly, a TCP transfer at least its payload,
/// with its unlogged packets; IPv4 and IPv6. Conntrack's timeouts after a close are cut to 1 s
/// in B so that the entries end (and their destroy events come) within the test.
#[test]
fn accepted_connections_carry_conntracks_bytes_when_they_end() {
    if !common::require_kernel() {
        return;
    }
    let lab = Lab::new("fck-acct");
    let dir = ven_lab::workdir::scratch("fck-acct");
    lab.apply(&policy_with_udp(1, PolicyState::Enforced, &[A, A6])).expect("apply");
    lab.b.run(|| ven::conntrack::set_accounting(true)).expect("enter b").expect("nf_conntrack_acct");
    for name in [
        "nf_conntrack_udp_timeout",
        "nf_conntrack_tcp_timeout_close",
        "nf_conntrack_tcp_timeout_close_wait",
        "nf_conntrack_tcp_timeout_fin_wait",
        "nf_conntrack_tcp_timeout_last_ack",
        "nf_conntrack_tcp_timeout_time_wait",
    ] {
        conntrack_sysctl(&lab.b, name, "1");
    }
    const PAYLOAD: usize = 1000;
    const DATAGRAMS: u64 = 5;
    const TRANSFER: usize = 64 * 1024;
    let settings = PipelineSettings { accounted_connections: 100, ..settings(Timeouts::default()) };
    let (rows, counters) = run_pipeline_then(
        &lab,
        dir.path(),
        settings,
        || {
            lab.a
                .run(|| {
                    use std::io::Write as _;
                    let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
                    for _ in 0..DATAGRAMS {
                        socket.send_to(&[7u8; PAYLOAD], common::addr(B, UDP_PORT)).expect("send");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    for dst in [B, B6] {
                        let to = common::addr(dst, RULED);
                        let mut stream = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))
                            .unwrap_or_else(|e| panic!("connect {to}: {e}"));
                        stream.write_all(&[9u8; TRANSFER]).expect("transfer");
                        stream.shutdown(std::net::Shutdown::Write).expect("shutdown");
                    }
                })
                .expect("enter a");
            // B accepts and closes: the TCP entries end.
            std::thread::sleep(Duration::from_millis(200));
            lab.drain();
        },
        |stats| {
            // Expired entries are reaped by conntrack's garbage collection, within seconds.
            let started = Instant::now();
            while stats.accounted.load(Ordering::Relaxed) < 3 && started.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(200));
            }
            // The destroy events' bytes land in the next flush.
            std::thread::sleep(QUIET);
        },
    );
    assert!(counters.accounting_on, "{counters:?}");
    assert_eq!(counters.accounted, 3, "three connections ended with their counters: {counters:?}");
    assert_eq!((counters.accounted_overflow, counters.accounted_without_counters), (0, 0), "{counters:?}");

    let udp = find(&rows, A, B, UDP, UDP_PORT);
    assert_eq!(udp.verdict, FlowVerdict::Allowed);
    // Unreplied: every datagram is NEW and logged; the bytes are IP lengths.
    assert_eq!((udp.count, udp.packets), (1, DATAGRAMS), "{udp:?}");
    assert_eq!(udp.bytes, Some(DATAGRAMS * (PAYLOAD as u64 + 8 + 20)), "{udp:?}");
    for dst in [B, B6] {
        let src = if dst == B { A } else { A6 };
        let tcp = find(&rows, src, dst, TCP, RULED);
        assert_eq!((tcp.verdict, tcp.count), (FlowVerdict::Allowed, 1), "{tcp:?}");
        let bytes = tcp.bytes.expect("conntrack's bytes");
        assert!(bytes > TRANSFER as u64, "both directions, headers included: {tcp:?}");
        // The handshake, the data segments and the ACKs: far more than the one logged SYN.
        assert!(tcp.packets > 10, "{tcp:?}");
    }
}
