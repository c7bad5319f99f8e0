//! The established-TCP conntrack timeout and conntrack accounting (per-network-namespace sysctls).
//!
//! /proc/sys/net resolves to the network namespace of the calling thread, so these functions act
//! on the namespace the caller runs in. The proc root is a parameter so that tests can point it
//! at a fixture.

use std::io::{ErrorKind, Write as _};
use std::path::{Path, PathBuf};

use super::ConntrackError;

/// The sysctl below the proc root.
pub const ESTABLISHED_TIMEOUT_SYSCTL: &str = "sys/net/netfilter/nf_conntrack_tcp_timeout_established";
/// Per-connection packet and byte counters (what accepted flows' bytes come from).
pub const ACCOUNTING_SYSCTL: &str = "sys/net/netfilter/nf_conntrack_acct";
/// What the VEN sets at start (spec: 8 hours).
pub const ESTABLISHED_TIMEOUT_S: u32 = 28800;
/// A sysctl value is one decimal number; anything longer is not what we expect.
const MAX_VALUE_BYTES: usize = 32;

fn path(proc_root: &Path) -> PathBuf {
    proc_root.join(ESTABLISHED_TIMEOUT_SYSCTL)
}

/// Sets the timeout of established TCP entries, in seconds, below `proc_root` (normally `/proc`).
/// Refuses 0, which would make the kernel forget every established connection at once. The
/// kernel refuses values it cannot represent (about 24 days at HZ=1000 and above).
pub fn set_established_timeout_in(proc_root: &Path, seconds: u32) -> Result<(), ConntrackError> {
    if seconds == 0 {
        return Err(ConntrackError::ZeroTimeout);
    }
    write_value(path(proc_root), &seconds.to_string())
}

/// Turns conntrack accounting on or off below `proc_root`; it applies to connections that
/// start afterwards.
pub fn set_accounting_in(proc_root: &Path, on: bool) -> Result<(), ConntrackError> {
    write_value(proc_root.join(ACCOUNTING_SYSCTL), if on { "1" } else { "0" })
}

fn write_value(path: PathBuf, value: &str) -> Result<(), ConntrackError> {
    let mut file = match std::fs::OpenOptions::new().write(true).truncate(true).open(&path) {
        Ok(file) => file,
        Err(cause) if cause.kind() == ErrorKind::NotFound => return Err(ConntrackError::NotLoaded { path }),
        Err(cause) => return Err(ConntrackError::Sysctl { path, cause }),
    };
    // One write: procfs parses what one write(2) carries.
    file.write_all(format!("{value}\n").as_bytes()).map_err(|cause| ConntrackError::Sysctl { path, cause })
}

/// Reads the timeout of established TCP entries, in seconds, below `proc_root`.
pub fn established_timeout_in(proc_root: &Path) -> Result<u32, ConntrackError> {
    let path = path(proc_root);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(cause) if cause.kind() == ErrorKind::NotFound => return Err(ConntrackError::NotLoaded { path }),
        Err(cause) => return Err(ConntrackError::Sysctl { path, cause }),
    };
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_VALUE_BYTES)]).into_owned();
    text.trim().parse().map_err(|_| ConntrackError::SysctlValue { path, value: text })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture(PathBuf);

    impl Fixture {
        fn new(name: &str, value: Option<&str>) -> Self {
            let root = std::env::temp_dir().join(format!("ven-conntrack-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            if let Some(value) = value {
                let file = path(&root);
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                std::fs::write(file, value).unwrap();
            }
            Self(root)
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn writes_and_reads_back() {
        let fixture = Fixture::new("rw", Some("432000\n"));
        assert_eq!(established_timeout_in(&fixture.0).unwrap(), 432000);
        set_established_timeout_in(&fixture.0, ESTABLISHED_TIMEOUT_S).unwrap();
        assert_eq!(std::fs::read_to_string(path(&fixture.0)).unwrap(), "28800\n");
        assert_eq!(established_timeout_in(&fixture.0).unwrap(), 28800);
    }

    #[test]
    fn absent_sysctl_means_conntrack_not_loaded() {
        let fixture = Fixture::new("absent", None);
        let error = set_established_timeout_in(&fixture.0, 60).unwrap_err();
        assert!(matches!(error, ConntrackError::NotLoaded { .. }), "{error}");
        assert!(error.to_string().contains("nf_conntrack"), "{error}");
        assert!(matches!(established_timeout_in(&fixture.0), Err(ConntrackError::NotLoaded { .. })));
    }

    #[test]
    fn refuses_zero_and_reports_garbage() {
        let fixture = Fixture::new("bad", Some("soon\n"));
        assert!(matches!(set_established_timeout_in(&fixture.0, 0), Err(ConntrackError::ZeroTimeout)));
        assert!(matches!(established_timeout_in(&fixture.0), Err(ConntrackError::SysctlValue { .. })));
    }
}
