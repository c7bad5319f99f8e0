//! The fuzz corpora of the PCE's own files (store records, organisation events, PKI files,
//! release manifests) and of its flow uploads, replayed without a fuzzer (issue 17): every file
//! of `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` goes through the function the target calls
//! (`pce::fuzzing`), on the stable toolchain, in the normal `cargo test`.
//!
//! The store seeds are encoded by the product itself:
//! `cargo test -p pce --test fuzz_corpus_store -- --ignored write_store_seeds`.

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// A target's entry point.
type Entry = fn(&[u8]);

const TARGETS: &[(&str, Entry)] = &[
    ("flow_batches", pce::fuzzing::flow_batches),
    ("pce_org_events", pce::fuzzing::org_events),
    ("pce_pem_files", pce::fuzzing::pem_files),
    ("pce_release_manifest", pce::fuzzing::release_manifest),
    ("pce_store_records", pce::fuzzing::store_records),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_file()).collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

#[test]
fn every_corpus_file_and_fixed_crash_replays_cleanly() {
    let mut failures = Vec::new();
    for (name, entry) in TARGETS {
        let mut count = 0;
        for kind in ["corpus", "regressions"] {
            for path in files(&fuzz_dir().join(kind).join(name)) {
                let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                count += 1;
                if let Err(panic) = catch_unwind(AssertUnwindSafe(|| entry(&bytes))) {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failures.push(format!("{}: {message}", path.display()));
                }
            }
        }
        assert!(count > 0, "fuzz/corpus/{name} holds no seed");
    }
    assert!(failures.is_empty(), "{} failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn every_target_is_built() {
    let cargo = fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz/Cargo.toml");
    for (name, _) in TARGETS {
        assert!(cargo.contains(&format!("name = \"{name}\"")), "{name} is not a [[bin]] of fuzz/Cargo.toml");
    }
}

/// The seed store opens, and what it committed reads back (the target's own invariant), so the
/// corpus starts from records the product really writes.
#[test]
fn the_seed_records_open_as_a_store() {
    let seed = pce::fuzzing::seed_store_records().expect("the seed store");
    let text = String::from_utf8_lossy(&seed);
    for table in ["meta", "labels", "workloads", "pairing_profiles", "active_rule_sets", "events"] {
        assert!(text.lines().any(|line| line.starts_with(&format!("{table}\t"))), "no {table} record");
    }
    pce::fuzzing::store_records(&seed);
}

/// The manifest seeds named `valid*` are manifests the store takes, the others ones it refuses:
/// the fuzzer starts from both sides of the parser.
#[test]
fn the_release_manifest_seeds_are_on_the_side_their_name_says() {
    let files = files(&fuzz_dir().join("corpus").join("pce_release_manifest"));
    assert!(files.len() >= 2, "no seeds");
    for path in files {
        let bytes = fs::read(&path).unwrap();
        let valid = path.file_name().unwrap().to_string_lossy().starts_with("valid");
        assert_eq!(pce::fuzzing::release_manifest_is_accepted(&bytes), valid, "{}", path.display());
    }
}

#[test]
#[ignore = "writes fuzz/corpus; run by hand after a format change"]
fn write_store_seeds() {
    let seed = pce::fuzzing::seed_store_records().expect("the seed store");
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = fuzz_dir().join("corpus").join(target);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(name), bytes).unwrap();
    };
    write("pce_store_records", "paired-provisioned-suspended", &seed);
    let text = String::from_utf8_lossy(&seed);
    let mut events = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("events\t") {
            if let Some((id, json)) = rest.split_once('\t') {
                write("pce_org_events", &format!("event-{id}"), json.as_bytes());
                events.push(json.to_string());
            }
        }
    }
    write("pce_org_events", "list", format!("[{}]", events.join(",")).as_bytes());
}
