//! The PCE's state survives SIGKILL at any point: a stream of admin writes (labels) and VEN
//! traffic (activations, heartbeats) runs against the real `pce serve`, which is killed with
//! SIGKILL mid-stream and restarted, round after round; every change a client saw acknowledged
//! must be there after the restart. Bounded: a few rounds of at most a couple of seconds.

mod common;
use common::{DataDir, Server, Ven, cli_ok, free_port};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use ven_proto::{ActivateResponse, HeartbeatRequest, PROTOCOL_HEADER, PolicyState, path};

const ROUNDS: u64 = 4;
/// Writes per writer thread and round at most (each is one fsynced commit).
const MAX_WRITES_PER_ROUND: usize = 2_000;

/// POST /api/v2/labels with the admin key; the status, or `None` when the PCE is gone.
fn create_label(ven: &Ven, admin_key: &str, value: &str) -> Option<u16> {
    let url = format!("{}/api/v2/labels", ven.base);
    let body = serde_json::json!({ "key": "crash", "value": value }).to_string();
    let response = ven
        .agent
        .post(&url)
        .header("authorization", &format!("Bearer {admin_key}"))
        .header("content-type", "application/json")
        .send(body)
        .ok()?;
    Some(response.status().as_u16())
}

fn label_values(ven: &Ven, dir: &std::path::Path) -> Vec<String> {
    let (status, _, labels) = ven.admin_get(dir, "labels");
    assert_eq!(status, 200);
    labels.as_array().expect("array").iter().filter_map(|l| l["value"].as_str().map(String::from)).collect()
}

/// Activates a workload; its `Bearer id.token`, or `None` when the PCE is gone or refused.
fn activate(ven: &Ven, code: &str, name: &str) -> Option<String> {
    let host = ven_proto::HostReport {
        hostname: name.to_string(),
        os: "Linux".into(),
        agent_version: "0.1.0".into(),
        interfaces: vec![ven_proto::Interface {
            name: "eth0".into(),
            addresses: vec![common::net("198.18.1.1/24")],
        }],
    };
    let request = ven_proto::ActivateRequest { activation_code: code.to_string(), host };
    let version = common::protocol();
    let (status, body) = ven
        .try_call("POST", path::ACTIVATE, None, &[(PROTOCOL_HEADER, &version)], ven_proto::encode(&request))
        .ok()?;
    let answer: ActivateResponse = (status == 200).then(|| ven_proto::decode(&body).ok()).flatten()?;
    Some(format!("Bearer {}.{}", answer.agent_id, answer.agent_token))
}

fn heartbeat(ven: &Ven, auth: &str) -> Option<u16> {
    let beat = HeartbeatRequest {
        applied_policy_version: 0,
        applied_state: PolicyState::Idle,
        apply_error: None,
        host: None,
        events: Vec::new(),
        host_uptime_s: Some(60),
        target: None,
    };
    let version = common::protocol();
    let sent = ven.try_call(
        "POST",
        path::HEARTBEAT,
        Some(auth),
        &[(PROTOCOL_HEADER, &version)],
        ven_proto::encode(&beat),
    );
    sent.ok().map(|(status, _)| status)
}

#[test]
fn every_acknowledged_change_survives_sigkill_mid_stream() {
    let dir = DataDir(std::env::temp_dir().join(format!("pce-crash-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let d = dir.0.clone();
    let (api, events) = (free_port(), free_port());
    let mut server = Server::start(&d, api, events);
    let code = cli_ok(&d, api, &["activation-code"]).trim().to_string();
    let admin_key = std::fs::read_to_string(d.join("admin.key")).expect("admin key").trim().to_string();
    let labels_seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let agents_seen: Arc<Mutex<Vec<String>>> = Arc::default();

    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (stop, seen, ven, key) =
                (stop.clone(), labels_seen.clone(), Ven::new(&d, api), admin_key.clone());
            std::thread::spawn(move || {
                for i in 0..MAX_WRITES_PER_ROUND {
                    let value = format!("r{round}-{i}");
                    match create_label(&ven, &key, &value) {
                        Some(201) => seen.lock().unwrap().push(value),
                        Some(status) => panic!("label {value}: HTTP {status}"),
                        None => return,
                    }
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                }
            })
        };
        let vens = {
            let (stop, seen, ven, code) =
                (stop.clone(), agents_seen.clone(), Ven::new(&d, api), code.clone());
            std::thread::spawn(move || {
                for i in 0..MAX_WRITES_PER_ROUND {
                    if i % 4 == 0 {
                        match activate(&ven, &code, &format!("crash-{round}-{i}")) {
                            Some(auth) => seen.lock().unwrap().push(auth),
                            None => return,
                        }
                    }
                    let known: Vec<String> = seen.lock().unwrap().clone();
                    for auth in known.iter().rev().take(4) {
                        if heartbeat(&ven, auth).is_none() {
                            return;
                        }
                    }
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                }
            })
        };
        // Kill at a different point of the stream each round.
        std::thread::sleep(Duration::from_millis(300 + 250 * round));
        server.child.kill().expect("SIGKILL pce");
        let _ = server.child.wait();
        stop.store(true, Ordering::SeqCst);
        writer.join().expect("writer");
        vens.join().expect("VEN traffic");

        let started = Instant::now();
        server = Server::start(&d, api, events);
        let ven = Ven::new(&d, api);
        let stored = label_values(&ven, &d);
        let acknowledged = labels_seen.lock().unwrap().clone();
        let lost: Vec<&String> = acknowledged.iter().filter(|v| !stored.contains(v)).collect();
        assert!(lost.is_empty(), "round {round}: acknowledged labels lost: {lost:?}");
        for auth in agents_seen.lock().unwrap().iter() {
            assert_eq!(
                heartbeat(&ven, auth),
                Some(200),
                "round {round}: an acknowledged activation was lost"
            );
        }
        eprintln!(
            "round {round}: {} labels and {} activations acknowledged so far, all there after SIGKILL (restart {:?})",
            acknowledged.len(),
            agents_seen.lock().unwrap().len(),
            started.elapsed()
        );
        assert!(!acknowledged.is_empty(), "round {round}: the stream made no writes before the kill");
    }
    server.stop();
}
