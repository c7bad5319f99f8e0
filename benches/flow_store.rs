//! The flow stores (`ven::flows::store`) on this machine's disk: how many raw rows one file
//! holds before it rotates at the default 15 MB cap, what one flush costs, and how long a
//! query over a full file takes. Printed, never asserted.
//!
//!   cargo bench --bench flow_store
//!
//! Runs in a fresh directory under $TMPDIR (default /tmp; point it at the board's flash to
//! measure that) and removes it afterwards. Every loop is bounded.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ven::flows::store::{FlowQuery, FlowStore, VerdictFilter, View};
use ven::logdir::LogCaps;
use ven_proto::{FlowRecord, FlowVerdict};

/// Records per flush while filling a file (a busy host's flush interval).
const FILL_FLUSH: usize = 1_000;
/// Most flushes spent looking for the first rotation (2 M rows: far more than a file holds).
const MAX_FILL_FLUSHES: usize = 2_000;
/// Flush sizes timed, and how many times each.
const FLUSH_SIZES: [usize; 2] = [1_000, 10_000];
const TIMED_RUNS: usize = 7;
const QUERY_RUNS: usize = 5;

fn main() {
    let dir = Scratch::new();
    println!("flow store benchmark in {} (redb 2.6, file format v3)", dir.0.display());
    fill_one_file(&dir.0.join("fill"));
    flush_cost(&dir.0.join("flush"));
}

/// Records as a busy host's flush gives them: IPv4 peers across a /16, a few hundred ports,
/// mostly allowed, times around now, counts of a few connections.
fn records(count: usize, salt: u64) -> Vec<FlowRecord> {
    let now = 1_780_000_000u32;
    (0..count as u64)
        .map(|i| {
            let n = (i + salt).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let verdict = match n % 10 {
                0 => FlowVerdict::Dropped,
                1 => FlowVerdict::WouldDrop,
                _ => FlowVerdict::Allowed,
            };
            FlowRecord {
                src: IpAddr::V4(Ipv4Addr::new(10, 1, (n >> 8) as u8, (n >> 16) as u8)),
                dst: IpAddr::V4(Ipv4Addr::new(10, 2, 0, (n >> 24) as u8)),
                protocol: if n % 7 == 0 { 17 } else { 6 },
                port: [22, 53, 80, 443, 5432, 8080, 8443][(n >> 32) as usize % 7],
                verdict,
                rule: if verdict == FlowVerdict::Allowed { 1 + (n >> 40) as u32 % 200 } else { 0 },
                count: 1 + (n >> 48) as u32 % 20,
                first_seen: now + (i / 100) as u32,
                last_seen: now + (i / 100) as u32 + (n % 10) as u32,
                sampling_scale: 1,
                overflow: false,
                packets: 1,
                bytes: None,
            }
        })
        .collect()
}

fn fill_one_file(dir: &Path) {
    let caps = LogCaps::default();
    let store = FlowStore::new(dir, caps);
    let cap = caps.per_file_bytes();
    let mut rows = 0u64;
    let mut flushes = 0;
    let started = Instant::now();
    let mut sizes = Vec::new();
    while flushes < MAX_FILL_FLUSHES {
        let batch = records(FILL_FLUSH, rows);
        let outcome = store.append(&batch).expect("append");
        flushes += 1;
        let len = std::fs::metadata(dir.join("flow.db")).map(|m| m.len()).unwrap_or(0);
        if sizes.last() != Some(&len) {
            sizes.push(len);
        }
        if outcome.rotated.iter().any(|path| path.ends_with("flow.db")) {
            break;
        }
        rows += batch.len() as u64;
    }
    let elapsed = started.elapsed();
    let backup = std::fs::metadata(dir.join("flow.db.1")).map(|m| m.len()).unwrap_or(0);
    let summary = std::fs::metadata(dir.join("flowsum.db")).map(|m| m.len()).unwrap_or(0);
    println!();
    println!("rows per file (cap {cap} bytes, flushes of {FILL_FLUSH} records):");
    println!(
        "  flow.db rotated after {rows} rows; the backup is {backup} bytes ({:.1} bytes/row)",
        backup as f64 / rows as f64
    );
    println!("  flow.db sizes seen while filling: {sizes:?}");
    println!(
        "  flowsum.db: {summary} bytes; {flushes} flushes took {elapsed:.2?} ({:.0} rows/s)",
        rows as f64 / elapsed.as_secs_f64()
    );

    let full = FlowQuery {
        view: View::Raw,
        verdicts: VerdictFilter::Unallowed,
        since: None,
        src: None,
        dst: None,
        port: Some(443),
        protocol: None,
        limit: 100,
    };
    let times: Vec<Duration> = (0..QUERY_RUNS)
        .map(|_| {
            let started = Instant::now();
            let result = store.query(&full).expect("query");
            assert!(result.rows.len() + result.more as usize > 0);
            started.elapsed()
        })
        .collect();
    println!(
        "  query of the raw unallowed view over the full backup and current file: median {:.1?}",
        median(times)
    );
    let aggregated = FlowQuery { view: View::Aggregated, verdicts: VerdictFilter::Any, port: None, ..full };
    let times: Vec<Duration> = (0..QUERY_RUNS)
        .map(|_| {
            let started = Instant::now();
            store.query(&aggregated).expect("query");
            started.elapsed()
        })
        .collect();
    println!("  query of the aggregated view: median {:.1?}", median(times));
    let times: Vec<Duration> = (0..QUERY_RUNS)
        .map(|_| {
            let started = Instant::now();
            let batch = store.pending(ven_proto::MAX_FLOWS_PER_BATCH).expect("pending");
            assert!(batch.is_some());
            started.elapsed()
        })
        .collect();
    println!("  pending({}) from the backup: median {:.1?}", ven_proto::MAX_FLOWS_PER_BATCH, median(times));
    // A flush into a file near its fullest: every open runs redb's recovery over the file.
    let before = written();
    let times: Vec<Duration> = (0..QUERY_RUNS as u64)
        .map(|run| {
            let batch = records(FILL_FLUSH, 10_000_000 + run * FILL_FLUSH as u64);
            let started = Instant::now();
            store.append(&batch).expect("append");
            started.elapsed()
        })
        .collect();
    println!(
        "  append of {FILL_FLUSH} records with both files holding a file's worth: median {:.1?}, {} KB written each",
        median(times),
        (written() - before) / QUERY_RUNS as u64 / 1_000
    );
}

fn flush_cost(dir: &Path) {
    println!();
    println!(
        "flush cost (one append: flow.db and flowsum.db, each one durable commit; median of {TIMED_RUNS}):"
    );
    for size in FLUSH_SIZES {
        let store = FlowStore::new(&dir.join(size.to_string()), LogCaps::default());
        // Warm: both files exist and hold some flows, as on a running agent.
        store.append(&records(size, 0)).expect("append");
        let before = written();
        let times: Vec<Duration> = (0..TIMED_RUNS)
            .map(|run| {
                let batch = records(size, (run as u64 + 1) * 1_000_003);
                let started = Instant::now();
                store.append(&batch).expect("append");
                started.elapsed()
            })
            .collect();
        let bytes = (written() - before) / TIMED_RUNS as u64;
        let median = median(times);
        println!(
            "  {size:>6} records: {:.1} ms ({:.2} us/record), {} KB written per flush",
            median.as_secs_f64() * 1e3,
            median.as_secs_f64() * 1e6 / size as f64,
            bytes / 1_000
        );
    }
    let store = FlowStore::new(&dir.join("ack"), LogCaps::default());
    store.append(&records(10, 0)).expect("append");
    let times: Vec<Duration> = (1..=TIMED_RUNS as u64)
        .map(|through| {
            let started = Instant::now();
            store.acknowledge(through).expect("acknowledge");
            started.elapsed()
        })
        .collect();
    println!("  acknowledge: {:.1} ms", median(times).as_secs_f64() * 1e3);
}

/// Bytes this process has passed to write(2) so far (/proc/self/io `wchar`), 0 when unknown.
fn written() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines().find_map(|line| line.strip_prefix("wchar: ")).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// The benchmark's directory, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("ven-bench-flow-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("scratch directory");
        Self(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
