//! Telling the init system how the agent is: systemd's notification protocol (`sd_notify`) and
//! procd's instance watchdog. No crate: systemd's protocol is one datagram per message on the
//! Unix socket `$NOTIFY_SOCKET`, and procd is fed through its `ubus` command.
//!
//! - systemd (`Type=notify`, `WatchdogSec=`): `READY=1` once the agent is up (the last-known-good
//!   policy restored), `WATCHDOG=1` every half of `$WATCHDOG_USEC` from the manager loop (only
//!   when `$WATCHDOG_PID` is unset or is this process), `STATUS=` a one-line state when it
//!   changes, `STOPPING=1` on shutdown. `$NOTIFY_SOCKET` is a path or, starting with `@`, a
//!   name in the abstract namespace.
//! - procd sets no variable of its own. Our init script runs the instance with
//!   `procd_set_param watchdog 1 SECONDS` (passive mode: procd restarts the instance when it is
//!   not fed for SECONDS) and exports `VEN_PROCD_WATCHDOG=SECONDS`; the manager loop then runs
//!   `ubus call service watchdog '{"name":"ven","instance":"agent"}'` every half of that.
//!
//! The feeding comes from the manager loop itself, so a manager stuck in one operation for
//! longer than the timeout is restarted: the liveness that matters, not that of a timer thread.
//! Failing to notify is logged and never stops the agent (the firewall does not depend on it).

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Exported by the procd init script: the instance's watchdog timeout in seconds.
pub const PROCD_WATCHDOG_VAR: &str = "VEN_PROCD_WATCHDOG";
/// The procd service and instance names our init script uses (targets/openwrt/ven.init).
pub const PROCD_SERVICE: &str = "ven";
pub const PROCD_INSTANCE: &str = "agent";
/// How long one `ubus` call may take before it counts as failed.
const UBUS_TIMEOUT_S: &str = "5";
/// Longest STATUS= line sent (systemctl shows one line).
const MAX_STATUS_CHARS: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={0:?} is neither a path nor an @abstract name")]
    BadAddress(String),
    #[error("cannot create a datagram socket: {0}")]
    Socket(std::io::Error),
    #[error("cannot send {message:?} to NOTIFY_SOCKET {address}: {cause}")]
    Send { message: String, address: String, cause: std::io::Error },
    #[error("cannot run ubus to feed procd's watchdog: {0}")]
    UbusSpawn(std::io::Error),
    #[error("ubus call service watchdog failed: {0}")]
    UbusFailed(String),
}

/// Where systemd listens for notifications.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotifyAddress {
    Path(PathBuf),
    /// The name after the `@`, in Linux's abstract socket namespace.
    Abstract(Vec<u8>),
}

impl NotifyAddress {
    /// `$NOTIFY_SOCKET` as systemd sets it: an absolute path, or `@name`.
    pub fn parse(value: &str) -> Result<Self, NotifyError> {
        if let Some(name) = value.strip_prefix('@') {
            if !name.is_empty() {
                return Ok(Self::Abstract(name.as_bytes().to_vec()));
            }
        } else if value.starts_with('/') {
            return Ok(Self::Path(PathBuf::from(value)));
        }
        Err(NotifyError::BadAddress(value.to_string()))
    }

    fn describe(&self) -> String {
        match self {
            Self::Path(path) => path.display().to_string(),
            Self::Abstract(name) => format!("@{}", String::from_utf8_lossy(name)),
        }
    }
}

/// Sends one notification datagram (`KEY=VALUE` lines) to systemd.
pub fn send(address: &NotifyAddress, message: &str) -> Result<(), NotifyError> {
    let socket = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
    let sent = match address {
        NotifyAddress::Path(path) => socket.send_to(message.as_bytes(), path),
        NotifyAddress::Abstract(name) => SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(message.as_bytes(), &addr)),
    };
    sent.map(drop).map_err(|cause| NotifyError::Send {
        message: message.to_string(),
        address: address.describe(),
        cause,
    })
}

/// Who is fed by the watchdog pings.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Feeder {
    Systemd,
    Procd,
}

#[derive(Debug)]
struct Watchdog {
    feeder: Feeder,
    /// Half the supervisor's timeout.
    interval: Duration,
    next: Instant,
    /// Whether the last ping failed (a failure is logged once until a ping succeeds).
    failing: bool,
}

/// The agent's link to its supervisor; inert when nothing supervises it.
#[derive(Debug)]
pub struct Supervisor {
    systemd: Option<NotifyAddress>,
    watchdog: Option<Watchdog>,
    last_status: Option<String>,
}

impl Supervisor {
    /// From this process's environment.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok(), std::process::id())
    }

    /// From `var` (an environment lookup) for the process `pid`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>, pid: u32) -> Self {
        let systemd = var("NOTIFY_SOCKET").filter(|value| !value.is_empty()).and_then(|value| {
            NotifyAddress::parse(&value).map_err(|e| log::warn!("{e}; systemd is not notified")).ok()
        });
        // systemd's rule: WATCHDOG_PID, when set, names the process that must ping.
        let ours = var("WATCHDOG_PID").is_none_or(|owner| owner.trim().parse() == Ok(pid));
        let systemd_timeout = var("WATCHDOG_USEC")
            .and_then(|usec| usec.trim().parse::<u64>().ok())
            .filter(|usec| *usec > 0 && ours && systemd.is_some())
            .map(Duration::from_micros);
        let procd_timeout = var(PROCD_WATCHDOG_VAR)
            .and_then(|seconds| seconds.trim().parse::<u64>().ok())
            .filter(|seconds| *seconds > 0)
            .map(Duration::from_secs);
        let watchdog = match (systemd_timeout, procd_timeout) {
            (Some(timeout), _) => Some((Feeder::Systemd, timeout)),
            (None, Some(timeout)) => Some((Feeder::Procd, timeout)),
            (None, None) => None,
        }
        .map(|(feeder, timeout)| {
            let interval = timeout / 2;
            Watchdog { feeder, interval, next: Instant::now() + interval, failing: false }
        });
        Self { systemd, watchdog, last_status: None }
    }

    /// Whether anything is told at all.
    pub fn active(&self) -> bool {
        self.systemd.is_some() || self.watchdog.is_some()
    }

    /// The watchdog's ping interval, when there is a watchdog.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.as_ref().map(|watchdog| watchdog.interval)
    }

    /// The agent is up: `READY=1` with its state line.
    pub fn ready(&mut self, status: &str) {
        let status = one_line(status);
        self.notify(&format!("READY=1\nSTATUS={status}"));
        self.last_status = Some(status);
        self.ping();
    }

    /// `STATUS=` when the state line changed since the last one sent.
    pub fn status(&mut self, status: &str) {
        let status = one_line(status);
        if self.systemd.is_some() && self.last_status.as_deref() != Some(status.as_str()) {
            self.notify(&format!("STATUS={status}"));
            self.last_status = Some(status);
        }
    }

    /// How long the manager may sleep before the next ping is due (`None`: no watchdog).
    pub fn until_next_ping(&self, now: Instant) -> Option<Duration> {
        self.watchdog.as_ref().map(|watchdog| watchdog.next.saturating_duration_since(now))
    }

    /// Pings the watchdog when a ping is due.
    pub fn ping_if_due(&mut self, now: Instant) {
        if self.watchdog.as_ref().is_some_and(|watchdog| now >= watchdog.next) {
            self.ping();
        }
    }

    /// The agent is stopping: `STOPPING=1`, so that systemd does not count a slow goodbye as a
    /// hang.
    pub fn stopping(&mut self) {
        self.notify("STOPPING=1\nSTATUS=stopping");
    }

    fn ping(&mut self) {
        let Some(watchdog) = &self.watchdog else { return };
        let result = match watchdog.feeder {
            Feeder::Systemd => match &self.systemd {
                Some(address) => send(address, "WATCHDOG=1"),
                None => Ok(()),
            },
            Feeder::Procd => feed_procd(),
        };
        let Some(watchdog) = &mut self.watchdog else { return };
        watchdog.next = Instant::now() + watchdog.interval;
        match result {
            Ok(()) => {
                if watchdog.failing {
                    log::info!("the supervisor's watchdog is fed again");
                }
                watchdog.failing = false;
            }
            Err(e) => {
                if !watchdog.failing {
                    log::warn!("{e}; the supervisor may restart the agent");
                }
                watchdog.failing = true;
            }
        }
    }

    fn notify(&self, message: &str) {
        if let Some(address) = &self.systemd {
            if let Err(e) = send(address, message) {
                log::warn!("{e}");
            }
        }
    }
}

/// The command that feeds procd's watchdog for our instance.
pub fn procd_feed_command() -> Command {
    let mut command = Command::new("ubus");
    command.args([
        "-t",
        UBUS_TIMEOUT_S,
        "call",
        "service",
        "watchdog",
        &format!(r#"{{"name":"{PROCD_SERVICE}","instance":"{PROCD_INSTANCE}"}}"#),
    ]);
    command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    command
}

fn feed_procd() -> Result<(), NotifyError> {
    let output = procd_feed_command().output().map_err(NotifyError::UbusSpawn)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(NotifyError::UbusFailed(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// `text` on one line of at most [`MAX_STATUS_CHARS`] characters (a newline would start
/// another `KEY=VALUE` assignment).
fn one_line(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).take(MAX_STATUS_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A real datagram socket standing where systemd's would, in a fresh directory.
    struct Listener {
        dir: PathBuf,
        socket: UnixDatagram,
    }

    impl Listener {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("ven-notify-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let socket = UnixDatagram::bind(dir.join("notify")).unwrap();
            socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            Self { dir, socket }
        }

        fn path(&self) -> String {
            self.dir.join("notify").display().to_string()
        }

        fn next(&self) -> String {
            let mut buf = [0u8; 512];
            let n = self.socket.recv(&mut buf).expect("a notification datagram");
            String::from_utf8(buf[..n].to_vec()).unwrap()
        }

        fn nothing_pending(&self) -> bool {
            self.socket.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 512];
            let empty = self.socket.recv(&mut buf).is_err();
            self.socket.set_nonblocking(false).unwrap();
            empty
        }
    }

    impl Drop for Listener {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn addresses_are_paths_or_abstract_names() {
        assert_eq!(
            NotifyAddress::parse("/run/systemd/notify").unwrap(),
            NotifyAddress::Path("/run/systemd/notify".into())
        );
        assert_eq!(NotifyAddress::parse("@ven/1").unwrap(), NotifyAddress::Abstract(b"ven/1".to_vec()));
        for bad in ["", "@", "relative/path", "vsock:2:1234"] {
            assert!(NotifyAddress::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_agent_life_reaches_a_real_socket_in_order() {
        let listener = Listener::new("life");
        let pid = std::process::id().to_string();
        let mut supervisor = Supervisor::from_vars(
            vars(&[
                ("NOTIFY_SOCKET", &listener.path()),
                ("WATCHDOG_USEC", "120000000"),
                ("WATCHDOG_PID", &pid),
            ]),
            std::process::id(),
        );
        assert_eq!(supervisor.watchdog_interval(), Some(Duration::from_secs(60)), "half of WatchdogSec");
        supervisor.ready("enforced policy 4\nonline");
        assert_eq!(listener.next(), "READY=1\nSTATUS=enforced policy 4 online");
        assert_eq!(listener.next(), "WATCHDOG=1", "ready also feeds the watchdog");
        let now = Instant::now();
        let wait = supervisor.until_next_ping(now).unwrap();
        assert!(wait > Duration::from_secs(59) && wait <= Duration::from_secs(60), "{wait:?}");
        supervisor.ping_if_due(now);
        assert!(listener.nothing_pending(), "no ping before it is due");
        supervisor.ping_if_due(now + Duration::from_secs(61));
        assert_eq!(listener.next(), "WATCHDOG=1");
        supervisor.status("enforced policy 4 online");
        assert!(listener.nothing_pending(), "an unchanged status is not sent again");
        supervisor.status("enforced policy 5 diminished");
        assert_eq!(listener.next(), "STATUS=enforced policy 5 diminished");
        supervisor.stopping();
        assert_eq!(listener.next(), "STOPPING=1\nSTATUS=stopping");
    }

    #[test]
    fn an_abstract_socket_is_reached() {
        let name = format!("ven-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut supervisor =
            Supervisor::from_vars(vars(&[("NOTIFY_SOCKET", &format!("@{name}"))]), std::process::id());
        assert!(supervisor.active() && supervisor.watchdog_interval().is_none());
        supervisor.ready("unpaired");
        let mut buf = [0u8; 128];
        let n = socket.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=unpaired");
    }

    #[test]
    fn a_watchdog_meant_for_another_process_is_not_fed() {
        let listener = Listener::new("other-pid");
        let supervisor = Supervisor::from_vars(
            vars(&[("NOTIFY_SOCKET", &listener.path()), ("WATCHDOG_USEC", "2000000"), ("WATCHDOG_PID", "1")]),
            4242,
        );
        assert_eq!(supervisor.watchdog_interval(), None);
        assert_eq!(supervisor.until_next_ping(Instant::now()), None);
    }

    #[test]
    fn an_unreachable_socket_is_an_error_not_a_panic() {
        let err = send(&NotifyAddress::Path("/nonexistent/ven/notify".into()), "READY=1").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ven/notify"), "{err}");
        // The supervisor only logs it.
        let mut supervisor = Supervisor::from_vars(vars(&[("NOTIFY_SOCKET", "/nonexistent/ven/notify")]), 1);
        supervisor.ready("x");
        supervisor.stopping();
    }

    #[test]
    fn procd_is_fed_through_ubus_at_half_its_timeout() {
        let supervisor = Supervisor::from_vars(vars(&[(PROCD_WATCHDOG_VAR, "60")]), 1);
        assert!(supervisor.active());
        assert_eq!(supervisor.watchdog_interval(), Some(Duration::from_secs(30)));
        let command = procd_feed_command();
        assert_eq!(command.get_program(), "ubus");
        let args: Vec<_> = command.get_args().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(args, ["-t", "5", "call", "service", "watchdog", r#"{"name":"ven","instance":"agent"}"#]);
        assert!(!Supervisor::from_vars(vars(&[(PROCD_WATCHDOG_VAR, "0")]), 1).active());
        assert!(!Supervisor::from_vars(vars(&[]), 1).active());
    }
}
