//! `ven gen-supportreport` on a data directory with secrets planted where they could leak: the
//! identity's agent token, an activation code and a token in the configuration, both in a log
//! line too. The report is a ustar file the system's `tar` lists, mode 0600, bounded, with none
//! of the secrets' bytes anywhere. Runs `ven` in a fresh network namespace (its firewall parts
//! read that namespace's tables); needs root and iproute2, skipped loudly without them, a failure
//! under CI=true.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use ven::state::{self, DataDir, Identity, RecordKind};

const VEN: &str = env!("CARGO_BIN_EXE_ven");
const TOKEN: &str = "agent-token-5e1f0c2b9a7d4e3f";
const ACTIVATION_CODE: &str = "1c0de4ac71va7e0000beef";
const CONFIG_TOKEN: &str = "config-api-token-77aa55";

fn namespace() -> Option<ven_lab::netns::Netns> {
    let skip = |why: String| {
        if std::env::var_os("CI").is_some() {
            panic!("cli_supportreport: prerequisite missing under CI: {why}");
        }
        eprintln!("SKIPPED cli_supportreport: {why}");
        None
    };
    if let Err(why) = ven_lab::netns::available() {
        return skip(why);
    }
    if Command::new("tar").arg("--version").output().is_err() {
        return skip("needs tar".into());
    }
    match ven_lab::netns::Netns::new("vensupport") {
        Ok(ns) => Some(ns),
        Err(e) => skip(e.to_string()),
    }
}

#[test]
fn the_report_is_a_bounded_private_tar_without_secrets() {
    let Some(ns) = namespace() else { return };
    let work = std::env::temp_dir().join(format!("ven-supportreport-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let data = DataDir::new(work.join("data"));
    data.ensure().expect("data dir");
    let identity = Identity {
        agent_id: 42,
        agent_token: TOKEN.into(),
        hostname: "appliance".into(),
        management_server: "198.18.0.1:8443".into(),
        event_port: 8444,
        ca_cert_der: vec![0x30, 0x03, 0x02, 0x01, 0x01],
        heartbeat_interval_s: 300,
        activated_at: 1_760_000_000,
    };
    state::write_record(&data.identity_path(), RecordKind::Identity, &identity, 0o600).expect("identity");
    let config = work.join("ven.conf");
    std::fs::write(
        &config,
        format!(
            "nflog_group = 7\nactivation_code = {ACTIVATION_CODE}\napi_token = {CONFIG_TOKEN} # pairing\n"
        ),
    )
    .expect("config");
    // A line that leaks the token and the code verbatim, with no marker before the token.
    let log = format!(
        "2026-12-07T06:00:00Z INFO paired with activation code {ACTIVATION_CODE}\n\
         2026-12-07T06:00:01Z DEBUG request header Bearer {TOKEN}\n\
         2026-12-07T06:00:02Z INFO {CONFIG_TOKEN} in a line by itself\n"
    );
    std::fs::write(data.log_dir().join("agent.log"), log).expect("agent.log");
    // A big log: its tail is kept, cut to the cap and said so.
    let big: String = (0..40_000).map(|i| format!("2026-12-07T06:00:00Z INFO line {i}\n")).collect();
    std::fs::write(data.log_dir().join("vtap.log"), big).expect("vtap.log");

    let path = work.join("report.tar");
    let out = ns
        .command(VEN)
        .args(["gen-supportreport", "--output"])
        .arg(&path)
        .env("VEN_DATA_DIR", data.root())
        .env("VEN_CONFIG", &config)
        .output()
        .expect("run ven gen-supportreport");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Support report written to") && stdout.contains("1 cut"), "{stdout}");

    let metadata = std::fs::metadata(&path).expect("the report");
    assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
    assert!(metadata.len() <= 4 * 1024 * 1024, "the report's cap: {} bytes", metadata.len());
    let listed = Command::new("tar").arg("-tf").arg(&path).output().expect("tar -tf");
    assert!(listed.status.success(), "tar -tf: {}", String::from_utf8_lossy(&listed.stderr));
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.lines().all(|l| l.starts_with("ven-supportreport-")), "{listed}");
    for member in ["/identity.txt", "/config.txt", "/log/agent.log", "/log/vtap.log", "/MANIFEST.txt"] {
        assert!(listed.lines().any(|l| l.ends_with(member)), "{member} missing:\n{listed}");
    }
    let extract = |suffix: &str| {
        let name = listed.lines().find(|l| l.ends_with(suffix)).expect("listed");
        let out = Command::new("tar").arg("-xOf").arg(&path).arg(name).output().expect("tar -xOf");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let identity_part = extract("/identity.txt");
    assert!(identity_part.contains("agent id: 42") && identity_part.contains("agent token: [redacted]"));
    let config_part = extract("/config.txt");
    assert!(config_part.contains("nflog_group = 7"), "the rest of the configuration is kept: {config_part}");
    assert!(config_part.contains("activation_code = [redacted]"), "{config_part}");
    let manifest = extract("/MANIFEST.txt");
    assert!(manifest.contains("log/vtap.log") && manifest.contains("cut: the last"), "{manifest}");
    assert!(extract("/log/vtap.log").ends_with("line 39999\n"), "the end of a log is kept");

    let bytes = std::fs::read(&path).expect("read the report");
    for (what, secret) in
        [("agent token", TOKEN), ("activation code", ACTIVATION_CODE), ("config token", CONFIG_TOKEN)]
    {
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "the {what} is in the report");
    }
    let _ = std::fs::remove_dir_all(&work);
}
