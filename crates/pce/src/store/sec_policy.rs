//! The security policy objects in the store: editing the draft (IP lists, services, rule sets
//! and their rules), provisioning it, and bringing older states into this model.
//!
//! Guarantees: the draft never refers to an object it lacks (labels, workloads, IP lists,
//! services are checked on every edit, and an object a draft rule set uses cannot be deleted);
//! provisioning refuses a subset that would leave an active rule set referring to an object the
//! active version lacks, and changes nothing when it refuses.

use super::{Changes, LegacyRule, MAX_POLICY_VERSIONS, PolicyVersion, State, Store, StoreError};
use crate::policy::MAX_RULE_ID;
use crate::policy::model::{
    self, Actor, IpList, Kind, MAX_OBJECTS_PER_KIND, MAX_RULES_PER_SET, ObjectRef, PolicyObjects, RuleSet,
    SecRule, ServiceDef, ServicePort, ServiceRef,
};
use ven_proto::PortRange;

impl Store {
    /// The draft objects that differ from the active ones.
    pub fn pending_changes(&self) -> Vec<ObjectRef> {
        self.state.draft.pending(&self.state.active)
    }

    /// Adds an IP list to the draft (its id is assigned here).
    pub fn create_ip_list(&mut self, mut list: IpList) -> Result<IpList, StoreError> {
        self.check_room(Kind::IpLists)?;
        self.check_unique_name(Kind::IpLists, &list.name, None)?;
        self.state.last_ip_list_id += 1;
        list.id = self.state.last_ip_list_id;
        self.state.draft.ip_lists.insert(list.id, list.clone());
        self.save()?;
        Ok(list)
    }

    /// Replaces draft IP list `list.id`.
    pub fn update_ip_list(&mut self, list: IpList) -> Result<(), StoreError> {
        self.draft_object((Kind::IpLists, list.id))?;
        self.check_unique_name(Kind::IpLists, &list.name, Some(list.id))?;
        self.state.draft.ip_lists.insert(list.id, list);
        self.save()
    }

    pub fn create_service(&mut self, mut service: ServiceDef) -> Result<ServiceDef, StoreError> {
        self.check_room(Kind::Services)?;
        self.check_unique_name(Kind::Services, &service.name, None)?;
        self.state.last_service_id += 1;
        service.id = self.state.last_service_id;
        self.state.draft.services.insert(service.id, service.clone());
        self.save()?;
        Ok(service)
    }

    pub fn update_service(&mut self, service: ServiceDef) -> Result<(), StoreError> {
        self.draft_object((Kind::Services, service.id))?;
        self.check_unique_name(Kind::Services, &service.name, Some(service.id))?;
        self.state.draft.services.insert(service.id, service);
        self.save()
    }

    /// Adds a rule set, with its rules (which get their ids here), to the draft.
    pub fn create_rule_set(&mut self, mut set: RuleSet) -> Result<RuleSet, StoreError> {
        self.check_room(Kind::RuleSets)?;
        self.check_unique_name(Kind::RuleSets, &set.name, None)?;
        self.check_rule_set(&set)?;
        self.state.last_rule_set_id += 1;
        set.id = self.state.last_rule_set_id;
        for rule in &mut set.rules {
            rule.id = self.next_rule_id()?;
        }
        self.state.draft.rule_sets.insert(set.id, set.clone());
        self.save()?;
        Ok(set)
    }

    /// Replaces draft rule set `set.id`'s name, description, enabled flag and scopes (and its
    /// rules when `rules` is given; new rules get ids).
    pub fn update_rule_set(&mut self, mut set: RuleSet) -> Result<(), StoreError> {
        let current = self.draft_rule_set(set.id)?.clone();
        self.check_unique_name(Kind::RuleSets, &set.name, Some(set.id))?;
        self.check_rule_set(&set)?;
        for rule in &mut set.rules {
            if !current.rules.iter().any(|old| old.id == rule.id) {
                rule.id = self.next_rule_id()?;
            }
        }
        self.state.draft.rule_sets.insert(set.id, set);
        self.save()
    }

    /// Adds a rule to draft rule set `set_id`.
    pub fn create_sec_rule(&mut self, set_id: u64, mut rule: SecRule) -> Result<SecRule, StoreError> {
        let mut set = self.draft_rule_set(set_id)?.clone();
        if set.rules.len() >= MAX_RULES_PER_SET {
            return Err(StoreError::Rejected(format!("a rule set has at most {MAX_RULES_PER_SET} rules")));
        }
        rule.id = 0;
        set.rules.push(rule);
        self.check_rule_set(&set)?;
        let id = self.next_rule_id()?;
        let rule = set.rules.last_mut().expect("just pushed");
        rule.id = id;
        let rule = rule.clone();
        self.state.draft.rule_sets.insert(set_id, set);
        self.save()?;
        Ok(rule)
    }

    /// Replaces rule `rule.id` of draft rule set `set_id`.
    pub fn update_sec_rule(&mut self, set_id: u64, rule: SecRule) -> Result<(), StoreError> {
        let mut set = self.draft_rule_set(set_id)?.clone();
        let slot = set.rules.iter_mut().find(|old| old.id == rule.id).ok_or(StoreError::NoObject)?;
        *slot = rule;
        self.check_rule_set(&set)?;
        self.state.draft.rule_sets.insert(set_id, set);
        self.save()
    }

    pub fn delete_sec_rule(&mut self, set_id: u64, rule_id: u64) -> Result<(), StoreError> {
        let mut set = self.draft_rule_set(set_id)?.clone();
        let before = set.rules.len();
        set.rules.retain(|rule| rule.id != rule_id);
        if set.rules.len() == before {
            return Err(StoreError::NoObject);
        }
        self.state.draft.rule_sets.insert(set_id, set);
        self.save()
    }

    /// Deletes an object from the draft; an IP list or service a draft rule set uses is refused.
    pub fn delete_draft_object(&mut self, object: ObjectRef) -> Result<(), StoreError> {
        self.draft_object(object)?;
        if let Some(set) = self.state.draft.referrers(object).first() {
            return Err(StoreError::InUse(format!(
                "{} {} is used by rule set {set}",
                object.0.as_str(),
                object.1
            )));
        }
        let draft = &mut self.state.draft;
        match object {
            (Kind::IpLists, id) => draft.ip_lists.remove(&id).map(drop),
            (Kind::Services, id) => draft.services.remove(&id).map(drop),
            (Kind::RuleSets, id) => draft.rule_sets.remove(&id).map(drop),
        };
        self.save()
    }

    /// Makes `subset` of the pending changes (all of them when `None`) active, records a policy
    /// version and recomputes the policies. Returns the version and the workloads it changed.
    /// Calls `publish` with the changed workloads as soon as their new versions are known, before
    /// the commit: the bolts and the VENs' connections overlap the write, and their fetches wait
    /// for the store (held until the commit is done), so they get the committed policy.
    pub fn provision(
        &mut self,
        subset: Option<Vec<ObjectRef>>,
        description: &str,
        now: u64,
        publish: &dyn Fn(&Changes),
    ) -> Result<(PolicyVersion, Changes), StoreError> {
        let pending = self.pending_changes();
        let chosen = match subset {
            None => pending,
            Some(objects) => {
                for object in &objects {
                    if !self.state.draft.contains(*object) && !self.state.active.contains(*object) {
                        return Err(StoreError::Rejected(format!(
                            "no {} with id {}",
                            object.0.as_str(),
                            object.1
                        )));
                    }
                }
                objects.into_iter().filter(|object| pending.contains(object)).collect()
            }
        };
        let mut active = self.state.active.clone();
        for object in &chosen {
            active.take_from(&self.state.draft, *object);
        }
        for set in active.rule_sets.keys() {
            if let Some(missing) =
                active.references((Kind::RuleSets, *set)).into_iter().find(|object| !active.contains(*object))
            {
                return Err(StoreError::Rejected(format!(
                    "rule set {set} refers to {} {}, which would not be active: provision it too",
                    missing.0.as_str(),
                    missing.1
                )));
            }
        }
        self.state.active = active;
        self.state.sec_policy_version += 1;
        let changes = self.recompute();
        let version = PolicyVersion {
            version: self.state.sec_policy_version,
            description: description.to_string(),
            created_at: now,
            objects: chosen,
            workloads_affected: changes.len(),
        };
        self.state.policy_versions.push(version.clone());
        if self.state.policy_versions.len() > MAX_POLICY_VERSIONS {
            self.state.policy_versions.remove(0);
        }
        publish(&changes);
        self.save()?;
        Ok((version, changes))
    }

    fn next_rule_id(&mut self) -> Result<u64, StoreError> {
        if self.state.last_rule_id >= MAX_RULE_ID {
            return Err(StoreError::Rejected("the PCE has handed out its maximum of rule ids".to_string()));
        }
        self.state.last_rule_id += 1;
        Ok(self.state.last_rule_id)
    }

    fn draft_object(&self, object: ObjectRef) -> Result<(), StoreError> {
        if self.state.draft.contains(object) { Ok(()) } else { Err(StoreError::NoObject) }
    }

    fn draft_rule_set(&self, id: u64) -> Result<&RuleSet, StoreError> {
        self.state.draft.rule_sets.get(&id).ok_or(StoreError::NoObject)
    }

    fn check_room(&self, kind: Kind) -> Result<(), StoreError> {
        let draft = &self.state.draft;
        let count = match kind {
            Kind::IpLists => draft.ip_lists.len(),
            Kind::Services => draft.services.len(),
            Kind::RuleSets => draft.rule_sets.len(),
        };
        if count >= MAX_OBJECTS_PER_KIND {
            return Err(StoreError::Rejected(format!(
                "the PCE holds its maximum of {MAX_OBJECTS_PER_KIND} {}",
                kind.as_str()
            )));
        }
        Ok(())
    }

    /// Names are unique per kind in the draft (illumio-py's `get_by_name` relies on it).
    fn check_unique_name(&self, kind: Kind, name: &str, except: Option<u64>) -> Result<(), StoreError> {
        let draft = &self.state.draft;
        let clash = match kind {
            Kind::IpLists => draft.ip_lists.values().any(|o| o.name == name && Some(o.id) != except),
            Kind::Services => draft.services.values().any(|o| o.name == name && Some(o.id) != except),
            Kind::RuleSets => draft.rule_sets.values().any(|o| o.name == name && Some(o.id) != except),
        };
        if clash {
            return Err(StoreError::Rejected(format!("name: a {} named {name:?} exists", kind.as_str())));
        }
        Ok(())
    }

    /// Every label, workload, IP list and service the rule set names exists (in the draft), and no
    /// rule repeats another (same actors, services and scoping).
    fn check_rule_set(&self, set: &RuleSet) -> Result<(), StoreError> {
        let same = |a: &SecRule, b: &SecRule| {
            a.providers == b.providers
                && a.consumers == b.consumers
                && a.services == b.services
                && a.unscoped_consumers == b.unscoped_consumers
        };
        for (index, rule) in set.rules.iter().enumerate() {
            if let Some(earlier) = set.rules[..index].iter().position(|other| same(other, rule)) {
                return Err(StoreError::Rejected(format!(
                    "rules[{index}]: the same rule as rules[{earlier}] (id {})",
                    set.rules[earlier].id
                )));
            }
        }
        for (index, scope) in set.scopes.iter().enumerate() {
            self.check_labels(scope).map_err(|e| StoreError::Rejected(format!("scopes[{index}]: {e}")))?;
        }
        for (index, rule) in set.rules.iter().enumerate() {
            for (side, actors) in [("providers", &rule.providers), ("consumers", &rule.consumers)] {
                if actors.is_empty() {
                    return Err(StoreError::Rejected(format!(
                        "rules[{index}].{side}: name at least one actor"
                    )));
                }
                for actor in actors {
                    let missing = match actor {
                        Actor::AllWorkloads => None,
                        Actor::Label(id) => {
                            self.label(*id).is_none().then(|| format!("no label with id {id}"))
                        }
                        Actor::Workload(id) => (!self.state.workloads.contains_key(id))
                            .then(|| format!("no workload with id {id}")),
                        Actor::IpList(id) => (!self.state.draft.ip_lists.contains_key(id))
                            .then(|| format!("no IP list with id {id}")),
                    };
                    if let Some(missing) = missing {
                        return Err(StoreError::Rejected(format!("rules[{index}].{side}: {missing}")));
                    }
                }
            }
            if rule.services.is_empty() {
                return Err(StoreError::Rejected(format!(
                    "rules[{index}].ingress_services: name at least one"
                )));
            }
            for service in &rule.services {
                if let ServiceRef::Service(id) = service {
                    if !self.state.draft.services.contains_key(id) {
                        return Err(StoreError::Rejected(format!(
                            "rules[{index}].ingress_services: no service with id {id}"
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Brings a state read from disk into the current model: the flat rules of older states become
/// a global rule set named "Default" (draft and active, rule ids kept, so the VENs' rule ids do
/// not move), and the default IP list and service exist. Returns whether anything changed.
pub(super) fn upgrade(state: &mut State) -> bool {
    let mut changed = false;
    if !state.draft_rules.is_empty() || !state.active_rules.is_empty() {
        state.last_rule_set_id += 1;
        let id = state.last_rule_set_id;
        let as_set = |rules: &[LegacyRule]| RuleSet {
            id,
            name: DEFAULT_RULE_SET.to_string(),
            description: "rules from before rule sets".to_string(),
            enabled: true,
            scopes: vec![Vec::new()],
            rules: rules.iter().map(legacy_rule).collect(),
        };
        state.draft.rule_sets.insert(id, as_set(&state.draft_rules));
        if !state.active_rules.is_empty() {
            state.active.rule_sets.insert(id, as_set(&state.active_rules));
        }
        state.draft_rules.clear();
        state.active_rules.clear();
        changed = true;
    }
    let has = |objects: &PolicyObjects, name: &str, kind: Kind| match kind {
        Kind::IpLists => objects.ip_lists.values().any(|o| o.name == name),
        Kind::Services => objects.services.values().any(|o| o.name == name),
        Kind::RuleSets => false,
    };
    if !has(&state.draft, model::ANY_IP_LIST_NAME, Kind::IpLists) {
        state.last_ip_list_id += 1;
        state.last_service_id += 1;
        let (ip_list, service) = model::defaults(state.last_ip_list_id, state.last_service_id);
        let any_service = !has(&state.draft, model::ALL_SERVICES_NAME, Kind::Services);
        for objects in [&mut state.draft, &mut state.active] {
            objects.ip_lists.insert(ip_list.id, ip_list.clone());
            if any_service {
                objects.services.insert(service.id, service.clone());
            }
        }
        changed = true;
    }
    changed
}

/// The rule set the `pce rule add` command and migrated flat rules use.
pub const DEFAULT_RULE_SET: &str = "Default";

fn legacy_rule(rule: &LegacyRule) -> SecRule {
    SecRule {
        id: rule.id,
        enabled: true,
        description: String::new(),
        providers: rule.providers.iter().map(|id| Actor::Label(*id)).collect(),
        consumers: rule.consumers.iter().map(|id| Actor::Label(*id)).collect(),
        services: rule
            .services
            .iter()
            .map(|s| {
                ServiceRef::Port(ServicePort { protocol: s.protocol, ports: Some(PortRange { ..s.ports }) })
            })
            .collect(),
        unscoped_consumers: false,
    }
}
