//! End to end, clones (issue 16): a running agent's data directory copied to a third namespace
//! and started there authenticates as the same workload. With clone tokens the PCE keeps the
//! original whole: web's access to db never fails, the PCE never records the copy's address for
//! db, the copy's goodbye does not take db offline, the PCE raises `clone_detected`, the copy's
//! `ven status` says "suspected clone", and once the copy is gone db is as it was. With
//! `clone_reactivate = yes` the copy re-pairs as a workload of its own instead.
//!
//! The lab runs the `pce` binary of the target directory: `cargo build -p pce` first.
//!
//! Needs root, iproute2, iptables and ipset; skipped loudly without them, a failure under CI=true.
//! All traffic stays inside the lab's namespaces (198.18.0.0/24; the copy is 198.18.0.4).

use std::time::{Duration, Instant};

use ven_lab::probe::Verdict;
use ven_lab::scenario::{self, Host, find_workload};
use ven_lab::{Binaries, Lab, LabError, LabOptions};

fn prerequisites(test: &str) -> Option<Binaries> {
    ven_lab::binaries::for_end_to_end_test(test, env!("CARGO_BIN_EXE_ven"), &["iptables-save", "ipset"])
}

fn must<T>(result: Result<T, LabError>, what: &str) -> T {
    result.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// The PCE's (and so the agents') heartbeat interval here: the copy and the original both call
/// in within seconds. The clone guard's grace is two intervals.
const HEARTBEAT_S: u32 = 5;
/// How long both copies run side by side, probing throughout.
const SIDE_BY_SIDE: Duration = Duration::from_secs(30);
/// Pause between probes (each is bounded by the lab's connect timeout).
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// At most this many probes in any phase.
const MAX_PROBES: usize = 80;
const DB_PORT: u16 = 5432;

/// What went wrong for db while the copy ran, if anything.
struct Watch {
    probes: usize,
    failed: Vec<String>,
    copy_address_recorded: Vec<String>,
}

impl Watch {
    fn new() -> Self {
        Watch { probes: 0, failed: Vec::new(), copy_address_recorded: Vec::new() }
    }

    /// One round: web connects to db, and neither the PCE's view of db nor web's firewall holds
    /// the copy's address.
    fn round(&mut self, lab: &Lab, at: Duration) {
        self.probes += 1;
        match lab.probe(Host::Web, Host::Db, DB_PORT) {
            Ok(Verdict::Allowed) => {}
            Ok(other) => self.failed.push(format!("{at:?}: web -> db:{DB_PORT} {other:?}")),
            Err(e) => self.failed.push(format!("{at:?}: probing: {e}")),
        }
        let copy = Host::Copy.address().to_string();
        let workloads = must(lab.workloads(), "pce workload list");
        let db = find_workload(&workloads, Host::Db).expect("db at the PCE");
        if db.addresses.contains(&copy) || !db.online {
            self.copy_address_recorded.push(format!("{at:?}: the PCE's db: {db:?}"));
        }
        let sets = must(lab.firewall(Host::Web), "web's firewall").ipsets;
        if sets.contains(&copy) {
            self.copy_address_recorded.push(format!("{at:?}: web's sets hold {copy}:\n{sets}"));
        }
    }

    /// Rounds until `how_long` passed or [`MAX_PROBES`] were made.
    fn during(&mut self, lab: &Lab, how_long: Duration) {
        let start = Instant::now();
        let mut made = 0;
        while start.elapsed() < how_long && made < MAX_PROBES {
            self.round(lab, start.elapsed());
            made += 1;
            std::thread::sleep(PROBE_EVERY);
        }
    }

    fn assert_whole(&self, phase: &str) {
        assert!(self.probes > 0, "{phase}: no probe made");
        assert!(
            self.failed.is_empty(),
            "{phase}: {} of {} probes from web to db failed:\n{}",
            self.failed.len(),
            self.probes,
            self.failed.join("\n")
        );
        assert!(self.copy_address_recorded.is_empty(), "{phase}: {}", self.copy_address_recorded.join("\n"));
    }
}

/// Stops the copy's agent when the test ends, however it ends.
struct StopCopy<'a>(&'a Lab);

impl Drop for StopCopy<'_> {
    fn drop(&mut self) {
        let _ = self.0.ven(Host::Copy, &["stop", "--direct"]);
    }
}

fn db_online(lab: &Lab) -> bool {
    find_workload(&must(lab.workloads(), "pce workload list"), Host::Db).is_some_and(|w| w.online)
}

/// The demo (web and db enforced, web may reach db:5432), checked whole.
fn demo_lab(test: &str, prefix: &str, ven_config: Option<&str>) -> Option<Lab> {
    let bins = prerequisites(test)?;
    let opts = LabOptions {
        name_prefix: prefix.into(),
        heartbeat_interval: Some(HEARTBEAT_S),
        copy_host: true,
        ven_config: ven_config.map(str::to_string),
        ..LabOptions::default()
    };
    let mut lab = Lab::new(bins, opts).expect("building the lab");
    let report = scenario::run_demo(&mut lab, &mut |line| eprintln!("{line}")).expect("the demo");
    assert!(report.probes.iter().all(|p| p.ok()), "demo probes: {:#?}", report.probes);
    let mut before = Watch::new();
    before.during(&lab, Duration::from_secs(2));
    before.assert_whole("before the copy");
    Some(lab)
}

/// Copies db's data directory while its agent runs, as a golden image would be (its socket is
/// the running agent's and stays behind), and starts an agent on it in the copy's namespace.
fn start_copy(lab: &Lab) {
    let (db_dir, copy_dir) = (lab.data_dir(Host::Db), lab.data_dir(Host::Copy));
    let copied =
        std::process::Command::new("cp").arg("-a").arg(&db_dir).arg(&copy_dir).status().expect("running cp");
    assert!(copied.success(), "copying {} to {}", db_dir.display(), copy_dir.display());
    let _ = std::fs::remove_file(copy_dir.join("agent.sock"));
    let started = must(lab.ven(Host::Copy, &["start", "--direct"]), "ven start --direct on copy");
    assert!(started.success(), "ven start on copy: {}{}", started.stdout, started.stderr);
}

#[test]
fn a_copied_data_directory_cannot_harm_the_original() {
    let test = "a_copied_data_directory_cannot_harm_the_original";
    let Some(lab) = demo_lab(test, "venclone", None) else { return };
    let _stop_copy = StopCopy(&lab);
    start_copy(&lab);

    let mut side_by_side = Watch::new();
    side_by_side.during(&lab, SIDE_BY_SIDE);
    side_by_side.assert_whole("while the copy runs");

    let events = must(lab.events(), "pce events");
    let detected: Vec<_> = events.iter().filter(|e| e.event_type == "clone_detected").collect();
    assert_eq!(detected.len(), 1, "one clone_detected event: {events:#?}");
    assert_eq!(detected[0].hostname.as_deref(), Some(Host::Db.name()), "{detected:#?}");
    let offline: Vec<_> = events.iter().filter(|e| e.event_type == "workload_offline").collect();
    assert!(offline.is_empty(), "db never went offline: {offline:#?}");

    let said =
        lab.wait_until("the copy's ven status saying suspected clone", Duration::from_secs(30), |lab| {
            let text = lab.ven_status_text(Host::Copy)?;
            Ok(if text.contains("suspected clone") { None } else { Some(text) })
        });
    must(said, "the copy's status");
    let original = must(lab.ven_status_text(Host::Db), "db's ven status");
    assert!(!original.contains("suspected clone"), "the original is no clone:\n{original}");

    // The copy goes: its goodbye must not isolate the original.
    let stopped = must(lab.ven(Host::Copy, &["stop", "--direct"]), "ven stop --direct on copy");
    assert!(stopped.success(), "ven stop on copy: {}{}", stopped.stdout, stopped.stderr);
    assert!(db_online(&lab), "db stays online after the copy's goodbye");
    let mut after = Watch::new();
    after.during(&lab, Duration::from_secs(u64::from(HEARTBEAT_S) * 3));
    after.assert_whole("after the copy is gone");
    assert!(db_online(&lab), "db online after the copy is gone");
    let events = must(lab.events(), "pce events");
    let offline: Vec<_> = events.iter().filter(|e| e.event_type == "workload_offline").collect();
    assert!(offline.is_empty(), "db never went offline: {offline:#?}");
    let workloads = must(lab.workloads(), "pce workload list");
    let db = find_workload(&workloads, Host::Db).expect("db at the PCE");
    assert_eq!(db.addresses, vec![Host::Db.address().to_string()], "db whole at the PCE: {db:?}");
    must(lab.check_daemons(), "the lab's daemons");
}

#[test]
fn a_suspected_clone_re_pairs_when_the_configuration_allows() {
    let test = "a_suspected_clone_re_pairs_when_the_configuration_allows";
    let Some(lab) = demo_lab(test, "venrepair", Some("clone_reactivate = yes\n")) else { return };
    let db_id = find_workload(&must(lab.workloads(), "pce workload list"), Host::Db).expect("db").id;
    let _stop_copy = StopCopy(&lab);
    start_copy(&lab);
    let mut side_by_side = Watch::new();
    let start = Instant::now();
    let mut repaired = None;
    while start.elapsed() < SIDE_BY_SIDE && repaired.is_none() {
        side_by_side.round(&lab, start.elapsed());
        let status = must(lab.ven_status(Host::Copy), "the copy's ven status");
        if status.agent_id.is_some_and(|id| id != db_id) && status.connectivity.as_deref() == Some("online") {
            repaired = status.agent_id;
        }
        std::thread::sleep(PROBE_EVERY);
    }
    side_by_side.assert_whole("while the copy re-pairs");
    let copy_id = repaired.unwrap_or_else(|| panic!("the copy re-paired within {SIDE_BY_SIDE:?}"));
    let workloads = must(lab.workloads(), "pce workload list");
    let copy = workloads.iter().find(|w| w.id == copy_id).expect("the copy's new workload at the PCE");
    assert!(copy.online, "{copy:?}");
    assert_eq!(copy.addresses, vec![Host::Copy.address().to_string()], "the copy's own address: {copy:?}");
    let db = find_workload(&workloads, Host::Db).expect("db at the PCE");
    assert_eq!((db.id, db.online), (db_id, true), "{db:?}");
    assert_eq!(db.addresses, vec![Host::Db.address().to_string()], "db whole at the PCE: {db:?}");
    let events = must(lab.events(), "pce events");
    assert!(events.iter().any(|e| e.event_type == "clone_detected"), "{events:#?}");
    assert!(
        events
            .iter()
            .any(|e| e.event_type == "agent_activated" && e.details["reactivated_clone_of"] == db_id),
        "an activation naming db: {events:#?}"
    );
    let status = must(lab.ven_status_text(Host::Copy), "the copy's ven status");
    assert!(!status.contains("suspected clone"), "{status}");
    let mut after = Watch::new();
    after.during(&lab, Duration::from_secs(u64::from(HEARTBEAT_S) * 2));
    after.assert_whole("after the copy re-paired");
}
