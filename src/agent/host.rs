//! What the VEN reports about its host: name, OS, interfaces and their addresses.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ven_proto::{HostReport, Interface, IpNet};

pub fn system_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Whether the PCE will take `name` as this host's name: RFC 1123, as the PCE checks it
/// (`crates/pce/src/venapi.rs`, `check_hostname`): dot-separated labels of ASCII letters, digits
/// and hyphens, each of 1 to 63 bytes and neither starting nor ending with a hyphen; 253 bytes
/// at most. The error says what is wrong.
pub fn check_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err("a host name has 1 to 253 bytes (RFC 1123)".to_string());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each dot-separated label has 1 to 63 bytes (RFC 1123)".to_string());
        }
        if let Some(c) = label.chars().find(|c| !c.is_ascii_alphanumeric() && *c != '-') {
            return Err(format!("{c:?} is not a letter, digit, hyphen or dot (RFC 1123)"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label neither starts nor ends with a hyphen (RFC 1123)".to_string());
        }
    }
    Ok(())
}

/// Seconds since the host booted (`/proc/uptime`'s first field), `None` when unreadable.
pub fn uptime_s() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    parse_uptime(&text)
}

fn parse_uptime(text: &str) -> Option<u64> {
    let seconds: f64 = text.split_ascii_whitespace().next()?.parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then_some(seconds as u64)
}

pub fn report(hostname: &str) -> HostReport {
    HostReport {
        hostname: hostname.to_string(),
        os: os_description(),
        agent_version: super::upgrade::agent_version().to_string(),
        interfaces: interfaces(),
    }
}

fn os_description() -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{} {} {}", std::env::consts::OS, release.trim(), std::env::consts::ARCH)
}

/// Interfaces with their addresses, sorted by name; loopback and link-local addresses are left
/// out because no peer can use them in a policy.
pub fn interfaces() -> Vec<Interface> {
    let mut by_name: BTreeMap<String, Vec<IpNet>> = BTreeMap::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    for ifaddr in addrs {
        let (Some(address), Some(netmask)) = (ifaddr.address, ifaddr.netmask) else { continue };
        let (ip, prefix) = if let (Some(a), Some(m)) = (address.as_sockaddr_in(), netmask.as_sockaddr_in()) {
            (IpAddr::V4(a.ip()), u32::from(m.ip()).count_ones() as u8)
        } else if let (Some(a), Some(m)) = (address.as_sockaddr_in6(), netmask.as_sockaddr_in6()) {
            (IpAddr::V6(a.ip()), u128::from(m.ip()).count_ones() as u8)
        } else {
            continue;
        };
        if !reportable(ip) {
            continue;
        }
        if let Ok(net) = IpNet::new(ip, prefix) {
            by_name.entry(ifaddr.interface_name).or_default().push(net);
        }
    }
    by_name
        .into_iter()
        .map(|(name, mut addresses)| {
            addresses.sort();
            Interface { name, addresses }
        })
        .collect()
}

/// Every address of this host, loopback and link-local included (what a connection's local end
/// can be).
pub fn local_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    let mut local: Vec<IpAddr> = addrs
        .filter_map(|ifaddr| ifaddr.address)
        .filter_map(|address| {
            address
                .as_sockaddr_in()
                .map(|a| IpAddr::V4(a.ip()))
                .or_else(|| address.as_sockaddr_in6().map(|a| IpAddr::V6(a.ip())))
        })
        .collect();
    local.sort();
    local.dedup();
    local
}

fn reportable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_unspecified(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_is_the_first_field_of_proc_uptime() {
        assert_eq!(parse_uptime("350735.47 234388.90\n"), Some(350_735));
        for bad in ["", "-1 2", "nan 1", "x 1"] {
            assert_eq!(parse_uptime(bad), None, "{bad:?}");
        }
        assert!(uptime_s().is_some_and(|s| s > 0));
    }

    #[test]
    fn loopback_and_link_local_are_not_reported() {
        assert!(!reportable("127.0.0.1".parse().unwrap()));
        assert!(!reportable("::1".parse().unwrap()));
        assert!(!reportable("fe80::1".parse().unwrap()));
        assert!(reportable("198.18.0.2".parse().unwrap()));
        assert!(reportable("2001:db8::2".parse().unwrap()));
    }

    #[test]
    fn hostnames_the_pce_refuses_are_named_with_the_reason() {
        for good in ["web", "web-01.example.com", "1host"] {
            assert_eq!(check_hostname(good), Ok(()), "{good:?}");
        }
        let why = check_hostname("web_01").unwrap_err();
        assert!(why.contains("'_'") && why.contains("RFC 1123"), "{why}");
        for bad in ["", "web\x1b[31m", "a\nb", "x\u{202e}y", "-web", "a..b", &"a".repeat(64)] {
            assert!(check_hostname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_report_never_lists_loopback() {
        let report = report("web");
        assert_eq!(report.hostname, "web");
        assert!(report.interfaces.iter().all(|i| i.name != "lo"));
    }
}
