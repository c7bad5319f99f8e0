//! Firewall benchmark (issue 3): ven's cold apply, one-member change and tamper checks, each
//! printed next to the raw tools doing the same work, measured in the same run.
//!
//! Run as root: `cargo bench --locked --bench firewall` (full scale: 10,000 rules, 10 sets of
//! 10,000 members, a 100,000-member set for the one-member change). `VEN_BENCH_SCALE=small` (or
//! the argument `small`) runs 1,000 rules and 10,000 members; `VEN_BENCH_RUNS=N` overrides the
//! number of runs. Everything happens inside network namespaces this binary creates and deletes:
//! the host's own firewall is never touched.
//!
//! It prints figures and never asserts timings. The one assertion is a correctness one: while a
//! set changes, an observer must never see it hold fewer members than it should (no empty
//! window); it is checked after the table is printed.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ven::firewall::{
    ApplySummary, Backend, Caps, CheckDepth, Firewall, FirewallConfig, Options, Safeguards, Tools,
};
use ven_lab::netns::{self, Netns};
use ven_proto::{Direction, IpNet, IpSet, Peers, Policy, PolicyState, PortRange, Protocol, Rule};

/// Runs of each tamper check (all in one namespace: a check changes nothing).
const VERIFY_RUNS: usize = 10;
/// Most runs `VEN_BENCH_RUNS` may ask for.
const MAX_RUNS: usize = 50;
/// Applies toggling one member while the observer polls (no-empty-window check).
const WINDOW_TOGGLES: usize = 6;
/// Most `ipset list -t` polls of the observer (it also stops when the applies are done).
const MAX_POLLS: usize = 20_000;
/// Pause before each timed operation (the previous one's work, e.g. hash resizes, has settled).
const SETTLE: Duration = Duration::from_millis(300);
/// Pause after deleting a measurement's namespaces, before the next measurement.
const TEARDOWN_SETTLE: Duration = Duration::from_secs(2);
/// The management endpoint of the safeguards (never contacted).
const PCE: &str = "198.18.0.1:8443";
/// Namespace name prefix (the lab appends pid and a counter).
const NETNS_PREFIX: &str = "ven-bench";

type BenchResult<T> = Result<T, String>;

#[derive(Clone, Copy, Debug)]
struct Scale {
    name: &'static str,
    /// Policy rules of the cold-apply policy.
    rules: usize,
    sets: u32,
    members_per_set: usize,
    /// Members of set 1 in the one-member-change measurement.
    big_set: usize,
    runs: usize,
}

impl Scale {
    const FULL: Scale =
        Scale { name: "full", rules: 10_000, sets: 10, members_per_set: 10_000, big_set: 100_000, runs: 3 };
    const SMALL: Scale =
        Scale { name: "small", rules: 1_000, sets: 10, members_per_set: 1_000, big_set: 10_000, runs: 5 };

    /// `VEN_BENCH_SCALE=small|full` or an argument `small`/`full` (cargo passes `--bench` too,
    /// which is ignored); `VEN_BENCH_RUNS` overrides the runs.
    fn from_env() -> BenchResult<Scale> {
        let mut choice = std::env::var("VEN_BENCH_SCALE").unwrap_or_default();
        for arg in std::env::args().skip(1) {
            let arg = arg.trim_start_matches('-');
            let arg = arg.strip_prefix("scale=").unwrap_or(arg);
            if arg == "small" || arg == "full" {
                choice = arg.to_string();
            }
        }
        let mut scale = match choice.as_str() {
            "" | "full" => Scale::FULL,
            "small" => Scale::SMALL,
            other => return Err(format!("VEN_BENCH_SCALE={other:?}: expected small or full")),
        };
        if let Ok(runs) = std::env::var("VEN_BENCH_RUNS") {
            scale.runs = runs
                .parse()
                .ok()
                .filter(|runs| (1..=MAX_RUNS).contains(runs))
                .ok_or_else(|| format!("VEN_BENCH_RUNS={runs:?}: expected 1..={MAX_RUNS}"))?;
        }
        Ok(scale)
    }

    fn members(&self) -> usize {
        self.sets as usize * self.members_per_set
    }

    fn options(&self) -> Options {
        let defaults = Caps::default();
        Options {
            ipv6: false,
            caps: Caps {
                max_rules: defaults.max_rules.max(self.rules),
                max_sets: defaults.max_sets.max(self.sets as usize),
                max_set_members: defaults.max_set_members.max(self.big_set + 1),
                ..defaults
            },
            ..Options::default()
        }
    }
}

fn main() -> ExitCode {
    let scale = match Scale::from_env() {
        Ok(scale) => scale,
        Err(why) => {
            eprintln!("firewall bench: {why}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(why) = prerequisites() {
        if std::env::var_os("CI").is_some() {
            eprintln!("firewall bench cannot run under CI: {why}");
            return ExitCode::FAILURE;
        }
        eprintln!("SKIPPED: the firewall bench needs root, network namespaces, iptables and ipset: {why}");
        return ExitCode::SUCCESS;
    }
    match run(scale) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("firewall bench failed: {why}");
            ExitCode::FAILURE
        }
    }
}

fn prerequisites() -> BenchResult<()> {
    netns::available()?;
    for tool in ["iptables-restore", "iptables-save", "ipset"] {
        netns::run(tool, &["--version"]).map_err(|e| format!("{tool}: {e}"))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Policies

/// Member `i` of set `set`: 10.0.0.0/8, one /12 per set, so members never repeat across sets.
fn member(set: u32, i: usize) -> IpNet {
    assert!(set < 16 && i < 1 << 20, "member {i} of set {set} is outside its /12");
    IpNet::host(IpAddr::V4(Ipv4Addr::from((10u32 << 24) | (set << 20) | i as u32)))
}

fn ip_set(id: u32, members: usize) -> IpSet {
    IpSet { id, members: (0..members).map(|i| member(id, i)).collect() }
}

/// Rule `i`: inbound and outbound alternate; tcp, udp and tcp port ranges; peers from the sets
/// (one rule in eight: any peer). Every rule has its own port, so no two render alike.
fn rule(i: usize, sets: u32) -> Rule {
    let port = 1024 + i as u16;
    let (protocol, ports) = match i % 4 {
        0 | 1 => (Protocol::Tcp, PortRange { first: port, last: port }),
        2 => (Protocol::Udp, PortRange { first: port, last: port }),
        _ => (Protocol::Tcp, PortRange { first: port, last: port.saturating_add(9) }),
    };
    Rule {
        id: i as u32 + 1,
        direction: if i % 2 == 0 { Direction::Inbound } else { Direction::Outbound },
        peers: if i % 8 == 7 { Peers::Any } else { Peers::Set(1 + (i as u32 % sets)) },
        protocol,
        ports: Some(ports),
    }
}

/// The cold-apply policy: `rules` rules over `sets` sets of `members_per_set` members.
fn cold_policy(scale: &Scale) -> Policy {
    Policy {
        version: 1,
        state: PolicyState::Enforced,
        ip_sets: (1..=scale.sets).map(|id| ip_set(id, scale.members_per_set)).collect(),
        rules: (0..scale.rules).map(|i| rule(i, scale.sets)).collect(),
        custom_rules: Vec::new(),
    }
}

/// `base` with set 1 holding `members` members.
fn with_set_one(base: &Policy, members: usize) -> Policy {
    let mut policy = base.clone();
    policy.version += 1;
    policy.ip_sets[0] = ip_set(1, members);
    policy
}

/// A policy of one set (`members` members) and two rules that use it.
fn one_set_policy(members: usize) -> Policy {
    Policy {
        version: 1,
        state: PolicyState::Enforced,
        ip_sets: vec![ip_set(1, members)],
        rules: (0..2).map(|i| rule(i, 1)).collect(),
        custom_rules: Vec::new(),
    }
}

fn safeguards() -> Safeguards {
    Safeguards { management: vec![PCE.parse().expect("PCE address constant")] }
}

// ---------------------------------------------------------------------------------------------
// Measurement helpers

#[derive(Clone, Copy, Debug)]
struct Stats {
    median: Duration,
    min: Duration,
}

impl Stats {
    fn of(mut samples: Vec<Duration>) -> Stats {
        assert!(!samples.is_empty(), "no samples");
        samples.sort();
        let mid = samples.len() / 2;
        let median =
            if samples.len() % 2 == 1 { samples[mid] } else { (samples[mid - 1] + samples[mid]) / 2 };
        Stats { median, min: samples[0] }
    }
}

/// The namespaces of one measurement, each fresh for one run and all deleted when it ends:
/// deleting a namespace frees its rules and sets asynchronously in the kernel, which would
/// otherwise land in the next timed operation.
#[derive(Default)]
struct Namespaces {
    kept: Vec<Netns>,
}

impl Namespaces {
    /// Runs `work` inside a fresh namespace (kept until [`Namespaces::finish`] or drop).
    fn run<T: Send + 'static>(
        &mut self,
        work: impl FnOnce() -> BenchResult<T> + Send + 'static,
    ) -> BenchResult<T> {
        let netns = Netns::new(NETNS_PREFIX).map_err(|e| e.to_string())?;
        let result = netns.run(work);
        self.kept.push(netns);
        result.map_err(|e| e.to_string())?
    }

    /// Deletes the namespaces and gives the kernel time to free them.
    fn finish(mut self) {
        self.kept.clear();
        std::thread::sleep(TEARDOWN_SETTLE);
    }
}

/// Runs a tool the way ven's kernel seam does (C locale, stdin fed from a second thread, stdout
/// and stderr drained); fails on a non-zero exit. Returns stdout.
fn tool(program: &str, args: &[&str], stdin: Option<&str>) -> BenchResult<String> {
    let describe = || format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", describe()))?;
    let pipe = child.stdin.take();
    let output = std::thread::scope(|scope| {
        if let (Some(mut pipe), Some(text)) = (pipe, stdin) {
            scope.spawn(move || {
                let _ = pipe.write_all(text.as_bytes());
            });
        }
        child.wait_with_output()
    })
    .map_err(|e| format!("{}: {e}", describe()))?;
    if !output.status.success() {
        return Err(format!(
            "`{}` failed ({}): {}",
            describe(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn timed<T>(work: impl FnOnce() -> BenchResult<T>) -> BenchResult<(Duration, T)> {
    let start = Instant::now();
    let value = work()?;
    Ok((start.elapsed(), value))
}

fn apply(firewall: &Firewall, policy: &Policy) -> BenchResult<ApplySummary> {
    firewall.apply(policy, &safeguards()).map_err(|e| format!("apply: {e}"))
}

/// The `Number of entries` of `ipset list -t <set>`; `None` when the set is not there.
fn entries(set: &str) -> Option<usize> {
    let text = tool("ipset", &["list", "-t", set], None).ok()?;
    text.lines().find_map(|line| line.strip_prefix("Number of entries:")?.trim().parse().ok())
}

// ---------------------------------------------------------------------------------------------
// The input ven writes, captured through wrappers around the tools

/// A temp directory holding tool wrappers that copy their restore input to a file.
struct Capture {
    dir: PathBuf,
}

impl Capture {
    fn new() -> BenchResult<Capture> {
        let dir = std::env::temp_dir().join(format!("ven-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let capture = Capture { dir };
        // Only restore sessions are copied; saves and listings go straight to the tool.
        capture.wrapper(
            "ipset",
            concat!(
                "case \" $* \" in\n",
                "  *\" restore \"*) tee -a \"$DIR/ipset.in\" | ipset \"$@\" ;;\n",
                "  *) exec ipset \"$@\" ;;\n",
                "esac",
            ),
        )?;
        capture.wrapper("iptables-restore", "tee -a \"$DIR/iptables.in\" | iptables-restore \"$@\"")?;
        Ok(capture)
    }

    fn wrapper(&self, name: &str, body: &str) -> BenchResult<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.dir.join(name);
        let script = format!("#!/bin/sh\nDIR='{}'\n{body}\n", self.dir.display());
        std::fs::write(&path, script).map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    fn tools(&self) -> Tools {
        Tools {
            backend: Backend::Plain,
            iptables_restore: self.dir.join("iptables-restore"),
            ipset: self.dir.join("ipset"),
            ..Tools::plain()
        }
    }

    fn read(&self, name: &str) -> BenchResult<String> {
        let path = self.dir.join(name);
        std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What one capture run learned about the cold-apply policy.
struct Captured {
    summary: ApplySummary,
    iptables_input: String,
    ipset_input: String,
    /// Rule lines (`-A VEN-...`) that `iptables-save -t filter` shows afterwards.
    saved_rules: usize,
    /// Members of our sets that `ipset save` shows afterwards.
    saved_members: usize,
}

/// Applies `policy` once through the wrappers in a fresh namespace (also a warm-up) and reads
/// back what the kernel holds.
fn capture(options: &Options, policy: &Arc<Policy>) -> BenchResult<Captured> {
    let capture = Capture::new()?;
    let config = FirewallConfig { tools: capture.tools(), options: options.clone() };
    let policy = Arc::clone(policy);
    let mut spaces = Namespaces::default();
    let (summary, saved_filter, saved_sets) = spaces.run(move || {
        let firewall = Firewall::new(config);
        let summary = apply(&firewall, &policy)?;
        let filter = tool("iptables-save", &["-t", "filter"], None)?;
        let sets = tool("ipset", &["save"], None)?;
        Ok((summary, filter, sets))
    })?;
    spaces.finish();
    Ok(Captured {
        summary,
        iptables_input: capture.read("iptables.in")?,
        ipset_input: capture.read("ipset.in")?,
        saved_rules: saved_filter.lines().filter(|line| line.starts_with("-A VEN-")).count(),
        saved_members: saved_sets.lines().filter(|line| line.starts_with("add ven-")).count(),
    })
}

// ---------------------------------------------------------------------------------------------
// The measurements

/// One printed row.
struct Row {
    label: String,
    ven: Option<Stats>,
    reference: Option<Stats>,
    target: &'static str,
}

/// Figure 1, cold apply: ven vs the raw tools fed the very same input, alternating which goes first.
fn cold_apply(
    scale: &Scale,
    options: &Options,
    policy: &Arc<Policy>,
    captured: &Captured,
) -> BenchResult<Row> {
    let ipset_input = Arc::new(captured.ipset_input.clone());
    let iptables_input = Arc::new(captured.iptables_input.clone());
    let (mut ven, mut raw) = (Vec::new(), Vec::new());
    let mut spaces = Namespaces::default();
    for run in 0..scale.runs {
        for ven_turn in if run % 2 == 0 { [true, false] } else { [false, true] } {
            if ven_turn {
                let config = FirewallConfig { tools: Tools::plain(), options: options.clone() };
                let policy = Arc::clone(policy);
                ven.push(spaces.run(move || {
                    let firewall = Firewall::new(config);
                    std::thread::sleep(SETTLE);
                    Ok(timed(|| apply(&firewall, &policy))?.0)
                })?);
            } else {
                let (sets, rules) = (Arc::clone(&ipset_input), Arc::clone(&iptables_input));
                raw.push(spaces.run(move || {
                    std::thread::sleep(SETTLE);
                    Ok(timed(|| {
                        tool("ipset", &["-exist", "restore"], Some(&sets))?;
                        tool("iptables-restore", &["--noflush", "--wait=30"], Some(&rules))
                    })?
                    .0)
                })?);
            }
        }
    }
    spaces.finish();
    Ok(Row {
        label: format!("1  cold apply ({} rules, {} members)", scale.rules, scale.members()),
        ven: Some(Stats::of(ven)),
        reference: Some(Stats::of(raw)),
        target: "<= 1.2x",
    })
}

/// What the no-empty-window observer saw.
struct Window {
    set_size: usize,
    applies: usize,
    polls: usize,
    min_seen: Option<usize>,
    missing: usize,
}

impl Window {
    fn ok(&self) -> bool {
        self.missing == 0 && self.min_seen.is_some_and(|min| min >= self.set_size)
    }
}

/// Figure 2: one member added to set 1 (`big` members) of `base`: the timed second apply in fresh
/// namespaces, the raw `ipset restore` of the one line, and an observed run for the window.
fn one_member(scale: &Scale, options: &Options, base: Policy, label: String) -> BenchResult<(Row, Window)> {
    let big = scale.big_set;
    let before = Arc::new(with_set_one(&base, big));
    let after = Arc::new(with_set_one(&base, big + 1));
    let added = member(1, big);
    let (mut ven, mut raw) = (Vec::new(), Vec::new());
    let mut spaces = Namespaces::default();
    for _ in 0..scale.runs {
        let config = FirewallConfig { tools: Tools::plain(), options: options.clone() };
        let (before, after) = (Arc::clone(&before), Arc::clone(&after));
        let (ven_time, raw_time) = spaces.run(move || {
            let firewall = Firewall::new(config);
            apply(&firewall, &before)?;
            std::thread::sleep(SETTLE);
            let (ven_time, summary) = timed(|| apply(&firewall, &after))?;
            if summary.set_members_added != 1 || summary.set_members_removed != 0 {
                return Err(format!("one-member apply changed more than one member: {summary:?}"));
            }
            // The raw tool doing the same change: the member goes out again, then back in.
            tool("ipset", &["del", "ven-1", &added.addr().to_string()], None)?;
            std::thread::sleep(SETTLE);
            let line = format!("add ven-1 {}\n", added.addr());
            let (raw_time, _) = timed(|| tool("ipset", &["-exist", "restore"], Some(&line)))?;
            Ok((ven_time, raw_time))
        })?;
        ven.push(ven_time);
        raw.push(raw_time);
    }

    // The window: an observer thread in the namespace polls the set's size while the member is
    // added and removed again, WINDOW_TOGGLES times.
    let config = FirewallConfig { tools: Tools::plain(), options: options.clone() };
    let window = spaces.run(move || {
        let firewall = Firewall::new(config);
        apply(&firewall, &before)?;
        let stop = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicBool::new(false));
        let observer = {
            let (stop, started) = (Arc::clone(&stop), Arc::clone(&started));
            // Threads made here share this thread's network namespace.
            std::thread::Builder::new()
                .name("ven-bench-observer".into())
                .spawn(move || {
                    let (mut polls, mut min_seen, mut missing) = (0, None::<usize>, 0);
                    while polls < MAX_POLLS && !stop.load(Ordering::Acquire) {
                        match entries("ven-1") {
                            Some(size) => min_seen = Some(min_seen.map_or(size, |min| min.min(size))),
                            None => missing += 1,
                        }
                        polls += 1;
                        started.store(true, Ordering::Release);
                    }
                    (polls, min_seen, missing)
                })
                .map_err(|e| format!("observer thread: {e}"))?
        };
        for _ in 0..1000 {
            if started.load(Ordering::Acquire) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut result = Ok(());
        for toggle in 0..WINDOW_TOGGLES {
            let policy = if toggle % 2 == 0 { &after } else { &before };
            if let Err(e) = apply(&firewall, policy) {
                result = Err(e);
                break;
            }
        }
        stop.store(true, Ordering::Release);
        let (polls, min_seen, missing) = observer.join().map_err(|_| "observer thread panicked")?;
        result?;
        Ok(Window { set_size: big, applies: WINDOW_TOGGLES, polls, min_seen, missing })
    })?;
    spaces.finish();
    let row = Row { label, ven: Some(Stats::of(ven)), reference: Some(Stats::of(raw)), target: "<= 50 ms" };
    Ok((row, window))
}

/// Figure 3: tamper checks with the cold-apply policy in place, and the subprocesses they read.
fn tamper_checks(options: &Options, policy: &Arc<Policy>) -> BenchResult<(Vec<Row>, usize)> {
    let config = FirewallConfig { tools: Tools::plain(), options: options.clone() };
    let policy = Arc::clone(policy);
    let mut spaces = Namespaces::default();
    let result = spaces.run(move || {
        let firewall = Firewall::new(config);
        apply(&firewall, &policy)?;
        std::thread::sleep(SETTLE);
        let mut drift = 0;
        let mut check = |depth: CheckDepth| -> BenchResult<Stats> {
            let mut samples = Vec::with_capacity(VERIFY_RUNS);
            for _ in 0..VERIFY_RUNS {
                let (time, found) =
                    timed(|| firewall.verify(depth).map_err(|e| format!("verify {depth:?}: {e}")))?;
                drift += found.len();
                samples.push(time);
            }
            Ok(Stats::of(samples))
        };
        let quick = check(CheckDepth::Quick)?;
        let full = check(CheckDepth::Full)?;
        let reads = |programs: &[(&str, &[&str])]| -> BenchResult<Stats> {
            let mut samples = Vec::with_capacity(VERIFY_RUNS);
            for _ in 0..VERIFY_RUNS {
                let (time, _) = timed(|| {
                    for (program, args) in programs {
                        tool(program, args, None)?;
                    }
                    Ok(())
                })?;
                samples.push(time);
            }
            Ok(Stats::of(samples))
        };
        const SAVE: (&str, &[&str]) = ("iptables-save", &["-t", "filter"]);
        const LIST: (&str, &[&str]) = ("ipset", &["list", "-t"]);
        const IPSET_SAVE: (&str, &[&str]) = ("ipset", &["save"]);
        let row = |label: &str, ven, reference| Row { label: label.into(), ven, reference, target: "" };
        let rows = vec![
            row("3a verify quick", Some(quick), Some(reads(&[SAVE, LIST])?)),
            row("3b verify full", Some(full), Some(reads(&[SAVE, IPSET_SAVE])?)),
            row("   iptables-save -t filter alone", None, Some(reads(&[SAVE])?)),
            row("   ipset save alone", None, Some(reads(&[IPSET_SAVE])?)),
            row("   ipset list -t alone", None, Some(reads(&[LIST])?)),
        ];
        Ok((rows, drift))
    });
    spaces.finish();
    result
}

/// Figure 4: tampering found and repaired: `iptables -F VEN-INPUT` by someone else, then
/// `Firewall::check_and_repair` (the agent's quick check, which finds it and repairs it reusing
/// the tables it read): the detect-to-repaired time, less the wait for the next check.
fn tamper_repair(options: &Options, policy: Policy, runs: usize, label: String) -> BenchResult<Row> {
    let config = FirewallConfig { tools: Tools::plain(), options: options.clone() };
    let mut spaces = Namespaces::default();
    let result = spaces.run(move || {
        let firewall = Firewall::new(config);
        apply(&firewall, &policy)?;
        let mut samples = Vec::with_capacity(runs);
        for _ in 0..runs {
            tool("iptables", &["-w", "-F", "VEN-INPUT"], None)?;
            let (time, repair) =
                timed(|| firewall.check_and_repair(CheckDepth::Quick).map_err(|e| format!("check: {e}")))?;
            match repair {
                None => return Err("the flushed chain was not found".into()),
                Some(repair) => repair.result.map_err(|e| format!("repair: {e}")).map(drop)?,
            }
            let left = firewall.verify(CheckDepth::Full).map_err(|e| format!("verify: {e}"))?;
            if !left.is_empty() {
                return Err(format!("the repair left differences: {left:?}"));
            }
            samples.push(time);
        }
        Ok(Row { label, ven: Some(Stats::of(samples)), reference: None, target: "<= 1 s" })
    });
    spaces.finish();
    result
}

// ---------------------------------------------------------------------------------------------
// Output

fn ms(duration: Duration) -> String {
    let ms = duration.as_secs_f64() * 1e3;
    if ms < 10.0 { format!("{ms:.2}") } else { format!("{ms:.1}") }
}

fn table(rows: &[Row]) -> String {
    let cell = |stats: Option<Stats>, pick: fn(&Stats) -> Duration| {
        stats.as_ref().map_or_else(|| "-".to_string(), |stats| ms(pick(stats)))
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<44} {:>9} {:>9} {:>9} {:>9} {:>8}  target",
        "figure (ms)", "ven med", "ven min", "ref med", "ref min", "ven/ref"
    );
    let _ = writeln!(out, "{}", "-".repeat(44 + 4 * 10 + 9 + 10));
    for row in rows {
        let ratio = match (row.ven, row.reference) {
            (Some(ven), Some(reference)) if !reference.median.is_zero() => {
                format!("{:.2}x", ven.median.as_secs_f64() / reference.median.as_secs_f64())
            }
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<44} {:>9} {:>9} {:>9} {:>9} {:>8}  {}",
            row.label,
            cell(row.ven, |s| s.median),
            cell(row.ven, |s| s.min),
            cell(row.reference, |s| s.median),
            cell(row.reference, |s| s.min),
            ratio,
            row.target
        );
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

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or("").trim().to_string()
}

fn run(scale: Scale) -> BenchResult<()> {
    let options = scale.options();
    let policy = Arc::new(cold_policy(&scale));
    let backend = first_line(&tool("iptables", &["-V"], None)?);
    let ipset_version = first_line(&tool("ipset", &["version"], None)?);

    println!("ven firewall benchmark (issue 3), scale {}", scale.name);
    println!(
        "  {} runs per figure (3a/3b: {VERIFY_RUNS}), each ven/ref pair in fresh network namespaces;",
        scale.runs
    );
    println!("  wall-clock ms of one operation: median and min; ven/ref = ven median / ref median.");
    println!(
        "  Policy: enforced, IPv4; rules alternate inbound/outbound over tcp, udp and tcp ranges, 7 in 8"
    );
    println!(
        "  with peers from {} sets of {} members; each policy rule becomes an NFLOG and an ACCEPT rule.",
        scale.sets, scale.members_per_set
    );
    println!(
        "  1  ven: Firewall::apply to an empty namespace. ref: `ipset -exist restore` + `iptables-restore"
    );
    println!("     --noflush --wait=30` of the exact input ven wrote (captured by tee wrappers around the");
    println!("     tools in a warm-up apply), in another empty namespace.");
    println!(
        "  2  ven: the second Firewall::apply when set 1 ({} members) gains one; 2a: with two rules,",
        scale.big_set
    );
    println!("     2b: inside the cold-apply policy. ref: `ipset -exist restore` of that one `add` line.");
    println!(
        "  3  ven: Firewall::verify with the cold-apply policy in place. ref: the subprocesses the check"
    );
    println!(
        "     reads, run back to back (quick: iptables-save -t filter + ipset list -t; full: + ipset save)."
    );
    println!("     On nf_tables an unchanged generation id lets the quick check skip iptables-save.");
    println!("  4  ven: after `iptables -F VEN-INPUT`, the quick check that finds it plus the repair.");
    println!();

    let load_before = load();
    let captured = capture(&options, &policy)?;
    println!("backend:   {backend} via Tools::plain(); {ipset_version}");
    println!(
        "ruleset:   {} policy rules -> {} rules in our chains; {} sets, {} members",
        scale.rules, captured.summary.rules, captured.summary.sets, captured.summary.set_members_added
    );
    println!(
        "input:     iptables-restore {} lines, {} bytes; ipset restore {} lines, {} bytes",
        captured.iptables_input.lines().count(),
        captured.iptables_input.len(),
        captured.ipset_input.lines().count(),
        captured.ipset_input.len()
    );
    println!(
        "read-back: iptables-save shows {} rule lines in VEN-* chains, ipset save {} members",
        captured.saved_rules, captured.saved_members
    );
    println!();

    let mut rows = vec![cold_apply(&scale, &options, &policy, &captured)?];
    let (row, window_small) = one_member(
        &scale,
        &options,
        one_set_policy(0),
        format!("2a +1 member, {}-member set", scale.big_set),
    )?;
    rows.push(row);
    let (row, window_big) = one_member(
        &scale,
        &options,
        cold_policy(&scale),
        format!("2b +1 member, {}-member set, {} rules", scale.big_set, scale.rules),
    )?;
    rows.push(row);
    let (check_rows, drift) = tamper_checks(&options, &policy)?;
    rows.extend(check_rows);
    rows.push(tamper_repair(
        &options,
        one_set_policy(scale.members_per_set),
        scale.runs,
        "4a flushed chain found + repaired, 2 rules".to_string(),
    )?);
    rows.push(tamper_repair(
        &options,
        cold_policy(&scale),
        scale.runs,
        format!("4b flushed chain found + repaired, {} rules", scale.rules),
    )?);
    print!("{}", table(&rows));
    println!();

    let windows = [("2a", &window_small), ("2b", &window_big)];
    for (name, window) in windows {
        println!(
            "window {name}: {} applies toggling one member of ven-1 ({}/{}), {} polls of `ipset list -t`:",
            window.applies,
            window.set_size,
            window.set_size + 1,
            window.polls
        );
        println!(
            "           min entries seen {}, set missing {} times -> {}",
            window.min_seen.map_or_else(|| "none".to_string(), |min| min.to_string()),
            window.missing,
            if window.ok() { "no empty window" } else { "GAP SEEN" }
        );
    }
    println!("verify:    {drift} differences reported over all checks (0 expected)");
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("machine:   {cpus} CPUs; 1-minute load average {load_before} at start, {} at end", load());
    // Correctness, not timing: a set must never be seen smaller than it should be.
    for (name, window) in windows {
        assert!(window.ok(), "window {name}: a set was seen with fewer members than it holds");
    }
    assert_eq!(drift, 0, "verify found differences in an untouched namespace");
    Ok(())
}
