//! What every hand-written netfilter netlink client here shares: the message header constants
//! and a NETLINK_NETFILTER socket with a receive timeout (conntrack's ctnetlink, the nf_tables
//! generation; the flow pipeline's NFLOG reader).
//!
//! A socket belongs to the network namespace of the thread that opened it. Every receive has a
//! timeout, so a kernel that never answers cannot hang the agent; datagrams from other sockets
//! are reported as such (a local process can address our port id), and a datagram larger than
//! the caller's buffer is an error, never a partial read.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, getsockopt, recvmsg,
    sendto, setsockopt, socket, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike as _};

// Netlink message header (linux/netlink.h).
pub(crate) const NLMSG_HDR_LEN: usize = 16;
pub(crate) const NLMSG_ALIGN: usize = 4;
pub(crate) const NLMSG_NOOP: u16 = 1;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
pub(crate) const NLMSG_OVERRUN: u16 = 4;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
/// The kernel's netlink port id.
pub(crate) const KERNEL_PORT: u32 = 0;

/// Why a socket operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SocketError {
    /// A system call failed: which one, and its errno.
    Os { operation: &'static str, errno: Errno },
    /// Nothing arrived within the receive timeout.
    Timeout,
    /// A datagram did not fit the caller's buffer.
    Truncated,
}

/// The receive buffer a socket got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReceiveBuffer {
    /// Set with SO_RCVBUFFORCE (else SO_RCVBUF, capped by `net.core.rmem_max`).
    pub(crate) forced: bool,
    /// Bytes, as SO_RCVBUF reads back.
    pub(crate) granted: usize,
}

/// A bound NETLINK_NETFILTER socket with a receive timeout.
pub(crate) struct NetfilterSocket {
    fd: OwnedFd,
}

impl NetfilterSocket {
    /// Opens and binds a socket in the calling thread's network namespace (port id assigned by
    /// the kernel).
    pub(crate) fn open(receive_timeout: Duration) -> Result<Self, SocketError> {
        Self::open_subscribed(receive_timeout, 0)
    }

    /// [`NetfilterSocket::open`], also a member of the multicast `groups` (a bit mask: group N
    /// is bit N - 1), whose messages the kernel sends without being asked.
    pub(crate) fn open_subscribed(receive_timeout: Duration, groups: u32) -> Result<Self, SocketError> {
        let os = |operation| move |errno| SocketError::Os { operation, errno };
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(os("socket"))?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups)).map_err(os("bind"))?;
        let timeout = TimeVal::milliseconds(i64::try_from(receive_timeout.as_millis()).unwrap_or(i64::MAX));
        setsockopt(&fd, sockopt::ReceiveTimeout, &timeout).map_err(os("setsockopt SO_RCVTIMEO"))?;
        Ok(Self { fd })
    }

    /// Asks for a receive buffer of `bytes`: SO_RCVBUFFORCE (past `net.core.rmem_max`, needs
    /// CAP_NET_ADMIN) first, SO_RCVBUF (capped by `rmem_max`) when that is not permitted. Returns
    /// how it was set and the size the kernel reports (it doubles the request for bookkeeping).
    pub(crate) fn set_receive_buffer(&self, bytes: usize) -> Result<ReceiveBuffer, SocketError> {
        let forced = match setsockopt(&self.fd, sockopt::RcvBufForce, &bytes) {
            Ok(()) => true,
            Err(Errno::EPERM) => {
                setsockopt(&self.fd, sockopt::RcvBuf, &bytes)
                    .map_err(|errno| SocketError::Os { operation: "setsockopt SO_RCVBUF", errno })?;
                false
            }
            Err(errno) => return Err(SocketError::Os { operation: "setsockopt SO_RCVBUFFORCE", errno }),
        };
        let granted = getsockopt(&self.fd, sockopt::RcvBuf)
            .map_err(|errno| SocketError::Os { operation: "getsockopt SO_RCVBUF", errno })?;
        Ok(ReceiveBuffer { forced, granted })
    }

    /// The socket, for waiting on it with `poll`.
    pub(crate) fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd as _;
        self.fd.as_fd()
    }

    /// Sends one datagram to the kernel, whole.
    pub(crate) fn send(&self, bytes: &[u8], operation: &'static str) -> Result<(), SocketError> {
        let kernel = NetlinkAddr::new(KERNEL_PORT, 0);
        loop {
            match sendto(self.fd.as_raw_fd(), bytes, &kernel, MsgFlags::empty()) {
                Ok(sent) if sent == bytes.len() => return Ok(()),
                Ok(_) => return Err(SocketError::Os { operation, errno: Errno::EMSGSIZE }),
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(SocketError::Os { operation, errno }),
            }
        }
    }

    /// Receives one datagram into `buffer`: its length, or `None` when it did not come from the
    /// kernel (the caller decides how many of those it tolerates).
    pub(crate) fn receive(
        &self,
        buffer: &mut [u8],
        operation: &'static str,
    ) -> Result<Option<usize>, SocketError> {
        self.receive_with(buffer, operation, MsgFlags::empty())
    }

    /// [`NetfilterSocket::receive`] without waiting: [`SocketError::Timeout`] when nothing is
    /// queued.
    pub(crate) fn try_receive(
        &self,
        buffer: &mut [u8],
        operation: &'static str,
    ) -> Result<Option<usize>, SocketError> {
        self.receive_with(buffer, operation, MsgFlags::MSG_DONTWAIT)
    }

    fn receive_with(
        &self,
        buffer: &mut [u8],
        operation: &'static str,
        flags: MsgFlags,
    ) -> Result<Option<usize>, SocketError> {
        loop {
            let mut iov = [IoSliceMut::new(buffer)];
            let received = match recvmsg::<NetlinkAddr>(self.fd.as_raw_fd(), &mut iov, None, flags) {
                Ok(received) => received,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Err(SocketError::Timeout),
                Err(errno) => return Err(SocketError::Os { operation, errno }),
            };
            if received.address.is_none_or(|from| from.pid() != KERNEL_PORT) {
                return Ok(None);
            }
            if received.flags.contains(MsgFlags::MSG_TRUNC) {
                return Err(SocketError::Truncated);
            }
            return Ok(Some(received.bytes));
        }
    }
}

/// `len` rounded up to the netlink alignment.
pub(crate) fn align(len: usize) -> usize {
    len.saturating_add(NLMSG_ALIGN - 1) & !(NLMSG_ALIGN - 1)
}

/// One netlink message of a datagram: its type, sequence number, payload (after the header) and
/// the payload's offset in the datagram.
pub(crate) struct Message<'a> {
    pub(crate) kind: u16,
    pub(crate) seq: u32,
    pub(crate) payload: &'a [u8],
    pub(crate) payload_offset: usize,
}

/// The messages of a datagram, each length checked against the bytes there; an error names what
/// did not hold together and its offset.
pub(crate) fn messages(datagram: &[u8]) -> Result<Vec<Message<'_>>, (&'static str, usize)> {
    let field = |bytes: &[u8], at: usize, len: usize| bytes.get(at..at + len).map(|b| b.to_vec());
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < datagram.len() {
        let rest = &datagram[offset..];
        let (Some(len), Some(kind), Some(seq)) = (field(rest, 0, 4), field(rest, 4, 2), field(rest, 8, 4))
        else {
            return Err(("truncated message header", offset));
        };
        let len = u32::from_ne_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len < NLMSG_HDR_LEN || len > rest.len() {
            return Err(("message length out of bounds", offset));
        }
        out.push(Message {
            kind: u16::from_ne_bytes([kind[0], kind[1]]),
            seq: u32::from_ne_bytes([seq[0], seq[1], seq[2], seq[3]]),
            payload: &rest[NLMSG_HDR_LEN..len],
            payload_offset: offset + NLMSG_HDR_LEN,
        });
        offset = offset.saturating_add(align(len)).min(datagram.len());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_rounds_up_to_four_and_never_overflows() {
        assert_eq!([0, 1, 4, 5, 8].map(align), [0, 4, 4, 8, 8]);
        assert_eq!(align(usize::MAX) % NLMSG_ALIGN, 0);
    }
}
