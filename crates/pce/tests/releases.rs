//! Signed self-upgrade (issue 16), the PCE's side, end to end with the real `pce` binary on
//! loopback: the release store (`pce release-key trust`, `pce release add|list|remove`, run
//! while `pce serve` runs), upgrade orders (`pce upgrade`), the heartbeat answers and bolts that
//! carry them, and the release download (`GET /ven/v1/release`), verified as a VEN verifies it.

use std::path::Path;
use std::process::Output;
use ven_proto::frame::{Event, PceFrame};
use ven_proto::{
    ActivateResponse, AgentEvent, AgentEventKind, ErrorBody, HeartbeatRequest, HeartbeatResponse, HostReport,
    PROTOCOL_VERSION, PolicyState, UpgradeStep, path,
};

mod common;
use common::{DataDir, Server, Ven, cli, cli_ok, event_session, free_port, read_event};

const TARGET: &str = "x86_64-unknown-linux-gnu";
const OTHER_TARGET: &str = "aarch64-unknown-linux-musl";

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> T {
    ven_proto::decode(bytes).expect("postcard body")
}

/// The command failed and said `needle` on stderr.
fn refused(output: Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "accepted; stdout {}", String::from_utf8_lossy(&output.stdout));
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
}

/// A protocol-6 heartbeat naming `target` (and, with `agent_version`, a host report saying so).
fn beat(ven: &Ven, auth: &str, hostname: &str, target: &str, agent_version: Option<&str>) -> Option<String> {
    let host = agent_version.map(|agent_version| HostReport {
        hostname: hostname.to_string(),
        os: "Linux 6.1.0 x86_64".to_string(),
        agent_version: agent_version.to_string(),
        interfaces: Vec::new(),
    });
    let request = HeartbeatRequest {
        applied_policy_version: 0,
        applied_state: PolicyState::Idle,
        apply_error: None,
        host,
        events: Vec::new(),
        host_uptime_s: Some(86_400 + 7),
        target: Some(target.to_string()),
    };
    let (status, body) = ven.post(path::HEARTBEAT, Some(auth), &request);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    decode::<HeartbeatResponse>(&body).upgrade
}

fn activate(ven: &Ven, code: &str, hostname: &str, address: &str) -> (ActivateResponse, String) {
    let (status, body) = ven.activate(code, hostname, address);
    assert_eq!(status, 200);
    let activated: ActivateResponse = decode(&body);
    let auth = ven_proto::bearer(activated.agent_id, &activated.agent_token);
    (activated, auth)
}

fn sign(d: &Path, api: u16, binary: &Path, key: &Path, version: &str, target: &str) -> String {
    let args = ["release", "sign", binary.to_str().unwrap(), "--key", key.to_str().unwrap()];
    cli_ok(d, api, &[&args[..], &["--version", version, "--target", target]].concat())
}

fn add(d: &Path, api: u16, binary: &Path, version: &str, target: &str, signature: &str) -> Output {
    let args = ["release", "add", binary.to_str().unwrap(), "--version", version, "--target", target];
    cli(d, api, &[&args[..], &["--signature", signature]].concat())
}

#[test]
fn releases_are_stored_ordered_announced_and_served_verified() {
    let dir = DataDir(std::env::temp_dir().join(format!("pce-e2e-releases-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let d = dir.0.as_path();
    let (api, events) = (free_port(), free_port());
    let server = Server::start(d, api, events);
    let code = server.line("activation code: ").expect("activation code line");
    let keys = d.join("keys");
    std::fs::create_dir_all(&keys).unwrap();

    // A stand-in agent build, the signing key, the store's trust in its public half.
    let binary = keys.join("ven");
    let mut stand_in = b"\x7fELF\x02\x01\x01".to_vec();
    stand_in.extend((0u32..256 << 10).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    std::fs::write(&binary, &stand_in).unwrap();
    let key = keys.join("release.key");
    let public = cli_ok(d, api, &["release-key", "generate", "--output", key.to_str().unwrap()]);
    let signature = sign(d, api, &binary, &key, "1.2.0", TARGET);
    refused(add(d, api, &binary, "1.2.0", TARGET, &signature), "no release key is trusted yet");
    let trusted = cli_ok(d, api, &["release-key", "trust", &public]);
    assert!(trusted.contains(&public), "{trusted}");
    let other_key = keys.join("other.key");
    let other_public = cli_ok(d, api, &["release-key", "generate", "--output", other_key.to_str().unwrap()]);
    refused(cli(d, api, &["release-key", "trust", &other_public]), "--replace");

    // Refused: another key's signature, a malformed one, a malformed version; nothing stored.
    let other_signature = sign(d, api, &binary, &other_key, "1.2.0", TARGET);
    refused(add(d, api, &binary, "1.2.0", TARGET, &other_signature), "does not verify");
    refused(add(d, api, &binary, "1.2.0", TARGET, &"0f".repeat(63)), "not 128 hex digits");
    refused(add(d, api, &binary, "1.2.0", OTHER_TARGET, &signature), "does not verify");
    refused(add(d, api, &binary, "../1.2.0", TARGET, &signature), "release version");
    assert_eq!(cli_ok(d, api, &["release", "list", "--json"]), "[]");

    // Accepted: a detached signature made elsewhere, and one made here with --signing-key.
    let added = add(d, api, &binary, "1.2.0", TARGET, &signature);
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    refused(add(d, api, &binary, "1.2.0", TARGET, &signature), "already in the store");
    let signing_key = ["--signing-key", key.to_str().unwrap()];
    let base = ["release", "add", binary.to_str().unwrap(), "--version", "1.3.0", "--target", TARGET];
    cli_ok(d, api, &[&base[..], &signing_key].concat());
    let listed: serde_json::Value =
        serde_json::from_str(&cli_ok(d, api, &["release", "list", "--json"])).unwrap();
    let versions: Vec<&str> =
        listed.as_array().unwrap().iter().filter_map(|r| r["version"].as_str()).collect();
    assert_eq!(versions, ["1.2.0", "1.3.0"]);
    assert_eq!(listed[0]["signature"], signature.as_str());

    // Two VENs of protocol 6; web holds an event session.
    let ven = Ven::new(d, api);
    let (web, web_auth) = activate(&ven, &code, "web", "198.18.0.2/24");
    let (db, db_auth) = activate(&ven, &code, "db", "198.18.0.3/24");
    let mut session = event_session(d, events, web.agent_id, &web.agent_token);
    assert!(matches!(read_event(&mut session), PceFrame::Ack { .. }));
    assert!(matches!(read_event(&mut session), PceFrame::Event(Event::PolicyChanged { .. })));
    assert_eq!(beat(&ven, &web_auth, "web", TARGET, None), None, "no order yet");

    // Orders refused: a version the store holds for no target, an unknown host.
    refused(cli(d, api, &["upgrade", "9.9.9", "web"]), "no release 9.9.9");
    refused(cli(d, api, &["upgrade", "1.2.0", "nosuchhost"]), "no workload");

    // The order: a bolt to web's session, the heartbeat answer for its target only.
    let ordered = cli_ok(d, api, &["upgrade", "1.2.0", "web"]);
    assert!(ordered.contains("1 told by lightning bolt, 0 at their next heartbeat"), "{ordered}");
    assert_eq!(
        read_event(&mut session),
        PceFrame::Event(Event::UpgradeRequested { version: "1.2.0".into() })
    );
    assert_eq!(beat(&ven, &web_auth, "web", TARGET, None).as_deref(), Some("1.2.0"));
    assert_eq!(beat(&ven, &web_auth, "web", OTHER_TARGET, None), None, "no build for that target");
    assert_eq!(beat(&ven, &db_auth, "db", TARGET, None), None, "db is not ordered");
    let shown = cli_ok(d, api, &["workload", "show", "web"]);
    assert!(shown.contains(&format!("agent target:   {OTHER_TARGET}")), "{shown}");
    assert!(shown.contains("host uptime:    86407 s (1d 0h 0m)"), "{shown}");
    assert!(shown.contains("upgrade order:  1.2.0"), "{shown}");
    assert!(shown.contains("agent version:  0.1.0"), "{shown}");
    assert_eq!(beat(&ven, &web_auth, "web", TARGET, None).as_deref(), Some("1.2.0"));

    // A session opened after the order (the VEN reconnected) hears it at once.
    drop(session);
    let mut session = event_session(d, events, web.agent_id, &web.agent_token);
    assert!(matches!(read_event(&mut session), PceFrame::Ack { .. }));
    assert!(matches!(read_event(&mut session), PceFrame::Event(Event::PolicyChanged { .. })));
    assert_eq!(
        read_event(&mut session),
        PceFrame::Event(Event::UpgradeRequested { version: "1.2.0".into() })
    );
    drop(session);

    // A VEN of protocol 5 gets the version-5 answer, exactly.
    let (status, body) = ven.old_heartbeat(&web_auth, 5);
    assert_eq!(status, 200);
    let v5: ven_proto::HeartbeatResponseV5 = decode(&body);
    assert_eq!(body, ven_proto::encode(&v5), "nothing a version-5 VEN does not know");

    // The download: the bytes and signature as added, verifying as a VEN verifies them.
    let query = format!("version=1.2.0&target={TARGET}");
    let (status, header, bytes) = ven.release(&web_auth, &query, PROTOCOL_VERSION);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
    assert_eq!((header.as_deref(), bytes.len()), (Some(signature.as_str()), stand_in.len()));
    assert!(bytes == stand_in);
    let manifest = ven_proto::release::Manifest::of_reader("1.2.0", TARGET, &mut bytes.as_slice()).unwrap();
    let pinned = ven_proto::release::parse_key(&public).unwrap();
    manifest
        .verify_signature(&ven_proto::release::parse_signature(&header.unwrap()).unwrap(), &pinned)
        .unwrap();
    let (status, _, body) = ven.release(&web_auth, &query, 5);
    assert_eq!(status, 404, "no such endpoint before protocol 6");
    assert!(decode::<ErrorBody>(&body).message.contains("no VEN API endpoint"));
    let (status, _, body) =
        ven.release(&web_auth, &format!("version=7.0.0&target={TARGET}"), PROTOCOL_VERSION);
    assert_eq!(status, 404);
    assert!(decode::<ErrorBody>(&body).message.contains("no release 7.0.0"));
    let (status, _, _) = ven.release(&web_auth, "version=1.2.0&target=../../etc", PROTOCOL_VERSION);
    assert_eq!(status, 400);
    let (status, _, _) = ven.release(&web_auth, "version=1.2.0", PROTOCOL_VERSION);
    assert_eq!(status, 400);
    let wrong = ven_proto::bearer(web.agent_id, &db.agent_token);
    assert_eq!(ven.release(&wrong, &query, PROTOCOL_VERSION).0, 401);

    // One byte of the stored binary flipped: refused as altered, never served.
    let stored = d.join("releases").join(TARGET).join("1.2.0").join("binary");
    let mut altered = std::fs::read(&stored).unwrap();
    altered[1000] ^= 1;
    std::fs::write(&stored, &altered).unwrap();
    let (status, header, body) = ven.release(&web_auth, &query, PROTOCOL_VERSION);
    assert_eq!((status, header), (500, None));
    let message = decode::<ErrorBody>(&body).message;
    assert!(message.contains("in the PCE's store is altered"), "{message}");
    std::fs::write(&stored, &stand_in).unwrap();
    assert_eq!(ven.release(&web_auth, &query, PROTOCOL_VERSION).0, 200, "whole again");

    // Orders survive a restart.
    server.stop();
    let server = Server::start(d, api, events);
    assert_eq!(beat(&ven, &web_auth, "web", TARGET, None).as_deref(), Some("1.2.0"));
    let (_, _, orders) = ven.admin_get(d, "orgs/1/vens/upgrade");
    assert_eq!(orders["vens"][0]["href"], format!("/orgs/1/workloads/{}", web.agent_id));
    assert_eq!(orders["vens"][0]["release"], "1.2.0");

    // An order for all: db learns at its heartbeat; web's own order overrides it; a VEN that
    // runs the release is not asked again.
    let all = cli_ok(d, api, &["upgrade", "1.3.0", "--all"]);
    assert!(all.contains("0 told by lightning bolt, 1 at their next heartbeat"), "{all}");
    assert_eq!(beat(&ven, &db_auth, "db", TARGET, None).as_deref(), Some("1.3.0"));
    assert_eq!(beat(&ven, &web_auth, "web", TARGET, None).as_deref(), Some("1.2.0"));
    assert_eq!(beat(&ven, &db_auth, "db", TARGET, Some("1.3.0")), None, "already running it");
    assert_eq!(beat(&ven, &db_auth, "db", TARGET, Some("0.1.0")).as_deref(), Some("1.3.0"));

    // Cancelling: web alone (exempt from the all-order too), then all.
    cli_ok(d, api, &["upgrade", "--cancel", "web"]);
    assert_eq!(beat(&ven, &web_auth, "web", TARGET, None), None);
    assert_eq!(beat(&ven, &db_auth, "db", TARGET, None).as_deref(), Some("1.3.0"));
    cli_ok(d, api, &["upgrade", "--cancel", "--all"]);
    assert_eq!(beat(&ven, &db_auth, "db", TARGET, None), None);

    // A release removed is no longer announced.
    cli_ok(d, api, &["upgrade", "1.3.0", "db"]);
    assert_eq!(beat(&ven, &db_auth, "db", TARGET, None).as_deref(), Some("1.3.0"));
    cli_ok(d, api, &["release", "remove", "1.3.0", "--target", TARGET]);
    assert_eq!(beat(&ven, &db_auth, "db", TARGET, None), None);
    refused(cli(d, api, &["release", "remove", "1.3.0", "--target", TARGET]), "no release 1.3.0");

    // Failed upgrade steps are warnings.
    let event = AgentEvent {
        at: 1_795_780_800,
        kind: AgentEventKind::Upgrade {
            version: "1.2.0".into(),
            step: UpgradeStep::RolledBack,
            detail: "no heartbeat in 120 s".into(),
        },
    };
    assert_eq!(ven.heartbeat_with(&db_auth, 0, vec![event]).0, 200);
    let (_, _, listed) = ven.admin_get(d, "orgs/1/events?event_type=agent_upgrade");
    assert_eq!(listed[0]["severity"], "warning", "{listed}");

    // Deactivating a workload drops its order.
    cli_ok(d, api, &["upgrade", "1.2.0", "db"]);
    let (status, _) = ven.call(
        "POST",
        path::DEACTIVATE,
        Some(&db_auth),
        &[(ven_proto::PROTOCOL_HEADER, &PROTOCOL_VERSION.to_string())],
        Vec::new(),
    );
    assert_eq!(status, 204);
    let (_, _, orders) = ven.admin_get(d, "orgs/1/vens/upgrade");
    assert_eq!(orders["vens"], serde_json::json!([]), "{orders}");
    server.stop();
}
