//! Real TCP probes between lab hosts: a listener made inside one namespace, a connect with a
//! timeout made from inside another. A probe passes or fails on "did the handshake complete".

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use crate::netns::{Netns, NetnsError};

/// How long a probe waits for a handshake; a dropped SYN shows up as this timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

/// What a connect attempt saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The three-way handshake completed.
    Allowed,
    /// No answer within the timeout (a DROP rule).
    Dropped,
    /// Refused or unreachable (a REJECT rule, or nothing listening).
    Rejected(String),
    /// Any other failure (e.g. no route).
    Failed(String),
}

impl Verdict {
    pub fn connected(&self) -> bool {
        *self == Verdict::Allowed
    }

    fn from_connect(result: io::Result<TcpStream>) -> Self {
        match result {
            Ok(_) => Verdict::Allowed,
            Err(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => {
                Verdict::Dropped
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::HostUnreachable
                        | io::ErrorKind::NetworkUnreachable
                ) || e.raw_os_error() == Some(nix::libc::EPERM) =>
            {
                Verdict::Rejected(e.to_string())
            }
            Err(e) => Verdict::Failed(e.to_string()),
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Allowed => f.write_str("ALLOWED"),
            Verdict::Dropped => f.write_str("DROPPED"),
            Verdict::Rejected(why) => write!(f, "REJECTED ({why})"),
            Verdict::Failed(why) => write!(f, "FAILED ({why})"),
        }
    }
}

/// What a probe should see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Connect,
    /// Anything but a completed handshake (DROP or REJECT both enforce the policy).
    Blocked,
}

impl Expect {
    pub fn met_by(self, verdict: &Verdict) -> bool {
        match self {
            Expect::Connect => verdict.connected(),
            Expect::Blocked => !verdict.connected(),
        }
    }
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Expect::Connect => "ALLOWED",
            Expect::Blocked => "DROPPED",
        })
    }
}

/// A listening socket made inside `ns` (it stays in that namespace for its whole life).
/// Non-blocking, so that [`drain`] never waits.
pub fn listen(ns: &Netns, addr: SocketAddr) -> Result<io::Result<TcpListener>, NetnsError> {
    ns.run(move || {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })
}

/// Connects from inside `ns` to `addr`, waiting at most `timeout`.
pub fn connect(ns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<Verdict, NetnsError> {
    ns.run(move || Verdict::from_connect(TcpStream::connect_timeout(&addr, timeout)))
}

/// Accepts and closes whatever connections wait in `listener`'s backlog.
pub fn drain(listener: &TcpListener) {
    // Bounded: the backlog holds at most a handful of probe connections.
    for _ in 0..1024 {
        if listener.accept().is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_from_connect_errors() {
        assert_eq!(Verdict::from_connect(Err(io::Error::from(io::ErrorKind::TimedOut))), Verdict::Dropped);
        let refused = Verdict::from_connect(Err(io::Error::from(io::ErrorKind::ConnectionRefused)));
        assert!(matches!(refused, Verdict::Rejected(_)));
        let eperm = Verdict::from_connect(Err(io::Error::from_raw_os_error(nix::libc::EPERM)));
        assert!(matches!(eperm, Verdict::Rejected(_)), "{eperm}");
        let other = Verdict::from_connect(Err(io::Error::from(io::ErrorKind::AddrInUse)));
        assert!(matches!(other, Verdict::Failed(_)));
    }

    #[test]
    fn expectations() {
        assert!(Expect::Connect.met_by(&Verdict::Allowed));
        assert!(!Expect::Connect.met_by(&Verdict::Dropped));
        assert!(Expect::Blocked.met_by(&Verdict::Dropped));
        assert!(Expect::Blocked.met_by(&Verdict::Rejected("refused".into())));
        assert!(!Expect::Blocked.met_by(&Verdict::Allowed));
        assert_eq!(Expect::Blocked.to_string(), "DROPPED");
        assert_eq!(Verdict::Allowed.to_string(), "ALLOWED");
    }

    #[test]
    fn loopback_connect_and_refusal() {
        // Plain loopback in this process's namespace: no privileges needed.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let v = Verdict::from_connect(TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT));
        assert_eq!(v, Verdict::Allowed);
        listener.set_nonblocking(true).unwrap();
        drain(&listener);
        drop(listener);
        let v = Verdict::from_connect(TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT));
        assert!(matches!(v, Verdict::Rejected(_)), "{v}");
    }
}
