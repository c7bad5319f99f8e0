//! `ven check-env`: whether this host can run the agent, one line per check with `ok`, `warn` or
//! `fail` and, when not ok, a hint. The exit status is non-zero when a check failed.
//!
//! Checks: the kernel's netfilter pieces (iptables in the chosen backend, ipset with the hash:net
//! type over netlink, NFLOG, conntrack, network namespaces), the tools' versions, the sysctls the
//! agent sets or relies on, the data directory (private, room for the log caps), the clock, and
//! when activated, the PCE: both ports reached, and a TLS handshake that verifies against the
//! pinned CA.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::config::Config;
use crate::state::{self, DataDir, Identity, RecordKind};

/// How long one network check waits.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(3);
use crate::clock::EARLIEST_SANE_CLOCK;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "fail",
        }
    }
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub verdict: Verdict,
    pub name: String,
    pub detail: String,
    /// What to do about it (empty when ok).
    pub hint: String,
}

fn check(verdict: Verdict, name: &'static str, detail: impl Into<String>, hint: &str) -> Check {
    Check {
        verdict,
        name: name.into(),
        detail: detail.into(),
        hint: if verdict == Verdict::Ok { String::new() } else { hint.into() },
    }
}

/// The first line a program prints for `--version` (or `-V`), if it runs.
fn tool_version(program: &Path) -> Option<String> {
    for flag in ["--version", "-V"] {
        if let Ok(out) = Command::new(program).arg(flag).output() {
            if out.status.success() {
                let text = String::from_utf8_lossy(&out.stdout);
                return Some(text.lines().next().unwrap_or_default().trim().to_string());
            }
        }
    }
    None
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|text| text.trim().to_string())
}

/// Whether a kernel module is there (loaded, or built in: its /sys/module entry exists).
fn module_present(name: &str) -> bool {
    Path::new("/sys/module").join(name).exists()
}

/// Every check, in order.
pub fn run(data: &DataDir, config: &Config) -> Vec<Check> {
    let mut checks = Vec::new();
    let tools = crate::firewall::backend::select(config.firewall_backend);

    // The firewall tools and the kernel behind them.
    match tool_version(&tools.iptables_restore) {
        Some(version) => checks.push(check(
            Verdict::Ok,
            "iptables",
            format!("backend {}: {version}", tools.backend.as_str()),
            "",
        )),
        None => checks.push(check(
            Verdict::Fail,
            "iptables",
            format!("{} does not run", tools.iptables_restore.display()),
            "install iptables (OpenWrt: iptables-nft)",
        )),
    }
    if config.ipv6 {
        let ip6 = tool_version(&tools.ip6tables_restore);
        checks.push(match ip6 {
            Some(version) => check(Verdict::Ok, "ip6tables", version, ""),
            None => check(Verdict::Warn, "ip6tables", "not found", "install ip6tables, or set ipv6 = false"),
        });
    }
    match tool_version(&tools.ipset) {
        Some(version) => checks.push(check(Verdict::Ok, "ipset", version, "")),
        None => checks.push(check(Verdict::Fail, "ipset", "the ipset tool does not run", "install ipset")),
    }
    checks.push(match crate::firewall::kernel_set_sizes() {
        Ok(sizes) => check(
            Verdict::Ok,
            "ipset kernel",
            format!("answers over netlink ({} of our sets)", sizes.len()),
            "",
        ),
        Err(e) => check(
            Verdict::Warn,
            "ipset kernel",
            e,
            "load ip_set and ip_set_hash_net (kmod-ipt-ipset); checks fall back to `ipset list -t`",
        ),
    });
    let nflog = module_present("nfnetlink_log") || read_trimmed("/proc/net/netfilter/nf_log").is_some();
    checks.push(if nflog {
        check(Verdict::Ok, "NFLOG", "nfnetlink_log present", "")
    } else {
        check(
            Verdict::Warn,
            "NFLOG",
            "nfnetlink_log not loaded",
            "modprobe nfnetlink_log (kmod-nfnetlink-log): flows are not recorded without it",
        )
    });
    checks.push(match read_trimmed("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established") {
        Some(value) => {
            let set = match config.conntrack_established_timeout {
                Some(wanted) if wanted.to_string() != value => format!(" (the agent sets {wanted} at start)"),
                _ => String::new(),
            };
            check(
                Verdict::Ok,
                "conntrack",
                format!("nf_conntrack_tcp_timeout_established = {value}{set}"),
                "",
            )
        }
        None => check(
            Verdict::Fail,
            "conntrack",
            "nf_conntrack is not loaded",
            "modprobe nf_conntrack (kmod-nf-conntrack)",
        ),
    });
    if config.routes {
        let forwarding = read_trimmed("/proc/sys/net/ipv4/ip_forward");
        checks.push(if forwarding.as_deref() == Some("1") {
            check(Verdict::Ok, "forwarding", "net.ipv4.ip_forward = 1", "")
        } else {
            check(
                Verdict::Warn,
                "forwarding",
                "routes = true but net.ipv4.ip_forward is off",
                "sysctl net.ipv4.ip_forward=1, or set routes = false",
            )
        });
    }
    checks.push(if Path::new("/proc/self/ns/net").exists() {
        check(Verdict::Ok, "namespaces", "network namespaces available", "")
    } else {
        check(Verdict::Warn, "namespaces", "no /proc/self/ns/net", "only one agent per host without them")
    });

    // The data directory and its room.
    // Checked, never created: a check changes nothing on the host.
    let root = data.root();
    checks.push(if !root.exists() {
        check(
            Verdict::Warn,
            "data directory",
            format!("{} does not exist yet", root.display()),
            "it is created at activation",
        )
    } else {
        match state::check_private(root) {
            Ok(()) => check(Verdict::Ok, "data directory", root.display().to_string(), ""),
            Err(e) => check(
                Verdict::Fail,
                "data directory",
                e.to_string(),
                "fix its owner and mode, or set VEN_DATA_DIR",
            ),
        }
    });
    let existing = root.ancestors().find(|dir| dir.exists()).unwrap_or(Path::new("/"));
    if let Ok(stats) = nix::sys::statvfs::statvfs(existing) {
        // The casts widen on 32-bit boards (c_ulong is u32 there) and do nothing on 64-bit ones.
        #[allow(clippy::unnecessary_cast)]
        let free = stats.blocks_available() as u64 * stats.fragment_size() as u64;
        let caps = config.logs.total_max_bytes;
        let detail =
            format!("{} MB free, logs and flows capped at {} MB", free / 1_000_000, caps / 1_000_000);
        checks.push(if free >= caps {
            check(Verdict::Ok, "free space", detail, "")
        } else {
            check(
                Verdict::Warn,
                "free space",
                detail,
                "lower log_total_max_bytes, or free space: stores stop growing when the disk is full",
            )
        });
    }

    // The clock: TLS needs it.
    let now = crate::clock::now();
    checks.push(if now >= EARLIEST_SANE_CLOCK {
        check(Verdict::Ok, "clock", crate::clock::rfc3339(now), "")
    } else {
        check(
            Verdict::Fail,
            "clock",
            crate::clock::rfc3339(now),
            "set the clock (NTP): certificates cannot be checked",
        )
    });

    // The PCE, when paired.
    match state::read_record::<Identity>(&data.identity_path(), RecordKind::Identity) {
        Ok(Some(identity)) => checks.extend(pce_checks(&identity)),
        Ok(None) => {
            checks.push(check(Verdict::Warn, "PCE", "not activated", "ven activate --management-server ..."))
        }
        Err(e) => checks.push(check(Verdict::Fail, "PCE", e.to_string(), "re-activate")),
    }
    checks
}

/// Both ports reached, and the VEN API's TLS handshake verified against the pinned CA.
pub(super) fn pce_checks(identity: &Identity) -> Vec<Check> {
    let mut checks = Vec::new();
    let server = &identity.management_server;
    match handshake(server, &identity.ca_cert_der) {
        Ok(()) => checks.push(check(
            Verdict::Ok,
            "PCE API",
            format!("{server}: TLS 1.3, certificate verified by the pinned CA"),
            "",
        )),
        Err(e) => checks.push(check(
            Verdict::Fail,
            "PCE API",
            format!("{server}: {e}"),
            "check the route and firewall to the PCE, and the PCE's certificate",
        )),
    }
    let host = server.rsplit_once(':').map_or(server.as_str(), |(host, _)| host);
    match crate::agent::tls::connect(host, identity.event_port, NETWORK_TIMEOUT) {
        Ok(_) => checks.push(check(
            Verdict::Ok,
            "PCE events",
            format!("{host}:{} reached", identity.event_port),
            "",
        )),
        Err(e) => checks.push(check(
            Verdict::Fail,
            "PCE events",
            e.to_string(),
            "without it policy changes wait for the next heartbeat",
        )),
    }
    checks
}

fn handshake(server: &str, ca_der: &[u8]) -> Result<(), String> {
    use crate::agent::tls;
    let (name, port) = tls::split_server(server).map_err(|e| e.to_string())?;
    let host = server.rsplit_once(':').map_or(server, |(host, _)| host);
    let mut tcp = tls::connect(host, port, NETWORK_TIMEOUT).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(NETWORK_TIMEOUT)).map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(NETWORK_TIMEOUT)).map_err(|e| e.to_string())?;
    let config = tls::client_config(ca_der).map_err(|e| e.to_string())?;
    let mut connection = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    while connection.is_handshaking() {
        connection.complete_io(&mut tcp).map_err(|e| format!("TLS handshake: {e}"))?;
    }
    Ok(())
}

/// The report as printed: one line per check; the worst verdict decides the exit status.
pub fn render(checks: &[Check]) -> String {
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for c in checks {
        out.push_str(&format!("{:<4}  {:<width$}  {}", c.verdict.as_str(), c.name, c.detail));
        if !c.hint.is_empty() {
            out.push_str(&format!("\n      {:<width$}  hint: {}", "", c.hint));
        }
        out.push('\n');
    }
    let failed = checks.iter().filter(|c| c.verdict == Verdict::Fail).count();
    let warned = checks.iter().filter(|c| c.verdict == Verdict::Warn).count();
    out.push_str(&format!("{} checks: {failed} failed, {warned} warnings\n", checks.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_gives_hints_only_where_something_is_wrong() {
        let checks = [
            check(Verdict::Ok, "clock", "2026-12-07T00:00:00Z", "set the clock"),
            check(Verdict::Fail, "ipset", "the ipset tool does not run", "install ipset"),
        ];
        let text = render(&checks);
        assert!(text.contains("ok    clock"));
        assert!(!text.contains("set the clock"), "no hint for a passing check: {text}");
        assert!(text.contains("fail  ipset") && text.contains("hint: install ipset"), "{text}");
        assert!(text.ends_with("2 checks: 1 failed, 0 warnings\n"), "{text}");
    }
}
