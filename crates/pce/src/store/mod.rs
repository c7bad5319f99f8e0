//! The PCE's state: labels, policy objects (draft and active), pairing profiles, API keys,
//! workloads (one per paired VEN, with its suspension and custom iptables rules, and unmanaged
//! ones) and the organisation events, kept in memory and persisted record by record through a
//! [`backend::Backend`] (redb: `DIR/pce.redb`).
//!
//! Guarantees: every change is committed before the call returns, as one transaction holding only
//! the records that changed: for workloads, those marked dirty by the change (no comparison of the
//! whole fleet; debug builds check every mark against a copy), for the other tables those that
//! differ from what the backend holds ([`backend::diff`]). Heartbeat bookkeeping (and the events a
//! heartbeat carries) only marks its workload for [`Store::flush`], or for
//! [`Store::take_workload_flush`], which housekeeping writes after releasing the store's lock,
//! without an fsync except every [`MAX_LAZY_FLUSHES`]-th time (any API change's commit makes it
//! durable too): a crash loses at most a minute of bookkeeping, never an acknowledged change. A
//! commit that fails leaves the change in memory and marked, so the next flush retries it.
//! Policies are recomputed after every change that can affect them: a workload's arrival,
//! departure or new addresses only the policies that can include it (`policy::compute_changed`),
//! label and rule changes all of them. A workload's policy version moves (to the next value of one
//! global counter) exactly when its content changes, also across restarts: the state keeps each
//! workload's version and a digest of its content; its encoding is made once per version.
//!
//! A data directory of an older PCE (`state.json`, `events.json`) is migrated at open: its state
//! is committed to the new store in one transaction, then the files are renamed `*.migrated`.

use crate::clock;
use crate::crypto::{self, RandomError};
use crate::orgevents::{EventLog, EventType, LostAgentLimiter};
use crate::policy::model::{self, PolicyObjects};
use crate::policy::{self, Label, Member, Service};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use ven_proto::{
    AgentEventKind, CustomChain, CustomRule, HeartbeatRequest, HostReport, Interface, Policy, PolicyState,
    RuleFamily,
};

mod backend;
pub mod clone_guard;
mod pairing;
mod redb_backend;
mod sec_policy;

use backend::{Backend, EventsMark};
use clone_guard::{CloneGuard, Standing};

pub use sec_policy::DEFAULT_RULE_SET;

pub const STATE_FILE: &str = "state.json";
pub const EVENTS_FILE: &str = "events.json";
const FORMAT: u32 = 1;
pub const MAX_LABELS: usize = 10_000;
pub const MAX_WORKLOADS: usize = 100_000;
pub const MAX_API_KEYS: usize = 1_000;
const API_KEY_ID_BYTES: usize = 8;
const API_KEY_SECRET_BYTES: usize = 32;
/// Custom iptables rules per workload (the VEN's own cap, from its board config, may be lower).
pub const MAX_CUSTOM_RULES: usize = 1024;
/// Longest custom rule text, in bytes.
pub const MAX_CUSTOM_RULE_BYTES: usize = 512;
pub(crate) const ACTIVATION_CODE_BYTES: usize = 10;
const AGENT_TOKEN_BYTES: usize = 32;

/// Heartbeat-bookkeeping flushes (every 5 s) committed without an fsync between two durable
/// ones: bookkeeping lost in a crash is at most a minute old, and the 5-second flush does not
/// contend for the disk with the flow log's fsyncs (which the uploads wait for).
pub const MAX_LAZY_FLUSHES: u32 = 11;

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
    #[error("the store {path}: {cause}")]
    Database { path: PathBuf, cause: String },
    #[error("the store's {table} record {key:?} is damaged: {source}")]
    Record { table: &'static str, key: String, source: serde_json::Error },
    #[error("the store's {table} record {key:?} holds id {id:?}: it is damaged")]
    MisKeyed { table: &'static str, key: String, id: String },
    #[error("the store has records but no meta/state record: it is damaged")]
    MissingMeta,
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Random(#[from] RandomError),
    /// The request contradicts the state (unknown label, duplicate, limit reached).
    #[error("{0}")]
    Rejected(String),
    #[error("no workload with id {0}")]
    NoWorkload(u64),
    #[error("no label with id {0}")]
    NoLabel(u64),
    #[error("no API key with id {0}")]
    NoApiKey(String),
    #[error("no such policy object in the draft")]
    NoObject,
    #[error("no pairing profile with id {0}")]
    NoProfile(u64),
    /// The activation code cannot pair a workload; says why.
    #[error("{0}")]
    Activation(String),
    /// The object is referenced and cannot be changed that way.
    #[error("{0}")]
    InUse(String),
    #[error("workload {workload} has no custom rule with id {rule}")]
    NoCustomRule { workload: u64, rule: u32 },
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
    /// The VEN said it is suspended: it stays a peer and is not taken offline for its silence.
    #[serde(default)]
    pub suspended: bool,
    /// When the VEN was last unsuspended: its offline clock starts there at the earliest.
    #[serde(default)]
    pub unsuspended_at: Option<u64>,
    /// The operator's own iptables rules for this host, by increasing id.
    #[serde(default)]
    pub custom_rules: Vec<CustomRule>,
    /// Last custom rule id handed out; ids are not reused.
    #[serde(default)]
    pub last_custom_rule_id: u32,
    /// Paired through a VEN; false for workloads created through the API, which are peers in
    /// policy but get none (no agent) and never go offline.
    #[serde(default = "managed_by_default")]
    pub managed: bool,
    /// Since when the VEN has been online without a break (the agent status block's uptime).
    #[serde(default)]
    pub online_since: Option<u64>,
    /// When the VEN said it restarts (`Goodbye` "restart"): it stays a peer until it heartbeats
    /// again, or for the missed-heartbeat period at most.
    #[serde(default)]
    pub restarting_since: Option<u64>,
    /// The listening services the VEN reported last, and how many it left out.
    #[serde(default)]
    pub services: Vec<ven_proto::ListeningService>,
    #[serde(default)]
    pub services_omitted: u32,
    /// Missed-heartbeat warning raised for the current silence (the spec: after 3 intervals).
    #[serde(default)]
    pub missed_heartbeats_reported: bool,
    /// Which copy of the agent is the original (issue 16). Records from before clone tokens
    /// read as an empty guard: the first guarded call hands out the first token.
    #[serde(default)]
    pub clone_guard: CloneGuard,
    /// The pairing profile the workload was paired with (a suspected clone re-pairs from it);
    /// `None` for workloads paired before it was recorded and unmanaged ones.
    #[serde(default)]
    pub pairing_profile: Option<u64>,
}

fn managed_by_default() -> bool {
    true
}

impl Workload {
    /// A workload with nothing applied, reported or added yet: offline, unlabelled, no policy
    /// version, no token (which no agent can match).
    fn new(
        id: u64,
        hostname: String,
        interfaces: Vec<Interface>,
        policy_state: PolicyState,
        now: u64,
        managed: bool,
    ) -> Self {
        Workload {
            id,
            hostname,
            os: String::new(),
            agent_version: String::new(),
            interfaces,
            labels: Vec::new(),
            policy_state,
            token_sha256: String::new(),
            online: false,
            activated_at: now,
            last_heartbeat: None,
            applied_policy_version: 0,
            applied_state: None,
            apply_error: None,
            policy_version: 0,
            policy_sha256: String::new(),
            suspended: false,
            unsuspended_at: None,
            custom_rules: Vec::new(),
            last_custom_rule_id: 0,
            managed,
            online_since: None,
            missed_heartbeats_reported: false,
            restarting_since: None,
            services: Vec::new(),
            services_omitted: 0,
            clone_guard: CloneGuard::default(),
            pairing_profile: None,
        }
    }
}

impl Workload {
    /// Whether other workloads' policies include this one: online, or suspended (the spec: peers
    /// of a suspended VEN keep their rules).
    pub fn is_peer(&self) -> bool {
        !self.managed || self.online || self.suspended
    }
}

/// How VENs pair: the labels and policy state a workload starts with, and the keys (activation
/// codes) that may be used, how often and for how long.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairingProfile {
    pub id: u64,
    pub name: String,
    pub policy_state: PolicyState,
    /// The profile's standing code, never expiring, unlimited (the default profile's, which
    /// `pce activation-code` prints); empty for profiles created through the API, which pair
    /// only with keys from `POST .../pairing_key`.
    pub activation_code: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "managed_by_default")]
    pub enabled: bool,
    /// Label ids every workload paired with this profile gets.
    #[serde(default)]
    pub labels: Vec<u64>,
    /// Activations each generated key allows; `None`: unlimited.
    #[serde(default)]
    pub allowed_uses_per_key: Option<u32>,
    /// Seconds a generated key stays valid; `None`: forever.
    #[serde(default)]
    pub key_lifespan_s: Option<u64>,
    /// Keys generated from this profile (only their SHA-256 is kept).
    #[serde(default)]
    pub keys: Vec<PairingKey>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairingKey {
    pub code_sha256: String,
    pub created_at: u64,
    pub uses: u32,
}

/// An API key for the admin API (Illumio's `api_keys`): the client sends `auth_username` and
/// the secret with HTTP Basic. Only the secret's SHA-256 is kept; the secret is shown once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApiKey {
    /// The href's last segment, e.g. `4ab3c2e1f0`.
    pub key_id: String,
    /// `api_` + hex: the Basic user name.
    pub auth_username: String,
    pub secret_sha256: String,
    pub name: String,
    pub description: String,
    pub created_at: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    pub labels: Vec<Label>,
    pub workloads: BTreeMap<u64, Workload>,
    /// The policy objects as edited, and as provisioned (what the policies are computed from).
    #[serde(default)]
    pub draft: PolicyObjects,
    #[serde(default)]
    pub active: PolicyObjects,
    /// Every provisioning, oldest first (the newest [`MAX_POLICY_VERSIONS`] are kept).
    #[serde(default)]
    pub policy_versions: Vec<PolicyVersion>,
    /// Flat rules of states written before rule sets existed: moved into a rule set at open.
    #[serde(default, skip_serializing)]
    draft_rules: Vec<LegacyRule>,
    #[serde(default, skip_serializing)]
    active_rules: Vec<LegacyRule>,
    pub pairing_profiles: Vec<PairingProfile>,
    /// Bumped by every provisioning.
    pub sec_policy_version: u64,
    /// Last policy version handed out, to any workload.
    pub policy_counter: u64,
    pub last_label_id: u64,
    pub last_rule_id: u64,
    pub last_workload_id: u64,
    /// Absent from states written before API keys existed.
    #[serde(default)]
    pub api_keys: Vec<ApiKey>,
    #[serde(default)]
    pub last_ip_list_id: u64,
    #[serde(default)]
    pub last_service_id: u64,
    #[serde(default)]
    pub last_rule_set_id: u64,
}

/// A rule of the flat rule list that preceded rule sets (consumers and providers: label ids).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct LegacyRule {
    id: u64,
    consumers: Vec<u64>,
    providers: Vec<u64>,
    services: Vec<Service>,
}

/// One provisioning: `POST /sec_policy`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyVersion {
    pub version: u64,
    pub description: String,
    pub created_at: u64,
    /// What it made active: (kind, id) of each object.
    pub objects: Vec<model::ObjectRef>,
    /// Workloads whose policy changed.
    pub workloads_affected: usize,
}

/// Provisionings kept in the state.
pub const MAX_POLICY_VERSIONS: usize = 1_000;

/// What an activation hands back.
pub struct Activation {
    pub agent_id: u64,
    pub agent_token: String,
    pub changes: Changes,
}

/// The backend, behind a lock of its own: heartbeat bookkeeping is committed without the store's
/// lock ([`WorkloadFlush`]), and every other commit waits for it to finish first, so that
/// commits reach the backend in the order their contents were taken.
type SharedBackend = Arc<smol::lock::Mutex<Box<dyn Backend>>>;

pub struct Store {
    backend: SharedBackend,
    state: State,
    /// What the backend holds, except workloads: the diff of each commit is taken against it.
    persisted: State,
    persisted_events: EventsMark,
    /// Workloads the backend holds a record of.
    persisted_workloads: BTreeSet<u64>,
    /// Workloads changed (or removed) since the last commit: only their records are written.
    dirty_workloads: BTreeSet<u64>,
    /// Every workload is to be written (a new or migrated store).
    all_workloads_dirty: bool,
    /// Workload flushes committed lazily since the last durable commit.
    lazy_flushes: u32,
    /// In debug builds, the workloads as last committed: every save checks that each workload
    /// that differs from it was marked dirty (a missed mark would be a change never persisted).
    #[cfg(debug_assertions)]
    shadow_workloads: BTreeMap<u64, Workload>,
    /// Current policy of every workload and its encoding (derived, not persisted).
    policies: HashMap<u64, CurrentPolicy>,
    dirty: bool,
    events: EventLog,
    /// Which refused credentials become `lost_agent` events (memory only, bounded).
    lost_agents: LostAgentLimiter,
    /// What each VEN's last protocol-6 heartbeat said of its host and build (memory only; one
    /// entry per workload at most, dropped with it).
    agent_facts: HashMap<u64, AgentFacts>,
}

/// The host uptime and the agent's target from a workload's last heartbeat that carried them
/// (protocol 6), not persisted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentFacts {
    pub host_uptime_s: Option<u64>,
    /// Checked as a target triple by the VEN API before it reaches the store.
    pub target: Option<String>,
    /// When the heartbeat came (Unix seconds): the uptime now is the reported one plus the time since.
    pub reported_at: u64,
}

/// Workload records taken by [`Store::take_workload_flush`], holding the backend until written.
pub struct WorkloadFlush {
    backend: smol::lock::MutexGuardArc<Box<dyn Backend>>,
    changes: backend::ChangeSet,
    /// Committed durably; else lazily (no fsync: a crash may lose it).
    durable: bool,
    unwritten: UnwrittenFlush,
}

/// What a failed [`WorkloadFlush`] did not write; give it back with [`Store::flush_failed`].
pub struct UnwrittenFlush {
    ids: Vec<u64>,
    deleted: Vec<u64>,
}

impl WorkloadFlush {
    /// Writes the records (one transaction, durable on return); no lock of the store is needed.
    pub fn commit(mut self) -> Result<usize, (StoreError, UnwrittenFlush)> {
        let written = if self.durable {
            self.backend.commit(&self.changes)
        } else {
            self.backend.commit_lazily(&self.changes)
        };
        match written {
            Ok(()) => Ok(self.changes.puts.len() + self.changes.deletes.len()),
            Err(e) => Err((e, self.unwritten)),
        }
    }
}

/// A workload's current policy, and its encoding as `GET /ven/v1/policy` sends it: made once per
/// version, shared with the requests that send it (no encoding under the store's lock).
pub struct CurrentPolicy {
    pub policy: Policy,
    pub bytes: Arc<[u8]>,
}

/// `DIR/events.json`.
#[derive(Deserialize)]
struct EventsFile {
    format: u32,
    log: EventLog,
}

impl Store {
    /// Opens `dir/state.json`, or creates it with a default pairing profile. Returns whether it was
    /// created.
    pub fn open(dir: &Path) -> Result<(Self, bool), StoreError> {
        let backend = redb_backend::RedbBackend::open(&dir.join(redb_backend::STORE_FILE))?;
        Self::open_with(dir, Box::new(backend))
    }

    /// Opens the store `backend` holds; an empty one is filled from the JSON files of an older
    /// PCE in `dir` when there are any, else created with a default pairing profile.
    fn open_with(dir: &Path, backend: Box<dyn Backend>) -> Result<(Self, bool), StoreError> {
        let (mut state, events, origin) = match backend::assemble(backend.load()?)? {
            Some((state, events)) => (state, events, Origin::Stored),
            None => match read_json_files(dir)? {
                Some((state, events)) => (state, events, Origin::Migrated),
                None => (initial_state()?, EventLog::default(), Origin::Created),
            },
        };
        if state.format != FORMAT {
            return Err(StoreError::Format { path: dir.join(redb_backend::STORE_FILE), found: state.format });
        }
        // INVARIANT: what the backend holds is taken before the upgrade, so that the save below
        // writes what the upgrade added (issue 17: it was taken after, and the default IP list
        // and service an upgrade adds were never stored, their ids moving at each start).
        let stored = (origin == Origin::Stored).then(|| state.clone());
        let upgraded = sec_policy::upgrade(&mut state);
        let mut store = Store {
            backend: Arc::new(smol::lock::Mutex::new(backend)),
            state,
            persisted: State::empty(),
            persisted_events: EventsMark::default(),
            persisted_workloads: BTreeSet::new(),
            dirty_workloads: BTreeSet::new(),
            all_workloads_dirty: true,
            lazy_flushes: 0,
            #[cfg(debug_assertions)]
            shadow_workloads: BTreeMap::new(),
            policies: HashMap::new(),
            dirty: true,
            events,
            lost_agents: LostAgentLimiter::default(),
            agent_facts: HashMap::new(),
        };
        if let Some(stored) = stored {
            // Workload records are tracked by their dirty marks, not by this copy.
            store.persisted = State { workloads: BTreeMap::new(), ..stored };
            store.persisted_events = EventsMark::of(&store.events);
            store.persisted_workloads = store.state.workloads.keys().copied().collect();
            store.all_workloads_dirty = upgraded;
            #[cfg(debug_assertions)]
            {
                store.shadow_workloads = store.state.workloads.clone();
            }
            store.dirty = false;
        }
        let changes = store.recompute();
        if origin != Origin::Stored || upgraded || !changes.is_empty() {
            store.save()?;
        }
        if origin == Origin::Migrated {
            for file in [STATE_FILE, EVENTS_FILE] {
                let path = dir.join(file);
                if path.exists() {
                    let migrated = dir.join(format!("{file}.migrated"));
                    fs::rename(&path, &migrated).map_err(|source| StoreError::Write { path, source })?;
                }
            }
            log::info!("migrated {} into {}", dir.join(STATE_FILE).display(), redb_backend::STORE_FILE);
        }
        Ok((store, origin == Origin::Created))
    }

    /// The organisation events, oldest first.
    pub fn events(&self) -> &EventLog {
        &self.events
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// What the workload's last protocol-6 heartbeat said of its host uptime and target.
    pub fn agent_facts(&self, workload: u64) -> Option<&AgentFacts> {
        self.agent_facts.get(&workload)
    }

    pub fn policy(&self, workload_id: u64) -> Option<&Policy> {
        self.policies.get(&workload_id).map(|current| &current.policy)
    }

    /// The version of the workload's current policy.
    pub fn policy_version(&self, workload_id: u64) -> Option<u64> {
        self.policies.get(&workload_id).map(|current| current.policy.version)
    }

    /// The workload's current policy version and its encoding.
    pub fn policy_bytes(&self, workload_id: u64) -> Option<(u64, Arc<[u8]>)> {
        self.policies.get(&workload_id).map(|current| (current.policy.version, current.bytes.clone()))
    }

    /// Marks a workload's record for the next commit (changed, added or removed).
    fn touch(&mut self, id: u64) {
        self.dirty_workloads.insert(id);
    }

    /// Commits what changed since the last commit, as one transaction: the records of the other
    /// tables that differ from what the backend holds, and the workloads marked dirty.
    pub fn save(&mut self) -> Result<(), StoreError> {
        self.dirty = true;
        let mut changes = backend::diff(&self.persisted, &self.state, self.persisted_events, &self.events);
        let ids: Vec<u64> = if self.all_workloads_dirty {
            self.state
                .workloads
                .keys()
                .chain(&self.persisted_workloads)
                .copied()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        } else {
            self.dirty_workloads.iter().copied().collect()
        };
        for id in &ids {
            match self.state.workloads.get(id) {
                Some(workload) => changes.puts.push(backend::workload_record(workload)),
                None if self.persisted_workloads.contains(id) => {
                    changes.deletes.push(backend::workload_key(*id))
                }
                None => {}
            }
        }
        #[cfg(debug_assertions)]
        self.check_dirty_marks(&ids);
        // An empty change still commits when lazy flushes wait to be made durable (shutdown).
        if !changes.is_empty() || self.lazy_flushes > 0 {
            self.backend.lock_blocking().commit(&changes)?;
        }
        backend::apply(&mut self.persisted, &self.state, &changes);
        for id in ids {
            if self.state.workloads.contains_key(&id) {
                self.persisted_workloads.insert(id);
            } else {
                self.persisted_workloads.remove(&id);
            }
        }
        #[cfg(debug_assertions)]
        {
            self.shadow_workloads = self.state.workloads.clone();
        }
        self.persisted_events = EventsMark::of(&self.events);
        self.dirty_workloads.clear();
        self.all_workloads_dirty = false;
        self.lazy_flushes = 0;
        self.dirty = false;
        Ok(())
    }

    /// Debug builds: every workload that differs from what was last committed is among `ids`.
    #[cfg(debug_assertions)]
    fn check_dirty_marks(&self, ids: &[u64]) {
        let written: BTreeSet<u64> = ids.iter().copied().collect();
        for (id, workload) in &self.state.workloads {
            assert!(
                self.shadow_workloads.get(id) == Some(workload) || written.contains(id),
                "workload {id} changed but was not marked dirty"
            );
        }
        for id in self.shadow_workloads.keys() {
            assert!(
                self.state.workloads.contains_key(id) || written.contains(id),
                "workload {id} was removed but not marked dirty"
            );
        }
    }

    /// When only workloads changed since the last commit (heartbeat bookkeeping), takes their
    /// records for [`WorkloadFlush::commit`], to be called after the store's lock is released;
    /// the store counts them as written from now on. `None` when there is nothing to write or
    /// more than workloads changed (then [`Store::flush`] under the lock).
    pub fn take_workload_flush(&mut self) -> Option<WorkloadFlush> {
        let only_workloads = !self.dirty
            && !self.all_workloads_dirty
            && self.persisted_events == EventsMark::of(&self.events)
            && !self.dirty_workloads.is_empty();
        if !only_workloads {
            return None;
        }
        // Waits for a flush still being written, so that this one lands after it.
        let backend = self.backend.lock_arc_blocking();
        let ids: Vec<u64> = std::mem::take(&mut self.dirty_workloads).into_iter().collect();
        let (mut changes, mut deleted) = (backend::ChangeSet::default(), Vec::new());
        for id in &ids {
            match self.state.workloads.get(id) {
                Some(workload) => {
                    changes.puts.push(backend::workload_record(workload));
                    self.persisted_workloads.insert(*id);
                }
                None if self.persisted_workloads.remove(id) => {
                    changes.deletes.push(backend::workload_key(*id));
                    deleted.push(*id);
                }
                None => {}
            }
        }
        #[cfg(debug_assertions)]
        for id in &ids {
            match self.state.workloads.get(id) {
                Some(workload) => self.shadow_workloads.insert(*id, workload.clone()),
                None => self.shadow_workloads.remove(id),
            };
        }
        // Without an fsync, except every MAX_LAZY_FLUSHES-th (or sooner, with any API change).
        self.lazy_flushes += 1;
        let durable = self.lazy_flushes > MAX_LAZY_FLUSHES;
        if durable {
            self.lazy_flushes = 0;
        }
        Some(WorkloadFlush { backend, changes, durable, unwritten: UnwrittenFlush { ids, deleted } })
    }

    /// A [`WorkloadFlush`] failed: its workloads are written again by the next commit.
    pub fn flush_failed(&mut self, unwritten: UnwrittenFlush) {
        self.dirty_workloads.extend(unwritten.ids);
        self.persisted_workloads.extend(unwritten.deleted);
    }

    /// Commits what changed since the last commit, if anything did.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        let pending = self.dirty
            || self.all_workloads_dirty
            || !self.dirty_workloads.is_empty()
            || self.persisted_events != EventsMark::of(&self.events);
        if pending { self.save() } else { Ok(()) }
    }

    /// Records an organisation event about `workload` (its current hostname is looked up); the
    /// next write persists it. `details` should be a JSON object.
    fn record(
        &mut self,
        now: u64,
        event_type: EventType,
        workload: Option<u64>,
        message: String,
        details: Value,
    ) {
        let host = workload.and_then(|id| self.state.workloads.get(&id)).map(|w| (w.id, w.hostname.as_str()));
        let details = match details {
            Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        self.events.record(now, event_type, host, message, details);
    }

    /// Whether `token` is the agent token of workload `agent_id`.
    pub fn authenticate(&self, agent_id: u64, token: &str) -> bool {
        self.state.workloads.get(&agent_id).is_some_and(|workload| {
            crypto::constant_time_eq(
                workload.token_sha256.as_bytes(),
                crypto::sha256_hex(token.as_bytes()).as_bytes(),
            )
        })
    }

    /// Classifies a VEN API call or event session of `agent_id` by the clone token and instance
    /// id it carries ([`clone_guard`]), raising `clone_detected` for each instance it reveals as a
    /// second live copy. The guard's record is written with the next flush (a lost rotation only
    /// costs the holder a new token: its instance id still names it). `connected`: whether an
    /// instance has an event session now.
    #[allow(clippy::too_many_arguments)]
    pub fn present_clone_token(
        &mut self,
        agent_id: u64,
        token: Option<&str>,
        instance: Option<&str>,
        now: u64,
        grace: u64,
        rotate: bool,
        connected: &dyn Fn(&str) -> bool,
    ) -> Result<Standing, StoreError> {
        let workload = self.state.workloads.get_mut(&agent_id).ok_or(StoreError::NoWorkload(agent_id))?;
        let presented = workload.clone_guard.present(token, instance, now, grace, rotate, connected)?;
        let hostname = workload.hostname.clone();
        if presented.changed {
            self.touch(agent_id);
            self.dirty = true;
        }
        for suspect in presented.detected {
            log::warn!(
                "workload {agent_id} ({hostname}): a second live copy of its agent (instance {}) \
                 presents its credentials; ignoring it",
                suspect.instance
            );
            let message = "a copy of this workload's VEN runs elsewhere (a copied data directory): \
                           ignoring the copy, which must re-pair"
                .to_string();
            let details = json!({
                "instance": suspect.instance,
                "first_seen": clock::rfc3339(suspect.first_seen),
            });
            self.record(now, EventType::CloneDetected, Some(agent_id), message, details);
        }
        Ok(presented.standing)
    }

    /// A request or session named the paired workload `agent_id` with a wrong token (`channel`:
    /// where): raises the spec's lost-agent event, at most once per agent per window
    /// ([`LostAgentLimiter`]); the next write persists it. Unknown ids and workloads without an
    /// agent raise nothing. Returns whether an event was raised.
    pub fn lost_agent(&mut self, agent_id: u64, channel: &str, now: u64) -> bool {
        if !self.state.workloads.get(&agent_id).is_some_and(|w| w.managed) {
            return false;
        }
        let Some(suppressed) = self.lost_agents.admit(agent_id, now) else { return false };
        log::warn!(
            "workload {agent_id}: its VEN presented a wrong agent token on the {channel} (lost agent)"
        );
        let message = "VEN failed authentication (wrong agent token): it is a lost agent; \
                       uninstall and reinstall or pair the VEN on this workload again"
            .to_string();
        let details = json!({ "channel": channel, "suppressed_since_last": suppressed });
        self.record(now, EventType::LostAgent, Some(agent_id), message, details);
        self.dirty = true;
        true
    }

    /// Pairs a new workload with `code`: a profile's standing code or a key generated from it,
    /// which must be valid now (profile enabled, key not expired nor used up). The workload gets
    /// the profile's labels and policy state.
    pub fn activate(&mut self, code: &str, host: HostReport, now: u64) -> Result<Activation, StoreError> {
        let (profile_index, key_index) = self.pairing_key(code, now)?;
        self.pair(profile_index, key_index, host, now, None)
    }

    /// A suspected clone of workload `original` (issue 16) becomes a workload of its own, paired
    /// from the profile the original came from when that profile allows it (see
    /// `reactivation_key`). The original is not touched, except that it forgets the clone.
    pub fn reactivate_clone(
        &mut self,
        original: u64,
        instance: &str,
        host: HostReport,
        now: u64,
    ) -> Result<Activation, StoreError> {
        let workload = self.state.workloads.get(&original).ok_or(StoreError::NoWorkload(original))?;
        let profile = workload.pairing_profile.ok_or_else(|| {
            StoreError::Activation(
                "the workload was paired before its pairing profile was recorded".to_string(),
            )
        })?;
        let (profile_index, key_index) = self.reactivation_key(profile, now)?;
        let activation = self.pair(profile_index, key_index, host, now, Some(original))?;
        if let Some(workload) = self.state.workloads.get_mut(&original) {
            workload.clone_guard.forget(instance);
            self.touch(original);
        }
        Ok(activation)
    }

    /// Creates the workload of a new pairing with profile `profile_index` (and generated key
    /// `key_index`, whose use is counted); `clone_of`: a suspected clone of that workload re-pairs.
    fn pair(
        &mut self,
        profile_index: usize,
        key_index: Option<usize>,
        host: HostReport,
        now: u64,
        clone_of: Option<u64>,
    ) -> Result<Activation, StoreError> {
        let profile = &self.state.pairing_profiles[profile_index];
        let (policy_state, labels) = (profile.policy_state, profile.labels.clone());
        if self.state.workloads.len() >= MAX_WORKLOADS {
            return Err(StoreError::Rejected(format!(
                "the PCE holds its maximum of {MAX_WORKLOADS} workloads"
            )));
        }
        let agent_token = crypto::random_hex(AGENT_TOKEN_BYTES)?;
        // Allowed, but flagged in the activation event (issue 17): names are no identity.
        let same_name: Vec<u64> = self
            .state
            .workloads
            .values()
            .filter(|w| w.hostname == host.hostname)
            .map(|w| w.id)
            .take(16)
            .collect();
        self.state.last_workload_id += 1;
        let agent_id = self.state.last_workload_id;
        let workload = Workload {
            os: host.os,
            agent_version: host.agent_version,
            labels,
            token_sha256: crypto::sha256_hex(agent_token.as_bytes()),
            online: true,
            online_since: Some(now),
            pairing_profile: Some(self.state.pairing_profiles[profile_index].id),
            ..Workload::new(agent_id, host.hostname, host.interfaces, policy_state, now, true)
        };
        self.state.workloads.insert(agent_id, workload);
        self.touch(agent_id);
        if let Some(key) = key_index {
            self.state.pairing_profiles[profile_index].keys[key].uses += 1;
        }
        let profile = self.state.pairing_profiles[profile_index].id;
        let mut details = json!({ "policy_state": policy_state.as_str(), "pairing_profile": profile });
        let mut message = "VEN paired".to_string();
        if let Some(original) = clone_of {
            details["reactivated_clone_of"] = json!(original);
            message = format!("VEN paired: a suspected clone of workload {original} re-paired");
        }
        if !same_name.is_empty() {
            details["duplicate_hostname"] = json!(same_name);
            message = format!("{message}; workloads {same_name:?} have the same hostname");
        }
        self.record(now, EventType::AgentActivated, Some(agent_id), message, details);
        let changes = self.commit_changed(&[agent_id])?;
        Ok(Activation { agent_id, agent_token, changes })
    }

    /// Records a heartbeat and the events it carries. Policies are recomputed when the workload
    /// comes back online or its interfaces changed; otherwise the state is only marked dirty. A
    /// suspended workload stays suspended (only its VEN's unsuspend notice ends that).
    pub fn heartbeat(
        &mut self,
        agent_id: u64,
        report: HeartbeatRequest,
        now: u64,
    ) -> Result<Changes, StoreError> {
        self.touch(agent_id);
        let workload = self.state.workloads.get_mut(&agent_id).ok_or(StoreError::NoWorkload(agent_id))?;
        if report.host_uptime_s.is_some() || report.target.is_some() {
            // Keyed by an existing workload and dropped with it: bounded by the workloads.
            let facts = AgentFacts {
                host_uptime_s: report.host_uptime_s,
                target: report.target.clone(),
                reported_at: now,
            };
            self.agent_facts.insert(agent_id, facts);
        }
        workload.last_heartbeat = Some(now);
        workload.applied_policy_version = report.applied_policy_version;
        workload.applied_state = Some(report.applied_state);
        workload.apply_error = report.apply_error;
        let back = !workload.is_peer();
        let mut affects_policy = !workload.online;
        if !workload.online || workload.online_since.is_none() {
            workload.online_since = Some(now);
        }
        workload.online = true;
        workload.missed_heartbeats_reported = false;
        workload.restarting_since = None;
        if let Some(host) = report.host {
            affects_policy |= host.interfaces != workload.interfaces;
            workload.hostname = host.hostname;
            workload.os = host.os;
            workload.agent_version = host.agent_version;
            workload.interfaces = host.interfaces;
        }
        if workload.suspended {
            log::info!("heartbeat from suspended workload {agent_id} ({})", workload.hostname);
        }
        if back {
            let message = "VEN heartbeats again: back in its peers' policies".to_string();
            self.record(now, EventType::WorkloadOnline, Some(agent_id), message, json!({}));
        }
        if !report.events.is_empty() {
            log::info!("workload {agent_id} reported {} events", report.events.len());
        }
        for event in report.events {
            match event.kind {
                AgentEventKind::Tampering { summary, repaired } => {
                    let outcome = if repaired { "repaired" } else { "not repaired" };
                    let message = format!("firewall tampering: {summary} ({outcome})");
                    let details = json!({
                        "summary": summary,
                        "repaired": repaired,
                        "detected_at": clock::rfc3339(event.at),
                    });
                    self.record(now, EventType::Tampering, Some(agent_id), message, details);
                }
                AgentEventKind::ComponentRestarted { component, restarts, cause } => {
                    let message = format!("VEN component {component} ended ({cause}); restart {restarts}");
                    let details = json!({
                        "component": component,
                        "restarts": restarts,
                        "cause": cause,
                        "detected_at": clock::rfc3339(event.at),
                    });
                    self.record(now, EventType::AgentComponentRestarted, Some(agent_id), message, details);
                }
                AgentEventKind::Upgrade { version, step, detail } => {
                    let message = format!("VEN upgrade to {version}: {}: {detail}", step.as_str());
                    let details = json!({
                        "version": version,
                        "step": step.as_str(),
                        "detail": detail,
                        "detected_at": clock::rfc3339(event.at),
                    });
                    self.record(now, EventType::AgentUpgrade, Some(agent_id), message, details);
                }
            }
        }
        if affects_policy {
            self.commit_changed(&[agent_id])
        } else {
            // Marked (above) for the next flush: only this workload's record.
            Ok(Vec::new())
        }
    }

    /// The agent is stopping: the workload goes offline and, unless suspended, out of its peers'
    /// policies.
    pub fn goodbye(&mut self, agent_id: u64, reason: &str, now: u64) -> Result<Changes, StoreError> {
        self.touch(agent_id);
        let workload = self.state.workloads.get_mut(&agent_id).ok_or(StoreError::NoWorkload(agent_id))?;
        if reason == ven_proto::GOODBYE_RESTART && workload.online {
            // A restart is not a goodbye: the workload stays in its peers' policies while the
            // agent comes back (the sweep takes it out if it does not).
            log::info!(
                "workload {agent_id} ({}) restarts: it stays in its peers' policies",
                workload.hostname
            );
            workload.restarting_since = Some(now);
            workload.clone_guard.release();
            return self.commit_changed(&[agent_id]);
        }
        workload.clone_guard.release();
        workload.restarting_since = None;
        let was_peer = workload.is_peer();
        workload.online = false;
        workload.online_since = None;
        if was_peer && !workload.is_peer() {
            let message = format!("VEN said goodbye ({reason}): removed from its peers' policies");
            let details = json!({ "reason": "goodbye", "goodbye": reason });
            self.record(now, EventType::WorkloadOffline, Some(agent_id), message, details);
        }
        self.commit_changed(&[agent_id])
    }

    /// The VEN's listening services (its latest report replaces the previous one). They do not
    /// change any policy: the record is written with the next flush.
    pub fn services(&mut self, agent_id: u64, report: ven_proto::ServicesReport) -> Result<(), StoreError> {
        self.touch(agent_id);
        let workload = self.state.workloads.get_mut(&agent_id).ok_or(StoreError::NoWorkload(agent_id))?;
        workload.services = report.services;
        workload.services_omitted = report.omitted;
        self.dirty = true;
        Ok(())
    }

    /// The agent unpaired (suspended or not): the workload is forgotten.
    pub fn deactivate(&mut self, agent_id: u64, now: u64) -> Result<Changes, StoreError> {
        if !self.state.workloads.contains_key(&agent_id) {
            return Err(StoreError::NoWorkload(agent_id));
        }
        let message = "VEN unpaired: workload removed".to_string();
        self.record(now, EventType::AgentDeactivated, Some(agent_id), message, json!({}));
        self.forget(agent_id)
    }

    /// Removes a workload and its policy, and recomputes its peers'.
    fn forget(&mut self, id: u64) -> Result<Changes, StoreError> {
        self.state.workloads.remove(&id);
        self.agent_facts.remove(&id);
        self.touch(id);
        self.policies.remove(&id);
        self.commit()
    }

    /// The VEN was suspended or unsuspended (its `SuspendNotice`). A suspended workload stays a
    /// peer of the others and is never taken offline for its silence; unsuspending starts its
    /// offline clock afresh (the VEN then heartbeats and fetches its current policy, whatever the
    /// operator changed meanwhile). A notice that changes nothing records nothing.
    pub fn suspend(
        &mut self,
        agent_id: u64,
        suspended: bool,
        previous_state: Option<PolicyState>,
        now: u64,
    ) -> Result<Changes, StoreError> {
        self.touch(agent_id);
        let workload = self.state.workloads.get_mut(&agent_id).ok_or(StoreError::NoWorkload(agent_id))?;
        if workload.suspended == suspended {
            return Ok(Vec::new());
        }
        workload.suspended = suspended;
        let (event_type, message, details) = if suspended {
            let previous = previous_state.map(PolicyState::as_str);
            let message =
                format!("VEN suspended (its firewall was {})", previous.unwrap_or("in an unknown state"));
            (EventType::ServerSuspended, message, json!({ "previous_state": previous }))
        } else {
            workload.online = true;
            workload.unsuspended_at = Some(now);
            let state = workload.policy_state.as_str();
            let message = format!("VEN unsuspended: it returns to policy state {state}");
            (EventType::ServerUnsuspended, message, json!({ "policy_state": state }))
        };
        self.record(now, event_type, Some(agent_id), message, details);
        self.commit_changed(&[agent_id])
    }

    /// Raises a missed-heartbeats event for every online, unsuspended workload not heard from for
    /// `warn_after` seconds (once per silence), and marks offline those not heard from for
    /// `quiet_for` seconds, counting from `since` at the earliest (the PCE's start: a grace period
    /// after a restart).
    pub fn sweep_offline(
        &mut self,
        now: u64,
        warn_after: u64,
        quiet_for: u64,
        since: u64,
    ) -> Result<Changes, StoreError> {
        let mut silent = Vec::new();
        let mut missing = Vec::new();
        for workload in self.state.workloads.values_mut().filter(|w| w.managed && w.online && !w.suspended) {
            let last_seen = workload
                .last_heartbeat
                .unwrap_or(0)
                .max(workload.activated_at)
                .max(workload.unsuspended_at.unwrap_or(0))
                .max(since);
            let quiet = now.saturating_sub(last_seen);
            // An agent that announced a restart and is not back after the warning period is
            // gone: no warning first.
            if workload.restarting_since.is_some_and(|at| at >= last_seen) && quiet > warn_after {
                log::info!(
                    "workload {} ({}) did not come back from its restart: offline",
                    workload.id,
                    workload.hostname
                );
                workload.online = false;
                workload.online_since = None;
                workload.restarting_since = None;
                silent.push((workload.id, last_seen));
                continue;
            }
            if quiet > warn_after && !workload.missed_heartbeats_reported {
                workload.missed_heartbeats_reported = true;
                missing.push((workload.id, last_seen));
            }
            if quiet > quiet_for {
                log::info!("workload {} ({}) missed its heartbeats: offline", workload.id, workload.hostname);
                workload.online = false;
                workload.online_since = None;
                silent.push((workload.id, last_seen));
            }
        }
        for id in missing.iter().chain(&silent).map(|(id, _)| *id).collect::<Vec<_>>() {
            self.touch(id);
        }
        for (id, last_seen) in missing {
            let message = "VEN missed three heartbeats; it goes offline if it stays silent".to_string();
            let details = json!({ "last_seen": clock::rfc3339(last_seen) });
            self.record(now, EventType::AgentMissedHeartbeats, Some(id), message, details);
            self.dirty = true;
        }
        if silent.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<u64> = silent.iter().map(|(id, _)| *id).collect();
        for (id, last_seen) in silent {
            let message = "VEN missed its heartbeats: removed from its peers' policies".to_string();
            let details = json!({ "reason": "missed_heartbeats", "last_seen": clock::rfc3339(last_seen) });
            self.record(now, EventType::WorkloadOffline, Some(id), message, details);
        }
        self.commit_changed(&ids)
    }

    /// Adds a custom iptables rule to a workload. It takes effect at once, without provisioning:
    /// custom rules belong to one workload, like its policy state, not to the draft rule set.
    /// Validation is minimal (1 to [`MAX_CUSTOM_RULE_BYTES`] bytes, one line); the VEN checks the
    /// rule strictly and reports a refused one as its apply error.
    pub fn add_custom_rule(
        &mut self,
        workload_id: u64,
        family: RuleFamily,
        chain: CustomChain,
        rule: &str,
    ) -> Result<(CustomRule, Changes), StoreError> {
        let rule = check_custom_rule(rule).map_err(StoreError::Rejected)?;
        self.touch(workload_id);
        let workload =
            self.state.workloads.get_mut(&workload_id).ok_or(StoreError::NoWorkload(workload_id))?;
        if workload.custom_rules.len() >= MAX_CUSTOM_RULES || workload.last_custom_rule_id == u32::MAX {
            return Err(StoreError::Rejected(format!(
                "workload {workload_id} holds its maximum of {MAX_CUSTOM_RULES} custom rules"
            )));
        }
        workload.last_custom_rule_id += 1;
        let rule = CustomRule { id: workload.last_custom_rule_id, family, chain, rule: rule.to_string() };
        workload.custom_rules.push(rule.clone());
        Ok((rule, self.commit_changed(&[workload_id])?))
    }

    /// Removes a workload's custom rule; like adding, it takes effect at once.
    pub fn remove_custom_rule(&mut self, workload_id: u64, rule_id: u32) -> Result<Changes, StoreError> {
        self.touch(workload_id);
        let workload =
            self.state.workloads.get_mut(&workload_id).ok_or(StoreError::NoWorkload(workload_id))?;
        let before = workload.custom_rules.len();
        workload.custom_rules.retain(|rule| rule.id != rule_id);
        if workload.custom_rules.len() == before {
            return Err(StoreError::NoCustomRule { workload: workload_id, rule: rule_id });
        }
        self.commit_changed(&[workload_id])
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

    /// Gives label `id` a new key and/or value. The workloads and rules that carry it keep it.
    pub fn update_label(
        &mut self,
        id: u64,
        key: Option<&str>,
        value: Option<&str>,
    ) -> Result<Changes, StoreError> {
        let current = self.label(id).ok_or(StoreError::NoLabel(id))?.clone();
        let (key, value) = (key.unwrap_or(&current.key), value.unwrap_or(&current.value));
        if self.state.labels.iter().any(|label| label.id != id && label.key == key && label.value == value) {
            return Err(StoreError::Rejected(format!("label {key}={value} already exists")));
        }
        if key != current.key && self.state.workloads.values().any(|w| w.labels.contains(&id)) {
            // A workload has at most one label per key: changing the key could break that.
            return Err(StoreError::InUse(format!("label {id} is on workloads; its key cannot change")));
        }
        let label =
            self.state.labels.iter_mut().find(|label| label.id == id).ok_or(StoreError::NoLabel(id))?;
        label.key = key.to_string();
        label.value = value.to_string();
        self.save()?;
        Ok(Vec::new())
    }

    /// Deletes label `id`, refusing while a workload or a rule set (draft or active) uses it.
    pub fn delete_label(&mut self, id: u64) -> Result<(), StoreError> {
        if self.label(id).is_none() {
            return Err(StoreError::NoLabel(id));
        }
        let on_workload = self.state.workloads.values().find(|w| w.labels.contains(&id));
        let user = if let Some(workload) = on_workload {
            Some(format!("workload {} ({})", workload.id, workload.hostname))
        } else if let Some(set) = self.state.draft.uses_label(id) {
            Some(format!("draft rule set {set}"))
        } else {
            self.state.active.uses_label(id).map(|set| format!("active rule set {set}"))
        };
        if let Some(user) = user {
            return Err(StoreError::InUse(format!("label {id} is in use by {user}")));
        }
        self.state.labels.retain(|label| label.id != id);
        self.save()
    }

    /// Creates an API key; returns it and its secret, which is not kept.
    pub fn create_api_key(
        &mut self,
        name: &str,
        description: &str,
        now: u64,
    ) -> Result<(ApiKey, String), StoreError> {
        if self.state.api_keys.len() >= MAX_API_KEYS {
            return Err(StoreError::Rejected(format!(
                "the PCE holds its maximum of {MAX_API_KEYS} API keys"
            )));
        }
        let key_id = crypto::random_hex(API_KEY_ID_BYTES)?;
        let secret = crypto::random_hex(API_KEY_SECRET_BYTES)?;
        let key = ApiKey {
            auth_username: format!("api_{key_id}"),
            key_id,
            secret_sha256: crypto::sha256_hex(secret.as_bytes()),
            name: name.to_string(),
            description: description.to_string(),
            created_at: now,
        };
        self.state.api_keys.push(key.clone());
        self.save()?;
        Ok((key, secret))
    }

    pub fn delete_api_key(&mut self, key_id: &str) -> Result<(), StoreError> {
        let before = self.state.api_keys.len();
        self.state.api_keys.retain(|key| key.key_id != key_id);
        if self.state.api_keys.len() == before {
            return Err(StoreError::NoApiKey(key_id.to_string()));
        }
        self.save()
    }

    /// Whether `secret` belongs to the API key named `auth_username` (compared in constant time).
    pub fn api_key_matches(&self, auth_username: &str, secret: &str) -> bool {
        let digest = crypto::sha256_hex(secret.as_bytes());
        self.state.api_keys.iter().any(|key| {
            key.auth_username == auth_username
                && crypto::constant_time_eq(key.secret_sha256.as_bytes(), digest.as_bytes())
        })
    }

    /// Creates a workload without a VEN (Illumio's unmanaged workload): a peer in policy by its
    /// interfaces and labels, never offline, with no policy of its own.
    pub fn create_unmanaged_workload(
        &mut self,
        hostname: &str,
        interfaces: Vec<Interface>,
        labels: Vec<u64>,
        now: u64,
    ) -> Result<(u64, Changes), StoreError> {
        if self.state.workloads.len() >= MAX_WORKLOADS {
            return Err(StoreError::Rejected(format!(
                "the PCE holds its maximum of {MAX_WORKLOADS} workloads"
            )));
        }
        self.check_labels(&labels)?;
        self.state.last_workload_id += 1;
        let id = self.state.last_workload_id;
        let workload = Workload::new(id, hostname.to_string(), interfaces, PolicyState::Idle, now, false);
        self.state.workloads.insert(id, workload);
        self.touch(id);
        // Labels through the same checks as for any workload (one per key).
        match self.update_workload(id, Some(labels), None) {
            Ok(changes) => Ok((id, changes)),
            Err(e) => {
                self.state.workloads.remove(&id);
                self.touch(id);
                Err(e)
            }
        }
    }

    /// Replaces an unmanaged workload's hostname and/or interfaces (a VEN reports its own).
    pub fn update_unmanaged_workload(
        &mut self,
        id: u64,
        hostname: Option<String>,
        interfaces: Option<Vec<Interface>>,
    ) -> Result<Changes, StoreError> {
        self.touch(id);
        let workload = self.state.workloads.get_mut(&id).ok_or(StoreError::NoWorkload(id))?;
        if workload.managed && (hostname.is_some() || interfaces.is_some()) {
            return Err(StoreError::InUse(format!(
                "workload {id} is managed: its VEN reports its hostname and interfaces"
            )));
        }
        if let Some(hostname) = hostname {
            workload.hostname = hostname;
        }
        match interfaces {
            Some(interfaces) => {
                workload.interfaces = interfaces;
                self.commit()
            }
            None => {
                self.save()?;
                Ok(Vec::new())
            }
        }
    }

    /// Deletes an unmanaged workload (a managed one is unpaired by its VEN).
    pub fn delete_unmanaged_workload(&mut self, id: u64) -> Result<Changes, StoreError> {
        let workload = self.state.workloads.get(&id).ok_or(StoreError::NoWorkload(id))?;
        if workload.managed {
            return Err(StoreError::InUse(format!(
                "workload {id} is managed: unpair it with `ven deactivate` on the host"
            )));
        }
        self.forget(id)
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
        self.touch(id);
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

    /// Recomputes the policies that the workloads `ids` can move (they came, went offline or
    /// online, changed addresses or custom rules; not labels) and writes the state.
    fn commit_changed(&mut self, ids: &[u64]) -> Result<Changes, StoreError> {
        let changes = self.recompute_changed(ids);
        self.save()?;
        Ok(changes)
    }

    /// Recomputes every policy.
    fn recompute(&mut self) -> Changes {
        self.recompute_with(None)
    }

    /// Recomputes the policies the workloads `ids` can move (see `policy::compute_changed`).
    fn recompute_changed(&mut self, ids: &[u64]) -> Changes {
        self.recompute_with(Some(ids))
    }

    fn recompute_with(&mut self, changed: Option<&[u64]>) -> Changes {
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
                is_peer: w.is_peer(),
                managed: w.managed,
                custom_rules: &w.custom_rules,
            })
            .collect();
        let rules = model::compile(&self.state.active);
        let computed: Vec<(u64, Policy)> = match changed {
            None => members
                .iter()
                .map(|m| m.id)
                .zip(policy::compute_all(&members, &rules, &keys))
                .filter_map(|(id, policy)| Some((id, policy?)))
                .collect(),
            Some(ids) => {
                // Members are in id order (the workloads' map).
                let indices: Vec<usize> =
                    ids.iter().filter_map(|id| members.binary_search_by_key(id, |m| m.id).ok()).collect();
                policy::compute_changed(&members, &rules, &keys, &indices)
                    .into_iter()
                    .map(|(index, policy)| (members[index].id, policy))
                    .collect()
            }
        };
        drop(members);
        let mut changes = Vec::new();
        for (id, mut policy) in computed {
            let Some(workload) = self.state.workloads.get(&id) else { continue };
            // The cached policy (same content, same version) when nothing moved: no encoding.
            if let Some(current) = self.policies.get(&id) {
                policy.version = current.policy.version;
                if workload.policy_version != 0 && current.policy == policy {
                    continue;
                }
            }
            policy.version = 0;
            let digest = crypto::sha256_hex(&ven_proto::encode(&policy));
            let (old_version, old_digest) = (workload.policy_version, workload.policy_sha256.clone());
            let version = if digest != old_digest || old_version == 0 {
                self.state.policy_counter += 1;
                let version = self.state.policy_counter;
                if let Some(workload) = self.state.workloads.get_mut(&id) {
                    workload.policy_version = version;
                    workload.policy_sha256 = digest;
                }
                self.touch(id);
                changes.push((id, version));
                version
            } else {
                old_version
            };
            policy.version = version;
            let bytes: Arc<[u8]> = ven_proto::encode(&policy).into();
            self.policies.insert(id, CurrentPolicy { policy, bytes });
        }
        changes
    }
}

/// The PCE's minimal check of a custom rule's text; returns it without surrounding blanks.
fn check_custom_rule(text: &str) -> Result<&str, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("a custom rule must not be empty (give matches and a target, e.g. \
                    \"-p tcp --dport 9000 -j ACCEPT\")"
            .to_string());
    }
    if text.len() > MAX_CUSTOM_RULE_BYTES {
        return Err(format!(
            "a custom rule has at most {MAX_CUSTOM_RULE_BYTES} bytes; this one has {}",
            text.len()
        ));
    }
    if text.chars().any(|c| c.is_control()) {
        return Err("a custom rule is one line: no newline or other control character".to_string());
    }
    Ok(text)
}

/// Where an opened store's state came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Stored,
    /// From an older PCE's `state.json` and `events.json`.
    Migrated,
    Created,
}

/// The state and events of an older PCE's JSON files in `dir`, if it has a `state.json`.
fn read_json_files(dir: &Path) -> Result<Option<(State, EventLog)>, StoreError> {
    let path = dir.join(STATE_FILE);
    let state: State = match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|source| StoreError::Parse { path: path.clone(), source })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StoreError::Read { path, source }),
    };
    if state.format != FORMAT {
        return Err(StoreError::Format { path, found: state.format });
    }
    let events_path = dir.join(EVENTS_FILE);
    let events = match fs::read(&events_path) {
        Ok(bytes) => {
            let file: EventsFile = serde_json::from_slice(&bytes)
                .map_err(|source| StoreError::Parse { path: events_path.clone(), source })?;
            if file.format != FORMAT {
                return Err(StoreError::Format { path: events_path, found: file.format });
            }
            file.log
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => EventLog::default(),
        Err(source) => return Err(StoreError::Read { path: events_path, source }),
    };
    Ok(Some((state, events)))
}

impl State {
    /// No objects, zero counters: what records are assembled into.
    fn empty() -> State {
        State {
            format: FORMAT,
            labels: Vec::new(),
            workloads: BTreeMap::new(),
            draft: PolicyObjects::default(),
            active: PolicyObjects::default(),
            policy_versions: Vec::new(),
            draft_rules: Vec::new(),
            active_rules: Vec::new(),
            pairing_profiles: Vec::new(),
            sec_policy_version: 0,
            policy_counter: 0,
            last_label_id: 0,
            last_rule_id: 0,
            last_workload_id: 0,
            api_keys: Vec::new(),
            last_ip_list_id: 0,
            last_service_id: 0,
            last_rule_set_id: 0,
        }
    }
}

fn initial_state() -> Result<State, StoreError> {
    Ok(State {
        format: FORMAT,
        labels: Vec::new(),
        workloads: BTreeMap::new(),
        draft: PolicyObjects::default(),
        active: PolicyObjects::default(),
        policy_versions: Vec::new(),
        draft_rules: Vec::new(),
        active_rules: Vec::new(),
        pairing_profiles: vec![PairingProfile {
            id: 1,
            name: "default".to_string(),
            policy_state: PolicyState::Idle,
            activation_code: crypto::random_hex(ACTIVATION_CODE_BYTES)?,
            description: String::new(),
            enabled: true,
            labels: Vec::new(),
            allowed_uses_per_key: None,
            key_lifespan_s: None,
            keys: Vec::new(),
        }],
        sec_policy_version: 0,
        policy_counter: 0,
        last_label_id: 0,
        last_rule_id: 0,
        last_workload_id: 0,
        api_keys: Vec::new(),
        last_ip_list_id: 0,
        last_service_id: 0,
        last_rule_set_id: 0,
    })
}

/// Records by table and key, as a database holds them (for the fuzz entry points).
type FuzzRecords = std::collections::BTreeMap<(backend::Table, String), Vec<u8>>;

/// A backend in memory, for the fuzz entry points: the records stay readable after the store
/// that wrote them is gone.
struct FuzzMemory(std::sync::Arc<std::sync::Mutex<FuzzRecords>>);

impl Backend for FuzzMemory {
    fn load(&self) -> Result<backend::Records, StoreError> {
        let records = self.0.lock().map_err(|_| StoreError::MissingMeta)?;
        Ok(records.iter().map(|((table, key), value)| (*table, key.clone(), value.clone())).collect())
    }

    fn commit(&mut self, changes: &backend::ChangeSet) -> Result<(), StoreError> {
        let mut records = self.0.lock().map_err(|_| StoreError::MissingMeta)?;
        for (table, key, value) in &changes.puts {
            records.insert((*table, key.clone()), value.clone());
        }
        for (table, key) in &changes.deletes {
            records.remove(&(*table, key.clone()));
        }
        Ok(())
    }
}

/// A directory no JSON files are read from: the fuzzed stores are never empty.
const FUZZ_DIR: &str = "/nonexistent/pce-fuzz";

/// The records of a store as the `pce_store_records` fuzz target reads them: one per line,
/// `table TAB key TAB value` (the value is the JSON the record holds); lines that do not name a
/// table are skipped, a later record under the same table and key replaces an earlier one (as
/// in the database).
fn fuzz_records_of(data: &[u8]) -> FuzzRecords {
    let mut records = FuzzRecords::new();
    for line in data.split(|&b| b == b'\n') {
        let mut fields = line.splitn(3, |&b| b == b'\t');
        let (Some(table), Some(key), Some(value)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let Some(table) = backend::Table::ALL.into_iter().find(|t| t.name().as_bytes() == table) else {
            continue;
        };
        records.insert((table, String::from_utf8_lossy(key).into_owned()), value.to_vec());
    }
    records
}

/// Fuzzing (the `pce_store_records` target): the store's records as read back at start after a
/// crash, a damaged disk or tampering (`data` in the format of [`fuzz_records_of`]), and `data` as
/// an older PCE's `state.json` and `events.json`. A bad record is an error, never a panic; a
/// store that opens commits what its start changed, and what it committed reads back as the
/// state it holds.
#[doc(hidden)]
pub fn fuzz_store_records(data: &[u8]) {
    let _ = serde_json::from_slice::<State>(data);
    if let Ok(file) = serde_json::from_slice::<EventsFile>(data) {
        let _ = EventLog::from_parts(file.log.last_id, file.log.dropped, file.log.iter().cloned().collect());
    }
    let records = fuzz_records_of(data);
    if records.is_empty() {
        return;
    }
    let shared = std::sync::Arc::new(std::sync::Mutex::new(records));
    let Ok((store, created)) = Store::open_with(Path::new(FUZZ_DIR), Box::new(FuzzMemory(shared.clone())))
    else {
        return;
    };
    assert!(!created);
    let reread = FuzzMemory(shared).load().expect("in memory");
    let (state, events) = backend::assemble(reread).expect("what was committed reads back").expect("records");
    assert!(state == store.state, "the committed records read back as another state");
    assert_eq!(events.last_id, store.events.last_id);
    assert_eq!(events.iter().count(), store.events.iter().count());
}

/// The seed of the `pce_store_records` corpus: the records a store holds after the product's own
/// calls (two workloads paired, labelled, one enforced with a rule set provisioned, a tampering
/// report, a suspension), in the format of [`fuzz_records_of`].
#[doc(hidden)]
pub fn fuzz_seed_records() -> Result<Vec<u8>, StoreError> {
    use crate::policy::model::{Actor, RuleSet, SecRule, ServicePort, ServiceRef};
    let shared = std::sync::Arc::new(std::sync::Mutex::new(FuzzRecords::new()));
    let (mut store, _) = Store::open_with(Path::new(FUZZ_DIR), Box::new(FuzzMemory(shared.clone())))?;
    let code = store.state.pairing_profiles.first().map(|p| p.activation_code.clone()).unwrap_or_default();
    let host = |name: &str, address: &str| HostReport {
        hostname: name.to_string(),
        os: "Linux 6.1 x86_64".to_string(),
        agent_version: "0.1.0".to_string(),
        interfaces: vec![Interface {
            name: "eth0".to_string(),
            addresses: address.parse().into_iter().collect(),
        }],
    };
    let web_label = store.create_label("role", "web")?;
    let db_label = store.create_label("role", "db")?;
    let web = store.activate(&code, host("web", "198.18.0.2/24"), 100)?;
    let db = store.activate(&code, host("db", "198.18.0.3/24"), 100)?;
    store.update_workload(web.agent_id, Some(vec![web_label.id]), Some(PolicyState::Enforced))?;
    store.update_workload(db.agent_id, Some(vec![db_label.id]), None)?;
    let rule = SecRule {
        id: 0,
        enabled: true,
        description: String::new(),
        providers: vec![Actor::Label(db_label.id)],
        consumers: vec![Actor::Label(web_label.id)],
        services: vec![ServiceRef::Port(ServicePort {
            protocol: ven_proto::Protocol::Tcp,
            ports: Some(ven_proto::PortRange { first: 5432, last: 5432 }),
        })],
        unscoped_consumers: false,
    };
    let set = RuleSet {
        id: 0,
        name: "web to db".to_string(),
        description: String::new(),
        enabled: true,
        scopes: vec![vec![]],
        rules: vec![rule],
    };
    store.create_rule_set(set)?;
    store.provision(None, "seed", 200, &|_| {})?;
    let report = HeartbeatRequest {
        applied_policy_version: 1,
        applied_state: PolicyState::Enforced,
        apply_error: None,
        host: None,
        events: vec![ven_proto::AgentEvent {
            at: 250,
            kind: AgentEventKind::Tampering { summary: "+0 -1 rules".to_string(), repaired: true },
        }],
        host_uptime_s: None,
        target: None,
    };
    store.heartbeat(web.agent_id, report, 250)?;
    store.suspend(db.agent_id, true, Some(PolicyState::Idle), 300)?;
    store.save()?;
    let records = shared.lock().map_err(|_| StoreError::MissingMeta)?;
    let mut out = Vec::new();
    for ((table, key), value) in records.iter() {
        out.extend_from_slice(format!("{}\t{key}\t", table.name()).as_bytes());
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsutil::scratch_dir;
    use std::os::unix::fs::PermissionsExt;
    use ven_proto::{AgentEvent, PortRange, Protocol};

    pub(super) fn host(name: &str, address: &str) -> HostReport {
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
            host_uptime_s: None,
            target: None,
        }
    }

    const PG: Service = Service { ports: PortRange { first: 5432, last: 5432 }, protocol: Protocol::Tcp };

    /// A global rule set with one rule: `consumers` may reach `providers` (label ids) on `service`.
    fn add_rule(
        store: &mut Store,
        consumers: Vec<u64>,
        providers: Vec<u64>,
        service: Service,
    ) -> Result<u64, StoreError> {
        use crate::policy::model::{Actor, RuleSet, SecRule, ServicePort, ServiceRef};
        let rule = SecRule {
            id: 0,
            enabled: true,
            description: String::new(),
            providers: providers.into_iter().map(Actor::Label).collect(),
            consumers: consumers.into_iter().map(Actor::Label).collect(),
            services: vec![ServiceRef::Port(ServicePort {
                protocol: service.protocol,
                ports: Some(service.ports),
            })],
            unscoped_consumers: false,
        };
        let name = format!("set {}", store.state().last_rule_set_id + 1);
        let set = RuleSet {
            id: 0,
            name,
            description: String::new(),
            enabled: true,
            scopes: vec![vec![]],
            rules: vec![rule],
        };
        Ok(store.create_rule_set(set)?.id)
    }

    fn provision_all(store: &mut Store) -> (u64, Changes) {
        // What is published before the commit is what the provision returns.
        let published = std::cell::RefCell::new(None);
        let (version, changes) = store
            .provision(None, "test", 1, &|changes| *published.borrow_mut() = Some(changes.clone()))
            .unwrap();
        assert_eq!(published.into_inner().as_ref(), Some(&changes));
        (version.version, changes)
    }

    /// Two workloads, web -> db on 5432, provisioned.
    pub(super) fn populated(dir: &Path) -> (Store, Activation, Activation) {
        let (mut store, created) = Store::open(dir).unwrap();
        assert!(created);
        let code = store.state().pairing_profiles[0].activation_code.clone();
        assert_eq!(code.len(), 20);
        let web_label = store.create_label("role", "web").unwrap();
        let db_label = store.create_label("role", "db").unwrap();
        let web = store.activate(&code, host("web", "198.18.0.2/24"), 100).unwrap();
        let db = store.activate(&code, host("db", "198.18.0.3/24"), 100).unwrap();
        store.update_workload(web.agent_id, Some(vec![web_label.id]), Some(PolicyState::Enforced)).unwrap();
        store.update_workload(db.agent_id, Some(vec![db_label.id]), None).unwrap();
        add_rule(&mut store, vec![web_label.id], vec![db_label.id], PG).unwrap();
        (store, web, db)
    }

    /// Issue 17 (found by the `pce_store_records` fuzz target, regression file in
    /// fuzz/regressions/pce_store_records/): records without the default IP list and service
    /// (an older store) were upgraded in memory at each start but never written, so their ids
    /// moved whenever other objects were created in between.
    #[test]
    fn what_an_upgrade_adds_at_open_is_stored() {
        let seed = fuzz_seed_records().unwrap();
        let text = String::from_utf8(seed).unwrap();
        let older: String = text
            .lines()
            .filter(|line| !line.contains("_ip_lists\t") && !line.contains("_services\t"))
            .map(|line| format!("{line}\n"))
            .collect();
        let records = fuzz_records_of(older.as_bytes());
        assert!(
            !records.keys().any(|(table, _)| matches!(table, backend::Table::Active(model::Kind::IpLists)))
        );
        let shared = std::sync::Arc::new(std::sync::Mutex::new(records));
        let (store, _) = Store::open_with(Path::new(FUZZ_DIR), Box::new(FuzzMemory(shared.clone()))).unwrap();
        assert!(!store.state.active.ip_lists.is_empty(), "the upgrade adds the default IP list");
        let (reread, _) = backend::assemble(FuzzMemory(shared).load().unwrap()).unwrap().unwrap();
        assert_eq!(reread.active.ip_lists, store.state.active.ip_lists);
        assert_eq!(reread.draft.services, store.state.draft.services);
        assert_eq!(reread.last_ip_list_id, store.state.last_ip_list_id);
        // The fuzz target's own check, on the same input.
        fuzz_store_records(older.as_bytes());
    }

    /// Issue 17 (found by the `pce_store_records` fuzz target, regression file in
    /// fuzz/regressions/pce_store_records/crash-5706...): a record under a key that is not its id
    /// was read as the object of that id, and a stale copy could replace the current one.
    #[test]
    fn a_record_under_another_key_is_damage() {
        let seed = String::from_utf8(fuzz_seed_records().unwrap()).unwrap();
        let moved = seed.replacen("workloads\t2\t", "workloads\t:\t", 1);
        assert_ne!(moved, seed);
        let shared = std::sync::Arc::new(std::sync::Mutex::new(fuzz_records_of(moved.as_bytes())));
        let error = Store::open_with(Path::new(FUZZ_DIR), Box::new(FuzzMemory(shared))).err().unwrap();
        assert_eq!(error.to_string(), "the store's workloads record \":\" holds id \"2\": it is damaged");
        fuzz_store_records(moved.as_bytes());
    }

    #[test]
    fn state_survives_a_reopen() {
        let dir = scratch_dir("store-reopen");
        let (mut store, web, db) = populated(&dir);
        let before_provision = store.policy(db.agent_id).unwrap().clone();
        assert!(before_provision.rules.is_empty(), "drafts do not count");
        let (version, changes) = provision_all(&mut store);
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
        let mode = fs::metadata(dir.join(redb_backend::STORE_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn versions_move_only_when_the_content_changes() {
        let dir = scratch_dir("store-versions");
        let (mut store, web, db) = populated(&dir);
        provision_all(&mut store);
        let version = |store: &Store, id| store.policy(id).unwrap().version;
        let (web_v, db_v) = (version(&store, web.agent_id), version(&store, db.agent_id));
        assert_eq!(provision_all(&mut store).1, vec![], "provisioning the same rules changes nothing");
        assert!(store.heartbeat(web.agent_id, heartbeat(None), 300).unwrap().is_empty());

        let changes =
            store.heartbeat(web.agent_id, heartbeat(Some(host("web", "198.18.0.9/24"))), 301).unwrap();
        assert_eq!(changes.iter().map(|c| c.0).collect::<Vec<_>>(), vec![db.agent_id]);
        assert!(version(&store, db.agent_id) > db_v);
        assert_eq!(version(&store, web.agent_id), web_v);

        let changes = store.goodbye(web.agent_id, "stopping", 350).unwrap();
        assert_eq!(changes.len(), 1, "the offline web leaves db's policy");
        assert!(store.policy(db.agent_id).unwrap().ip_sets[0].members.is_empty());
        assert_eq!(store.heartbeat(web.agent_id, heartbeat(None), 400).unwrap().len(), 1, "back online");

        store.deactivate(web.agent_id, 500).unwrap();
        assert!(store.policy(web.agent_id).is_none());
        assert!(!store.authenticate(web.agent_id, &web.agent_token));
    }

    #[test]
    fn an_older_pces_json_files_are_migrated_and_flat_rules_keep_their_ids() {
        let built = scratch_dir("store-upgrade-source");
        let (mut store, web, db) = populated(&built);
        provision_all(&mut store);
        let policy = store.policy(db.agent_id).unwrap().clone();
        let (web_label, db_label) = (store.state().labels[0].id, store.state().labels[1].id);
        let events = store.events().clone();
        // The data directory as the previous version wrote it: state.json with flat rules and no
        // policy objects, events.json beside it.
        let dir = scratch_dir("store-upgrade");
        let path = dir.join(STATE_FILE);
        let mut old: Value = serde_json::to_value(store.state()).unwrap();
        drop(store);
        fs::write(
            dir.join(EVENTS_FILE),
            serde_json::to_vec(&json!({ "format": FORMAT, "log": events })).unwrap(),
        )
        .unwrap();
        let flat = json!([{ "id": 7, "consumers": [web_label], "providers": [db_label],
            "services": [{ "ports": { "first": 5432, "last": 5432 }, "protocol": "Tcp" }] }]);
        let object = old.as_object_mut().unwrap();
        for key in
            ["draft", "active", "policy_versions", "last_ip_list_id", "last_service_id", "last_rule_set_id"]
        {
            object.remove(key);
        }
        object.insert("draft_rules".into(), flat.clone());
        object.insert("active_rules".into(), flat);
        fs::write(&path, serde_json::to_vec(&old).unwrap()).unwrap();

        let (store, _) = Store::open(&dir).unwrap();
        let state = store.state();
        let set = state.active.rule_sets.values().find(|s| s.name == DEFAULT_RULE_SET).expect("Default");
        assert_eq!(set.rules.iter().map(|r| r.id).collect::<Vec<_>>(), vec![7]);
        assert_eq!(state.draft.rule_sets.get(&set.id), Some(set));
        assert!(state.active.ip_lists.values().any(|l| l.name == model::ANY_IP_LIST_NAME));
        // The same peers; the rule's derived ids follow its id.
        let upgraded = store.policy(db.agent_id).unwrap();
        assert_eq!(upgraded.ip_sets[0].members, policy.ip_sets[0].members);
        assert_eq!(upgraded.rules[0].id, 7000);
        assert!(store.authenticate(web.agent_id, &web.agent_token));
        assert_eq!(store.events().iter().len(), events.iter().len(), "the events came along");
        // The JSON files are set aside, and a reopen reads the new store alone.
        assert!(!path.exists() && dir.join(format!("{STATE_FILE}.migrated")).exists());
        assert!(dir.join(format!("{EVENTS_FILE}.migrated")).exists());
        let state = store.state().clone();
        drop(store);
        let (reopened, created) = Store::open(&dir).unwrap();
        assert!(!created);
        assert_eq!(reopened.state(), &state);
    }

    #[test]
    fn the_same_rule_cannot_be_added_twice() {
        let dir = scratch_dir("store-same-rule");
        let (mut store, _, _) = populated(&dir);
        let set_id = store.state().draft.rule_sets.keys().next().copied().unwrap();
        let rule = store.state().draft.rule_sets[&set_id].rules[0].clone();
        let again = store.create_sec_rule(set_id, rule.clone());
        assert!(matches!(again, Err(StoreError::Rejected(m)) if m.contains("the same rule")), "a duplicate");
        assert_eq!(store.state().draft.rule_sets[&set_id].rules.len(), 1, "nothing stored");
        let mut other = rule;
        other.unscoped_consumers = true;
        store.create_sec_rule(set_id, other).expect("a rule that differs is fine");
    }

    #[test]
    fn bad_input_is_rejected() {
        let dir = scratch_dir("store-rejects");
        let (mut store, web, _) = populated(&dir);
        assert!(matches!(
            store.activate("0000", host("x", "198.18.0.9/24"), 1),
            Err(StoreError::Activation(_))
        ));
        assert!(matches!(store.create_label("role", "web"), Err(StoreError::Rejected(_))));
        let web_label = store.state().labels[0].id;
        let db_label = store.state().labels[1].id;
        let both = store.update_workload(web.agent_id, Some(vec![web_label, db_label]), None);
        assert!(matches!(both, Err(StoreError::Rejected(m)) if m.contains("\"role\"")));
        assert!(matches!(store.update_workload(42, None, None), Err(StoreError::NoWorkload(42))));
        assert!(matches!(add_rule(&mut store, vec![], vec![db_label], PG), Err(StoreError::Rejected(_))));
        assert!(matches!(add_rule(&mut store, vec![77], vec![db_label], PG), Err(StoreError::Rejected(_))));
    }

    #[test]
    fn workloads_go_offline_after_silence_with_a_grace_period() {
        let dir = scratch_dir("store-sweep");
        let (mut store, web, _) = populated(&dir);
        assert!(store.sweep_offline(150, 60, 60, 0).unwrap().is_empty());
        assert!(store.sweep_offline(1000, 60, 60, 990).unwrap().is_empty(), "grace after a restart");
        store.sweep_offline(1000, 60, 60, 0).unwrap();
        assert!(!store.state().workloads[&web.agent_id].online);
    }

    #[test]
    fn three_missed_heartbeats_raise_one_event_before_offline() {
        let dir = scratch_dir("store-missed");
        let (mut store, web, db) = populated(&dir);
        store.heartbeat(web.agent_id, heartbeat(None), 100).unwrap();
        store.heartbeat(db.agent_id, heartbeat(None), 100).unwrap();
        let missed = |store: &Store| {
            event_types(store).iter().filter(|t| **t == EventType::AgentMissedHeartbeats).count()
        };
        assert!(store.sweep_offline(130, 30, 120, 0).unwrap().is_empty());
        assert_eq!(missed(&store), 0);
        assert!(store.sweep_offline(131, 30, 120, 0).unwrap().is_empty(), "a warning, still a peer");
        assert_eq!(missed(&store), 2);
        assert!(store.state().workloads[&web.agent_id].online);
        store.sweep_offline(140, 30, 120, 0).unwrap();
        assert_eq!(missed(&store), 2, "once per silence");
        store.heartbeat(web.agent_id, heartbeat(None), 150).unwrap();
        store.sweep_offline(181, 30, 120, 0).unwrap();
        assert_eq!(missed(&store), 3, "a new silence warns again");
        store.sweep_offline(222, 30, 120, 0).unwrap();
        assert!(!store.state().workloads[&db.agent_id].online, "12 intervals: offline");
        assert!(store.state().workloads[&web.agent_id].online);
    }

    #[test]
    fn a_restart_is_not_a_goodbye_but_an_agent_that_does_not_come_back_goes_offline() {
        let dir = scratch_dir("store-restart");
        let (mut store, web, db) = populated(&dir);
        store.heartbeat(web.agent_id, heartbeat(None), 100).unwrap();
        store.heartbeat(db.agent_id, heartbeat(None), 100).unwrap();
        store.goodbye(db.agent_id, ven_proto::GOODBYE_RESTART, 110).unwrap();
        assert!(store.state().workloads[&db.agent_id].online, "a restart is not a goodbye");
        assert!(!event_types(&store).contains(&EventType::WorkloadOffline));
        // Back within the period: nothing happened.
        store.heartbeat(db.agent_id, heartbeat(None), 115).unwrap();
        assert_eq!(store.state().workloads[&db.agent_id].restarting_since, None);
        store.sweep_offline(146, 30, 120, 0).unwrap();
        assert!(store.state().workloads[&db.agent_id].online, "a warning at most, not offline");
        // A restart that never comes back: offline after the warning period, not 12 intervals.
        store.heartbeat(web.agent_id, heartbeat(None), 200).unwrap();
        store.heartbeat(db.agent_id, heartbeat(None), 200).unwrap();
        store.goodbye(db.agent_id, ven_proto::GOODBYE_RESTART, 205).unwrap();
        assert!(store.sweep_offline(230, 30, 120, 0).unwrap().is_empty());
        assert!(store.state().workloads[&db.agent_id].online);
        let count =
            |store: &Store, wanted: EventType| event_types(store).iter().filter(|t| **t == wanted).count();
        store.heartbeat(web.agent_id, heartbeat(None), 230).unwrap();
        let warnings = count(&store, EventType::AgentMissedHeartbeats);
        store.sweep_offline(236, 30, 120, 0).unwrap();
        assert!(!store.state().workloads[&db.agent_id].online, "out of the peers' policies");
        assert!(store.state().workloads[&web.agent_id].online);
        assert_eq!(count(&store, EventType::WorkloadOffline), 1);
        assert_eq!(count(&store, EventType::AgentMissedHeartbeats), warnings, "no warning first");
        // Any other goodbye is one.
        store.heartbeat(web.agent_id, heartbeat(None), 240).unwrap();
        store.goodbye(web.agent_id, "agent stopped", 241).unwrap();
        assert!(!store.state().workloads[&web.agent_id].online);
    }

    #[test]
    fn a_clone_is_detected_once_and_the_guard_survives_a_restart() {
        let dir = scratch_dir("store-clone");
        let (mut store, web, _) = populated(&dir);
        let id = web.agent_id;
        let first = store.present_clone_token(id, None, Some("original"), 110, 600, true, &|_| true).unwrap();
        let Standing::Holder { next_token: Some(token) } = first else { panic!("{first:?}") };
        let copy =
            store.present_clone_token(id, Some(&token), Some("copy"), 120, 600, true, &|_| true).unwrap();
        assert_eq!(copy, Standing::Challenger);
        store.present_clone_token(id, Some(&token), Some("original"), 130, 600, false, &|_| true).unwrap();
        store.present_clone_token(id, Some(&token), Some("original"), 131, 600, false, &|_| true).unwrap();
        let detected =
            |store: &Store| event_types(store).iter().filter(|t| **t == EventType::CloneDetected).count();
        assert_eq!(detected(&store), 1);
        store.flush().unwrap();
        drop(store);
        let (mut store, _) = Store::open(&dir).unwrap();
        let copy =
            store.present_clone_token(id, Some(&token), Some("copy"), 140, 600, false, &|_| true).unwrap();
        assert_eq!(copy, Standing::Clone, "kept across a PCE restart");
        assert_eq!(store.state().workloads[&id].pairing_profile, Some(store.state().pairing_profiles[0].id));
    }

    #[test]
    fn a_clone_re_pairs_from_its_profile_when_the_profile_allows() {
        let dir = scratch_dir("store-clone-repair");
        let (mut store, web, _) = populated(&dir);
        let id = web.agent_id;
        let profile = store.state().workloads[&id].pairing_profile.unwrap();
        store.state.pairing_profiles.iter_mut().find(|p| p.id == profile).unwrap().enabled = false;
        let refused = store.reactivate_clone(id, "copy", host("web-copy", "198.18.0.4/24"), 200);
        assert!(matches!(refused, Err(StoreError::Activation(ref why)) if why.contains("disabled")));
        store.state.pairing_profiles.iter_mut().find(|p| p.id == profile).unwrap().enabled = true;
        let before = store.state().workloads[&id].clone();
        let copy = store.reactivate_clone(id, "copy", host("web-copy", "198.18.0.4/24"), 200).unwrap();
        assert_ne!(copy.agent_id, id);
        let new = &store.state().workloads[&copy.agent_id];
        let profile_labels = store.pairing_profile(profile).unwrap().labels.clone();
        assert_eq!((new.labels.clone(), new.pairing_profile), (profile_labels, Some(profile)));
        let original = &store.state().workloads[&id];
        assert_eq!((&original.interfaces, original.online), (&before.interfaces, before.online));
        assert!(store.authenticate(copy.agent_id, &copy.agent_token));
    }

    #[test]
    fn a_workload_record_from_before_clone_tokens_reads_unguarded() {
        let dir = scratch_dir("store-clone-old");
        let (store, web, _) = populated(&dir);
        let mut record = serde_json::to_value(&store.state().workloads[&web.agent_id]).unwrap();
        let fields = record.as_object_mut().unwrap();
        assert!(fields.remove("clone_guard").is_some() && fields.remove("pairing_profile").is_some());
        let old: Workload = serde_json::from_value(record).unwrap();
        assert_eq!((old.clone_guard, old.pairing_profile), (CloneGuard::default(), None));
    }

    fn event_types(store: &Store) -> Vec<EventType> {
        store.events().iter().map(|e| e.event_type).collect()
    }

    #[test]
    fn a_wrong_token_for_a_paired_workload_is_a_lost_agent_once_per_window() {
        let dir = scratch_dir("store-lost-agent");
        let (mut store, web, _) = populated(&dir);
        let before = store.events().iter().len();
        assert!(store.lost_agent(web.agent_id, "VEN API", 100));
        for at in 101..110 {
            assert!(!store.lost_agent(web.agent_id, "VEN API", at), "rate-limited");
        }
        assert!(!store.lost_agent(9_999, "VEN API", 100), "an unknown id is no lost agent");
        assert_eq!(store.events().iter().len(), before + 1);
        let event = store.events().iter().last().cloned().unwrap();
        assert_eq!((event.event_type, event.workload_id), (EventType::LostAgent, Some(web.agent_id)));
        store.flush().unwrap();
        drop(store);
        let (reopened, _) = Store::open(&dir).unwrap();
        assert_eq!(reopened.events().iter().last().map(|e| e.event_type), Some(EventType::LostAgent));
    }

    #[test]
    fn suspended_workloads_stay_peers_and_are_not_taken_offline() {
        let dir = scratch_dir("store-suspend");
        let (mut store, web, db) = populated(&dir);
        provision_all(&mut store);
        let db_peers = |store: &Store| store.policy(db.agent_id).unwrap().ip_sets[0].members.clone();
        assert_eq!(db_peers(&store), vec!["198.18.0.2/32".parse().unwrap()]);

        assert!(store.suspend(web.agent_id, true, Some(PolicyState::Enforced), 200).unwrap().is_empty());
        assert!(store.suspend(web.agent_id, true, None, 201).unwrap().is_empty(), "a repeat changes nothing");
        // The VEN stops after suspending: its goodbye does not isolate it.
        assert!(store.goodbye(web.agent_id, "suspended", 202).unwrap().is_empty());
        assert!(store.sweep_offline(100_000, 60, 60, 0).unwrap().len() == 1, "db goes offline, web stays");
        assert!(store.state().workloads[&web.agent_id].suspended);
        assert_eq!(db_peers(&store), vec!["198.18.0.2/32".parse().unwrap()]);
        // The operator changes the policy state meanwhile.
        store.update_workload(web.agent_id, None, Some(PolicyState::Test)).unwrap();
        drop(store);

        let (mut store, _) = Store::open(&dir).unwrap();
        assert!(store.state().workloads[&web.agent_id].suspended, "suspension survives a restart");
        store.suspend(web.agent_id, false, None, 100_000).unwrap();
        let workload = &store.state().workloads[&web.agent_id];
        assert!(!workload.suspended && workload.online);
        assert!(
            store.sweep_offline(100_050, 60, 60, 0).unwrap().is_empty(),
            "the offline clock starts afresh"
        );
        store.sweep_offline(100_061, 60, 60, 0).unwrap();
        assert!(!store.state().workloads[&web.agent_id].online);
        assert_eq!(
            event_types(&store),
            [
                EventType::AgentActivated,
                EventType::AgentActivated,
                EventType::ServerSuspended,
                EventType::AgentMissedHeartbeats,
                EventType::WorkloadOffline,
                EventType::ServerUnsuspended,
                EventType::AgentMissedHeartbeats,
                EventType::WorkloadOffline,
            ]
        );
        let suspended = store.events().iter().nth(2).unwrap();
        assert_eq!(suspended.details["previous_state"], "enforced");
        assert_eq!(suspended.hostname.as_deref(), Some("web"));
        let unsuspended = store.events().iter().nth(5).unwrap();
        assert!(unsuspended.message.contains("policy state test"), "{}", unsuspended.message);

        // A suspended VEN may unpair.
        store.suspend(web.agent_id, true, None, 100_100).unwrap();
        store.deactivate(web.agent_id, 100_101).unwrap();
        assert_eq!(event_types(&store).last(), Some(&EventType::AgentDeactivated));
    }

    #[test]
    fn heartbeat_bookkeeping_is_written_without_the_store_and_made_durable() {
        let dir = scratch_dir("store-workload-flush");
        let (mut store, web, db) = populated(&dir);
        assert!(store.take_workload_flush().is_none(), "nothing marked");
        store.heartbeat(web.agent_id, heartbeat(None), 400).unwrap();
        store.heartbeat(db.agent_id, heartbeat(None), 401).unwrap();
        let flush = store.take_workload_flush().expect("two workloads marked");
        assert!(!flush.durable, "the 5-second flushes skip the fsync");
        assert_eq!(flush.commit().ok(), Some(2), "only the two records");
        assert!(store.take_workload_flush().is_none(), "taken: nothing left");
        // A failed flush gives its workloads back for the next commit.
        store.heartbeat(web.agent_id, heartbeat(None), 402).unwrap();
        let flush = store.take_workload_flush().unwrap();
        // As after a failed commit: the backend is released, the records given back.
        let unwritten = {
            let flush = flush;
            flush.unwritten
        };
        store.flush_failed(unwritten);
        assert!(store.dirty_workloads.contains(&web.agent_id));
        // The shutdown's save makes the lazy commits durable, even with nothing else to write.
        store.save().unwrap();
        drop(store);
        let (store, _) = Store::open(&dir).unwrap();
        assert_eq!(store.state().workloads[&web.agent_id].last_heartbeat, Some(402));
        assert_eq!(store.state().workloads[&db.agent_id].last_heartbeat, Some(401));
        // Every MAX_LAZY_FLUSHES + 1-th flush is durable.
        let mut store = store;
        let durable: Vec<bool> = (0..=MAX_LAZY_FLUSHES as u64)
            .map(|i| {
                store.heartbeat(web.agent_id, heartbeat(None), 500 + i).unwrap();
                let flush = store.take_workload_flush().unwrap();
                let durable = flush.durable;
                flush.commit().ok().unwrap();
                durable
            })
            .collect();
        assert_eq!(durable.iter().filter(|d| **d).count(), 1);
        assert_eq!(durable.last(), Some(&true));
    }

    #[test]
    fn heartbeat_events_are_recorded_and_persisted() {
        let dir = scratch_dir("store-events");
        let (mut store, web, _) = populated(&dir);
        let mut beat = heartbeat(None);
        beat.events = vec![AgentEvent {
            at: 1_795_780_800,
            kind: AgentEventKind::Tampering { summary: "rule 3 deleted".into(), repaired: true },
        }];
        assert!(store.heartbeat(web.agent_id, beat, 300).unwrap().is_empty());
        store.flush().unwrap();
        drop(store);

        let (mut store, _) = Store::open(&dir).unwrap();
        let tampering = store.events().iter().last().unwrap().clone();
        assert_eq!((tampering.id, tampering.event_type, tampering.at), (3, EventType::Tampering, 300));
        assert_eq!(tampering.workload_id, Some(web.agent_id));
        assert_eq!(tampering.details["summary"], "rule 3 deleted");
        assert_eq!(tampering.details["repaired"], true);
        assert_eq!(tampering.details["detected_at"], "2026-11-27T12:00:00Z");
        assert!(tampering.message.contains("rule 3 deleted (repaired)"));
        // Ids go on after a restart; coming back online is an event.
        store.goodbye(web.agent_id, "agent stopped", 301).unwrap();
        store.heartbeat(web.agent_id, heartbeat(None), 302).unwrap();
        let ids: Vec<u64> = store.events().iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![1, 2, 3, 4, 5]);
        assert_eq!(event_types(&store)[3..], [EventType::WorkloadOffline, EventType::WorkloadOnline]);
    }

    #[test]
    fn custom_rules_change_only_their_workloads_policy_at_once() {
        let dir = scratch_dir("store-custom");
        let (mut store, web, db) = populated(&dir);
        let version = |store: &Store, id| store.policy(id).unwrap().version;
        let (web_v, db_v) = (version(&store, web.agent_id), version(&store, db.agent_id));
        let (rule, changes) = store
            .add_custom_rule(
                web.agent_id,
                RuleFamily::V4,
                CustomChain::Input,
                "  -p tcp --dport 9000 -j ACCEPT ",
            )
            .unwrap();
        assert_eq!(changes, vec![(web.agent_id, version(&store, web.agent_id))]);
        assert!(version(&store, web.agent_id) > web_v);
        assert_eq!(version(&store, db.agent_id), db_v);
        assert_eq!((rule.id, rule.rule.as_str()), (1, "-p tcp --dport 9000 -j ACCEPT"));
        assert_eq!(store.policy(web.agent_id).unwrap().custom_rules, vec![rule.clone()]);
        let (second, _) =
            store.add_custom_rule(web.agent_id, RuleFamily::Both, CustomChain::Output, "-j DROP").unwrap();
        assert_eq!(second.id, 2);
        drop(store);

        let (mut store, _) = Store::open(&dir).unwrap();
        assert_eq!(store.policy(web.agent_id).unwrap().custom_rules.len(), 2, "kept across a restart");
        let before = version(&store, web.agent_id);
        assert_eq!(store.remove_custom_rule(web.agent_id, 1).unwrap().len(), 1);
        assert!(version(&store, web.agent_id) > before);
        assert_eq!(store.policy(web.agent_id).unwrap().custom_rules, vec![second]);
        assert!(matches!(
            store.remove_custom_rule(web.agent_id, 1),
            Err(StoreError::NoCustomRule { rule: 1, .. })
        ));
        let (third, _) =
            store.add_custom_rule(web.agent_id, RuleFamily::V6, CustomChain::Forward, "-j RETURN").unwrap();
        assert_eq!(third.id, 3, "ids are not reused");
        assert!(matches!(
            store.add_custom_rule(42, RuleFamily::V4, CustomChain::Input, "-j ACCEPT"),
            Err(StoreError::NoWorkload(42))
        ));
    }

    #[test]
    fn custom_rule_text_is_checked_minimally() {
        assert_eq!(check_custom_rule(" -j ACCEPT\t"), Ok("-j ACCEPT"));
        assert!(check_custom_rule("  ").unwrap_err().contains("must not be empty"));
        assert!(check_custom_rule("-j ACCEPT\n-j DROP").unwrap_err().contains("no newline"));
        let long = format!("-m comment --comment {}", "x".repeat(MAX_CUSTOM_RULE_BYTES));
        assert!(check_custom_rule(&long).unwrap_err().contains("at most 512 bytes"));
        assert!(check_custom_rule(&"x".repeat(MAX_CUSTOM_RULE_BYTES)).is_ok());
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_and_kept() {
        let dir = scratch_dir("store-corrupt");
        fs::write(dir.join(STATE_FILE), b"{\"format\": 1,").unwrap();
        assert!(matches!(Store::open(&dir), Err(StoreError::Parse { .. })));
        assert_eq!(fs::read(dir.join(STATE_FILE)).unwrap(), b"{\"format\": 1,");
    }
}
