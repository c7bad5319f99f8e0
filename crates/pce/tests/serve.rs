//! End to end against the real binary: `pce serve` on 127.0.0.1 with free ports and a temporary
//! data directory, administered with the `pce` CLI and its admin API, spoken to as a VEN over HTTPS
//! (ureq, trusting the CA from the data directory) and over the event service (rustls, frames from
//! ven-proto).

use std::path::Path;
use std::time::{Duration, Instant};
use ven_proto::frame::{Event, PceFrame};
use ven_proto::{
    ActivateResponse, AgentEvent, AgentEventKind, CustomChain, CustomRule, Direction, ErrorBody, ErrorKind,
    FlowAck, FlowBatch, FlowRecord, FlowVerdict, HeartbeatResponse, MAX_EVENTS_PER_HEARTBEAT,
    MAX_FLOWS_PER_BATCH, PROTOCOL_VERSION, Peers, Policy, PolicyState, PortRange, Protocol, RuleFamily, path,
};

mod common;
use common::{DataDir, Server, Ven, cli, cli_ok, event_session, free_port, net, protocol, read_event};

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> T {
    ven_proto::decode(bytes).expect("postcard body")
}

#[test]
fn pairs_computes_policy_pushes_events_and_survives_a_restart() {
    let dir = DataDir(std::env::temp_dir().join(format!("pce-e2e-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let d = dir.0.as_path();
    let (api, events) = (free_port(), free_port());
    let server = Server::start(d, api, events);

    // First start: the three secrets, and the CLI agrees with them.
    let code = server.line("activation code: ").expect("activation code line");
    let fingerprint = server.line("CA fingerprint (SHA-256): ").expect("fingerprint line");
    assert!(server.line("admin API key: ").is_some());
    assert_eq!(server.line("listening: ").unwrap(), format!("api 127.0.0.1:{api} events 127.0.0.1:{events}"));
    assert_eq!(code.len(), 20);
    assert_eq!(cli_ok(d, api, &["ca-fingerprint"]), fingerprint);
    assert_eq!(cli_ok(d, api, &["activation-code"]), code);

    // Labels, a draft rule, provisioning.
    assert_eq!(cli_ok(d, api, &["label", "create", "role", "web"]), "/orgs/1/labels/1");
    assert_eq!(cli_ok(d, api, &["label", "create", "role", "db"]), "/orgs/1/labels/2");
    let rule = ["rule", "add", "--consumers", "role=web", "--providers", "role=db", "--service", "5432/tcp"];
    assert_eq!(cli_ok(d, api, &rule), "/orgs/1/sec_policy/draft/rule_sets/1/sec_rules/1");
    assert_eq!(cli_ok(d, api, &["provision"]), "provisioned version 1");
    let missing = cli(
        d,
        api,
        &["rule", "add", "--consumers", "role=nope", "--providers", "role=db", "--service", "1/udp"],
    );
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no label role=nope"));

    // Activation: a wrong code is 401 BadActivationCode, a missing protocol header 409.
    let ven = Ven::new(d, api);
    let (status, body) = ven.activate("not-the-code", "web", "198.18.0.2/24");
    assert_eq!((status, decode::<ErrorBody>(&body).kind), (401, ErrorKind::BadActivationCode));
    let (status, body) = ven.call("POST", path::ACTIVATE, None, &[], Vec::new());
    assert_eq!((status, decode::<ErrorBody>(&body).kind), (409, ErrorKind::ProtocolMismatch));
    let (status, body) = ven.activate(&code, "web", "198.18.0.2/24");
    assert_eq!(status, 200);
    let web: ActivateResponse = decode(&body);
    assert_eq!((web.heartbeat_interval_s, web.event_port), (7, events));
    let (status, body) = ven.activate(&code, "db", "198.18.0.3/24");
    assert_eq!(status, 200);
    let db: ActivateResponse = decode(&body);
    let web_auth = ven_proto::bearer(web.agent_id, &web.agent_token);
    let db_auth = ven_proto::bearer(db.agent_id, &db.agent_token);

    // Wrong credentials are 401 Unauthorized, on the API and the event service alike.
    let wrong = ven_proto::bearer(web.agent_id, &db.agent_token);
    let (status, body) = ven.heartbeat(&wrong, 0);
    assert_eq!((status, decode::<ErrorBody>(&body).kind), (401, ErrorKind::Unauthorized));
    assert_eq!(ven.policy(&wrong, None).0, 401);
    let mut refused = event_session(d, events, web.agent_id, &db.agent_token);
    assert!(matches!(read_event(&mut refused), PceFrame::Nack { .. }));

    // An event session for db: Ack, then the current version.
    let mut db_events = event_session(d, events, db.agent_id, &db.agent_token);
    assert_eq!(read_event(&mut db_events), PceFrame::Ack { ping_interval_s: 30 });
    assert!(matches!(read_event(&mut db_events), PceFrame::Event(Event::PolicyChanged { .. })));

    // Labels and states through the CLI; a missing label is a clear error.
    cli_ok(d, api, &["workload", "set", "web", "--label", "role=web", "--state", "enforced"]);
    cli_ok(d, api, &["workload", "set", &db.agent_id.to_string(), "--label", "role=db"]);
    let missing = cli(d, api, &["workload", "set", "web", "--label", "role=cache"]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no label role=cache"));
    let PceFrame::Event(Event::PolicyChanged { version: pushed }) = read_event(&mut db_events) else {
        panic!("expected a policy event for db");
    };

    // Heartbeat and policy: db accepts 5432/tcp from web only; web may reach db on it.
    let (status, body) = ven.heartbeat(&db_auth, 0);
    assert_eq!(status, 200);
    let beat: HeartbeatResponse = decode(&body);
    assert_eq!((beat.policy_version, beat.heartbeat_interval_s), (pushed, 7));
    let (status, body) = ven.policy(&db_auth, None);
    assert_eq!(status, 200);
    let db_policy: Policy = decode(&body);
    assert_eq!((db_policy.version, db_policy.state), (pushed, PolicyState::Idle));
    assert_eq!(db_policy.rules.len(), 1);
    let rule = &db_policy.rules[0];
    assert_eq!((rule.direction, rule.protocol), (Direction::Inbound, Protocol::Tcp));
    assert_eq!(rule.ports, Some(PortRange { first: 5432, last: 5432 }));
    let Peers::Set(set_id) = rule.peers else { panic!("peers should be a set") };
    let set = db_policy.ip_sets.iter().find(|s| s.id == set_id).expect("the rule's set");
    assert_eq!(set.members, vec![net("198.18.0.2/32")]);
    assert_eq!(ven.policy(&db_auth, Some(pushed)).0, 304);

    ven.heartbeat(&web_auth, 0);
    let (_, body) = ven.policy(&web_auth, None);
    let web_policy: Policy = decode(&body);
    assert_eq!(web_policy.state, PolicyState::Enforced);
    assert_eq!(web_policy.rules[0].direction, Direction::Outbound);
    assert_eq!(web_policy.ip_sets[0].members, vec![net("198.18.0.3/32")]);

    // The workload list as JSON, in the contract's shape.
    let list: serde_json::Value =
        serde_json::from_str(&cli_ok(d, api, &["workload", "list", "--json"])).expect("JSON");
    let web_json = &list.as_array().expect("array")[0];
    assert_eq!(web_json["hostname"], "web");
    assert_eq!(web_json["labels"][0]["key"], "role");
    assert_eq!(web_json["policy_state"], "enforced");
    assert_eq!(web_json["online"], true);
    assert_eq!(web_json["applied_state"], "idle");
    assert!(web_json["last_heartbeat_on"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert_eq!(web_json["interfaces"][1]["address"], "198.18.0.2");
    assert_eq!(web_json["interfaces"][1]["cidr_block"], 24);
    assert_eq!(web_json["enforcement_mode"], "full");
    assert_eq!(web_json["agent"]["status"]["status"], "active");
    assert!(cli_ok(d, api, &["workload", "list"]).contains("role=web"));

    // Restart: identities, labels, rules and versions are kept.
    drop(db_events);
    server.stop();
    let server = Server::start(d, api, events);
    assert!(server.line("activation code: ").is_none(), "secrets are printed on first start only");
    let (status, body) = ven.heartbeat(&db_auth, pushed);
    assert_eq!(status, 200);
    assert_eq!(decode::<HeartbeatResponse>(&body).policy_version, pushed);
    let (_, body) = ven.policy(&db_auth, None);
    assert_eq!(decode::<Policy>(&body), db_policy);
    assert!(cli_ok(d, api, &["label", "list"]).contains("/orgs/1/labels/2  role  db"));

    // Deactivation forgets the workload, and web's policy loses db.
    let (status, _) = ven.call(
        "POST",
        path::DEACTIVATE,
        Some(&db_auth),
        &[(ven_proto::PROTOCOL_HEADER, &protocol())],
        Vec::new(),
    );
    assert_eq!(status, 204);
    assert_eq!(ven.heartbeat(&db_auth, 0).0, 401);
    let (_, body) = ven.policy(&web_auth, None);
    assert!(decode::<Policy>(&body).ip_sets[0].members.is_empty());
    server.stop();
}

/// The workload named `hostname` in `pce workload list --json`.
fn workload_json(dir: &Path, api: u16, hostname: &str) -> serde_json::Value {
    let list: serde_json::Value =
        serde_json::from_str(&cli_ok(dir, api, &["workload", "list", "--json"])).expect("JSON");
    list.as_array().into_iter().flatten().find(|w| w["hostname"] == hostname).cloned().expect("workload")
}

fn tampering(summary: &str) -> AgentEvent {
    AgentEvent {
        at: 1_795_780_800,
        kind: AgentEventKind::Tampering { summary: summary.into(), repaired: true },
    }
}

#[test]
fn tampering_events_suspend_and_custom_rules() {
    let dir = DataDir(std::env::temp_dir().join(format!("pce-e2e-suspend-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let d = dir.0.as_path();
    let (api, events) = (free_port(), free_port());
    // Silent for 2 intervals of 1 s: offline (within one housekeeping round of 5 s).
    let args = ["--heartbeat-interval", "1", "--offline-after-heartbeats", "2"];
    let server = Server::start_with(d, api, events, &args);
    let code = server.line("activation code: ").expect("activation code line");
    cli_ok(d, api, &["label", "create", "role", "web"]);
    cli_ok(d, api, &["label", "create", "role", "db"]);
    cli_ok(
        d,
        api,
        &["rule", "add", "--consumers", "role=web", "--providers", "role=db", "--service", "5432/tcp"],
    );
    cli_ok(d, api, &["provision"]);
    let ven = Ven::new(d, api);
    let web: ActivateResponse = decode(&ven.activate(&code, "web", "198.18.0.2/24").1);
    let db: ActivateResponse = decode(&ven.activate(&code, "db", "198.18.0.3/24").1);
    let web_auth = ven_proto::bearer(web.agent_id, &web.agent_token);
    let db_auth = ven_proto::bearer(db.agent_id, &db.agent_token);
    cli_ok(d, api, &["workload", "set", "web", "--label", "role=web"]);
    cli_ok(d, api, &["workload", "set", "db", "--label", "role=db"]);

    // A tampering event rides a heartbeat and shows in the organisation events.
    assert_eq!(ven.heartbeat_with(&web_auth, 0, vec![tampering("chain VEN-INPUT flushed")]).0, 200);
    let (status, total, list) = ven.admin_get(d, "events?event_type=tampering");
    assert_eq!((status, total), (200, Some(1)));
    let event = &list[0];
    assert_eq!(event["event_type"], "tampering");
    assert_eq!(event["severity"], "warning");
    assert_eq!(event["workload"]["hostname"], "web");
    assert_eq!(event["details"]["summary"], "chain VEN-INPUT flushed");
    assert_eq!(event["details"]["repaired"], true);
    assert!(event["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
    let (_, total, list) = ven.admin_get(d, "events?max_results=1");
    assert_eq!(
        (total, list.as_array().map(Vec::len)),
        (Some(3), Some(1)),
        "two activations and the tampering"
    );
    let too_many = vec![tampering("x"); MAX_EVENTS_PER_HEARTBEAT + 1];
    let (status, body) = ven.heartbeat_with(&web_auth, 0, too_many);
    assert_eq!((status, decode::<ErrorBody>(&body).kind), (400, ErrorKind::BadRequest));
    let cef = cli_ok(d, api, &["events", "--type", "tampering", "--format", "cef"]);
    assert!(cef.starts_with("CEF:0|ven|pce|") && cef.contains("|tampering|tampering|6|rt="), "{cef}");
    assert!(cef.contains(" dhost=web msg=firewall tampering: chain VEN-INPUT flushed (repaired)"), "{cef}");
    let leef = cli_ok(d, api, &["events", "--type", "tampering", "--format", "leef"]);
    assert!(leef.starts_with("LEEF:2.0|ven|pce|") && leef.contains("\tsev=6\t"), "{leef}");
    assert!(cli_ok(d, api, &["events"]).contains("tampering"));

    // Suspend db (just heard from): shown suspended, kept a peer of web while web goes offline.
    assert_eq!(ven.heartbeat(&db_auth, 0).0, 200);
    assert_eq!(ven.suspend(&db_auth, true, Some(PolicyState::Idle)), 204);
    let db_json = workload_json(d, api, "db");
    assert_eq!((&db_json["agent_status"], &db_json["suspended"]), (&"suspended".into(), &true.into()));
    assert!(cli_ok(d, api, &["workload", "list"]).contains("suspended"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while workload_json(d, api, "web")["online"] == true {
        assert!(Instant::now() < deadline, "web was never taken offline");
        std::thread::sleep(Duration::from_millis(250));
    }
    let db_json = workload_json(d, api, "db");
    assert_eq!((&db_json["online"], &db_json["agent_status"]), (&true.into(), &"suspended".into()));
    let web_policy: Policy = decode(&ven.policy(&web_auth, None).1);
    assert_eq!(web_policy.ip_sets[0].members, vec![net("198.18.0.3/32")], "db stays web's peer");
    let db_policy: Policy = decode(&ven.policy(&db_auth, None).1);
    assert!(db_policy.ip_sets[0].members.is_empty(), "offline web left db's policy");

    let (_, total, _) = ven.admin_get(d, "events?event_type=workload_offline");
    assert_eq!(total, Some(1), "web only, not the suspended db");

    // Unsuspend: events, status back to online.
    assert_eq!(ven.suspend(&db_auth, false, None), 204);
    assert_eq!(workload_json(d, api, "db")["agent_status"], "online");
    let (_, _, suspends) = ven.admin_get(d, "events?event_type=server_suspended");
    assert_eq!(suspends[0]["details"]["previous_state"], "idle");
    assert_eq!(suspends[0]["severity"], "warning");
    let (_, total, _) = ven.admin_get(d, "events?event_type=server_unsuspended");
    assert_eq!(total, Some(1));

    // Custom rules: added at once, the version moves and is pushed, the policy carries the rule.
    let mut db_events = event_session(d, events, db.agent_id, &db.agent_token);
    assert!(matches!(read_event(&mut db_events), PceFrame::Ack { .. }));
    assert!(matches!(
        read_event(&mut db_events),
        PceFrame::Event(Event::PolicyChanged { version }) if version == db_policy.version
    ));
    let rule = "-p tcp --dport 9000 -j ACCEPT";
    let add = ["workload", "custom-rule", "add", "db", "--chain", "input", "--family", "v4", "--rule", rule];
    assert_eq!(cli_ok(d, api, &add), format!("/orgs/1/workloads/{}/custom_iptables_rules/1", db.agent_id));
    let PceFrame::Event(Event::PolicyChanged { version: pushed }) = read_event(&mut db_events) else {
        panic!("expected a policy event for db");
    };
    assert!(pushed > db_policy.version);
    let (status, body) = ven.heartbeat(&db_auth, db_policy.version);
    assert_eq!((status, decode::<HeartbeatResponse>(&body).policy_version), (200, pushed));
    let with_rule: Policy = decode(&ven.policy(&db_auth, None).1);
    assert_eq!(with_rule.version, pushed);
    let expected = CustomRule { id: 1, family: RuleFamily::V4, chain: CustomChain::Input, rule: rule.into() };
    assert_eq!(with_rule.custom_rules, vec![expected]);
    let listed: serde_json::Value =
        serde_json::from_str(&cli_ok(d, api, &["workload", "custom-rule", "list", "db", "--json"]))
            .expect("JSON");
    assert_eq!((&listed[0]["chain"], &listed[0]["family"]), (&"input".into(), &"v4".into()));
    assert!(cli_ok(d, api, &["workload", "custom-rule", "list", "db"]).contains(rule));
    for (bad, complaint) in [("-j ACCEPT\n-j DROP", "no newline"), (" ", "must not be empty")] {
        let output =
            cli(d, api, &["workload", "custom-rule", "add", "db", "--chain", "input", "--rule", bad]);
        assert!(!output.status.success());
        assert!(String::from_utf8_lossy(&output.stderr).contains(complaint));
    }

    // Removal: gone, version moved again; a second removal is a clear error.
    let removed = cli_ok(d, api, &["workload", "custom-rule", "remove", "db", "1"]);
    assert!(removed.starts_with("removed custom rule 1"), "{removed}");
    let without: Policy = decode(&ven.policy(&db_auth, None).1);
    assert!(without.custom_rules.is_empty() && without.version > pushed);
    let again = cli(d, api, &["workload", "custom-rule", "remove", "db", "1"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("no custom rule with id 1"));

    // A suspended VEN may unpair; the events survive a restart.
    drop(db_events);
    assert_eq!(ven.suspend(&db_auth, true, None), 204);
    let (status, _) = ven.call(
        "POST",
        path::DEACTIVATE,
        Some(&db_auth),
        &[(ven_proto::PROTOCOL_HEADER, &protocol())],
        Vec::new(),
    );
    assert_eq!(status, 204);
    let before: serde_json::Value =
        serde_json::from_str(&cli_ok(d, api, &["events", "--json"])).expect("JSON");
    assert_eq!(
        before.as_array().and_then(|a| a.last()).map(|e| e["event_type"].clone()),
        Some("agent_deactivated".into())
    );
    server.stop();
    let server = Server::start_with(d, api, events, &args);
    let after: serde_json::Value =
        serde_json::from_str(&cli_ok(d, api, &["events", "--json"])).expect("JSON");
    assert_eq!(after, before);
    server.stop();
}

/// A flow record seen from `at` to `at + 5`.
fn flow(src: &str, dst: &str, protocol: u8, port: u16, verdict: FlowVerdict, at: u32) -> FlowRecord {
    FlowRecord {
        src: src.parse().expect("address"),
        dst: dst.parse().expect("address"),
        protocol,
        port,
        verdict,
        rule: if verdict == FlowVerdict::Allowed { 1 } else { 0 },
        count: 2,
        first_seen: at,
        last_seen: at + 5,
        sampling_scale: 1,
        overflow: false,
        packets: 1,
        bytes: None,
    }
}

/// Uploads a batch: the status, and the ack or the error.
fn upload(ven: &Ven, auth: &str, batch: &FlowBatch) -> (u16, Result<FlowAck, ErrorBody>) {
    let (status, body) = ven.post(path::FLOWS, Some(auth), batch);
    (status, if status == 200 { Ok(decode(&body)) } else { Err(decode(&body)) })
}

/// `GET /api/v2/traffic_flows?QUERY`: the ports of the flows (newest first) and the total.
fn traffic(ven: &Ven, dir: &Path, query: &str) -> (Vec<u64>, u64) {
    let (status, total, answer) = ven.admin_get(dir, &format!("traffic_flows?{query}"));
    assert_eq!(status, 200, "{query}: {answer}");
    let ports = answer["flows"].as_array().expect("flows").iter().map(|f| f["port"].as_u64().expect("port"));
    let total_field = answer["total"].as_u64().expect("total");
    assert_eq!(total, Some(total_field as usize), "X-Total-Count and total agree");
    (ports.collect(), total_field)
}

#[test]
fn flow_uploads_are_stored_once_queried_and_kept_across_a_restart() {
    let dir = DataDir(std::env::temp_dir().join(format!("pce-e2e-flows-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let d = dir.0.as_path();
    let (api, events) = (free_port(), free_port());
    let server = Server::start(d, api, events);
    let code = server.line("activation code: ").expect("activation code line");
    let ven = Ven::new(d, api);
    let web: ActivateResponse = decode(&ven.activate(&code, "web", "198.18.0.2/24").1);
    let db: ActivateResponse = decode(&ven.activate(&code, "db", "198.18.0.3/24").1);
    let web_auth = ven_proto::bearer(web.agent_id, &web.agent_token);
    let db_auth = ven_proto::bearer(db.agent_id, &db.agent_token);
    const T: u32 = 1_795_780_800; // 2026-11-27T12:00:00Z
    use FlowVerdict::*;

    // web: three flows, numbered 1-3.
    let first = FlowBatch {
        first: 1,
        records: vec![
            flow("198.18.0.2", "198.18.0.3", 6, 5432, Allowed, T),
            flow("198.18.0.2", "198.18.9.9", 17, 53, Observed, T + 100),
            flow("198.18.0.2", "198.18.0.3", 1, 8, Dropped, T + 200),
        ],
    };
    assert_eq!(upload(&ven, &web_auth, &first), (200, Ok(FlowAck { through: 3 })));
    // The ack was lost: the same batch again is stored once, same ack.
    assert_eq!(upload(&ven, &web_auth, &first), (200, Ok(FlowAck { through: 3 })));
    assert_eq!(traffic(&ven, d, ""), (vec![8, 53, 5432], 3));
    // `pce traffic | head`: a reader that went away ends the CLI quietly, without a panic.
    let (reader, writer) = nix::unistd::pipe().expect("pipe");
    drop(reader);
    let closed = std::process::Command::new(common::PCE)
        .arg("--data-dir")
        .arg(d)
        .args(["--server", &format!("127.0.0.1:{api}"), "traffic", "--json"])
        .stdout(std::process::Stdio::from(writer))
        .output()
        .expect("run pce traffic");
    let stderr = String::from_utf8_lossy(&closed.stderr);
    assert!(closed.status.success() && stderr.is_empty(), "{}: {stderr}", closed.status);

    // A gap: 4-9 were rotated out on the VEN; 10-11 are stored.
    let gap = FlowBatch {
        first: 10,
        records: vec![
            flow("198.18.0.2", "198.18.0.3", 6, 443, WouldDrop, T + 300),
            flow("198.18.0.2", "198.18.1.4", 6, 22, WouldDrop, T + 400),
        ],
    };
    assert_eq!(upload(&ven, &web_auth, &gap), (200, Ok(FlowAck { through: 11 })));
    // db has its own numbering; an IPv6 flow.
    let db_batch =
        FlowBatch { first: 1, records: vec![flow("2001:db8::3", "2001:db8::2", 6, 9000, Allowed, T + 500)] };
    assert_eq!(upload(&ven, &db_auth, &db_batch), (200, Ok(FlowAck { through: 1 })));
    let (_, _, answer) = ven.admin_get(d, "traffic_flows");
    assert_eq!(answer["store"]["stored"], 6);
    assert_eq!((&answer["store"]["gaps"], &answer["store"]["missed"]), (&1.into(), &6.into()), "4-9 missed");

    // Queries: each filter, newest first.
    assert_eq!(traffic(&ven, d, "src=198.18.0.0/24"), (vec![22, 443, 8, 53, 5432], 5));
    assert_eq!(traffic(&ven, d, "dst=198.18.0.0%2F24&proto=tcp"), (vec![443, 5432], 2));
    assert_eq!(traffic(&ven, d, "dst=2001:db8::/64"), (vec![9000], 1));
    assert_eq!(traffic(&ven, d, "port=53"), (vec![53], 1));
    assert_eq!(traffic(&ven, d, "proto=udp"), (vec![53], 1));
    assert_eq!(traffic(&ven, d, "proto=1"), (vec![8], 1));
    assert_eq!(traffic(&ven, d, "verdict=would-drop"), (vec![22, 443], 2));
    assert_eq!(traffic(&ven, d, "workload=db"), (vec![9000], 1));
    assert_eq!(traffic(&ven, d, &format!("workload={}", web.agent_id)), (vec![22, 443, 8, 53, 5432], 5));
    let since = T + 200;
    let until = "2026-11-27T12:05:00Z"; // T + 300
    assert_eq!(traffic(&ven, d, &format!("since={since}&until={until}")), (vec![443, 8], 2));
    let (status, total, limited) = ven.admin_get(d, "orgs/1/traffic_flows?limit=2");
    assert_eq!(
        (status, total, limited["returned"].as_u64(), &limited["more"]),
        (200, Some(6), Some(2), &true.into())
    );
    let newest = &limited["flows"][0];
    assert_eq!((&newest["src"], &newest["workload"]["hostname"]), (&"2001:db8::3".into(), &"db".into()));
    assert_eq!(newest["first_seen_on"], "2026-11-27T12:08:20Z");
    assert_eq!(
        (&newest["proto_name"], &newest["verdict"], &newest["count"]),
        (&"tcp".into(), &"allowed".into(), &2.into())
    );
    for (query, complaint) in [
        ("src=198.18.0.300", "src: "),
        ("port=x", "port: "),
        ("proto=gre", "proto: "),
        ("verdict=blocked", "verdict: "),
        ("since=tomorrow", "since: "),
        ("limit=100001", "limit: "),
        ("colour=red", "unknown parameter"),
    ] {
        let (status, _, error) = ven.admin_get(d, &format!("traffic_flows?{query}"));
        assert_eq!(status, 400, "{query}");
        let message = error[0]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with(complaint), "{query}: {message}");
    }

    // The CLI: a table, JSON, and the same checks before anything is sent.
    let table = cli_ok(d, api, &["traffic", "--verdict", "would-drop", "--dst", "198.18.1.0/24"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(lines[0].starts_with("LAST SEEN") && lines[0].contains("VERDICT"), "{table}");
    let cells: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        cells,
        [
            "2026-11-27T12:06:45Z",
            "web",
            "198.18.0.2",
            "198.18.1.4",
            "tcp",
            "22",
            "would-drop",
            "0",
            "2",
            "1",
            "-"
        ]
    );
    let json: serde_json::Value =
        serde_json::from_str(&cli_ok(d, api, &["traffic", "--json", "--limit", "1"])).expect("JSON");
    assert_eq!((&json["total"], &json["flows"][0]["port"]), (&6.into(), &9000.into()));
    assert!(
        cli_ok(d, api, &["traffic", "--limit", "1"])
            .ends_with("(1 of 6 matching flows shown, the newest; see --limit)")
    );
    let bad = cli(d, api, &["traffic", "--proto", "gre"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--proto: \"gre\" is not a protocol"));

    // Bad batches: 400 BadRequest, and nothing of them is stored.
    let mut backwards =
        FlowBatch { first: 12, records: vec![flow("198.18.0.2", "198.18.0.3", 6, 1, Allowed, T)] };
    backwards.records[0].first_seen = T + 60;
    let (status, error) = upload(&ven, &web_auth, &backwards);
    let error = error.expect_err("rejected");
    assert_eq!((status, error.kind), (400, ErrorKind::BadRequest));
    assert!(error.message.contains("first_seen"), "{}", error.message);
    let portless =
        FlowBatch { first: 12, records: vec![flow("198.18.0.2", "198.18.0.3", 47, 80, Allowed, T)] };
    assert_eq!(upload(&ven, &web_auth, &portless).0, 400);
    let huge = FlowBatch { first: 12, records: vec![first.records[0]; MAX_FLOWS_PER_BATCH + 1] };
    let (status, error) = upload(&ven, &web_auth, &huge);
    assert_eq!((status, error.expect_err("rejected").kind), (400, ErrorKind::BadRequest));
    assert_eq!(traffic(&ven, d, "").1, 6);
    let ask = FlowBatch { first: 0, records: Vec::new() };
    assert_eq!(upload(&ven, &web_auth, &ask), (200, Ok(FlowAck { through: 11 })), "the cursor did not move");

    // Credentials and protocol as for every VEN API call.
    let wrong = ven_proto::bearer(web.agent_id, &db.agent_token);
    let (status, error) = upload(&ven, &wrong, &first);
    assert_eq!((status, error.expect_err("refused").kind), (401, ErrorKind::Unauthorized));
    let unknown = ven_proto::bearer(99, &web.agent_token);
    assert_eq!(upload(&ven, &unknown, &first).0, 401);
    let (status, _) = ven.call("POST", path::FLOWS, Some(&web_auth), &[], ven_proto::encode(&first));
    assert_eq!(status, 409);
    let (status, body) = ven.call(
        "POST",
        path::FLOWS,
        Some(&web_auth),
        &[(ven_proto::PROTOCOL_HEADER, &protocol())],
        b"\xff\xff\xff".to_vec(),
    );
    assert_eq!((status, decode::<ErrorBody>(&body).kind), (400, ErrorKind::BadRequest));

    // Restart: the flows and the cursors are kept.
    let (_, _, before) = ven.admin_get(d, "traffic_flows");
    server.stop();
    let server = Server::start(d, api, events);
    let (_, _, after) = ven.admin_get(d, "traffic_flows");
    assert_eq!(after["flows"], before["flows"]);
    assert_eq!((&after["store"]["gaps"], &after["store"]["missed"]), (&1.into(), &6.into()));
    assert_eq!(upload(&ven, &web_auth, &gap), (200, Ok(FlowAck { through: 11 })), "still stored once");
    assert_eq!(upload(&ven, &db_auth, &ask), (200, Ok(FlowAck { through: 1 })));
    assert_eq!(traffic(&ven, d, "verdict=would-drop&src=198.18.0.2"), (vec![22, 443], 2));
    let next =
        FlowBatch { first: 12, records: vec![flow("198.18.0.2", "198.18.0.3", 6, 5432, Allowed, T + 900)] };
    assert_eq!(upload(&ven, &web_auth, &next), (200, Ok(FlowAck { through: 12 })));
    assert_eq!(traffic(&ven, d, "port=5432"), (vec![5432, 5432], 2));

    // An unpaired workload's flows stay queryable.
    let (status, _) = ven.call(
        "POST",
        path::DEACTIVATE,
        Some(&db_auth),
        &[(ven_proto::PROTOCOL_HEADER, &protocol())],
        Vec::new(),
    );
    assert_eq!(status, 204);
    assert_eq!(upload(&ven, &db_auth, &ask).0, 401);
    assert_eq!(traffic(&ven, d, "workload=db"), (vec![9000], 1));

    // A VEN of protocol version 3 (records without packets and bytes) still uploads; its
    // records read with packets = count and bytes unknown. Version 2 is refused.
    let old = ven_proto::FlowBatchV3 {
        first: 13,
        records: vec![ven_proto::FlowRecordV3::from(FlowRecord {
            count: 3,
            ..flow("198.18.0.2", "198.18.0.3", 6, 6543, Allowed, T + 800)
        })],
    };
    let (status, body) = ven.call(
        "POST",
        path::FLOWS,
        Some(&web_auth),
        &[(ven_proto::PROTOCOL_HEADER, "3")],
        ven_proto::encode(&old),
    );
    assert_eq!((status, decode::<FlowAck>(&body)), (200, FlowAck { through: 13 }));
    let (_, _, stored) = ven.admin_get(d, "traffic_flows?port=6543");
    let stored = &stored["flows"][0];
    assert_eq!(
        (&stored["count"], &stored["packets"], &stored["bytes"]),
        (&3.into(), &3.into(), &serde_json::Value::Null)
    );
    let (status, _) = ven.call(
        "POST",
        path::FLOWS,
        Some(&web_auth),
        &[(ven_proto::PROTOCOL_HEADER, "2")],
        ven_proto::encode(&old),
    );
    assert_eq!(status, 409);
    server.stop();
}

/// Support reports over the wire: a request reaches a protocol-5 session as a bolt and every
/// heartbeat answer until the upload; a VEN of protocol 4 gets neither (its heartbeat answer is
/// the version-4 body, exactly); uploads for no request, truncated or oversized are refused and
/// store nothing; a good one is listed and downloaded byte for byte.
#[test]
fn support_reports_are_requested_uploaded_and_checked() {
    let dir = DataDir(std::env::temp_dir().join(format!("pce-e2e-report-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let d = dir.0.as_path();
    let (api, events) = (free_port(), free_port());
    let server = Server::start(d, api, events);
    let code = server.line("activation code: ").expect("activation code line");
    let ven = Ven::new(d, api);
    let (status, body) = ven.activate(&code, "web", "198.18.0.2/24");
    assert_eq!(status, 200);
    let web: ActivateResponse = decode(&body);
    let auth = ven_proto::bearer(web.agent_id, &web.agent_token);
    let mut session = event_session(d, events, web.agent_id, &web.agent_token);
    assert_eq!(read_event(&mut session), PceFrame::Ack { ping_interval_s: 30 });
    assert!(matches!(read_event(&mut session), PceFrame::Event(Event::PolicyChanged { .. })));

    let nobody = cli(d, api, &["support-report", "request", "nosuchhost"]);
    assert!(!nobody.status.success());
    assert!(String::from_utf8_lossy(&nobody.stderr).contains("no workload"));
    let asked = cli_ok(d, api, &["support-report", "request", "web"]);
    assert!(asked.contains("delivery: lightning_bolt"), "{asked}");
    let PceFrame::Event(Event::SupportReportRequested { request }) = read_event(&mut session) else {
        panic!("expected the support report bolt");
    };
    let (status, body) = ven.heartbeat(&auth, 0);
    assert_eq!(status, 200);
    assert_eq!(decode::<HeartbeatResponse>(&body).support_report_request, Some(request));
    // A VEN of protocol 4 decodes the version-4 answer: the same bytes, without the request.
    let (status, body) = ven.old_heartbeat(&auth, 4);
    assert_eq!(status, 200);
    let old: ven_proto::HeartbeatResponseV4 = decode(&body);
    assert_eq!(body, ven_proto::encode(&old), "nothing a version-4 VEN does not know");

    // Bad uploads: nothing stored, the request still waits.
    let mut archive = vec![0u8; 4 * 512];
    archive[..8].copy_from_slice(b"MANIFEST");
    archive[257..262].copy_from_slice(b"ustar");
    archive[512..520].copy_from_slice(b"contents");
    let upload = |request: u64, report: Vec<u8>| ven_proto::SupportReportUpload { request, report };
    let (status, body) = ven.post(path::SUPPORT_REPORT, Some(&auth), &upload(request + 1, archive.clone()));
    assert_eq!((status, decode::<ErrorBody>(&body).kind), (409, ErrorKind::BadRequest));
    let (status, _) = ven.post(path::SUPPORT_REPORT, Some(&auth), &upload(request, archive[..1024].to_vec()));
    assert_eq!(status, 400, "a truncated archive");
    let oversized = vec![0u8; ven_proto::MAX_SUPPORT_REPORT_BYTES + 512];
    let (status, _) = ven.post(path::SUPPORT_REPORT, Some(&auth), &upload(request, oversized));
    assert_eq!(status, 413);
    let mut cut = ven_proto::encode(&upload(request, archive.clone()));
    cut.truncate(cut.len() - 10);
    let headers = [(ven_proto::PROTOCOL_HEADER, PROTOCOL_VERSION.to_string())];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, _) = ven.call("POST", path::SUPPORT_REPORT, Some(&auth), &headers, cut);
    assert_eq!(status, 400, "a truncated body");
    assert_eq!(cli_ok(d, api, &["support-report", "list", "--json"]), "[]");
    let (_, body) = ven.heartbeat(&auth, 0);
    assert_eq!(decode::<HeartbeatResponse>(&body).support_report_request, Some(request), "still waiting");

    // The good one: stored, answered, downloadable.
    let (status, _) = ven.post(path::SUPPORT_REPORT, Some(&auth), &upload(request, archive.clone()));
    assert_eq!(status, 204);
    let (_, body) = ven.heartbeat(&auth, 0);
    assert_eq!(decode::<HeartbeatResponse>(&body).support_report_request, None, "answered");
    let (status, _) = ven.post(path::SUPPORT_REPORT, Some(&auth), &upload(request, archive.clone()));
    assert_eq!(status, 409, "a request is answered once");
    let listed = cli_ok(d, api, &["support-report", "list"]);
    assert!(listed.lines().nth(1).is_some_and(|row| row.contains("web") && row.contains("2048")), "{listed}");
    let output = d.join("report.tar");
    let written = cli_ok(d, api, &["support-report", "get", "1", "--output", output.to_str().unwrap()]);
    assert!(written.contains("written to"), "{written}");
    assert_eq!(std::fs::read(&output).unwrap(), archive);
    server.stop();
}
