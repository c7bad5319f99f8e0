//! The flow stores (src/flows/store) on a real file system: the four views with filters, exact
//! size caps through rotation (per file and in total), the upload cursor across rotations and
//! restarts, corrupt files moved aside, a full disk (a tiny tmpfs, root only), a file another
//! handle holds, and a writer killed with SIGKILL mid-flush.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ven::flows::store::{AppendOutcome, FlowQuery, FlowStore, QueryResult, StoreError, VerdictFilter, View};
use ven::logdir::{self, LogCaps};
use ven_lab::workdir::{Tmpfs, Workdir, scratch};
use ven_proto::{FlowRecord, FlowVerdict};

/// The smallest cap a store lives in: a file rotates after about 28,000 rows.
const SMALL: LogCaps =
    LogCaps { file_max_bytes: ven::flows::store::MIN_FILE_BYTES, total_max_bytes: 390_000_000 };
/// Records per flush in the tests that fill files.
const FLUSH: u32 = 2_000;
const STORE_FILES: [&str; 6] =
    ["flow.db", "flow.db.1", "flow.db.corrupt", "flowsum.db", "flowsum.db.1", "flowsum.db.corrupt"];

fn flow(n: u32, verdict: FlowVerdict) -> FlowRecord {
    FlowRecord {
        src: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (n % 65_536))),
        dst: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)),
        protocol: 6,
        port: 443,
        verdict,
        rule: if verdict == FlowVerdict::Allowed { 1 } else { 0 },
        count: 1,
        first_seen: 1_780_000_000 + n,
        last_seen: 1_780_000_000 + n,
        sampling_scale: 1,
        overflow: false,
        packets: 1,
        bytes: None,
    }
}

/// `count` distinct flows from `from` on, one in ten not allowed.
fn flows(from: u32, count: u32) -> Vec<FlowRecord> {
    (from..from + count)
        .map(|n| flow(n, if n % 10 == 0 { FlowVerdict::Dropped } else { FlowVerdict::Allowed }))
        .collect()
}

fn all(view: View) -> FlowQuery {
    FlowQuery {
        view,
        verdicts: VerdictFilter::Any,
        since: None,
        src: None,
        dst: None,
        port: None,
        protocol: None,
        limit: ven::flows::store::MAX_QUERY_ROWS,
    }
}

fn seqs(result: &QueryResult) -> Vec<u64> {
    result.rows.iter().map(|row| row.seq.expect("raw rows carry their number")).collect()
}

fn len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Every store file is within the per-file cap.
fn assert_within_cap(dir: &Workdir, caps: LogCaps) {
    for name in STORE_FILES {
        let size = len(&dir.path().join(name));
        assert!(
            size <= caps.per_file_bytes(),
            "{name} is {size} bytes, over the {} cap",
            caps.per_file_bytes()
        );
    }
}

/// Nothing holds the store's files between calls: each can be locked at once, as redb locks it.
/// (A lock, not a redb handle: redb's clean close would add its allocator snapshot to the file.)
fn assert_nothing_open(dir: &Workdir) {
    use nix::fcntl::{Flock, FlockArg};
    for name in ["flow.db", "flowsum.db", "flow.db.1", "flowsum.db.1"] {
        if let Ok(file) = fs::File::open(dir.path().join(name)) {
            let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock);
            assert!(lock.is_ok(), "{name} is held open");
        }
    }
}

#[test]
fn the_four_views_filter_and_number_rows() {
    let dir = scratch("flows-store-views");
    let store = FlowStore::new(dir.path(), LogCaps::default());
    let v6 = FlowRecord {
        src: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
        dst: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2)),
        protocol: 17,
        port: 53,
        ..flow(1, FlowVerdict::WouldDrop)
    };
    let first =
        vec![flow(1, FlowVerdict::Allowed), flow(2, FlowVerdict::Dropped), v6, flow(1, FlowVerdict::Allowed)];
    let outcome = store.append(&first).unwrap();
    assert_eq!(outcome, AppendOutcome { rows: 4, ..Default::default() });
    let second = vec![
        FlowRecord { rule: 9, last_seen: 1_780_000_500, ..flow(1, FlowVerdict::Allowed) },
        flow(3, FlowVerdict::Observed),
    ];
    store.append(&second).unwrap();
    assert_nothing_open(&dir);

    // Raw views: every row, numbered 1.. in order.
    let raw_allowed = store.query(&FlowQuery { verdicts: VerdictFilter::Allowed, ..all(View::Raw) }).unwrap();
    assert_eq!(seqs(&raw_allowed), [1, 4, 5]);
    let raw_unallowed =
        store.query(&FlowQuery { verdicts: VerdictFilter::Unallowed, ..all(View::Raw) }).unwrap();
    assert_eq!(seqs(&raw_unallowed), [2, 3, 6]);
    assert_eq!(raw_unallowed.rows[1].record, v6);
    assert_eq!(raw_unallowed.more, 0);

    // Aggregated views: one row per (src, dst, protocol, port, verdict).
    let sum_allowed =
        store.query(&FlowQuery { verdicts: VerdictFilter::Allowed, ..all(View::Aggregated) }).unwrap();
    assert_eq!(sum_allowed.rows.len(), 1);
    let merged = sum_allowed.rows[0].record;
    assert_eq!(sum_allowed.rows[0].seq, None);
    assert_eq!((merged.count, merged.rule), (3, 9));
    assert_eq!((merged.first_seen, merged.last_seen), (1_780_000_001, 1_780_000_500));
    let sum_unallowed =
        store.query(&FlowQuery { verdicts: VerdictFilter::Unallowed, ..all(View::Aggregated) }).unwrap();
    assert_eq!(sum_unallowed.rows.len(), 3);
    assert!(sum_unallowed.rows.iter().all(|row| row.record.verdict.is_unallowed() && row.record.count == 1));

    // Filters.
    let by_src =
        store.query(&FlowQuery { src: Some("10.0.0.2/32".parse().unwrap()), ..all(View::Raw) }).unwrap();
    assert_eq!(seqs(&by_src), [2]);
    let by_net =
        store.query(&FlowQuery { src: Some("2001:db8::/32".parse().unwrap()), ..all(View::Raw) }).unwrap();
    assert_eq!(seqs(&by_net), [3]);
    let by_dst = store
        .query(&FlowQuery { dst: Some("198.18.0.0/24".parse().unwrap()), ..all(View::Aggregated) })
        .unwrap();
    assert_eq!(by_dst.rows.len(), 3);
    let by_port = store.query(&FlowQuery { port: Some(53), protocol: Some(17), ..all(View::Raw) }).unwrap();
    assert_eq!(seqs(&by_port), [3]);
    let since = store.query(&FlowQuery { since: Some(1_780_000_003), ..all(View::Raw) }).unwrap();
    assert_eq!(seqs(&since), [5, 6]);
    let limited = store.query(&FlowQuery { limit: 2, ..all(View::Raw) }).unwrap();
    assert_eq!((seqs(&limited), limited.more), (vec![1, 2], 4));
}

#[test]
fn files_rotate_before_they_pass_the_cap_and_numbers_continue() {
    let dir = scratch("flows-store-rotate");
    let store = FlowStore::new(dir.path(), SMALL);
    let mut appended = 0u32;
    let mut raw_rotations = 0;
    let mut at_first_rotation = 0;
    for flush in 0..400 {
        let outcome = store.append(&flows(appended, FLUSH)).unwrap();
        assert_eq!(outcome.rows, FLUSH as usize);
        assert!(outcome.recovered.is_empty());
        appended += FLUSH;
        assert_within_cap(&dir, SMALL);
        if outcome.rotated.contains(&dir.path().join("flow.db")) {
            raw_rotations += 1;
            if raw_rotations == 1 {
                at_first_rotation = appended - FLUSH;
            }
        }
        if raw_rotations == 2 {
            break;
        }
        assert!(flush < 399, "flow.db never rotated twice");
    }
    assert!(dir.path().join("flow.db.1").exists());
    // Rows per byte: a file held this many rows before it would have grown past the cap.
    println!(
        "rows in flow.db at the first rotation under a {}-byte cap: {at_first_rotation}",
        SMALL.per_file_bytes()
    );
    assert!(
        at_first_rotation >= 20_000,
        "{at_first_rotation} rows in a {}-byte file",
        SMALL.per_file_bytes()
    );

    // The backup's rows then the current file's: consecutive, ending at the last appended.
    let raw = store.query(&all(View::Raw)).unwrap();
    let numbers = seqs(&raw);
    assert_eq!(numbers.last(), Some(&u64::from(appended)));
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "a gap in the raw rows");
    assert!(numbers[0] > 1, "the oldest rows left with the replaced backup");

    // A restart continues the numbering.
    let restarted = FlowStore::new(dir.path(), SMALL);
    restarted.append(&flows(appended, 1)).unwrap();
    let newest =
        restarted.query(&FlowQuery { since: Some(1_780_000_000 + appended), ..all(View::Raw) }).unwrap();
    assert_eq!(seqs(&newest), [u64::from(appended) + 1]);
    assert_within_cap(&dir, SMALL);
    assert_nothing_open(&dir);
}

#[test]
fn every_file_together_stays_within_the_total() {
    // A total that lowers the per-file cap: 16 files of 1.6 MB.
    let caps = LogCaps { file_max_bytes: 15_000_000, total_max_bytes: 25_600_000 };
    assert_eq!(caps.per_file_bytes(), 1_600_000);
    let dir = scratch("flows-store-total");
    let store = FlowStore::new(dir.path(), caps);
    let mut rotated = (0, 0);
    let mut appended = 0;
    for _ in 0..300 {
        let outcome = store.append(&flows(appended, 2_000)).unwrap();
        appended += 2_000;
        rotated.0 += outcome.rotated.iter().filter(|path| path.ends_with("flow.db")).count();
        rotated.1 += outcome.rotated.iter().filter(|path| path.ends_with("flowsum.db")).count();
        assert_within_cap(&dir, caps);
        let store_bytes: u64 = STORE_FILES.iter().map(|name| len(&dir.path().join(name))).sum();
        assert!(store_bytes <= caps.per_file_bytes() * STORE_FILES.len() as u64);
        assert!(logdir::usage(dir.path()) <= caps.total_max_bytes);
        if rotated.0 >= 2 && rotated.1 >= 2 {
            break;
        }
    }
    assert!(rotated.0 >= 2 && rotated.1 >= 2, "rotations: {rotated:?}");
    let usage = store.usage();
    assert_eq!(usage.file_cap_bytes, 1_600_000);
    assert!(usage.total_bytes <= 4 * 1_600_000);
    assert_eq!(usage.rotations, (rotated.0 + rotated.1) as u64);
}

#[test]
fn pending_and_acknowledge_survive_rotation_and_restart() {
    let dir = scratch("flows-store-pending");
    let store = FlowStore::new(dir.path(), SMALL);
    assert_eq!(store.pending(100).unwrap(), None);
    store.append(&flows(0, 500)).unwrap();
    let batch = store.pending(200).unwrap().unwrap();
    assert_eq!((batch.first, batch.records.len()), (1, 200));
    assert_eq!(batch.records[0], flows(0, 1)[0]);
    assert_eq!(store.pending(200).unwrap().unwrap().first, 1, "nothing acknowledged yet");
    store.acknowledge(200).unwrap();
    assert_eq!(store.pending(1_000).unwrap().unwrap().first, 201);
    store.acknowledge(150).unwrap();
    assert_eq!(store.pending(1_000).unwrap().unwrap().first, 201, "the cursor never goes back");

    // A restart keeps the cursor.
    drop(store);
    let store = FlowStore::new(dir.path(), SMALL);
    let batch = store.pending(1_000).unwrap().unwrap();
    assert_eq!((batch.first, batch.records.len()), (201, 300));
    store.acknowledge(500).unwrap();
    assert_eq!(store.pending(1_000).unwrap(), None);
    // Acknowledging beyond what was written is held to the last row.
    store.acknowledge(10_000).unwrap();
    store.append(&flows(500, 10)).unwrap();
    assert_eq!(store.pending(1_000).unwrap().unwrap().first, 501);

    // Fill past one rotation: the rows left in the backup are still pending, oldest first,
    // and the batch runs on into the current file.
    let mut appended = 510u32;
    while !dir.path().join("flow.db.1").exists() {
        store.append(&flows(appended, FLUSH)).unwrap();
        appended += FLUSH;
        assert!(appended < 400_000, "no rotation");
    }
    let batch = store.pending(ven_proto::MAX_FLOWS_PER_BATCH).unwrap().unwrap();
    assert_eq!(batch.first, 501);
    assert_eq!(batch.records.len(), ven_proto::MAX_FLOWS_PER_BATCH.min(appended as usize - 500));
    let through = u64::from(appended) - 5;
    store.acknowledge(through).unwrap();
    drop(store);
    let store = FlowStore::new(dir.path(), SMALL);
    let batch = store.pending(100).unwrap().unwrap();
    assert_eq!((batch.first, batch.records.len()), (through + 1, 5));

    // A second rotation replaces the backup: what was not acknowledged there is counted.
    let mut dropped = 0;
    let mut rotations = 0;
    while rotations < 2 {
        let outcome = store.append(&flows(appended, FLUSH)).unwrap();
        appended += FLUSH;
        dropped += outcome.dropped_unacknowledged;
        rotations += outcome.rotated.iter().filter(|path| path.ends_with("flow.db")).count();
    }
    assert!(dropped > 0);
    assert_eq!(store.usage().dropped_unacknowledged, dropped);
    let batch = store.pending(10).unwrap().unwrap();
    let oldest = seqs(&store.query(&FlowQuery { limit: 1, ..all(View::Raw) }).unwrap())[0];
    assert_eq!(batch.first, oldest, "the batch starts at the oldest row kept");
    assert_eq!(
        oldest,
        through + 1 + 5 + dropped - 5,
        "every row between the cursor and the oldest kept was counted"
    );
}

#[test]
fn corrupt_files_are_moved_aside_and_numbering_continues() {
    let dir = scratch("flows-store-corrupt");
    let store = FlowStore::new(dir.path(), LogCaps::default());
    store.append(&flows(0, 10)).unwrap();

    // Garbage: the query names the file and moves nothing; the append moves it aside.
    fs::write(dir.path().join("flow.db"), vec![0x5a; 100_000]).unwrap();
    let error = store.query(&all(View::Raw)).unwrap_err();
    assert!(
        matches!(&error, StoreError::Corrupt { path, .. } if *path == dir.path().join("flow.db")),
        "{error}"
    );
    assert!(error.to_string().contains("flow.db"), "{error}");
    assert!(!dir.path().join("flow.db.corrupt").exists());
    let outcome = store.append(&flows(10, 5)).unwrap();
    assert_eq!(outcome.recovered.len(), 1, "{outcome:?}");
    assert_eq!(outcome.recovered[0].path, dir.path().join("flow.db"));
    assert_eq!(outcome.recovered[0].moved_to, dir.path().join("flow.db.corrupt"));
    assert!(outcome.recovered[0].cause.contains("magic"), "{}", outcome.recovered[0].cause);
    assert_eq!(len(&dir.path().join("flow.db.corrupt")), 100_000);
    // Numbering continues above what flowsum.db remembers.
    assert_eq!(seqs(&store.query(&all(View::Raw)).unwrap()), [11, 12, 13, 14, 15]);

    // Truncated (redb would abort on this header), on a new store instance.
    let whole = fs::read(dir.path().join("flow.db")).unwrap();
    fs::write(dir.path().join("flow.db"), &whole[..whole.len() / 2]).unwrap();
    let store = FlowStore::new(dir.path(), LogCaps::default());
    let outcome = store.append(&flows(15, 1)).unwrap();
    assert_eq!(outcome.recovered.len(), 1);
    assert!(outcome.recovered[0].cause.contains("truncated"), "{}", outcome.recovered[0].cause);
    assert_eq!(seqs(&store.query(&all(View::Raw)).unwrap()), [16], "one corrupt copy kept, the newest");

    // A redb file with other tables.
    fs::remove_file(dir.path().join("flowsum.db")).unwrap();
    {
        let db = redb::Builder::new()
            .create_with_file_format_v3(true)
            .create(dir.path().join("flowsum.db"))
            .unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(redb::TableDefinition::<&str, &str>::new("summaries")).unwrap();
            table.insert("a", "b").unwrap();
        }
        txn.commit().unwrap();
    }
    let outcome = store.append(&flows(16, 1)).unwrap();
    assert_eq!(outcome.recovered.len(), 1);
    assert_eq!(outcome.recovered[0].path, dir.path().join("flowsum.db"));
    assert!(outcome.recovered[0].cause.contains("wrong tables"), "{}", outcome.recovered[0].cause);
    assert_eq!(seqs(&store.query(&all(View::Raw)).unwrap()), [16, 17]);
    assert_eq!(store.query(&all(View::Aggregated)).unwrap().rows.len(), 1);

    // Damaged pages behind a good header: found by the page checksums redb verifies at every
    // open, never read as rows.
    drop(store);
    let mut bytes = fs::read(dir.path().join("flow.db")).unwrap();
    for byte in &mut bytes[4096..] {
        *byte ^= 0xa5;
    }
    fs::write(dir.path().join("flow.db"), &bytes).unwrap();
    let store = FlowStore::new(dir.path(), LogCaps::default());
    let outcome = store.append(&flows(17, 1)).unwrap();
    assert_eq!(outcome.recovered.len(), 1, "{outcome:?}");
    assert_eq!(outcome.recovered[0].path, dir.path().join("flow.db"));
    assert_eq!(seqs(&store.query(&all(View::Raw)).unwrap()), [18]);

    // A corrupt backup found by pending is moved aside there and reported by the next append.
    fs::write(dir.path().join("flow.db.1"), b"not a database").unwrap();
    let batch = store.pending(10).unwrap().unwrap();
    assert_eq!(batch.first, 18);
    assert!(!dir.path().join("flow.db.1").exists());
    let outcome = store.append(&flows(18, 1)).unwrap();
    assert_eq!(outcome.recovered.len(), 1);
    assert_eq!(outcome.recovered[0].path, dir.path().join("flow.db.1"));
    assert_eq!(store.usage().recoveries, 2, "counted by this store: the damaged file and the backup");
}

#[test]
fn a_file_another_handle_holds_is_busy_then_free() {
    let dir = scratch("flows-store-busy");
    let store = FlowStore::new(dir.path(), LogCaps::default());
    store.append(&flows(0, 3)).unwrap();
    let held = redb::Database::open(dir.path().join("flow.db")).unwrap();
    let started = Instant::now();
    let error = store.append(&flows(3, 3)).unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(&error, StoreError::Busy { path } if *path == dir.path().join("flow.db")), "{error}");
    assert!(waited >= Duration::from_millis(1_900) && waited < Duration::from_secs(5), "waited {waited:?}");
    assert!(matches!(store.query(&all(View::Raw)), Err(StoreError::Busy { .. })));
    assert!(!dir.path().join("flow.db.corrupt").exists(), "busy is never corrupt");

    // Released within the wait: the call goes through.
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(held);
    });
    let outcome = store.append(&flows(3, 3)).unwrap();
    release.join().unwrap();
    assert_eq!(outcome.rows, 3);
    assert_eq!(seqs(&store.query(&all(View::Raw)).unwrap()), [1, 2, 3, 4, 5, 6]);
}

#[test]
fn a_full_disk_fails_the_append_keeps_what_was_stored_and_recovers() {
    let Some(tmpfs) = Tmpfs::mount("flows-store-full", "3m") else { return };
    let dir = tmpfs.path().join("log");
    let store = FlowStore::new(&dir, LogCaps::default());
    store.append(&flows(0, 100)).unwrap();
    // Fill what is left.
    let filler = tmpfs.path().join("filler");
    {
        use std::io::Write;
        let mut file = fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        for _ in 0..1024 {
            if file.write_all(&block).and_then(|()| file.sync_all()).is_err() {
                break;
            }
        }
    }
    // Appends fail, with an error that says so, until there is room again; none panics.
    let mut stored = 100;
    let mut failures = 0;
    for round in 0..20 {
        match store.append(&flows(stored, 2_000)) {
            Ok(_) => stored += 2_000,
            Err(error) => {
                failures += 1;
                let text = error.to_string();
                assert!(text.contains("flow.db") || text.contains("flowsum.db"), "{text}");
                assert!(
                    matches!(
                        error,
                        StoreError::NoSpace { .. }
                            | StoreError::SummaryNotMerged { .. }
                            | StoreError::PartlyStored { .. }
                    ),
                    "round {round}: {error:?}"
                );
                if let StoreError::SummaryNotMerged { last, .. } = error {
                    // The raw rows went in; the numbering moved on with them.
                    stored = last as u32;
                }
            }
        }
        if failures >= 3 {
            break;
        }
    }
    assert!(failures >= 3, "the disk never filled ({stored} rows stored)");
    // What was stored before is all there, still readable on the full disk.
    let raw = store.query(&all(View::Raw)).unwrap();
    assert_eq!(seqs(&raw), (1..=u64::from(stored)).collect::<Vec<_>>());
    let pending = store.pending(10).unwrap().unwrap();
    assert_eq!(pending.first, 1);

    // Room again: the next append works and the numbers go on.
    fs::remove_file(&filler).unwrap();
    let outcome = store.append(&flows(stored, 10)).unwrap();
    assert_eq!(outcome.rows, 10);
    let raw = store.query(&all(View::Raw)).unwrap();
    assert_eq!(seqs(&raw), (1..=u64::from(stored) + 10).collect::<Vec<_>>());
}

/// Runs as the writer a parent kills (only when `VEN_STORE_WRITER_DIR` is set): appends
/// flushes of [`KILLED_FLUSH`] distinct flows, bounded, until killed.
const KILLED_FLUSH: u32 = 500;

#[test]
fn killed_writer_child() {
    let Some(dir) = std::env::var_os("VEN_STORE_WRITER_DIR") else { return };
    let store = FlowStore::new(Path::new(&dir), LogCaps::default());
    for flush in 0..10_000u32 {
        store.append(&flows(flush * KILLED_FLUSH, KILLED_FLUSH)).unwrap();
        if flush == 3 {
            fs::write(Path::new(&dir).join("started"), b"").unwrap();
        }
    }
}

#[test]
fn a_writer_killed_mid_flush_loses_at_most_that_flush() {
    let dir = scratch("flows-store-killed");
    let log = dir.path().join("log");
    for attempt in 0..3u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["killed_writer_child", "--exact", "--test-threads=1", "--nocapture"])
            .env("VEN_STORE_WRITER_DIR", &log)
            .spawn()
            .unwrap();
        let started = Instant::now();
        while !log.join("started").exists() {
            assert!(started.elapsed() < Duration::from_secs(30), "the writer did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Somewhere inside a flush (each takes a few milliseconds).
        std::thread::sleep(Duration::from_millis(200 + 37 * attempt));
        child.kill().unwrap();
        child.wait().unwrap();
        fs::remove_file(log.join("started")).unwrap();

        // Whatever committed reads back whole: consecutive numbers, summaries of whole flushes.
        let store = FlowStore::new(&log, LogCaps::default());
        let raw = store.query(&all(View::Raw)).unwrap();
        let numbers = seqs(&raw);
        assert!(!numbers.is_empty());
        assert_eq!(numbers, (1..=numbers.len() as u64).collect::<Vec<_>>(), "attempt {attempt}");
        assert_eq!(numbers.len() as u32 % KILLED_FLUSH, 0, "a flush committed in part");
        let summed: u64 = store
            .query(&all(View::Aggregated))
            .unwrap()
            .rows
            .iter()
            .map(|row| u64::from(row.record.count))
            .sum();
        assert!(
            summed == numbers.len() as u64 || summed + u64::from(KILLED_FLUSH) == numbers.len() as u64,
            "{summed} aggregated for {} raw rows",
            numbers.len()
        );
        assert!(!log.join("flow.db.corrupt").exists() && !log.join("flowsum.db.corrupt").exists());
        // The next writer goes on from there (it appends the same flows again: new rows).
        let outcome = store.append(&flows(0, 1)).unwrap();
        assert!(outcome.recovered.is_empty());
        let last = store.query(&FlowQuery { limit: 0, ..all(View::Raw) }).unwrap().more;
        assert_eq!(last, numbers.len() as u64 + 1);
        // Make the next attempt start from a clean slate.
        fs::remove_dir_all(&log).unwrap();
    }
}
