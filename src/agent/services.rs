//! Listening services: which processes accept connections on this host (TCP sockets in LISTEN,
//! unconnected UDP sockets), with their process name, pid and user, for the PCE (the spec's
//! "active service reporting", every 30 seconds when it changed).
//!
//! Read from procfs under a root given by the caller (`/proc` on a host; a fixture in tests):
//! `net/{tcp,tcp6,udp,udp6}` for the sockets of the agent's network namespace, then each
//! process's `fd/` links (`socket:[INODE]`) for the owners. The owners are looked up only when
//! the set of sockets changed, so a quiet host costs four small reads per scan. At most
//! [`MAX_SERVICES`] are reported (counted beyond), and at most [`MAX_PROCESSES_SCANNED`]
//! processes are looked at.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

pub use ven_proto::ListeningService;

/// Most services one report carries; the rest are counted in `omitted`.
pub const MAX_SERVICES: usize = ven_proto::MAX_SERVICES_PER_REPORT;
/// Most processes whose descriptors one owner lookup reads.
pub const MAX_PROCESSES_SCANNED: usize = 4096;
/// Longest process or user name kept (the kernel's `comm` is 15 bytes).
const MAX_NAME_CHARS: usize = 32;
/// Socket states of /proc/net (include/net/tcp_states.h): TCP_LISTEN; an unconnected UDP
/// socket reads TCP_CLOSE (7).
const TCP_LISTEN: u8 = 0x0a;
const UDP_UNCONNECTED: u8 = 0x07;

/// One socket a service listens on, as /proc/net lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Socket {
    pub protocol: u8,
    pub address: IpAddr,
    pub port: u16,
    pub inode: u64,
}

/// Reads the listening sockets of the calling thread's network namespace, and the processes
/// that own them when the sockets changed since `previous`.
pub struct Scanner {
    proc_root: PathBuf,
    etc_passwd: PathBuf,
    sockets: BTreeSet<Socket>,
    services: Vec<ListeningService>,
    omitted: usize,
}

impl Scanner {
    /// `proc_root` is `/proc` on a host; `etc_passwd` maps uids to names.
    pub fn new(proc_root: impl Into<PathBuf>, etc_passwd: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
            etc_passwd: etc_passwd.into(),
            sockets: BTreeSet::new(),
            services: Vec::new(),
            omitted: 0,
        }
    }

    /// Scans again; `true` when the services changed (the report is then [`Self::services`]).
    pub fn scan(&mut self) -> bool {
        let mut sockets = BTreeSet::new();
        for (file, protocol, listening_state) in [
            ("tcp", 6, TCP_LISTEN),
            ("tcp6", 6, TCP_LISTEN),
            ("udp", 17, UDP_UNCONNECTED),
            ("udp6", 17, UDP_UNCONNECTED),
        ] {
            // A kernel without IPv6 has no tcp6: nothing listens there.
            if let Ok(text) = std::fs::read_to_string(self.proc_root.join("net").join(file)) {
                sockets.extend(parse_proc_net(&text, protocol, listening_state));
            }
        }
        if sockets == self.sockets {
            return false;
        }
        let inodes: BTreeSet<u64> = sockets.iter().map(|s| s.inode).collect();
        let owners = owners(&self.proc_root, &inodes);
        let users = users(&self.etc_passwd);
        let mut services: Vec<ListeningService> = sockets
            .iter()
            .map(|socket| {
                let owner = owners.get(&socket.inode);
                ListeningService {
                    protocol: socket.protocol,
                    address: socket.address,
                    port: socket.port,
                    process: owner.map(|o| o.name.clone()).unwrap_or_default(),
                    pid: owner.map_or(0, |o| o.pid),
                    user: owner
                        .map(|o| users.get(&o.uid).cloned().unwrap_or_else(|| o.uid.to_string()))
                        .unwrap_or_default(),
                }
            })
            .collect();
        services.sort();
        services.dedup();
        self.omitted = services.len().saturating_sub(MAX_SERVICES);
        services.truncate(MAX_SERVICES);
        self.sockets = sockets;
        let changed = services != self.services;
        self.services = services;
        changed
    }

    pub fn services(&self) -> &[ListeningService] {
        &self.services
    }

    /// Services left out of the report for [`MAX_SERVICES`].
    pub fn omitted(&self) -> usize {
        self.omitted
    }
}

/// The listening sockets of one /proc/net table (`protocol` 6 or 17); malformed lines are
/// skipped.
pub fn parse_proc_net(text: &str, protocol: u8, listening_state: u8) -> Vec<Socket> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _slot = fields.next()?;
            let local = fields.next()?;
            let remote = fields.next()?;
            let state = u8::from_str_radix(fields.next()?, 16).ok()?;
            if state != listening_state {
                return None;
            }
            // UDP: only sockets with no peer (a connected socket is a client).
            if protocol == 17 && parse_endpoint(remote)?.1 != 0 {
                return None;
            }
            let inode = fields.nth(5)?.parse::<u64>().ok()?;
            let (address, port) = parse_endpoint(local)?;
            (inode != 0).then_some(Socket { protocol, address, port, inode })
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits (IPv6), each 32-bit word in host byte order as the
/// kernel prints it, then the port in hex.
fn parse_endpoint(text: &str) -> Option<(IpAddr, u16)> {
    let (address, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(|w| w.to_ne_bytes());
    let address = match address.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(address)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(address.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some((address, port))
}

struct Owner {
    pid: u32,
    name: String,
    uid: u32,
}

/// The process owning each inode, from the `socket:[INODE]` links under `proc_root/PID/fd`.
fn owners(proc_root: &Path, inodes: &BTreeSet<u64>) -> HashMap<u64, Owner> {
    let mut found = HashMap::new();
    let Ok(entries) = std::fs::read_dir(proc_root) else { return found };
    let pids = entries.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok());
    for pid in pids.take(MAX_PROCESSES_SCANNED) {
        if found.len() == inodes.len() {
            break;
        }
        let process = proc_root.join(pid.to_string());
        // The process may end meanwhile: whatever cannot be read is skipped.
        let Ok(fds) = std::fs::read_dir(process.join("fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else { continue };
            let Some(inode) = socket_inode(&target) else { continue };
            if inodes.contains(&inode) && !found.contains_key(&inode) {
                found.insert(inode, Owner { pid, name: process_name(&process), uid: process_uid(&process) });
            }
        }
    }
    found
}

fn socket_inode(target: &Path) -> Option<u64> {
    target.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

fn process_name(process: &Path) -> String {
    let comm = std::fs::read_to_string(process.join("comm")).unwrap_or_default();
    comm.trim_end_matches('\n').chars().take(MAX_NAME_CHARS).collect()
}

fn process_uid(process: &Path) -> u32 {
    let status = std::fs::read_to_string(process.join("status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_whitespace().next()?.parse().ok())
        .unwrap_or(u32::MAX)
}

/// uid -> name from an /etc/passwd file (missing or unreadable: no names).
fn users(passwd: &Path) -> HashMap<u32, String> {
    let text = std::fs::read_to_string(passwd).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let uid = fields.nth(1)?.parse().ok()?;
            Some((uid, name.chars().take(MAX_NAME_CHARS).collect()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured on the development machine: `head -4 /proc/net/tcp`, `/proc/net/tcp6`, `udp`.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 52 1 00000000e1101ded 100 0 0 10 0
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4711 1 00000000e1101ded 100 0 0 10 0
   2: 020200C0:B70E 507100CB:01BB 01 00000000:00000000 00:00000000 00000000     0        0 5890291 1 0000000017b0b50a 20 4 25 76 146
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 901 1 0000000000000000 100 0 0 10 0
";
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  10: 00000000:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 777 2 0000000000000000 0
  11: 020200C0:E0A5 08080808:0035 01 00000000:00000000 00:00000000 00000000     0        0 778 2 0000000000000000 0
";

    #[test]
    fn listening_tcp_sockets_are_read_and_connections_left_out() {
        let sockets = parse_proc_net(TCP, 6, TCP_LISTEN);
        assert_eq!(
            sockets,
            [
                Socket { protocol: 6, address: "0.0.0.0".parse().unwrap(), port: 2024, inode: 52 },
                Socket { protocol: 6, address: "127.0.0.1".parse().unwrap(), port: 8080, inode: 4711 },
            ]
        );
        let v6 = parse_proc_net(TCP6, 6, TCP_LISTEN);
        assert_eq!(v6, [Socket { protocol: 6, address: "::1".parse().unwrap(), port: 22, inode: 901 }]);
    }

    #[test]
    fn only_unconnected_udp_sockets_are_services() {
        let sockets = parse_proc_net(UDP, 17, UDP_UNCONNECTED);
        assert_eq!(
            sockets,
            [Socket { protocol: 17, address: "0.0.0.0".parse().unwrap(), port: 68, inode: 777 }]
        );
    }

    #[test]
    fn malformed_lines_are_skipped_not_fatal() {
        let text = "header\n garbage\n 1: 0100007F:ZZZZ 00000000:0000 0A 0 0 0 0 0 5\n 2: 01:02 0:0 0A a b c d e 6\n";
        assert!(parse_proc_net(text, 6, TCP_LISTEN).is_empty());
        assert!(parse_proc_net("", 6, TCP_LISTEN).is_empty());
    }

    #[test]
    fn the_scan_finds_this_process_listening_with_its_name_and_user() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut scanner = Scanner::new("/proc", "/etc/passwd");
        assert!(scanner.scan(), "the first scan reports");
        let ours = scanner
            .services()
            .iter()
            .find(|s| s.port == port && s.protocol == 6)
            .unwrap_or_else(|| panic!("port {port} not found in {:#?}", scanner.services()));
        assert_eq!(ours.pid, std::process::id());
        assert_eq!(ours.address, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert!(!ours.process.is_empty());
        let uid = nix::unistd::getuid().as_raw();
        assert!(ours.user == "root" || ours.user == uid.to_string(), "user {}", ours.user);
        drop(listener);
        // Its end is a change.
        assert!(scanner.scan(), "a service gone is a change");
        assert!(!scanner.services().iter().any(|s| s.port == port && s.pid == std::process::id()));
    }
}
