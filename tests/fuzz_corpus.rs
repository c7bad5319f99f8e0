//! The agent's fuzz corpora replayed without a fuzzer (issue 17): every file of
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` goes through the function its fuzz
//! target calls (`ven::fuzzing`), on the stable toolchain, in the normal `cargo test`. A fixed
//! crash stays fixed; a corpus file that trips an invariant fails with its path.
//!
//! The PCE's targets are replayed by `crates/pce/tests/fuzz_corpus*.rs`. The encoded-value seeds
//! (history, state records, control frames) are written by the ignored test at the end:
//! `cargo test --test fuzz_corpus -- --ignored write_encoded_seeds`.

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use ven::fuzzing::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `dir` (none when it is missing), sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_file()).collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

/// Directory names under `fuzz/<kind>/`.
fn target_dirs(kind: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(fuzz_dir().join(kind))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Runs `entry` on every file of the target's corpus and regressions; returns the files run and
/// the failures (path and panic message).
fn replay(name: &str, entry: fn(&[u8])) -> (usize, Vec<String>) {
    let mut failures = Vec::new();
    let mut count = 0;
    for kind in ["corpus", "regressions"] {
        for path in files(&fuzz_dir().join(kind).join(name)) {
            let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            count += 1;
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| entry(&bytes))) {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("{}: {message}", path.display()));
            }
        }
    }
    (count, failures)
}

#[test]
fn every_corpus_file_and_fixed_crash_replays_cleanly() {
    let mut failures = Vec::new();
    for (name, entry) in TARGETS {
        let (count, failed) = replay(name, *entry);
        assert!(count > 0, "fuzz/corpus/{name} holds no seed");
        failures.extend(failed);
    }
    assert!(failures.is_empty(), "{} failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn every_target_is_built_and_every_directory_names_a_target() {
    let cargo = fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz/Cargo.toml");
    for (name, _) in TARGETS {
        assert!(cargo.contains(&format!("name = \"{name}\"")), "{name} is not a [[bin]] of fuzz/Cargo.toml");
        assert!(fuzz_dir().join("fuzz_targets").join(format!("{name}.rs")).is_file(), "{name} has no target");
    }
    // The PCE's targets (pce_*, flow_batches) are replayed by crates/pce/tests.
    let ours = |name: &str| TARGETS.iter().any(|(target, _)| *target == name);
    let pce = |name: &str| name.starts_with("pce_") || name == "flow_batches";
    for kind in ["corpus", "regressions"] {
        for name in target_dirs(kind) {
            assert!(
                ours(&name) || pce(&name),
                "fuzz/{kind}/{name} names no target: it would never be replayed"
            );
        }
    }
}

/// Issue 17: `#sets` then `t 18446744073709551615 member` and `v 1 member` overflowed the member
/// sum of the history diff (a panic in tests, a wrong summary in release).
#[test]
fn the_history_diff_member_overflow_stays_fixed() {
    let path = fuzz_dir().join("regressions/history_diff/member-count-overflow");
    let bytes = fs::read(&path).expect("the regression file is committed");
    ven::fuzzing::history_diff(&bytes);
    assert_eq!(
        ven::history::diff_summary(None, &String::from_utf8_lossy(&bytes)),
        "first entry: 0 rules, 2 sets (18446744073709551616 members)"
    );
}

/// Writes the seeds that are encoded values rather than captures, through the product's own
/// encoders: history files (as `History::record_at` writes them) and their payloads, state records
/// and payloads, control-socket frames, VEN API bodies and event-service frames. Run by hand after
/// a format change.
#[test]
#[ignore = "writes fuzz/corpus; run by hand after a format change"]
fn write_encoded_seeds() {
    use ven::agent::control::{ControlRequest, ControlResponse};
    use ven::history::{ChangeReason, History};
    use ven::state::{self, CloneSuspicion, DataDir, Identity, RecordKind, SavedStatus, Suspension};
    use ven_proto::frame::{self, PceFrame, VenFrame, encode_frame};
    use ven_proto::*;

    let corpus = fuzz_dir().join("corpus");
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus.join(target);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(name), bytes).unwrap();
    };
    let set =
        |id, members: &[&str]| IpSet { id, members: members.iter().map(|m| m.parse().unwrap()).collect() };
    let rule = |id, direction, peers, protocol, port: Option<u16>| Rule {
        id,
        direction,
        peers,
        protocol,
        ports: port.map(|p| PortRange { first: p, last: p }),
    };
    let enforced = Policy {
        version: 7,
        state: PolicyState::Enforced,
        ip_sets: vec![set(1, &["198.18.0.2", "198.18.1.0/24"]), set(2, &["2001:2::/64", "198.18.0.3"])],
        rules: vec![
            rule(1, Direction::Inbound, Peers::Set(1), Protocol::Tcp, Some(22)),
            rule(2, Direction::Outbound, Peers::Set(2), Protocol::Udp, Some(53)),
            rule(3, Direction::Inbound, Peers::Any, Protocol::Icmp, None),
        ],
        custom_rules: vec![CustomRule {
            id: 1,
            chain: CustomChain::Input,
            family: RuleFamily::V4,
            rule: "-p tcp --dport 8080 -j ACCEPT".to_string(),
        }],
    };
    let build =
        Policy { version: 8, state: PolicyState::Build, custom_rules: Vec::new(), ..enforced.clone() };

    // History: two entries as the agent records them, the payloads, and their texts diffed.
    let (text7, _) = ven::firewall::restored_text(&enforced).unwrap();
    let (text8, _) = ven::firewall::restored_text(&build).unwrap();
    let scratch = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-seeds");
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch).unwrap();
    let data = DataDir::new(&scratch);
    data.ensure().unwrap();
    let history = History::new(&data);
    history
        .record_at(1_764_000_000, ChangeReason::PolicyUpdate, 7, Some(PolicyState::Enforced), &text7, "")
        .unwrap();
    history
        .record_at(1_764_000_060, ChangeReason::TamperRepair, 8, Some(PolicyState::Build), &text8, "repaired")
        .unwrap();
    for path in files(history.dir()) {
        let bytes = fs::read(&path).unwrap();
        let name = format!("entry-{}", path.file_name().unwrap().to_string_lossy());
        write("history_entries", &name, &bytes);
        // VENHIST, version, length (12 bytes) ... checksum (8 bytes).
        write("history_payloads", &name, &bytes[12..bytes.len() - 8]);
    }
    write("history_diff", "first-entry", text7.as_bytes());
    write("history_diff", "enforced-to-build", format!("{text7}\0{text8}").as_bytes());

    // State records and payloads.
    let ca = fs::read(fuzz_dir().join("corpus/tls_trust/ca.der")).expect("the CA seed of tls_trust");
    let identity = Identity {
        agent_id: 3,
        agent_token: "0f".repeat(32),
        hostname: "web".to_string(),
        management_server: "198.18.0.1:8443".to_string(),
        event_port: 8444,
        ca_cert_der: ca,
        heartbeat_interval_s: 300,
        activated_at: 1_764_000_000,
    };
    let status = SavedStatus {
        last_heartbeat: Some(1_764_000_100),
        last_apply_error: None,
        tamper_count: 1,
        last_tamper: Some((1_764_000_060, "VEN-INPUT: 1 rules missing, 0 unexpected".to_string())),
    };
    let v4 = fs::read_to_string(fuzz_dir().join("corpus/iptables_save/testdata-iptables-save")).unwrap();
    let ipsets = fs::read_to_string(fuzz_dir().join("corpus/ipset_save/testdata-ipset-save")).unwrap();
    let snapshot = ven::firewall::Snapshot { v4, v6: None, ipsets };
    let suspension = Suspension { since: 1_764_000_200, previous_state: Some(PolicyState::Enforced) };
    let clone_token = "5e".repeat(16);
    let suspicion = CloneSuspicion {
        since: 1_764_000_300,
        message: "suspected clone: another live copy of this agent holds the workload".to_string(),
    };
    let upgrade = ven::agent::upgrade::UpgradeRecord {
        phase: ven::agent::upgrade::Phase::Trial,
        version: "0.3.0".to_string(),
        sha256: [3; 32],
        from_version: "0.2.0".to_string(),
        from_sha256: [2; 32],
        installed: "/usr/sbin/ven".into(),
        starts: 1,
        health_deadline_s: 300,
        at: 1_764_000_400,
        detail: "2961432 bytes".to_string(),
        reported: false,
    };
    let release_key = [0x5a_u8; 32];
    let records: Vec<(&str, RecordKind, Vec<u8>)> = vec![
        ("identity", RecordKind::Identity, postcard::to_allocvec(&identity).unwrap()),
        ("policy-enforced", RecordKind::Policy, postcard::to_allocvec(&enforced).unwrap()),
        ("policy-build", RecordKind::Policy, postcard::to_allocvec(&build).unwrap()),
        ("status", RecordKind::Status, postcard::to_allocvec(&status).unwrap()),
        ("firewall-saved", RecordKind::SavedFirewall, postcard::to_allocvec(&snapshot).unwrap()),
        ("suspended", RecordKind::Suspended, postcard::to_allocvec(&suspension).unwrap()),
        ("clone-token", RecordKind::CloneToken, postcard::to_allocvec(&clone_token).unwrap()),
        ("clone-suspected", RecordKind::CloneSuspected, postcard::to_allocvec(&suspicion).unwrap()),
        ("upgrade-trial", RecordKind::Upgrade, postcard::to_allocvec(&upgrade).unwrap()),
        ("release-key", RecordKind::ReleaseKey, postcard::to_allocvec(&release_key).unwrap()),
    ];
    for (name, kind, payload) in &records {
        let path = scratch.join(name);
        match *kind {
            RecordKind::Identity => state::write_record(&path, *kind, &identity, 0o600),
            RecordKind::Policy if *name == "policy-build" => state::write_record(&path, *kind, &build, 0o600),
            RecordKind::Policy => state::write_record(&path, *kind, &enforced, 0o600),
            RecordKind::Status => state::write_record(&path, *kind, &status, 0o600),
            RecordKind::SavedFirewall => state::write_record(&path, *kind, &snapshot, 0o600),
            RecordKind::Suspended => state::write_record(&path, *kind, &suspension, 0o600),
            RecordKind::CloneToken => state::write_record(&path, *kind, &clone_token, 0o600),
            RecordKind::CloneSuspected => state::write_record(&path, *kind, &suspicion, 0o600),
            RecordKind::Upgrade => state::write_record(&path, *kind, &upgrade, 0o600),
            RecordKind::ReleaseKey => state::write_record(&path, *kind, &release_key, 0o600),
        }
        .unwrap();
        write("state_records", name, &fs::read(&path).unwrap());
        write("state_payloads", name, payload);
        if matches!(kind, RecordKind::Policy | RecordKind::SavedFirewall) {
            write("policy_restore", name, payload);
        }
    }

    // Control socket: every request, and some answers.
    let requests = [
        ("status", ControlRequest::Status),
        ("identity-changed", ControlRequest::IdentityChanged),
        ("deactivate-saved", ControlRequest::Deactivate { saved: true }),
        ("suspend", ControlRequest::Suspend),
        ("unsuspend", ControlRequest::Unsuspend),
        ("upgrade", ControlRequest::Upgrade { version: Some("0.3.0".to_string()) }),
    ];
    for (name, request) in &requests {
        write("control_requests", &format!("request-{name}"), &encode_frame(request));
    }
    let answers = [
        ("done", ControlResponse::Done),
        ("deactivated", ControlResponse::Deactivated { pce_notice: Some("PCE unreachable".to_string()) }),
        ("failed", ControlResponse::Failed("the agent is stopping".to_string())),
    ];
    for (name, answer) in &answers {
        write("control_requests", &format!("answer-{name}"), &encode_frame(answer));
    }

    // VEN API bodies and the policy renderer: the policies as the PCE sends them.
    write("ven_api_messages", "policy-enforced", &encode(&enforced));
    write("ven_api_messages", "policy-build", &encode(&build));
    write("policy_rendering", "policy-enforced", &encode(&enforced));
    write("policy_rendering", "policy-build", &encode(&build));
    write("ven_api_messages", "goodbye", &encode(&Goodbye { reason: "deactivated".to_string() }));

    // Event service frames, both directions, several in a stream.
    let mut stream = encode_frame(&VenFrame::Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_id: 3,
        agent_token: "0f".repeat(32),
    });
    stream.extend(encode_frame(&PceFrame::Ack { ping_interval_s: 30 }));
    stream.extend(encode_frame(&PceFrame::Ping { nonce: 9 }));
    stream.extend(encode_frame(&VenFrame::Pong { nonce: 9 }));
    write("event_frames", "hello-ack-ping-pong", &stream);
    let clone_hello = VenFrame::CloneHello {
        protocol_version: PROTOCOL_VERSION,
        agent_id: 3,
        agent_token: "0f".repeat(32),
        clone_token: "5e".repeat(16),
        instance: "a1".repeat(16),
    };
    write("event_frames", "clone-hello", &encode_frame(&clone_hello));
    write("event_frames", "nack", &encode_frame(&PceFrame::Nack { reason: "bad credentials".to_string() }));
    // Protocol 5: the support report bolt, and the heartbeat answers of both versions.
    let bolt = frame::Event::SupportReportRequested { request: 4 };
    write("event_frames", "support-report-bolt", &encode_frame(&PceFrame::Event(bolt)));
    let answer = HeartbeatResponse {
        policy_version: 7,
        heartbeat_interval_s: 300,
        support_report_request: Some(4),
        upgrade: Some("0.3.0".to_string()),
    };
    write("ven_api_messages", "heartbeat-answer-report", &encode(&answer));
    write("ven_api_messages", "heartbeat-answer-v5", &encode(&HeartbeatResponseV5::from(answer.clone())));
    write("ven_api_messages", "heartbeat-answer-v4", &encode(&HeartbeatResponseV4::from(answer)));
    // Protocol 6: the upgrade bolt, and a heartbeat with the host's uptime and the agent's target.
    let bolt = frame::Event::UpgradeRequested { version: "0.3.0".to_string() };
    write("event_frames", "upgrade-bolt", &encode_frame(&PceFrame::Event(bolt)));
    let beat = HeartbeatRequest {
        applied_policy_version: 4,
        applied_state: PolicyState::Enforced,
        apply_error: None,
        host: None,
        events: vec![AgentEvent {
            at: 1_764_000_000,
            kind: AgentEventKind::Upgrade {
                version: "0.3.0".to_string(),
                step: UpgradeStep::RolledBack,
                detail: "no healthy report within 120 s".to_string(),
            },
        }],
        host_uptime_s: Some(86_400),
        target: Some("aarch64-unknown-linux-musl".to_string()),
    };
    write("ven_api_messages", "heartbeat-upgrade-event", &encode(&beat));
    write("ven_api_messages", "release-signature-header", "5a".repeat(64).as_bytes());
    write("ven_api_messages", "release-version", b"1.2.0-rc.1+build_7");

    // Flow rows as the flow store keeps them (a chunk is rows back to back) and as uploaded.
    let flow = |src: &str, dst: &str, protocol, port, verdict| FlowRecord {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        protocol,
        port,
        verdict,
        rule: 1,
        count: 3,
        packets: 5,
        bytes: Some(300),
        first_seen: 1_764_000_000,
        last_seen: 1_764_000_030,
        sampling_scale: 1,
        overflow: false,
    };
    let tcp = flow("198.18.0.2", "198.18.0.1", 6, 22, FlowVerdict::Allowed);
    let udp = flow("2001:2::1", "2001:2::2", 17, 53, FlowVerdict::Dropped);
    // Stored rows are tagged (ven_proto::flow_row); version 3's bare rows are seeded too.
    let mut chunk = Vec::new();
    ven_proto::flow_row::encode_into(&tcp, &mut chunk);
    ven_proto::flow_row::encode_into(&udp, &mut chunk);
    write("flow_store_rows", "chunk-tcp4-udp6", &chunk);
    let mut summary = Vec::new();
    ven_proto::flow_row::encode_into(&tcp, &mut summary);
    write("flow_store_rows", "summary-tcp4", &summary);
    write("flow_batches", "batch-two", &encode(&FlowBatch { first: 1, records: vec![tcp, udp] }));
    write("flow_batches", "query", b"src=198.18.0.0/24&port=22&proto=tcp&limit=10");
}
