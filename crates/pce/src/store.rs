//! The PCE's state: labels, draft and active rules, pairing profiles and workloads (one per paired
//! VEN), kept in memory and persisted in `DIR/state.json`.
//!
//! Guarantees: every change is written before the call returns (temp file, fsync, rename, 0600),
//! except heartbeat bookkeeping, which only marks the state dirty for [`Store::flush`]. A write that
//! fails leaves the change in memory and the state dirty, so the next flush retries it. Policies are
//! recomputed after every change that can affect them; a workload's policy version moves (to the
//! next value of one global counter) exactly when its content changes, also across restarts: the
//! state keeps each workload's version and a digest of its content.

use crate::policy::{self, Label, Member, RuleDef, Service};
use crate::tls::{self, TlsError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use ven_proto::{HeartbeatRequest, HostReport, Interface, Policy, PolicyState};

pub const STATE_FILE: &str = "state.json";
const FORMAT: u32 = 1;
pub const MAX_LABELS: usize = 10_000;
pub const MAX_DRAFT_RULES: usize = 10_000;
pub const MAX_WORKLOADS: usize = 100_000;
const ACTIVATION_CODE_BYTES: usize = 10;
const AGENT_TOKEN_BYTES: usize = 32;

/// Workloads whose policy changed, with their new version.
pub type Changes = Vec<(u64, u64)>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not a valid state file: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("{path} has format {found}; this pce reads format {FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Random(#[from] TlsError),
    /// The request contradicts the state (unknown label, duplicate, limit reached).
    #[error("{0}")]
    Rejected(String),
    #[error("no workload with id {0}")]
    NoWorkload(u64),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    pub id: u64,
    pub hostname: String,
    pub os: String,
    pub agent_version: String,
    pub interfaces: Vec<Interface>,
    /// Label ids, at most one per key.
    pub labels: Vec<u64>,
    pub policy_state: PolicyState,
    /// SHA-256 of the agent token; the token itself is never stored.
    pub token_sha256: String,
    pub online: bool,
    pub activated_at: u64,
    pub last_heartbeat: Option<u64>,
    pub applied_policy_version: u64,
    pub applied_state: Option<PolicyState>,
    pub apply_error: Option<String>,
    pub policy_version: u64,
    /// SHA-256 of the encoded policy with version 0: tells content changes across restarts.
    pub policy_sha256: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairingProfile {
    pub id: u64,
    pub name: String,
    pub policy_state: PolicyState,
    pub activation_code: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    pub labels: Vec<Label>,
    pub workloads: BTreeMap<u64, Workload>,
    pub draft_rules: Vec<RuleDef>,
    pub active_rules: Vec<RuleDef>,
    pub pairing_profiles: Vec<PairingProfile>,
    /// Bumped by every provisioning.
    pub sec_policy_version: u64,
    /// Last policy version handed out, to any workload.
    pub policy_counter: u64,
    pub last_label_id: u64,
    pub last_rule_id: u64,
    pub last_workload_id: u64,
}

/// What an activation hands back.
pub struct Activation {
    pub agent_id: u64,
    pub agent_token: String,
    pub changes: Changes,
}

pub struct Store {
    path: PathBuf,
    state: State,
    /// Current policy of every workload (derived, not persisted).
    policies: HashMap<u64, Policy>,
    dirty: bool,
}

impl Store {
    /// Opens `dir/state.json`, or creates it with a default pairing profile. Returns whether it was
    /// created.
    pub fn open(dir: &Path) -> Result<(Self, bool), StoreError> {
        let path = dir.join(STATE_FILE);
        let (state, created) = match fs::read(&path) {
            Ok(bytes) => {
                let state: State = serde_json::from_slice(&bytes)
                    .map_err(|source| StoreError::Parse { path: path.clone(), source })?;
                if state.format != FORMAT {
                    return Err(StoreError::Format { path, found: state.format });
                }
                (state, false)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (initial_state()?, true),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let mut store = Store { path, state, policies: HashMap::new(), dirty: created };
        let changes = store.recompute();
        if created || !changes.is_empty() {
            store.save()?;
        }
        Ok((store, created))
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn policy(&self, workload_id: u64) -> Option<&Policy> {
        self.policies.get(&workload_id)
    }

    pub fn save(&mut self) -> Result<(), StoreError> {
        self.dirty = true;
        let bytes = serde_json::to_vec_pretty(&self.state).unwrap_or_default();
        write_atomic(&self.path, &bytes, 0o600)
            .map_err(|source| StoreError::Write { path: self.path.clone(), source })?;
        self.dirty = false;
        Ok(())
    }

    /// Writes the state if something changed since the last write.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        if self.dirty { self.save() } else { Ok(()) }
    }

    /// Whether `token` is the agent token of workload `agent_id`.
    pub fn authenticate(&self, agent_id: u64, token: &str) -> bool {
        self.state.workloads.get(&agent_id).is_some_and(|workload| {
            tls::constant_time_eq(
                workload.token_sha256.as_bytes(),
                tls::sha256_hex(token.as_bytes()).as_bytes(),
            )
        })
    }

    /// Pairs a new workload when `code` is a pairing profile's activation code (`None` otherwise).
    pub fn activate(
        &mut self,
        code: &str,
        host: HostReport,
        now: u64,
    ) -> Result<Option<Activation>, StoreError> {
        let profile = self
            .state
            .pairing_profiles
            .iter()
            .find(|profile| tls::constant_time_eq(profile.activation_code.as_bytes(), code.as_bytes()));
        let Some(policy_state) = profile.map(|profile| profile.policy_state) else { return Ok(None) };
        if self.state.workloads.len() >= MAX_WORKLOADS {
            return Err(StoreError::Rejected(format!(
                "the PCE holds its maximum of {MAX_WORKLOADS} workloads"
            )));
        }
        let agent_token = tls::random_hex(AGENT_TOKEN_BYTES)?;
        self.state.last_workload_id += 1;
        let agent_id = self.state.last_workload_id;
        let workload = Workload {
            id: agent_id,
            hostname: host.hostname,
            os: host.os,
            agent_version: host.agent_version,
            interfaces: host.interfaces,
            labels: Vec::new(),
            policy_state,
            token_sha256: tls::sha256_hex(agent_token.as_bytes()),
            online: true,
            activated_at: now,
            last_heartbeat: None,
            applied_policy_version: 0,
            applied_state: None,
            apply_error: None,
            policy_version: 0,
            policy_sha256: String::new(),
        };
        self.state.workloads.insert(agent_id, workload);
        let changes = self.commit()?;
        Ok(Some(Activation { agent_id, agent_token, changes }))
    }

    /// Records a heartbeat. Policies are recomputed when the workload comes back online or its
    /// interfaces changed; otherwise the state is only marked dirty.
    pub fn heartbeat(
        &mut self,
        agent_id: u64,
        report: HeartbeatRequest,
        now: u64,
    ) -> Result<Changes, StoreError> {
        let workload = self.state.workloads.get_mut(&agent_id).ok_or(StoreError::NoWorkload(agent_id))?;
        workload.last_heartbeat = Some(now);
        workload.applied_policy_version = report.applied_policy_version;
        workload.applied_state = Some(report.applied_state);
        workload.apply_error = report.apply_error;
        let mut affects_policy = !workload.online;
        workload.online = true;
        if let Some(host) = report.host {
            affects_policy |= host.interfaces != workload.interfaces;
            workload.hostname = host.hostname;
            workload.os = host.os;
            workload.agent_version = host.agent_version;
            workload.interfaces = host.interfaces;
        }
        if affects_policy {
            self.commit()
        } else {
            self.dirty = true;
            Ok(Vec::new())
        }
    }

    /// The agent is stopping: the workload goes offline and out of its peers' policies.
    pub fn goodbye(&mut self, agent_id: u64) -> Result<Changes, StoreError> {
        let workload = self.state.workloads.get_mut(&agent_id).ok_or(StoreError::NoWorkload(agent_id))?;
        workload.online = false;
        self.commit()
    }

    /// The agent unpaired: the workload is forgotten.
    pub fn deactivate(&mut self, agent_id: u64) -> Result<Changes, StoreError> {
        self.state.workloads.remove(&agent_id).ok_or(StoreError::NoWorkload(agent_id))?;
        self.policies.remove(&agent_id);
        self.commit()
    }

    /// Marks offline every online workload not heard from for `quiet_for` seconds, counting from
    /// `since` at the earliest (the PCE's start: a grace period after a restart).
    pub fn sweep_offline(&mut self, now: u64, quiet_for: u64, since: u64) -> Result<Changes, StoreError> {
        let mut any = false;
        for workload in self.state.workloads.values_mut().filter(|w| w.online) {
            let last_seen = workload.last_heartbeat.unwrap_or(0).max(workload.activated_at).max(since);
            if now.saturating_sub(last_seen) > quiet_for {
                log::info!("workload {} ({}) missed its heartbeats: offline", workload.id, workload.hostname);
                workload.online = false;
                any = true;
            }
        }
        if any { self.commit() } else { Ok(Vec::new()) }
    }

    pub fn create_label(&mut self, key: &str, value: &str) -> Result<Label, StoreError> {
        if self.state.labels.iter().any(|label| label.key == key && label.value == value) {
            return Err(StoreError::Rejected(format!("label {key}={value} already exists")));
        }
        if self.state.labels.len() >= MAX_LABELS {
            return Err(StoreError::Rejected(format!("the PCE holds its maximum of {MAX_LABELS} labels")));
        }
        self.state.last_label_id += 1;
        let label = Label { id: self.state.last_label_id, key: key.to_string(), value: value.to_string() };
        self.state.labels.push(label.clone());
        self.save()?;
        Ok(label)
    }

    /// Adds a rule to the draft; it takes effect at the next [`Store::provision`].
    pub fn add_draft_rule(
        &mut self,
        consumers: Vec<u64>,
        providers: Vec<u64>,
        services: Vec<Service>,
    ) -> Result<RuleDef, StoreError> {
        for (side, actors) in [("consumers", &consumers), ("providers", &providers)] {
            if actors.is_empty() {
                return Err(StoreError::Rejected(format!("{side} must name at least one label")));
            }
            self.check_labels(actors)?;
        }
        if services.is_empty() || services.len() > policy::MAX_SERVICES_PER_RULE {
            let max = policy::MAX_SERVICES_PER_RULE;
            return Err(StoreError::Rejected(format!("a rule needs 1 to {max} services")));
        }
        if self.state.draft_rules.len() >= MAX_DRAFT_RULES || self.state.last_rule_id >= policy::MAX_RULE_ID {
            return Err(StoreError::Rejected("the PCE holds its maximum of rules".to_string()));
        }
        self.state.last_rule_id += 1;
        let rule = RuleDef { id: self.state.last_rule_id, consumers, providers, services };
        self.state.draft_rules.push(rule.clone());
        self.save()?;
        Ok(rule)
    }

    /// Makes the draft active. Returns the new security policy version.
    pub fn provision(&mut self) -> Result<(u64, Changes), StoreError> {
        self.state.active_rules = self.state.draft_rules.clone();
        self.state.sec_policy_version += 1;
        Ok((self.state.sec_policy_version, self.commit()?))
    }

    /// Replaces a workload's labels and/or policy state.
    pub fn update_workload(
        &mut self,
        id: u64,
        labels: Option<Vec<u64>>,
        policy_state: Option<PolicyState>,
    ) -> Result<Changes, StoreError> {
        if !self.state.workloads.contains_key(&id) {
            return Err(StoreError::NoWorkload(id));
        }
        if let Some(labels) = &labels {
            self.check_labels(labels)?;
            let mut keys: Vec<&str> =
                labels.iter().filter_map(|id| self.label(*id)).map(|l| l.key.as_str()).collect();
            keys.sort_unstable();
            if let Some(pair) = keys.windows(2).find(|pair| pair[0] == pair[1]) {
                return Err(StoreError::Rejected(format!(
                    "a workload has at most one label of key {:?}",
                    pair[0]
                )));
            }
        }
        let workload = self.state.workloads.get_mut(&id).ok_or(StoreError::NoWorkload(id))?;
        if let Some(mut labels) = labels {
            labels.sort_unstable();
            labels.dedup();
            workload.labels = labels;
        }
        if let Some(state) = policy_state {
            workload.policy_state = state;
        }
        self.commit()
    }

    pub fn label(&self, id: u64) -> Option<&Label> {
        self.state.labels.iter().find(|label| label.id == id)
    }

    fn check_labels(&self, ids: &[u64]) -> Result<(), StoreError> {
        match ids.iter().find(|id| self.label(**id).is_none()) {
            Some(id) => Err(StoreError::Rejected(format!("no label with id {id}"))),
            None => Ok(()),
        }
    }

    /// Recomputes every policy and writes the state.
    fn commit(&mut self) -> Result<Changes, StoreError> {
        let changes = self.recompute();
        self.save()?;
        Ok(changes)
    }

    fn recompute(&mut self) -> Changes {
        let keys: HashMap<u64, &str> = self.state.labels.iter().map(|l| (l.id, l.key.as_str())).collect();
        let members: Vec<Member> = self
            .state
            .workloads
            .values()
            .map(|w| Member {
                id: w.id,
                labels: &w.labels,
                state: w.policy_state,
                addresses: policy::host_addresses(&w.interfaces),
                is_peer: w.online,
            })
            .collect();
        let computed: Vec<(u64, Policy)> = members
            .iter()
            .map(|m| m.id)
            .zip(policy::compute_all(&members, &self.state.active_rules, &keys))
            .collect();
        drop(members);
        let mut changes = Vec::new();
        for (id, mut policy) in computed {
            let Some(workload) = self.state.workloads.get_mut(&id) else { continue };
            let digest = tls::sha256_hex(&ven_proto::encode(&policy));
            if digest != workload.policy_sha256 || workload.policy_version == 0 {
                self.state.policy_counter += 1;
                workload.policy_version = self.state.policy_counter;
                workload.policy_sha256 = digest;
                changes.push((id, workload.policy_version));
            }
            policy.version = workload.policy_version;
            self.policies.insert(id, policy);
        }
        changes
    }
}

fn initial_state() -> Result<State, StoreError> {
    Ok(State {
        format: FORMAT,
        labels: Vec::new(),
        workloads: BTreeMap::new(),
        draft_rules: Vec::new(),
        active_rules: Vec::new(),
        pairing_profiles: vec![PairingProfile {
            id: 1,
            name: "default".to_string(),
            policy_state: PolicyState::Idle,
            activation_code: tls::random_hex(ACTIVATION_CODE_BYTES)?,
        }],
        sec_policy_version: 0,
        policy_counter: 0,
        last_label_id: 0,
        last_rule_id: 0,
        last_workload_id: 0,
    })
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new content: write a
/// temporary file with `mode`, fsync it, rename it over `path`, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
    // `mode` only applies on creation; a leftover temp file keeps its own.
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// A fresh directory under the system temp dir, removed on drop.
#[cfg(test)]
pub(crate) struct ScratchDir(PathBuf);

#[cfg(test)]
pub(crate) fn scratch_dir(name: &str) -> ScratchDir {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("pce-unit-{name}-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create scratch dir");
    ScratchDir(dir)
}

#[cfg(test)]
impl std::ops::Deref for ScratchDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

#[cfg(test)]
impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ven_proto::{PortRange, Protocol};

    fn host(name: &str, address: &str) -> HostReport {
        HostReport {
            hostname: name.to_string(),
            os: "Linux 6.1 x86_64".to_string(),
            agent_version: "0.1.0".to_string(),
            interfaces: vec![Interface {
                name: "eth0".to_string(),
                addresses: vec![address.parse().unwrap()],
            }],
        }
    }

    fn heartbeat(host: Option<HostReport>) -> HeartbeatRequest {
        HeartbeatRequest {
            applied_policy_version: 1,
            applied_state: PolicyState::Idle,
            apply_error: None,
            host,
            events: Vec::new(),
        }
    }

    const PG: Service = Service { ports: PortRange { first: 5432, last: 5432 }, protocol: Protocol::Tcp };

    /// Two workloads, web -> db on 5432, provisioned.
    fn populated(dir: &Path) -> (Store, Activation, Activation) {
        let (mut store, created) = Store::open(dir).unwrap();
        assert!(created);
        let code = store.state().pairing_profiles[0].activation_code.clone();
        assert_eq!(code.len(), 20);
        let web_label = store.create_label("role", "web").unwrap();
        let db_label = store.create_label("role", "db").unwrap();
        let web = store.activate(&code, host("web", "198.18.0.2/24"), 100).unwrap().unwrap();
        let db = store.activate(&code, host("db", "198.18.0.3/24"), 100).unwrap().unwrap();
        store.update_workload(web.agent_id, Some(vec![web_label.id]), Some(PolicyState::Enforced)).unwrap();
        store.update_workload(db.agent_id, Some(vec![db_label.id]), None).unwrap();
        store.add_draft_rule(vec![web_label.id], vec![db_label.id], vec![PG]).unwrap();
        (store, web, db)
    }

    #[test]
    fn state_survives_a_reopen() {
        let dir = scratch_dir("store-reopen");
        let (mut store, web, db) = populated(&dir);
        let before_provision = store.policy(db.agent_id).unwrap().clone();
        assert!(before_provision.rules.is_empty(), "drafts do not count");
        let (version, changes) = store.provision().unwrap();
        assert_eq!(version, 1);
        assert_eq!(changes.len(), 2);
        store.heartbeat(web.agent_id, heartbeat(None), 200).unwrap();
        store.flush().unwrap();
        let (state, policy) = (store.state().clone(), store.policy(db.agent_id).unwrap().clone());
        assert_eq!(policy.ip_sets[0].members, vec!["198.18.0.2/32".parse().unwrap()]);
        drop(store);

        let (reopened, created) = Store::open(&dir).unwrap();
        assert!(!created);
        assert_eq!(reopened.state(), &state);
        assert_eq!(reopened.policy(db.agent_id), Some(&policy));
        assert!(reopened.authenticate(web.agent_id, &web.agent_token));
        assert!(!reopened.authenticate(web.agent_id, &db.agent_token));
        assert!(!reopened.authenticate(99, &web.agent_token));
        let mode = fs::metadata(dir.join(STATE_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn versions_move_only_when_the_content_changes() {
        let dir = scratch_dir("store-versions");
        let (mut store, web, db) = populated(&dir);
        store.provision().unwrap();
        let version = |store: &Store, id| store.policy(id).unwrap().version;
        let (web_v, db_v) = (version(&store, web.agent_id), version(&store, db.agent_id));
        assert_eq!(store.provision().unwrap().1, vec![], "provisioning the same rules changes nothing");
        assert!(store.heartbeat(web.agent_id, heartbeat(None), 300).unwrap().is_empty());

        let changes =
            store.heartbeat(web.agent_id, heartbeat(Some(host("web", "198.18.0.9/24"))), 301).unwrap();
        assert_eq!(changes.iter().map(|c| c.0).collect::<Vec<_>>(), vec![db.agent_id]);
        assert!(version(&store, db.agent_id) > db_v);
        assert_eq!(version(&store, web.agent_id), web_v);

        let changes = store.goodbye(web.agent_id).unwrap();
        assert_eq!(changes.len(), 1, "the offline web leaves db's policy");
        assert!(store.policy(db.agent_id).unwrap().ip_sets[0].members.is_empty());
        assert_eq!(store.heartbeat(web.agent_id, heartbeat(None), 400).unwrap().len(), 1, "back online");

        store.deactivate(web.agent_id).unwrap();
        assert!(store.policy(web.agent_id).is_none());
        assert!(!store.authenticate(web.agent_id, &web.agent_token));
    }

    #[test]
    fn bad_input_is_rejected() {
        let dir = scratch_dir("store-rejects");
        let (mut store, web, _) = populated(&dir);
        assert!(store.activate("0000", host("x", "198.18.0.9/24"), 1).unwrap().is_none());
        assert!(matches!(store.create_label("role", "web"), Err(StoreError::Rejected(_))));
        let web_label = store.state().labels[0].id;
        let db_label = store.state().labels[1].id;
        let both = store.update_workload(web.agent_id, Some(vec![web_label, db_label]), None);
        assert!(matches!(both, Err(StoreError::Rejected(m)) if m.contains("\"role\"")));
        assert!(matches!(store.update_workload(42, None, None), Err(StoreError::NoWorkload(42))));
        assert!(matches!(
            store.add_draft_rule(vec![], vec![db_label], vec![PG]),
            Err(StoreError::Rejected(_))
        ));
        assert!(matches!(
            store.add_draft_rule(vec![77], vec![db_label], vec![PG]),
            Err(StoreError::Rejected(_))
        ));
    }

    #[test]
    fn workloads_go_offline_after_silence_with_a_grace_period() {
        let dir = scratch_dir("store-sweep");
        let (mut store, web, _) = populated(&dir);
        assert!(store.sweep_offline(150, 60, 0).unwrap().is_empty());
        assert!(store.sweep_offline(1000, 60, 990).unwrap().is_empty(), "grace after a restart");
        store.sweep_offline(1000, 60, 0).unwrap();
        assert!(!store.state().workloads[&web.agent_id].online);
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_and_kept() {
        let dir = scratch_dir("store-corrupt");
        fs::write(dir.join(STATE_FILE), b"{\"format\": 1,").unwrap();
        assert!(matches!(Store::open(&dir), Err(StoreError::Parse { .. })));
        assert_eq!(fs::read(dir.join(STATE_FILE)).unwrap(), b"{\"format\": 1,");
    }
}
