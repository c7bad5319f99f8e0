//! The lab: three hosts on one segment, the real `pce` and two real `ven` agents, driven only
//! through their command lines (the shared contract), and the README's demo scenario on top.
//!
//! ```text
//!            segment (bridge br0, in a namespace of its own)
//!       ┌──────────────────┼──────────────────┐
//!  pce 198.18.0.1     web 198.18.0.2     db 198.18.0.3
//!  `pce serve`        `ven agent`        `ven agent`
//! ```
//!
//! Guarantees: every process and namespace the lab makes is registered in one place ([`Teardown`])
//! at the moment it is made, and released once, in order (agents, then the PCE, then sockets, then
//! namespaces, then the work dir), whether the lab is dropped, a test panics, or a signal thread
//! calls [`Teardown::run`]. The host's own firewall is never touched: only the agents program
//! iptables, and they run inside their namespaces. Every wait is bounded.

use std::fmt;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::binaries::Binaries;
use crate::firewall::FirewallDump;
use crate::netns::{Netns, NetnsError, Segment};
use crate::probe::{self, Expect, Verdict};
use crate::process::{self, Captured, DEFAULT_GRACE, Daemon, ProcessError};
use crate::status::{
    self, HistoryItem, OrgEvent, ParseError, PceStartup, SupportReport, VenStatus, Workload,
};
use crate::workdir::Workdir;

/// The PCE's admin and VEN API port (the contract's default).
pub const API_PORT: u16 = 8443;
/// Prefix length of the lab segment (198.18.0.0/24, inside the benchmarking range 198.18.0.0/15).
pub const SEGMENT_PREFIX_LEN: u8 = 24;
/// The agents' configuration file in the work dir ([`LabOptions::ven_config`]).
pub const VEN_CONFIG_FILE: &str = "ven.conf";
/// Lines of each log quoted in diagnostics.
const LOG_TAIL_LINES: usize = 30;
/// Limit for each command run to gather diagnostics.
const DIAGNOSTIC_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the lab polls the binaries while it waits for a state.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// A host of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Host {
    Pce,
    Web,
    Db,
    /// A third agent host, made only with [`LabOptions::copy_host`]: where a copy of another
    /// host's data directory runs (the clone tests, issue 16). In neither `ALL` nor `AGENTS`.
    Copy,
}

impl Host {
    pub const ALL: [Host; 3] = [Host::Pce, Host::Web, Host::Db];
    /// The hosts that run an agent.
    pub const AGENTS: [Host; 2] = [Host::Web, Host::Db];

    /// Also the workload's hostname on the PCE and the `role` label value.
    pub fn name(self) -> &'static str {
        match self {
            Host::Pce => "pce",
            Host::Web => "web",
            Host::Db => "db",
            Host::Copy => "copy",
        }
    }

    pub fn address(self) -> Ipv4Addr {
        match self {
            Host::Pce => Ipv4Addr::new(198, 18, 0, 1),
            Host::Web => Ipv4Addr::new(198, 18, 0, 2),
            Host::Db => Ipv4Addr::new(198, 18, 0, 3),
            Host::Copy => Ipv4Addr::new(198, 18, 0, 4),
        }
    }

    pub fn cidr(self) -> String {
        format!("{}/{SEGMENT_PREFIX_LEN}", self.address())
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `HOST:PORT` of the PCE as the agents and the admin CLI reach it.
pub fn management_server() -> String {
    format!("{}:{API_PORT}", Host::Pce.address())
}

/// Knobs of a lab; [`LabOptions::default`] is what the demo and the end-to-end test use.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Namespace names start with this (at most 15 characters are kept).
    pub name_prefix: String,
    /// Leave the work dir (data dirs, logs) behind for debugging.
    pub keep_workdir: bool,
    /// Passed to `pce serve --heartbeat-interval` when set. Unset by default: the PCE's 5-minute
    /// interval, so the lab converges only if policy pushes (lightning bolts) work.
    pub heartbeat_interval: Option<u32>,
    /// Limit for each one-shot command (`pce workload ...`, `ven status`, `ven activate`).
    pub command_timeout: Duration,
    /// Limit for `pce serve` to print its `listening:` line.
    pub pce_start_timeout: Duration,
    /// Limit for both agents to carry the policy the PCE computed for them.
    pub policy_timeout: Duration,
    /// The configuration file of every `ven` command and agent (`key = value` lines), written
    /// to `<workdir>/ven.conf` and named by `VEN_CONFIG`. Unset: the file is empty (ven's
    /// defaults), so that the host's /etc/ven/ven.conf never leaks into the lab.
    pub ven_config: Option<String>,
    /// Extra environment for every `ven` command and agent (e.g. `RUST_LOG`).
    pub ven_env: Vec<(String, String)>,
    /// `pce serve --listen`: the PCE's lab address unless set (`0.0.0.0` for every address of
    /// its namespace, e.g. one a test adds).
    pub pce_listen: Option<String>,
    /// More `pce serve` arguments (e.g. `--san NAME`).
    pub pce_args: Vec<String>,
    /// Also make [`Host::Copy`] (198.18.0.4), torn down with the rest.
    pub copy_host: bool,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            name_prefix: "venlab".into(),
            keep_workdir: false,
            heartbeat_interval: None,
            command_timeout: Duration::from_secs(30),
            pce_start_timeout: Duration::from_secs(30),
            policy_timeout: Duration::from_secs(20),
            ven_config: None,
            ven_env: Vec::new(),
            pce_listen: None,
            pce_args: Vec::new(),
            copy_host: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error("work dir {0}: {1}")]
    Workdir(PathBuf, std::io::Error),
    #[error("listening on {addr} inside {host}: {cause}")]
    Listen { host: Host, addr: SocketAddr, cause: std::io::Error },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed { command: String, status: String, stderr: String },
    #[error("{what} exited early ({status}); last lines of {log}:\n{tail}")]
    Exited { what: String, status: String, log: PathBuf, tail: String },
    #[error("{what} not reached within {waited:?}; last seen: {last}")]
    Timeout { what: String, waited: Duration, last: String },
    #[error("unexpected output from `{command}`: {detail}")]
    Output { command: String, detail: String },
    #[error("{0} is not running in this lab")]
    NotStarted(&'static str),
    #[error("the lab was interrupted")]
    Cancelled,
    #[error("the lab has been torn down")]
    TornDown,
}

/// Everything the lab made, in the order it must be released (fields drop top to bottom).
#[derive(Default)]
struct Resources {
    closed: bool,
    /// Released from the back: agents (started last) before the PCE.
    daemons: Vec<Daemon>,
    listeners: Vec<(Host, u16, TcpListener)>,
    hosts: Vec<(Host, Netns)>,
    segment: Option<Segment>,
    workdir: Option<Workdir>,
}

impl Resources {
    /// Releases everything; true when this call did the work.
    fn release(&mut self) -> bool {
        if self.closed {
            return false;
        }
        self.closed = true;
        while let Some(mut daemon) = self.daemons.pop() {
            daemon.stop(DEFAULT_GRACE);
        }
        self.listeners.clear();
        while let Some(host) = self.hosts.pop() {
            drop(host);
        }
        self.segment = None;
        self.workdir = None;
        true
    }
}

impl Drop for Resources {
    fn drop(&mut self) {
        self.release();
    }
}

/// The registry of the lab's processes, namespaces and files, and the switch that releases them.
/// Cheap to clone; hand a clone to a signal-handling thread.
#[derive(Clone, Default)]
pub struct Teardown {
    resources: Arc<Mutex<Resources>>,
    cancelled: Arc<AtomicBool>,
}

impl Teardown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stops the lab's waits, then releases everything it made. Runs once; true if this call did
    /// the work. Blocks while a lab operation holds the registry (each is bounded).
    pub fn run(&self) -> bool {
        self.cancelled.store(true, Ordering::SeqCst);
        self.lock().release()
    }

    /// Makes the lab's waits give up with [`LabError::Cancelled`] without releasing anything.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    fn lock(&self) -> MutexGuard<'_, Resources> {
        // A panic while holding the lock leaves nothing half-released that release() can't handle.
        self.resources.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The registry, if it is still open.
    fn open(&self) -> Result<MutexGuard<'_, Resources>, LabError> {
        let guard = self.lock();
        if guard.closed { Err(LabError::TornDown) } else { Ok(guard) }
    }
}

/// What the agents need to pair with the lab's PCE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pairing {
    pub activation_code: String,
    pub ca_fingerprint: String,
    /// The PCE's `listening:` line, without the prefix.
    pub listening: String,
}

/// A lab: the topology, and whatever has been started in it so far.
pub struct Lab {
    bins: Binaries,
    opts: LabOptions,
    teardown: Teardown,
    workdir: PathBuf,
    segment_name: String,
    ns_names: Vec<(Host, String)>,
    pairing: Option<Pairing>,
}

impl Lab {
    /// Builds the topology (segment, three namespaces, addresses) and a fresh work dir.
    pub fn new(bins: Binaries, opts: LabOptions) -> Result<Self, LabError> {
        Self::with_teardown(bins, opts, Teardown::new())
    }

    /// Like [`Lab::new`], registering everything in `teardown`, which a signal thread may hold.
    pub fn with_teardown(bins: Binaries, opts: LabOptions, teardown: Teardown) -> Result<Self, LabError> {
        let mut res = teardown.open()?;
        if teardown.is_cancelled() {
            return Err(LabError::Cancelled);
        }
        let parent = std::env::temp_dir();
        let mut workdir = Workdir::create(&parent, "ven-lab").map_err(|e| LabError::Workdir(parent, e))?;
        workdir.keep(opts.keep_workdir);
        let workdir_path = workdir.path().to_path_buf();
        res.workdir = Some(workdir);
        let config_path = workdir_path.join(VEN_CONFIG_FILE);
        std::fs::write(&config_path, opts.ven_config.as_deref().unwrap_or(""))
            .map_err(|e| LabError::Workdir(config_path, e))?;
        let segment = Segment::new(&format!("{}-sw", opts.name_prefix))?;
        let segment_name = segment.name().to_string();
        res.segment = Some(segment);
        let mut ns_names = Vec::new();
        let copy = opts.copy_host.then_some(Host::Copy);
        for host in Host::ALL.into_iter().chain(copy) {
            let ns = Netns::new(&format!("{}-{}", opts.name_prefix, host.name()))?;
            ns_names.push((host, ns.name().to_string()));
            res.hosts.push((host, ns));
            let (_, ns) = res.hosts.last().expect("just pushed");
            res.segment.as_ref().expect("made above").attach(ns, &host.cidr())?;
        }
        drop(res);
        Ok(Self { bins, opts, teardown, workdir: workdir_path, segment_name, ns_names, pairing: None })
    }

    /// A handle that releases this lab (e.g. from a signal thread).
    pub fn teardown_handle(&self) -> Teardown {
        self.teardown.clone()
    }

    /// Releases everything now (also done on drop).
    pub fn teardown(&self) -> bool {
        self.teardown.run()
    }

    pub fn binaries(&self) -> &Binaries {
        &self.bins
    }

    pub fn options(&self) -> &LabOptions {
        &self.opts
    }

    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// Keep (or not) the work dir when the lab is released.
    pub fn keep_workdir(&self, keep: bool) {
        if let Some(workdir) = self.teardown.lock().workdir.as_mut() {
            workdir.keep(keep);
        }
    }

    /// The name of the namespace holding the segment's bridge.
    pub fn segment_name(&self) -> &str {
        &self.segment_name
    }

    /// The name of `host`'s network namespace (for `ip netns exec`).
    pub fn ns_name(&self, host: Host) -> &str {
        self.ns_names.iter().find(|(h, _)| *h == host).map(|(_, n)| n.as_str()).unwrap_or("")
    }

    /// `<workdir>/pce` for the PCE, `<workdir>/web` and `<workdir>/db` (VEN_DATA_DIR) for the agents.
    pub fn data_dir(&self, host: Host) -> PathBuf {
        self.workdir.join(host.name())
    }

    /// Where the daemon on `host` writes its diagnostics (`pce.log`, `web-agent.log`, ...).
    pub fn log_path(&self, host: Host) -> PathBuf {
        match host {
            Host::Pce => self.workdir.join("pce.log"),
            agent => self.workdir.join(format!("{agent}-agent.log")),
        }
    }

    /// Where `pce serve` writes its stdout (pairing material, `listening:`).
    pub fn pce_stdout_path(&self) -> PathBuf {
        self.workdir.join("pce.out")
    }

    pub fn pairing(&self) -> Option<&Pairing> {
        self.pairing.as_ref()
    }

    fn check_cancel(&self) -> Result<(), LabError> {
        if self.teardown.is_cancelled() { Err(LabError::Cancelled) } else { Ok(()) }
    }

    /// Runs `work` with `host`'s namespace while holding the registry (keep it short).
    fn with_ns<T>(&self, host: Host, work: impl FnOnce(&Netns) -> T) -> Result<T, LabError> {
        let res = self.teardown.open()?;
        let (_, ns) = res.hosts.iter().find(|(h, _)| *h == host).ok_or(LabError::TornDown)?;
        Ok(work(ns))
    }

    /// `program` run inside `host`'s namespace (`ip netns exec`, which execs it: the child's pid
    /// is the program's).
    pub fn command_in(&self, host: Host, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", self.ns_name(host)]).arg(program);
        command
    }

    /// `ven ARGS` inside `host` with its VEN_DATA_DIR, the lab's VEN_CONFIG and
    /// [`LabOptions::ven_env`].
    pub fn ven_command(&self, host: Host, args: &[&str]) -> Command {
        let mut command = self.command_in(host, &self.bins.ven);
        command
            .args(args)
            .env("VEN_DATA_DIR", self.data_dir(host))
            .env("VEN_CONFIG", self.workdir.join(VEN_CONFIG_FILE));
        for (key, value) in &self.opts.ven_env {
            command.env(key, value);
        }
        command
    }

    /// `ven ARGS` inside `host`, SIGKILLed with every child it started unless it finished within
    /// `delay` (the crash tests).
    pub fn ven_killed_after(
        &self,
        host: Host,
        args: &[&str],
        delay: Duration,
    ) -> Result<process::KillOutcome, LabError> {
        self.check_cancel()?;
        Ok(process::run_killed_after(self.ven_command(host, args), delay)?)
    }

    /// `PROGRAM ARGS` inside `host`'s namespace, whatever its exit status (e.g. `iptables -F`
    /// to play the tamperer, `ipset save` to look).
    pub fn exec(&self, host: Host, program: &str, args: &[&str]) -> Result<Captured, LabError> {
        let mut command = self.command_in(host, program);
        command.args(args);
        self.run(command)
    }

    /// [`Lab::exec`] that must exit 0.
    pub fn exec_ok(&self, host: Host, program: &str, args: &[&str]) -> Result<Captured, LabError> {
        require_success(self.exec(host, program, args)?)
    }

    /// `sh -c SCRIPT` inside `host`'s namespace; it must exit 0.
    pub fn sh(&self, host: Host, script: &str) -> Result<Captured, LabError> {
        self.exec_ok(host, "sh", &["-c", script])
    }

    /// `pce --data-dir <workdir>/pce --server 198.18.0.1:8443 ARGS` inside the PCE's namespace.
    pub fn pce_command(&self, args: &[&str]) -> Command {
        let mut command = self.command_in(Host::Pce, &self.bins.pce);
        command.arg("--data-dir").arg(self.data_dir(Host::Pce)).arg("--server").arg(management_server());
        command.args(args);
        command
    }

    /// Runs a one-shot command within the lab's command timeout, whatever its exit status.
    pub fn run(&self, command: Command) -> Result<Captured, LabError> {
        self.check_cancel()?;
        Ok(process::run_bounded(command, self.opts.command_timeout)?)
    }

    /// Runs a one-shot command and requires exit status 0.
    pub fn run_ok(&self, command: Command) -> Result<Captured, LabError> {
        require_success(self.run(command)?)
    }

    /// The admin CLI: `pce ... ARGS`, which must succeed.
    pub fn pce(&self, args: &[&str]) -> Result<Captured, LabError> {
        self.run_ok(self.pce_command(args))
    }

    /// `ven ARGS` inside `host`, whatever its exit status.
    pub fn ven(&self, host: Host, args: &[&str]) -> Result<Captured, LabError> {
        self.run(self.ven_command(host, args))
    }

    fn spawn_daemon(&self, name: &str, command: Command, stdout: &Path, log: &Path) -> Result<(), LabError> {
        let mut res = self.teardown.open()?;
        let open = |path: &Path| File::create(path).map_err(|e| LabError::Workdir(path.to_path_buf(), e));
        let out = open(stdout)?;
        let err = if stdout == log {
            out.try_clone().map_err(|e| LabError::Workdir(log.to_path_buf(), e))?
        } else {
            open(log)?
        };
        let daemon = Daemon::spawn(name, command, Stdio::from(out), Stdio::from(err), log)?;
        res.daemons.push(daemon);
        Ok(())
    }

    /// Fails when a daemon the lab started has exited.
    pub fn check_daemons(&self) -> Result<(), LabError> {
        let mut res = self.teardown.open()?;
        for daemon in res.daemons.iter_mut() {
            if let Some(status) = daemon.exited() {
                return Err(LabError::Exited {
                    what: format!("`{}`", daemon.name()),
                    status: status.to_string(),
                    log: daemon.log().to_path_buf(),
                    tail: process::tail(daemon.log(), LOG_TAIL_LINES),
                });
            }
        }
        Ok(())
    }

    /// Starts `pce serve` in the PCE namespace and waits (bounded) for its `listening:` line; reads
    /// the activation code and CA fingerprint from its first-start output (or asks the admin CLI).
    pub fn start_pce(&mut self) -> Result<Pairing, LabError> {
        let data_dir = self.data_dir(Host::Pce);
        let mut command = self.command_in(Host::Pce, &self.bins.pce);
        command.arg("serve").arg("--data-dir").arg(&data_dir);
        let listen = self.opts.pce_listen.clone().unwrap_or_else(|| Host::Pce.address().to_string());
        command.args(["--listen", &listen]);
        command.args(&self.opts.pce_args);
        if let Some(secs) = self.opts.heartbeat_interval {
            command.args(["--heartbeat-interval", &secs.to_string()]);
        }
        let out_path = self.pce_stdout_path();
        self.spawn_daemon("pce serve", command, &out_path, &self.log_path(Host::Pce))?;

        let started = Instant::now();
        let startup = loop {
            self.check_cancel()?;
            let text = std::fs::read_to_string(&out_path).unwrap_or_default();
            let startup = PceStartup::parse(&text);
            if startup.listening.is_some() {
                break startup;
            }
            self.check_daemons()?;
            if started.elapsed() > self.opts.pce_start_timeout {
                return Err(LabError::Timeout {
                    what: "`pce serve` printing its `listening:` line".into(),
                    waited: self.opts.pce_start_timeout,
                    last: format!(
                        "stdout so far: {:?}; last lines of {}:\n{}",
                        text,
                        self.log_path(Host::Pce).display(),
                        process::tail(&self.log_path(Host::Pce), LOG_TAIL_LINES)
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let activation_code = match startup.activation_code {
            Some(code) if !code.is_empty() => code,
            _ => self.pce(&["activation-code"])?.stdout.trim().to_string(),
        };
        let ca_fingerprint = match startup.ca_fingerprint {
            Some(fp) if status::is_fingerprint(&fp) => fp,
            _ => self.pce(&["ca-fingerprint"])?.stdout.trim().to_string(),
        };
        if activation_code.is_empty() || !status::is_fingerprint(&ca_fingerprint) {
            return Err(LabError::Output {
                command: "pce serve / pce activation-code / pce ca-fingerprint".into(),
                detail: format!("activation code {activation_code:?}, CA fingerprint {ca_fingerprint:?}"),
            });
        }
        let pairing =
            Pairing { activation_code, ca_fingerprint, listening: startup.listening.unwrap_or_default() };
        self.pairing = Some(pairing.clone());
        Ok(pairing)
    }

    /// `ven activate` on `host` against the lab's PCE with the right pairing material.
    pub fn activate(&self, host: Host) -> Result<Captured, LabError> {
        let pairing = self.pairing.as_ref().ok_or(LabError::NotStarted("the PCE"))?;
        require_success(self.try_activate(
            host,
            &management_server(),
            &pairing.activation_code,
            &pairing.ca_fingerprint,
        )?)
    }

    /// `ven activate` on `host` with whatever arguments the caller chooses (for failure tests).
    pub fn try_activate(
        &self,
        host: Host,
        server: &str,
        activation_code: &str,
        ca_fingerprint: &str,
    ) -> Result<Captured, LabError> {
        self.ven(
            host,
            &[
                "activate",
                "--management-server",
                server,
                "--activation-code",
                activation_code,
                "--ca-fingerprint",
                ca_fingerprint,
                "--hostname",
                host.name(),
            ],
        )
    }

    /// Starts `ven agent` on `host` (stdout and stderr to [`Lab::log_path`]).
    pub fn start_agent(&self, host: Host) -> Result<(), LabError> {
        let mut command = self.ven_command(host, &["agent"]);
        // The agent's lines also go to its log/ files; the lab reads stderr for diagnostics.
        command.env("VEN_LOG_STDERR", "1");
        let log = self.log_path(host);
        self.spawn_daemon(&format!("ven agent on {host}"), command, &log, &log)
    }

    /// Stops the agent on `host` (SIGTERM: it says goodbye and leaves the firewall as it is;
    /// SIGKILL after the grace period) and forgets it, so that [`Lab::check_daemons`] does not
    /// count its exit as a failure. Fails when no agent of the lab runs there.
    pub fn stop_agent(&self, host: Host) -> Result<(), LabError> {
        self.take_daemon(&format!("ven agent on {host}"), "that agent")?.stop(DEFAULT_GRACE);
        Ok(())
    }

    /// SIGKILLs the agent on `host` (a crash: no goodbye, no last flush) and forgets it.
    pub fn kill_agent(&self, host: Host) -> Result<(), LabError> {
        self.take_daemon(&format!("ven agent on {host}"), "that agent")?.kill();
        Ok(())
    }

    /// Stops `pce serve` (SIGTERM, then SIGKILL after the grace period) and forgets it;
    /// [`Lab::start_pce`] starts it again on the same data directory.
    pub fn stop_pce(&self) -> Result<(), LabError> {
        self.take_daemon("pce serve", "the PCE")?.stop(DEFAULT_GRACE);
        Ok(())
    }

    /// Removes the daemon named `name` from the lab's care, so that its exit is no failure.
    fn take_daemon(&self, name: &str, what: &'static str) -> Result<Daemon, LabError> {
        let mut res = self.teardown.open()?;
        let at = res.daemons.iter().position(|d| d.name() == name).ok_or(LabError::NotStarted(what))?;
        Ok(res.daemons.remove(at))
    }

    /// Labels role=web and role=db, assigns them, adds the rule web -> db 5432/tcp and provisions.
    /// Returns the admin CLI's outputs, one line per step.
    pub fn configure_policy(&self) -> Result<Vec<String>, LabError> {
        let mut said = Vec::new();
        for host in Host::AGENTS {
            let out = self.pce(&["label", "create", "role", host.name()])?;
            said.push(format!("label role={host}: {}", out.stdout.trim()));
        }
        for host in Host::AGENTS {
            self.pce(&["workload", "set", host.name(), "--label", &format!("role={host}")])?;
            said.push(format!("workload {host}: label role={host}"));
        }
        self.pce(&[
            "rule",
            "add",
            "--consumers",
            "role=web",
            "--providers",
            "role=db",
            "--service",
            "5432/tcp",
        ])?;
        said.push("rule: consumers role=web -> providers role=db, service 5432/tcp".into());
        let out = self.pce(&["provision"])?;
        said.push(out.stdout.trim().to_string());
        Ok(said)
    }

    /// `pce workload set HOST --state STATE`.
    pub fn set_state(&self, host: Host, state: &str) -> Result<(), LabError> {
        self.pce(&["workload", "set", host.name(), "--state", state]).map(|_| ())
    }

    /// `pce workload list --json`.
    pub fn workloads(&self) -> Result<Vec<Workload>, LabError> {
        Ok(Workload::parse_list(&self.pce(&["workload", "list", "--json"])?.stdout)?)
    }

    /// `pce events --json`: the organisation events, oldest first.
    pub fn events(&self) -> Result<Vec<OrgEvent>, LabError> {
        Ok(OrgEvent::parse_list(&self.pce(&["events", "--json"])?.stdout)?)
    }

    /// `pce support-report list --json`: the support reports received, oldest first.
    pub fn support_reports(&self) -> Result<Vec<SupportReport>, LabError> {
        Ok(SupportReport::parse_list(&self.pce(&["support-report", "list", "--json"])?.stdout)?)
    }

    /// `ven history --json` on `host`: the recorded firewall changes, oldest first.
    pub fn history(&self, host: Host) -> Result<Vec<HistoryItem>, LabError> {
        let done = self.run_ok(self.ven_command(host, &["history", "--json"]))?;
        Ok(HistoryItem::parse_list(&done.stdout)?)
    }

    /// `iptables-save`, `ip6tables-save` and `ipset save` inside `host`; each must succeed.
    pub fn firewall(&self, host: Host) -> Result<FirewallDump, LabError> {
        Ok(FirewallDump {
            v4: self.exec_ok(host, "iptables-save", &[])?.stdout,
            v6: self.exec_ok(host, "ip6tables-save", &[])?.stdout,
            ipsets: self.exec_ok(host, "ipset", &["save"])?.stdout,
        })
    }

    /// `ven status --json` on `host`.
    pub fn ven_status(&self, host: Host) -> Result<VenStatus, LabError> {
        let done = self.run_ok(self.ven_command(host, &["status", "--json"]))?;
        Ok(VenStatus::parse(&done.stdout)?)
    }

    /// `ven status` (the human form) on `host`.
    pub fn ven_status_text(&self, host: Host) -> Result<String, LabError> {
        let done = self.ven(host, &["status"])?;
        Ok(if done.success() {
            done.stdout
        } else {
            format!("(`ven status` failed: {}) {}{}", done.status, done.stdout, done.stderr)
        })
    }

    /// Polls until `check` answers `Ok(None)` ("done"); `Ok(Some(why))` means "not yet, because".
    /// Gives up after `limit`, quoting the last reason. Fails at once if a daemon died.
    pub fn wait_until(
        &self,
        what: &str,
        limit: Duration,
        mut check: impl FnMut(&Self) -> Result<Option<String>, LabError>,
    ) -> Result<Duration, LabError> {
        let started = Instant::now();
        loop {
            self.check_cancel()?;
            self.check_daemons()?;
            let why = match check(self) {
                Ok(None) => return Ok(started.elapsed()),
                Ok(Some(why)) => why,
                // Agents and the PCE may answer badly while they start: retry until the deadline.
                Err(LabError::Cancelled) => return Err(LabError::Cancelled),
                Err(LabError::TornDown) => return Err(LabError::TornDown),
                Err(e) => e.to_string(),
            };
            if started.elapsed() >= limit {
                return Err(LabError::Timeout { what: what.to_string(), waited: limit, last: why });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits until each of `hosts` carries `state` with the policy version the PCE computed for it,
    /// as both `ven status --json` and the PCE's desired state say.
    pub fn wait_for_policy(
        &self,
        hosts: &[Host],
        state: &str,
        limit: Duration,
    ) -> Result<Duration, LabError> {
        let what = format!("{} carrying policy state {state:?}", join_hosts(hosts));
        self.wait_until(&what, limit, |lab| {
            let workloads = lab.workloads()?;
            let mut pending = Vec::new();
            for &host in hosts {
                let agent = lab.ven_status(host)?;
                if let Some(why) = policy_pending(host, state, find_workload(&workloads, host), &agent) {
                    pending.push(why);
                }
            }
            Ok(if pending.is_empty() { None } else { Some(pending.join("; ")) })
        })
    }

    /// Opens a TCP listener on `host`'s address and `port`, inside its namespace.
    pub fn listen(&self, host: Host, port: u16) -> Result<(), LabError> {
        let addr = SocketAddr::from((host.address(), port));
        let mut res = self.teardown.open()?;
        if res.listeners.iter().any(|(h, p, _)| *h == host && *p == port) {
            return Ok(());
        }
        let (_, ns) = res.hosts.iter().find(|(h, _)| *h == host).ok_or(LabError::TornDown)?;
        let listener = probe::listen(ns, addr)?.map_err(|cause| LabError::Listen { host, addr, cause })?;
        res.listeners.push((host, port, listener));
        Ok(())
    }

    /// Connects from inside `from` to `to`:`port` with [`probe::CONNECT_TIMEOUT`].
    pub fn probe(&self, from: Host, to: Host, port: u16) -> Result<Verdict, LabError> {
        self.check_cancel()?;
        let addr = SocketAddr::from((to.address(), port));
        let verdict = self.with_ns(from, |ns| probe::connect(ns, addr, probe::CONNECT_TIMEOUT))??;
        let res = self.teardown.open()?;
        for (_, _, listener) in res.listeners.iter().filter(|(h, p, _)| *h == to && *p == port) {
            probe::drain(listener);
        }
        Ok(verdict)
    }

    /// `iptables-save` inside `host` (read-only; what the agent programmed there).
    pub fn firewall_dump(&self, host: Host) -> Result<String, LabError> {
        self.check_cancel()?;
        let done = process::run_bounded(self.command_in(host, "iptables-save"), DIAGNOSTIC_TIMEOUT)?;
        Ok(format!("{}{}", done.stdout, done.stderr))
    }

    /// The last lines of each daemon's log and the agents' firewalls, for failure reports.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for host in Host::ALL {
            let path = self.log_path(host);
            if path.exists() {
                out.push_str(&format!("--- last lines of {} ---\n", path.display()));
                out.push_str(&process::tail(&path, LOG_TAIL_LINES));
                out.push('\n');
            }
        }
        for host in Host::AGENTS {
            if let Ok(dump) = self.firewall_dump(host) {
                out.push_str(&format!("--- iptables-save on {host} ---\n{dump}"));
            }
        }
        out
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Never panic here (a second panic aborts before the tear-down below).
            use std::io::Write;
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "lab: tearing down after a failure; work dir {}", self.workdir.display());
            let _ = write!(err, "{}", self.diagnostics());
        }
        self.teardown.run();
    }
}

/// A finished command that must have exited 0, or the error that names it and its output.
fn require_success(done: Captured) -> Result<Captured, LabError> {
    if !done.success() {
        return Err(LabError::Failed {
            command: done.command.clone(),
            status: done.status.to_string(),
            stderr: first_nonempty(&done.stderr, &done.stdout),
        });
    }
    Ok(done)
}

fn first_nonempty(a: &str, b: &str) -> String {
    if a.trim().is_empty() { b.trim().to_string() } else { a.trim().to_string() }
}

fn join_hosts(hosts: &[Host]) -> String {
    hosts.iter().map(|h| h.name()).collect::<Vec<_>>().join(" and ")
}

/// The PCE's view of `host`'s workload (hostnames are the lab's host names).
pub fn find_workload(workloads: &[Workload], host: Host) -> Option<&Workload> {
    workloads.iter().find(|w| w.hostname == host.name())
}

/// Why `host` does not yet carry `state` at the PCE's version for it; `None` when it does.
/// In state idle an agent may report no version (it carries no policy).
pub fn policy_pending(
    host: Host,
    state: &str,
    workload: Option<&Workload>,
    agent: &VenStatus,
) -> Option<String> {
    let Some(w) = workload else {
        return Some(format!("{host}: no such workload on the PCE"));
    };
    let agent_state = agent.policy_state.as_deref();
    let version_ok = match (w.policy_version, agent.policy_version) {
        (Some(want), Some(have)) => want == have,
        (_, None) => state == "idle" && agent_state == Some("idle"),
        (None, Some(_)) => false,
    };
    if w.policy_state == state && agent_state == Some(state) && version_ok {
        return None;
    }
    Some(format!(
        "{host}: PCE wants {} v{}, agent carries {} v{} (connectivity {}, last apply error {})",
        w.policy_state,
        opt(w.policy_version),
        agent_state.unwrap_or("nothing"),
        opt(agent.policy_version),
        agent.connectivity.as_deref().unwrap_or("?"),
        agent.last_apply_error.as_deref().unwrap_or("none"),
    ))
}

fn opt<T: fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// One TCP probe of the demo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSpec {
    pub from: Host,
    pub to: Host,
    pub port: u16,
    pub expect: Expect,
}

impl fmt::Display for ProbeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}:{}", self.from, self.to, self.port)
    }
}

/// With both workloads enforced: only the rule's traffic passes.
pub const ENFORCED_PROBES: [ProbeSpec; 3] = [
    ProbeSpec { from: Host::Web, to: Host::Db, port: 5432, expect: Expect::Connect },
    ProbeSpec { from: Host::Web, to: Host::Db, port: 22, expect: Expect::Blocked },
    ProbeSpec { from: Host::Db, to: Host::Web, port: 5432, expect: Expect::Blocked },
];

/// The listeners the probes need: db on 5432 and 22, web on 5432.
pub const LISTENERS: [(Host, u16); 3] = [(Host::Db, 5432), (Host::Db, 22), (Host::Web, 5432)];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    pub spec: ProbeSpec,
    pub verdict: Verdict,
}

impl ProbeResult {
    pub fn ok(&self) -> bool {
        self.spec.expect.met_by(&self.verdict)
    }
}

impl fmt::Display for ProbeResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<18} {:<10} expected {:<8} {}",
            self.spec.to_string(),
            self.verdict.to_string(),
            self.spec.expect.to_string(),
            if self.ok() { "ok" } else { "UNEXPECTED" }
        )
    }
}

/// Runs `specs` in order.
pub fn run_probes(lab: &Lab, specs: &[ProbeSpec]) -> Result<Vec<ProbeResult>, LabError> {
    specs
        .iter()
        .map(|&spec| Ok(ProbeResult { spec, verdict: lab.probe(spec.from, spec.to, spec.port)? }))
        .collect()
}

/// What the demo saw.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub pairing: Pairing,
    /// The probes before enforcement (everything connects while the workloads are idle).
    pub baseline: Vec<ProbeResult>,
    /// How long provisioning took to reach both agents' firewalls.
    pub converged_in: Duration,
    pub probes: Vec<ProbeResult>,
    /// `ven status` (human form) per agent.
    pub statuses: Vec<(Host, String)>,
}

impl DemoReport {
    pub fn all_as_expected(&self) -> bool {
        self.baseline.iter().chain(&self.probes).all(ProbeResult::ok)
    }
}

/// The README's demo: starts the PCE, pairs both agents, provisions web -> db 5432/tcp, enforces,
/// waits until both agents carry the policy, and probes. `say` receives the narrative, a line at a
/// time. The lab keeps running afterwards (the caller decides when to tear down).
pub fn run_demo(lab: &mut Lab, say: &mut dyn FnMut(&str)) -> Result<DemoReport, LabError> {
    say(&format!("[1/7] network: bridge in namespace {}, three hosts on 198.18.0.0/24", lab.segment_name()));
    for host in Host::ALL {
        say(&format!("      {:<4} {:<16} namespace {}", host.name(), host.cidr(), lab.ns_name(host)));
    }

    say(&format!("[2/7] starting the PCE: pce serve --listen {}", Host::Pce.address()));
    let pairing = lab.start_pce()?;
    say(&format!("      listening: {}", pairing.listening));
    say(&format!(
        "      activation code {}, CA fingerprint {}",
        pairing.activation_code, pairing.ca_fingerprint
    ));

    say("[3/7] pairing the agents and starting them");
    for host in Host::AGENTS {
        let done = lab.activate(host)?;
        let detail = first_nonempty(&done.stdout, &done.stderr);
        say(&format!("      {host}: ven activate --hostname {host}: {}", one_line(&detail)));
        lab.start_agent(host)?;
        say(&format!("      {host}: ven agent started (log {})", lab.log_path(host).display()));
    }
    let limit = lab.opts.policy_timeout;
    lab.wait_until("both workloads online on the PCE", limit, |lab| {
        let workloads = lab.workloads()?;
        let offline: Vec<&str> = Host::AGENTS
            .iter()
            .filter(|&&h| !find_workload(&workloads, h).is_some_and(|w| w.online))
            .map(|h| h.name())
            .collect();
        Ok(if offline.is_empty() { None } else { Some(format!("not online: {}", offline.join(", "))) })
    })?;
    say("      both workloads are online on the PCE (policy state idle)");

    for (host, port) in LISTENERS {
        lab.listen(host, port)?;
    }
    let baseline_specs: Vec<ProbeSpec> =
        ENFORCED_PROBES.iter().map(|&spec| ProbeSpec { expect: Expect::Connect, ..spec }).collect();
    say("      idle: the firewalls are untouched, every probe connects:");
    let baseline = run_probes(lab, &baseline_specs)?;
    for result in &baseline {
        say(&format!("        {result}"));
    }

    say("[4/7] policy: labels, rule, provision");
    for line in lab.configure_policy()? {
        say(&format!("      {line}"));
    }

    say("[5/7] enforcing both workloads");
    for host in Host::AGENTS {
        lab.set_state(host, "enforced")?;
        say(&format!("      pce workload set {host} --state enforced"));
    }
    let converged_in = lab.wait_for_policy(&Host::AGENTS, "enforced", limit)?;
    let workloads = lab.workloads()?;
    for host in Host::AGENTS {
        let version = find_workload(&workloads, host).and_then(|w| w.policy_version);
        say(&format!("      {host}: enforced, policy version {}", opt(version)));
    }
    say(&format!("      both agents carry their policy after {:.1} s", converged_in.as_secs_f64()));

    say("[6/7] probing with real TCP connections");
    let probes = run_probes(lab, &ENFORCED_PROBES)?;
    for result in &probes {
        say(&format!("      {result}"));
    }

    say("[7/7] agent status");
    let mut statuses = Vec::new();
    for host in Host::AGENTS {
        let text = lab.ven_status_text(host)?;
        say(&format!("      --- {host}: ven status ---"));
        for line in text.lines() {
            say(&format!("      {line}"));
        }
        statuses.push((host, text));
    }
    Ok(DemoReport { pairing, baseline, converged_in, probes, statuses })
}

fn one_line(text: &str) -> String {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(state: &str, version: Option<u64>) -> Workload {
        Workload {
            id: 1,
            hostname: "web".into(),
            labels: vec![("role".into(), "web".into())],
            policy_state: state.into(),
            online: true,
            policy_version: version,
            applied_policy_version: version,
            applied_state: Some(state.into()),
            apply_error: None,
            agent_status: Some("online".into()),
            suspended: Some(false),
            addresses: Vec::new(),
        }
    }

    fn agent(state: Option<&str>, version: Option<u64>) -> VenStatus {
        VenStatus {
            activated: true,
            agent_id: Some(1),
            hostname: Some("web".into()),
            agent_running: Some(true),
            connectivity: Some("online".into()),
            policy_state: state.map(Into::into),
            policy_version: version,
            last_apply_error: None,
            tamper_count: Some(0),
            last_tamper: None,
            flows: None,
            flow_records_stored: None,
            flow_records_uploaded: None,
            flow_upload_error: None,
            workers: Vec::new(),
        }
    }

    #[test]
    fn policy_is_reached_only_at_the_pces_version_and_state() {
        let w = workload("enforced", Some(3));
        assert_eq!(policy_pending(Host::Web, "enforced", Some(&w), &agent(Some("enforced"), Some(3))), None);
        let old = policy_pending(Host::Web, "enforced", Some(&w), &agent(Some("enforced"), Some(2))).unwrap();
        assert!(old.contains("agent carries enforced v2"), "{old}");
        assert!(policy_pending(Host::Web, "enforced", Some(&w), &agent(Some("idle"), Some(3))).is_some());
        assert!(policy_pending(Host::Web, "enforced", Some(&w), &agent(None, None)).is_some());
        let missing = policy_pending(Host::Db, "enforced", None, &agent(None, None)).unwrap();
        assert!(missing.contains("no such workload"), "{missing}");
        // The PCE still wants idle: not reached even if the agent somehow says enforced.
        let w = workload("idle", Some(3));
        assert!(policy_pending(Host::Web, "enforced", Some(&w), &agent(Some("enforced"), Some(3))).is_some());
    }

    #[test]
    fn idle_may_come_without_a_version() {
        let w = workload("idle", Some(4));
        assert_eq!(policy_pending(Host::Db, "idle", Some(&w), &agent(Some("idle"), None)), None);
        assert_eq!(policy_pending(Host::Db, "idle", Some(&w), &agent(Some("idle"), Some(4))), None);
        assert!(policy_pending(Host::Db, "idle", Some(&w), &agent(Some("enforced"), Some(4))).is_some());
        assert!(policy_pending(Host::Db, "idle", Some(&w), &agent(None, None)).is_some());
    }

    #[test]
    fn hosts_and_addresses() {
        assert_eq!(Host::Web.cidr(), "198.18.0.2/24");
        assert_eq!(management_server(), "198.18.0.1:8443");
        for host in Host::ALL {
            // All test traffic stays inside the benchmarking range 198.18.0.0/15.
            assert_eq!(host.address().octets()[..2], [198, 18]);
        }
    }

    #[test]
    fn probe_lines_say_what_was_seen_and_expected() {
        let spec = ENFORCED_PROBES[1];
        let seen = ProbeResult { spec, verdict: Verdict::Dropped };
        assert!(seen.ok());
        let line = seen.to_string();
        assert!(line.starts_with("web -> db:22"), "{line}");
        assert!(line.contains("DROPPED") && line.ends_with("ok"), "{line}");
        let bad = ProbeResult { spec, verdict: Verdict::Allowed };
        assert!(!bad.ok());
        assert!(bad.to_string().ends_with("UNEXPECTED"));
    }

    #[test]
    fn a_teardown_runs_once_and_closes_the_registry() {
        let teardown = Teardown::new();
        assert!(!teardown.is_cancelled());
        assert!(teardown.run());
        assert!(!teardown.clone().run());
        assert!(teardown.is_cancelled());
        assert!(matches!(teardown.open(), Err(LabError::TornDown)));
    }
}
