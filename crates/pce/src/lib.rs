//! `pce`, the reference Policy Compute Engine for ven: `pce serve` runs it (VEN API, admin API,
//! event service); the other commands administer a running one through its admin API. The binary
//! is a thin `main` over [`main`]; the library exists for that and for the fuzz targets.
//!
//! Map: `cli` (arguments), `serve` (the process: data directory, listeners, connection caps,
//! signals), `admission` (who may hold a connection slot, and how long before authenticating),
//! `app` (the `App` the handlers share: store, flows, sessions, jobs; housekeeping; the admin key
//! file), `http` (HTTP/1.1 server: credentials checked on the head, bounded bodies), `tls` (CA,
//! certificates, server configuration), `crypto` (random secrets, SHA-256, constant-time
//! comparison), `fsutil` (safe file replacement, data directory checks), `venapi` (the VEN API),
//! `api/` (the admin API in Illumio's shapes, one module per resource, async jobs), `events`
//! (event service sessions), `sessions` (the registry of connected agents), `store/` (the state:
//! records in redb behind a `Backend` interface, policy objects and provisioning, pairing
//! profiles and keys), `policy/` (the policy objects' model and the per-workload computation,
//! pure), `orgevents`
//! (organisation events: ring, CEF and LEEF), `flows` (uploaded flow summaries: checks,
//! de-duplication, bounded store, append-only log), `supportreports` (support reports asked of
//! VENs: the requests waiting and the archives received, bounded, crash-safe), `release` (release
//! signing and the release commands, offline), `releases` (the signed release store on disk),
//! `upgrades` (upgrade orders, persisted), `traffic` (the
//! traffic query: parameters, filter, JSON), `ctl` (admin client), `clock`.
//!
//! Dependencies point one way (a test below checks that `use crate::` makes no cycle):
//! `serve` -> `api/`, `venapi`, `events` -> `app` -> `store/`, `flows`, `sessions`, `supportreports`,
//! `upgrades`; `api/`, `venapi`, `release` -> `releases`;
//! `api/` -> `store/` -> `policy/` (the pure model and computation the store keeps), `orgevents`,
//! `crypto`; `traffic` -> `flows`; `tls` -> `crypto`. `ctl` takes only constants and types.
#![forbid(unsafe_code)]

mod admission;
mod api;
mod app;
mod cli;
use ven_proto::clock;
mod crypto;
mod ctl;
mod events;
mod flows;
mod fsutil;
mod http;
mod orgevents;
mod policy;
mod release;
mod releases;
mod serve;
mod sessions;
mod store;
mod supportreports;
mod tls;
mod traffic;
mod upgrades;
mod venapi;

use std::process::ExitCode;

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Serve(#[from] serve::ServeError),
    #[error(transparent)]
    Ctl(#[from] ctl::CtlError),
    #[error(transparent)]
    Release(#[from] release::ReleaseToolError),
}

/// The `pce` command: parses the arguments, runs the command, reports an error on stderr.
pub fn main() -> ExitCode {
    init_logging();
    let result = cli::parse().map_err(Error::Usage).and_then(|command| match command {
        cli::Command::Serve(config) => serve::run(config).map_err(Error::from),
        cli::Command::Admin(target, command) => ctl::run(target, command).map_err(Error::from),
        cli::Command::Release(command) => release::run(command).map_err(Error::from),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pce: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Entry points for the fuzz targets (`fuzz/fuzz_targets/flow_batches.rs`); not an API.
#[doc(hidden)]
pub mod fuzzing {
    // The PCE's own files (crates/pce/tests/fuzz_corpus_store.rs replays their corpora).
    pub use crate::orgevents::fuzz_events as org_events;
    pub use crate::store::{fuzz_seed_records as seed_store_records, fuzz_store_records as store_records};
    pub use crate::tls::fuzz_pem as pem_files;
    /// The `flow_batches` target: `data` as a flow batch, a flow log and a traffic query.
    pub fn flow_batches(data: &[u8]) {
        flow_batch(data);
        flow_log(data);
        traffic_query(data);
    }

    /// An upload of `data` as a flow batch (see `flows::fuzz_flow_batch`), then a query over it.
    pub fn flow_batch(data: &[u8]) {
        if let Some(store) = crate::flows::fuzz_flow_batch(data) {
            let selection = crate::traffic::select(&store, &crate::traffic::Query::default());
            assert_eq!(selection.total, store.flows().len());
        }
    }
    pub use crate::flows::fuzz_flow_log as flow_log;
    pub use crate::traffic::fuzz_query as traffic_query;

    /// What an unauthenticated client sends first on the API port: `data` as one connection's
    /// bytes through the request head parser, the body framing and the serve loop.
    pub use crate::http::fuzz_connection as http_connection;

    /// What an unauthenticated client sends first on the event port: `data` after its first
    /// byte as the start of a session, delivered in two reads split where that byte says; a
    /// Hello alone or an error.
    pub fn event_hello(data: &[u8]) {
        let Some((split, session)) = data.split_first() else { return };
        if let Ok(Some(hello)) = crate::events::fuzz_hello(session, usize::from(*split)) {
            assert!(hello.agent_token.len() <= ven_proto::frame::MAX_FRAME_BYTES);
        }
    }

    /// `POST /ven/v1/support_report` bodies: the upload's decoder and the archive check.
    pub use crate::supportreports::fuzz_upload as support_report_upload;

    /// The admin API's hrefs, ids, query values, credentials and JSON bodies (see
    /// `api::fuzz_admin_input`).
    pub use crate::api::fuzz_admin_input as admin_input;

    /// A release manifest file as the release store reads it (see `releases::fuzz_manifest`).
    pub use crate::releases::fuzz_manifest as release_manifest;

    /// Whether the release store takes `data` as a manifest file (the seeds hold some it takes).
    pub fn release_manifest_is_accepted(data: &[u8]) -> bool {
        crate::releases::parse_manifest(data).is_ok()
    }
}

/// Logs to stderr; `PCE_LOG` = error, warn, info (default), debug or trace.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        // Our own modules only at debug and trace: rustls is chatty there.
        let ours = record.target().starts_with("pce");
        if self.enabled(record.metadata()) && (ours || record.level() <= log::Level::Info) {
            eprintln!("pce: {} {}", record.level().as_str().to_ascii_lowercase(), record.args());
        }
    }

    fn flush(&self) {}
}

fn init_logging() {
    static LOGGER: StderrLogger = StderrLogger;
    let level = std::env::var("PCE_LOG").ok().and_then(|v| v.parse().ok()).unwrap_or(log::LevelFilter::Info);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// The top-level module a source file belongs to (`api/jobs.rs` -> `api`).
    fn module_of(relative: &Path) -> String {
        let first = relative.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned());
        first.unwrap_or_default().trim_end_matches(".rs").to_string()
    }

    fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// `a -> b` when a file of module `a` names `crate::b` outside its tests; no module may reach
    /// itself again through these edges.
    #[test]
    fn module_dependencies_have_no_cycles() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&root, &mut files);
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in files {
            let from = module_of(file.strip_prefix(&root).unwrap());
            if from == "lib" || from == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            for (index, _) in code.match_indices("crate::") {
                let name: String = code[index + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let line_start = code[..index].rfind('\n').map_or(0, |i| i + 1);
                if code[line_start..index].trim_start().starts_with("//") || name.is_empty() || name == from {
                    continue;
                }
                edges.entry(from.clone()).or_default().insert(name);
            }
        }
        assert!(
            edges.get("serve").is_some_and(|to| to.contains("app")),
            "the scan sees serve -> app: {edges:?}"
        );
        // Depth-first search for a path back to the start.
        for start in edges.keys() {
            let mut stack: Vec<(String, Vec<String>)> = vec![(start.clone(), vec![start.clone()])];
            let mut seen = BTreeSet::new();
            while let Some((node, path)) = stack.pop() {
                for next in edges.get(&node).into_iter().flatten() {
                    assert!(next != start, "module cycle: {} -> {next}", path.join(" -> "));
                    if seen.insert(next.clone()) {
                        let mut longer = path.clone();
                        longer.push(next.clone());
                        stack.push((next.clone(), longer));
                    }
                }
            }
        }
    }
}
