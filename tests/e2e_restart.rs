//! End to end, with the real binaries in the lab's namespaces: `ven restart` is not a goodbye
//! (the PCE keeps the workload in its peers' policies while the agent comes back, where `ven stop`
//! takes it out at once), and the listening services the agent reports reach the PCE
//! (`pce workload services`). The agents are started directly (`ven start --direct`), as
//! several agents with their own data directories would be on one host.

use std::time::{Duration, Instant};

use ven_lab::scenario::{Host, find_workload};
use ven_lab::{Binaries, Lab, LabOptions};

fn prerequisites(test: &str) -> Option<Binaries> {
    ven_lab::binaries::for_end_to_end_test(test, env!("CARGO_BIN_EXE_ven"), &[])
}

/// Stops the directly started agent on `host` when the test ends, however it ends.
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

fn db_online(lab: &Lab) -> bool {
    let workloads = lab.workloads().expect("pce workload list");
    find_workload(&workloads, Host::Db).is_some_and(|w| w.online)
}

#[test]
fn a_restart_keeps_the_workload_online_and_a_stop_does_not() {
    let Some(bins) = prerequisites("a_restart_keeps_the_workload_online_and_a_stop_does_not") else { return };
    // Services are read every 5 s here (30 s by default).
    let opts = LabOptions {
        name_prefix: "venrst".into(),
        ven_config: Some("service_report_interval_s = 5\n".into()),
        ..LabOptions::default()
    };
    let mut lab = Lab::new(bins, opts).expect("building the lab");
    lab.start_pce().expect("start the PCE");
    lab.activate(Host::Db).expect("activate db");
    let _guard = StopOnDrop(&lab, Host::Db);
    ven_ok(&lab, Host::Db, &["start", "--direct"]);
    let online = lab.wait_until("db online at the PCE", Duration::from_secs(15), |lab| {
        Ok((!db_online(lab)).then(|| "not yet".to_string()))
    });
    online.expect("db online");

    // Listening services: db's agent reports what listens in its namespace.
    lab.listen(Host::Db, 5432).expect("listening on db:5432");
    let reported =
        lab.wait_until("db's listener in `pce workload services db`", Duration::from_secs(20), |lab| {
            let table = lab.pce(&["workload", "services", "db"])?.stdout;
            Ok(
                if table
                    .lines()
                    .any(|l| l.starts_with("tcp") && l.contains("198.18.0.3") && l.contains("5432"))
                {
                    None
                } else {
                    Some(table)
                },
            )
        });
    reported.expect("services at the PCE");

    // A restart: db never leaves its peers' policies.
    let restarted = ven_ok(&lab, Host::Db, &["restart", "--direct"]);
    assert!(restarted.contains("started the agent"), "{restarted}");
    assert!(db_online(&lab), "db stays online through `ven restart`");
    let events = lab.events().expect("pce events");
    let offline: Vec<_> = events.iter().filter(|e| e.event_type == "workload_offline").collect();
    assert!(offline.is_empty(), "a restart is not a goodbye: {offline:#?}");
    assert_eq!(lab.ven_status(Host::Db).expect("ven status").agent_running, Some(true));

    // A stop is a goodbye: offline at once.
    let asked = Instant::now();
    ven_ok(&lab, Host::Db, &["stop", "--direct"]);
    assert!(!db_online(&lab), "db offline at once after `ven stop` ({:?})", asked.elapsed());
}
