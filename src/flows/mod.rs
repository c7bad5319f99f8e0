//! vtapServer: the flow pipeline. Built so far: the NFLOG reader.
//!
//! - [`nflog`]: binds one nfnetlink_log group (only ours, never the protocol family), copies
//!   headers only with kernel-side batching and numbering, reads batches from a large socket
//!   buffer, and counts every loss (ENOBUFS, sequence gaps, oversized datagrams), every
//!   malformed message and every unknown prefix without stopping.
//! - [`packet`]: the zero-copy parser of one NFLOG message (prefix, payload, sequence number,
//!   timestamp) and of its IPv4/IPv6 packet (TCP/UDP ports, ICMP/ICMPv6 type and code, other
//!   protocols by number), and the [`FlowKey`] a flow is counted by (addresses, protocol,
//!   destination port or ICMP type, verdict and rule id from the prefix).
//!
//! Still to come (issue 4): the reader's own thread in the agent with a stop signal and its loss
//! counters in `ven status`; bounded aggregation into flow summaries (connections, first and
//! last seen, an "other" bucket on overflow); sampling mode under load; the redb stores
//! (`flow.db`, `flowsum.db`) with rotation and the 390 MB cap; `ven flows`; rotated application
//! logs; the upload to the PCE. Until then the agent records no flows.

pub mod nflog;
pub mod packet;

pub use nflog::{Batch, DecodeState, LossCounters, NflogError, NflogEvent, NflogReader};
pub use packet::{FlowKey, NflogMessage, Packet, PacketError, Timestamp, Transport};

/// For the `nflog_packets` fuzz target: decodes one datagram of NFLOG messages as the reader
/// does (counting what does not parse) and returns the events' flow keys and the counters.
#[doc(hidden)]
pub fn decode_datagram(datagram: &[u8]) -> (Vec<FlowKey>, LossCounters) {
    let mut state = DecodeState::default();
    let mut keys = Vec::new();
    state.decode(datagram, &mut |event: &NflogEvent<'_>| keys.push(event.key));
    (keys, state.loss)
}

#[cfg(test)]
mod tests;
