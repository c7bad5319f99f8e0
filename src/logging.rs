//! The `log` backend: one line per record, to the component's file in log/ (the agent) and/or
//! to stderr (CLI commands, and the agent when systemd or procd captures its stderr).
//!
//! ```text
//! 2026-11-28T03:00:00Z ERROR platform: policy version 4 rejected, version 3 stays in force: ...
//! <RFC 3339 UTC>       <lvl> <component>: <message>
//! ```
//!
//! - Component: the record's target picks the file ([`Component::for_target`]): the firewall and
//!   conntrack modules write `platform.log`, EventSync `evsync.log`, the flows pipeline
//!   `vtap.log`, the uploader `logmgr.log`, everything else (other crates too) `agent.log`. A
//!   record may name its component as its target: `log::info!(target: "platform", ...)`.
//! - One record is one line: control characters in the message are escaped (`\n`, `\u{1b}`), so
//!   a peer cannot forge lines and `grep -ir ERROR *` in log/ finds every error. A line holds at
//!   most [`MAX_LINE_BYTES`]; the rest is cut and marked `[truncated]`.
//! - Rotation ([`LogFiles`]): before a line would take a file past
//!   [`LogCaps::per_file_bytes`], the file becomes its one backup (`<name>.1`, replacing the
//!   previous one) and a new file starts. INVARIANT: no file in log/ that this module writes is
//!   ever longer than the cap (a longer line is cut to fit), so log/ stays within its total.
//!   Lengths are tracked in memory from the files' lengths at start (a restart appends); ven owns
//!   these files: one that is truncated or replaced behind its back is not noticed.
//! - Each line is one unbuffered `write(2)` on a file opened with `O_APPEND`: nothing sits in a
//!   buffer, nothing is fsynced (a crash may lose the page cache's last lines, never the file).
//! - Failures (a full disk): never a panic, never a wait. The file is closed, the line dropped and
//!   counted ([`dropped_lines`]); later lines for that file are dropped without a system call
//!   until [`REOPEN_INTERVAL`] has passed, then it is opened again. The first failure is reported
//!   on stderr; once the file works again it gets a line saying how many lines are missing. A
//!   write that fails half-way is taken back (`ftruncate`), so files hold whole lines only.
//! - [`log_limited!`](crate::log_limited) and [`RateLimit`]: for messages that packets or a peer
//!   can trigger, a per-call-site budget ([`RATE_LIMIT_BUDGET`] per [`RATE_LIMIT_WINDOW`]) on
//!   atomics, with a count of what it suppressed.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::logdir::{self, LOG_FILES, LogCaps};

#[doc(hidden)]
pub use log as __log;

/// The longest line a record makes, newline included; the rest of the message is cut.
pub const MAX_LINE_BYTES: usize = 8 * 1024;
/// After a file could not be opened or written, it is not tried again before this.
pub const REOPEN_INTERVAL: Duration = Duration::from_secs(1);
/// Set to `1` or `0`, it says whether the agent also logs to stderr, whatever [`supervised`]
/// would detect (procd sets nothing that can be detected: its init script sets this).
pub const STDERR_OVERRIDE_VAR: &str = "VEN_LOG_STDERR";
/// The level: error, warn, info (default), debug or trace.
pub const LEVEL_VAR: &str = "VEN_LOG";

const LOG_DIR_MODE: u32 = 0o700;
const LOG_FILE_MODE: u32 = 0o600;
const TRUNCATED: &str = " [truncated]";

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("cannot create the log directory {path}: {cause}")]
    CreateDir { path: PathBuf, cause: io::Error },
    #[error("cannot open {path}: {cause}")]
    Open { path: PathBuf, cause: io::Error },
    #[error("cannot rotate {path} to its backup: {cause}")]
    Rotate { path: PathBuf, cause: io::Error },
    #[error("cannot write {path}: {cause}")]
    Write { path: PathBuf, cause: io::Error },
    #[error("the log files are already open")]
    AlreadyStarted,
    #[error("another `log` backend is installed; ven's log files cannot be used")]
    OtherLogger,
}

/// A part of the agent, with its own log file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Component {
    Agent,
    /// The firewall and conntrack (the spec: firewall updates are in platform.log).
    Platform,
    Evsync,
    /// The flows pipeline (the spec's vtapServer).
    Vtap,
    /// The uploader of flows and logs.
    Logmgr,
}

impl Component {
    /// In the order of [`LOG_FILES`].
    pub const ALL: [Component; LOG_FILES.len()] =
        [Component::Agent, Component::Platform, Component::Evsync, Component::Vtap, Component::Logmgr];

    /// The name in lines and explicit targets: the file name without `.log`.
    pub fn name(self) -> &'static str {
        match self {
            Component::Agent => "agent",
            Component::Platform => "platform",
            Component::Evsync => "evsync",
            Component::Vtap => "vtap",
            Component::Logmgr => "logmgr",
        }
    }

    /// Its file in log/ (one of [`LOG_FILES`]).
    pub fn file_name(self) -> &'static str {
        LOG_FILES[self as usize]
    }

    /// The component whose file a record with this target (a module path) goes to.
    pub fn for_target(target: &str) -> Component {
        if let Some(component) = Component::ALL.into_iter().find(|c| c.name() == target) {
            return component;
        }
        if under(target, "ven::firewall") || under(target, "ven::conntrack") {
            Component::Platform
        } else if under(target, "ven::agent::evsync") {
            Component::Evsync
        } else if under(target, "ven::flows") {
            Component::Vtap
        } else if under(target, "ven::agent::uploader") {
            Component::Logmgr
        } else {
            Component::Agent
        }
    }
}

/// `target` is the module `module` or one inside it.
fn under(target: &str, module: &str) -> bool {
    target.strip_prefix(module).is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
}

/// Records from ven itself (or naming a component) carry no target in their line; records from
/// other crates (rustls, ureq) keep theirs, so nobody mistakes them for ven's words.
fn is_ours(target: &str) -> bool {
    under(target, "ven") || Component::ALL.iter().any(|c| c.name() == target)
}

/// One record as one line, newline included, at most [`MAX_LINE_BYTES`] long.
pub fn format_line(unix_secs: u64, level: log::Level, target: &str, message: impl fmt::Display) -> String {
    let component = Component::for_target(target);
    let mut line = String::with_capacity(128);
    let _ = write!(line, "{} {level:<5} {}: ", crate::clock::rfc3339(unix_secs), component.name());
    let room = MAX_LINE_BYTES - TRUNCATED.len() - 1;
    let mut out = OneLine { line: &mut line, room, truncated: false };
    let written = if is_ours(target) { write!(out, "{message}") } else { write!(out, "{target}: {message}") };
    if written.is_err() && out.truncated {
        line.push_str(TRUNCATED);
    }
    line.push('\n');
    line
}

/// Appends text with control characters escaped, up to `room` bytes of line; past it, stops the
/// formatting (an error, which the caller expects).
struct OneLine<'a> {
    line: &'a mut String,
    room: usize,
    truncated: bool,
}

impl fmt::Write for OneLine<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            let before = self.line.len();
            match c {
                '\n' => self.line.push_str("\\n"),
                '\r' => self.line.push_str("\\r"),
                '\t' => self.line.push('\t'),
                c if c.is_control() => {
                    let _ = write!(self.line, "{}", c.escape_unicode());
                }
                c => self.line.push(c),
            }
            if self.line.len() > self.room {
                self.line.truncate(before);
                self.truncated = true;
                return Err(fmt::Error);
            }
        }
        Ok(())
    }
}

/// `line` with its newline, cut (and marked when there is room) to at most `limit` bytes; empty
/// when `limit` is 0.
fn fit(line: &str, limit: usize) -> Cow<'_, str> {
    let body = line.strip_suffix('\n').unwrap_or(line);
    if body.len() < limit {
        if body.len() < line.len() {
            return Cow::Borrowed(line);
        }
        return Cow::Owned(format!("{body}\n"));
    }
    if limit == 0 {
        return Cow::Borrowed("");
    }
    let marker = if limit > TRUNCATED.len() + 1 { TRUNCATED } else { "" };
    let mut keep = limit - 1 - marker.len();
    while !body.is_char_boundary(keep) {
        keep -= 1;
    }
    Cow::Owned(format!("{}{marker}\n", &body[..keep]))
}

/// What became of a line given to [`LogFiles::write`].
#[derive(Debug)]
#[must_use]
pub enum Outcome {
    Written,
    /// Dropped (and counted): the file still fails, or waits for [`REOPEN_INTERVAL`].
    Dropped,
    /// Dropped (and counted), and the file worked until now: the cause, worth reporting once.
    Failed(LoggingError),
}

/// The application log files of log/, one per [`Component`], each rotated to its backup before
/// it would pass the cap. Shared between threads: one lock per file.
pub struct LogFiles {
    dir: PathBuf,
    cap: u64,
    files: [Mutex<FileState>; LOG_FILES.len()],
    dropped: AtomicU64,
}

#[derive(Default)]
struct FileState {
    /// Open, in append mode; `None` after a failure.
    file: Option<File>,
    /// The file's length; what rotation counts.
    len: u64,
    /// No new attempt before this (set by a failure).
    retry_at: Option<Instant>,
    /// Lines dropped since the file last worked: said in the file once it works again.
    dropped_since: u64,
    failing: bool,
}

impl LogFiles {
    /// Creates `dir` (mode 0700) if it is missing and opens every file in append mode (created
    /// with mode 0600). Only a directory that cannot be made is an error: a file that cannot be
    /// opened now is tried again at its first line.
    pub fn open(dir: &Path, caps: LogCaps) -> Result<LogFiles, LoggingError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(LOG_DIR_MODE)
            .create(dir)
            .map_err(|cause| LoggingError::CreateDir { path: dir.to_owned(), cause })?;
        let files = LogFiles {
            dir: dir.to_owned(),
            cap: caps.per_file_bytes(),
            files: std::array::from_fn(|_| Mutex::new(FileState::default())),
            dropped: AtomicU64::new(0),
        };
        for component in Component::ALL {
            // A failure here is met again, and reported, at the file's first line.
            let _ = files.reopen(component, &mut files.lock(component));
        }
        Ok(files)
    }

    /// No file grows past this many bytes.
    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// The file of `component`.
    pub fn path(&self, component: Component) -> PathBuf {
        self.dir.join(component.file_name())
    }

    /// Lines dropped because a file could not be written.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Appends one line (its newline is added when missing) to the file of `component`,
    /// rotating first when the line would take the file past the cap. A line longer than the
    /// cap is cut to fit. Never blocks on anything but the file's lock and one `write(2)`.
    pub fn write(&self, component: Component, line: &str) -> Outcome {
        self.write_at(component, line, Instant::now())
    }

    fn write_at(&self, component: Component, line: &str, now: Instant) -> Outcome {
        let mut state = self.lock(component);
        let line = fit(line, usize::try_from(self.cap).unwrap_or(usize::MAX));
        if line.is_empty() {
            return self.drop_line(&mut state);
        }
        if state.file.is_none() {
            if state.retry_at.is_some_and(|at| now < at) {
                return self.drop_line(&mut state);
            }
            if let Err(e) = self.reopen(component, &mut state) {
                return self.fail(&mut state, now, e);
            }
        }
        if state.dropped_since > 0 {
            let notice = format_line(
                crate::clock::now(),
                log::Level::Warn,
                component.name(),
                format_args!(
                    "{} lines were dropped while {} could not be written",
                    state.dropped_since,
                    component.file_name()
                ),
            );
            let notice = fit(&notice, usize::try_from(self.cap).unwrap_or(usize::MAX));
            if let Err(e) = self.put(component, &mut state, notice.as_bytes()) {
                return self.fail(&mut state, now, e);
            }
            state.dropped_since = 0;
        }
        match self.put(component, &mut state, line.as_bytes()) {
            Ok(()) => {
                state.failing = false;
                Outcome::Written
            }
            Err(e) => self.fail(&mut state, now, e),
        }
    }

    fn lock(&self, component: Component) -> MutexGuard<'_, FileState> {
        // A panic elsewhere while holding the lock leaves a consistent state (lengths are only
        // advanced after a write), so a poisoned lock is used as it is.
        self.files[component as usize].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn drop_line(&self, state: &mut FileState) -> Outcome {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        state.dropped_since += 1;
        Outcome::Dropped
    }

    fn fail(&self, state: &mut FileState, now: Instant, cause: LoggingError) -> Outcome {
        state.file = None;
        state.retry_at = Some(now + REOPEN_INTERVAL);
        let _ = self.drop_line(state);
        if std::mem::replace(&mut state.failing, true) { Outcome::Dropped } else { Outcome::Failed(cause) }
    }

    /// Writes `bytes` (at most the cap) to the open file, rotating first if they would not fit.
    fn put(&self, component: Component, state: &mut FileState, bytes: &[u8]) -> Result<(), LoggingError> {
        let len = bytes.len() as u64;
        if state.len > 0 && state.len + len > self.cap {
            self.rotate(component, state)?;
        }
        let path = || self.path(component);
        let Some(file) = state.file.as_mut() else {
            return Err(LoggingError::Write { path: path(), cause: io::ErrorKind::NotConnected.into() });
        };
        if let Err(cause) = file.write_all(bytes) {
            // Take back a partial line; if that fails too, the length is read again on reopening.
            let _ = file.set_len(state.len);
            return Err(LoggingError::Write { path: path(), cause });
        }
        state.len += len;
        Ok(())
    }

    /// The file becomes its backup (replacing the previous one) and a new file starts.
    fn rotate(&self, component: Component, state: &mut FileState) -> Result<(), LoggingError> {
        state.file = None;
        let path = self.path(component);
        match fs::rename(&path, logdir::backup_path(&path)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(cause) => return Err(LoggingError::Rotate { path, cause }),
        }
        self.reopen(component, state)
    }

    /// Opens the file for appending and reads its length. Files left by a larger cap are brought
    /// under this one: the file is rotated, and a backup is cut to the cap.
    fn reopen(&self, component: Component, state: &mut FileState) -> Result<(), LoggingError> {
        let path = self.path(component);
        let backup = logdir::backup_path(&path);
        let (mut file, mut len) = open_append(&path)?;
        if len > self.cap {
            drop(file);
            fs::rename(&path, &backup).map_err(|cause| LoggingError::Rotate { path: path.clone(), cause })?;
            (file, len) = open_append(&path)?;
        }
        cut_to(&backup, self.cap);
        state.file = Some(file);
        state.len = len;
        state.retry_at = None;
        Ok(())
    }
}

fn open_append(path: &Path) -> Result<(File, u64), LoggingError> {
    let open_error = |cause| LoggingError::Open { path: path.to_owned(), cause };
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(LOG_FILE_MODE)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
        .map_err(open_error)?;
    let metadata = file.metadata().map_err(open_error)?;
    if metadata.permissions().mode() & 0o777 != LOG_FILE_MODE {
        let _ = file.set_permissions(fs::Permissions::from_mode(LOG_FILE_MODE));
    }
    Ok((file, metadata.len()))
}

/// Best effort: a file longer than `cap` keeps its first `cap` bytes.
fn cut_to(path: &Path, cap: u64) {
    if fs::symlink_metadata(path).is_ok_and(|m| m.is_file() && m.len() > cap) {
        if let Ok(file) =
            OpenOptions::new().write(true).custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits()).open(path)
        {
            let _ = file.set_len(cap);
        }
    }
}

/// The installed backend: stderr always until [`init_daemon`] adds the files.
struct Logger {
    files: OnceLock<LogFiles>,
    stderr: AtomicBool,
}

static LOGGER: Logger = Logger { files: OnceLock::new(), stderr: AtomicBool::new(true) };
/// Whether `LOGGER` is the process's `log` backend (decided once).
static INSTALLED: OnceLock<bool> = OnceLock::new();

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let now = crate::clock::now();
        let line = format_line(now, record.level(), record.target(), record.args());
        let files = self.files.get();
        if let Some(files) = files {
            let component = Component::for_target(record.target());
            if let Outcome::Failed(e) = files.write(component, &line) {
                let notice = format_line(
                    now,
                    log::Level::Error,
                    component.name(),
                    format_args!("{e}; its lines are dropped and counted until it can be written again"),
                );
                to_stderr(&notice);
            }
        }
        if files.is_none() || self.stderr.load(Ordering::Relaxed) {
            to_stderr(&line);
        }
    }

    fn flush(&self) {}
}

fn to_stderr(line: &str) {
    let _ = io::stderr().lock().write_all(line.as_bytes());
}

fn install() -> bool {
    *INSTALLED.get_or_init(|| {
        let level =
            std::env::var(LEVEL_VAR).ok().and_then(|v| v.parse().ok()).unwrap_or(log::LevelFilter::Info);
        let installed = log::set_logger(&LOGGER).is_ok();
        if installed {
            log::set_max_level(level);
        }
        installed
    })
}

/// Installs the logger, to stderr only (CLI commands; the agent until [`init_daemon`]). The level
/// comes from VEN_LOG (error, warn, info, debug, trace), default info. Calling it again does
/// nothing.
pub fn init() {
    install();
}

/// The agent's logging: every record also goes to its component's file in `dir` (created, mode
/// 0700, if missing), rotated under `caps`; to stderr as well when `also_stderr`. Installs the
/// logger if [`init`] has not. Until it returns, and whenever it fails, records go to stderr.
pub fn init_daemon(dir: &Path, caps: LogCaps, also_stderr: bool) -> Result<(), LoggingError> {
    if !install() {
        return Err(LoggingError::OtherLogger);
    }
    if LOGGER.files.get().is_some() {
        return Err(LoggingError::AlreadyStarted);
    }
    LOGGER.files.set(LogFiles::open(dir, caps)?).map_err(|_| LoggingError::AlreadyStarted)?;
    LOGGER.stderr.store(also_stderr, Ordering::Relaxed);
    Ok(())
}

/// Lines dropped since [`init_daemon`] because their file could not be written (0 before).
pub fn dropped_lines() -> u64 {
    LOGGER.files.get().map_or(0, LogFiles::dropped)
}

/// Whether a service manager captures our stderr, so the agent should log there too:
/// - `VEN_LOG_STDERR=1` or `=0` decides (procd: its init script sets `VEN_LOG_STDERR=1` beside
///   `procd_set_param stderr 1`; procd passes no variable of its own to say it captures stderr);
/// - under systemd: `JOURNAL_STREAM` names stderr's device and inode when stderr is the journal
///   (a stale value inherited by a process whose stderr went elsewhere does not match); without
///   it, `INVOCATION_ID` (set for every unit) says a unit chose where its stderr goes.
pub fn supervised() -> bool {
    use std::os::fd::AsFd;
    let stderr_id = io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .and_then(|fd| File::from(fd).metadata())
        .ok()
        .map(|metadata| (metadata.dev(), metadata.ino()));
    supervised_by(|name| std::env::var(name).ok(), stderr_id)
}

fn supervised_by(var: impl Fn(&str) -> Option<String>, stderr_id: Option<(u64, u64)>) -> bool {
    match var(STDERR_OVERRIDE_VAR).as_deref().map(str::trim) {
        Some("1") => return true,
        Some("0") => return false,
        _ => {}
    }
    if let Some(stream) = var("JOURNAL_STREAM") {
        let journal =
            stream.split_once(':').and_then(|(dev, ino)| Some((dev.parse().ok()?, ino.parse().ok()?)));
        return journal.is_some() && journal == stderr_id;
    }
    var("INVOCATION_ID").is_some_and(|id| !id.is_empty())
}

/// At most this many messages from one [`log_limited!`](crate::log_limited) call site per
/// [`RATE_LIMIT_WINDOW`].
pub const RATE_LIMIT_BUDGET: u32 = 10;
/// The window of a [`RateLimit`]'s budget.
pub const RATE_LIMIT_WINDOW: Duration = Duration::from_secs(60);
const WINDOW_SECS: u32 = RATE_LIMIT_WINDOW.as_secs() as u32;

/// A budget of messages per fixed window, for one call site; lock-free, usable from a `static`.
///
/// Exact: at most the budget is admitted per window, and every message refused is counted and
/// handed to the first one admitted after it ([`Admit::Log`]), so the log says how many were
/// suppressed (a count left when the messages stop is never reported).
pub struct RateLimit {
    budget: u32,
    /// The window's start (whole seconds of the monotonic clock) << 32 | messages admitted in it.
    window: AtomicU64,
    suppressed: AtomicU64,
}

/// What a [`RateLimit`] says about one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Log it, after saying that `suppressed` messages were not logged (when not 0).
    Log {
        suppressed: u64,
    },
    Suppress,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimit {
    /// [`RATE_LIMIT_BUDGET`] per [`RATE_LIMIT_WINDOW`].
    pub const fn new() -> RateLimit {
        RateLimit::with_budget(RATE_LIMIT_BUDGET)
    }

    /// `budget` (at least 1) messages per [`RATE_LIMIT_WINDOW`].
    pub const fn with_budget(budget: u32) -> RateLimit {
        RateLimit {
            budget: if budget == 0 { 1 } else { budget },
            window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    pub fn admit(&self) -> Admit {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        self.admit_at(ORIGIN.get_or_init(Instant::now).elapsed())
    }

    /// [`RateLimit::admit`] at `now`, the time since a fixed origin (a monotonic clock).
    pub fn admit_at(&self, now: Duration) -> Admit {
        let now = u32::try_from(now.as_secs()).unwrap_or(u32::MAX);
        let mut current = self.window.load(Ordering::Relaxed);
        loop {
            let (start, admitted) = ((current >> 32) as u32, current as u32);
            let (next, new_window) = if now.saturating_sub(start) >= WINDOW_SECS {
                ((u64::from(now) << 32) | 1, true)
            } else if admitted < self.budget {
                (current + 1, false)
            } else {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                return Admit::Suppress;
            };
            match self.window.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => {
                    let suppressed = if new_window { self.suppressed.swap(0, Ordering::Relaxed) } else { 0 };
                    return Admit::Log { suppressed };
                }
                Err(actual) => current = actual,
            }
        }
    }
}

/// `log::log!` under a per-call-site [`RateLimit`] ([`RATE_LIMIT_BUDGET`] per
/// [`RATE_LIMIT_WINDOW`]), for messages that packets or a remote peer can trigger. Suppressed
/// messages are counted and said (`N similar messages suppressed`) before the next one logged.
///
/// ```
/// ven::log_limited!(log::Level::Warn, "NFLOG group {}: message too short", 7);
/// ven::log_limited!(target: "platform", log::Level::Warn, "odd packet");
/// ```
#[macro_export]
macro_rules! log_limited {
    (target: $target:expr, $level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::logging::RateLimit = $crate::logging::RateLimit::new();
        let level: $crate::logging::__log::Level = $level;
        let target: &str = $target;
        if $crate::logging::__log::log_enabled!(target: target, level) {
            if let $crate::logging::Admit::Log { suppressed } = LIMIT.admit() {
                if suppressed > 0 {
                    $crate::logging::__log::log!(
                        target: target, level, "{} similar messages suppressed", suppressed
                    );
                }
                $crate::logging::__log::log!(target: target, level, $($arg)+);
            }
        }
    }};
    ($level:expr, $($arg:tt)+) => {
        $crate::log_limited!(target: ::core::module_path!(), $level, $($arg)+)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let path = std::env::temp_dir().join(format!("ven-logging-unit-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const SMALL: LogCaps = LogCaps { file_max_bytes: 1000, total_max_bytes: 1 << 30 };

    #[test]
    fn targets_map_to_the_specs_files() {
        let cases = [
            ("ven::firewall", "platform.log"),
            ("ven::firewall::iptables", "platform.log"),
            ("ven::conntrack", "platform.log"),
            ("ven::agent::evsync", "evsync.log"),
            ("ven::flows::pipeline", "vtap.log"),
            ("ven::agent::uploader", "logmgr.log"),
            ("ven::agent::manager", "agent.log"),
            ("ven::agent::evsyncx", "agent.log"),
            ("ven::firewallish", "agent.log"),
            ("ven", "agent.log"),
            ("rustls::client::hs", "agent.log"),
            ("ureq::unversioned", "agent.log"),
            ("platform", "platform.log"),
            ("logmgr", "logmgr.log"),
            ("", "agent.log"),
        ];
        for (target, file) in cases {
            assert_eq!(Component::for_target(target).file_name(), file, "{target}");
        }
        for (i, component) in Component::ALL.into_iter().enumerate() {
            assert_eq!(component.file_name(), LOG_FILES[i]);
            assert_eq!(format!("{}.log", component.name()), LOG_FILES[i]);
        }
    }

    #[test]
    fn a_line_is_time_level_component_message() {
        let at = 1_795_834_800; // 2026-11-28T03:00:00Z
        assert_eq!(
            format_line(at, log::Level::Error, "ven::firewall", "apply failed"),
            "2026-11-28T03:00:00Z ERROR platform: apply failed\n"
        );
        assert_eq!(
            format_line(at, log::Level::Info, "ven::agent::manager", format_args!("v{}", 4)),
            "2026-11-28T03:00:00Z INFO  agent: v4\n"
        );
        assert_eq!(
            format_line(at, log::Level::Warn, "rustls::conn", "alert"),
            "2026-11-28T03:00:00Z WARN  agent: rustls::conn: alert\n"
        );
        assert_eq!(
            format_line(at, log::Level::Warn, "evsync", "x"),
            "2026-11-28T03:00:00Z WARN  evsync: x\n"
        );
    }

    #[test]
    fn a_message_cannot_make_a_second_line() {
        let line = format_line(0, log::Level::Info, "ven", "a\nERROR forged\r\u{1b}[31m\tb");
        assert_eq!(line, "1970-01-01T00:00:00Z INFO  agent: a\\nERROR forged\\r\\u{1b}[31m\tb\n");
        assert_eq!(line.matches('\n').count(), 1);
    }

    #[test]
    fn a_long_message_is_cut_at_the_line_limit_on_a_char_boundary() {
        let message = "é".repeat(MAX_LINE_BYTES);
        let line = format_line(0, log::Level::Info, "ven", &message);
        assert!(line.len() <= MAX_LINE_BYTES, "{}", line.len());
        assert!(line.len() > MAX_LINE_BYTES - 4);
        assert!(line.ends_with(" [truncated]\n"));
        let exact = "x".repeat(MAX_LINE_BYTES - 1 - "1970-01-01T00:00:00Z INFO  agent: ".len());
        let line = format_line(0, log::Level::Info, "ven", &exact);
        assert!(line.len() <= MAX_LINE_BYTES);
    }

    #[test]
    fn fit_adds_the_newline_and_cuts_to_the_limit() {
        assert_eq!(fit("abc\n", 10), "abc\n");
        assert_eq!(fit("abc", 10), "abc\n");
        assert_eq!(fit("abc", 4), "abc\n");
        assert_eq!(fit("abcd", 4), "abc\n");
        assert_eq!(fit(&"x".repeat(100), 20), format!("{} [truncated]\n", "x".repeat(7)));
        assert_eq!(fit("ééé", 4), "é\n");
        assert_eq!(fit("abc", 0), "");
        for limit in 1..40 {
            let cut = fit("a line with ünïcödé in it, long enough to be cut", limit);
            assert!(cut.len() <= limit && cut.ends_with('\n'), "{limit}: {cut:?}");
        }
    }

    #[test]
    fn rotation_happens_before_the_cap_is_passed() {
        let dir = TempDir::new("rotation");
        let files = LogFiles::open(&dir.0, SMALL).unwrap();
        assert_eq!(files.cap(), 1000);
        let line = format!("{}\n", "a".repeat(99));
        for _ in 0..10 {
            assert!(matches!(files.write(Component::Platform, &line), Outcome::Written));
        }
        let path = files.path(Component::Platform);
        assert_eq!(fs::metadata(&path).unwrap().len(), 1000);
        assert!(!logdir::backup_path(&path).exists());
        assert!(matches!(files.write(Component::Platform, "b"), Outcome::Written));
        assert_eq!(fs::read_to_string(&path).unwrap(), "b\n");
        assert_eq!(fs::metadata(logdir::backup_path(&path)).unwrap().len(), 1000);
        // Other components are untouched.
        assert_eq!(fs::metadata(files.path(Component::Agent)).unwrap().len(), 0);
    }

    #[test]
    fn a_failing_file_is_retried_at_most_once_per_interval() {
        let dir = TempDir::new("retry");
        let files = LogFiles::open(&dir.0, SMALL).unwrap();
        let path = files.path(Component::Vtap);
        // A directory where the file should be: opening fails, as root too.
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        files.lock(Component::Vtap).file = None;
        let start = Instant::now();
        assert!(matches!(
            files.write_at(Component::Vtap, "1", start),
            Outcome::Failed(LoggingError::Open { .. })
        ));
        fs::remove_dir(&path).unwrap();
        // Fixed, but not tried before the interval.
        let soon = start + REOPEN_INTERVAL - Duration::from_millis(1);
        assert!(matches!(files.write_at(Component::Vtap, "2", soon), Outcome::Dropped));
        assert!(!path.exists());
        assert_eq!(files.dropped(), 2);
        let later = start + REOPEN_INTERVAL;
        assert!(matches!(files.write_at(Component::Vtap, "3", later), Outcome::Written));
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].ends_with("WARN  vtap: 2 lines were dropped while vtap.log could not be written"));
        assert_eq!(lines[1], "3");
        assert_eq!(files.dropped(), 2);
    }

    #[test]
    fn a_file_left_by_a_larger_cap_is_rotated_and_its_backup_cut() {
        let dir = TempDir::new("lowered");
        fs::create_dir_all(&dir.0).unwrap();
        let path = dir.0.join("agent.log");
        fs::write(&path, "x".repeat(5000)).unwrap();
        fs::write(logdir::backup_path(&dir.0.join("evsync.log")), "y".repeat(3000)).unwrap();
        let files = LogFiles::open(&dir.0, SMALL).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), 0);
        assert_eq!(fs::metadata(logdir::backup_path(&path)).unwrap().len(), 1000);
        assert_eq!(fs::metadata(logdir::backup_path(&files.path(Component::Evsync))).unwrap().len(), 1000);
    }

    #[test]
    fn a_zero_cap_drops_everything() {
        let dir = TempDir::new("zero");
        let files = LogFiles::open(&dir.0, LogCaps { file_max_bytes: 0, total_max_bytes: 0 }).unwrap();
        assert!(matches!(files.write(Component::Agent, "x"), Outcome::Dropped));
        assert_eq!(files.dropped(), 1);
    }

    #[test]
    fn files_and_directory_are_private() {
        let dir = TempDir::new("modes");
        let files = LogFiles::open(&dir.0.join("log"), SMALL).unwrap();
        let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.0.join("log")), 0o700);
        for component in Component::ALL {
            assert_eq!(mode(&files.path(component)), 0o600);
        }
    }

    #[test]
    fn supervision_is_detected_from_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        let stderr = Some((8, 1234));
        assert!(!supervised_by(env(&[]), stderr));
        assert!(supervised_by(env(&[("JOURNAL_STREAM", "8:1234")]), stderr));
        assert!(!supervised_by(env(&[("JOURNAL_STREAM", "8:1235"), ("INVOCATION_ID", "ab")]), stderr));
        assert!(!supervised_by(env(&[("JOURNAL_STREAM", "8:1234")]), None));
        assert!(!supervised_by(env(&[("JOURNAL_STREAM", "junk")]), stderr));
        assert!(supervised_by(env(&[("INVOCATION_ID", "0123abcd")]), stderr));
        assert!(!supervised_by(env(&[("INVOCATION_ID", "")]), stderr));
        assert!(supervised_by(env(&[("VEN_LOG_STDERR", "1")]), None));
        assert!(!supervised_by(env(&[("VEN_LOG_STDERR", "0"), ("JOURNAL_STREAM", "8:1234")]), stderr));
        assert!(supervised_by(env(&[("VEN_LOG_STDERR", "yes"), ("INVOCATION_ID", "ab")]), stderr));
    }

    #[test]
    fn the_rate_limit_admits_its_budget_per_window_and_counts_the_rest() {
        let limit = RateLimit::with_budget(3);
        let at = Duration::from_secs;
        for _ in 0..3 {
            assert_eq!(limit.admit_at(at(100)), Admit::Log { suppressed: 0 });
        }
        for s in [100, 120, 159] {
            assert_eq!(limit.admit_at(at(s)), Admit::Suppress);
        }
        assert_eq!(limit.admit_at(at(160)), Admit::Log { suppressed: 3 });
        assert_eq!(limit.admit_at(at(161)), Admit::Log { suppressed: 0 });
        // A quiet window starts afresh with nothing to report.
        assert_eq!(limit.admit_at(at(1000)), Admit::Log { suppressed: 0 });
        // A clock that goes back stays in the current window.
        assert_eq!(limit.admit_at(at(999)), Admit::Log { suppressed: 0 });
    }

    #[test]
    fn the_rate_limit_starts_open_and_holds_under_threads() {
        static LIMIT: RateLimit = RateLimit::new();
        let admitted = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..100 {
                        if let Admit::Log { .. } = LIMIT.admit_at(Duration::from_secs(5)) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), u64::from(RATE_LIMIT_BUDGET));
        assert_eq!(LIMIT.admit_at(Duration::from_secs(65)), Admit::Log { suppressed: 400 - 10 });
        // The real clock: a fresh limit admits at once.
        assert!(matches!(RateLimit::new().admit(), Admit::Log { suppressed: 0 }));
    }

    #[test]
    fn the_macro_expands_for_both_forms() {
        for i in 0..3 {
            crate::log_limited!(log::Level::Debug, "message {i}");
            crate::log_limited!(target: "platform", log::Level::Trace, "message {}", i);
        }
    }
}
