//! The public Illumio clients against the real `pce serve` on loopback: the scripts in
//! `tests/illumio/` use illumio-py as operators do. The clients live in a virtualenv that
//! `.ci/setup` makes (`target/illumio-venv`, or `VEN_ILLUMIO_PYTHON` naming its python).
//! Missing, the tests are skipped loudly, except under CI, where they fail.

mod common;
use common::{DataDir, Server, Ven, cli_ok, free_port};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The virtualenv's python with illumio-py, or why there is none.
fn illumio_python() -> Result<PathBuf, String> {
    let python = match std::env::var_os("VEN_ILLUMIO_PYTHON") {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/illumio-venv/bin/python3"),
    };
    let probe = Command::new(&python).args(["-c", "import illumio"]).output();
    match probe {
        Ok(out) if out.status.success() => Ok(python),
        Ok(out) => Err(format!(
            "{} cannot import illumio: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) => Err(format!("{}: {e} (run .ci/setup)", python.display())),
    }
}

fn prerequisites(test: &str) -> Option<PathBuf> {
    match illumio_python() {
        Ok(python) => Some(python),
        Err(why) if std::env::var_os("CI").is_some() => {
            panic!("{test}: prerequisite missing under CI: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            None
        }
    }
}

/// The python command for a script, in a clean TLS environment: requests lets
/// `REQUESTS_CA_BUNDLE`/`CURL_CA_BUNDLE` override the CA a script passes to `set_tls_settings`
/// (requests issue 3829), and this PCE's CA is in no system bundle.
fn python_command(python: &Path, dir: &Path, api: u16, key: &(String, String)) -> Command {
    let mut command = Command::new(python);
    command
        .env_remove("REQUESTS_CA_BUNDLE")
        .env_remove("CURL_CA_BUNDLE")
        .env("PCE_PORT", api.to_string())
        .env("PCE_CA", dir.join("ca.pem"))
        .env("API_USER", &key.0)
        .env("API_SECRET", &key.1);
    command
}

/// `pce api-key create`: (auth_username, secret).
fn create_api_key(dir: &Path, api: u16) -> (String, String) {
    let out = cli_ok(dir, api, &["api-key", "create", "--name", "illumio-py"]);
    let field = |name: &str| {
        out.lines()
            .find_map(|line| line.strip_prefix(name).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {name} in {out}"))
    };
    (field("auth_username:"), field("secret:"))
}

/// Runs `script` with the PCE's address, CA and an API key; returns its stdout after checking
/// that every check in it passed.
fn run_script(python: &Path, script: &str, dir: &Path, api: u16, key: &(String, String)) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/illumio").join(script);
    let out = python_command(python, dir, api, key).arg(&path).output().expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(" passed, 0 failed"), "{script} ran no checks:\n{stdout}");
    stdout
}

#[test]
fn illumio_py_manages_labels_with_an_api_key() {
    let Some(python) = prerequisites("illumio_py_manages_labels_with_an_api_key") else { return };
    let dir = DataDir(std::env::temp_dir().join(format!("pce-illumio-{}", std::process::id())));
    let (api, events) = (free_port(), free_port());
    let server = Server::start(&dir.0, api, events);
    let key = create_api_key(&dir.0, api);
    assert!(key.0.starts_with("api_"), "{key:?}");
    run_script(&python, "labels.py", &dir.0, api, &key);

    // Only a hash of the secret is stored; a deleted key stops working at once.
    let store = std::fs::read(dir.0.join("pce.redb")).expect("pce.redb");
    let secret = key.1.as_bytes();
    assert!(!store.windows(secret.len()).any(|w| w == secret), "the secret is stored in clear");
    let key_id = key.0.trim_start_matches("api_").to_string();
    cli_ok(&dir.0, api, &["api-key", "delete", &key_id]);
    let listed = cli_ok(&dir.0, api, &["api-key", "list", "--json"]);
    assert!(!listed.contains(&key_id), "{listed}");
    const CONNECT: &str = "import os, illumio
p = illumio.PolicyComputeEngine('https://127.0.0.1', port=os.environ['PCE_PORT'], retry_count=0)
p.set_credentials(os.environ['API_USER'], os.environ['API_SECRET'])
p.set_tls_settings(verify=os.environ['PCE_CA'])
print(p.check_connection())";
    let out = python_command(&python, &dir.0, api, &key).args(["-c", CONNECT]).output().expect("run python");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "False", "a deleted key still connects");
    server.stop();
}

#[test]
fn illumio_py_builds_and_provisions_a_scoped_policy() {
    let Some(python) = prerequisites("illumio_py_builds_and_provisions_a_scoped_policy") else { return };
    let dir = DataDir(std::env::temp_dir().join(format!("pce-illumio-policy-{}", std::process::id())));
    let (api, events) = (free_port(), free_port());
    let server = Server::start(&dir.0, api, events);
    let key = create_api_key(&dir.0, api);
    run_script(&python, "policy.py", &dir.0, api, &key);
    server.stop();
}

/// Pairs `hostname` at `address` with the default profile; its `Bearer id.token`.
fn pair(ven: &Ven, dir: &Path, api: u16, hostname: &str, address: &str) -> String {
    let code = cli_ok(dir, api, &["activation-code"]).trim().to_string();
    let (status, body) = ven.activate(&code, hostname, address);
    assert_eq!(status, 200, "activate {hostname}");
    let answer: ven_proto::ActivateResponse = ven_proto::decode(&body).expect("activation answer");
    format!("Bearer {}.{}", answer.agent_id, answer.agent_token)
}

fn flow(
    src: &str,
    dst: &str,
    protocol: u8,
    port: u16,
    verdict: ven_proto::FlowVerdict,
    count: u32,
) -> ven_proto::FlowRecord {
    let now = ven_proto::clock::now() as u32;
    ven_proto::FlowRecord {
        src: src.parse().expect("address"),
        dst: dst.parse().expect("address"),
        protocol,
        port,
        verdict,
        rule: 0,
        count,
        first_seen: now - 60,
        last_seen: now - 30,
        sampling_scale: 1,
        overflow: false,
        packets: 1,
        bytes: None,
    }
}

#[test]
fn illumio_py_queries_traffic_and_collections_asynchronously() {
    use ven_proto::FlowVerdict::{Allowed, Dropped};
    let Some(python) = prerequisites("illumio_py_queries_traffic_and_collections_asynchronously") else {
        return;
    };
    let dir = DataDir(std::env::temp_dir().join(format!("pce-illumio-traffic-{}", std::process::id())));
    let (api, events) = (free_port(), free_port());
    let server = Server::start(&dir.0, api, events);
    let d = dir.0.as_path();
    let ven = Ven::new(d, api);
    pair(&ven, d, api, "web", "198.18.0.2/24");
    let db = pair(&ven, d, api, "db", "198.18.0.3/24");
    cli_ok(d, api, &["label", "create", "role", "web"]);
    cli_ok(d, api, &["label", "create", "role", "db"]);
    cli_ok(d, api, &["workload", "set", "web", "--label", "role=web"]);
    cli_ok(d, api, &["workload", "set", "db", "--label", "role=db"]);
    let batch = ven_proto::FlowBatch {
        first: 1,
        records: vec![
            flow("198.18.0.2", "198.18.0.3", 6, 5432, Allowed, 3),
            flow("198.18.0.2", "198.18.0.3", 6, 22, Dropped, 4),
            flow("198.18.0.9", "198.18.0.3", 17, 53, Dropped, 1),
        ],
    };
    let (status, _) = ven.post(ven_proto::path::FLOWS, Some(&db), &batch);
    assert_eq!(status, 200, "flow upload");
    let key = create_api_key(d, api);
    run_script(&python, "traffic.py", d, api, &key);
    server.stop();
}

#[test]
fn pylo_loads_the_organisation() {
    let Some(python) = prerequisites("pylo_loads_the_organisation") else { return };
    let dir = DataDir(std::env::temp_dir().join(format!("pce-pylo-{}", std::process::id())));
    let (api, events) = (free_port(), free_port());
    let server = Server::start(&dir.0, api, events);
    let d = dir.0.as_path();
    let ven = Ven::new(d, api);
    pair(&ven, d, api, "web", "198.18.0.2/24");
    pair(&ven, d, api, "db", "198.18.0.3/24");
    cli_ok(d, api, &["label", "create", "role", "web"]);
    cli_ok(d, api, &["label", "create", "role", "db"]);
    cli_ok(
        d,
        api,
        &["rule", "add", "--consumers", "role=web", "--providers", "role=db", "--service", "5432/tcp"],
    );
    cli_ok(d, api, &["provision"]);
    let key = create_api_key(d, api);
    run_script(&python, "pylo_org.py", d, api, &key);
    server.stop();
}
