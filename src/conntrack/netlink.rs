//! The real [`ConntrackTable`]: a NETLINK_NETFILTER socket speaking ctnetlink.
//!
//! A socket belongs to the network namespace of the thread that opened it, so every operation
//! opens its own socket on the calling thread: the table is the caller's namespace's. A fresh
//! socket per dump pass also means a pass that failed (ENOBUFS) leaves nothing queued behind for
//! the next one. Every receive has a timeout, so a kernel that never answers cannot hang the agent.

use std::time::Duration;

use nix::errno::Errno;

use crate::netlink::{NetfilterSocket, SocketError};

use super::wire::{self, Ack, DumpProgress, DumpReader};
use super::{Connection, ConntrackError, ConntrackTable, DeleteReport, DumpPass};

/// Receive buffer for one datagram. The kernel fills dump datagrams up to 32 KiB at most (its cap
/// on `max_recvmsg_len`); a larger datagram is reported as truncated, never misread.
pub const RECV_BUFFER_BYTES: usize = 32 * 1024;
/// Delete requests sent in one datagram; their ACKs (at most a few hundred bytes each) stay far
/// below the socket's receive buffer, so none is lost to ENOBUFS.
pub const DELETE_BATCH: usize = 64;
/// How long one receive waits for the kernel.
pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Datagrams from other sockets dropped in a row before giving up (they can only come from a
/// local process addressing our port id).
const MAX_FOREIGN_DATAGRAMS: usize = 64;
/// Families dumped: AF_UNSPEC returns IPv4 and IPv6 entries in one dump.
const DUMP_FAMILY: u8 = wire::AF_UNSPEC;

/// The conntrack table of the calling thread's network namespace, over ctnetlink.
#[derive(Debug, Default)]
pub struct Ctnetlink {
    _private: (),
}

impl Ctnetlink {
    pub fn new() -> Self {
        Self::default()
    }
}

impl ConntrackTable for Ctnetlink {
    fn dump(&mut self, visit: &mut dyn FnMut(Connection)) -> Result<DumpPass, ConntrackError> {
        let socket = Socket::open()?;
        let seq = 1;
        socket.send(&wire::dump_request(seq, DUMP_FAMILY), "dump")?;
        let mut reader = DumpReader::new(seq);
        let mut buffer = vec![0u8; RECV_BUFFER_BYTES];
        loop {
            let len = match socket.receive(&mut buffer, "dump") {
                Ok(len) => len,
                // The kernel dropped replies: this pass is incomplete, do it again.
                Err(ConntrackError::Socket { errno: Errno::ENOBUFS, .. }) => {
                    return Ok(DumpPass::Interrupted);
                }
                Err(error) => return Err(error),
            };
            if reader.feed(&buffer[..len], visit)? == DumpProgress::Done {
                break;
            }
        }
        Ok(if reader.interrupted() { DumpPass::Interrupted } else { DumpPass::Complete })
    }

    fn delete(&mut self, connections: &[Connection]) -> Result<DeleteReport, ConntrackError> {
        let mut report = DeleteReport::default();
        if connections.is_empty() {
            return Ok(report);
        }
        let socket = Socket::open()?;
        let mut request = Vec::new();
        let mut buffer = vec![0u8; RECV_BUFFER_BYTES];
        let mut seq: u32 = 0;
        for batch in connections.chunks(DELETE_BATCH) {
            // Sequence numbers first..first+len identify this batch's requests.
            let first = seq.wrapping_add(1);
            request.clear();
            for connection in batch {
                seq = seq.wrapping_add(1);
                wire::push_delete_request(&mut request, seq, connection);
            }
            socket.send(&request, "delete")?;
            let mut answered = [false; DELETE_BATCH];
            let mut pending = batch.len();
            while pending > 0 {
                let len = socket.receive(&mut buffer, "delete")?;
                wire::for_each_ack(&buffer[..len], &mut |ack: Ack| {
                    let index = ack.seq.wrapping_sub(first) as usize;
                    let Some(slot) = answered.get_mut(index).filter(|_| index < batch.len()) else {
                        return; // not one of ours
                    };
                    if std::mem::replace(slot, true) {
                        return; // a duplicate
                    }
                    pending -= 1;
                    match ack.error {
                        None => report.deleted += 1,
                        Some(Errno::ENOENT) => report.already_gone += 1,
                        Some(errno) => {
                            report.failed += 1;
                            report.first_error.get_or_insert(errno);
                        }
                    }
                })?;
            }
        }
        Ok(report)
    }
}

/// The shared netfilter socket, with this module's errors and its tolerance for datagrams from
/// other sockets.
struct Socket {
    inner: NetfilterSocket,
}

impl Socket {
    fn open() -> Result<Self, ConntrackError> {
        let inner = NetfilterSocket::open(RECEIVE_TIMEOUT).map_err(|e| socket_error(e, "open"))?;
        Ok(Self { inner })
    }

    fn send(&self, bytes: &[u8], operation: &'static str) -> Result<(), ConntrackError> {
        self.inner.send(bytes, operation).map_err(|e| socket_error(e, operation))
    }

    /// Receives one datagram from the kernel into `buffer`; returns its length. Datagrams from
    /// other sockets are dropped (a local process can address our port id), up to
    /// [`MAX_FOREIGN_DATAGRAMS`] in a row.
    fn receive(&self, buffer: &mut [u8], operation: &'static str) -> Result<usize, ConntrackError> {
        for _ in 0..=MAX_FOREIGN_DATAGRAMS {
            if let Some(len) =
                self.inner.receive(buffer, operation).map_err(|e| socket_error(e, operation))?
            {
                return Ok(len);
            }
        }
        Err(ConntrackError::Socket { operation, errno: Errno::EPROTO })
    }
}

fn socket_error(error: SocketError, operation: &'static str) -> ConntrackError {
    match error {
        SocketError::Os { operation, errno } => ConntrackError::Socket { operation, errno },
        SocketError::Timeout => ConntrackError::Timeout { operation, timeout: RECEIVE_TIMEOUT },
        SocketError::Truncated => ConntrackError::Malformed {
            what: "datagram larger than the receive buffer",
            offset: RECV_BUFFER_BYTES,
        },
    }
}
