//! Footprint benchmark (issue 10, section 3): binary sizes per target, and the memory, wake-ups,
//! CPU and disk writes of a real `ven agent` holding an enforced policy, printed beside the same
//! figures for the idle `pce serve` it is paired with, in the same run.
//!
//! Run as root: `cargo bench --locked --bench footprint` (an idle window of 60 s per profile).
//! `VEN_BENCH_SCALE=small` (or the argument `small`) shortens the window to 10 s. `VEN_BIN`
//! names another `ven` to measure (e.g. a static x86_64 musl build, the boards' kind of
//! binary); `PCE_BIN` another `pce`.
//!
//! - Sizes: `target/dist/<triple>/ven` for each board triple (written by the cross build in
//!   `targets/`; "not built" when absent) and the host release binaries this bench runs.
//! - Per profile (board-configs/generic-x86_64.conf, the default configuration's values, and
//!   board-configs/openwrt-aarch64.conf run as it is on this x86 host): the lab of crates/lab
//!   (namespaces on a bridge, 198.18.0.0/24) with the release `pce serve` and one release
//!   `ven agent` (db), paired, labelled, given the rule web -> db 5432/tcp and enforced. Then:
//!   1. idle window: wake-ups (voluntary + involuntary context switches summed over every
//!      thread, /proc/PID/task/*/status), CPU (schedstat of every thread, plus reaped children),
//!      bytes written (/proc/PID/io write_bytes) and RSS (/proc/PID/status), agent and PCE;
//!   2. flows: real traffic, one UDP datagram to each of 100k (source, port) pairs from the PCE's
//!      namespace to db's closed ports, dropped and logged by the enforced default deny (NFLOG),
//!      below the profile's sampling threshold; RSS and VmHWM with the flows tracked (the counts
//!      from `ven status --json`), then RSS after the agent's next flush. The flush interval is
//!      shortened to 20 s in both profiles so that the run shows the table given back; nothing
//!      else of the profile changes.
//!
//! Figures are printed, never asserted. Every wait and load loop is bounded in count and time;
//! traffic stays inside the lab's namespaces; a Ctrl-C or SIGTERM stops the run and the lab's
//! tear-down deletes the namespaces, processes and work dir.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal, kill};
use nix::unistd::Pid;
use ven_lab::process::run_bounded;
use ven_lab::scenario::{self, Host};
use ven_lab::{Binaries, Lab, LabOptions};

/// Board triples the cross build writes to `target/dist/<triple>/ven`.
const TRIPLES: [&str; 5] = [
    "x86_64-unknown-linux-gnu",
    "aarch64-unknown-linux-gnu",
    "aarch64-unknown-linux-musl",
    "armv7-unknown-linux-gnueabihf",
    "armv7-unknown-linux-musleabihf",
];
/// The profiles measured: (label, file under board-configs/).
const PROFILES: [(&str, &str); 2] = [("generic", "generic-x86_64.conf"), ("openwrt", "openwrt-aarch64.conf")];
/// Flush interval the bench gives both profiles (see the module doc).
const BENCH_FLUSH_INTERVAL_S: u64 = 20;
/// Flows driven through the agent: SOURCES addresses x PORTS destination ports.
const FLOWS: u32 = 100_000;
const SOURCES: [Ipv4Addr; 4] = [
    Ipv4Addr::new(198, 18, 0, 100),
    Ipv4Addr::new(198, 18, 0, 101),
    Ipv4Addr::new(198, 18, 0, 102),
    Ipv4Addr::new(198, 18, 0, 103),
];
/// Destination ports FIRST_PORT.. on db: nothing listens, the enforced default deny drops them
/// (clear of 22, the fail-safe SSH, and 5432, the rule's port).
const FIRST_PORT: u16 = 10_000;
/// Highest send rate, and the share of the profile's sampling threshold never passed (so every
/// packet is counted and every flow tracked).
const MAX_SEND_RATE: u64 = 40_000;
const THRESHOLD_SHARE: (u64, u64) = (3, 4);
/// Bounds of the sender child: datagrams and time.
const MAX_DATAGRAMS: u64 = FLOWS as u64;
const MAX_SEND_TIME: Duration = Duration::from_secs(30);
/// After the policy is in force, before the idle window: the agent's start-up work settles.
const SETTLE: Duration = Duration::from_secs(5);
/// How long the agent gets to count the flood (its RSS is read once the kernel delivered it),
/// and to flush and store it.
const DELIVERED: Duration = Duration::from_millis(500);
const COUNT_WAIT: Duration = Duration::from_secs(30);
/// `ven status` may answer with counters the manager published up to one canary interval ago
/// (10 s in the OpenWrt profile): a count is final when it has not moved for longer.
const STALE_STATUS: Duration = Duration::from_secs(12);
const FLUSH_WAIT: Duration = Duration::from_secs(BENCH_FLUSH_INTERVAL_S + 30);
/// The argument that makes this binary the sender (run inside the PCE's namespace).
const SEND_CHILD: &str = "--footprint-send-child";

type BenchResult<T> = Result<T, String>;

/// Set by the signal thread on SIGINT or SIGTERM: every loop stops and the lab tears down.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn interrupted() -> BenchResult<()> {
    if INTERRUPTED.load(Ordering::Relaxed) { Err("interrupted".into()) } else { Ok(()) }
}

#[derive(Clone, Copy, Debug)]
struct Scale {
    name: &'static str,
    window: Duration,
}

impl Scale {
    /// `VEN_BENCH_SCALE=small|full` or an argument `small`/`full` (cargo's `--bench` is ignored).
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
            "" | "full" => Ok(Scale { name: "full", window: Duration::from_secs(60) }),
            "small" => Ok(Scale { name: "small", window: Duration::from_secs(10) }),
            other => Err(format!("VEN_BENCH_SCALE={other:?}: expected small or full")),
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|arg| arg == SEND_CHILD) {
        return send_child(&args[at + 1..]);
    }
    let scale = match Scale::from_env() {
        Ok(scale) => scale,
        Err(why) => {
            eprintln!("footprint bench: {why}");
            return ExitCode::FAILURE;
        }
    };
    println!("ven footprint benchmark (issue 10), scale {}", scale.name);
    println!();
    print_sizes();
    if let Err(why) = prerequisites() {
        if std::env::var_os("CI").is_some() {
            eprintln!("footprint bench cannot run under CI: {why}");
            return ExitCode::FAILURE;
        }
        eprintln!("SKIPPED the running figures: they need root, network namespaces and iptables: {why}");
        return ExitCode::SUCCESS;
    }
    let bins = match binaries() {
        Ok(bins) => bins,
        Err(why) => {
            eprintln!("footprint bench: {why}");
            return ExitCode::FAILURE;
        }
    };
    let signals = match SignalThread::start() {
        Ok(signals) => signals,
        Err(why) => {
            eprintln!("footprint bench: {why}");
            return ExitCode::FAILURE;
        }
    };
    let mut results = Vec::new();
    let mut failed = None;
    for (label, file) in PROFILES {
        match measure_profile(&bins, scale, label, file) {
            Ok(result) => results.push(result),
            Err(why) => {
                failed = Some(format!("profile {label}: {why}"));
                break;
            }
        }
    }
    signals.stop();
    if !results.is_empty() {
        print_summary(scale, &results);
    }
    match failed {
        None => ExitCode::SUCCESS,
        Some(why) => {
            eprintln!("footprint bench failed: {why}");
            ExitCode::FAILURE
        }
    }
}

fn prerequisites() -> BenchResult<()> {
    ven_lab::netns::available()?;
    for tool in ["iptables-save", "ipset"] {
        ven_lab::netns::run("sh", &["-c", &format!("command -v {tool}")])
            .map_err(|_| format!("needs {tool}"))?;
    }
    Ok(())
}

/// The release `ven` cargo built for this bench (or `VEN_BIN`, e.g. a static musl build of
/// the board's kind), and `pce` beside it (built here when missing: `cargo bench --bench
/// footprint` builds only this package's binaries).
fn binaries() -> BenchResult<Binaries> {
    let ven = match std::env::var_os("VEN_BIN") {
        Some(path) => {
            println!("ven:       VEN_BIN is set: the agent measured is {}", Path::new(&path).display());
            PathBuf::from(path)
        }
        None => PathBuf::from(env!("CARGO_BIN_EXE_ven")),
    };
    let pce = match ven_lab::binaries::locate("pce", "PCE_BIN") {
        Ok(pce) => pce,
        Err(_) => {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            println!("pce:       not built; running `{cargo} build --release --locked -p pce --bin pce`");
            let status = Command::new(&cargo)
                .args(["build", "--release", "--locked", "-p", "pce", "--bin", "pce"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .map_err(|e| format!("{cargo}: {e}"))?;
            if !status.success() {
                return Err(format!("building pce failed ({status})"));
            }
            ven_lab::binaries::locate("pce", "PCE_BIN").map_err(|e| e.to_string())?
        }
    };
    Ok(Binaries { ven, pce })
}

/// SIGINT and SIGTERM are blocked in every thread (the main thread blocks them before any other
/// starts) and taken here, so a Ctrl-C ends the run through the normal path and the lab's
/// tear-down. SIGUSR1 ends the thread.
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
                    eprintln!("footprint bench: {signal}, stopping and cleaning up");
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
// Sizes

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn size_line(what: &str, path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(meta) => format!(
            "  {what:<34} {:>11} B  {:>5.2} MB  {}",
            count(meta.len()),
            meta.len() as f64 / 1e6,
            path.display()
        ),
        Err(_) => format!("  {what:<34} {:>11}", "not built"),
    }
}

fn print_sizes() {
    println!("binary sizes (stripped release; budget: static aarch64 ven <= 2.5 MB)");
    let dist = target_dir().join("dist");
    for triple in TRIPLES {
        println!("{}", size_line(&format!("ven {triple}"), &dist.join(triple).join("ven")));
    }
    println!("{}", size_line("ven host release (this run)", Path::new(env!("CARGO_BIN_EXE_ven"))));
    if let Some(path) = std::env::var_os("VEN_BIN") {
        println!("{}", size_line("ven measured below (VEN_BIN)", Path::new(&path)));
    }
    if let Ok(pce) = ven_lab::binaries::locate("pce", "PCE_BIN") {
        println!("{}", size_line("pce host release (this run)", &pce));
    }
    println!();
}

// ---------------------------------------------------------------------------------------------
// /proc readers

/// One look at a process: every figure the bench prints comes from two of these.
#[derive(Clone, Debug, Default)]
struct Sample {
    at: Option<Instant>,
    /// (thread id, name, its context switches), to say where wake-ups come from.
    per_thread: Vec<(u32, String, u64)>,
    /// Voluntary + involuntary context switches summed over the threads alive now.
    switches: u64,
    /// CPU of the threads alive now (schedstat) plus reaped children (stat, clock ticks).
    cpu: Duration,
    write_bytes: u64,
    threads: u64,
    rss_kib: u64,
    hwm_kib: u64,
    anon_kib: u64,
    file_kib: u64,
}

fn status_kib(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or(0)
}

fn status_number(status: &str, field: &str) -> u64 {
    status.lines().find_map(|line| line.strip_prefix(field)?.trim().parse().ok()).unwrap_or(0)
}

/// CPU of one thread: schedstat's nanoseconds, or utime + stime (ticks taken as 1/100 s).
fn task_cpu(task: &Path) -> Duration {
    if let Ok(text) = std::fs::read_to_string(task.join("schedstat")) {
        if let Some(ns) = text.split_whitespace().next().and_then(|n| n.parse().ok()) {
            return Duration::from_nanos(ns);
        }
    }
    Duration::from_millis(stat_ticks(&task.join("stat"), 11, 12) * 10)
}

/// The sum of two numeric fields of a stat file, counted from the state field (0) on.
fn stat_ticks(path: &Path, a: usize, b: usize) -> u64 {
    let Ok(stat) = std::fs::read_to_string(path) else { return 0 };
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    field(a) + field(b)
}

fn sample(pid: u32) -> BenchResult<Sample> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let status = std::fs::read_to_string(proc.join("status")).map_err(|e| format!("process {pid}: {e}"))?;
    let mut sample = Sample {
        at: Some(Instant::now()),
        threads: status_number(&status, "Threads:"),
        rss_kib: status_kib(&status, "VmRSS:"),
        hwm_kib: status_kib(&status, "VmHWM:"),
        anon_kib: status_kib(&status, "RssAnon:"),
        file_kib: status_kib(&status, "RssFile:"),
        ..Sample::default()
    };
    for task in std::fs::read_dir(proc.join("task")).map_err(|e| format!("process {pid}: {e}"))?.flatten() {
        let path = task.path();
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        let switches = status_number(&status, "voluntary_ctxt_switches:")
            + status_number(&status, "nonvoluntary_ctxt_switches:");
        sample.switches += switches;
        let tid = task.file_name().to_str().and_then(|t| t.parse().ok()).unwrap_or(0);
        let name = status.lines().find_map(|l| l.strip_prefix("Name:")).unwrap_or("?").trim().to_string();
        sample.per_thread.push((tid, name, switches));
        sample.cpu += task_cpu(&path);
    }
    // cutime + cstime: children the process waited for (iptables tools, when it runs them).
    sample.cpu += Duration::from_millis(stat_ticks(&proc.join("stat"), 13, 14) * 10);
    let io = std::fs::read_to_string(proc.join("io")).unwrap_or_default();
    sample.write_bytes =
        io.lines().find_map(|line| line.strip_prefix("write_bytes:")?.trim().parse().ok()).unwrap_or(0);
    Ok(sample)
}

/// What a process did between two samples.
#[derive(Clone, Debug, Default)]
struct Window {
    seconds: f64,
    wakeups_per_s: f64,
    cpu_percent: f64,
    write_bytes: u64,
    end: Sample,
    start_threads: Vec<(u32, String, u64)>,
}

impl Window {
    fn between(start: &Sample, end: &Sample) -> Window {
        let seconds = match (start.at, end.at) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
            _ => 0.0,
        };
        let per_s = |n: f64| if seconds > 0.0 { n / seconds } else { 0.0 };
        Window {
            seconds,
            wakeups_per_s: per_s(end.switches.saturating_sub(start.switches) as f64),
            cpu_percent: per_s(end.cpu.saturating_sub(start.cpu).as_secs_f64()) * 100.0,
            write_bytes: end.write_bytes.saturating_sub(start.write_bytes),
            end: end.clone(),
            start_threads: start.per_thread.clone(),
        }
    }

    /// "name N, ..." : context switches per thread over the window, busiest first.
    fn by_thread(&self) -> String {
        let mut counts: Vec<(String, u64)> = self
            .end
            .per_thread
            .iter()
            .map(|(tid, name, end)| {
                let start = self.start_threads.iter().find(|(t, _, _)| t == tid).map_or(0, |(_, _, n)| *n);
                (name.clone(), end.saturating_sub(start))
            })
            .collect();
        counts.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        counts.iter().map(|(name, n)| format!("{name} {n}")).collect::<Vec<_>>().join(", ")
    }

    fn bytes_per_hour(&self) -> f64 {
        if self.seconds > 0.0 { self.write_bytes as f64 * 3600.0 / self.seconds } else { 0.0 }
    }
}

/// The process running `exe` whose environment or command line holds `marker`.
fn find_process(exe: &Path, marker: &str) -> BenchResult<u32> {
    let exe = exe.canonicalize().map_err(|e| format!("{}: {e}", exe.display()))?;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").map_err(|e| format!("/proc: {e}"))?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else {
            continue;
        };
        if std::fs::read_link(entry.path().join("exe")).ok().as_deref() != Some(exe.as_path()) {
            continue;
        }
        let read = |file: &str| std::fs::read(entry.path().join(file)).unwrap_or_default();
        let holds = |bytes: Vec<u8>| {
            bytes.split(|&b| b == 0).any(|part| String::from_utf8_lossy(part).contains(marker))
        };
        if holds(read("environ")) || holds(read("cmdline")) {
            found.push(pid);
        }
    }
    match found.as_slice() {
        [pid] => Ok(*pid),
        [] => Err(format!("no process of {} with {marker:?}", exe.display())),
        many => Err(format!("several processes of {} with {marker:?}: {many:?}", exe.display())),
    }
}

// ---------------------------------------------------------------------------------------------
// The sender child (inside the PCE's namespace)

/// `--footprint-send-child DST FIRST_PORT PORTS RATE SRC...`: one datagram to each (source,
/// port), at most RATE a second, bounded by [`MAX_DATAGRAMS`] and [`MAX_SEND_TIME`]. Prints
/// `sent=N errors=M seconds=S`.
fn send_child(args: &[String]) -> ExitCode {
    match send(args) {
        Ok((sent, errors, elapsed)) => {
            println!("sent={sent} errors={errors} seconds={:.3}", elapsed.as_secs_f64());
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("sender: {why}");
            ExitCode::FAILURE
        }
    }
}

fn send(args: &[String]) -> BenchResult<(u64, u64, Duration)> {
    let parse = |i: usize| args.get(i).ok_or_else(|| format!("argument {i} missing: {args:?}"));
    let dst: IpAddr = parse(0)?.parse().map_err(|e| format!("destination: {e}"))?;
    let first_port: u16 = parse(1)?.parse().map_err(|e| format!("first port: {e}"))?;
    let ports: u16 = parse(2)?.parse().map_err(|e| format!("ports: {e}"))?;
    let rate: u64 = parse(3)?.parse().map_err(|e| format!("rate: {e}"))?;
    let sockets = args[4..]
        .iter()
        .map(|src| {
            let src: IpAddr = src.parse().map_err(|e| format!("source {src}: {e}"))?;
            UdpSocket::bind((src, 0)).map_err(|e| format!("binding {src}: {e}"))
        })
        .collect::<BenchResult<Vec<_>>>()?;
    let payload = [0x5a_u8; 16];
    let (mut sent, mut errors) = (0u64, 0u64);
    let start = Instant::now();
    'ports: for port in 0..ports {
        let target = SocketAddr::new(dst, first_port.saturating_add(port));
        for socket in &sockets {
            if sent + errors >= MAX_DATAGRAMS || start.elapsed() > MAX_SEND_TIME {
                break 'ports;
            }
            // Pace: never ahead of RATE per second.
            while (sent + errors) as f64 > rate as f64 * start.elapsed().as_secs_f64() {
                std::thread::sleep(Duration::from_micros(200));
            }
            match socket.send_to(&payload, target) {
                Ok(_) => sent += 1,
                Err(_) => errors += 1,
            }
        }
    }
    Ok((sent, errors, start.elapsed()))
}

// ---------------------------------------------------------------------------------------------
// One profile

/// Figures of one profile's run.
struct ProfileResult {
    label: &'static str,
    file: &'static str,
    tracked_max: u64,
    sampling_threshold: u64,
    agent_idle: Window,
    pce_idle: Window,
    flood: Flood,
}

/// The flows part of a profile's run.
#[derive(Default)]
struct Flood {
    sent: u64,
    send_seconds: f64,
    /// From `ven status --json` once the agent counted the flood.
    events: u64,
    tracked: u64,
    folded: u64,
    lost: u64,
    with_flows: Sample,
    /// After the next flush was stored.
    flushed: Option<Sample>,
    records_stored: u64,
}

/// `key = value` of a profile, the last one winning (as the agent reads it).
fn config_value(config: &str, key: &str) -> Option<u64> {
    config
        .lines()
        .filter_map(|line| {
            let (k, v) = line.split_once('=')?;
            (k.trim() == key).then(|| v.trim().parse().ok()).flatten()
        })
        .next_back()
}

/// A number in `ven status --json` output (`"key":N`), the first occurrence.
fn json_number(text: &str, key: &str) -> Option<u64> {
    let at = text.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = text[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn step(say: &str) {
    println!("  {say}");
}

fn measure_profile(
    bins: &Binaries,
    scale: Scale,
    label: &'static str,
    file: &'static str,
) -> BenchResult<ProfileResult> {
    interrupted()?;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("board-configs").join(file);
    let profile = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let config = format!(
        "{profile}\n# footprint bench: flush sooner, to see the table given back\nflow_flush_interval_s = {BENCH_FLUSH_INTERVAL_S}\n"
    );
    let tracked_max = config_value(&config, "flow_tracked_max").unwrap_or(100_000);
    let sampling_threshold = config_value(&config, "flow_sampling_threshold").unwrap_or(100_000);
    println!(
        "profile {label}: board-configs/{file} (flow_tracked_max {}, sampling threshold {}/s)",
        count(tracked_max),
        count(sampling_threshold)
    );

    let opts = LabOptions {
        name_prefix: format!("vfp-{label}"),
        ven_config: Some(config),
        policy_timeout: Duration::from_secs(30),
        ..LabOptions::default()
    };
    let mut lab = Lab::new(bins.clone(), opts).map_err(|e| e.to_string())?;
    let result = drive(&mut lab, scale, label, file, tracked_max, sampling_threshold);
    if result.is_err() {
        eprintln!("{}", lab.diagnostics());
    }
    lab.teardown();
    result
}

fn drive(
    lab: &mut Lab,
    scale: Scale,
    label: &'static str,
    file: &'static str,
    tracked_max: u64,
    sampling_threshold: u64,
) -> BenchResult<ProfileResult> {
    let e = |e: ven_lab::LabError| e.to_string();
    lab.start_pce().map_err(e)?;
    lab.activate(Host::Db).map_err(e)?;
    lab.start_agent(Host::Db).map_err(e)?;
    lab.wait_until("db online on the PCE", Duration::from_secs(30), |lab| {
        let workloads = lab.workloads()?;
        Ok(match scenario::find_workload(&workloads, Host::Db) {
            Some(w) if w.online => None,
            other => Some(format!("{other:?}")),
        })
    })
    .map_err(e)?;
    for role in ["web", "db"] {
        lab.pce(&["label", "create", "role", role]).map_err(e)?;
    }
    lab.pce(&["workload", "set", "db", "--label", "role=db"]).map_err(e)?;
    lab.pce(&["rule", "add", "--consumers", "role=web", "--providers", "role=db", "--service", "5432/tcp"])
        .map_err(e)?;
    lab.pce(&["provision"]).map_err(e)?;
    lab.set_state(Host::Db, "enforced").map_err(e)?;
    lab.wait_for_policy(&[Host::Db], "enforced", Duration::from_secs(30)).map_err(e)?;
    step("db's agent enforces the policy (web -> db 5432/tcp, default deny, drops logged)");

    let agent = find_process(&lab.binaries().ven, &lab.data_dir(Host::Db).display().to_string())?;
    let pce = find_process(&lab.binaries().pce, &lab.data_dir(Host::Pce).display().to_string())?;
    sleep_checked(lab, SETTLE)?;

    step(&format!("idle window of {} s: agent pid {agent}, pce pid {pce}", scale.window.as_secs()));
    let (agent_start, pce_start) = (sample(agent)?, sample(pce)?);
    sleep_checked(lab, scale.window)?;
    let (agent_end, pce_end) = (sample(agent)?, sample(pce)?);
    let agent_idle = Window::between(&agent_start, &agent_end);
    let pce_idle = Window::between(&pce_start, &pce_end);

    let flood = flows(lab, agent, sampling_threshold)?;
    Ok(ProfileResult { label, file, tracked_max, sampling_threshold, agent_idle, pce_idle, flood })
}

/// Sleeps `length` a second at a time, failing when interrupted or a daemon died.
fn sleep_checked(lab: &Lab, length: Duration) -> BenchResult<()> {
    let until = Instant::now() + length;
    loop {
        interrupted()?;
        lab.check_daemons().map_err(|e| e.to_string())?;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_secs(1)));
    }
}

/// The PCE namespace's interface on the lab segment (the one holding 198.18.0.1).
fn pce_interface(lab: &Lab) -> BenchResult<String> {
    let out = lab.exec_ok(Host::Pce, "ip", &["-o", "-4", "addr", "show"]).map_err(|e| e.to_string())?;
    let needle = format!("{}/", Host::Pce.address());
    out.stdout
        .lines()
        .find(|line| line.contains(&needle))
        .and_then(|line| line.split_whitespace().nth(1))
        .map(|dev| dev.trim_end_matches(':').split('@').next().unwrap_or(dev).to_string())
        .ok_or_else(|| format!("no interface with {needle} in the PCE namespace: {}", out.stdout))
}

fn status_json(lab: &Lab) -> BenchResult<String> {
    let done = lab.ven(Host::Db, &["status", "--json"]).map_err(|e| e.to_string())?;
    if !done.success() {
        return Err(format!("ven status --json failed: {}", done.stderr));
    }
    Ok(done.stdout)
}

fn flows(lab: &Lab, agent: u32, sampling_threshold: u64) -> BenchResult<Flood> {
    let dev = pce_interface(lab)?;
    for source in SOURCES {
        lab.exec_ok(Host::Pce, "ip", &["addr", "add", &format!("{source}/24"), "dev", &dev])
            .map_err(|e| e.to_string())?;
    }
    let before = status_json(lab)?;
    let (events_before, flushes_before) =
        (json_number(&before, "events").unwrap_or(0), json_number(&before, "flushes").unwrap_or(0));
    let stored_before = json_number(&before, "records_stored").unwrap_or(0);

    let rate = MAX_SEND_RATE.min(sampling_threshold * THRESHOLD_SHARE.0 / THRESHOLD_SHARE.1).max(1000);
    let ports = (FLOWS / SOURCES.len() as u32) as u16;
    let exe = std::env::current_exe().map_err(|e| format!("this binary's path: {e}"))?;
    let mut command = lab.command_in(Host::Pce, &exe);
    command.args([SEND_CHILD, &Host::Db.address().to_string(), &FIRST_PORT.to_string(), &ports.to_string()]);
    command.arg(rate.to_string()).args(SOURCES.iter().map(ToString::to_string));
    step(&format!(
        "flows: {} datagrams from {} sources to {} ports of db at {} pps (dropped, logged)",
        count(u64::from(FLOWS)),
        SOURCES.len(),
        count(u64::from(ports)),
        count(rate)
    ));
    let done = run_bounded(command, MAX_SEND_TIME + Duration::from_secs(10)).map_err(|e| e.to_string())?;
    if !done.success() {
        return Err(format!("the sender failed ({}): {}", done.status, done.stderr));
    }
    let field = |key: &str| -> f64 {
        done.stdout
            .split_whitespace()
            .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
            .unwrap_or(0.0)
    };
    let mut flood = Flood { sent: field("sent") as u64, send_seconds: field("seconds"), ..Flood::default() };
    std::thread::sleep(DELIVERED);
    flood.with_flows = sample(agent)?;

    // Counted: the events stop moving (the kernel flushes a partial batch within 100 ms).
    let start = Instant::now();
    let mut last = (u64::MAX, Instant::now());
    let text = loop {
        interrupted()?;
        let text = status_json(lab)?;
        let events = json_number(&text, "events").unwrap_or(0).saturating_sub(events_before);
        if events >= flood.sent || start.elapsed() > COUNT_WAIT {
            break text;
        }
        if events != last.0 {
            last = (events, Instant::now());
        } else if last.1.elapsed() > STALE_STATUS {
            break text;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    flood.events = json_number(&text, "events").unwrap_or(0).saturating_sub(events_before);
    flood.tracked = json_number(&text, "tracked").unwrap_or(0);
    flood.folded = json_number(&text, "folded").unwrap_or(0);
    flood.lost = json_number(&text, "lost").unwrap_or(0);
    if json_number(&text, "flushes").unwrap_or(0) > flushes_before {
        step("(a flush came during the flood: the tracked count is of the interval after it)");
    }

    // Flushed and stored: the table is given back.
    let start = Instant::now();
    loop {
        interrupted()?;
        let text = status_json(lab)?;
        let stored = json_number(&text, "records_stored").unwrap_or(0);
        if json_number(&text, "tracked") == Some(0) && stored > stored_before {
            flood.records_stored = stored - stored_before;
            // The store call ends (and frees its cache) right after the counter moves.
            std::thread::sleep(Duration::from_secs(2));
            flood.flushed = Some(sample(agent)?);
            break;
        }
        if start.elapsed() > FLUSH_WAIT {
            step("(no flush stored within the wait: no figure after the flush)");
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(flood)
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

fn mb(kib: u64) -> String {
    format!("{:.2} MB", kib as f64 * 1024.0 / 1e6)
}

fn rss(sample: &Sample) -> String {
    format!("{} (anon {}, file {})", mb(sample.rss_kib), mb(sample.anon_kib), mb(sample.file_kib))
}

fn print_summary(scale: Scale, results: &[ProfileResult]) {
    println!();
    for result in results {
        let (agent, pce, flood) = (&result.agent_idle, &result.pce_idle, &result.flood);
        println!(
            "== {} (board-configs/{}): idle window {:.0} s, enforced policy; flows: flow_tracked_max {}, threshold {}/s",
            result.label,
            result.file,
            agent.seconds,
            count(result.tracked_max),
            count(result.sampling_threshold)
        );
        let rows: Vec<[String; 4]> = vec![
            ["metric".into(), "ven agent".into(), "pce serve".into(), "target (ven)".into()],
            [
                "idle RSS".into(),
                rss(&agent.end),
                rss(&pce.end),
                if result.label == "openwrt" { "<= 3 MB".into() } else { "<= 6 MB".into() },
            ],
            [
                "idle wake-ups/s (all threads)".into(),
                format!("{:.2} ({} threads)", agent.wakeups_per_s, agent.end.threads),
                format!("{:.2} ({} threads)", pce.wakeups_per_s, pce.end.threads),
                "<= 1".into(),
            ],
            [
                "idle CPU (of one core)".into(),
                format!("{:.4} %", agent.cpu_percent),
                format!("{:.4} %", pce.cpu_percent),
                "< 0.1 %".into(),
            ],
            [
                "idle bytes written (per hour)".into(),
                format!("{} ({:.0} B/h)", count(agent.write_bytes), agent.bytes_per_hour()),
                format!("{} ({:.0} B/h)", count(pce.write_bytes), pce.bytes_per_hour()),
                "0".into(),
            ],
            [
                format!("RSS with the flows tracked ({} sent)", count(flood.sent)),
                rss(&flood.with_flows),
                "-".into(),
                "grows with flows, capped".into(),
            ],
            [
                "  tracked / folded / counted / lost".into(),
                format!(
                    "{} / {} / {} / {}",
                    count(flood.tracked),
                    count(flood.folded),
                    count(flood.events),
                    count(flood.lost)
                ),
                "-".into(),
                "tracked <= flow_tracked_max".into(),
            ],
            [
                "peak RSS (VmHWM, whole run)".into(),
                mb(flood.flushed.as_ref().unwrap_or(&flood.with_flows).hwm_kib),
                "-".into(),
                "<= 40 MB".into(),
            ],
            [
                "RSS after the next flush".into(),
                flood.flushed.as_ref().map_or_else(|| "-".into(), rss),
                "-".into(),
                "back near idle".into(),
            ],
            ["  records stored by that flush".into(), count(flood.records_stored), "-".into(), "-".into()],
        ];
        print!("{}", table(&rows));
        println!("  idle context switches by thread, agent: {}", agent.by_thread());
        println!("                                    pce:   {}", pce.by_thread());
        println!(
            "  (sender: {} datagrams in {:.1} s; RSS in MB of 10^6 bytes, from /proc/PID/status)",
            count(flood.sent),
            flood.send_seconds
        );
        println!();
    }
    println!(
        "notes:     scale {}; anon = RssAnon (heap, stacks, tables), file = RssFile (the binary's and",
        scale.name
    );
    println!(
        "           shared libraries' pages mapped in; on a board's static musl build there is no libc.so)."
    );
    println!(
        "           Wake-ups: context switches of every thread; CPU: schedstat of every thread plus reaped"
    );
    println!("           children; bytes written: /proc/PID/io write_bytes.");
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "machine:   {cpus} CPUs; load average {}",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
}

fn table(rows: &[[String; 4]]) -> String {
    use std::fmt::Write as _;
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
