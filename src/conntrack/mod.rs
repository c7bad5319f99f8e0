//! conntrack: the established-connection timeout, and cutting the connections a tightened policy
//! no longer allows.
//!
//! The firewall only judges new connections (its chains accept ESTABLISHED first), so removing an
//! allow would leave open connections running. After such a policy change, [`cut_disallowed`]
//! dumps the kernel's conntrack table over ctnetlink, judges every entry with [`allowed`] and
//! deletes the rest; their next packet is then NEW and meets the new rules.
//!
//! - [`sysctl`]: `net.netfilter.nf_conntrack_tcp_timeout_established` (the VEN sets 28800 s).
//! - `wire`: the ctnetlink format, by hand; the decoder is zero-panic on any input (fuzzed).
//! - `netlink`: the socket ([`Ctnetlink`], the real [`ConntrackTable`]).
//! - `policy`: which connections stay ([`allowed`]).
//!
//! Guarantees: memory is bounded (one receive buffer, [`RECV_BUFFER_BYTES`]; at most
//! [`MAX_CUT_ENTRIES`] entries judged per cut, the rest counted); a cut never deletes an entry the
//! policy allows, never one of the management channel or a fail-safe service, and never touches
//! forwarded traffic. Everything acts on the calling thread's network namespace.

mod netlink;
mod policy;
pub mod sysctl;
mod wire;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;

pub use netlink::{Ctnetlink, DELETE_BATCH, RECEIVE_TIMEOUT, RECV_BUFFER_BYTES};
pub use sysctl::{ESTABLISHED_TIMEOUT_S, established_timeout_in, set_established_timeout_in};
pub use wire::{
    Ack, DumpProgress, DumpReader, NFNLGRP_CONNTRACK_DESTROY, Totals, for_each_ack, for_each_destroyed,
    parse_connection, push_delete_request,
};

/// Most conntrack entries one cut judges; entries past it are counted in
/// [`CutSummary::skipped_over_cap`], not stored. Also bounds the entries one cut deletes.
pub const MAX_CUT_ENTRIES: usize = 262_144;
/// Dumps tried before giving up on a table that keeps changing under the dump (NLM_F_DUMP_INTR).
pub const MAX_DUMP_ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("{path} is absent: nf_conntrack is not loaded in this network namespace")]
    NotLoaded { path: PathBuf },
    #[error("sysctl {path}: {cause}")]
    Sysctl { path: PathBuf, cause: std::io::Error },
    #[error("sysctl {path} holds {value:?}, not a number of seconds")]
    SysctlValue { path: PathBuf, value: String },
    #[error("refusing a conntrack timeout of 0 s (the kernel would drop every established entry)")]
    ZeroTimeout,
    #[error("ctnetlink socket ({operation}): {errno}")]
    Socket { operation: &'static str, errno: Errno },
    #[error("no answer from the kernel to ctnetlink {operation} within {timeout:?}")]
    Timeout { operation: &'static str, timeout: Duration },
    #[error("malformed ctnetlink message: {what} (byte {offset})")]
    Malformed { what: &'static str, offset: usize },
    #[error("the kernel refused ctnetlink {operation}: {errno}")]
    Kernel { operation: &'static str, errno: Errno },
    #[error("the conntrack table changed during each of {attempts} dumps; try again later")]
    DumpInterrupted { attempts: u32 },
    #[error(
        "deleting {failed} of {requested} conntrack entries failed (first error: {first}); {deleted} deleted"
    )]
    Delete { requested: usize, deleted: usize, failed: usize, first: Errno },
}

/// One conntrack entry, by its original tuple (the direction of the first packet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, ...).
    pub protocol: u8,
    /// Both addresses are of one family (the decoder refuses anything else).
    pub original_src: IpAddr,
    pub original_dst: IpAddr,
    /// Present for protocols with ports (TCP, UDP, SCTP, DCCP, UDP-Lite; GRE keys likewise).
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
    /// Present for ICMP and ICMPv6.
    pub icmp: Option<Icmp>,
    /// CTA_ZONE, present when the entry is not in the default zone.
    pub zone: Option<u16>,
    /// CTA_ID: the kernel's id of this entry; a delete naming it spares a newer entry that
    /// reuses the tuple.
    pub id: Option<u32>,
}

/// The ICMP part of a tuple (the kernel needs all three to find the entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Icmp {
    pub id: u16,
    /// ICMP type.
    pub kind: u8,
    pub code: u8,
}

impl Connection {
    /// The nfgenmsg family of this entry.
    pub fn family(&self) -> u8 {
        if self.original_src.is_ipv4() { wire::AF_INET } else { wire::AF_INET6 }
    }
}

/// What stays allowed when the cut decides (mirrors the firewall's safeguards).
pub struct CutInput<'a> {
    /// The NEW policy.
    pub policy: &'a ven_proto::Policy,
    /// Addresses of this host (all interfaces).
    pub local_addresses: Vec<IpAddr>,
    /// PCE endpoints: connections to/from them are never cut.
    pub management: Vec<SocketAddr>,
    /// Board fail-safe services (inbound ports), never cut.
    pub failsafe_inbound: Vec<(ven_proto::Protocol, u16)>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CutSummary {
    /// Entries judged (at most [`MAX_CUT_ENTRIES`]).
    pub examined: usize,
    /// Entries the kernel deleted (entries already gone when deleted are not counted).
    pub deleted: usize,
    /// Entries past [`MAX_CUT_ENTRIES`], neither judged nor stored.
    pub skipped_over_cap: usize,
}

/// The kernel seam: one network namespace's conntrack table. The real one is [`Ctnetlink`].
pub trait ConntrackTable {
    /// Walks the table once, handing every entry to `visit`. [`DumpPass::Interrupted`] means the
    /// entries seen may be incomplete or repeated (the kernel flagged NLM_F_DUMP_INTR or dropped
    /// replies); the caller walks again.
    fn dump(&mut self, visit: &mut dyn FnMut(Connection)) -> Result<DumpPass, ConntrackError>;
    /// Deletes each entry by its original tuple (and zone, and id). Entries already gone are
    /// counted, not failures.
    fn delete(&mut self, connections: &[Connection]) -> Result<DeleteReport, ConntrackError>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DumpPass {
    Complete,
    Interrupted,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeleteReport {
    pub deleted: usize,
    /// ENOENT: the entry ended (or was deleted) between the dump and the delete.
    pub already_gone: usize,
    pub failed: usize,
    pub first_error: Option<Errno>,
}

/// Sets `net.netfilter.nf_conntrack_tcp_timeout_established` of the calling thread's network
/// namespace. [`ConntrackError::NotLoaded`] when nf_conntrack is not loaded (the VEN does not load
/// kernel modules).
pub fn set_established_timeout(seconds: u32) -> Result<(), ConntrackError> {
    set_established_timeout_in(Path::new("/proc"), seconds)
}

/// Sets `net.netfilter.nf_conntrack_acct` of the calling thread's namespace.
pub fn set_accounting(on: bool) -> Result<(), ConntrackError> {
    sysctl::set_accounting_in(Path::new("/proc"), on)
}

/// Reads `net.netfilter.nf_conntrack_tcp_timeout_established` of the calling thread's namespace.
pub fn established_timeout() -> Result<u32, ConntrackError> {
    established_timeout_in(Path::new("/proc"))
}

/// Whether the policy in `input` still allows `connection`:
/// - not enforced: everything is allowed (nothing is cut);
/// - a loopback address on either end, or both ends local: allowed (the firewall accepts lo);
/// - the original destination local: inbound (peer = source); the original source local:
///   outbound (peer = destination); neither: forwarded, allowed (not ours to cut);
/// - TCP with a management endpoint as the peer (outbound: its destination port; inbound: its
///   source port): allowed; inbound to a fail-safe service (protocol, destination port): allowed;
/// - any custom rule that may ACCEPT in the connection's direction and family: allowed (the VEN
///   cannot evaluate the operator's iptables text, so it keeps the connection);
/// - otherwise allowed iff a rule of that direction matches peer (any, or a member of the rule's
///   set, networks included), protocol (ICMP is ICMPv6 on IPv6) and, for TCP and UDP rules with
///   ports, the destination port.
///
/// Compiles the input on each call; [`cut_disallowed`] compiles it once per cut.
pub fn allowed(input: &CutInput, connection: &Connection) -> bool {
    policy::Evaluator::new(input).allowed(connection)
}

/// Deletes the conntrack entries of the calling thread's network namespace that the policy in
/// `input` no longer allows (see [`allowed`]). Does nothing unless the policy is enforced.
pub fn cut_disallowed(input: &CutInput) -> Result<CutSummary, ConntrackError> {
    cut_disallowed_in(&mut Ctnetlink::new(), input)
}

/// [`cut_disallowed`] on any table.
pub fn cut_disallowed_in(
    table: &mut dyn ConntrackTable,
    input: &CutInput,
) -> Result<CutSummary, ConntrackError> {
    if input.policy.state != ven_proto::PolicyState::Enforced {
        return Ok(CutSummary::default());
    }
    let evaluator = policy::Evaluator::new(input);
    let (summary, doomed) = consistent_dump(
        table,
        || (CutSummary::default(), Vec::new()),
        |(summary, doomed), connection| {
            if summary.examined == MAX_CUT_ENTRIES {
                summary.skipped_over_cap += 1;
                return;
            }
            summary.examined += 1;
            if !evaluator.allowed(&connection) {
                doomed.push(connection);
            }
        },
    )?;
    if summary.skipped_over_cap > 0 {
        log::warn!(
            "conntrack: {} entries past the cap of {MAX_CUT_ENTRIES} were not judged",
            summary.skipped_over_cap
        );
    }
    let report = table.delete(&doomed)?;
    log::debug!(
        "conntrack: {} examined, {} disallowed, {} deleted, {} already gone",
        summary.examined,
        doomed.len(),
        report.deleted,
        report.already_gone
    );
    if let Some(first) = report.first_error {
        return Err(ConntrackError::Delete {
            requested: doomed.len(),
            deleted: report.deleted,
            failed: report.failed,
            first,
        });
    }
    Ok(CutSummary { deleted: report.deleted, ..summary })
}

/// Up to `limit` entries of the calling thread's namespace, and how many more there were.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionList {
    pub connections: Vec<Connection>,
    pub over_limit: usize,
}

/// Lists the conntrack table of the calling thread's network namespace (at most `limit`
/// entries are stored).
pub fn list_connections(limit: usize) -> Result<ConnectionList, ConntrackError> {
    list_connections_in(&mut Ctnetlink::new(), limit)
}

/// [`list_connections`] on any table.
pub fn list_connections_in(
    table: &mut dyn ConntrackTable,
    limit: usize,
) -> Result<ConnectionList, ConntrackError> {
    consistent_dump(table, ConnectionList::default, |list, connection| {
        if list.connections.len() < limit {
            list.connections.push(connection);
        } else {
            list.over_limit += 1;
        }
    })
}

/// Dumps until a pass completes uninterrupted (at most [`MAX_DUMP_ATTEMPTS`]), starting each pass
/// from `fresh()` so that an interrupted pass leaves nothing behind.
fn consistent_dump<T>(
    table: &mut dyn ConntrackTable,
    fresh: impl Fn() -> T,
    mut visit: impl FnMut(&mut T, Connection),
) -> Result<T, ConntrackError> {
    for attempt in 1..=MAX_DUMP_ATTEMPTS {
        let mut state = fresh();
        match table.dump(&mut |connection| visit(&mut state, connection))? {
            DumpPass::Complete => return Ok(state),
            DumpPass::Interrupted => log::debug!("conntrack: dump {attempt} interrupted, dumping again"),
        }
    }
    Err(ConntrackError::DumpInterrupted { attempts: MAX_DUMP_ATTEMPTS })
}

#[cfg(test)]
mod tests;
