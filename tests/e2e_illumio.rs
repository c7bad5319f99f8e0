//! End to end with the public Illumio client: illumio-py (from the virtualenv `.ci/setup`
//! makes) configures the real `pce` in the lab — an unmanaged workload standing for the `web`
//! host, a pairing profile for databases, a pairing key — and a real `ven` on `db` pairs with that
//! key. The profile's labels and enforcement mode reach the workload, the policy admits the
//! unmanaged workload, and real TCP from `web` shows it. Needs root, iproute2 and the virtualenv;
//! skipped loudly without them, a failure under CI=true.

use std::path::PathBuf;
use std::time::Duration;

use ven_lab::probe::Verdict;
use ven_lab::scenario::{Host, find_workload, management_server};
use ven_lab::{Binaries, Lab, LabOptions};

fn illumio_python() -> PathBuf {
    match std::env::var_os("VEN_ILLUMIO_PYTHON") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/illumio-venv/bin/python3"),
    }
}

fn prerequisites(test: &str) -> Option<Binaries> {
    let python = illumio_python();
    let tool = python.to_string_lossy().into_owned();
    ven_lab::binaries::for_end_to_end_test(test, env!("CARGO_BIN_EXE_ven"), &[&tool])
}

/// A value printed by `pce api-key create` (`auth_username:`, `secret:`).
fn field(output: &str, name: &str) -> String {
    output
        .lines()
        .find_map(|line| line.strip_prefix(name).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("no {name} in {output}"))
}

#[test]
fn a_ven_pairs_with_an_illumio_py_pairing_key_and_gets_its_profile_and_policy() {
    let test = "a_ven_pairs_with_an_illumio_py_pairing_key_and_gets_its_profile_and_policy";
    let Some(bins) = prerequisites(test) else { return };
    let mut lab = Lab::new(bins, LabOptions { name_prefix: "venil".into(), ..LabOptions::default() })
        .expect("building the lab");
    let pairing = lab.start_pce().expect("starting the PCE");
    let key = lab.pce(&["api-key", "create", "--name", "e2e"]).expect("pce api-key create").stdout;

    // The operator's script, run on the PCE host: web's address becomes an unmanaged workload
    // labelled role=web; the "databases" profile gives role=db and full enforcement.
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crates/pce/tests/illumio/workloads.py");
    let mut python = lab.command_in(Host::Pce, illumio_python());
    python
        .arg(&script)
        .env_remove("REQUESTS_CA_BUNDLE")
        .env_remove("CURL_CA_BUNDLE")
        .env("PCE_HOST", Host::Pce.address().to_string())
        .env("PCE_PORT", ven_proto::DEFAULT_API_PORT.to_string())
        .env("PCE_CA", lab.data_dir(Host::Pce).join("ca.pem"))
        .env("API_USER", field(&key, "auth_username:"))
        .env("API_SECRET", field(&key, "secret:"))
        .env("UNMANAGED_ADDRESS", Host::Web.address().to_string());
    let out = lab.run(python).expect("run workloads.py");
    assert!(
        out.success() && out.stdout.contains(" passed, 0 failed"),
        "workloads.py:\n{}{}",
        out.stdout,
        out.stderr
    );
    let pairing_key = field(&out.stdout, "pairing key:");

    // web may reach db on 5432 (the rule goes to the "Default" rule set).
    lab.pce(&["rule", "add", "--consumers", "role=web", "--providers", "role=db", "--service", "5432/tcp"])
        .expect("pce rule add");
    lab.pce(&["provision"]).expect("pce provision");

    let paired = lab
        .try_activate(Host::Db, &management_server(), &pairing_key, &pairing.ca_fingerprint)
        .expect("ven activate on db");
    assert!(paired.success(), "db pairs with the profile's key: {}{}", paired.stdout, paired.stderr);
    lab.start_agent(Host::Db).expect("ven agent on db");
    lab.wait_for_policy(&[Host::Db], "enforced", Duration::from_secs(20))
        .expect("db enforced by its profile");
    let workloads = lab.workloads().expect("pce workload list");
    let db = find_workload(&workloads, Host::Db).expect("db at the PCE");
    assert_eq!(db.label("role"), Some("db"), "the profile's label: {db:?}");

    // The unmanaged workload is db's peer: web connects to 5432, not to 8080 (22 is a fail-safe).
    lab.listen(Host::Db, 5432).expect("listen on db:5432");
    lab.listen(Host::Db, 8080).expect("listen on db:8080");
    assert_eq!(lab.probe(Host::Web, Host::Db, 5432).expect("probe 5432"), Verdict::Allowed);
    assert_eq!(lab.probe(Host::Web, Host::Db, 8080).expect("probe 8080"), Verdict::Dropped);

    // The key allowed one use: a second host is refused, clearly, and pairs nothing.
    let again = lab
        .try_activate(Host::Web, &management_server(), &pairing_key, &pairing.ca_fingerprint)
        .expect("ven activate on web");
    assert!(!again.success(), "a used-up key must not pair: {}", again.stdout);
    assert!(again.stderr.contains("used 1 time"), "the refusal says why: {}", again.stderr);
    assert_eq!(lab.workloads().expect("workloads").len(), workloads.len(), "nothing was paired");
}
