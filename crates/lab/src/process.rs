//! Child processes of the lab: one-shot commands run to completion within a deadline, and
//! long-running daemons (`pce serve`, `ven agent`) stopped with SIGTERM, then SIGKILL.
//!
//! Every child is put in a process group of its own, so a Ctrl-C at the terminal reaches only the
//! lab, which then stops its children in order, and starts with an empty signal mask (a child
//! inherits its parent's mask, and `ven-lab` blocks SIGINT/SIGTERM to take them with `sigwait`:
//! without the reset, `pce` and `ven` would never see the SIGTERM that stops them gracefully).
//! Nothing here waits without a bound.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// At most this much of a one-shot command's stdout and of its stderr is kept (the rest is read
/// and discarded so that the child never blocks on a full pipe).
pub const MAX_CAPTURE: u64 = 1 << 20;

/// How often a deadline loop looks at a child.
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start `{command}`: {cause}")]
    Spawn { command: String, cause: std::io::Error },
    #[error("`{command}` did not finish within {timeout:?} and was killed")]
    Timeout { command: String, timeout: Duration },
    #[error("waiting for `{command}`: {cause}")]
    Wait { command: String, cause: std::io::Error },
}

/// What a finished one-shot command left behind.
#[derive(Debug, Clone)]
pub struct Captured {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Captured {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// A readable rendering of a command line (program and arguments, no environment).
pub fn describe(command: &Command) -> String {
    let mut out = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        out.push(' ');
        out.push_str(&arg.to_string_lossy());
    }
    out
}

/// Runs `command` with no stdin, captures its output, and kills it if it outlives `timeout`.
pub fn run_bounded(mut command: Command, timeout: Duration) -> Result<Captured, ProcessError> {
    let text = describe(&command);
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    reset_signal_mask(&mut command);
    let mut child = command.spawn().map_err(|cause| ProcessError::Spawn { command: text.clone(), cause })?;
    let stdout = child.stdout.take().map(|pipe| drain("lab-cmd-stdout", pipe));
    let stderr = child.stderr.take().map(|pipe| drain("lab-cmd-stderr", pipe));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(ProcessError::Timeout { command: text.clone(), timeout });
            }
            Ok(None) => std::thread::sleep(POLL),
            Err(cause) => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(ProcessError::Wait { command: text.clone(), cause });
            }
        }
    };
    // The readers end at EOF, which comes when the child (the only holder of the pipes) is gone.
    let stdout = stdout.map(join_reader).unwrap_or_default();
    let stderr = stderr.map(join_reader).unwrap_or_default();
    Ok(Captured { command: text, status: status?, stdout, stderr })
}

/// How [`run_killed_after`] ended.
#[derive(Debug, Clone)]
pub enum KillOutcome {
    /// The command finished before the delay was up.
    Finished(Captured),
    /// Its process group was sent SIGKILL after this long, and has been reaped.
    Killed { after: Duration },
}

/// Runs `command` in a process group of its own and, unless it has finished within `delay`,
/// SIGKILLs the whole group (the program and every child it started, as a power cut would),
/// then reaps it. The crash tests' tool; bounded by `delay` plus the kernel's kill.
pub fn run_killed_after(mut command: Command, delay: Duration) -> Result<KillOutcome, ProcessError> {
    use nix::sys::signal::{Signal, killpg};
    let text = describe(&command);
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    reset_signal_mask(&mut command);
    let started = Instant::now();
    let mut child = command.spawn().map_err(|cause| ProcessError::Spawn { command: text.clone(), cause })?;
    let stdout = child.stdout.take().and_then(|pipe| drain("lab-kill-stdout", pipe));
    let stderr = child.stderr.take().and_then(|pipe| drain("lab-kill-stderr", pipe));
    let deadline = started + delay;
    let finished = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => break None,
            // Short naps: the delays are milliseconds.
            Ok(None) => std::thread::sleep(deadline.saturating_duration_since(Instant::now()).min(POLL / 20)),
            Err(cause) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ProcessError::Wait { command: text, cause });
            }
        }
    };
    let outcome = match finished {
        Some(status) => {
            // Reaped already: the group id may no longer be ours to signal, so nothing is sent.
            let stdout = join_reader(stdout);
            let stderr = join_reader(stderr);
            return Ok(KillOutcome::Finished(Captured { command: text, status, stdout, stderr }));
        }
        None => {
            let after = started.elapsed();
            let _ = killpg(nix::unistd::Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            child.wait().map_err(|cause| ProcessError::Wait { command: text.clone(), cause })?;
            KillOutcome::Killed { after }
        }
    };
    // Every writer of the pipes is dead (the whole group was killed): the readers end.
    join_reader(stdout);
    join_reader(stderr);
    Ok(outcome)
}

/// Makes `command`'s child start with no blocked signals, whatever the spawning thread blocks.
#[allow(unsafe_code)]
fn reset_signal_mask(command: &mut Command) {
    use nix::sys::signal::{SigSet, SigmaskHow, pthread_sigmask};
    // SAFETY: the closure runs in the forked child before exec; it only calls sigemptyset and
    // pthread_sigmask, which are async-signal-safe, touches no lock and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
                .map_err(std::io::Error::from)
        });
    }
}

fn drain(name: &str, mut pipe: impl Read + Send + 'static) -> Option<std::thread::JoinHandle<String>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let mut kept = Vec::new();
            let _ = (&mut pipe).take(MAX_CAPTURE).read_to_end(&mut kept);
            let _ = std::io::copy(&mut pipe, &mut std::io::sink());
            String::from_utf8_lossy(&kept).into_owned()
        })
        .ok()
}

fn join_reader(handle: Option<std::thread::JoinHandle<String>>) -> String {
    handle.and_then(|h| h.join().ok()).unwrap_or_default()
}

/// A long-running child whose output goes to files; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
    stopped: bool,
}

impl Daemon {
    /// Starts `command` in a process group of its own with stdin closed.
    pub fn spawn(
        name: &str,
        mut command: Command,
        stdout: Stdio,
        stderr: Stdio,
        log: &Path,
    ) -> Result<Self, ProcessError> {
        let text = describe(&command);
        command.stdin(Stdio::null()).stdout(stdout).stderr(stderr).process_group(0);
        reset_signal_mask(&mut command);
        let child = command.spawn().map_err(|cause| ProcessError::Spawn { command: text, cause })?;
        Ok(Self { name: name.to_string(), child, log: log.to_path_buf(), stopped: false })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The file its diagnostics go to.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// `Some(status)` once it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL at once (a crash, for the crash tests), and reaps it.
    pub fn kill(&mut self) {
        if !self.stopped {
            self.stopped = true;
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL. Idempotent.
    pub fn stop(&mut self, grace: Duration) {
        if !self.stopped {
            self.stopped = true;
            crate::netns::terminate(&mut self.child, grace);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop(DEFAULT_GRACE);
    }
}

/// How long a daemon gets to exit after SIGTERM.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// The last `max_lines` lines of a file (for error messages); empty when unreadable.
pub fn tail(path: &Path, max_lines: usize) -> String {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => return String::new(),
    };
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_status_are_captured() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo out; echo err >&2; exit 3"]);
        let done = run_bounded(command, Duration::from_secs(10)).unwrap();
        assert_eq!(done.stdout, "out\n");
        assert_eq!(done.stderr, "err\n");
        assert_eq!(done.status.code(), Some(3));
        assert!(!done.success());
        assert_eq!(done.command, "sh -c echo out; echo err >&2; exit 3");
    }

    #[test]
    fn a_command_past_its_deadline_is_killed() {
        let mut command = Command::new("sleep");
        command.arg("30");
        let started = Instant::now();
        let err = run_bounded(command, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, ProcessError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_missing_program_is_a_spawn_error() {
        let err = run_bounded(Command::new("/nonexistent/ven-lab-test"), Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, ProcessError::Spawn { .. }), "{err}");
    }

    #[test]
    fn a_daemon_is_stopped_on_drop() {
        let mut command = Command::new("sleep");
        command.arg("30");
        let daemon =
            Daemon::spawn("sleeper", command, Stdio::null(), Stdio::null(), Path::new("/dev/null")).unwrap();
        let pid = daemon.pid();
        let started = Instant::now();
        drop(daemon);
        assert!(started.elapsed() < Duration::from_secs(4), "sleep should die on SIGTERM");
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn children_start_with_no_blocked_signals() {
        use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
        // Block SIGTERM in a thread of our own (not the test harness's), spawn from it, restore.
        let seen = std::thread::spawn(|| {
            let mut set = SigSet::empty();
            set.add(Signal::SIGTERM);
            pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None).unwrap();
            let mut command = Command::new("sh");
            command.args(["-c", "grep SigBlk /proc/self/status"]);
            run_bounded(command, Duration::from_secs(10)).unwrap().stdout
        })
        .join()
        .unwrap();
        assert_eq!(seen.trim(), "SigBlk:\t0000000000000000");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = std::env::temp_dir().join(format!("ven-lab-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("log");
        std::fs::write(&file, "a\nb\nc\nd\n").unwrap();
        assert_eq!(tail(&file, 2), "c\nd");
        assert_eq!(tail(&file, 10), "a\nb\nc\nd");
        assert_eq!(tail(&dir.join("missing"), 3), "");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_killed_command_takes_its_children_along() {
        let dir = std::env::temp_dir().join(format!("ven-lab-kill-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("child.pid");
        let mut command = Command::new("sh");
        command.args(["-c", &format!("sleep 30 & echo $! > {}; wait", pidfile.display())]);
        let started = Instant::now();
        let outcome = run_killed_after(command, Duration::from_millis(300)).unwrap();
        assert!(matches!(outcome, KillOutcome::Killed { after } if after >= Duration::from_millis(300)));
        assert!(started.elapsed() < Duration::from_secs(10));
        let child: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        // The orphaned `sleep` was in the group: it is gone (or a zombie about to be reaped by init).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let state = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            if state.is_empty() || state.contains(") Z ") {
                break;
            }
            assert!(Instant::now() < deadline, "sleep {child} survived the group kill: {state}");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_command_that_finishes_in_time_is_not_killed() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo done"]);
        match run_killed_after(command, Duration::from_secs(10)).unwrap() {
            KillOutcome::Finished(done) => {
                assert_eq!((done.stdout.as_str(), done.success()), ("done\n", true))
            }
            other => panic!("expected it to finish: {other:?}"),
        }
    }
}
