//! Tests of the wire format (from real captures, see `testdata/`) and of the cut (with a fake
//! table). The policy itself is tested in `policy.rs`, the sysctl in `sysctl.rs`.

use std::net::IpAddr;

use nix::errno::Errno;
use ven_proto::{Direction, IpSet, Peers, Policy, PolicyState, PortRange, Protocol, Rule};

use super::wire::{self, IPPROTO_TCP};
use super::*;

/// Datagrams of a hex capture file: one per line, `#` lines are comments.
fn datagrams(text: &str) -> Vec<Vec<u8>> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            (0..line.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&line[i..i + 2], 16).expect("hex"))
                .collect()
        })
        .collect()
}

const DUMP: &str = include_str!("testdata/dump-ipv4-ipv6.hex");
const DELETE_ACKS: &str = include_str!("testdata/delete-acks.hex");
const DELETE_REQUEST: &str = include_str!("testdata/delete-request.hex");
/// The sequence number of the captured dump request.
const DUMP_SEQ: u32 = 1;

fn ip(text: &str) -> IpAddr {
    text.parse().expect("address")
}

fn entry(
    protocol: u8,
    src: &str,
    dst: &str,
    ports: Option<(u16, u16)>,
    icmp: Option<(u8, u16)>,
) -> Connection {
    Connection {
        protocol,
        original_src: ip(src),
        original_dst: ip(dst),
        src_port: ports.map(|(src, _)| src),
        dst_port: ports.map(|(_, dst)| dst),
        icmp: icmp.map(|(kind, id)| Icmp { id, kind, code: 0 }),
        zone: None,
        id: None,
    }
}

/// The entries of the capture, as `conntrack -L` showed them (ids aside).
fn captured_entries() -> Vec<Connection> {
    vec![
        entry(17, "198.18.5.1", "198.18.5.2", Some((40004, 5353)), None),
        entry(58, "2001:2::1", "2001:2::2", None, Some((128, 17185))),
        entry(6, "2001:2::1", "2001:2::2", Some((40002, 7002)), None),
        entry(1, "198.18.5.1", "198.18.5.2", None, Some((8, 4660))),
        Connection { zone: Some(7), ..entry(6, "198.18.5.9", "198.18.5.2", Some((1234, 22)), None) },
        entry(6, "198.18.5.1", "198.18.5.2", Some((40001, 7001)), None),
    ]
}

/// Feeds datagrams to a reader; the entries seen, or the first error.
fn read_dump(
    datagrams: &[Vec<u8>],
    seq: u32,
) -> Result<(Vec<Connection>, DumpProgress, bool), ConntrackError> {
    let mut reader = DumpReader::new(seq);
    let mut seen = Vec::new();
    let mut progress = DumpProgress::More;
    for datagram in datagrams {
        progress = reader.feed(datagram, &mut |connection| seen.push(connection))?;
    }
    Ok((seen, progress, reader.interrupted()))
}

// The captures were taken on x86_64: netlink headers are in host byte order.
#[cfg(target_endian = "little")]
mod captured {
    use super::*;

    #[test]
    fn dump_of_ipv4_and_ipv6_entries_decodes() {
        let datagrams = datagrams(DUMP);
        assert_eq!(datagrams.len(), 2);
        let (seen, progress, interrupted) = read_dump(&datagrams, DUMP_SEQ).unwrap();
        assert_eq!(progress, DumpProgress::Done);
        assert!(!interrupted);
        assert!(seen.iter().all(|c| c.id.is_some()), "the kernel sends CTA_ID");
        assert_eq!(seen.iter().find(|c| c.zone.is_some()).and_then(|c| c.id), Some(0xeb68_423d));
        let without_ids: Vec<_> = seen.into_iter().map(|c| Connection { id: None, ..c }).collect();
        assert_eq!(without_ids, captured_entries());
    }

    #[test]
    fn replies_to_another_request_are_skipped() {
        let (seen, progress, _) = read_dump(&datagrams(DUMP), DUMP_SEQ + 1).unwrap();
        assert!(seen.is_empty());
        assert_eq!(progress, DumpProgress::More, "the DONE was not ours either");
    }

    #[test]
    fn every_truncation_is_an_error_or_a_clean_message_boundary() {
        let datagram = &datagrams(DUMP)[0];
        let boundaries = message_boundaries(datagram);
        assert_eq!(boundaries.len(), 7, "six messages");
        for cut in 0..datagram.len() {
            let result = DumpReader::new(DUMP_SEQ).feed(&datagram[..cut], &mut |_| {});
            if boundaries.contains(&cut) {
                assert_eq!(result.unwrap(), DumpProgress::More, "cut at boundary {cut}");
            } else {
                assert!(matches!(result, Err(ConntrackError::Malformed { .. })), "cut at {cut}: {result:?}");
            }
        }
    }

    #[test]
    fn garbled_bytes_never_panic() {
        let datagram = datagrams(DUMP).swap_remove(0);
        // Every byte replaced by a few telling values.
        for position in 0..datagram.len() {
            for value in [0x00, 0x01, 0x03, 0x04, 0x7f, 0x80, 0xff] {
                let mut garbled = datagram.clone();
                garbled[position] = value;
                let _ = DumpReader::new(DUMP_SEQ).feed(&garbled, &mut |_| {});
                let _ = wire::for_each_ack(&garbled, &mut |_| {});
            }
        }
        // And many random multi-byte mutations (xorshift: deterministic, no dependency).
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut garbled = datagram.clone();
            for _ in 0..(next() % 8 + 1) {
                let position = (next() % garbled.len() as u64) as usize;
                garbled[position] = next() as u8;
            }
            let cut = (next() % (garbled.len() as u64 + 1)) as usize;
            let _ = DumpReader::new(DUMP_SEQ).feed(&garbled[..cut], &mut |_| {});
        }
    }

    #[test]
    fn delete_request_matches_what_the_kernel_accepted() {
        let zoned =
            read_dump(&datagrams(DUMP), DUMP_SEQ).unwrap().0.into_iter().find(|c| c.zone.is_some()).unwrap();
        let mut request = Vec::new();
        wire::push_delete_request(&mut request, 1, &zoned);
        wire::push_delete_request(&mut request, 2, &zoned);
        assert_eq!(request, datagrams(DELETE_REQUEST)[0]);
    }

    #[test]
    fn delete_acks_decode() {
        let mut acks = Vec::new();
        for datagram in datagrams(DELETE_ACKS) {
            wire::for_each_ack(&datagram, &mut |ack| acks.push(ack)).unwrap();
        }
        assert_eq!(acks, [Ack { seq: 1, error: None }, Ack { seq: 2, error: Some(Errno::ENOENT) }]);
    }

    fn message_boundaries(datagram: &[u8]) -> Vec<usize> {
        let mut boundaries = vec![0];
        let mut at = 0;
        while at + 4 <= datagram.len() {
            let len = u32::from_ne_bytes(datagram[at..at + 4].try_into().unwrap()) as usize;
            at += (len + 3) & !3;
            boundaries.push(at.min(datagram.len()));
        }
        boundaries
    }
}

// Synthetic messages, for cases the kernel would not produce on demand.

fn message(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&(16 + payload.len() as u32).to_ne_bytes());
    bytes.extend_from_slice(&kind.to_ne_bytes());
    bytes.extend_from_slice(&flags.to_ne_bytes());
    bytes.extend_from_slice(&seq.to_ne_bytes());
    bytes.extend_from_slice(&0u32.to_ne_bytes());
    bytes.extend_from_slice(payload);
    bytes.resize((bytes.len() + 3) & !3, 0);
    bytes
}

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const CT_NEW: u16 = 0x100;
const NLM_F_MULTI: u16 = 2;
const NLM_F_DUMP_INTR: u16 = 0x10;

/// A ctnetlink entry message's payload, as the delete request encodes it (same attributes).
fn entry_payload(connection: &Connection) -> Vec<u8> {
    let mut request = Vec::new();
    wire::push_delete_request(&mut request, 0, connection);
    request.split_off(16)
}

fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&(4 + payload.len() as u16).to_ne_bytes());
    bytes.extend_from_slice(&kind.to_ne_bytes());
    bytes.extend_from_slice(payload);
    bytes.resize((bytes.len() + 3) & !3, 0);
    bytes
}

fn sample() -> Connection {
    Connection {
        id: Some(42),
        zone: Some(3),
        ..entry(6, "198.18.0.1", "198.18.0.2", Some((40000, 80)), None)
    }
}

#[test]
fn every_kind_of_entry_round_trips_through_the_encoder() {
    let mut entries = captured_entries();
    entries.push(sample());
    entries.push(entry(47, "198.18.0.1", "198.18.0.2", None, None));
    for connection in entries {
        assert_eq!(parse_connection(&entry_payload(&connection), 0).unwrap(), connection);
    }
}

#[test]
fn dump_reader_handles_multipart_done_errors_and_interruptions() {
    let entry_message = |flags| message(CT_NEW, NLM_F_MULTI | flags, 9, &entry_payload(&sample()));
    let done = message(NLMSG_DONE, NLM_F_MULTI, 9, &0i32.to_ne_bytes());
    // Two datagrams of entries, then DONE.
    let (seen, progress, interrupted) =
        read_dump(&[[entry_message(0), entry_message(0)].concat(), entry_message(0), done.clone()], 9)
            .unwrap();
    assert_eq!((seen.len(), progress, interrupted), (3, DumpProgress::Done, false));
    // NLM_F_DUMP_INTR on any message marks the dump for a redo.
    let (_, _, interrupted) = read_dump(&[entry_message(NLM_F_DUMP_INTR), done.clone()], 9).unwrap();
    assert!(interrupted);
    // A DONE carrying an error, and an NLMSG_ERROR, are kernel errors.
    let failed_done = message(NLMSG_DONE, NLM_F_MULTI, 9, &(-(Errno::EINTR as i32)).to_ne_bytes());
    assert!(matches!(read_dump(&[failed_done], 9), Err(ConntrackError::Kernel { errno: Errno::EINTR, .. })));
    let error = message(NLMSG_ERROR, 0, 9, &(-(Errno::EPERM as i32)).to_ne_bytes());
    let failure = read_dump(&[error], 9).unwrap_err();
    assert!(matches!(failure, ConntrackError::Kernel { errno: Errno::EPERM, .. }), "{failure}");
    assert!(failure.to_string().contains("dump"), "{failure}");
    // After DONE, later bytes are ignored.
    let (seen, progress, _) = read_dump(&[[done, entry_message(0)].concat(), b"junk".to_vec()], 9).unwrap();
    assert_eq!((seen.len(), progress), (0, DumpProgress::Done));
    // An ACK-style NLMSG_ERROR (status 0) is not an error; extreme statuses do not overflow.
    let ack = message(NLMSG_ERROR, 0, 9, &0i32.to_ne_bytes());
    assert_eq!(read_dump(&[ack], 9).unwrap().1, DumpProgress::More);
    let weird = message(NLMSG_ERROR, 0, 9, &i32::MIN.to_ne_bytes());
    assert!(matches!(read_dump(&[weird], 9), Err(ConntrackError::Kernel { .. })));
}

#[test]
fn malformed_messages_are_errors_with_offsets() {
    let malformed = |datagram: &[u8]| match DumpReader::new(9).feed(datagram, &mut |_| {}) {
        Err(ConntrackError::Malformed { what, offset }) => (what, offset),
        other => panic!("expected Malformed, got {other:?}"),
    };
    let good = entry_payload(&sample());
    // Netlink header: too short, length below the header, length past the datagram.
    assert_eq!(malformed(&[0u8; 7]).1, 0);
    let mut short = message(CT_NEW, 0, 9, &good);
    short[..4].copy_from_slice(&15u32.to_ne_bytes());
    malformed(&short);
    let mut long = message(CT_NEW, 0, 9, &good);
    long[..4].copy_from_slice(&4096u32.to_ne_bytes());
    malformed(&long);
    // Trailing bytes after a whole message.
    let (_, offset) = malformed(&[message(CT_NEW, 0, 9, &good), vec![1, 2, 3]].concat());
    assert_eq!(offset, 16 + good.len());
    // Payload: no nfgenmsg; no tuple; an attribute longer than its parent; a zero-length one.
    malformed(&message(CT_NEW, 0, 9, &[2, 0]));
    let (what, _) = malformed(&message(CT_NEW, 0, 9, &[2, 0, 0, 0]));
    assert!(what.contains("CTA_TUPLE_ORIG"), "{what}");
    let mut overlong = good.clone();
    overlong[4..6].copy_from_slice(&200u16.to_ne_bytes());
    malformed(&message(CT_NEW, 0, 9, &overlong));
    malformed(&message(CT_NEW, 0, 9, &[vec![2, 0, 0, 0], vec![0, 0, 1, 0]].concat()));
    // Attribute sizes: a 3-byte IPv4 address, a 1-byte port.
    let tuple = |ip: Vec<u8>, proto: Vec<u8>| {
        let orig = attr(1 | 0x8000, &[attr(1 | 0x8000, &ip), attr(2 | 0x8000, &proto)].concat());
        message(CT_NEW, 0, 9, &[vec![2, 0, 0, 0], orig].concat())
    };
    let v4 = [attr(1, &[198, 18, 0, 1]), attr(2, &[198, 18, 0, 2])].concat();
    let tcp = [attr(1, &[6]), attr(2, &[0x9c, 0x40]), attr(3, &[0, 80])].concat();
    assert_eq!(read_dump(&[tuple(v4.clone(), tcp.clone())], 9).unwrap().0.len(), 1, "the baseline is good");
    malformed(&tuple([attr(1, &[198, 18, 0]), attr(2, &[198, 18, 0, 2])].concat(), tcp.clone()));
    malformed(&tuple(v4.clone(), [attr(1, &[6]), attr(3, &[80])].concat()));
    // Missing pieces: a destination, the protocol number; mixed families; half an ICMP tuple.
    malformed(&tuple(attr(1, &[198, 18, 0, 1]), tcp.clone()));
    malformed(&tuple(v4.clone(), attr(2, &[0x9c, 0x40])));
    malformed(&tuple([attr(1, &[198, 18, 0, 1]), attr(4, &[0; 16])].concat(), tcp.clone()));
    malformed(&tuple(v4.clone(), [attr(1, &[1]), attr(4, &[0, 7])].concat()));
    // An IPv6 tuple in a message that says AF_INET.
    let v6 = entry_payload(&entry(6, "2001:2::1", "2001:2::2", Some((1, 2)), None));
    malformed(&message(CT_NEW, 0, 9, &[&[2, 0, 0, 0][..], &v6[4..]].concat()));
    // A message type a dump never carries.
    let (what, _) = malformed(&message(0x0105, 0, 9, &good));
    assert!(what.contains("unexpected message type"), "{what}");
}

#[test]
fn unknown_attributes_are_ignored() {
    let mut payload = entry_payload(&sample());
    payload.extend_from_slice(&attr(99, &[1, 2, 3, 4, 5]));
    payload.extend_from_slice(&attr(3, &[0, 0, 0, 8])); // CTA_STATUS
    assert_eq!(parse_connection(&payload, 0).unwrap(), sample());
}

// The cut, against a fake table.

/// A table in memory. `interruptions` dump passes report NLM_F_DUMP_INTR first (after showing
/// every entry twice, as an interrupted kernel dump may); `refuse` makes deleting that entry fail.
#[derive(Default)]
struct FakeTable {
    entries: Vec<Connection>,
    /// Extra entries generated on the fly (all loopback, so allowed), for the cap.
    filler: usize,
    interruptions: u32,
    dumps: u32,
    refuse: Option<(Connection, Errno)>,
    deleted: Vec<Connection>,
}

impl ConntrackTable for FakeTable {
    fn dump(&mut self, visit: &mut dyn FnMut(Connection)) -> Result<DumpPass, ConntrackError> {
        self.dumps += 1;
        let interrupted = self.dumps <= self.interruptions;
        for _ in 0..if interrupted { 2 } else { 1 } {
            self.entries.iter().cloned().for_each(&mut *visit);
        }
        for i in 0..self.filler {
            visit(entry(IPPROTO_TCP, "127.0.0.1", "127.0.0.1", Some((i as u16, 1)), None));
        }
        Ok(if interrupted { DumpPass::Interrupted } else { DumpPass::Complete })
    }

    fn delete(&mut self, connections: &[Connection]) -> Result<DeleteReport, ConntrackError> {
        let mut report = DeleteReport::default();
        for connection in connections {
            if let Some((refused, errno)) = &self.refuse {
                if refused == connection {
                    report.failed += 1;
                    report.first_error.get_or_insert(*errno);
                    continue;
                }
            }
            match self.entries.iter().position(|entry| entry == connection) {
                Some(index) => {
                    self.deleted.push(self.entries.remove(index));
                    report.deleted += 1;
                }
                None => report.already_gone += 1,
            }
        }
        Ok(report)
    }
}

const HOST: &str = "198.18.0.2";
const ALLOWED_PEER: &str = "198.18.0.1";
const OTHER_PEER: &str = "198.18.0.3";

fn enforced_policy() -> Policy {
    Policy {
        version: 2,
        state: PolicyState::Enforced,
        ip_sets: vec![IpSet { id: 1, members: vec![ALLOWED_PEER.parse().unwrap()] }],
        rules: vec![Rule {
            id: 1,
            direction: Direction::Inbound,
            peers: Peers::Set(1),
            protocol: Protocol::Tcp,
            ports: Some(PortRange { first: 7001, last: 7001 }),
        }],
        custom_rules: Vec::new(),
    }
}

fn cut_input(policy: &Policy) -> CutInput<'_> {
    CutInput { policy, local_addresses: vec![ip(HOST)], management: Vec::new(), failsafe_inbound: Vec::new() }
}

fn kept() -> Connection {
    entry(6, ALLOWED_PEER, HOST, Some((40000, 7001)), None)
}

fn doomed() -> Connection {
    entry(6, OTHER_PEER, HOST, Some((40000, 7001)), None)
}

#[test]
fn cut_deletes_only_what_the_policy_no_longer_allows() {
    let policy = enforced_policy();
    let mut table = FakeTable { entries: vec![kept(), doomed()], ..FakeTable::default() };
    let summary = cut_disallowed_in(&mut table, &cut_input(&policy)).unwrap();
    assert_eq!(summary, CutSummary { examined: 2, deleted: 1, skipped_over_cap: 0 });
    assert_eq!(table.deleted, [doomed()]);
    assert_eq!(table.entries, [kept()]);
}

#[test]
fn cut_does_nothing_unless_enforced() {
    let policy = Policy { state: PolicyState::Test, ..enforced_policy() };
    let mut table = FakeTable { entries: vec![doomed()], ..FakeTable::default() };
    assert_eq!(cut_disallowed_in(&mut table, &cut_input(&policy)).unwrap(), CutSummary::default());
    assert_eq!(table.dumps, 0, "the table is not even read");
}

#[test]
fn interrupted_dumps_are_redone_from_scratch_a_bounded_number_of_times() {
    let policy = enforced_policy();
    let mut table = FakeTable { entries: vec![kept(), doomed()], interruptions: 2, ..FakeTable::default() };
    let summary = cut_disallowed_in(&mut table, &cut_input(&policy)).unwrap();
    assert_eq!(summary, CutSummary { examined: 2, deleted: 1, skipped_over_cap: 0 }, "nothing counted twice");
    assert_eq!(table.dumps, 3);

    let mut table = FakeTable { entries: vec![doomed()], interruptions: u32::MAX, ..FakeTable::default() };
    let error = cut_disallowed_in(&mut table, &cut_input(&policy)).unwrap_err();
    assert!(matches!(error, ConntrackError::DumpInterrupted { attempts: MAX_DUMP_ATTEMPTS }), "{error}");
    assert_eq!(table.dumps, MAX_DUMP_ATTEMPTS);
    assert!(table.deleted.is_empty(), "nothing is deleted from a dump that never completed");
}

#[test]
fn entries_already_gone_are_not_errors_and_not_counted() {
    struct Vanishing(FakeTable);
    impl ConntrackTable for Vanishing {
        fn dump(&mut self, visit: &mut dyn FnMut(Connection)) -> Result<DumpPass, ConntrackError> {
            let pass = self.0.dump(visit);
            self.0.entries.clear(); // every connection ends before the delete
            pass
        }
        fn delete(&mut self, connections: &[Connection]) -> Result<DeleteReport, ConntrackError> {
            self.0.delete(connections)
        }
    }
    let policy = enforced_policy();
    let mut table = Vanishing(FakeTable { entries: vec![doomed()], ..FakeTable::default() });
    let summary = cut_disallowed_in(&mut table, &cut_input(&policy)).unwrap();
    assert_eq!(summary, CutSummary { examined: 1, deleted: 0, skipped_over_cap: 0 });
}

#[test]
fn failed_deletes_are_reported_after_the_others_are_done() {
    let policy = enforced_policy();
    let other = entry(6, OTHER_PEER, HOST, Some((40001, 9000)), None);
    let mut table = FakeTable {
        entries: vec![doomed(), other.clone()],
        refuse: Some((doomed(), Errno::EINVAL)),
        ..FakeTable::default()
    };
    let error = cut_disallowed_in(&mut table, &cut_input(&policy)).unwrap_err();
    assert!(
        matches!(error, ConntrackError::Delete { requested: 2, deleted: 1, failed: 1, first: Errno::EINVAL }),
        "{error}"
    );
    assert_eq!(table.deleted, [other]);
}

#[test]
fn entries_past_the_cap_are_counted_not_judged() {
    let policy = enforced_policy();
    // The doomed entry comes first, within the cap; the filler overflows it.
    let mut table =
        FakeTable { entries: vec![doomed()], filler: MAX_CUT_ENTRIES + 4, ..FakeTable::default() };
    let summary = cut_disallowed_in(&mut table, &cut_input(&policy)).unwrap();
    assert_eq!(summary, CutSummary { examined: MAX_CUT_ENTRIES, deleted: 1, skipped_over_cap: 5 });
}

#[test]
fn listing_keeps_at_most_the_limit() {
    let mut table = FakeTable { entries: vec![kept(), doomed()], filler: 3, ..FakeTable::default() };
    let list = list_connections_in(&mut table, 2).unwrap();
    assert_eq!(list.connections, [kept(), doomed()]);
    assert_eq!(list.over_limit, 3);
}

/// A destroy event as the kernel multicasts it: a DELETE message (not a request) carrying the
/// tuple and, with `nf_conntrack_acct`, CTA_COUNTERS_ORIG/REPLY (packets, bytes: be64).
fn destroy_event(connection: &Connection, counters: Option<[(u64, u64); 2]>) -> Vec<u8> {
    let mut message = Vec::new();
    wire::push_delete_request(&mut message, 0, connection);
    // The kernel's event has no request flags.
    message[6..8].copy_from_slice(&0u16.to_ne_bytes());
    for (kind, (packets, bytes)) in [9u16, 10].into_iter().zip(counters.into_iter().flatten()) {
        let mut nest = Vec::new();
        for (counter, value) in [(1u16, packets), (2, bytes)] {
            nest.extend_from_slice(&12u16.to_ne_bytes());
            nest.extend_from_slice(&counter.to_ne_bytes());
            nest.extend_from_slice(&value.to_be_bytes());
        }
        message.extend_from_slice(&u16::try_from(4 + nest.len()).unwrap().to_ne_bytes());
        message.extend_from_slice(&(kind | 0x8000).to_ne_bytes());
        message.extend_from_slice(&nest);
    }
    let len = u32::try_from(message.len()).unwrap();
    message[..4].copy_from_slice(&len.to_ne_bytes());
    message
}

#[test]
fn destroy_events_give_the_connection_and_both_directions_counters() {
    let tcp = entry(IPPROTO_TCP, "198.18.0.1", "198.18.0.2", Some((40000, 5432)), None);
    let udp = entry(17, "2001:2::1", "2001:2::2", Some((40001, 53)), None);
    let mut datagram = destroy_event(&tcp, Some([(10, 1_000), (8, 70_000)]));
    datagram.extend(destroy_event(&udp, None));
    let mut seen = Vec::new();
    for_each_destroyed(&datagram, &mut |connection, totals| seen.push((connection, totals))).unwrap();
    assert_eq!(
        seen,
        [(tcp.clone(), Some(Totals { packets: 18, bytes: 71_000 })), (udp, None)],
        "counters summed over both directions; none without accounting"
    );
    // Counters near the top saturate instead of overflowing.
    let huge = destroy_event(&tcp, Some([(u64::MAX, u64::MAX), (1, 1)]));
    let mut totals = None;
    for_each_destroyed(&huge, &mut |_, t| totals = t).unwrap();
    assert_eq!(totals, Some(Totals { packets: u64::MAX, bytes: u64::MAX }));
    // A dump reply or an ack in the group is skipped; a cut counter is an error.
    let mut cut = destroy_event(&tcp, Some([(1, 60), (1, 60)]));
    let at = cut.len() - 12; // the reply's byte counter: 4 bytes of payload instead of 8
    cut[at..at + 2].copy_from_slice(&8u16.to_ne_bytes());
    assert!(for_each_destroyed(&cut, &mut |_, _| {}).is_err());
}
