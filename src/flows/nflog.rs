//! The NFLOG reader: one nfnetlink_log group over a NETLINK_NETFILTER socket.
//!
//! Opening binds our group only (NFULNL_CFG_CMD_BIND): never PF_UNBIND or PF_BIND, which would
//! change logging for every other user of the protocol family in the namespace. The group copies
//! packets cut to [`COPY_RANGE_BYTES`] (the headers), batches them in the kernel
//! ([`QUEUE_THRESHOLD`] messages or [`FLUSH_TIMEOUT_CS`]) and numbers them (NFULNL_CFG_F_SEQ).
//! The socket asks for a [`SOCKET_BUFFER_BYTES`] receive buffer past `rmem_max`.
//!
//! Loss is counted, never hidden: ENOBUFS from the socket (the kernel dropped a batch because
//! the buffer was full; NETLINK_NO_ENOBUFS is not set) and gaps in the sequence numbers (how many
//! packets went missing) are both counted in [`LossCounters`], and the reader goes on. Messages
//! that do not parse and prefixes that are not ours are counted and skipped. Receives have a
//! timeout ([`RECEIVE_TIMEOUT`]), so the reading thread sees its stop signal.
//!
//! The socket belongs to the network namespace of the thread that opened it; the group is
//! released when the reader drops (closing the socket unbinds it in the kernel).

use std::time::Duration;

use nix::errno::Errno;

use super::packet::{
    FlowKey, NFGENMSG_LEN, NFNL_SUBSYS_ULOG, NFULNL_MSG_CONFIG, NLA_HDR_LEN, NflogMessage, Packet,
    PacketError, packet_message_type, parse_message,
};
use crate::netlink::{
    NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NLMSG_HDR_LEN, NLMSG_NOOP, NLMSG_OVERRUN, NetfilterSocket,
    SocketError, align,
};

/// Bytes of each packet the kernel copies (the IP and transport headers; the rule's
/// `--nflog-size` is the same).
pub const COPY_RANGE_BYTES: u32 = 128;
/// Messages the kernel queues before it sends a batch.
pub const QUEUE_THRESHOLD: u32 = 64;
/// Longest a queued message waits in the kernel, in 1/100 s (100 ms).
pub const FLUSH_TIMEOUT_CS: u32 = 10;
/// Size of the kernel's batch buffer for the group (NFULA_CFG_NLBUFSIZ): a batch of
/// [`QUEUE_THRESHOLD`] messages of ~250 bytes fits.
pub const KERNEL_BATCH_BYTES: u32 = 32 * 1024;
/// One receive: larger than the largest batch the kernel builds (a larger datagram is counted
/// as lost, never read in part).
pub const RECV_BUFFER_BYTES: usize = 64 * 1024;
/// The socket receive buffer asked for (SO_RCVBUFFORCE; SO_RCVBUF, capped by `rmem_max`, when
/// that is not permitted).
pub const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// How long one receive waits.
pub const RECEIVE_TIMEOUT: Duration = Duration::from_millis(250);
/// Datagrams read while waiting for the kernel to acknowledge the configuration.
const MAX_DATAGRAMS_BEFORE_ACK: usize = 16;
/// Sequence number of the configuration request.
const CONFIG_SEQ: u32 = 1;

// nfnetlink_log configuration (linux/netfilter/nfnetlink_log.h).
const NLM_F_ACK: u16 = 0x4;
const NFNETLINK_V0: u8 = 0;
const AF_UNSPEC: u8 = 0;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_NLBUFSIZ: u16 = 3;
const NFULA_CFG_TIMEOUT: u16 = 4;
const NFULA_CFG_QTHRESH: u16 = 5;
const NFULA_CFG_FLAGS: u16 = 6;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULNL_CFG_F_SEQ: u16 = 0x0001;

/// Why the reader could not be opened or could not go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NflogError {
    #[error("NFLOG group {group}: {operation} failed: {errno}")]
    Socket { group: u16, operation: &'static str, errno: Errno },
    #[error(
        "NFLOG group {group}: the kernel refused the configuration: {errno} (EPERM: another socket has the group)"
    )]
    Refused { group: u16, errno: Errno },
    #[error("NFLOG group {group}: no acknowledgement of the configuration within {timeout:?}")]
    NoAcknowledgement { group: u16, timeout: Duration },
}

/// Everything the reader lost or skipped since it opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LossCounters {
    /// ENOBUFS from the socket: the kernel could not queue a batch for us.
    pub overruns: u64,
    /// Packets missing from the sequence numbers (what the overruns cost, and any other loss).
    pub sequence_gaps: u64,
    /// Datagrams larger than [`RECV_BUFFER_BYTES`], discarded whole.
    pub oversized_datagrams: u64,
    /// Datagrams that did not come from the kernel.
    pub foreign_datagrams: u64,
    /// Messages that did not parse (truncated or garbled netlink, IP or transport headers).
    pub malformed: u64,
    /// Packets logged with a prefix that is not ours.
    pub unknown_prefix: u64,
    /// Netlink messages of another type (errors, overrun notices).
    pub unexpected: u64,
    /// Packets that arrived before the kernel acknowledged the configuration (read and dropped
    /// while opening; a burst of [`QUEUE_THRESHOLD`] packets within microseconds of the bind).
    pub skipped_at_open: u64,
    /// The last parse error, for diagnostics.
    pub last_malformed: Option<PacketError>,
}

impl LossCounters {
    /// Packets known to be lost to the reader (the kernel's drops it could count).
    pub fn lost(&self) -> u64 {
        self.sequence_gaps.saturating_add(self.overruns).saturating_add(self.skipped_at_open)
    }
}

/// One logged packet, borrowed from the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NflogEvent<'a> {
    pub message: NflogMessage<'a>,
    pub packet: Packet,
    pub key: FlowKey,
}

/// What one call to [`NflogReader::read_batch`] saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Batch {
    /// A datagram arrived (false: the receive timed out).
    pub received: bool,
    /// Events handed to the caller.
    pub events: usize,
    /// The socket reported ENOBUFS.
    pub overrun: bool,
}

/// Decoding state carried from one datagram to the next: the next expected sequence number and
/// the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeState {
    /// The group was bound by us, so the kernel numbers from 0.
    pub expected_seq: u32,
    pub loss: LossCounters,
}

impl DecodeState {
    fn sequence(&mut self, seq: Option<u32>) {
        let Some(seq) = seq else { return };
        let ahead = seq.wrapping_sub(self.expected_seq);
        // Behind (a reordered or repeated number) is not loss; ahead by n is n packets lost.
        if ahead < u32::MAX / 2 {
            self.loss.sequence_gaps = self.loss.sequence_gaps.saturating_add(u64::from(ahead));
        }
        self.expected_seq = seq.wrapping_add(1);
    }

    /// Walks one datagram of netlink messages, counting what does not parse and handing every
    /// event with one of our prefixes to `on_event`. Returns the number of events.
    pub fn decode(&mut self, datagram: &[u8], on_event: &mut impl FnMut(&NflogEvent<'_>)) -> usize {
        let mut events = 0;
        let mut offset = 0;
        while offset < datagram.len() {
            let rest = &datagram[offset..];
            let (Some(len), Some(kind)) = (read_u32(rest, 0), read_u16(rest, 4)) else {
                self.malformed(PacketError::TruncatedMessage);
                break;
            };
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if len < NLMSG_HDR_LEN || len > rest.len() {
                self.malformed(PacketError::BadMessageLength);
                break;
            }
            match kind {
                NLMSG_NOOP | NLMSG_DONE => {}
                kind if kind == packet_message_type() => {
                    if self.message(&rest[..len], on_event) {
                        events += 1;
                    }
                }
                // Acknowledgements (code 0) of our configuration are expected once.
                NLMSG_ERROR if read_u32(&rest[..len], NLMSG_HDR_LEN) == Some(0) => {}
                NLMSG_OVERRUN => self.loss.overruns = self.loss.overruns.saturating_add(1),
                _ => self.loss.unexpected = self.loss.unexpected.saturating_add(1),
            }
            offset = offset.saturating_add(align(len)).min(datagram.len());
        }
        events
    }

    fn message(&mut self, bytes: &[u8], on_event: &mut impl FnMut(&NflogEvent<'_>)) -> bool {
        let message = match parse_message(bytes) {
            Ok(message) => message,
            Err(error) => {
                self.malformed(error);
                return false;
            }
        };
        self.sequence(message.seq);
        let packet = match message.packet() {
            Ok(packet) => packet,
            Err(error) => {
                self.malformed(error);
                return false;
            }
        };
        let Some(key) = FlowKey::new(message.prefix, &packet) else {
            self.loss.unknown_prefix = self.loss.unknown_prefix.saturating_add(1);
            return false;
        };
        on_event(&NflogEvent { message, packet, key });
        true
    }

    fn malformed(&mut self, error: PacketError) {
        self.loss.malformed = self.loss.malformed.saturating_add(1);
        self.loss.last_malformed = Some(error);
    }
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    bytes.get(at..at.checked_add(2)?)?.try_into().ok().map(u16::from_ne_bytes)
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    bytes.get(at..at.checked_add(4)?)?.try_into().ok().map(u32::from_ne_bytes)
}

/// A reader bound to one NFLOG group.
pub struct NflogReader {
    socket: NetfilterSocket,
    group: u16,
    buffer: Box<[u8]>,
    state: DecodeState,
    forced_buffer: bool,
    socket_buffer: usize,
}

impl std::fmt::Debug for NflogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NflogReader")
            .field("group", &self.group)
            .field("socket_buffer", &self.socket_buffer)
            .field("forced_buffer", &self.forced_buffer)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl NflogReader {
    /// Opens a socket in the calling thread's network namespace, binds `group` and configures
    /// it; fails when the kernel refuses (EPERM: another socket has the group).
    pub fn open(group: u16) -> Result<Self, NflogError> {
        let socket_error = |error: SocketError| match error {
            SocketError::Os { operation, errno } => NflogError::Socket { group, operation, errno },
            SocketError::Timeout => NflogError::NoAcknowledgement { group, timeout: RECEIVE_TIMEOUT },
            SocketError::Truncated => {
                NflogError::Socket { group, operation: "receive acknowledgement", errno: Errno::EMSGSIZE }
            }
        };
        let socket = NetfilterSocket::open(RECEIVE_TIMEOUT).map_err(socket_error)?;
        let granted = socket.set_receive_buffer(SOCKET_BUFFER_BYTES).map_err(socket_error)?;
        socket.send(&config_request(group, CONFIG_SEQ), "send configuration").map_err(socket_error)?;
        let mut reader = Self {
            socket,
            group,
            buffer: vec![0u8; RECV_BUFFER_BYTES].into_boxed_slice(),
            state: DecodeState::default(),
            forced_buffer: granted.forced,
            socket_buffer: granted.granted,
        };
        for _ in 0..MAX_DATAGRAMS_BEFORE_ACK {
            let Some(len) =
                reader.socket.receive(&mut reader.buffer, "receive acknowledgement").map_err(socket_error)?
            else {
                continue;
            };
            let datagram = reader.buffer.get(..len).unwrap_or_default();
            let skipped = reader.state.decode(datagram, &mut |_: &NflogEvent<'_>| {});
            reader.state.loss.skipped_at_open =
                reader.state.loss.skipped_at_open.saturating_add(skipped as u64);
            match acknowledgement(datagram, CONFIG_SEQ) {
                Some(0) => return Ok(reader),
                Some(code) => {
                    return Err(NflogError::Refused { group, errno: Errno::from_raw(code.saturating_neg()) });
                }
                None => {}
            }
        }
        Err(NflogError::NoAcknowledgement { group, timeout: RECEIVE_TIMEOUT })
    }

    /// Waits up to [`RECEIVE_TIMEOUT`] for one datagram (one kernel batch) and hands each of its
    /// events to `on_event`. Loss and malformed messages are counted, not returned; only a
    /// socket failure other than ENOBUFS is an error.
    pub fn read_batch(&mut self, mut on_event: impl FnMut(&NflogEvent<'_>)) -> Result<Batch, NflogError> {
        let group = self.group;
        match self.socket.receive(&mut self.buffer, "receive") {
            Ok(Some(len)) => {
                let datagram = self.buffer.get(..len).unwrap_or_default();
                let events = self.state.decode(datagram, &mut on_event);
                Ok(Batch { received: true, events, overrun: false })
            }
            Ok(None) => {
                self.state.loss.foreign_datagrams = self.state.loss.foreign_datagrams.saturating_add(1);
                Ok(Batch { received: true, ..Batch::default() })
            }
            Err(SocketError::Timeout) => Ok(Batch::default()),
            Err(SocketError::Truncated) => {
                self.state.loss.oversized_datagrams = self.state.loss.oversized_datagrams.saturating_add(1);
                Ok(Batch { received: true, ..Batch::default() })
            }
            Err(SocketError::Os { errno: Errno::ENOBUFS, .. }) => {
                self.state.loss.overruns = self.state.loss.overruns.saturating_add(1);
                Ok(Batch { overrun: true, ..Batch::default() })
            }
            Err(SocketError::Os { operation, errno }) => Err(NflogError::Socket { group, operation, errno }),
        }
    }

    /// The socket, for waiting on it with `poll` (a batch is then read without blocking).
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// What was lost or skipped since the reader opened.
    pub fn loss(&self) -> LossCounters {
        self.state.loss
    }

    pub fn group(&self) -> u16 {
        self.group
    }

    /// The socket receive buffer in bytes (as the kernel reports it) and whether SO_RCVBUFFORCE
    /// set it (false: SO_RCVBUF, capped by `net.core.rmem_max`).
    pub fn socket_buffer(&self) -> (usize, bool) {
        (self.socket_buffer, self.forced_buffer)
    }
}

/// The error code of the acknowledgement of request `seq` in `datagram` (0: accepted), if there.
pub(crate) fn acknowledgement(datagram: &[u8], seq: u32) -> Option<i32> {
    let mut offset = 0;
    while offset < datagram.len() {
        let rest = &datagram[offset..];
        let len = usize::try_from(read_u32(rest, 0)?).ok()?;
        if len < NLMSG_HDR_LEN || len > rest.len() {
            return None;
        }
        if read_u16(rest, 4) == Some(NLMSG_ERROR) && read_u32(rest, 8) == Some(seq) {
            // The code inside this message only: a truncated one has none (issue 17: it was read
            // from the padding or the next message).
            let message = rest.get(..len)?;
            return read_u32(message, NLMSG_HDR_LEN).map(|code| i32::from_ne_bytes(code.to_ne_bytes()));
        }
        offset = offset.saturating_add(align(len));
    }
    None
}

/// Appends one attribute (header, value, padding) to `out`.
fn push_attribute(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    // Values here are at most 6 bytes: the length fits a u16.
    let len = (NLA_HDR_LEN + value.len()) as u16;
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(align(out.len()), 0);
}

/// The configuration request: bind `group`, copy packets cut to the copy range, batch by
/// threshold and timeout, number the messages; acknowledged.
pub(crate) fn config_request(group: u16, seq: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    out.extend_from_slice(&[0; NLMSG_HDR_LEN]);
    out.extend_from_slice(&[AF_UNSPEC, NFNETLINK_V0]);
    out.extend_from_slice(&group.to_be_bytes());
    debug_assert_eq!(out.len(), NLMSG_HDR_LEN + NFGENMSG_LEN);
    push_attribute(&mut out, NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]);
    let mut mode = [0u8; 6];
    mode[..4].copy_from_slice(&COPY_RANGE_BYTES.to_be_bytes());
    mode[4] = NFULNL_COPY_PACKET;
    push_attribute(&mut out, NFULA_CFG_MODE, &mode);
    push_attribute(&mut out, NFULA_CFG_NLBUFSIZ, &KERNEL_BATCH_BYTES.to_be_bytes());
    push_attribute(&mut out, NFULA_CFG_TIMEOUT, &FLUSH_TIMEOUT_CS.to_be_bytes());
    push_attribute(&mut out, NFULA_CFG_QTHRESH, &QUEUE_THRESHOLD.to_be_bytes());
    push_attribute(&mut out, NFULA_CFG_FLAGS, &NFULNL_CFG_F_SEQ.to_be_bytes());
    // Under 100 bytes: fits a u32.
    let len = out.len() as u32;
    out[0..4].copy_from_slice(&len.to_ne_bytes());
    out[4..6].copy_from_slice(&((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG).to_ne_bytes());
    out[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    out[8..12].copy_from_slice(&seq.to_ne_bytes());
    out
}
