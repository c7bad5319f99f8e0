//! `ven start`, `stop`, `restart`, `enable` and `disable`: through the init system that is
//! actually running, or directly on the agent.
//!
//! The init system is the one running now, not one whose tools happen to be installed:
//! systemd when `/run/systemd/system` exists, procd when `/sbin/procd` and `/etc/init.d/ven`
//! exist (OpenWrt), a sysvinit/busybox script at `/etc/init.d/ven` otherwise. They manage the
//! default data directory; an agent on another one (`VEN_DATA_DIR`, several agents per host) and
//! `--direct` are handled directly: `start` spawns `ven agent` in its own process group and waits
//! for its control socket; `stop` asks the socket's owner (its pid from SO_PEERCRED) to stop with
//! SIGTERM, which says goodbye to the PCE within [`crate::agent::pce_client::GOODBYE_TIMEOUT`],
//! and waits for it to go.
//!
//! `disable` writes `DATA_DIR/disabled` (and disables the init system's unit or script): the boot
//! entry points, `ven restore` and `ven agent`, then do nothing and exit 0, so an image can carry
//! an installed, unactivated, disabled VEN; `enable` removes it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::agent::control::{self, ControlError, ControlRequest};
use crate::state::DataDir;

/// How long `start` waits for the new agent's socket, and `stop` for the agent to go.
pub const START_WAIT: Duration = Duration::from_secs(15);
pub const STOP_WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);
/// The marker of a disabled VEN, in its data directory.
pub const DISABLED_FILE: &str = "disabled";
/// The unit and script names the packages install.
const SYSTEMD_UNITS: [&str; 2] = ["ven.service", "ven-firewall.service"];
const INIT_SCRIPTS: [&str; 2] = ["/etc/init.d/ven", "/etc/init.d/ven-firewall"];

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{command} failed ({status})")]
    Failed { command: String, status: String },
    #[error("cannot run {command}: {cause}")]
    Spawn { command: String, cause: std::io::Error },
    #[error("the agent did not answer on {socket} within {waited:?} after starting; see its log in {log}")]
    NotStarted { socket: PathBuf, waited: Duration, log: PathBuf },
    #[error("the agent (pid {pid}) did not stop within {waited:?}")]
    NotStopped { pid: i32, waited: Duration },
    #[error("cannot tell which process serves {0}: {1}")]
    NoPeer(PathBuf, nix::Error),
    #[error("{path}: {cause}")]
    Marker { path: PathBuf, cause: std::io::Error },
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// The init system running on this host (`root` is `/` but for tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitSystem {
    Systemd,
    Procd,
    SysV,
    None,
}

pub fn detect(root: &Path) -> InitSystem {
    if root.join("run/systemd/system").is_dir() {
        InitSystem::Systemd
    } else if root.join("sbin/procd").exists() && root.join("etc/init.d/ven").exists() {
        InitSystem::Procd
    } else if root.join("etc/init.d/ven").exists() {
        InitSystem::SysV
    } else {
        InitSystem::None
    }
}

/// What to do with the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop,
    Restart,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Restart => "restart",
        }
    }
}

/// Whether the init system manages this agent: its data directory is the default one.
fn managed_by_init(data: &DataDir, direct: bool) -> Option<InitSystem> {
    let default = data.root() == Path::new(crate::state::DEFAULT_DATA_DIR);
    match detect(Path::new("/")) {
        InitSystem::None => None,
        init if default && !direct => Some(init),
        _ => None,
    }
}

fn run(program: &str, args: &[&str]) -> Result<(), ServiceError> {
    let command = format!("{program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .status()
        .map_err(|cause| ServiceError::Spawn { command: command.clone(), cause })?;
    if status.success() { Ok(()) } else { Err(ServiceError::Failed { command, status: status.to_string() }) }
}

/// Starts, stops or restarts the agent; returns what was done, for the user.
pub fn control_agent(data: &DataDir, action: Action, direct: bool) -> Result<String, ServiceError> {
    // The stopping agent's goodbye says whether it comes back ([`restart_announced`]).
    let marker = data.restarting_path();
    match action {
        Action::Restart => {
            if let Err(e) = std::fs::write(&marker, crate::clock::now().to_string()) {
                log::warn!("cannot write {}: {e}; the PCE takes this restart as a stop", marker.display());
            }
        }
        Action::Stop | Action::Start => {
            let _ = std::fs::remove_file(&marker);
        }
    }
    match managed_by_init(data, direct) {
        Some(InitSystem::Systemd) => {
            run("systemctl", &[action.verb(), SYSTEMD_UNITS[0]])?;
            Ok(format!("systemctl {} {}: done", action.verb(), SYSTEMD_UNITS[0]))
        }
        Some(InitSystem::Procd | InitSystem::SysV) => {
            run(INIT_SCRIPTS[0], &[action.verb()])?;
            Ok(format!("{} {}: done", INIT_SCRIPTS[0], action.verb()))
        }
        Some(InitSystem::None) | None => match action {
            Action::Start => start_direct(data),
            Action::Stop => stop_direct(data),
            Action::Restart => {
                let stopped = stop_direct(data)?;
                let started = start_direct(data)?;
                Ok(format!("{stopped}\n{started}"))
            }
        },
    }
}

fn answers(data: &DataDir) -> bool {
    control::request(&data.socket_path(), &ControlRequest::Status, control::STATUS_TIMEOUT).is_ok()
}

/// Spawns `ven agent` for `data`, detached from the terminal, and waits for its socket.
fn start_direct(data: &DataDir) -> Result<String, ServiceError> {
    if answers(data) {
        return Ok(format!("the agent on {} is already running", data.root().display()));
    }
    let program = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("ven"));
    let mut command = Command::new(&program);
    command
        .arg("agent")
        .env("VEN_DATA_DIR", data.root())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // Its own process group: a Ctrl-C in the terminal that ran `ven start` does not reach it.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let child = command
        .spawn()
        .map_err(|cause| ServiceError::Spawn { command: format!("{} agent", program.display()), cause })?;
    let started = Instant::now();
    while started.elapsed() < START_WAIT {
        if answers(data) {
            return Ok(format!("started the agent on {} (pid {})", data.root().display(), child.id()));
        }
        std::thread::sleep(POLL);
    }
    Err(ServiceError::NotStarted { socket: data.socket_path(), waited: START_WAIT, log: data.log_dir() })
}

/// SIGTERM to the process serving the control socket, then waits for it to stop answering.
fn stop_direct(data: &DataDir) -> Result<String, ServiceError> {
    let socket = data.socket_path();
    let stream = match std::os::unix::net::UnixStream::connect(&socket) {
        Ok(stream) => stream,
        Err(_) => return Ok(format!("no agent is running on {}", data.root().display())),
    };
    let credentials = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| ServiceError::NoPeer(socket.clone(), e))?;
    drop(stream);
    let pid = nix::unistd::Pid::from_raw(credentials.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
        .map_err(|e| ServiceError::NoPeer(socket.clone(), e))?;
    let asked = Instant::now();
    while asked.elapsed() < STOP_WAIT {
        let gone = nix::sys::signal::kill(pid, None).is_err();
        if gone || !socket.exists() {
            return Ok(format!(
                "stopped the agent on {} (pid {pid}) in {:.1} s",
                data.root().display(),
                asked.elapsed().as_secs_f64()
            ));
        }
        std::thread::sleep(POLL);
    }
    Err(ServiceError::NotStopped { pid: pid.as_raw(), waited: STOP_WAIT })
}

/// How long a restart announcement stays valid: a stop that follows it later is a stop.
const RESTART_ANNOUNCEMENT_VALID_S: u64 = 120;

/// Whether the agent stopping now was asked to restart (`ven restart` wrote the marker within
/// [`RESTART_ANNOUNCEMENT_VALID_S`]); the marker is consumed.
pub fn restart_announced(data: &DataDir) -> bool {
    let marker = data.restarting_path();
    let Ok(text) = std::fs::read_to_string(&marker) else { return false };
    let _ = std::fs::remove_file(&marker);
    text.trim()
        .parse::<u64>()
        .is_ok_and(|at| crate::clock::now().saturating_sub(at) <= RESTART_ANNOUNCEMENT_VALID_S)
}

/// Whether `disable` was run on this data directory.
pub fn is_disabled(data: &DataDir) -> bool {
    data.root().join(DISABLED_FILE).exists()
}

/// `enable` (`true`) or `disable`: the marker, and the init system's own switch when it runs.
pub fn set_enabled(data: &DataDir, enabled: bool) -> Result<String, ServiceError> {
    let marker = data.root().join(DISABLED_FILE);
    let marker_error = |cause| ServiceError::Marker { path: marker.clone(), cause };
    if enabled {
        match std::fs::remove_file(&marker) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(marker_error(e)),
            _ => {}
        }
    } else {
        std::fs::create_dir_all(data.root()).map_err(marker_error)?;
        crate::state::write_atomically(
            &marker,
            b"disabled by `ven disable`; `ven enable` undoes it\n",
            0o600,
        )
        .map_err(marker_error)?;
    }
    let verb = if enabled { "enable" } else { "disable" };
    let init = match managed_by_init(data, false) {
        Some(InitSystem::Systemd) => {
            let mut args = vec![verb];
            args.extend(SYSTEMD_UNITS);
            run("systemctl", &args)?;
            format!("; systemctl {verb} {}", SYSTEMD_UNITS.join(" "))
        }
        Some(InitSystem::Procd | InitSystem::SysV) => {
            for script in INIT_SCRIPTS.iter().filter(|s| Path::new(s).exists()) {
                run(script, &[verb])?;
            }
            format!("; {verb}d the init scripts")
        }
        _ => String::new(),
    };
    Ok(if enabled {
        format!("enabled: the agent starts at boot{init}")
    } else {
        format!("disabled: `ven restore` and `ven agent` do nothing until `ven enable`{init}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ven-service-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_running_init_system_is_detected_not_the_installed_tools() {
        let root = scratch("init");
        assert_eq!(detect(&root), InitSystem::None);
        std::fs::create_dir_all(root.join("etc/init.d")).unwrap();
        std::fs::write(root.join("etc/init.d/ven"), "#!/bin/sh\n").unwrap();
        assert_eq!(detect(&root), InitSystem::SysV);
        std::fs::create_dir_all(root.join("sbin")).unwrap();
        std::fs::write(root.join("sbin/procd"), "").unwrap();
        assert_eq!(detect(&root), InitSystem::Procd);
        // systemctl on PATH means nothing; a running systemd has /run/systemd/system.
        std::fs::create_dir_all(root.join("run/systemd/system")).unwrap();
        assert_eq!(detect(&root), InitSystem::Systemd);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn disable_and_enable_toggle_the_marker() {
        let root = scratch("marker");
        let data = DataDir::new(root.join("data"));
        assert!(!is_disabled(&data));
        set_enabled(&data, false).unwrap();
        assert!(is_disabled(&data));
        set_enabled(&data, true).unwrap();
        assert!(!is_disabled(&data));
        set_enabled(&data, true).expect("enabling twice is fine");
        std::fs::remove_dir_all(root).unwrap();
    }
}
