//! Self-upgrade, signed, with rollback (issue 16).
//!
//! The PCE names the release a VEN should run (heartbeat answer `upgrade`, bolt
//! `UpgradeRequested`). The steps, and who takes each:
//!
//! 1. **Stage** (thread `upgrade`, [`Upgrader`]): `GET /ven/v1/release` streams into a temp file
//!    beside the installed binary; its length, SHA-256 and Ed25519 signature are checked against
//!    the pinned release key ([`ven_proto::release`]), and its ELF class and machine against the
//!    running binary's. Only then is it renamed to `<installed>.new` (the staged binary).
//! 2. **Record**: `state/upgrade` says [`Phase::Trial`]; the agent stops as for a restart (the
//!    PCE keeps the workload in its peers' policies) and executes the installed binary again.
//! 3. **Launch** ([`launch`], the first thing `ven agent` does, before any thread): a trial that
//!    has not started [`MAX_TRIAL_STARTS`] times is started (the count is written first), with a
//!    guardian process ([`guard`]); past that, it is rolled back.
//! 4. **Trial**: the staged binary runs as the agent. Once healthy (a heartbeat accepted, no
//!    apply error) it renames itself over the installed binary and records
//!    [`Phase::Committed`]. Not healthy within `upgrade_health_deadline_s`: it records
//!    [`Phase::RolledBack`] and executes the installed (old) binary.
//! 5. **Guardian**: when the trial process ends before it committed (a crash, a binary that does
//!    not start) it rolls back, and starts the old agent if no init system did within
//!    [`RESTART_WINDOW`].
//!
//! The firewall is never touched by any step: the kernel keeps the last-known-good policy while
//! binaries change, and every agent start restores it anyway.
//!
//! Power loss at any step (SIGKILL in the tests, through `test_upgrade_kill`) leaves one of:
//! no record (a stray staged or temp file, removed at the next start); a trial record (retried
//! until [`MAX_TRIAL_STARTS`], then rolled back); or a settled record. INVARIANTS: the rename of
//! the staged binary over the installed one is the commit point, so a trial record whose staged
//! binary is gone is committed; a rollback writes its record before it removes the staged
//! binary, so a rolled-back record never meets a missing staged file it should have kept.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use ven_proto::release::{self, Manifest, ReleaseError};
use ven_proto::{AgentEvent, AgentEventKind, UpgradeStep};

use super::pce_client::{ClientError, PceClient};
use crate::config::{Config, UpgradeMode};
use crate::state::{self, DataDir, RecordKind, StateError};

/// Set (to `1`) in the environment of a staged binary started on trial.
pub const TRIAL_ENV: &str = "VEN_UPGRADE_TRIAL";
/// Starts a staged binary gets before it is rolled back: one, and one more in case the first
/// was cut short by a power loss or a restart.
pub const MAX_TRIAL_STARTS: u32 = 2;
/// How long one download may take (a few MB over a slow link).
pub const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(300);
/// A release that failed to download or verify is tried again after this long at the earliest.
pub const RETRY_AFTER: Duration = Duration::from_secs(15 * 60);
/// How often the guardian looks at the trial process and the record.
const GUARD_POLL: Duration = Duration::from_millis(250);
/// The guardian's margin past the trial's own deadline before it ends a stuck trial.
const GUARD_GRACE: Duration = Duration::from_secs(30);
/// After a trial ends, how long the guardian waits for an init system to start the agent again
/// before it starts the old one itself.
pub const RESTART_WINDOW: Duration = Duration::from_secs(10);
/// Longest detail kept in a record or event.
const MAX_DETAIL_BYTES: usize = 512;

/// Where a self-upgrade stands (`state/upgrade`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// The staged binary is being tried (or about to be).
    Trial,
    /// The staged binary replaced the installed one.
    Committed,
    /// The staged binary was given up; the installed one runs.
    RolledBack,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trial => "trial",
            Self::Committed => "committed",
            Self::RolledBack => "rolled back",
        }
    }
}

/// The upgrade record (`state/upgrade`, [`RecordKind::Upgrade`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeRecord {
    pub phase: Phase,
    /// The release's version and the SHA-256 of its binary.
    pub version: String,
    pub sha256: [u8; 32],
    /// The version and SHA-256 of the binary it replaces.
    pub from_version: String,
    pub from_sha256: [u8; 32],
    /// The installed binary (the staged one is beside it, [`staged_path`]).
    pub installed: PathBuf,
    /// Times the staged binary was started.
    pub starts: u32,
    /// Seconds the trial has to report healthy.
    pub health_deadline_s: u64,
    /// Unix seconds of the last change of phase.
    pub at: u64,
    /// Why it was rolled back, or how it went.
    pub detail: String,
    /// Whether the outcome went into the PCE's events (a settled record stays for `ven status`).
    pub reported: bool,
}

/// Why an upgrade step failed: the object and the cause.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("no release key is pinned (configuration key release_key, or `ven activate --release-key`)")]
    NoReleaseKey,
    #[error("release {version}: {cause}")]
    Download { version: String, cause: ClientError },
    #[error(transparent)]
    Release(#[from] ReleaseError),
    #[error("release {version} is not a binary for this machine: {why}")]
    Architecture { version: String, why: String },
    #[error("{}: {cause}", path.display())]
    File { path: PathBuf, cause: std::io::Error },
    #[error(transparent)]
    State(#[from] StateError),
}

impl UpgradeError {
    fn file(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |cause| Self::File { path: path.to_path_buf(), cause }
    }
}

/// Steps the test-only switch `test_upgrade_kill` can stop the agent at with SIGKILL, as a power
/// loss would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillStep {
    /// The release is downloaded into its temp file, not checked yet.
    Downloaded,
    /// The staged binary is in place; no record yet.
    Staged,
    /// The trial record is written; the agent has not stopped yet.
    Recorded,
    /// The launcher counted the start; the staged binary is not started yet.
    Launching,
    /// The trial is healthy; the staged binary is not renamed yet.
    Healthy,
    /// The staged binary replaced the installed one; the record still says trial.
    Renamed,
    /// The rolled-back record is written; the staged binary is still there.
    RollingBack,
}

impl KillStep {
    const ALL: [(KillStep, &'static str); 7] = [
        (Self::Downloaded, "downloaded"),
        (Self::Staged, "staged"),
        (Self::Recorded, "recorded"),
        (Self::Launching, "launching"),
        (Self::Healthy, "healthy"),
        (Self::Renamed, "renamed"),
        (Self::RollingBack, "rolling-back"),
    ];

    pub fn parse(text: &str) -> Result<Self, String> {
        Self::ALL.iter().find(|(_, name)| *name == text).map(|(step, _)| *step).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|(_, name)| *name).collect();
            format!("test_upgrade_kill is one of {}, not {text:?}", names.join(", "))
        })
    }
}

/// SIGKILL to this process when the test switch names `step`.
fn maybe_killed_at(config: &Config, step: KillStep) {
    if config.test_upgrade_kill == Some(step) {
        log::warn!("test_upgrade_kill: killing the agent at {step:?}");
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
    }
}

/// The staged binary of `installed`: `<installed>.new`.
pub fn staged_path(installed: &Path) -> PathBuf {
    let mut name = installed.file_name().unwrap_or_default().to_os_string();
    name.push(".new");
    installed.with_file_name(name)
}

pub fn read_record(data: &DataDir) -> Result<Option<UpgradeRecord>, StateError> {
    state::read_record(&data.upgrade_path(), RecordKind::Upgrade)
}

fn write_record(data: &DataDir, record: &UpgradeRecord) -> Result<(), StateError> {
    state::write_record(&data.upgrade_path(), RecordKind::Upgrade, record, 0o600)
}

/// The version of the running agent: the release label of the binary it runs when an upgrade
/// installed it (the signature binds that label to the bytes), else the version it was built as.
pub fn agent_version() -> &'static str {
    RUNNING_VERSION.get().map_or(env!("CARGO_PKG_VERSION"), String::as_str)
}

static RUNNING_VERSION: OnceLock<String> = OnceLock::new();

/// Finds the running binary's release label in the upgrade record ([`agent_version`]).
pub fn identify_running_release(data: &DataDir) {
    let Ok(Some(record)) = read_record(data) else { return };
    let Some(digest) = running_digest() else { return };
    let label = if digest == record.sha256 {
        record.version
    } else if digest == record.from_sha256 {
        record.from_version
    } else {
        return;
    };
    let _ = RUNNING_VERSION.set(label);
}

/// The SHA-256 of the running binary, read once: `/proc/self/exe` names the inode this process
/// runs, which a rename over its path does not change.
fn running_digest() -> Option<[u8; 32]> {
    static DIGEST: OnceLock<Option<[u8; 32]>> = OnceLock::new();
    *DIGEST.get_or_init(|| {
        let mut file = File::open("/proc/self/exe").ok()?;
        Manifest::of_reader("running", "running-binary", &mut file).ok().map(|manifest| manifest.sha256)
    })
}

/// The pinned release key: the configuration's `release_key`, else the one `ven activate
/// --release-key` pinned.
pub fn release_key(data: &DataDir, config: &Config) -> Option<[u8; 32]> {
    config.release_key.or_else(|| {
        state::read_record::<[u8; 32]>(&data.release_key_path(), RecordKind::ReleaseKey).ok().flatten()
    })
}

/// Pins `key` for this data directory (`ven activate --release-key`).
pub fn pin_release_key(data: &DataDir, key: &[u8; 32]) -> Result<(), StateError> {
    state::write_record(&data.release_key_path(), RecordKind::ReleaseKey, key, 0o600)
}

/// The ELF class, byte order and machine of a binary's header, to refuse a release built for
/// another machine before it is started.
fn elf_identity(header: &[u8]) -> Result<(u8, u8, u16), String> {
    if header.len() < 20 || &header[..4] != b"\x7fELF" {
        return Err("not an ELF file".to_string());
    }
    let (class, data) = (header[4], header[5]);
    let machine = match data {
        1 => u16::from_le_bytes([header[18], header[19]]),
        2 => u16::from_be_bytes([header[18], header[19]]),
        other => return Err(format!("unknown ELF byte order {other}")),
    };
    Ok((class, data, machine))
}

fn read_header(path: &Path) -> std::io::Result<[u8; 20]> {
    let mut header = [0u8; 20];
    File::open(path)?.read_exact(&mut header)?;
    Ok(header)
}

fn check_architecture(version: &str, staged: &Path) -> Result<(), UpgradeError> {
    let wrong = |why: String| UpgradeError::Architecture { version: version.to_string(), why };
    let ours =
        read_header(Path::new("/proc/self/exe")).map_err(UpgradeError::file(Path::new("/proc/self/exe")))?;
    let ours = elf_identity(&ours).map_err(wrong)?;
    let theirs = read_header(staged).map_err(|e| wrong(e.to_string()))?;
    let theirs = elf_identity(&theirs).map_err(wrong)?;
    if ours != theirs {
        return Err(wrong(format!(
            "ELF class {}, byte order {}, machine {} where this one is {}, {}, {}",
            theirs.0, theirs.1, theirs.2, ours.0, ours.1, ours.2
        )));
    }
    Ok(())
}

/// Downloads release `version`, checks it and puts it in place as the staged binary of
/// `installed`; returns its manifest. Nothing is left behind when a check fails.
pub fn stage(
    client: &PceClient,
    version: &str,
    installed: &Path,
    key: &[u8; 32],
    config: &Config,
) -> Result<Manifest, UpgradeError> {
    release::check_version(version)?;
    let dir = installed.parent().unwrap_or(Path::new("/"));
    let mut random = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random);
    let temp = dir.join(format!(".{}.tmp-{}", staged_file_name(installed), release::hex(&random)));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .mode(0o755)
            .open(&temp)
            .map_err(UpgradeError::file(&temp))?;
        let signature = client
            .download_release(version, crate::cli::TARGET, &mut file, DOWNLOAD_TIMEOUT)
            .map_err(|cause| UpgradeError::Download { version: version.to_string(), cause })?;
        file.sync_all().map_err(UpgradeError::file(&temp))?;
        drop(file);
        maybe_killed_at(config, KillStep::Downloaded);
        let manifest = check_release(&temp, version, &signature, key)?;
        let staged = staged_path(installed);
        std::fs::rename(&temp, &staged).map_err(UpgradeError::file(&staged))?;
        sync_dir(dir)?;
        Ok(manifest)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// Checks the downloaded `file` as release `version` for this agent's target: the signature
/// covers version, target, length and digest, so the bytes are taken for what they are only once
/// it verifies with `key`; then the ELF header must be this machine's.
fn check_release(
    file: &Path,
    version: &str,
    signature: &str,
    key: &[u8; 32],
) -> Result<Manifest, UpgradeError> {
    let manifest = Manifest::of_reader(
        version,
        crate::cli::TARGET,
        &mut File::open(file).map_err(UpgradeError::file(file))?,
    )?;
    manifest.verify_signature(&release::parse_signature(signature)?, key)?;
    check_architecture(version, file)?;
    Ok(manifest)
}

fn staged_file_name(installed: &Path) -> String {
    staged_path(installed).file_name().unwrap_or_default().to_string_lossy().into_owned()
}

fn sync_dir(dir: &Path) -> Result<(), UpgradeError> {
    File::open(dir).and_then(|dir| dir.sync_all()).map_err(UpgradeError::file(dir))
}

/// Removes temp files of interrupted downloads beside `installed`.
fn remove_temp_files(installed: &Path) {
    let Some(dir) = installed.parent() else { return };
    let prefix = format!(".{}.tmp-", staged_file_name(installed));
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            log::info!("removing {} (an interrupted download)", entry.path().display());
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The installed binary: the one running now (`/proc/self/exe`), unless this is a trial.
fn installed_binary() -> Result<PathBuf, UpgradeError> {
    std::env::current_exe().map_err(UpgradeError::file(Path::new("/proc/self/exe")))
}

fn truncated(mut text: String) -> String {
    if text.len() > MAX_DETAIL_BYTES {
        let mut end = MAX_DETAIL_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Rolls `record` back: the record first, then the staged binary goes (the module's invariant).
fn roll_back(data: &DataDir, config: &Config, record: &mut UpgradeRecord, why: String) {
    log::error!("upgrade to {}: rolled back to {}: {why}", record.version, record.from_version);
    record.phase = Phase::RolledBack;
    record.detail = truncated(why);
    record.at = crate::clock::now();
    record.reported = false;
    if let Err(e) = write_record(data, record) {
        log::error!("{e}");
    }
    maybe_killed_at(config, KillStep::RollingBack);
    remove_staged(&record.installed);
}

fn remove_staged(installed: &Path) {
    let staged = staged_path(installed);
    match std::fs::remove_file(&staged) {
        Ok(()) => {
            log::info!("removed {}", staged.display());
            if let Some(dir) = installed.parent() {
                let _ = sync_dir(dir);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => log::error!("{}: {e}", staged.display()),
    }
}

/// Settles a trial whose process is gone: committed when the staged binary was renamed (the
/// commit point), else counted against [`MAX_TRIAL_STARTS`]. Returns whether it is settled.
fn settle_stopped_trial(data: &DataDir, config: &Config, record: &mut UpgradeRecord, why: &str) -> bool {
    if !staged_path(&record.installed).exists() {
        log::info!("upgrade to {}: the new binary was put in place before the agent stopped", record.version);
        record.phase = Phase::Committed;
        record.detail = format!("upgraded from {}", record.from_version);
        record.at = crate::clock::now();
        record.reported = false;
        if let Err(e) = write_record(data, record) {
            log::error!("{e}");
        }
        return true;
    }
    if record.starts >= MAX_TRIAL_STARTS {
        let why = format!("the new binary {why} {} times before it reported healthy", record.starts);
        roll_back(data, config, record, why);
        return true;
    }
    false
}

/// The launcher: the first step of `ven agent`, before any thread exists. Starts the staged
/// binary on trial (this process becomes it), or rolls back a trial that failed, or cleans up
/// after an interrupted step; returns when this binary is the one to run.
pub fn launch(data: &DataDir, config: &Config) {
    let record = match read_record(data) {
        Ok(record) => record,
        Err(e) => {
            // A corrupt record: the installed binary runs, and a staged one is not trusted.
            log::error!("{e}; running the installed binary");
            let _ = state::remove_record(&data.upgrade_path());
            None
        }
    };
    let trial_env = std::env::var_os(TRIAL_ENV).is_some();
    // What an interrupted download or staging left (a power loss before its record) is never
    // part of an upgrade in progress: a trial's binary is the staged one named by a Trial record.
    if !trial_env {
        if let Ok(installed) = installed_binary() {
            remove_temp_files(&installed);
            let staged_by_trial =
                matches!(&record, Some(r) if r.phase == Phase::Trial && r.installed == installed);
            if !staged_by_trial {
                remove_staged(&installed);
            }
        }
    }
    let Some(mut record) = record else { return };
    match record.phase {
        Phase::Trial if trial_env => {}
        Phase::Trial => {
            if settle_stopped_trial(data, config, &mut record, "stopped") {
                return;
            }
            record.starts += 1;
            record.at = crate::clock::now();
            if let Err(e) = write_record(data, &record) {
                // Uncounted, a start could repeat forever: do not start it.
                roll_back(data, config, &mut record, format!("cannot count the trial's start: {e}"));
                return;
            }
            maybe_killed_at(config, KillStep::Launching);
            // The kill switch plays a power loss, which the guardian would not survive either.
            if config.test_upgrade_kill.is_none() {
                spawn_guardian(&record);
            }
            let staged = staged_path(&record.installed);
            log::info!(
                "upgrade to {}: starting {} on trial (start {} of {MAX_TRIAL_STARTS})",
                record.version,
                staged.display(),
                record.starts
            );
            let error = Command::new(&staged).arg0(&record.installed).arg("agent").env(TRIAL_ENV, "1").exec();
            roll_back(data, config, &mut record, format!("cannot start {}: {error}", staged.display()));
        }
        Phase::RolledBack => remove_staged(&record.installed),
        Phase::Committed => {}
    }
}

/// Starts the guardian ([`guard`]) of this process's trial, detached from it.
fn spawn_guardian(record: &UpgradeRecord) {
    let pid = std::process::id();
    let Some(started) = process_start_time(pid) else {
        log::warn!("cannot read this process's start time: the trial has no guardian");
        return;
    };
    let mut command = Command::new(&record.installed);
    command
        .args(["upgrade", "--guard", &format!("{pid}:{started}")])
        .env_remove(TRIAL_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command.process_group(0);
    // The first child starts the guardian and ends at once (reaped here), so the guardian is
    // nobody's zombie when it ends.
    match command.env(GUARD_SPAWNER_ENV, "1").status() {
        Ok(status) if status.success() => {}
        Ok(status) => log::warn!("the trial's guardian did not start ({status})"),
        Err(e) => log::warn!("the trial's guardian did not start: {e}"),
    }
}

/// Set for the short-lived process that starts the guardian.
const GUARD_SPAWNER_ENV: &str = "VEN_UPGRADE_GUARD_SPAWNER";

/// Field 22 of `/proc/PID/stat` (clock ticks after boot): with the pid, it names one process
/// (an `exec` keeps it; a reused pid does not).
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after_name) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name: state is field 3, start time field 22.
    fields.get(19)?.parse().ok()
}

/// Whether the process `pid` that started at `started` still runs (a zombie does not).
fn still_running(pid: u32, started: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    state != Some("Z") && process_start_time(pid) == Some(started)
}

/// `ven upgrade --guard PID:START`: watches the trial process until its upgrade settles. When
/// it ends before it committed, rolls back; then starts the old agent unless an init system
/// starts one within [`RESTART_WINDOW`]. Ends a trial stuck past its deadline.
pub fn guard(data: &DataDir, config: &Config, trial: &str) -> Result<(), String> {
    let (pid, started) = trial
        .split_once(':')
        .and_then(|(pid, started)| Some((pid.parse::<u32>().ok()?, started.parse::<u64>().ok()?)))
        .ok_or_else(|| format!("--guard takes PID:START, not {trial:?}"))?;
    if std::env::var_os(GUARD_SPAWNER_ENV).is_some() {
        let program = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut command = Command::new(program);
        command
            .args(["upgrade", "--guard", trial])
            .env_remove(GUARD_SPAWNER_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        command.spawn().map_err(|e| format!("cannot start the guardian: {e}"))?;
        return Ok(());
    }
    match watch_trial(data, config, pid, started, GUARD_GRACE) {
        Some(record) => restart_unless_started(data, &record.installed),
        None => Ok(()),
    }
}

/// The guardian's watch: returns the record it settled when the trial process `pid` (started at
/// `started`) ended before it committed, or stayed `grace` past its deadline (then it is
/// killed); `None` when the trial settled on its own.
fn watch_trial(
    data: &DataDir,
    config: &Config,
    pid: u32,
    started: u64,
    grace: Duration,
) -> Option<UpgradeRecord> {
    let begun = Instant::now();
    loop {
        std::thread::sleep(GUARD_POLL);
        let mut record = match read_record(data) {
            Ok(Some(record)) if record.phase == Phase::Trial => record,
            // Settled by the trial itself (or gone): nothing to guard.
            _ => return None,
        };
        let limit = Duration::from_secs(record.health_deadline_s) + grace;
        let running = still_running(pid, started);
        if running && begun.elapsed() < limit {
            continue;
        }
        if running {
            log::error!("upgrade to {}: the trial is stuck past its deadline; ending it", record.version);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let killed = Instant::now();
            while still_running(pid, started) && killed.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(GUARD_POLL);
            }
        }
        if !settle_stopped_trial(data, config, &mut record, "stopped") {
            let why = if running {
                format!("the new binary did not report healthy within {} s", record.health_deadline_s)
            } else {
                "the new binary stopped before it reported healthy".to_string()
            };
            roll_back(data, config, &mut record, why);
        }
        return Some(record);
    }
}

/// Starts the installed agent for `data` unless one answers within [`RESTART_WINDOW`] (an init
/// system restarting it); this process becomes that agent.
fn restart_unless_started(data: &DataDir, installed: &Path) -> Result<(), String> {
    let waiting = Instant::now();
    while waiting.elapsed() < RESTART_WINDOW {
        if super::control::request(
            &data.socket_path(),
            &super::control::ControlRequest::Status,
            super::control::STATUS_TIMEOUT,
        )
        .is_ok()
        {
            return Ok(());
        }
        std::thread::sleep(GUARD_POLL);
    }
    let error = Command::new(installed).arg("agent").env_remove(TRIAL_ENV).exec();
    Err(format!("cannot start {} agent: {error}", installed.display()))
}

/// This process is a trial (started by [`launch`]): what it must do to commit.
pub struct Trial {
    record: UpgradeRecord,
    deadline: Instant,
}

impl Trial {
    /// The trial this process is, if it is one.
    pub fn of_this_process(data: &DataDir) -> Option<Self> {
        std::env::var_os(TRIAL_ENV)?;
        let record = read_record(data).ok().flatten().filter(|record| record.phase == Phase::Trial)?;
        // Only the staged binary itself is on trial: a variable leaked into another start must
        // not make the old binary rename the new one into place.
        let running = std::env::current_exe().ok()?;
        if running != staged_path(&record.installed) {
            log::warn!("{TRIAL_ENV} is set, but {} is not the staged binary: not a trial", running.display());
            return None;
        }
        log::info!(
            "on trial as release {} (from {}): committing once healthy, within {} s",
            record.version,
            record.from_version,
            record.health_deadline_s
        );
        let deadline = Instant::now() + Duration::from_secs(record.health_deadline_s);
        Some(Self { record, deadline })
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn version(&self) -> &str {
        &self.record.version
    }

    /// The event saying the trial started.
    pub fn started_event(&self) -> AgentEvent {
        let mut record = self.record.clone();
        record.detail = format!(
            "started on trial (start {} of {MAX_TRIAL_STARTS}) from {}; committing once healthy, within {} s",
            record.starts, record.from_version, record.health_deadline_s
        );
        event(&record, UpgradeStep::Staged)
    }

    /// The agent is healthy: the staged binary replaces the installed one (the commit point),
    /// then the record says so. Fails only before the commit point (the caller rolls back);
    /// past it, a record that cannot be written is settled as committed by the next launcher.
    /// Returns the event for the PCE and what `ven status` says of it.
    pub fn commit(&self, data: &DataDir, config: &Config) -> Result<(AgentEvent, String), UpgradeError> {
        maybe_killed_at(config, KillStep::Healthy);
        let staged = staged_path(&self.record.installed);
        std::fs::rename(&staged, &self.record.installed)
            .map_err(UpgradeError::file(&self.record.installed))?;
        maybe_killed_at(config, KillStep::Renamed);
        if let Some(dir) = self.record.installed.parent() {
            if let Err(e) = sync_dir(dir) {
                log::error!("{e}");
            }
        }
        let mut record = self.record.clone();
        record.phase = Phase::Committed;
        record.detail = format!("upgraded from {}", record.from_version);
        record.at = crate::clock::now();
        record.reported = true;
        if let Err(e) = write_record(data, &record) {
            log::error!("{e}; the next start settles the upgrade as committed");
        }
        log::info!(
            "upgrade to {} committed: {} is the installed binary",
            record.version,
            record.installed.display()
        );
        Ok((event(&record, UpgradeStep::Committed), describe(&record)))
    }

    /// Not healthy in time: rolls back and returns the binary to run instead.
    pub fn roll_back(mut self, data: &DataDir, config: &Config) -> PathBuf {
        let why = format!("the new binary did not report healthy within {} s", self.record.health_deadline_s);
        roll_back(data, config, &mut self.record, why);
        self.record.installed
    }
}

fn event(record: &UpgradeRecord, step: UpgradeStep) -> AgentEvent {
    step_event(&record.version, step, record.detail.clone())
}

/// The event for the PCE saying that the upgrade to `version` took `step`.
pub fn step_event(version: &str, step: UpgradeStep, detail: String) -> AgentEvent {
    AgentEvent {
        at: crate::clock::now(),
        kind: AgentEventKind::Upgrade { version: version.to_string(), step, detail: truncated(detail) },
    }
}

/// An event for the PCE about a settled upgrade not reported yet (a rollback or a commit decided
/// while no agent ran), marking it reported.
pub fn unreported_outcome(data: &DataDir) -> Option<AgentEvent> {
    let mut record = read_record(data).ok().flatten()?;
    if record.reported || record.phase == Phase::Trial {
        return None;
    }
    record.reported = true;
    if let Err(e) = write_record(data, &record) {
        log::error!("{e}");
    }
    let step =
        if record.phase == Phase::Committed { UpgradeStep::Committed } else { UpgradeStep::RolledBack };
    Some(event(&record, step))
}

/// Replaces this process with the agent binary `binary` (the installed one after a staging or
/// a rollback); returns only on failure.
pub fn relaunch(binary: &Path) -> std::io::Error {
    log::info!("starting {} agent", binary.display());
    // The signals the agent blocked for its signal thread must not stay blocked in the new image
    // before it blocks them itself.
    let mut termination = nix::sys::signal::SigSet::empty();
    termination.add(nix::sys::signal::Signal::SIGTERM);
    termination.add(nix::sys::signal::Signal::SIGINT);
    let _ = termination.thread_unblock();
    Command::new(binary).arg("agent").env_remove(TRIAL_ENV).exec()
}

/// What an order started.
#[derive(Debug, PartialEq, Eq)]
pub enum Ordered {
    /// The release is downloading (or was already).
    Downloading(String),
    /// The release runs already.
    AlreadyRunning(String),
    /// The package manager installs releases here (`upgrade_mode`): nothing is done.
    Deferred(String),
}

impl std::fmt::Display for Ordered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Downloading(version) => write!(f, "downloading release {version}"),
            Self::AlreadyRunning(version) => write!(f, "release {version} already runs"),
            Self::Deferred(version) => {
                write!(f, "release {version}: upgrades are left to the package manager (upgrade_mode)")
            }
        }
    }
}

/// What became of an order, for the manager.
pub enum Outcome {
    /// Staged and recorded: stop and start the installed binary (the launcher takes over).
    Relaunch(PathBuf),
    /// Nothing to do, or an event to report.
    Report(Option<AgentEvent>),
}

/// Takes the PCE's upgrade orders: one download at a time on the thread `upgrade`.
pub struct Upgrader {
    data: DataDir,
    config: Config,
    running: Option<(String, JoinHandle<Result<Manifest, UpgradeError>>)>,
    /// The last version tried and when, so that a failing one is not tried in a loop.
    last_attempt: Option<(String, Instant)>,
    /// A version the operator asked for with `ven upgrade`: tried even if rolled back before.
    forced: Option<String>,
}

impl Upgrader {
    pub fn new(data: DataDir, config: Config) -> Self {
        Self { data, config, running: None, last_attempt: None, forced: None }
    }

    /// The PCE (or, `forced`, the operator) asks for release `version`. Returns what was done.
    pub fn order(&mut self, version: &str, client: PceClient, forced: bool) -> Result<Ordered, String> {
        if version == agent_version() {
            return Ok(Ordered::AlreadyRunning(version.to_string()));
        }
        if let Err(e) = release::check_version(version) {
            return Err(e.to_string());
        }
        if let Some((running, _)) = &self.running {
            return Ok(Ordered::Downloading(running.clone()));
        }
        if !forced {
            if let Ok(Some(record)) = read_record(&self.data) {
                if record.phase == Phase::RolledBack && record.version == version {
                    return Err(format!(
                        "release {version} was rolled back ({}); `ven upgrade {version}` tries it again",
                        record.detail
                    ));
                }
            }
            if let Some((last, at)) = &self.last_attempt {
                if last == version && at.elapsed() < RETRY_AFTER {
                    return Err(format!(
                        "release {version} failed less than {} s ago",
                        RETRY_AFTER.as_secs()
                    ));
                }
            }
        }
        let mode = self.config.upgrade_mode.resolve();
        if mode == UpgradeMode::Package {
            return Ok(Ordered::Deferred(version.to_string()));
        }
        let Some(key) = release_key(&self.data, &self.config) else {
            return Err(UpgradeError::NoReleaseKey.to_string());
        };
        let installed = installed_binary().map_err(|e| e.to_string())?;
        self.last_attempt = Some((version.to_string(), Instant::now()));
        self.forced = forced.then(|| version.to_string());
        let (config, owned_version) = (self.config.clone(), version.to_string());
        let spawned = std::thread::Builder::new()
            .name("upgrade".into())
            .spawn(move || stage(&client, &owned_version, &installed, &key, &config));
        match spawned {
            Ok(thread) => {
                self.running = Some((version.to_string(), thread));
                Ok(Ordered::Downloading(version.to_string()))
            }
            Err(e) => Err(format!("cannot start the upgrade thread: {e}")),
        }
    }

    /// Collects a finished download: records the trial (and asks for a relaunch) or reports
    /// why the release was refused.
    pub fn poll(&mut self) -> Outcome {
        match &self.running {
            Some((_, thread)) if thread.is_finished() => {}
            _ => return Outcome::Report(None),
        }
        let Some((version, thread)) = self.running.take() else { return Outcome::Report(None) };
        let refused = |detail: String| {
            log::error!("upgrade to {version} refused: {detail}");
            Outcome::Report(Some(step_event(&version, UpgradeStep::Refused, detail)))
        };
        let manifest = match thread.join() {
            Ok(Ok(manifest)) => manifest,
            // The PCE serves a bounded number of releases at once (an order to the whole fleet):
            // the next heartbeat that repeats the order tries again, no event, no hold.
            Ok(Err(UpgradeError::Download { cause, .. })) if cause.is_busy() => {
                log::info!(
                    "upgrade to {version}: the PCE is busy serving releases; trying again at the next heartbeat"
                );
                self.last_attempt = None;
                return Outcome::Report(None);
            }
            Ok(Err(e)) => return refused(e.to_string()),
            Err(_) => return refused("the upgrade thread panicked".to_string()),
        };
        let installed = match installed_binary() {
            Ok(installed) => installed,
            Err(e) => return refused(e.to_string()),
        };
        maybe_killed_at(&self.config, KillStep::Staged);
        let from_sha256 = running_digest().unwrap_or([0; 32]);
        let record = UpgradeRecord {
            phase: Phase::Trial,
            version: manifest.version.clone(),
            sha256: manifest.sha256,
            from_version: agent_version().to_string(),
            from_sha256,
            installed: installed.clone(),
            starts: 0,
            health_deadline_s: self.config.upgrade_health_deadline.as_secs(),
            at: crate::clock::now(),
            detail: format!("{} bytes, sha256 {}", manifest.length, release::hex(&manifest.sha256)),
            reported: false,
        };
        if let Err(e) = write_record(&self.data, &record) {
            remove_staged(&installed);
            return refused(e.to_string());
        }
        maybe_killed_at(&self.config, KillStep::Recorded);
        log::info!(
            "upgrade to {}: staged and verified ({}); restarting into it",
            manifest.version,
            record.detail
        );
        Outcome::Relaunch(installed)
    }
}

/// What `ven upgrade --status` and `ven status` say of the last upgrade.
pub fn describe(record: &UpgradeRecord) -> String {
    format!(
        "{} {} (from {}) at {}: {}",
        record.version,
        record.phase.as_str(),
        record.from_version,
        crate::clock::rfc3339(record.at),
        record.detail
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_headers_are_compared_by_class_byte_order_and_machine() {
        let ours = read_header(Path::new("/proc/self/exe")).unwrap();
        let (class, data, machine) = elf_identity(&ours).unwrap();
        assert!(class == 1 || class == 2);
        assert_eq!(data, 1, "every target we build is little-endian");
        assert_ne!(machine, 0);
        let mut other = ours;
        other[18] ^= 0x01;
        assert_ne!(elf_identity(&other).unwrap(), (class, data, machine));
        assert!(elf_identity(b"#!/bin/sh\nexit 0\n\0\0\0").is_err());
        assert!(elf_identity(&ours[..10]).is_err());
    }

    #[test]
    fn the_staged_binary_sits_beside_the_installed_one() {
        assert_eq!(staged_path(Path::new("/usr/sbin/ven")), Path::new("/usr/sbin/ven.new"));
        assert_eq!(staged_file_name(Path::new("/opt/x/ven")), "ven.new");
    }

    #[test]
    fn kill_steps_parse_by_name_only() {
        for (step, name) in KillStep::ALL {
            assert_eq!(KillStep::parse(name), Ok(step));
        }
        assert!(KillStep::parse("never").unwrap_err().contains("downloaded"));
    }

    #[test]
    fn a_process_is_named_by_pid_and_start_time() {
        let me = std::process::id();
        let started = process_start_time(me).expect("our own stat");
        assert!(still_running(me, started));
        assert!(!still_running(me, started + 1), "another start time is another process");
        assert!(!still_running(u32::MAX - 1, started));
    }

    fn scratch(name: &str) -> (DataDir, PathBuf) {
        let root = std::env::temp_dir().join(format!("ven-upgrade-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let data = DataDir::new(root.join("data"));
        data.ensure().unwrap();
        let bin = root.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        (data, bin.join("ven"))
    }

    fn trial_record(installed: &Path, starts: u32) -> UpgradeRecord {
        UpgradeRecord {
            phase: Phase::Trial,
            version: "0.2.0".into(),
            sha256: [2; 32],
            from_version: "0.1.0".into(),
            from_sha256: [1; 32],
            installed: installed.to_path_buf(),
            starts,
            health_deadline_s: 60,
            at: 1,
            detail: String::new(),
            reported: false,
        }
    }

    #[test]
    fn a_stopped_trial_without_its_staged_binary_was_committed() {
        let (data, installed) = scratch("committed");
        let config = Config::default();
        let mut record = trial_record(&installed, 1);
        write_record(&data, &record).unwrap();
        assert!(settle_stopped_trial(&data, &config, &mut record, "stopped"));
        assert_eq!(read_record(&data).unwrap().unwrap().phase, Phase::Committed);
        let event = unreported_outcome(&data).expect("the commit is reported once");
        assert!(matches!(event.kind, AgentEventKind::Upgrade { step: UpgradeStep::Committed, .. }));
        assert!(unreported_outcome(&data).is_none());
        std::fs::remove_dir_all(data.root().parent().unwrap()).unwrap();
    }

    #[test]
    fn a_trial_that_keeps_stopping_is_rolled_back_and_its_binary_removed() {
        let (data, installed) = scratch("rollback");
        let config = Config::default();
        std::fs::write(staged_path(&installed), b"new").unwrap();
        let mut record = trial_record(&installed, 1);
        assert!(!settle_stopped_trial(&data, &config, &mut record, "stopped"), "one more start is allowed");
        record.starts = MAX_TRIAL_STARTS;
        assert!(settle_stopped_trial(&data, &config, &mut record, "stopped"));
        let stored = read_record(&data).unwrap().unwrap();
        assert_eq!(stored.phase, Phase::RolledBack);
        assert!(stored.detail.contains("stopped 2 times"), "{}", stored.detail);
        assert!(!staged_path(&installed).exists());
        let event = unreported_outcome(&data).unwrap();
        assert!(matches!(event.kind, AgentEventKind::Upgrade { step: UpgradeStep::RolledBack, .. }));
        std::fs::remove_dir_all(data.root().parent().unwrap()).unwrap();
    }

    #[test]
    fn a_release_is_taken_only_whole_signed_for_this_target_and_machine() {
        use ring::signature::{Ed25519KeyPair, KeyPair as _};
        let (data, installed) = scratch("check");
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let key: [u8; 32] = pair.public_key().as_ref().try_into().unwrap();
        let sign = |bytes: &[u8], version: &str, target: &str| {
            let manifest = Manifest::of_reader(version, target, &mut &bytes[..]).unwrap();
            release::hex(pair.sign(&manifest.signed_message()).as_ref())
        };
        // The start of this very binary (its ELF header), as a release for our target: the test
        // binary itself is larger than a release may be.
        let mut binary = std::fs::read("/proc/self/exe").unwrap();
        binary.truncate(64 * 1024);
        let file = installed.with_file_name("download");
        std::fs::write(&file, &binary).unwrap();
        let signature = sign(&binary, "9.9.9", crate::cli::TARGET);
        let manifest = check_release(&file, "9.9.9", &signature, &key).unwrap();
        assert_eq!(manifest.length, binary.len() as u64);

        // Signed for another version or target, or by another key: refused.
        assert!(check_release(&file, "9.9.8", &signature, &key).is_err());
        let other_target = sign(&binary, "9.9.9", "riscv64gc-unknown-linux-musl");
        assert!(check_release(&file, "9.9.9", &other_target, &key).is_err());
        assert!(check_release(&file, "9.9.9", &signature, &[1; 32]).is_err());
        assert!(check_release(&file, "9.9.9", "not hex", &key).is_err());
        // Truncated or extended in transit: refused.
        std::fs::write(&file, &binary[..binary.len() - 1]).unwrap();
        assert!(matches!(check_release(&file, "9.9.9", &signature, &key), Err(UpgradeError::Release(_))));
        let mut longer = binary.clone();
        longer.push(0);
        std::fs::write(&file, &longer).unwrap();
        assert!(check_release(&file, "9.9.9", &signature, &key).is_err());
        // Signed, but for another machine: refused before it is ever started.
        let mut foreign = binary;
        foreign[18] ^= 0x01;
        std::fs::write(&file, &foreign).unwrap();
        let signature = sign(&foreign, "9.9.9", crate::cli::TARGET);
        let refused = check_release(&file, "9.9.9", &signature, &key).unwrap_err();
        assert!(matches!(refused, UpgradeError::Architecture { .. }), "{refused}");
        std::fs::remove_dir_all(data.root().parent().unwrap()).unwrap();
    }

    #[test]
    fn the_guardian_rolls_back_a_trial_that_dies_or_hangs_and_leaves_a_committed_one() {
        let (data, installed) = scratch("guardian");
        let config = Config::default();
        let trial_of = |child: &std::process::Child, deadline_s: u64| {
            let mut record = trial_record(&installed, 1);
            record.health_deadline_s = deadline_s;
            write_record(&data, &record).unwrap();
            std::fs::write(staged_path(&installed), b"new").unwrap();
            (child.id(), process_start_time(child.id()).unwrap())
        };

        // A trial that ends at once (as `/bin/false` would): rolled back.
        let mut ended = Command::new("sleep").arg("0").spawn().unwrap();
        let (pid, started) = trial_of(&ended, 60);
        ended.wait().unwrap();
        let settled = watch_trial(&data, &config, pid, started, Duration::ZERO).expect("the guardian acts");
        assert_eq!(settled.phase, Phase::RolledBack);
        assert!(settled.detail.contains("stopped before it reported healthy"), "{}", settled.detail);
        assert!(!staged_path(&installed).exists());

        // A trial alive past its deadline (and the grace): killed, then rolled back.
        let mut hung = Command::new("sleep").arg("60").spawn().unwrap();
        let (pid, started) = trial_of(&hung, 0);
        let settled = watch_trial(&data, &config, pid, started, Duration::ZERO).expect("the guardian acts");
        assert!(settled.detail.contains("did not report healthy within 0 s"), "{}", settled.detail);
        assert!(!hung.wait().unwrap().success(), "the hung trial was killed");
        assert_eq!(read_record(&data).unwrap().unwrap().phase, Phase::RolledBack);

        // A trial that committed on its own: the guardian leaves it.
        let mut alive = Command::new("sleep").arg("60").spawn().unwrap();
        let (pid, started) = trial_of(&alive, 60);
        let mut committed = read_record(&data).unwrap().unwrap();
        committed.phase = Phase::Committed;
        write_record(&data, &committed).unwrap();
        assert!(watch_trial(&data, &config, pid, started, Duration::ZERO).is_none());
        assert!(still_running(pid, started), "a committed trial is never killed");
        alive.kill().unwrap();
        alive.wait().unwrap();
        std::fs::remove_dir_all(data.root().parent().unwrap()).unwrap();
    }

    fn client() -> PceClient {
        // Never reached: these orders are decided before any download.
        PceClient::new("198.18.0.1:8443", b"not a certificate")
    }

    #[test]
    fn orders_are_deferred_refused_or_taken_before_any_download() {
        let (data, _) = scratch("orders");
        let package = Config { upgrade_mode: UpgradeMode::Package, ..Config::default() };
        let mut upgrader = Upgrader::new(data.clone(), package);
        assert_eq!(upgrader.order("9.9.9", client(), false), Ok(Ordered::Deferred("9.9.9".into())));
        assert_eq!(
            upgrader.order(agent_version(), client(), false),
            Ok(Ordered::AlreadyRunning(agent_version().into()))
        );
        assert!(upgrader.order("../../bin/sh", client(), true).unwrap_err().contains("version"));

        // Self-upgrade without a pinned key: refused, with what to do.
        let unpinned = Config { upgrade_mode: UpgradeMode::SelfUpgrade, ..Config::default() };
        let mut upgrader = Upgrader::new(data.clone(), unpinned.clone());
        assert!(upgrader.order("9.9.9", client(), false).unwrap_err().contains("release_key"));

        // A release rolled back before is not tried again unless the operator forces it.
        let mut record = trial_record(Path::new("/nonexistent/ven"), 2);
        record.phase = Phase::RolledBack;
        record.version = "9.9.9".into();
        write_record(&data, &record).unwrap();
        assert!(upgrader.order("9.9.9", client(), false).unwrap_err().contains("rolled back"));
        assert!(
            upgrader.order("9.9.9", client(), true).unwrap_err().contains("release_key"),
            "forced: past it"
        );
        pin_release_key(&data, &[7; 32]).unwrap();
        assert_eq!(release_key(&data, &unpinned), Some([7; 32]));
        let configured = Config { release_key: Some([9; 32]), ..unpinned };
        assert_eq!(release_key(&data, &configured), Some([9; 32]), "the configuration wins");
        std::fs::remove_dir_all(data.root().parent().unwrap()).unwrap();
    }

    #[test]
    fn the_launcher_removes_what_interrupted_steps_left() {
        let (data, installed) = scratch("leftovers");
        std::fs::write(staged_path(&installed), b"staged, never recorded").unwrap();
        let temp = installed.with_file_name(".ven.new.tmp-0011");
        std::fs::write(&temp, b"half a download").unwrap();
        remove_staged(&installed);
        remove_temp_files(&installed);
        assert!(!staged_path(&installed).exists() && !temp.exists());
        // A rolled-back record whose staged binary survived a power loss.
        let mut record = trial_record(&installed, 2);
        record.phase = Phase::RolledBack;
        write_record(&data, &record).unwrap();
        std::fs::write(staged_path(&installed), b"new").unwrap();
        launch(&data, &Config::default());
        assert!(!staged_path(&installed).exists());
        std::fs::remove_dir_all(data.root().parent().unwrap()).unwrap();
    }
}
