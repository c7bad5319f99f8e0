//! Flow benchmark (issue 4): NFLOG ingest by ven's reader and aggregator next to ulogd2 on the
//! same generated traffic in the same run, and the memory of 100k tracked flows.
//!
//! Run as root: `cargo bench --locked --bench flows` (full scale: steps of 3 s at 50k, 100k,
//! 200k, 400k pps and the sender's maximum). `VEN_BENCH_SCALE=small` (or the argument `small`)
//! runs 1 s steps at 50k, 200k and the maximum. ulogd2 comes from the Debian packages `ulogd2`
//! and `ulogd2-sqlite3` (and the `sqlite3` tool); when they are missing the bench installs them
//! with apt-get, saying so, and skips ulogd2 if that fails.
//!
//! The lab: two network namespaces this binary creates and deletes, joined by a veth pair. A
//! (198.18.0.1-8) sends UDP datagrams from 8 addresses to 512 ports of B (198.18.0.254): 4096
//! flow keys. B's INPUT holds the rules the firewall renders for the enforced default deny:
//! `-j NFLOG --nflog-prefix ven:d:0 --nflog-group 7 --nflog-size 128`, then `-j DROP`. The rule's
//! packet counter is the truth of what was logged; the readers' counts are compared with it.
//!
//! - ven: `NflogReader::open` inside B (which configures the group: copy 128 bytes, batches of
//!   `QUEUE_THRESHOLD`, a 4 MiB socket buffer, numbered messages) and `read_batch` into
//!   `Aggregator::record` on one thread; its CPU time is that thread's own (schedstat).
//! - ulogd2: `ulogd -c <conf>` inside B, stack NFLOG -> BASE -> IFINDEX -> IP2STR -> SQLITE3, with
//!   the same kernel batching and socket buffer; the database sits on tmpfs (/dev/shm) so that
//!   ulogd2 is measured at its best, not at the disk's fsync rate. It binds the group only after
//!   ven's reader closed it (one binder per group).
//! - Memory: a child process (this binary re-executed) builds `Aggregator::new(100_000)`, records
//!   100k distinct keys, flushes them once, and reports VmRSS/VmHWM at each stage; then the
//!   connection table (issue 13) with 100k tracked tuples: its bytes and VmRSS beside.
//! - Issue 13: ven's reader thread passes every event through the connection table
//!   (`Connections::observe`) before the aggregator, as the agent's pipeline does, so the ingest
//!   figures include it.
//!
//! Figures are printed, never asserted. Every load loop is bounded in packets and time; a Ctrl-C
//! or SIGTERM stops the run, and the drop guards delete the namespaces (rules with them), stop
//! ulogd2 and remove the temporary files.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{SigSet, Signal, kill};
use nix::unistd::Pid;
use ven::config::FlowSettings;
use ven::firewall::LogVerdict;
use ven::flows::{
    AggregateCounters, Aggregator, Connections, Event, FlowKey, LossCounters, NflogReader, Timeouts,
};
use ven_lab::netns::{self, Netns};
use ven_lab::process::{Daemon, tail};

/// The NFLOG group (the firewall's default).
const GROUP: u16 = 7;
/// The prefix of the enforced default deny's log rule.
const PREFIX: &str = "ven:d:0";
/// `--nflog-size` of the firewall's log rules (src/firewall/render.rs).
const NFLOG_SIZE: &str = "128";
/// Namespace name prefix (the lab appends pid and a counter).
const NETNS_PREFIX: &str = "ven-bflow";
/// Sender addresses 198.18.0.1..=SOURCES and the receiver.
const SOURCES: u8 = 8;
const RECEIVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
/// Destination ports FIRST_PORT.. of the generated traffic (SOURCES * PORTS flow keys).
const FIRST_PORT: u16 = 20_000;
const PORTS: u16 = 512;
/// UDP payload bytes of each datagram.
const PAYLOAD: usize = 32;
/// Datagrams sent between two looks at the clock.
const BURST: u64 = 32;
/// Most datagrams one step may send, whatever its rate and length.
const MAX_PACKETS_PER_STEP: u64 = 20_000_000;
/// The warm-up before any measurement (ARP, caches): rate and length.
const WARMUP_RATE: u64 = 20_000;
const WARMUP: Duration = Duration::from_millis(300);
/// A reader has drained a step when its count has not moved for this long (the kernel flushes a
/// partial batch after 100 ms) ...
const QUIET: Duration = Duration::from_millis(400);
/// ... and waits at most this long for it.
const MAX_DRAIN: Duration = Duration::from_secs(10);
/// ulogd2 has drained when it used less than IDLE_CPU in each of IDLE_POLLS polls POLL apart,
/// within MAX_ULOGD_DRAIN.
const POLL: Duration = Duration::from_millis(100);
const IDLE_POLLS: usize = 5;
const IDLE_CPU: Duration = Duration::from_millis(2);
const MAX_ULOGD_DRAIN: Duration = Duration::from_secs(60);
/// How long ulogd2 may take to bind the group, and ven's reader to let it go.
const BIND_WAIT: Duration = Duration::from_secs(10);
/// Flows of the memory measurement.
const RSS_FLOWS: u32 = 100_000;
/// Packets timed through the full connection table, per case.
const TABLE_LOOKUPS: u32 = 1_000_000;
/// The argument that makes this binary the memory measurement's child.
const RSS_CHILD: &str = "--flows-rss-child";
/// The ulogd2 table: the packet columns the sqlite3 output resolves against BASE, IFINDEX and
/// IP2STR keys (`ip_saddr_str` is `ip.saddr.str`), after doc/sqlite3.table's `ulog_pkt`.
const ULOGD_TABLE: &str = "CREATE TABLE ulog_pkt (oob_time_sec INT UNSIGNED, oob_time_usec INT \
    UNSIGNED, oob_prefix VARCHAR(64), oob_in VARCHAR(32), ip_saddr_str VARCHAR(40), ip_daddr_str \
    VARCHAR(40), ip_protocol TINYINT UNSIGNED, udp_sport SMALLINT UNSIGNED, udp_dport SMALLINT \
    UNSIGNED, raw_pktlen INT UNSIGNED);";
/// Socket buffer ulogd2 starts with (ven's SOCKET_BUFFER_BYTES) and may grow to on loss.
const ULOGD_SOCKET_BUFFER: usize = 4 * 1024 * 1024;
const ULOGD_SOCKET_BUFFER_MAX: usize = 8 * 1024 * 1024;

type BenchResult<T> = Result<T, String>;

/// Set by the signal thread on SIGINT or SIGTERM: every loop stops and the guards clean up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn interrupted() -> BenchResult<()> {
    if INTERRUPTED.load(Ordering::Relaxed) { Err("interrupted".into()) } else { Ok(()) }
}

#[derive(Clone, Debug)]
struct Scale {
    name: &'static str,
    /// Offered rates in datagrams per second; `None`: as fast as the sender goes.
    rates: Vec<Option<u64>>,
    step: Duration,
}

impl Scale {
    fn full() -> Scale {
        Scale {
            name: "full",
            rates: vec![Some(50_000), Some(100_000), Some(200_000), Some(400_000), None],
            step: Duration::from_secs(3),
        }
    }

    fn small() -> Scale {
        Scale { name: "small", rates: vec![Some(50_000), Some(200_000), None], step: Duration::from_secs(1) }
    }

    /// `VEN_BENCH_SCALE=small|full` or an argument `small`/`full` (cargo passes `--bench` too,
    /// which is ignored).
    fn from_env() -> BenchResult<Scale> {
        let mut choice = std::env::var("VEN_BENCH_SCALE").unwrap_or_default();
        for arg in std::env::args().skip(1) {
            let arg = arg.trim_start_matches('-');
            let arg = arg.strip_prefix("scale=").unwrap_or(arg);
            if arg == "small" || arg == "full" {
                choice = arg.to_string();
            }
        }
        match choice.as_str() {
            "" | "full" => Ok(Scale::full()),
            "small" => Ok(Scale::small()),
            other => Err(format!("VEN_BENCH_SCALE={other:?}: expected small or full")),
        }
    }
}

fn main() -> ExitCode {
    if std::env::args().any(|arg| arg == RSS_CHILD) {
        rss_child();
        return ExitCode::SUCCESS;
    }
    let scale = match Scale::from_env() {
        Ok(scale) => scale,
        Err(why) => {
            eprintln!("flows bench: {why}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(why) = prerequisites() {
        if std::env::var_os("CI").is_some() {
            eprintln!("flows bench cannot run under CI: {why}");
            return ExitCode::FAILURE;
        }
        eprintln!("SKIPPED: the flows bench needs root, network namespaces and iptables: {why}");
        return ExitCode::SUCCESS;
    }
    let signals = match SignalThread::start() {
        Ok(signals) => signals,
        Err(why) => {
            eprintln!("flows bench: {why}");
            return ExitCode::FAILURE;
        }
    };
    let result = run(&scale);
    signals.stop();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("flows bench failed: {why}");
            ExitCode::FAILURE
        }
    }
}

fn prerequisites() -> BenchResult<()> {
    netns::available()?;
    for tool in ["iptables", "iptables-save"] {
        netns::run(tool, &["--version"]).map_err(|e| format!("{tool}: {e}"))?;
    }
    Ok(())
}

/// SIGINT and SIGTERM are blocked in every thread (threads inherit the mask of the main thread,
/// which blocks them before any other starts) and taken here, so that a Ctrl-C ends the run
/// through the normal path and the drop guards. SIGUSR1 ends the thread.
struct SignalThread {
    thread: JoinHandle<()>,
}

impl SignalThread {
    fn start() -> BenchResult<SignalThread> {
        let mut set = SigSet::empty();
        for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGUSR1] {
            set.add(signal);
        }
        set.thread_block().map_err(|e| format!("blocking signals: {e}"))?;
        let thread = std::thread::Builder::new()
            .name("ven-bench-signals".into())
            .spawn(move || {
                while let Ok(signal) = set.wait() {
                    if signal == Signal::SIGUSR1 {
                        return;
                    }
                    eprintln!("flows bench: {signal}, stopping and cleaning up");
                    INTERRUPTED.store(true, Ordering::Relaxed);
                }
            })
            .map_err(|e| format!("signal thread: {e}"))?;
        Ok(SignalThread { thread })
    }

    fn stop(self) {
        // Process-directed: every other thread blocks it, so the waiting thread takes it.
        let _ = kill(Pid::this(), Signal::SIGUSR1);
        let _ = self.thread.join();
    }
}

// ---------------------------------------------------------------------------------------------
// /proc readers

/// CPU time a task (`/proc/<pid>/task/<tid>`) has run: schedstat's nanoseconds, or utime +
/// stime from stat (clock ticks, taken as 1/100 s) where schedstat is missing.
fn task_cpu(task: &Path) -> Option<Duration> {
    if let Ok(text) = std::fs::read_to_string(task.join("schedstat")) {
        if let Some(ns) = text.split_whitespace().next().and_then(|n| n.parse().ok()) {
            return Some(Duration::from_nanos(ns));
        }
    }
    let stat = std::fs::read_to_string(task.join("stat")).ok()?;
    // Fields after the command (which may hold spaces) start at field 3 (state).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time of every thread of process `pid`.
fn process_cpu(pid: u32) -> Option<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = Duration::ZERO;
    for task in tasks.flatten() {
        total += task_cpu(&task.path())?;
    }
    Some(total)
}

/// A `Vm*` line of a status file, in KiB.
fn vm_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| line.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok())
}

/// (VmRSS, VmHWM) in KiB of `/proc/<who>/status`.
fn rss(who: &str) -> (Option<u64>, Option<u64>) {
    let status = std::fs::read_to_string(format!("/proc/{who}/status")).unwrap_or_default();
    (vm_kib(&status, "VmRSS:"), vm_kib(&status, "VmHWM:"))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------------------------------
// Memory: the child process

/// Flow `n` of the memory measurement: one source address each out of 198.18.0.0/15.
fn rss_key(n: u32) -> FlowKey {
    FlowKey {
        src: IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + n)),
        dst: IpAddr::V4(RECEIVER),
        protocol: 17,
        port: 443,
        verdict: LogVerdict::Dropped,
        rule: 0,
    }
}

/// The child: prints one line of `key=value` (KiB, bytes, counts) for the parent to read.
fn rss_child() {
    let (rss_idle, _) = rss("self");
    let mut aggregator = Aggregator::new(RSS_FLOWS as usize);
    let (rss_empty, _) = rss("self");
    let now = unix_now();
    for n in 0..RSS_FLOWS {
        aggregator.record(&rss_key(n), now);
    }
    let (rss_full, hwm_full) = rss("self");
    let mut out = Vec::with_capacity(aggregator.capacity() + 4);
    aggregator.flush_into(&mut out);
    let (rss_flushed, hwm_flushed) = rss("self");
    let counters = aggregator.counters();
    let summaries = out.len();
    let bytes_per_flow = aggregator.bytes_per_flow();
    drop(out);
    drop(aggregator);
    // The connection table at 100k tracked tuples (one source address each), measured as the
    // agent runs it: its main.rs fixes glibc's mmap threshold, so the halves the doublings free
    // go back to the kernel (without it glibc raises the threshold to the aggregator's freed
    // table and keeps them: +13.6 MiB measured for a 6.9 MiB table).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's parameters, with glibc's initial value; this child
    // process has no other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
    let (rss_before_tuples, _) = rss("self");
    let mut table = Connections::new(RSS_FLOWS as usize, Timeouts::default());
    for n in 0..RSS_FLOWS {
        let key = rss_key(n);
        let packet = ven::flows::Packet {
            src: key.src,
            dst: key.dst,
            protocol: key.protocol,
            transport: ven::flows::Transport::Ports { src: 40_000, dst: key.port },
            length: 60,
        };
        table.observe(&key, &packet, 0);
    }
    let (rss_tuples, hwm_tuples) = rss("self");
    // The table's own cost per packet, this thread's CPU time: packets of tracked tuples (the
    // common case: retransmissions, datagrams of one socket), then of new tuples past the cap.
    let task = Path::new("/proc/thread-self");
    let cpu = || task_cpu(task).unwrap_or_default();
    let packet_of = |n: u32| {
        let key = rss_key(n % RSS_FLOWS);
        let transport = ven::flows::Transport::Ports { src: 40_000, dst: key.port };
        (
            key,
            ven::flows::Packet { src: key.src, dst: key.dst, protocol: key.protocol, transport, length: 60 },
        )
    };
    let before = cpu();
    for n in 0..TABLE_LOOKUPS {
        let (key, packet) = packet_of(n.wrapping_mul(7919));
        std::hint::black_box(table.observe(&key, &packet, 1));
    }
    let again_ns = (cpu() - before).as_nanos() as u64 / u64::from(TABLE_LOOKUPS);
    let before = cpu();
    for n in 0..TABLE_LOOKUPS {
        let (key, mut packet) = packet_of(n);
        packet.transport = ven::flows::Transport::Ports { src: 1 + (n % 30_000) as u16, dst: key.port };
        std::hint::black_box(table.observe(&key, &packet, 1));
    }
    let overflow_ns = (cpu() - before).as_nanos() as u64 / u64::from(TABLE_LOOKUPS);
    println!(
        "rss idle={} empty={} full={} full_hwm={} flushed={} flushed_hwm={} bytes_per_flow={} tracked={} \
         folded={} summaries={} tuples={} tuple_table_bytes={} bytes_per_tuple={} tuples_rss_before={} \
         tuples_rss={} tuples_hwm={} again_ns={} overflow_ns={}",
        rss_idle.unwrap_or(0),
        rss_empty.unwrap_or(0),
        rss_full.unwrap_or(0),
        hwm_full.unwrap_or(0),
        rss_flushed.unwrap_or(0),
        hwm_flushed.unwrap_or(0),
        bytes_per_flow,
        counters.high_water,
        counters.folded,
        summaries,
        table.counters().tracked,
        table.table_bytes(),
        table.bytes_per_tuple(),
        rss_before_tuples.unwrap_or(0),
        rss_tuples.unwrap_or(0),
        hwm_tuples.unwrap_or(0),
        again_ns,
        overflow_ns,
    );
}

/// What the child reported.
#[derive(Debug, Default)]
struct Memory {
    idle: u64,
    empty: u64,
    full: u64,
    full_hwm: u64,
    flushed: u64,
    flushed_hwm: u64,
    bytes_per_flow: u64,
    tracked: u64,
    folded: u64,
    summaries: u64,
    tuples: u64,
    tuple_table_bytes: u64,
    bytes_per_tuple: u64,
    tuples_rss_before: u64,
    tuples_rss: u64,
    tuples_hwm: u64,
    again_ns: u64,
    overflow_ns: u64,
}

fn memory() -> BenchResult<Memory> {
    let exe = std::env::current_exe().map_err(|e| format!("this binary's path: {e}"))?;
    let output = Command::new(&exe)
        .arg(RSS_CHILD)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", exe.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find_map(|line| line.strip_prefix("rss "))
        .ok_or_else(|| format!("the memory child printed no figures ({}): {text}", output.status))?;
    let mut memory = Memory::default();
    for pair in line.split_whitespace() {
        let (key, value) = pair.split_once('=').ok_or_else(|| format!("memory child: {pair:?}"))?;
        let value: u64 = value.parse().map_err(|_| format!("memory child: {pair:?}"))?;
        let field = match key {
            "idle" => &mut memory.idle,
            "empty" => &mut memory.empty,
            "full" => &mut memory.full,
            "full_hwm" => &mut memory.full_hwm,
            "flushed" => &mut memory.flushed,
            "flushed_hwm" => &mut memory.flushed_hwm,
            "bytes_per_flow" => &mut memory.bytes_per_flow,
            "tracked" => &mut memory.tracked,
            "folded" => &mut memory.folded,
            "summaries" => &mut memory.summaries,
            "tuples" => &mut memory.tuples,
            "tuple_table_bytes" => &mut memory.tuple_table_bytes,
            "bytes_per_tuple" => &mut memory.bytes_per_tuple,
            "tuples_rss_before" => &mut memory.tuples_rss_before,
            "tuples_rss" => &mut memory.tuples_rss,
            "tuples_hwm" => &mut memory.tuples_hwm,
            "again_ns" => &mut memory.again_ns,
            "overflow_ns" => &mut memory.overflow_ns,
            _ => continue,
        };
        *field = value;
    }
    Ok(memory)
}

// ---------------------------------------------------------------------------------------------
// The lab: A sends, B logs and drops

/// Both namespaces (and B's rules with them) are deleted on drop.
struct Lab {
    /// The sender's namespace: only its sockets are used, it is kept for its drop.
    _a: Netns,
    b: Netns,
    senders: Vec<UdpSocket>,
    targets: Vec<SocketAddr>,
}

impl Lab {
    fn new() -> BenchResult<Lab> {
        let a = Netns::new(&format!("{NETNS_PREFIX}-a")).map_err(|e| e.to_string())?;
        let b = Netns::new(&format!("{NETNS_PREFIX}-b")).map_err(|e| e.to_string())?;
        let ip = |ns: &Netns, args: &[&str]| ns.ip(args).map(drop).map_err(|e| e.to_string());
        ip(&a, &["link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b.name()])?;
        for n in 1..=SOURCES {
            ip(&a, &["addr", "add", &format!("198.18.0.{n}/24"), "dev", "eth0"])?;
        }
        ip(&a, &["link", "set", "eth0", "up"])?;
        ip(&b, &["addr", "add", &format!("{RECEIVER}/24"), "dev", "eth0"])?;
        ip(&b, &["link", "set", "eth0", "up"])?;
        let senders = a
            .run(|| {
                (1..=SOURCES)
                    .map(|n| UdpSocket::bind((Ipv4Addr::new(198, 18, 0, n), 0)))
                    .collect::<std::io::Result<Vec<_>>>()
            })
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("UDP sockets in A: {e}"))?;
        let targets = (0..PORTS).map(|p| SocketAddr::new(IpAddr::V4(RECEIVER), FIRST_PORT + p)).collect();
        let lab = Lab { _a: a, b, senders, targets };
        lab.iptables(&["-A", "INPUT", "-i", "eth0", "-j", "DROP"])?;
        Ok(lab)
    }

    fn iptables(&self, args: &[&str]) -> BenchResult<()> {
        let mut full = vec!["-w"];
        full.extend_from_slice(args);
        self.b.exec("iptables", &full).map(drop).map_err(|e| e.to_string())
    }

    /// Puts the log rule before the drop, as the enforced default deny renders it.
    fn log_rule(&self) -> BenchResult<()> {
        self.iptables(&[
            "-I",
            "INPUT",
            "1",
            "-i",
            "eth0",
            "-j",
            "NFLOG",
            "--nflog-prefix",
            PREFIX,
            "--nflog-group",
            &GROUP.to_string(),
            "--nflog-size",
            NFLOG_SIZE,
        ])
    }

    /// Packets counted by B's INPUT rule with `target` (`NFLOG`, `DROP`); 0 when it is absent.
    fn counter(&self, target: &str) -> BenchResult<u64> {
        let output = self.b.exec("iptables-save", &["-c", "-t", "filter"]).map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&output.stdout);
        let needle = format!("-j {target}");
        Ok(text
            .lines()
            .filter(|line| line.contains("-A INPUT") && line.contains(&needle))
            .filter_map(|line| line.strip_prefix('[')?.split_once(':')?.0.parse::<u64>().ok())
            .sum())
    }

    /// Whether some socket in B has our NFLOG group bound.
    fn group_bound(&self) -> bool {
        self.b.exec("cat", &["/proc/net/netfilter/nfnetlink_log"]).is_ok_and(|output| {
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .any(|line| line.split_whitespace().next() == Some(GROUP.to_string().as_str()))
        })
    }

    fn wait_group(&self, bound: bool) -> BenchResult<()> {
        let start = Instant::now();
        while self.group_bound() != bound {
            interrupted()?;
            if start.elapsed() > BIND_WAIT {
                let state = if bound { "bound" } else { "released" };
                return Err(format!("NFLOG group {GROUP} was not {state} within {BIND_WAIT:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Sends from A to B at `rate` datagrams/s (`None`: flat out) for `length`, cycling through
    /// every (source, port) pair; bounded by [`MAX_PACKETS_PER_STEP`].
    fn offer(&self, rate: Option<u64>, length: Duration) -> Offered {
        let payload = [0x5a_u8; PAYLOAD];
        let limit = rate.map_or(MAX_PACKETS_PER_STEP, |rate| {
            (rate.saturating_mul(length.as_millis() as u64) / 1000).min(MAX_PACKETS_PER_STEP)
        });
        let (mut sent, mut errors, mut i) = (0u64, 0u64, 0usize);
        let start = Instant::now();
        loop {
            let elapsed = start.elapsed();
            if elapsed >= length || sent + errors >= limit || INTERRUPTED.load(Ordering::Relaxed) {
                break;
            }
            if let Some(rate) = rate {
                let due = (rate as f64 * elapsed.as_secs_f64()) as u64 + BURST;
                if sent + errors >= due {
                    std::thread::sleep(Duration::from_micros(50));
                    continue;
                }
            }
            for _ in 0..BURST {
                let sender = &self.senders[i % self.senders.len()];
                let target = self.targets[(i / self.senders.len()) % self.targets.len()];
                match sender.send_to(&payload, target) {
                    Ok(_) => sent += 1,
                    Err(_) => errors += 1,
                }
                i = i.wrapping_add(1);
            }
        }
        Offered { sent, errors, elapsed: start.elapsed() }
    }
}

/// What the sender did in one step.
#[derive(Clone, Copy, Debug, Default)]
struct Offered {
    sent: u64,
    errors: u64,
    elapsed: Duration,
}

impl Offered {
    fn pps(&self) -> f64 {
        per_second(self.sent, self.elapsed)
    }
}

fn per_second(count: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() { 0.0 } else { count as f64 / elapsed.as_secs_f64() }
}

/// One measured step of one reader.
#[derive(Clone, Debug)]
struct Step {
    rate: Option<u64>,
    offered: Offered,
    /// Packets the NFLOG rule counted.
    logged: u64,
    /// Events ven decoded, or rows ulogd2 stored.
    kept: u64,
    /// Loss the reader itself counted (ven: LossCounters::lost(); ulogd2: "losing events" notices).
    lost_counted: u64,
    cpu: Option<Duration>,
    /// ven: flow summaries of the step's flush.
    summaries: Option<u64>,
}

impl Step {
    fn missing(&self) -> u64 {
        self.logged.saturating_sub(self.kept)
    }

    fn lossless(&self) -> bool {
        self.missing() == 0 && self.lost_counted == 0
    }

    fn us_per_event(&self) -> Option<f64> {
        let cpu = self.cpu?;
        (self.kept > 0).then(|| cpu.as_secs_f64() * 1e6 / self.kept as f64)
    }
}

fn rate_label(rate: Option<u64>) -> String {
    rate.map_or_else(|| "max".to_string(), |rate| format!("{}k", rate / 1000))
}

// ---------------------------------------------------------------------------------------------
// ven's reader and aggregator on one thread

#[derive(Default)]
struct Shared {
    events: AtomicU64,
    lost: AtomicU64,
    flush: AtomicBool,
    flushes: AtomicU64,
    summaries: AtomicU64,
}

/// What the reading thread ends with.
#[derive(Debug)]
struct ReaderEnd {
    loss: LossCounters,
    counters: AggregateCounters,
    error: Option<String>,
}

/// The reading thread; stopped and joined on drop (a receive waits at most 250 ms).
struct VenIngest {
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    task: Option<PathBuf>,
    thread: Option<JoinHandle<ReaderEnd>>,
    socket_buffer: (usize, bool),
}

impl VenIngest {
    /// Opens the reader inside B and starts reading on a thread named `ven-bench-nflog`.
    fn start(lab: &Lab, capacity: usize, with_connections: bool) -> BenchResult<VenIngest> {
        let mut reader = lab
            .b
            .run(|| NflogReader::open(GROUP))
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("ven's NFLOG reader: {e}"))?;
        let socket_buffer = reader.socket_buffer();
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared::default());
        let (task_tx, task_rx) = std::sync::mpsc::sync_channel(1);
        let thread = {
            let (stop, shared) = (Arc::clone(&stop), Arc::clone(&shared));
            std::thread::Builder::new()
                .name("ven-bench-nflog".into())
                .spawn(move || {
                    let task =
                        std::fs::read_link("/proc/thread-self").ok().map(|p| Path::new("/proc").join(p));
                    let _ = task_tx.send(task);
                    let mut aggregator = Aggregator::new(capacity);
                    let mut connections = Connections::new(capacity, Timeouts::default());
                    let started = Instant::now();
                    let mut out = Vec::with_capacity(aggregator.capacity() + 4);
                    let mut error = None;
                    while !stop.load(Ordering::Relaxed) {
                        let now = unix_now();
                        let mono = u32::try_from(started.elapsed().as_secs()).unwrap_or(u32::MAX);
                        let batch = reader.read_batch(|event| {
                            let secs = event.message.timestamp.map_or(now, |t| t.sec);
                            let connection = !with_connections
                                || connections.observe(&event.key, &event.packet, mono).is_connection();
                            let counted =
                                Event { unix_secs: secs, scale: 1, connection, length: event.packet.length };
                            aggregator.record_event(&event.key, &counted);
                        });
                        match batch {
                            Ok(batch) if batch.events > 0 => {
                                shared.events.fetch_add(batch.events as u64, Ordering::Relaxed);
                            }
                            Ok(_) => {}
                            Err(e) => {
                                error = Some(e.to_string());
                                break;
                            }
                        }
                        shared.lost.store(reader.loss().lost(), Ordering::Relaxed);
                        if shared.flush.swap(false, Ordering::AcqRel) {
                            out.clear();
                            aggregator.flush_into(&mut out);
                            connections.sweep(mono);
                            shared.summaries.store(out.len() as u64, Ordering::Relaxed);
                            shared.flushes.fetch_add(1, Ordering::Release);
                        }
                    }
                    ReaderEnd { loss: reader.loss(), counters: aggregator.counters(), error }
                })
                .map_err(|e| format!("reader thread: {e}"))?
        };
        let task = task_rx.recv_timeout(Duration::from_secs(5)).ok().flatten();
        Ok(VenIngest { stop, shared, task, thread: Some(thread), socket_buffer })
    }

    fn events(&self) -> u64 {
        self.shared.events.load(Ordering::Relaxed)
    }

    fn cpu(&self) -> Option<Duration> {
        task_cpu(self.task.as_deref()?)
    }

    /// Waits until no event has come for [`QUIET`] (at most [`MAX_DRAIN`]).
    fn drain(&self) -> BenchResult<()> {
        let start = Instant::now();
        let (mut last, mut since) = (self.events(), Instant::now());
        while since.elapsed() < QUIET && start.elapsed() < MAX_DRAIN {
            interrupted()?;
            std::thread::sleep(Duration::from_millis(50));
            let now = self.events();
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
        Ok(())
    }

    /// Asks the thread to flush the aggregator; the number of summaries it wrote.
    fn flush(&self) -> Option<u64> {
        let before = self.shared.flushes.load(Ordering::Acquire);
        self.shared.flush.store(true, Ordering::Release);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            if self.shared.flushes.load(Ordering::Acquire) != before {
                return Some(self.shared.summaries.load(Ordering::Relaxed));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    fn finish(mut self) -> BenchResult<ReaderEnd> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().ok_or("reader thread already joined")?;
        thread.join().map_err(|_| "the reader thread panicked".to_string())
    }
}

impl Drop for VenIngest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// ven's steps, `label` in the table; `with_connections`: each event goes through the
/// connection table first, as in the agent (else issue 4's path: the aggregator alone).
fn ven_steps(
    lab: &Lab,
    scale: &Scale,
    with_connections: bool,
    label: &str,
) -> BenchResult<(Vec<Step>, ReaderEnd, (usize, bool))> {
    let capacity = FlowSettings::default().tracked_flows;
    let ingest = VenIngest::start(lab, capacity, with_connections)?;
    if ingest.task.is_none() {
        println!("  (the reader thread's /proc entry was not found: no CPU figures)");
    }
    let mut steps = Vec::new();
    for &rate in &scale.rates {
        interrupted()?;
        let (events, lost, cpu, logged) = (
            ingest.events(),
            ingest.shared.lost.load(Ordering::Relaxed),
            ingest.cpu(),
            lab.counter("NFLOG")?,
        );
        let offered = lab.offer(rate, scale.step);
        ingest.drain()?;
        let step = Step {
            rate,
            offered,
            logged: lab.counter("NFLOG")? - logged,
            kept: ingest.events() - events,
            lost_counted: ingest.shared.lost.load(Ordering::Relaxed) - lost,
            cpu: ingest.cpu().zip(cpu).map(|(after, before)| after.saturating_sub(before)),
            summaries: ingest.flush(),
        };
        print_step(label, &step);
        steps.push(step);
    }
    let socket_buffer = ingest.socket_buffer;
    let end = ingest.finish()?;
    if let Some(error) = &end.error {
        return Err(format!("ven's reader stopped: {error}"));
    }
    Ok((steps, end, socket_buffer))
}

// ---------------------------------------------------------------------------------------------
// ulogd2

/// A temporary directory, removed on drop.
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// On tmpfs where there is one: ulogd2's sqlite3 output commits every row, and on a disk
    /// each commit waits for an fsync.
    fn new() -> BenchResult<Scratch> {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        let path = base.join(format!("ven-bench-flows-{}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Scratch { path })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// ulogd2's plugin directory (Debian: /usr/lib/<triplet>/ulogd).
fn ulogd_plugins() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib")
        .map(|dir| dir.flatten().map(|entry| entry.path().join("ulogd")).collect())
        .unwrap_or_default();
    candidates.extend(["/usr/lib/ulogd", "/usr/local/lib/ulogd"].map(PathBuf::from));
    candidates.into_iter().find(|dir| dir.join("ulogd_inppkt_NFLOG.so").is_file())
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn ulogd_ready() -> bool {
    have("ulogd")
        && have("sqlite3")
        && ulogd_plugins().is_some_and(|dir| dir.join("ulogd_output_SQLITE3.so").is_file())
}

/// Finds ulogd2, installing it with apt-get when it is missing (root only); `Err`: why it is
/// skipped.
fn ensure_ulogd() -> BenchResult<PathBuf> {
    if !ulogd_ready() {
        const PACKAGES: [&str; 3] = ["ulogd2", "ulogd2-sqlite3", "sqlite3"];
        println!("ulogd2:    not installed; running `apt-get install -y {}`", PACKAGES.join(" "));
        let install = || {
            Command::new("apt-get")
                .args(["install", "-y", "-q"])
                .args(PACKAGES)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|status| status.success())
        };
        if !install() {
            println!("ulogd2:    install failed; running `apt-get update` and trying once more");
            let _ = Command::new("apt-get")
                .args(["update", "-q"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status();
            if !install() {
                return Err("apt-get could not install ulogd2, ulogd2-sqlite3 and sqlite3".into());
            }
        }
    }
    ulogd_plugins()
        .filter(|_| ulogd_ready())
        .ok_or_else(|| "ulogd, its SQLITE3 plugin or the sqlite3 tool is missing".into())
}

/// ulogd2 running inside B; stopped on drop (before its directory goes).
struct Ulogd {
    daemon: Daemon,
    pid: u32,
    db: PathBuf,
    log: PathBuf,
    _scratch: Scratch,
}

impl Ulogd {
    fn start(lab: &Lab, plugins: &Path) -> BenchResult<Ulogd> {
        let scratch = Scratch::new()?;
        let (db, log, conf) = (
            scratch.path.join("ulogd.sqlite3db"),
            scratch.path.join("ulogd.log"),
            scratch.path.join("ulogd.conf"),
        );
        let created = Command::new("sqlite3")
            .arg(&db)
            .arg(ULOGD_TABLE)
            .output()
            .map_err(|e| format!("sqlite3: {e}"))?;
        if !created.status.success() {
            return Err(format!("sqlite3 {}: {}", db.display(), String::from_utf8_lossy(&created.stderr)));
        }
        let plugin = |name: &str| format!("plugin=\"{}\"\n", plugins.join(name).display());
        let mut text = String::new();
        let _ = writeln!(text, "[global]\nlogfile=\"{}\"\nloglevel=5", log.display());
        for name in [
            "ulogd_inppkt_NFLOG.so",
            "ulogd_raw2packet_BASE.so",
            "ulogd_filter_IFINDEX.so",
            "ulogd_filter_IP2STR.so",
            "ulogd_output_SQLITE3.so",
        ] {
            text.push_str(&plugin(name));
        }
        let _ = writeln!(text, "stack=log1:NFLOG,base1:BASE,ifi1:IFINDEX,ip2str1:IP2STR,sqlite3_pkt:SQLITE3");
        // The same kernel batching as ven's reader (QUEUE_THRESHOLD, FLUSH_TIMEOUT_CS) and its
        // socket buffer, which ulogd2 doubles on loss up to the maximum. unbind=0: never
        // PF_UNBIND (a no-op on current kernels, and not ours to do).
        let _ = writeln!(
            text,
            "\n[log1]\ngroup={GROUP}\nunbind=0\nnetlink_socket_buffer_size={ULOGD_SOCKET_BUFFER}\n\
             netlink_socket_buffer_maxsize={ULOGD_SOCKET_BUFFER_MAX}\nnetlink_qthreshold={}\n\
             netlink_qtimeout={}",
            ven::flows::nflog::QUEUE_THRESHOLD,
            ven::flows::nflog::FLUSH_TIMEOUT_CS,
        );
        let _ = writeln!(text, "\n[sqlite3_pkt]\ntable=\"ulog_pkt\"\ndb=\"{}\"", db.display());
        std::fs::write(&conf, text).map_err(|e| format!("{}: {e}", conf.display()))?;

        let out = scratch.path.join("ulogd.out");
        let file = std::fs::File::create(&out).map_err(|e| format!("{}: {e}", out.display()))?;
        let err = file.try_clone().map_err(|e| format!("{}: {e}", out.display()))?;
        let mut command = lab.b.command("ulogd");
        command.arg("-c").arg(&conf);
        let mut daemon = Daemon::spawn("ulogd", command, Stdio::from(file), Stdio::from(err), &out)
            .map_err(|e| e.to_string())?;
        let pid = daemon.pid();
        if let Err(why) = lab.wait_group(true) {
            let status = daemon.exited();
            return Err(format!("{why}; ulogd {status:?}: {} {}", tail(&out, 5), tail(&log, 10)));
        }
        Ok(Ulogd { daemon, pid, db, log, _scratch: scratch })
    }

    fn alive(&mut self) -> BenchResult<()> {
        match self.daemon.exited() {
            None => Ok(()),
            Some(status) => Err(format!("ulogd exited ({status}): {}", tail(&self.log, 10))),
        }
    }

    fn cpu(&self) -> Option<Duration> {
        process_cpu(self.pid)
    }

    /// Rows stored so far.
    fn rows(&self) -> BenchResult<u64> {
        let output = Command::new("sqlite3")
            .args(["-cmd", ".timeout 10000"])
            .arg(&self.db)
            .arg("SELECT count(*) FROM ulog_pkt;")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("sqlite3: {e}"))?;
        let text = String::from_utf8_lossy(&output.stdout);
        text.trim().parse().map_err(|_| {
            format!("sqlite3 count: {text:?} {}", String::from_utf8_lossy(&output.stderr).trim())
        })
    }

    /// One stored row, to show what ulogd2 keeps.
    fn sample(&self) -> String {
        Command::new("sqlite3")
            .args(["-cmd", ".timeout 10000"])
            .arg(&self.db)
            .arg("SELECT * FROM ulog_pkt LIMIT 1;")
            .stdin(Stdio::null())
            .output()
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
            .unwrap_or_default()
    }

    /// Its notices of ENOBUFS, one per failed receive: "We are losing events" while it may still
    /// grow its socket buffer, "Maximum buffer size ... has been reached" once it may not.
    fn losses(&self) -> u64 {
        std::fs::read_to_string(&self.log)
            .map(|text| {
                text.lines()
                    .filter(|line| line.contains("losing events") || line.contains("Maximum buffer size"))
                    .count() as u64
            })
            .unwrap_or(0)
    }

    /// Waits until ulogd2 has been idle (its queue drained) for [`IDLE_POLLS`] polls.
    fn drain(&mut self) -> BenchResult<()> {
        let start = Instant::now();
        let (mut idle, mut last) = (0, self.cpu());
        while idle < IDLE_POLLS && start.elapsed() < MAX_ULOGD_DRAIN {
            interrupted()?;
            self.alive()?;
            std::thread::sleep(POLL);
            let now = self.cpu();
            let used = now.zip(last).map_or(Duration::ZERO, |(now, last)| now.saturating_sub(last));
            idle = if used < IDLE_CPU { idle + 1 } else { 0 };
            last = now;
        }
        Ok(())
    }

    /// The socket buffer ulogd2 reports having set (as the kernel reports it).
    fn socket_buffer(&self) -> Option<u64> {
        const SET: &str = "netlink buffer size has been set to ";
        let text = std::fs::read_to_string(&self.log).ok()?;
        text.lines().find_map(|line| line.split_once(SET)?.1.trim().parse().ok())
    }

    /// Bytes of the database and its journal.
    fn db_bytes(&self) -> u64 {
        let size = |path: &Path| std::fs::metadata(path).map_or(0, |m| m.len());
        size(&self.db) + size(&self.db.with_extension("sqlite3db-journal"))
    }
}

/// What the ulogd2 run found besides its steps.
struct UlogdEnd {
    rows: u64,
    db_bytes: u64,
    idle_rss: Option<u64>,
    hwm: Option<u64>,
    sample: String,
    socket_buffer: Option<u64>,
}

fn ulogd_steps(lab: &Lab, scale: &Scale, plugins: &Path) -> BenchResult<(Vec<Step>, UlogdEnd)> {
    let mut ulogd = Ulogd::start(lab, plugins)?;
    ulogd.alive()?;
    let (idle_rss, _) = rss(&ulogd.pid.to_string());
    let mut steps = Vec::new();
    for &rate in &scale.rates {
        interrupted()?;
        ulogd.alive()?;
        let (rows, losses, cpu, logged) = (ulogd.rows()?, ulogd.losses(), ulogd.cpu(), lab.counter("NFLOG")?);
        let offered = lab.offer(rate, scale.step);
        ulogd.drain()?;
        let step = Step {
            rate,
            offered,
            logged: lab.counter("NFLOG")? - logged,
            kept: ulogd.rows()? - rows,
            lost_counted: ulogd.losses() - losses,
            cpu: ulogd.cpu().zip(cpu).map(|(after, before)| after.saturating_sub(before)),
            summaries: None,
        };
        print_step("ulogd2", &step);
        steps.push(step);
    }
    let (_, hwm) = rss(&ulogd.pid.to_string());
    let end = UlogdEnd {
        rows: ulogd.rows()?,
        db_bytes: ulogd.db_bytes(),
        idle_rss,
        hwm,
        sample: ulogd.sample(),
        socket_buffer: ulogd.socket_buffer(),
    };
    ulogd.daemon.stop(Duration::from_secs(5));
    Ok((steps, end))
}

// ---------------------------------------------------------------------------------------------
// Output

/// `1234567` -> `1,234,567`.
fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn print_step_header(kept: &str) {
    println!(
        "{:<7} {:>5} {:>11} {:>11} {:>11} {:>11} {:>9} {:>8} {:>9} {:>11} {:>9}",
        "reader",
        "step",
        "offered/s",
        "logged",
        kept,
        "kept/s",
        "missing",
        "counted",
        "us/event",
        "ev/CPU-s",
        "flows"
    );
}

fn print_step(reader: &str, step: &Step) {
    let us = step.us_per_event();
    println!(
        "{:<7} {:>5} {:>11} {:>11} {:>11} {:>11} {:>9} {:>8} {:>9} {:>11} {:>9}",
        reader,
        rate_label(step.rate),
        count(step.offered.pps() as u64),
        count(step.logged),
        count(step.kept),
        count(per_second(step.kept, step.offered.elapsed) as u64),
        count(step.missing()),
        count(step.lost_counted),
        us.map_or_else(|| "-".into(), |us| format!("{us:.3}")),
        us.filter(|us| *us > 0.0).map_or_else(|| "-".into(), |us| count((1e6 / us) as u64)),
        step.summaries.map_or_else(|| "-".into(), count),
    );
    if step.offered.errors > 0 {
        println!("        ({} sends failed in this step)", count(step.offered.errors));
    }
}

/// Totals over a run's steps: events kept, CPU.
fn cpu_per_event(steps: &[Step]) -> Option<f64> {
    let kept: u64 = steps.iter().map(|s| s.kept).sum();
    let cpu = steps.iter().map(|s| s.cpu).sum::<Option<Duration>>()?;
    (kept > 0).then(|| cpu.as_secs_f64() * 1e6 / kept as f64)
}

/// Where loss starts: the offered rate of the first step that lost anything.
fn loss_starts(steps: &[Step]) -> String {
    match steps.iter().find(|s| !s.lossless()) {
        Some(step) => format!("{} pps ({})", count(step.offered.pps() as u64), rate_label(step.rate)),
        None => {
            let top = steps.iter().map(|s| s.offered.pps() as u64).max().unwrap_or(0);
            format!("none up to {} pps", count(top))
        }
    }
}

/// Missing events at the steps offered at or below `threshold` pps: "lost of logged".
fn loss_below(steps: &[Step], threshold: u64) -> String {
    let below: Vec<&Step> = steps.iter().filter(|s| s.rate.is_some_and(|rate| rate <= threshold)).collect();
    if below.is_empty() {
        return "-".into();
    }
    let logged: u64 = below.iter().map(|s| s.logged).sum();
    let missing: u64 = below.iter().map(|s| s.missing().max(s.lost_counted)).sum();
    format!("{} of {}", count(missing), count(logged))
}

fn loss_at_max(steps: &[Step]) -> String {
    steps.last().map_or_else(
        || "-".into(),
        |s| {
            let share = if s.logged == 0 { 0.0 } else { 100.0 * s.missing() as f64 / s.logged as f64 };
            format!("{share:.1} % of {}", count(s.logged))
        },
    )
}

fn table(rows: &[[String; 4]]) -> String {
    let widths = [0, 1, 2, 3].map(|c| rows.iter().map(|row| row[c].chars().count()).max().unwrap_or(0));
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let _ = writeln!(
            out,
            "{:<w0$} | {:<w1$} | {:<w2$} | {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
        if i == 0 {
            let _ = writeln!(out, "{}", "-".repeat(widths.iter().sum::<usize>() + 3 * 3 + 6));
        }
    }
    out
}

/// The 1-minute load average (other work on the machine skews every figure).
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|output| {
            let text = if output.stdout.is_empty() { output.stderr } else { output.stdout };
            String::from_utf8_lossy(&text).lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

fn run(scale: &Scale) -> BenchResult<()> {
    let settings = FlowSettings::default();
    let threshold = u64::from(settings.sampling_threshold);
    println!("ven flows benchmark (issue 4), scale {}", scale.name);
    println!(
        "  Traffic: UDP from A (198.18.0.1-{SOURCES}) to B ({RECEIVER}) ports {FIRST_PORT}-{} over a veth pair:",
        FIRST_PORT + PORTS - 1
    );
    println!(
        "  {} flow keys, {PAYLOAD}-byte payloads, steps of {:?} at {} pps (max: the sender flat out).",
        u32::from(SOURCES) * u32::from(PORTS),
        scale.step,
        scale.rates.iter().map(|r| rate_label(*r)).collect::<Vec<_>>().join(", ")
    );
    println!(
        "  B: -j NFLOG --nflog-prefix {PREFIX} --nflog-group {GROUP} --nflog-size {NFLOG_SIZE}, then -j DROP"
    );
    println!(
        "  (the enforced default deny as render.rs writes it: no --nflog-threshold, the reader sets the"
    );
    println!(
        "  group's queue threshold to {} and flush timeout to {} ms; ulogd2 is given the same).",
        ven::flows::nflog::QUEUE_THRESHOLD,
        ven::flows::nflog::FLUSH_TIMEOUT_CS * 10
    );
    println!(
        "  logged: the NFLOG rule's packet counter; kept: events decoded (ven) or rows stored (ulogd2);"
    );
    println!(
        "  missing: logged - kept; counted: loss the reader saw itself (ven: LossCounters::lost(), i.e."
    );
    println!("  sequence gaps + ENOBUFS; ulogd2: its ENOBUFS notices, one per failed receive); us/event:");
    println!("  the reader's CPU (ven: its thread; ulogd2: its process) per kept event; ev/CPU-s: 1/that;");
    println!("  flows: summaries the aggregator flushed after the step. ven: reader, connection table");
    println!("  and aggregator as in the agent (issue 13); ven-nc: the same without the connection table.");
    println!();

    let load_before = load();
    let memory = memory()?;
    interrupted()?;
    let lab = Lab::new()?;
    println!("iptables:  {}", first_line("iptables", &["-V"]));
    // Warm-up: neighbour resolution and caches, with the drop rule only.
    lab.offer(Some(WARMUP_RATE), WARMUP);
    std::thread::sleep(Duration::from_millis(200));
    let dropped = lab.counter("DROP")?;
    let baseline = lab.offer(None, scale.step);
    std::thread::sleep(Duration::from_millis(200));
    let reached = lab.counter("DROP")? - dropped;
    println!(
        "baseline:  no log rule, DROP only: sender {} pps, {} of {} sent reached INPUT",
        count(baseline.pps() as u64),
        count(reached),
        count(baseline.sent)
    );
    lab.log_rule()?;
    println!();

    print_step_header("kept");
    let (ven, ven_end, socket_buffer) = ven_steps(&lab, scale, true, "ven")?;
    lab.wait_group(false)?;
    let (ven_plain, _, _) = ven_steps(&lab, scale, false, "ven-nc")?;
    lab.wait_group(false)?;

    let ulogd = match ensure_ulogd() {
        Ok(plugins) => {
            let version = first_line("ulogd", &["-V"]);
            let result = ulogd_steps(&lab, scale, &plugins)?;
            Some((version, result))
        }
        Err(why) => {
            println!("ulogd2:    SKIPPED: {why}");
            None
        }
    };
    println!();

    println!(
        "ven:       socket buffer {} bytes as the kernel reports it ({}); reader totals: {:?}",
        socket_buffer.0,
        if socket_buffer.1 { "SO_RCVBUFFORCE" } else { "SO_RCVBUF, capped by rmem_max" },
        ven_end.loss
    );
    println!(
        "           aggregator: {} events, {} flows at most at once, {} folded (capacity {})",
        count(ven_end.counters.events),
        count(ven_end.counters.high_water as u64),
        count(ven_end.counters.folded),
        count(settings.tracked_flows as u64)
    );
    if let Some((version, (_, end))) = &ulogd {
        println!(
            "ulogd2:    {version}; {} rows, {} bytes of sqlite3 on tmpfs ({} B/row), one row per packet,",
            count(end.rows),
            count(end.db_bytes),
            end.db_bytes.checked_div(end.rows).unwrap_or(0)
        );
        println!("           no aggregation, no size cap; a row: {}", end.sample);
        println!(
            "           socket buffer {} bytes as the kernel reports it (ulogd2's log)",
            end.socket_buffer.map_or_else(|| "?".into(), count)
        );
    }
    println!(
        "memory:    child process, Aggregator::new({}): VmRSS {} idle, {} with the empty table, {} with",
        count(u64::from(RSS_FLOWS)),
        mib(memory.idle),
        mib(memory.empty),
        mib(memory.full)
    );
    println!(
        "           {} flows tracked ({} folded), VmHWM {}; after one flush_into a reserved Vec ({} summaries)",
        count(memory.tracked),
        count(memory.folded),
        mib(memory.full_hwm),
        count(memory.summaries)
    );
    println!(
        "           VmRSS {}, VmHWM {}; bytes_per_flow() {} B; measured (full - idle) / flows {} B",
        mib(memory.flushed),
        mib(memory.flushed_hwm),
        memory.bytes_per_flow,
        (memory.full.saturating_sub(memory.idle) * 1024) / u64::from(RSS_FLOWS)
    );
    println!(
        "           Connections::new({}) with {} tuples tracked: table {} ({} B per tuple at the cap),",
        count(u64::from(RSS_FLOWS)),
        count(memory.tuples),
        mib(memory.tuple_table_bytes / 1024),
        memory.bytes_per_tuple
    );
    println!(
        "           VmRSS {} -> {} (+{}), VmHWM {}",
        mib(memory.tuples_rss_before),
        mib(memory.tuples_rss),
        mib(memory.tuples_rss.saturating_sub(memory.tuples_rss_before)),
        mib(memory.tuples_hwm)
    );
    println!(
        "           observe(): {} ns per packet of a tracked tuple, {} ns per new tuple past the cap",
        memory.again_ns, memory.overflow_ns
    );
    println!();

    let ulogd_steps = ulogd.as_ref().map(|(_, (steps, _))| steps.as_slice());
    let ulogd_end = ulogd.as_ref().map(|(_, (_, end))| end);
    let skipped = || "skipped".to_string();
    let us = |v: Option<f64>| v.map_or_else(|| "-".into(), |us| format!("{us:.3} us"));
    let per_core = |v: Option<f64>| {
        v.filter(|us| *us > 0.0).map_or_else(|| "-".into(), |us| format!("{}/s", count((1e6 / us) as u64)))
    };
    let rows = vec![
        ["metric".into(), "ven".into(), "ulogd2".into(), "target".into()],
        [
            "NFLOG ingest per core (events per CPU-second)".into(),
            per_core(cpu_per_event(&ven)),
            ulogd_steps.map_or_else(skipped, |s| per_core(cpu_per_event(s))),
            ">= 500,000/s".into(),
        ],
        [
            "  the same without the connection table (issue 4)".into(),
            per_core(cpu_per_event(&ven_plain)),
            "-".into(),
            "-".into(),
        ],
        [
            "CPU per event (reader)".into(),
            us(cpu_per_event(&ven)),
            ulogd_steps.map_or_else(skipped, |s| us(cpu_per_event(s))),
            "<= 2 us (0.25 us local)".into(),
        ],
        [
            "loss starts at (offered)".into(),
            loss_starts(&ven),
            ulogd_steps.map_or_else(skipped, loss_starts),
            format!("above the sampling threshold ({}/s)", count(threshold)),
        ],
        [
            format!("loss in steps <= {}/s (missing of logged)", count(threshold)),
            loss_below(&ven, threshold),
            ulogd_steps.map_or_else(skipped, |s| loss_below(s, threshold)),
            "0".into(),
        ],
        [
            "loss at the sender's max rate".into(),
            loss_at_max(&ven),
            ulogd_steps.map_or_else(skipped, loss_at_max),
            "counted, never hidden".into(),
        ],
        [
            "what is stored per event".into(),
            format!("a count in <= {} flows (RAM)", count(settings.tracked_flows as u64)),
            ulogd_end.map_or_else(skipped, |end| {
                format!("a row: {} B of sqlite3", end.db_bytes.checked_div(end.rows).unwrap_or(0))
            }),
            "bounded".into(),
        ],
        [
            "RAM per tracked flow".into(),
            format!(
                "{} B ({} B measured)",
                memory.bytes_per_flow,
                (memory.full.saturating_sub(memory.idle) * 1024) / u64::from(RSS_FLOWS)
            ),
            "- (no flow table)".into(),
            "<= 128 B".into(),
        ],
        [
            "connection table at 100k tracked tuples (issue 13)".into(),
            format!(
                "{} ({} B/tuple), RSS +{}",
                mib(memory.tuple_table_bytes / 1024),
                memory.bytes_per_tuple,
                mib(memory.tuples_rss.saturating_sub(memory.tuples_rss_before))
            ),
            "- (no connection state)".into(),
            "capped, in the budget".into(),
        ],
        [
            "peak RSS, 100k flows (ven) / whole run (ulogd2)".into(),
            format!("{} ({} after a flush)", mib(memory.full_hwm), mib(memory.flushed_hwm)),
            ulogd_end.map_or_else(skipped, |end| end.hwm.map_or_else(|| "-".into(), mib)),
            "<= 40 MB".into(),
        ],
        [
            "idle RSS (bench child / ulogd2 bound)".into(),
            mib(memory.idle),
            ulogd_end.map_or_else(skipped, |end| end.idle_rss.map_or_else(|| "-".into(), mib)),
            "<= 6 MB (the agent)".into(),
        ],
    ];
    print!("{}", table(&rows));
    println!();
    println!("notes:     ven's RSS figures are this bench binary's (the ven library, no agent threads);");
    println!("           ulogd2's database is on tmpfs: on a disk each row's commit waits for an fsync.");
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("machine:   {cpus} CPUs; 1-minute load average {load_before} at start, {} at end", load());
    Ok(())
}
