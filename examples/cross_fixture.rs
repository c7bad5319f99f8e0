//! Writes a data directory for the smoke run of a cross-built `ven` (`.ci/arm`): an activated
//! identity, an enforced last-known-good policy (one ipset, one rule) for `ven restore`, and a
//! flow store with a few flows of both verdicts for `ven flows`. Built and run on the host; the
//! ARM binary under qemu-user then reads what it wrote (the formats are the same on every target).
//!
//!     cargo run --example cross_fixture -- DATA_DIR

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::ExitCode;

use ven::flows::store::FlowStore;
use ven::logdir::LogCaps;
use ven::state::{self, DataDir, Identity, RecordKind};
use ven_proto::{
    Direction, FlowRecord, FlowVerdict, IpSet, Peers, Policy, PolicyState, PortRange, Protocol, Rule,
};

/// Flows in the store fixture: `.ci/arm` checks that `ven flows --json` lists this many.
const FLOWS: u32 = 12;

fn main() -> ExitCode {
    let Some(root) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: cross_fixture DATA_DIR");
        return ExitCode::from(2);
    };
    match write(&root) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cross_fixture: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write(root: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let data = DataDir::new(root);
    data.ensure()?;
    let identity = Identity {
        agent_id: 7,
        agent_token: "cross-fixture".into(),
        hostname: "cross-fixture".into(),
        // An address, not a name: restore resolves it to safeguard the management channel.
        management_server: "198.18.0.1:8443".into(),
        event_port: 8444,
        ca_cert_der: Vec::new(),
        heartbeat_interval_s: 300,
        activated_at: 1_780_000_000,
    };
    state::write_record(&data.identity_path(), RecordKind::Identity, &identity, 0o600)?;
    let policy = Policy {
        version: 3,
        state: PolicyState::Enforced,
        ip_sets: vec![IpSet { id: 1, members: vec!["198.18.0.2/32".parse()?, "198.18.1.0/24".parse()?] }],
        rules: vec![Rule {
            id: 1,
            direction: Direction::Inbound,
            peers: Peers::Set(1),
            protocol: Protocol::Tcp,
            ports: Some(PortRange { first: 5432, last: 5432 }),
        }],
        custom_rules: Vec::new(),
    };
    state::write_record(&data.policy_path(), RecordKind::Policy, &policy, 0o600)?;

    let flows: Vec<FlowRecord> = (0..FLOWS)
        .map(|n| {
            let allowed = n % 3 != 0;
            FlowRecord {
                src: IpAddr::V4(Ipv4Addr::new(198, 18, 1, 10 + n as u8)),
                dst: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 3)),
                protocol: 6,
                port: if allowed { 5432 } else { 22 },
                verdict: if allowed { FlowVerdict::Allowed } else { FlowVerdict::Dropped },
                rule: u32::from(allowed),
                count: 1 + n,
                first_seen: 1_780_000_000 + n,
                last_seen: 1_780_000_060 + n,
                sampling_scale: 1,
                overflow: false,
                packets: 1,
                bytes: None,
            }
        })
        .collect();
    FlowStore::new(&data.log_dir(), LogCaps::default()).append(&flows)?;
    println!("{}: identity, enforced policy v3 (1 set, 1 rule), {FLOWS} flows", root.display());
    Ok(())
}
