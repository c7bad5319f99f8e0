//! The VEN's life cycle as the spec's commands drive it: activate, suspend, unsuspend, restore at
//! boot, deactivate. Each works the same whether the running agent carries it out (on its
//! manager thread, through the control socket) or the CLI does while no agent runs.
//!
//! Ordering rules, so that a failure never leaves a state the next start cannot recover from:
//! - the firewall changes first and the record that describes the new state is written after
//!   (a failed firewall change leaves the old record and the old firewall);
//! - the PCE is told last, and its being unreachable never undoes a local change (the returned
//!   notice says the PCE was not told);
//! - a history entry is written for every change of the firewall; failing to write one is
//!   logged and changes nothing else.

use std::net::{SocketAddr, ToSocketAddrs};

use ven_proto::{Policy, PolicyState, SuspendNotice};

use super::clone_token::{self, CloneToken};
use super::pce_client::PceClient;
use super::{AgentError, Trust, host, tls};
use crate::firewall::{Firewall, Safeguards, Snapshot};
use crate::history::{ChangeReason, History};
use crate::state::{self, DataDir, Identity, RecordKind, Suspension};

/// What `deactivate` leaves in the firewall (the spec's `--firewall open|saved`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirewallAfter {
    /// Everything ven programmed is removed; the host's own rules stay.
    Open,
    /// The host's firewall as it was just before activation.
    Saved,
}

/// What `ven restore` (the boot-time firewall script) did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootRestore {
    NotActivated,
    Suspended,
    NoPolicy,
    Restored { version: u64, state: PolicyState },
}

/// Pairs with the PCE, snapshots the host's firewall for `deactivate --firewall saved`, and
/// stores the identity; nothing is written unless the PCE accepted us over a connection verified
/// against the trusted CA.
pub fn activate(
    data: &DataDir,
    server: &str,
    activation_code: &str,
    trust: &Trust,
    hostname: &str,
    firewall: &Firewall,
) -> Result<Identity, AgentError> {
    if let Some(identity) = state::read_record::<Identity>(&data.identity_path(), RecordKind::Identity)? {
        return Err(AgentError::AlreadyActivated {
            agent_id: identity.agent_id,
            server: identity.management_server,
        });
    }
    tls::split_server(server)?;
    let ca_cert_der = match trust {
        Trust::CaFile(path) => tls::read_ca_file(path)?,
        Trust::CaFingerprint(expected) => {
            tls::fetch_ca_by_fingerprint(server, expected, super::TLS_PROBE_TIMEOUT)?
        }
    };
    data.ensure()?;
    // A token of an earlier pairing must not be presented for this one.
    state::remove_record(&data.clone_token_path())?;
    state::remove_record(&data.clone_suspected_path())?;
    let client = PceClient::new(server, &ca_cert_der)
        .with_clone_token(CloneToken::new(data, clone_token::one_shot_instance()));
    let request = ven_proto::ActivateRequest {
        activation_code: activation_code.to_string(),
        host: host::report(hostname),
    };
    let response = client.activate(&request)?;
    let identity = Identity {
        agent_id: response.agent_id,
        agent_token: response.agent_token,
        hostname: hostname.to_string(),
        management_server: server.to_string(),
        event_port: response.event_port,
        ca_cert_der,
        heartbeat_interval_s: response.heartbeat_interval_s,
        activated_at: crate::clock::now(),
    };
    data.ensure()?;
    // The spec's `saved`: the firewall just before the VEN took over. Without it the operator
    // can still deactivate with `open`, so a failure here does not fail the activation.
    match firewall.snapshot() {
        Ok(snapshot) => {
            if let Err(e) =
                state::write_record(&data.saved_firewall_path(), RecordKind::SavedFirewall, &snapshot, 0o600)
            {
                log::warn!("{e}; `deactivate --firewall saved` will not be available");
            }
        }
        Err(e) => log::warn!(
            "cannot snapshot the firewall ({e}); `deactivate --firewall saved` will not be available"
        ),
    }
    state::write_record(&data.identity_path(), RecordKind::Identity, &identity, 0o600)?;
    Ok(identity)
}

/// Tells the PCE we leave, puts the firewall in the requested state and forgets the pairing,
/// policy and suspension. The PCE being unreachable does not stop a local deactivation: the
/// returned notice says so. A firewall that cannot be changed does: the identity is kept.
pub fn deactivate(
    data: &DataDir,
    firewall: &Firewall,
    client: &PceClient,
    after: FirewallAfter,
    history: &History,
) -> Result<Option<String>, AgentError> {
    let snapshot = match after {
        FirewallAfter::Open => None,
        FirewallAfter::Saved => Some(
            state::read_record::<Snapshot>(&data.saved_firewall_path(), RecordKind::SavedFirewall)?
                .ok_or(AgentError::NoSavedFirewall)?,
        ),
    };
    let pce_notice = client.deactivate().err().map(|e| e.to_string());
    match &snapshot {
        None => {
            firewall.remove()?;
        }
        Some(snapshot) => firewall.restore_snapshot(snapshot)?,
    }
    let note = match after {
        FirewallAfter::Open => "deactivated, firewall open",
        FirewallAfter::Saved => "deactivated, firewall as saved at activation",
    };
    record(history, ChangeReason::Deactivate, 0, None, "", note);
    for path in [
        data.policy_path(),
        data.status_path(),
        data.suspended_path(),
        data.saved_firewall_path(),
        data.clone_token_path(),
        data.clone_suspected_path(),
        // Pinned for this pairing; the next one pins its own.
        data.release_key_path(),
    ] {
        state::remove_record(&path)?;
    }
    state::remove_record(&data.identity_path())?;
    Ok(pce_notice)
}

/// The spec's suspend: removes every rule ven programmed (custom rules included), records the
/// suspension and tells the PCE. The last-known-good policy stays on disk for `unsuspend`.
pub fn suspend(
    data: &DataDir,
    firewall: &Firewall,
    client: &PceClient,
    applied: Option<&Policy>,
    history: &History,
) -> Result<Option<String>, AgentError> {
    if data.suspended_path().exists() {
        return Err(AgentError::AlreadySuspended);
    }
    firewall.remove()?;
    let previous_state = applied.map(|policy| policy.state);
    let suspension = Suspension { since: crate::clock::now(), previous_state };
    state::write_record(&data.suspended_path(), RecordKind::Suspended, &suspension, 0o600)?;
    record(history, ChangeReason::Suspend, applied.map_or(0, |p| p.version), None, "", "suspended");
    let notice = SuspendNotice { suspended: true, previous_state };
    Ok(client.suspend(&notice).err().map(|e| e.to_string()))
}

/// The spec's unsuspend: puts the last-known-good policy (with its custom rules) back, clears the
/// suspension and tells the PCE. A policy the firewall refuses leaves the VEN suspended.
/// Returns the policy now in force and the PCE notice.
pub fn unsuspend(
    data: &DataDir,
    firewall: &Firewall,
    client: &PceClient,
    safeguards: &Safeguards,
    history: &History,
) -> Result<(Option<Policy>, Option<String>), AgentError> {
    if !data.suspended_path().exists() {
        return Err(AgentError::NotSuspended);
    }
    let policy = state::read_record::<Policy>(&data.policy_path(), RecordKind::Policy)?;
    if let Some(policy) = &policy {
        firewall.apply(policy, safeguards)?;
    }
    state::remove_record(&data.suspended_path())?;
    record(
        history,
        ChangeReason::Unsuspend,
        policy.as_ref().map_or(0, |p| p.version),
        policy.as_ref().map(|p| p.state),
        &firewall.applied_text(),
        "unsuspended",
    );
    let notice = SuspendNotice { suspended: false, previous_state: None };
    Ok((policy, client.suspend(&notice).err().map(|e| e.to_string())))
}

/// The boot-time firewall script: puts the last-known-good policy in force before anything else
/// runs, unless the VEN is suspended or has none.
pub fn restore_at_boot(
    data: &DataDir,
    firewall: &Firewall,
    history: &History,
) -> Result<BootRestore, AgentError> {
    let Some(identity) = state::read_record::<Identity>(&data.identity_path(), RecordKind::Identity)? else {
        return Ok(BootRestore::NotActivated);
    };
    if data.suspended_path().exists() {
        return Ok(BootRestore::Suspended);
    }
    let Some(policy) = state::read_record::<Policy>(&data.policy_path(), RecordKind::Policy)? else {
        return Ok(BootRestore::NoPolicy);
    };
    let summary = firewall.apply(&policy, &safeguards(&identity))?;
    if summary.changed {
        record(
            history,
            ChangeReason::BootRestore,
            policy.version,
            Some(policy.state),
            &firewall.applied_text(),
            "",
        );
    }
    Ok(BootRestore::Restored { version: policy.version, state: policy.state })
}

/// The client for an activated VEN, presenting `data`'s clone token as `instance`
/// ([`clone_token::agent_instance`] in the agent, [`clone_token::one_shot_instance`] otherwise).
pub fn client(identity: &Identity, data: &DataDir, instance: &'static str) -> PceClient {
    PceClient::new(&identity.management_server, &identity.ca_cert_der)
        .with_credentials(identity.agent_id, &identity.agent_token)
        .with_clone_token(CloneToken::new(data, instance))
}

/// What stays reachable for this identity: the VEN API and the event service, on every address
/// the management server's name resolves to now (none when it resolves to nothing: logged).
pub fn safeguards(identity: &Identity) -> Safeguards {
    match resolve_safeguards(identity) {
        Ok(safeguards) => safeguards,
        Err(e) => {
            log::error!("{e}; its channel cannot be safeguarded");
            Safeguards::default()
        }
    }
}

/// [`safeguards`], or why the management server's name gave no address (a resolver failure
/// must not take the safeguards of the addresses known before away).
pub fn resolve_safeguards(identity: &Identity) -> Result<Safeguards, String> {
    let (host, api_port) = match identity.management_server.rsplit_once(':') {
        Some((host, port)) => (host.trim_start_matches('[').trim_end_matches(']'), port.parse().unwrap_or(0)),
        None => return Err(format!("the PCE {} has no port", identity.management_server)),
    };
    let mut management: Vec<SocketAddr> = Vec::new();
    for port in [api_port, identity.event_port] {
        let addrs =
            (host, port).to_socket_addrs().map_err(|e| format!("cannot resolve the PCE {host}: {e}"))?;
        management.extend(addrs);
    }
    if management.is_empty() {
        return Err(format!("the PCE {host} resolves to no address"));
    }
    management.sort();
    management.dedup();
    Ok(Safeguards { management })
}

/// Records a firewall change in the history; a failure is logged, never fatal.
pub(crate) fn record(
    history: &History,
    reason: ChangeReason,
    policy_version: u64,
    state: Option<PolicyState>,
    ruleset: &str,
    note: &str,
) {
    if let Err(e) = history.record(reason, policy_version, state, ruleset, note) {
        log::warn!("firewall history not updated: {e}");
    }
}
