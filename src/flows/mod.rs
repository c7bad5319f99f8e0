//! vtapServer: the flow pipeline. Built so far: the NFLOG reader, its thread in the agent, and
//! the bounded aggregation.
//!
//! - [`nflog`]: binds one nfnetlink_log group (only ours, never the protocol family), copies
//!   headers only with kernel-side batching and numbering, reads batches from a large socket
//!   buffer, and counts every loss (ENOBUFS, sequence gaps, oversized datagrams), every
//!   malformed message and every unknown prefix without stopping.
//! - [`packet`]: the zero-copy parser of one NFLOG message (prefix, payload, sequence number,
//!   timestamp) and of its IPv4/IPv6 packet (TCP/UDP ports, ICMP/ICMPv6 type and code, other
//!   protocols by number), and the [`FlowKey`] a flow is counted by (addresses, protocol,
//!   destination port or ICMP type, verdict and rule id from the prefix).
//! - [`aggregate`]: counts flow keys between two flushes in a table that grows by doubling with
//!   the flows tracked, up to the configured number of flows (108 bytes per tracked flow at that
//!   cap, nothing allocated per event beyond the amortised growth, the grown table given back
//!   at each flush) into [`Summary`] records (connections, packets, bytes, first and last seen, sampling
//!   scale); when
//!   full, new keys fold into one counted "other" bucket per verdict.
//!
//! - [`connections`]: which logged packets are new connections: a bounded table of recent
//!   5-tuples (ICMP: type, code, echo id) with the kernel's unreplied timeouts, so that a
//!   retransmitted SYN or a repeated datagram counts a packet, not a connection; when full, new
//!   tuples count as connections and as counted overflow.
//! - [`accounting`]: the bytes of accepted connections, from conntrack's destroy events
//!   (`nf_conntrack_acct`), added to the flow each connection was counted under.
//! - [`pipeline`]: the agent's `flows` thread: binds the group, sleeps in `poll` (no wake-ups
//!   on an idle host, an immediate stop), counts events, loss and skipped messages into shared
//!   counters that `ven status` shows, and binds again with backoff when it cannot.
//!
//! Still to come (issue 4): feeding the aggregator from the pipeline and flushing it every N
//! seconds; sampling mode under load; the redb stores (`flow.db`, `flowsum.db`) with rotation
//! and the 390 MB cap; `ven flows`; rotated application logs; the upload to the PCE. Until then
//! the agent counts logged packets but records no flows.

pub mod accounting;
pub mod aggregate;
pub mod connections;
pub mod nflog;
pub mod packet;
pub mod pipeline;
pub mod sampling;
pub mod store;

pub use aggregate::{Aggregator, Counters as AggregateCounters, Event, Summary, SummaryKey};
pub use connections::{ConnectionCounters, Connections, Seen, Timeouts};
pub use nflog::{Batch, DecodeState, LossCounters, NflogError, NflogEvent, NflogReader};
pub use packet::{FlowKey, NflogMessage, Packet, PacketError, Timestamp, Transport};
pub use pipeline::{FlowCounters, FlowPipeline, FlowSink, FlowStats, PipelineSettings};

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
