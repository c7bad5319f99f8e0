//! `ven start`, `stop`, `restart`, `enable` and `disable` with the real binaries in the lab's
//! namespaces, on agents with their own data directories (no init system manages them, so the
//! commands act directly): start waits for the agent, stop says goodbye (the PCE isolates the
//! workload at once) and ends within seconds even when the PCE does not answer, and a disabled
//! VEN's boot entry points do nothing.

use std::time::{Duration, Instant};

use ven_lab::scenario::{Host, find_workload};
use ven_lab::{Binaries, Lab, LabOptions};

fn prerequisites(test: &str) -> Option<Binaries> {
    ven_lab::binaries::for_end_to_end_test(test, env!("CARGO_BIN_EXE_ven"), &[])
}

/// Stops the directly started agent on `host` when the test ends, however it ends: the lab does
/// not know that process.
struct StopOnDrop<'a>(&'a Lab, Host);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.ven(self.1, &["stop", "--direct"]);
    }
}

fn ven_ok(lab: &Lab, host: Host, args: &[&str]) -> String {
    let done = lab.ven(host, args).unwrap_or_else(|e| panic!("ven {args:?}: {e}"));
    assert!(done.success(), "ven {args:?}: {}{}", done.stdout, done.stderr);
    done.stdout
}

#[test]
fn direct_start_stop_and_disable() {
    let Some(bins) = prerequisites("direct_start_stop_and_disable") else { return };
    let mut lab = Lab::new(bins, LabOptions { name_prefix: "vensvc".into(), ..LabOptions::default() })
        .expect("building the lab");
    lab.start_pce().expect("start the PCE");
    lab.activate(Host::Db).expect("activate db");
    let _guard = StopOnDrop(&lab, Host::Db);

    let started = ven_ok(&lab, Host::Db, &["start", "--direct"]);
    assert!(started.contains("started the agent"), "{started}");
    assert!(ven_ok(&lab, Host::Db, &["start", "--direct"]).contains("already running"));
    let status = lab.ven_status(Host::Db).expect("ven status");
    assert_eq!(status.agent_running, Some(true));
    let online = lab.wait_until("db online at the PCE", Duration::from_secs(15), |lab| {
        let workloads = lab.workloads()?;
        Ok(find_workload(&workloads, Host::Db).filter(|w| w.online).is_none().then(|| "not yet".to_string()))
    });
    online.expect("db online");

    // Stop: a goodbye, so the PCE takes db offline at once, not after an hour of silence.
    let stopped = ven_ok(&lab, Host::Db, &["stop", "--direct"]);
    assert!(stopped.contains("stopped the agent"), "{stopped}");
    let workloads = lab.workloads().expect("workloads");
    assert_eq!(find_workload(&workloads, Host::Db).map(|w| w.online), Some(false), "isolated at goodbye");

    // With the PCE gone, stop still ends within seconds (the goodbye gives up).
    ven_ok(&lab, Host::Db, &["start", "--direct"]);
    lab.stop_pce().expect("stop the PCE");
    let asked = Instant::now();
    ven_ok(&lab, Host::Db, &["stop", "--direct"]);
    assert!(asked.elapsed() < Duration::from_secs(8), "stop took {:?} with the PCE down", asked.elapsed());
    assert!(ven_ok(&lab, Host::Db, &["stop", "--direct"]).contains("no agent is running"));

    // Disabled: the boot entry points do nothing, and status says so.
    ven_ok(&lab, Host::Db, &["disable"]);
    let agent = ven_ok(&lab, Host::Db, &["agent"]);
    assert!(agent.contains("Disabled"), "{agent}");
    assert!(ven_ok(&lab, Host::Db, &["restore"]).contains("Disabled"));
    assert!(ven_ok(&lab, Host::Db, &["status"]).contains("disabled"));
    ven_ok(&lab, Host::Db, &["enable"]);
    assert!(!ven_ok(&lab, Host::Db, &["status"]).contains("disabled"));
}
