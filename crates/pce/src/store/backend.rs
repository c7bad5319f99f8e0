//! Where the store's records live: the [`Backend`] interface, the record layout, and the diff
//! that turns a change of the in-memory state into the records to write.
//!
//! The state is a set of tables of JSON records, one record per object (a workload, a label, a
//! draft rule set, an event, ...) under a text key (its id), plus two `meta` records (the
//! counters, the event log's counters). A change writes only the records that differ, in one
//! transaction: a crash leaves either the whole change or none of it. JSON keeps records readable
//! by versions that add fields (every new field has a serde default).
//!
//! [`RedbBackend`](super::redb_backend::RedbBackend) is the one implementation; a PostgreSQL
//! backend for PCE clusters would implement the same two calls with a table per [`Table`].

use super::{State, StoreError};
use crate::orgevents::{EventLog, OrgEvent};
use crate::policy::model::{Kind, PolicyObjects};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The tables of the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Meta,
    Labels,
    Workloads,
    PairingProfiles,
    ApiKeys,
    Draft(Kind),
    Active(Kind),
    PolicyVersions,
    Events,
}

impl Table {
    pub const ALL: [Table; 13] = [
        Table::Meta,
        Table::Labels,
        Table::Workloads,
        Table::PairingProfiles,
        Table::ApiKeys,
        Table::Draft(Kind::IpLists),
        Table::Draft(Kind::Services),
        Table::Draft(Kind::RuleSets),
        Table::Active(Kind::IpLists),
        Table::Active(Kind::Services),
        Table::Active(Kind::RuleSets),
        Table::PolicyVersions,
        Table::Events,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::Meta => "meta",
            Table::Labels => "labels",
            Table::Workloads => "workloads",
            Table::PairingProfiles => "pairing_profiles",
            Table::ApiKeys => "api_keys",
            Table::Draft(Kind::IpLists) => "draft_ip_lists",
            Table::Draft(Kind::Services) => "draft_services",
            Table::Draft(Kind::RuleSets) => "draft_rule_sets",
            Table::Active(Kind::IpLists) => "active_ip_lists",
            Table::Active(Kind::Services) => "active_services",
            Table::Active(Kind::RuleSets) => "active_rule_sets",
            Table::PolicyVersions => "policy_versions",
            Table::Events => "events",
        }
    }
}

/// Records to write and to delete, committed as one transaction.
#[derive(Debug, Default, PartialEq)]
pub struct ChangeSet {
    pub puts: Vec<(Table, String, Vec<u8>)>,
    pub deletes: Vec<(Table, String)>,
}

impl ChangeSet {
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty()
    }
}

/// Every record of a store, as loaded at start.
pub type Records = Vec<(Table, String, Vec<u8>)>;

/// Durable storage of the records.
pub trait Backend: Send {
    /// Every record, or an empty list for a new store.
    fn load(&self) -> Result<Records, StoreError>;
    /// Writes `changes` atomically and durably: all of them or none, on disk when this returns.
    fn commit(&mut self, changes: &ChangeSet) -> Result<(), StoreError>;
    /// Writes `changes` atomically, without waiting for the disk: a crash may lose them (and
    /// every lazy commit since the last durable one), never part of one; the next durable commit
    /// makes them durable too. For heartbeat bookkeeping, whose loss a restart tolerates.
    fn commit_lazily(&mut self, changes: &ChangeSet) -> Result<(), StoreError> {
        self.commit(changes)
    }
}

const META_STATE: &str = "state";
const META_EVENTS: &str = "events";

/// The scalar part of the state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Meta {
    format: u32,
    sec_policy_version: u64,
    policy_counter: u64,
    last_label_id: u64,
    last_rule_id: u64,
    last_workload_id: u64,
    #[serde(default)]
    last_ip_list_id: u64,
    #[serde(default)]
    last_service_id: u64,
    #[serde(default)]
    last_rule_set_id: u64,
}

impl Meta {
    fn of(state: &State) -> Meta {
        Meta {
            format: state.format,
            sec_policy_version: state.sec_policy_version,
            policy_counter: state.policy_counter,
            last_label_id: state.last_label_id,
            last_rule_id: state.last_rule_id,
            last_workload_id: state.last_workload_id,
            last_ip_list_id: state.last_ip_list_id,
            last_service_id: state.last_service_id,
            last_rule_set_id: state.last_rule_set_id,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct EventCounters {
    last_id: u64,
    dropped: u64,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these types cannot fail: string keys only, no I/O.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Adds to `out` the records of `table` that differ between `old` and `new`.
fn diff_table<'a, T: PartialEq + Serialize + 'a>(
    table: Table,
    old: impl IntoIterator<Item = (String, &'a T)>,
    new: impl IntoIterator<Item = (String, &'a T)>,
    out: &mut ChangeSet,
) {
    let mut old: BTreeMap<String, &T> = old.into_iter().collect();
    for (key, value) in new {
        if old.remove(&key) != Some(value) {
            out.puts.push((table, key, encode(value)));
        }
    }
    out.deletes.extend(old.into_keys().map(|key| (table, key)));
}

fn objects_diff(version: fn(Kind) -> Table, old: &PolicyObjects, new: &PolicyObjects, out: &mut ChangeSet) {
    diff_table(
        version(Kind::IpLists),
        old.ip_lists.iter().map(|(id, v)| (id.to_string(), v)),
        new.ip_lists.iter().map(|(id, v)| (id.to_string(), v)),
        out,
    );
    diff_table(
        version(Kind::Services),
        old.services.iter().map(|(id, v)| (id.to_string(), v)),
        new.services.iter().map(|(id, v)| (id.to_string(), v)),
        out,
    );
    diff_table(
        version(Kind::RuleSets),
        old.rule_sets.iter().map(|(id, v)| (id.to_string(), v)),
        new.rule_sets.iter().map(|(id, v)| (id.to_string(), v)),
        out,
    );
}

/// What of the event log is stored: the ids first..=last (the ring keeps a contiguous run of ids)
/// and the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventsMark {
    pub first_id: u64,
    pub last_id: u64,
    pub dropped: u64,
}

impl EventsMark {
    pub fn of(events: &EventLog) -> EventsMark {
        let first_id = events.iter().next().map_or(events.last_id + 1, |e| e.id);
        EventsMark { first_id, last_id: events.last_id, dropped: events.dropped }
    }
}

/// The records that turn what `old` and `old_events` describe into `new` and `new_events`,
/// workloads aside (see [`workload_record`]).
pub fn diff(old: &State, new: &State, old_events: EventsMark, new_events: &EventLog) -> ChangeSet {
    let mut out = ChangeSet::default();
    if Meta::of(old) != Meta::of(new) {
        out.puts.push((Table::Meta, META_STATE.to_string(), encode(&Meta::of(new))));
    }
    diff_table(
        Table::Labels,
        old.labels.iter().map(|l| (l.id.to_string(), l)),
        new.labels.iter().map(|l| (l.id.to_string(), l)),
        &mut out,
    );
    // Workloads are written by the store from its marks (`workload_record`): comparing 10,000 of
    // them on every change would make each change O(fleet).
    diff_table(
        Table::PairingProfiles,
        old.pairing_profiles.iter().map(|p| (p.id.to_string(), p)),
        new.pairing_profiles.iter().map(|p| (p.id.to_string(), p)),
        &mut out,
    );
    diff_table(
        Table::ApiKeys,
        old.api_keys.iter().map(|k| (k.key_id.clone(), k)),
        new.api_keys.iter().map(|k| (k.key_id.clone(), k)),
        &mut out,
    );
    objects_diff(Table::Draft, &old.draft, &new.draft, &mut out);
    objects_diff(Table::Active, &old.active, &new.active, &mut out);
    diff_table(
        Table::PolicyVersions,
        old.policy_versions.iter().map(|v| (v.version.to_string(), v)),
        new.policy_versions.iter().map(|v| (v.version.to_string(), v)),
        &mut out,
    );
    // Events only come and go (the ring drops the oldest): compare ids, not contents.
    let new_mark = EventsMark::of(new_events);
    if old_events != new_mark {
        let counters = EventCounters { last_id: new_mark.last_id, dropped: new_mark.dropped };
        out.puts.push((Table::Meta, META_EVENTS.to_string(), encode(&counters)));
        let gone = old_events.first_id..new_mark.first_id.min(old_events.last_id + 1);
        out.deletes.extend(gone.map(|id| (Table::Events, id.to_string())));
        out.puts.extend(
            new_events
                .iter()
                .filter(|e| e.id > old_events.last_id)
                .map(|e| (Table::Events, e.id.to_string(), encode(e))),
        );
    }
    out
}

/// The record of one workload.
pub fn workload_record(workload: &super::Workload) -> (Table, String, Vec<u8>) {
    (Table::Workloads, workload.id.to_string(), encode(workload))
}

/// The key of a workload's record, to delete it.
pub fn workload_key(id: u64) -> (Table, String) {
    (Table::Workloads, id.to_string())
}

/// Makes `persisted` hold what `changes` wrote from `state` (after the backend took them), by
/// copying only the records that changed.
pub fn apply(persisted: &mut State, state: &State, changes: &ChangeSet) {
    let keys =
        changes.puts.iter().map(|(t, k, _)| (*t, k)).chain(changes.deletes.iter().map(|(t, k)| (*t, k)));
    for (table, key) in keys {
        let id: u64 = key.parse().unwrap_or(u64::MAX);
        match table {
            Table::Meta => {
                persisted.format = state.format;
                persisted.sec_policy_version = state.sec_policy_version;
                persisted.policy_counter = state.policy_counter;
                persisted.last_label_id = state.last_label_id;
                persisted.last_rule_id = state.last_rule_id;
                persisted.last_workload_id = state.last_workload_id;
                persisted.last_ip_list_id = state.last_ip_list_id;
                persisted.last_service_id = state.last_service_id;
                persisted.last_rule_set_id = state.last_rule_set_id;
            }
            Table::Labels => copy_in_vec(&mut persisted.labels, &state.labels, |l| l.id == id),
            // The store tracks its workloads' records itself.
            Table::Workloads => {}
            Table::PairingProfiles => {
                copy_in_vec(&mut persisted.pairing_profiles, &state.pairing_profiles, |p| p.id == id)
            }
            Table::ApiKeys => copy_in_vec(&mut persisted.api_keys, &state.api_keys, |k| &k.key_id == key),
            Table::Draft(kind) => copy_object(&mut persisted.draft, &state.draft, kind, id),
            Table::Active(kind) => copy_object(&mut persisted.active, &state.active, kind, id),
            Table::PolicyVersions => {
                copy_in_vec(&mut persisted.policy_versions, &state.policy_versions, |v| v.version == id)
            }
            Table::Events => {}
        }
    }
}

fn copy_in_vec<T: Clone>(to: &mut Vec<T>, from: &[T], is_it: impl Fn(&T) -> bool) {
    to.retain(|item| !is_it(item));
    to.extend(from.iter().filter(|item| is_it(item)).cloned());
}

fn copy_in_map<T: Clone>(to: &mut BTreeMap<u64, T>, from: &BTreeMap<u64, T>, id: u64) {
    match from.get(&id) {
        Some(value) => to.insert(id, value.clone()),
        None => to.remove(&id),
    };
}

fn copy_object(to: &mut PolicyObjects, from: &PolicyObjects, kind: Kind, id: u64) {
    match kind {
        Kind::IpLists => copy_in_map(&mut to.ip_lists, &from.ip_lists, id),
        Kind::Services => copy_in_map(&mut to.services, &from.services, id),
        Kind::RuleSets => copy_in_map(&mut to.rule_sets, &from.rule_sets, id),
    }
}

fn decode<T: DeserializeOwned>(table: Table, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Record {
        table: table.name(),
        key: key.to_string(),
        source,
    })
}

/// `value`, the record under `key` of `table`, when `key` is the id it holds (as [`diff`] writes
/// it). Anything else is damage: kept, a stale record under another key could replace the
/// current one of the same id when the records are read back (issue 17).
fn keyed<T>(table: Table, key: &str, id: impl ToString, value: T) -> Result<T, StoreError> {
    let id = id.to_string();
    if id == key {
        Ok(value)
    } else {
        Err(StoreError::MisKeyed { table: table.name(), key: key.to_string(), id })
    }
}

/// The state and events the records hold; `None` for a store with no records.
pub fn assemble(records: Records) -> Result<Option<(State, EventLog)>, StoreError> {
    if records.is_empty() {
        return Ok(None);
    }
    let mut meta: Option<Meta> = None;
    let mut event_counters = EventCounters { last_id: 0, dropped: 0 };
    let mut state = State::empty();
    let mut events: Vec<OrgEvent> = Vec::new();
    for (table, key, bytes) in &records {
        let (table, key) = (*table, key.as_str());
        match table {
            Table::Meta if key == META_STATE => meta = Some(decode(table, key, bytes)?),
            Table::Meta if key == META_EVENTS => event_counters = decode(table, key, bytes)?,
            Table::Meta => log::warn!("store: unknown meta record {key:?} ignored"),
            Table::Labels => {
                let label: crate::policy::Label = decode(table, key, bytes)?;
                state.labels.push(keyed(table, key, label.id, label)?);
            }
            Table::Workloads => {
                let workload: super::Workload = decode(table, key, bytes)?;
                state.workloads.insert(workload.id, keyed(table, key, workload.id, workload)?);
            }
            Table::PairingProfiles => {
                let profile: super::PairingProfile = decode(table, key, bytes)?;
                state.pairing_profiles.push(keyed(table, key, profile.id, profile)?);
            }
            Table::ApiKeys => {
                let api_key: super::ApiKey = decode(table, key, bytes)?;
                state.api_keys.push(keyed(table, key, api_key.key_id.clone(), api_key)?);
            }
            Table::Draft(kind) | Table::Active(kind) => {
                let objects =
                    if matches!(table, Table::Draft(_)) { &mut state.draft } else { &mut state.active };
                match kind {
                    Kind::IpLists => {
                        let list: crate::policy::model::IpList = decode(table, key, bytes)?;
                        objects.ip_lists.insert(list.id, keyed(table, key, list.id, list)?);
                    }
                    Kind::Services => {
                        let service: crate::policy::model::ServiceDef = decode(table, key, bytes)?;
                        objects.services.insert(service.id, keyed(table, key, service.id, service)?);
                    }
                    Kind::RuleSets => {
                        let set: crate::policy::model::RuleSet = decode(table, key, bytes)?;
                        objects.rule_sets.insert(set.id, keyed(table, key, set.id, set)?);
                    }
                }
            }
            Table::PolicyVersions => {
                let version: super::PolicyVersion = decode(table, key, bytes)?;
                state.policy_versions.push(keyed(table, key, version.version, version)?);
            }
            Table::Events => {
                let event: OrgEvent = decode(table, key, bytes)?;
                events.push(keyed(table, key, event.id, event)?);
            }
        }
    }
    let meta = meta.ok_or(StoreError::MissingMeta)?;
    state.format = meta.format;
    state.sec_policy_version = meta.sec_policy_version;
    state.policy_counter = meta.policy_counter;
    state.last_label_id = meta.last_label_id;
    state.last_rule_id = meta.last_rule_id;
    state.last_workload_id = meta.last_workload_id;
    state.last_ip_list_id = meta.last_ip_list_id;
    state.last_service_id = meta.last_service_id;
    state.last_rule_set_id = meta.last_rule_set_id;
    state.labels.sort_by_key(|label| label.id);
    state.pairing_profiles.sort_by_key(|profile| profile.id);
    state.api_keys.sort_by_key(|key| key.created_at);
    state.policy_versions.sort_by_key(|version| version.version);
    Ok(Some((state, EventLog::from_parts(event_counters.last_id, event_counters.dropped, events))))
}
