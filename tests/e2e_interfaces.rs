//! End to end, interface reports: an address added on a workload reaches the PCE at once
//! (`netwatch` hears rtnetlink, the agent heartbeats with its new host report), the PCE puts it
//! into the peers' policies, and traffic from it is allowed well before the next heartbeat (the
//! lab's PCE keeps the spec's 5-minute interval). Removing it takes it out again. Needs root,
//! iproute2, iptables, ipset and python3 (to connect from a chosen source address); skipped
//! loudly without them, a failure under CI=true.
//!
//! All traffic stays inside the lab's namespaces (198.18.0.0/24).

use std::time::{Duration, Instant};

use ven_lab::scenario::{self, Host, find_workload};
use ven_lab::{Binaries, Lab, LabError, LabOptions};

fn prerequisites(test: &str) -> Option<Binaries> {
    ven_lab::binaries::for_end_to_end_test(
        test,
        env!("CARGO_BIN_EXE_ven"),
        &["iptables-save", "ipset", "python3"],
    )
}

fn must<T>(result: Result<T, LabError>, what: &str) -> T {
    result.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Far less than the PCE's heartbeat interval (5 minutes): only the change report gets there.
const REACT: Duration = Duration::from_secs(20);
/// The address web gains: in the lab's segment, on no other host.
const NEW_ADDRESS: &str = "198.18.0.34";

/// Whether a TCP connection from web's `source` to db:5432 is accepted (2 s limit).
fn connects_from(lab: &Lab, source: &str) -> bool {
    let script = format!(
        "python3 -c \"import socket; s = socket.socket(); s.settimeout(2); s.bind(('{source}', 0)); \
         s.connect(('{db}', 5432))\"",
        db = Host::Db.address()
    );
    lab.sh(Host::Web, &script).is_ok()
}

fn db_sets(lab: &Lab) -> String {
    must(lab.firewall(Host::Db), "db's firewall").ipsets
}

#[test]
fn a_new_address_reaches_the_peers_policies_before_the_next_heartbeat() {
    let Some(bins) = prerequisites("a_new_address_reaches_the_peers_policies_before_the_next_heartbeat")
    else {
        return;
    };
    let opts = LabOptions { name_prefix: "venif".into(), ..LabOptions::default() };
    let mut lab = Lab::new(bins, opts).expect("building the lab");
    let report = scenario::run_demo(&mut lab, &mut |line| eprintln!("{line}")).expect("the demo");
    assert!(report.probes.iter().all(|p| p.ok()), "demo probes: {:#?}", report.probes);
    assert!(!db_sets(&lab).contains(NEW_ADDRESS), "no set holds {NEW_ADDRESS} yet");

    must(lab.sh(Host::Web, &format!("ip addr add {NEW_ADDRESS}/24 dev eth0")), "adding web's address");
    let added = Instant::now();
    // Dropped until db's policy holds the address (enforced: only web's addresses may connect).
    let allowed = lab.wait_until("db allowing web's new address", REACT, |lab| {
        Ok(if connects_from(lab, NEW_ADDRESS) { None } else { Some("web's new address is dropped".into()) })
    });
    must(allowed, "web's new address in db's policy");
    eprintln!("web's new address allowed by db {:.1} s after it was added", added.elapsed().as_secs_f64());
    assert!(db_sets(&lab).contains(NEW_ADDRESS), "db's sets hold {NEW_ADDRESS}");
    let workloads = must(lab.workloads(), "pce workload list");
    let web = find_workload(&workloads, Host::Web).expect("web at the PCE");
    assert!(web.online, "web stays online: {web:?}");
    assert!(connects_from(&lab, &Host::Web.address().to_string()), "web's first address still connects");

    must(lab.sh(Host::Web, &format!("ip addr del {NEW_ADDRESS}/24 dev eth0")), "removing web's address");
    let removed = lab.wait_until("db's sets without web's old address", REACT, |lab| {
        let sets = lab.firewall(Host::Db)?.ipsets;
        Ok(if sets.contains(NEW_ADDRESS) { Some(format!("still there:\n{sets}")) } else { None })
    });
    must(removed, "web's removed address out of db's policy");
}
