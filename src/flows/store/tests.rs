//! Unit tests of the pure parts (rows, merging, filters, batches, the header check, the
//! sequence bookkeeping) and a few of the file layer in a temporary directory. The store as a
//! whole (rotation, caps, full disk, corruption, Busy) is tested in tests/flows_store.rs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use ven_proto::{FlowRecord, FlowVerdict, IpNet};

use super::rows::{self, BatchBuilder, ROW_BUFFER_BYTES};
use super::*;

fn record(src: &str, dst: &str, port: u16, verdict: FlowVerdict) -> FlowRecord {
    FlowRecord {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        protocol: 6,
        port,
        verdict,
        rule: 1,
        count: 1,
        first_seen: 1_000,
        last_seen: 1_000,
        sampling_scale: 1,
        overflow: false,
        packets: 1,
        bytes: None,
    }
}

fn row(record: &FlowRecord) -> Vec<u8> {
    let mut buffer = [0; ROW_BUFFER_BYTES];
    rows::encode_row(record, &mut buffer).to_vec()
}

fn query(verdicts: VerdictFilter) -> FlowQuery {
    FlowQuery {
        view: View::Raw,
        verdicts,
        since: None,
        src: None,
        dst: None,
        port: None,
        protocol: None,
        limit: 10,
    }
}

#[test]
fn the_widest_record_fits_the_row_buffer() {
    let widest = FlowRecord {
        src: IpAddr::V6(Ipv6Addr::from(u128::MAX)),
        dst: IpAddr::V6(Ipv6Addr::from(u128::MAX)),
        protocol: u8::MAX,
        port: u16::MAX,
        verdict: FlowVerdict::Dropped,
        rule: u32::MAX,
        count: u32::MAX,
        first_seen: u32::MAX,
        last_seen: u32::MAX,
        sampling_scale: u16::MAX,
        overflow: true,
        packets: u64::MAX,
        bytes: Some(u64::MAX),
    };
    let encoded = row(&widest);
    assert_eq!(encoded.len(), 85, "the tag and the widest postcard record");
    assert_eq!(&encoded[1..], ven_proto::encode(&widest));
    assert_eq!(rows::decode_row(&encoded), Some(widest));
}

#[test]
fn rows_round_trip_and_garbage_decodes_to_nothing() {
    let flow = record("198.18.0.1", "198.18.0.2", 443, FlowVerdict::Allowed);
    let bytes = row(&flow);
    assert_eq!(rows::decode_row(&bytes), Some(flow));
    // Truncated, trailing bytes, empty, an impossible enum tag: none is a record.
    assert_eq!(rows::decode_row(&bytes[..bytes.len() - 1]), None);
    let mut longer = bytes.clone();
    longer.push(0);
    assert_eq!(rows::decode_row(&longer), None);
    assert_eq!(rows::decode_row(&[]), None);
    assert_eq!(rows::decode_row(&[7; 40]), None);
}

#[test]
fn chunks_number_their_rows_and_end_at_garbage() {
    let flows: Vec<FlowRecord> =
        (0..5).map(|port| record("198.18.0.1", "2001:db8::1", port, FlowVerdict::Dropped)).collect();
    let mut chunk: Vec<u8> = flows.iter().flat_map(row).collect();
    assert_eq!(rows::whole_chunk_rows(&chunk), Some(5));
    let (decoded, undecodable) = decode_stored_chunk(41, &chunk);
    assert_eq!(
        decoded.iter().map(|(seq, r)| (*seq, r.port)).collect::<Vec<_>>(),
        [(41, 0), (42, 1), (43, 2), (44, 3), (45, 4)]
    );
    assert_eq!(undecodable, 0);
    // A bad row: the rows before it stand, it and everything after are one undecodable row.
    let third = row(&flows[0]).len() * 3;
    chunk[third] = 0xff;
    let (decoded, undecodable) = decode_stored_chunk(41, &chunk);
    assert_eq!(decoded.len(), 3);
    assert_eq!(undecodable, 1);
    assert_eq!(rows::whole_chunk_rows(&chunk), None, "never continued");
    assert_eq!(rows::whole_chunk_rows(&[]), Some(0));
    let mut seen = 0;
    rows::decode_chunk(1, &chunk, |_, _| {
        seen += 1;
        false
    });
    assert_eq!(seen, 1, "stops when asked");
}

#[test]
fn a_batch_reads_through_chunks() {
    let flows: Vec<FlowRecord> =
        (0..6).map(|port| record("198.18.0.1", "198.18.0.2", port, FlowVerdict::Allowed)).collect();
    let first: Vec<u8> = flows[..4].iter().flat_map(row).collect();
    let second: Vec<u8> = flows[4..].iter().flat_map(row).collect();
    let chunks = [(10, first.as_slice()), (14, second.as_slice())];
    let taken = batch_from_chunks(11, 100, chunks).0.unwrap();
    assert_eq!(taken.first, 12);
    assert_eq!(taken.records.iter().map(|r| r.port).collect::<Vec<_>>(), [2, 3, 4, 5]);
    let taken = batch_from_chunks(0, 3, chunks).0.unwrap();
    assert_eq!((taken.first, taken.records.len()), (10, 3));
}

#[test]
fn merging_adds_counts_widens_times_and_keeps_the_latest_rule() {
    let mut stored = record("198.18.0.1", "198.18.0.2", 443, FlowVerdict::WouldDrop);
    stored.count = u32::MAX - 1;
    stored.first_seen = 100;
    stored.last_seen = 200;
    stored.rule = 7;
    stored.sampling_scale = 4;
    let mut newer = stored;
    newer.count = 5;
    newer.first_seen = 150;
    newer.last_seen = 300;
    newer.rule = 9;
    newer.sampling_scale = 2;
    newer.overflow = true;
    let merged = rows::merge(&stored, &newer);
    assert_eq!(merged.count, u32::MAX, "saturates");
    assert_eq!((merged.first_seen, merged.last_seen), (100, 300));
    assert_eq!(merged.rule, 9);
    assert_eq!(merged.sampling_scale, 4);
    assert!(merged.overflow);
    assert_eq!(
        (merged.src, merged.dst, merged.port, merged.verdict),
        (stored.src, stored.dst, 443, stored.verdict)
    );
    // An older record merged later still cannot narrow the times.
    let older = FlowRecord { first_seen: 50, last_seen: 60, ..newer };
    let again = rows::merge(&merged, &older);
    assert_eq!((again.first_seen, again.last_seen), (50, 300));
}

#[test]
fn summary_keys_tell_apart_what_aggregation_must_and_nothing_else() {
    let base = record("198.18.0.1", "198.18.0.2", 443, FlowVerdict::Allowed);
    let key = rows::summary_key(&base);
    // Not part of the key: rule, counts, times, scale, overflow.
    let same = FlowRecord {
        rule: 3,
        count: 9,
        first_seen: 1,
        last_seen: 2,
        sampling_scale: 8,
        overflow: true,
        packets: 1,
        bytes: None,
        ..base
    };
    assert_eq!(rows::summary_key(&same), key);
    let different = [
        FlowRecord { src: "198.18.0.3".parse().unwrap(), ..base },
        FlowRecord { dst: "198.18.0.3".parse().unwrap(), ..base },
        FlowRecord { protocol: 17, ..base },
        FlowRecord { port: 444, ..base },
        FlowRecord { verdict: FlowVerdict::Observed, ..base },
        // The IPv6 address that maps the same IPv4 one is another flow.
        FlowRecord { src: "::ffff:198.18.0.1".parse().unwrap(), ..base },
    ];
    for other in different {
        assert_ne!(rows::summary_key(&other), key, "{other:?}");
    }
}

#[test]
fn networks_contain_their_addresses_only_within_a_family() {
    let net: IpNet = "198.18.0.0/15".parse().unwrap();
    assert!(rows::net_contains(&net, "198.19.255.255".parse().unwrap()));
    assert!(!rows::net_contains(&net, "198.20.0.0".parse().unwrap()));
    assert!(!rows::net_contains(&net, "::ffff:198.18.0.1".parse().unwrap()));
    // Host bits in the filter are ignored; /0 takes everything of its family.
    let host_bits: IpNet = "198.18.0.9/24".parse().unwrap();
    assert!(rows::net_contains(&host_bits, "198.18.0.200".parse().unwrap()));
    let all: IpNet = "0.0.0.0/0".parse().unwrap();
    assert!(rows::net_contains(&all, IpAddr::V4(Ipv4Addr::UNSPECIFIED)));
    let v6: IpNet = "2001:db8::/32".parse().unwrap();
    assert!(rows::net_contains(&v6, "2001:db8:ffff::1".parse().unwrap()));
    assert!(!rows::net_contains(&v6, "2001:db9::1".parse().unwrap()));
    let one: IpNet = "2001:db8::1/128".parse().unwrap();
    assert!(rows::net_contains(&one, "2001:db8::1".parse().unwrap()));
    assert!(!rows::net_contains(&one, "2001:db8::2".parse().unwrap()));
}

#[test]
fn filters_select_views_and_fields() {
    let allowed = record("198.18.0.1", "198.18.0.2", 443, FlowVerdict::Allowed);
    let unallowed: Vec<FlowRecord> = [FlowVerdict::Observed, FlowVerdict::WouldDrop, FlowVerdict::Dropped]
        .into_iter()
        .map(|verdict| FlowRecord { verdict, ..allowed })
        .collect();
    assert!(rows::matches(&query(VerdictFilter::Allowed), &allowed));
    assert!(!rows::matches(&query(VerdictFilter::Unallowed), &allowed));
    for flow in &unallowed {
        assert!(rows::matches(&query(VerdictFilter::Unallowed), flow));
        assert!(!rows::matches(&query(VerdictFilter::Allowed), flow));
        assert!(rows::matches(&query(VerdictFilter::Any), flow));
    }
    let mut q = query(VerdictFilter::Any);
    q.since = Some(1_000);
    assert!(rows::matches(&q, &allowed), "since is inclusive");
    q.since = Some(1_001);
    assert!(!rows::matches(&q, &allowed));
    type Filter = fn(&mut FlowQuery);
    let checks: [(Filter, bool); 8] = [
        (|q| q.src = Some("198.18.0.0/24".parse().unwrap()), true),
        (|q| q.src = Some("198.18.1.0/24".parse().unwrap()), false),
        (|q| q.dst = Some("198.18.0.2".parse().unwrap()), true),
        (|q| q.dst = Some("198.18.0.1".parse().unwrap()), false),
        (|q| q.port = Some(443), true),
        (|q| q.port = Some(80), false),
        (|q| q.protocol = Some(6), true),
        (|q| q.protocol = Some(17), false),
    ];
    for (set, expected) in checks {
        let mut q = query(VerdictFilter::Any);
        set(&mut q);
        assert_eq!(rows::matches(&q, &allowed), expected, "{q:?}");
    }
}

fn rows_numbered(first: u64, count: u64) -> Vec<(u64, Vec<u8>)> {
    (first..first + count)
        .map(|seq| {
            let flow = FlowRecord {
                rule: seq as u32,
                ..record("198.18.0.1", "198.18.0.2", 80, FlowVerdict::Allowed)
            };
            (seq, row(&flow))
        })
        .collect()
}

/// Each row its own chunk.
fn batch(acknowledged: u64, max: usize, rows: &[(u64, Vec<u8>)]) -> (Option<FlowBatch>, u64) {
    batch_from_chunks(acknowledged, max, rows.iter().map(|(seq, bytes)| (*seq, bytes.as_slice())))
}

#[test]
fn a_batch_takes_consecutive_rows_after_the_cursor_up_to_max() {
    let stored = rows_numbered(1, 10);
    let (taken, undecodable) = batch(3, 4, &stored);
    let taken = taken.unwrap();
    assert_eq!(taken.first, 4);
    assert_eq!(taken.records.iter().map(|r| r.rule).collect::<Vec<_>>(), [4, 5, 6, 7]);
    assert_eq!(undecodable, 0);
    assert_eq!(batch(10, 4, &stored).0, None, "everything acknowledged");
    assert_eq!(batch(0, 0, &stored).0, None, "max 0");
    assert_eq!(batch(0, 100, &[]).0, None);
}

#[test]
fn a_batch_stops_at_a_gap_and_starts_after_one() {
    let mut stored = rows_numbered(5, 3);
    stored.extend(rows_numbered(20, 3));
    // Rows 1..=4 were rotated out unacknowledged: the batch starts at the oldest row kept.
    let taken = batch(0, 100, &stored).0.unwrap();
    assert_eq!((taken.first, taken.records.len()), (5, 3));
    let after_gap = batch(7, 100, &stored).0.unwrap();
    assert_eq!((after_gap.first, after_gap.records.len()), (20, 3));
}

#[test]
fn a_batch_skips_garbage_before_it_and_ends_at_garbage_inside() {
    let mut stored = rows_numbered(1, 6);
    stored[0].1 = vec![0xff; 3];
    stored[3].1 = vec![0xff];
    let (taken, undecodable) = batch(0, 100, &stored);
    let taken = taken.unwrap();
    assert_eq!((taken.first, taken.records.len()), (2, 2), "rows 2 and 3");
    assert_eq!(undecodable, 2, "row 1 skipped, row 4 ended the batch");
    let (taken, _) = batch(3, 100, &stored);
    assert_eq!(taken.unwrap().first, 5, "once acknowledged past it, the bad row is skipped");
}

#[test]
fn a_batch_is_never_larger_than_the_pce_takes() {
    let stored = rows_numbered(1, ven_proto::MAX_FLOWS_PER_BATCH as u64 + 5);
    let taken = batch(0, usize::MAX, &stored).0.unwrap();
    assert_eq!(taken.records.len(), ven_proto::MAX_FLOWS_PER_BATCH);
    let flow = record("198.18.0.1", "198.18.0.2", 80, FlowVerdict::Allowed);
    let mut builder = BatchBuilder::new(0, 2);
    assert!(builder.offer(1, Some(flow)));
    assert!(!builder.offer(2, Some(flow)), "full after the second");
    assert!(!builder.offer(3, Some(flow)));
}

#[test]
fn sequence_bookkeeping_counts_what_a_rotation_drops() {
    // Backup holds 1..=100, current 101..=150, next 151.
    let meta = Meta { next_seq: 151, acknowledged: 0, first_seq: 101, backup_first_seq: 1 };
    assert_eq!(meta.unacknowledged_in_backup(), 100);
    assert_eq!(meta.unacknowledged_here(), 50);
    assert_eq!(Meta { acknowledged: 60, ..meta }.unacknowledged_in_backup(), 40);
    assert_eq!(Meta { acknowledged: 120, ..meta }.unacknowledged_in_backup(), 0);
    assert_eq!(Meta { acknowledged: 120, ..meta }.unacknowledged_here(), 30);
    assert_eq!(Meta { acknowledged: 150, ..meta }.unacknowledged_here(), 0);
    let next = meta.rotated();
    assert_eq!(next, Meta { next_seq: 151, acknowledged: 0, first_seq: 151, backup_first_seq: 101 });
    assert_eq!(next.unacknowledged_in_backup(), 50);
    assert_eq!(next.unacknowledged_here(), 0);
}

#[test]
fn the_header_check_rejects_what_redb_would_abort_on() {
    let dir = TempDir::new("header");
    let path = dir.path.join("h.db");
    drop(redb::Builder::new().create_with_file_format_v3(true).create(&path).unwrap());
    let good = std::fs::read(&path).unwrap();
    let len = good.len() as u64;
    assert_eq!(file::check_header(&good[..4096], len), Ok(()));
    // Truncated to less than it describes (redb asserts here), or to less than a page.
    assert!(file::check_header(&good[..4096], len - 4096).unwrap_err().contains("truncated"));
    assert!(file::check_header(&good[..100], 100).unwrap_err().contains("truncated"));
    // Not redb, another page size, impossible geometry.
    let mut garbage = good[..4096].to_vec();
    garbage[0] = b'R';
    assert!(file::check_header(&garbage, len).unwrap_err().contains("magic"));
    let mut page = good[..4096].to_vec();
    page[12..16].copy_from_slice(&8192u32.to_le_bytes());
    assert!(file::check_header(&page, len).unwrap_err().contains("page size"));
    let mut layout = good[..4096].to_vec();
    layout[20..24].copy_from_slice(&0u32.to_le_bytes());
    assert!(file::check_header(&layout, len).unwrap_err().contains("layout"));
    let mut v2 = good[..4096].to_vec();
    v2[64] = 2;
    v2[192] = 2;
    assert!(file::check_header(&v2, len).unwrap_err().contains("format 2"));
    // Longer than described but not whole pages: redb's recovery would assert.
    assert!(file::check_header(&good[..4096], len + 100).unwrap_err().contains("whole number"));
    assert_eq!(file::check_header(&good[..4096], len + 4096 * 1000), Ok(()));
    let mut huge = good[..4096].to_vec();
    huge[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(file::check_header(&huge, len).unwrap_err().contains("truncated"));
}

#[test]
fn a_store_keeps_numbering_and_merging_across_calls() {
    let dir = TempDir::new("calls");
    let store = FlowStore::new(&dir.path, LogCaps::default());
    let a = record("198.18.0.1", "198.18.0.2", 443, FlowVerdict::Allowed);
    let b = record("198.18.0.1", "198.18.0.3", 22, FlowVerdict::Dropped);
    let outcome = store.append(&[a, b, a]).unwrap();
    assert_eq!(outcome.rows, 3);
    assert!(outcome.rotated.is_empty() && outcome.recovered.is_empty());
    store.append(&[FlowRecord { rule: 5, last_seen: 2_000, ..a }]).unwrap();
    // Within one flush too, the later record's rule wins (the merge is sorted, stably).
    store
        .append(&[FlowRecord { rule: 6, ..b }, FlowRecord { rule: 8, ..b }, FlowRecord { rule: 7, ..a }])
        .unwrap();
    let dropped =
        store.query(&FlowQuery { view: View::Aggregated, ..query(VerdictFilter::Unallowed) }).unwrap();
    assert_eq!((dropped.rows[0].record.count, dropped.rows[0].record.rule), (3, 8));
    let raw = store.query(&FlowQuery { view: View::Raw, ..query(VerdictFilter::Any) }).unwrap();
    assert_eq!(raw.rows.iter().map(|row| row.seq).collect::<Vec<_>>(), (1..=7).map(Some).collect::<Vec<_>>());
    let summary =
        store.query(&FlowQuery { view: View::Aggregated, ..query(VerdictFilter::Allowed) }).unwrap();
    assert_eq!(summary.rows.len(), 1);
    let merged = summary.rows[0].record;
    assert_eq!((merged.count, merged.rule, merged.last_seen), (4, 7, 2_000));
    assert_eq!(summary.rows[0].seq, None);
    let usage = store.usage();
    assert_eq!((usage.rows_appended, usage.last_seq), (7, 7));
    assert!(usage.raw_bytes > 0 && usage.summary_bytes > 0 && usage.corrupt_bytes == 0);
    // Nothing stays open: the files can be locked at once, as redb locks them.
    for name in ["flow.db", "flowsum.db"] {
        let file = std::fs::File::open(dir.path.join(name)).unwrap();
        assert!(nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok(), "{name}");
    }
}

#[test]
fn the_smallest_cap_holds_a_store_and_a_smaller_one_says_so() {
    let dir = TempDir::new("min");
    let flows: Vec<FlowRecord> =
        (0..2_000).map(|port| record("198.18.0.1", "198.18.0.2", port, FlowVerdict::Allowed)).collect();
    let tight = LogCaps { file_max_bytes: MIN_FILE_BYTES, total_max_bytes: u64::MAX };
    let store = FlowStore::new(&dir.path.join("min"), tight);
    for _ in 0..20 {
        store.append(&flows).unwrap();
    }
    assert!(store.usage().rotations > 0);
    let small = LogCaps { file_max_bytes: 1_000_000, total_max_bytes: u64::MAX };
    let store = FlowStore::new(&dir.path.join("small"), small);
    let error = store.append(&flows).unwrap_err();
    assert!(matches!(error, StoreError::CapTooSmall { cap: 1_000_000, .. }), "{error}");
    assert!(error.to_string().contains("flow.db"));
}

#[test]
fn an_empty_append_touches_nothing() {
    let dir = TempDir::new("empty");
    let store = FlowStore::new(&dir.path.join("log"), LogCaps::default());
    assert_eq!(store.append(&[]).unwrap(), AppendOutcome::default());
    assert!(!dir.path.join("log").exists());
    assert_eq!(store.pending(10).unwrap(), None);
    let result = store.query(&query(VerdictFilter::Any)).unwrap();
    assert_eq!(result, QueryResult { rows: vec![], more: 0 });
}

#[test]
fn limits_count_what_they_leave_out() {
    let dir = TempDir::new("limit");
    let store = FlowStore::new(&dir.path, LogCaps::default());
    let flows: Vec<FlowRecord> =
        (0..25).map(|port| record("198.18.0.1", "198.18.0.2", port, FlowVerdict::Allowed)).collect();
    store.append(&flows).unwrap();
    let mut q = query(VerdictFilter::Any);
    q.limit = 10;
    let result = store.query(&q).unwrap();
    assert_eq!((result.rows.len(), result.more), (10, 15));
    q.limit = 0;
    assert_eq!(store.query(&q).unwrap().more, 25);
}

/// A directory under /tmp removed on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new(name: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "ven-store-unit-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A store written before records carried packets and bytes: rows are bare postcard
/// `FlowRecordV3`s (no tag). Built by writing a store, then putting back every value as the old
/// version encoded it (byte for byte what `ven_proto::encode(&FlowRecordV3)` gives, which is
/// what that version stored). It reads with `packets = count`, bytes unknown; new flushes
/// continue the old chunk and merge into the old aggregates.
#[test]
fn a_store_written_before_packets_and_bytes_stays_readable() {
    use ven_proto::FlowRecordV3;
    let dir = TempDir::new("v3");
    let store = FlowStore::new(&dir.path, LogCaps::default());
    let a = FlowRecord { count: 3, ..record("198.18.0.1", "198.18.0.2", 443, FlowVerdict::Dropped) };
    let b = FlowRecord { count: 2, ..record("2001:2::1", "2001:2::2", 53, FlowVerdict::Allowed) };
    store.append(&[a, b]).unwrap();
    let v3 = |record: &FlowRecord| ven_proto::encode(&FlowRecordV3::from(*record));
    {
        let db = redb::Database::open(dir.path.join("flow.db")).unwrap();
        let write = db.begin_write().unwrap();
        {
            let mut table = write.open_table(FLOWS).unwrap();
            let chunk: Vec<u8> = [a, b].iter().flat_map(v3).collect();
            table.insert(1, &chunk[..]).unwrap();
        }
        write.commit().unwrap();
        let db = redb::Database::open(dir.path.join("flowsum.db")).unwrap();
        let write = db.begin_write().unwrap();
        {
            let mut table = write.open_table(SUMMARIES).unwrap();
            for record in [a, b] {
                table.insert(&rows::summary_key(&record)[..], &v3(&record)[..]).unwrap();
            }
        }
        write.commit().unwrap();
    }
    let old = |record: FlowRecord| FlowRecord { packets: u64::from(record.count), bytes: None, ..record };
    let raw = store.query(&FlowQuery { view: View::Raw, ..query(VerdictFilter::Any) }).unwrap();
    assert_eq!(raw.rows.iter().map(|row| row.record).collect::<Vec<_>>(), [old(a), old(b)]);
    assert_eq!(store.usage().undecodable_rows, 0);

    // New rows beside old ones: both read, aggregates merge (the known bytes add up).
    let newer = FlowRecord { count: 1, packets: 4, bytes: Some(240), ..a };
    store.append(&[newer]).unwrap();
    let raw = store.query(&FlowQuery { view: View::Raw, ..query(VerdictFilter::Any) }).unwrap();
    assert_eq!(raw.rows.iter().map(|row| row.record).collect::<Vec<_>>(), [old(a), old(b), newer]);
    let summary =
        store.query(&FlowQuery { view: View::Aggregated, ..query(VerdictFilter::Unallowed) }).unwrap();
    let merged = summary.rows[0].record;
    assert_eq!((merged.count, merged.packets, merged.bytes), (4, 7, Some(240)));
    let batch = store.pending(10).unwrap().expect("three rows to upload");
    assert_eq!((batch.first, batch.records.len(), batch.records[0].packets), (1, 3, 3));
}

/// The seeds of the `flow_store_rows` fuzz target (fuzz/seeds/flow_store_rows/, run with
/// `cargo fuzz run flow_store_rows fuzz/seeds/flow_store_rows`): a chunk of rows of this
/// version, one mixing version 3's untagged rows with tagged ones, and one aggregate. They are
/// built here and must match the files; `VEN_WRITE_FUZZ_SEEDS=1 cargo test -p ven --lib
/// fuzz_seeds` writes them again.
#[test]
fn fuzz_seeds_of_stored_rows_are_current() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/flow_store_rows");
    let a = FlowRecord {
        packets: 4,
        bytes: Some(240),
        ..record("198.18.0.1", "198.18.0.2", 443, FlowVerdict::Dropped)
    };
    let b = record("2001:2::1", "2001:2::2", 53, FlowVerdict::Allowed);
    let old = ven_proto::encode(&ven_proto::FlowRecordV3::from(b));
    let tagged: Vec<u8> = [a, b].iter().flat_map(row).collect();
    let mixed: Vec<u8> = [row(&a), old.clone(), row(&b)].concat();
    let seeds = [("chunk-v4", tagged.clone()), ("chunk-v3-and-v4", mixed.clone()), ("summary-v4", row(&a))];
    for (name, bytes) in &seeds {
        let path = dir.join(name);
        if std::env::var_os("VEN_WRITE_FUZZ_SEEDS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, bytes).unwrap();
        }
        assert_eq!(&std::fs::read(&path).unwrap(), bytes, "{} is stale", path.display());
    }
    let (rows, undecodable) = decode_stored_chunk(1, &mixed);
    assert_eq!((rows.len(), undecodable), (3, 0));
    assert_eq!(rows[1].1, FlowRecord { packets: 1, bytes: None, ..b });
}
