//! The `netwatch` thread: tells the manager when the host's interfaces or addresses change, so
//! that the PCE hears of a new address at once instead of at the next heartbeat (it then puts the
//! address into the peers' policies).
//!
//! It listens on a NETLINK_ROUTE socket bound to the link and address multicast groups. The
//! messages are not decoded: any of them only means "look again", and the manager compares a
//! fresh host report with the last one it sent. A burst of messages (an interface coming up
//! with several addresses) makes one hint, [`SETTLE`] after the first. The socket belongs to the
//! network namespace the agent runs in.

use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::sync::mpsc::SyncSender;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
};

use super::Input;

/// rtnetlink multicast groups (linux/rtnetlink.h): links, IPv4 and IPv6 addresses.
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
/// How long a burst of changes gets to settle before the manager is told.
pub const SETTLE: Duration = Duration::from_millis(500);
/// The receive buffer of one drain; the messages are discarded.
const DRAIN_BUFFER_BYTES: usize = 8192;
/// Most datagrams one drain reads before it lets the loop run again.
const MAX_DATAGRAMS_PER_DRAIN: usize = 256;

/// The running `netwatch` thread.
pub struct NetWatch {
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl NetWatch {
    /// Opens the socket (in the caller's network namespace) and starts the thread.
    pub fn start(inputs: SyncSender<Input>) -> std::io::Result<Self> {
        let socket = open_route_socket().map_err(std::io::Error::from)?;
        let (stop_read, stop_write) = nix::unistd::pipe().map_err(std::io::Error::from)?;
        let thread = super::monitor::spawn("netwatch", move || watch(&socket, &stop_read, &inputs))?;
        Ok(Self { stop: stop_write, thread: Some(thread) })
    }

    fn stop_joined(&mut self) -> Option<String> {
        let _ = nix::unistd::write(&self.stop, &[1]);
        self.thread.take().and_then(super::monitor::join)
    }
}

impl super::monitor::Worker for NetWatch {
    fn ended(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }
    fn stop(mut self: Box<Self>) -> Option<String> {
        self.stop_joined()
    }
}

fn open_route_socket() -> Result<OwnedFd, Errno> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::NetlinkRoute,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))?;
    Ok(fd)
}

/// Waits for changes until the stop pipe is written; hints the manager once per settled burst.
fn watch(socket: &OwnedFd, stop: &OwnedFd, inputs: &SyncSender<Input>) {
    let mut hint_at: Option<Instant> = None;
    let mut buffer = vec![0u8; DRAIN_BUFFER_BYTES];
    loop {
        let timeout = match hint_at {
            Some(at) => PollTimeout::try_from(at.saturating_duration_since(Instant::now()))
                .unwrap_or(PollTimeout::MAX),
            None => PollTimeout::NONE,
        };
        let mut fds =
            [PollFd::new(socket.as_fd(), PollFlags::POLLIN), PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                log::error!("netwatch: poll failed: {e}; interface changes are seen at the next report");
                return;
            }
        }
        if fds[1].revents().is_some_and(|events| !events.is_empty()) {
            return;
        }
        if fds[0].revents().is_some_and(|events| !events.is_empty()) {
            if let Err(e) = drain(socket, &mut buffer) {
                log::error!("netwatch: {e}; interface changes are seen at the next report");
                return;
            }
            hint_at.get_or_insert_with(|| Instant::now() + SETTLE);
        }
        if hint_at.is_some_and(|at| Instant::now() >= at) {
            hint_at = None;
            // A full queue holds work for the manager already; the next report catches up.
            let _ = inputs.try_send(Input::HostChanged);
        }
    }
}

/// Reads and discards what is queued. ENOBUFS (the kernel dropped messages for a full buffer)
/// only means that something changed.
fn drain(socket: &OwnedFd, buffer: &mut [u8]) -> Result<(), Errno> {
    for _ in 0..MAX_DATAGRAMS_PER_DRAIN {
        match recv(socket.as_raw_fd(), buffer, MsgFlags::MSG_DONTWAIT) {
            Ok(_) | Err(Errno::ENOBUFS) | Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
