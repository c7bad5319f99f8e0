//! Policy computation: from labels, workloads and the compiled active rules to each workload's
//! [`ven_proto::Policy`]. Pure functions, no I/O.
//!
//! A workload matches a label list (a rule side's labels, or a rule set's scope) when, for every
//! label key present in the list, it carries one of that key's listed labels: keys AND, values OR.
//! A rule side also names every workload (`ams`), single workloads, and addresses (IP lists).
//! A rule applies within each scope of its rule set: for a workload W and every rule, scope by
//! scope:
//! - W is in the scope and matches the providers: one inbound rule per service, peers = the
//!   consumers in the same scope (in any scope with `unscoped_consumers`) and the consumers' IP
//!   lists;
//! - W is in the scope and matches the consumers (or matches them anywhere, with
//!   `unscoped_consumers`): one outbound rule per service, peers = the providers in the scope and
//!   the providers' IP lists.
//!
//! Peers never include W's own addresses nor workloads that are not peers any more (offline: the
//! spec's peer isolation; a suspended workload stays a peer). An empty peer set is still emitted; it
//! matches nothing. W's own custom iptables rules are carried as they are, by increasing id.
//!
//! Ids are derived from the PCE rule id, so they stay put when unrelated rules come and go and can
//! be traced back from a log prefix: rule `R*1000 + n` is service n of PCE rule R inbound,
//! `R*1000 + 500 + n` outbound; set `2R` holds the inbound peers of rule R, `2R + 1` the outbound.
//!
//! Cost: each rule side is matched against every workload once per scope, and the peer list of
//! each (rule, scope, side) is built once; a workload's policy then only copies the lists it
//! uses. So a change costs O(rules x scopes x workloads) plus the size of the policies; a change
//! of a few workloads' presence or addresses ([`compute_changed`]) only the (rule, scope) pairs
//! they are on and the policies of the workloads sharing them.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use ven_proto::{
    CustomRule, Direction, Interface, IpNet, IpSet, Peers, Policy, PolicyState, PortRange, Protocol, Rule,
    RuleFamily,
};

/// The admin API's and CLI's name of a custom rule's address family.
pub fn family_name(family: RuleFamily) -> &'static str {
    match family {
        RuleFamily::V4 => "v4",
        RuleFamily::V6 => "v6",
        RuleFamily::Both => "both",
    }
}

/// Parses [`family_name`]'s names.
pub fn parse_family(text: &str) -> Result<RuleFamily, String> {
    [RuleFamily::V4, RuleFamily::V6, RuleFamily::Both]
        .into_iter()
        .find(|family| family_name(*family) == text)
        .ok_or_else(|| format!("unknown address family {text:?} (expected v4, v6 or both)"))
}

/// Largest PCE rule id whose derived policy ids fit in `u32`.
pub const MAX_RULE_ID: u64 = 4_000_000;
/// Services per rule; the derived rule ids leave room for 500 per direction.
pub const MAX_SERVICES_PER_RULE: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Label {
    pub id: u64,
    pub key: String,
    pub value: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub ports: PortRange,
    pub protocol: Protocol,
}

/// What one side of a rule names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ActorSet {
    pub all_workloads: bool,
    /// Label ids (keys AND, values OR); empty: no workload by label.
    pub labels: Vec<u64>,
    pub workloads: Vec<u64>,
    /// Addresses from IP lists (not narrowed by scopes).
    pub nets: Vec<IpNet>,
}

impl ActorSet {
    fn names(&self, member: &Member, keys: &HashMap<u64, &str>) -> bool {
        self.all_workloads
            || self.workloads.contains(&member.id)
            || (!self.labels.is_empty() && matches(member.labels, &self.labels, keys))
    }
}

/// An active rule in the computation's terms (see `model::compile`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledRule {
    pub id: u64,
    /// Its rule set's scopes: label lists; an empty list is every workload.
    pub scopes: Vec<Vec<u64>>,
    pub unscoped_consumers: bool,
    pub providers: ActorSet,
    pub consumers: ActorSet,
    pub services: Vec<Service>,
}

/// What the computation needs to know about one workload.
#[derive(Clone, Debug)]
pub struct Member<'a> {
    pub id: u64,
    pub labels: &'a [u64],
    pub state: PolicyState,
    /// Host addresses as given by [`host_addresses`].
    pub addresses: Vec<IpNet>,
    /// Whether other workloads' policies include this one (false once it is offline).
    pub is_peer: bool,
    /// Whether it runs a VEN and so gets a policy (unmanaged workloads are only peers).
    pub managed: bool,
    /// The workload's own custom iptables rules.
    pub custom_rules: &'a [CustomRule],
}

/// The host addresses (/32, /128) of a workload's interfaces, without `lo` and loopback addresses,
/// sorted and deduplicated.
pub fn host_addresses(interfaces: &[Interface]) -> Vec<IpNet> {
    let mut addresses: Vec<IpNet> = interfaces
        .iter()
        .filter(|interface| interface.name != "lo")
        .flat_map(|interface| interface.addresses.iter())
        .map(IpNet::addr)
        .filter(|addr| !addr.is_loopback() && !addr.is_unspecified())
        .map(IpNet::host)
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

/// Whether a workload with `labels` matches the label list `actors`. `keys` maps label ids to
/// their key; a label missing from it matches nothing. An empty list matches every workload.
pub fn matches(labels: &[u64], actors: &[u64], keys: &HashMap<u64, &str>) -> bool {
    actors.iter().all(|actor| {
        let Some(key) = keys.get(actor) else { return false };
        actors.iter().any(|other| keys.get(other) == Some(key) && labels.contains(other))
    })
}

/// One rule within one scope: which members are its providers and consumers there, and the
/// peer addresses each side offers the other.
struct ScopedRule {
    providers: Vec<bool>,
    consumers: Vec<bool>,
    /// Addresses of the providers that are peers, and of the consumers, with the side's nets.
    provider_peers: Vec<IpNet>,
    consumer_peers: Vec<IpNet>,
}

/// Computes the policy of every managed member (`None` for the others), in the order of
/// `members`, each with version 0 (the store assigns versions).
pub fn compute_all(
    members: &[Member],
    rules: &[CompiledRule],
    keys: &HashMap<u64, &str>,
) -> Vec<Option<Policy>> {
    let rules = usable(rules);
    let global = [Vec::new()];
    let scoped: Vec<Vec<Option<ScopedRule>>> = rules
        .iter()
        .map(|rule| {
            scopes_of(rule, &global)
                .iter()
                .map(|scope| Some(scope_rule(rule, scope, members, keys)))
                .collect()
        })
        .collect();
    members
        .iter()
        .enumerate()
        .map(|(target, member)| member.managed.then(|| policy_for(target, members, &rules, &scoped)))
        .collect()
}

/// The policies that can differ after the members at `changed` (indices into `members`) came,
/// went offline or online, or changed addresses, their labels staying what the last computation
/// saw (label changes and removals need [`compute_all`]). Those are the changed members' own and
/// those of every member on a side of a (rule, scope) where a changed member is on a side.
/// Returns (index, policy) of each such managed member, by increasing index; each policy is what
/// [`compute_all`] gives it. Cost: O(rules x scopes x changed) to find the (rule, scope) pairs
/// involved, O(workloads) for each of those, plus the policies returned.
pub fn compute_changed(
    members: &[Member],
    rules: &[CompiledRule],
    keys: &HashMap<u64, &str>,
    changed: &[usize],
) -> Vec<(usize, Policy)> {
    let rules = usable(rules);
    let global = [Vec::new()];
    // The members whose policies can move: the changed ones and everyone sharing a (rule, scope)
    // with one of them.
    let mut targets = vec![false; members.len()];
    for &index in changed {
        if let Some(slot) = targets.get_mut(index) {
            *slot = true;
        }
    }
    let mut involved: Vec<Vec<Option<ScopedRule>>> = rules
        .iter()
        .map(|rule| {
            scopes_of(rule, &global)
                .iter()
                .map(|scope| {
                    let touches = changed
                        .iter()
                        .filter_map(|&i| members.get(i))
                        .any(|member| on_a_side(rule, scope, member, keys));
                    touches.then(|| scope_rule(rule, scope, members, keys))
                })
                .collect()
        })
        .collect();
    for scoped in involved.iter().flatten().flatten() {
        for (slot, (provider, consumer)) in
            targets.iter_mut().zip(scoped.providers.iter().zip(&scoped.consumers))
        {
            *slot |= *provider || *consumer;
        }
    }
    let targets: Vec<usize> = targets
        .iter()
        .enumerate()
        .filter(|(i, is_target)| **is_target && members[*i].managed)
        .map(|(i, _)| i)
        .collect();
    // Every (rule, scope) a target is on a side of, so that its policy is whole.
    for (rule, scopes) in rules.iter().zip(involved.iter_mut()) {
        for (scope, scoped) in scopes_of(rule, &global).iter().zip(scopes.iter_mut()) {
            if scoped.is_none() && targets.iter().any(|&t| on_a_side(rule, scope, &members[t], keys)) {
                *scoped = Some(scope_rule(rule, scope, members, keys));
            }
        }
    }
    targets.into_iter().map(|target| (target, policy_for(target, members, &rules, &involved))).collect()
}

/// The rules whose derived ids fit, by id.
fn usable(rules: &[CompiledRule]) -> Vec<&CompiledRule> {
    let mut rules: Vec<&CompiledRule> = rules.iter().filter(|rule| rule.id <= MAX_RULE_ID).collect();
    rules.sort_by_key(|rule| rule.id);
    rules
}

/// A rule's scopes; a rule set without scopes is one scope holding every workload.
fn scopes_of<'a>(rule: &'a CompiledRule, global: &'a [Vec<u64>]) -> &'a [Vec<u64>] {
    if rule.scopes.is_empty() { global } else { &rule.scopes[..] }
}

/// Whether `member` is a provider or a consumer of `rule` within `scope` (as [`scope_rule`]).
fn on_a_side(rule: &CompiledRule, scope: &[u64], member: &Member, keys: &HashMap<u64, &str>) -> bool {
    let inside = matches(member.labels, scope, keys);
    (inside && rule.providers.names(member, keys))
        || ((inside || rule.unscoped_consumers) && rule.consumers.names(member, keys))
}

fn scope_rule(
    rule: &CompiledRule,
    scope: &[u64],
    members: &[Member],
    keys: &HashMap<u64, &str>,
) -> ScopedRule {
    let in_scope: Vec<bool> = members.iter().map(|m| matches(m.labels, scope, keys)).collect();
    let providers: Vec<bool> =
        members.iter().zip(&in_scope).map(|(m, inside)| *inside && rule.providers.names(m, keys)).collect();
    let consumers: Vec<bool> = members
        .iter()
        .zip(&in_scope)
        .map(|(m, inside)| (*inside || rule.unscoped_consumers) && rule.consumers.names(m, keys))
        .collect();
    let peers = |matched: &[bool], nets: &[IpNet]| {
        let mut addresses: Vec<IpNet> = members
            .iter()
            .zip(matched)
            .filter(|(member, is_match)| **is_match && member.is_peer)
            .flat_map(|(member, _)| member.addresses.iter().copied())
            .chain(nets.iter().copied())
            .collect();
        addresses.sort();
        addresses.dedup();
        addresses
    };
    ScopedRule {
        provider_peers: peers(&providers, &rule.providers.nets),
        consumer_peers: peers(&consumers, &rule.consumers.nets),
        providers,
        consumers,
    }
}

fn policy_for(
    target: usize,
    members: &[Member],
    rules: &[&CompiledRule],
    scoped: &[Vec<Option<ScopedRule>>],
) -> Policy {
    let me = &members[target];
    let mut policy = Policy {
        version: 0,
        state: me.state,
        ip_sets: Vec::new(),
        rules: Vec::new(),
        custom_rules: me.custom_rules.to_vec(),
    };
    policy.custom_rules.sort_by_key(|rule| rule.id);
    for (rule, scopes) in rules.iter().zip(scoped) {
        let as_provider: Vec<&ScopedRule> = scopes.iter().flatten().filter(|s| s.providers[target]).collect();
        if !as_provider.is_empty() {
            let peers = union_without(as_provider.iter().map(|s| &s.consumer_peers), &me.addresses);
            emit(&mut policy, rule, Direction::Inbound, peers);
        }
        let as_consumer: Vec<&ScopedRule> = scopes.iter().flatten().filter(|s| s.consumers[target]).collect();
        if !as_consumer.is_empty() {
            let peers = union_without(as_consumer.iter().map(|s| &s.provider_peers), &me.addresses);
            emit(&mut policy, rule, Direction::Outbound, peers);
        }
    }
    policy
}

/// The sorted union of `lists` without the addresses in `own`.
fn union_without<'a>(lists: impl Iterator<Item = &'a Vec<IpNet>>, own: &[IpNet]) -> Vec<IpNet> {
    let mut lists: Vec<&Vec<IpNet>> = lists.collect();
    let mut addresses: Vec<IpNet> = if lists.len() == 1 {
        lists
            .pop()
            .map(|list| list.iter().filter(|a| !own.contains(a)).copied().collect())
            .unwrap_or_default()
    } else {
        let mut all: Vec<IpNet> = lists.into_iter().flatten().filter(|a| !own.contains(a)).copied().collect();
        all.sort();
        all.dedup();
        all
    };
    addresses.shrink_to_fit();
    addresses
}

fn emit(policy: &mut Policy, rule: &CompiledRule, direction: Direction, members: Vec<IpNet>) {
    // Both fit in u32: rule.id <= MAX_RULE_ID was checked by the caller.
    let offset = match direction {
        Direction::Inbound => 0,
        Direction::Outbound => 1,
    };
    let set_id = (rule.id * 2 + offset) as u32;
    policy.ip_sets.push(IpSet { id: set_id, members });
    for (index, service) in rule.services.iter().take(MAX_SERVICES_PER_RULE).enumerate() {
        let ports = match service.protocol {
            Protocol::Tcp | Protocol::Udp => Some(service.ports),
            Protocol::Icmp | Protocol::Any => None,
        };
        policy.rules.push(Rule {
            id: (rule.id * 1000 + offset * 500 + index as u64) as u32,
            direction,
            peers: Peers::Set(set_id),
            protocol: service.protocol,
            ports,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLE_WEB: u64 = 1;
    const ROLE_DB: u64 = 2;
    const ENV_PROD: u64 = 3;
    const ENV_DEV: u64 = 4;

    fn keys() -> HashMap<u64, &'static str> {
        HashMap::from([(ROLE_WEB, "role"), (ROLE_DB, "role"), (ENV_PROD, "env"), (ENV_DEV, "env")])
    }

    fn member<'a>(id: u64, labels: &'a [u64], addresses: &[&str]) -> Member<'a> {
        Member {
            id,
            labels,
            state: PolicyState::Enforced,
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            is_peer: true,
            managed: true,
            custom_rules: &[],
        }
    }

    fn labels(ids: &[u64]) -> ActorSet {
        ActorSet { labels: ids.to_vec(), ..ActorSet::default() }
    }

    fn rule(id: u64, consumers: &[u64], providers: &[u64], ports: &[(u16, u16, Protocol)]) -> CompiledRule {
        CompiledRule {
            id,
            scopes: Vec::new(),
            unscoped_consumers: false,
            consumers: labels(consumers),
            providers: labels(providers),
            services: ports
                .iter()
                .map(|&(first, last, protocol)| Service { ports: PortRange { first, last }, protocol })
                .collect(),
        }
    }

    /// Every member's policy (all are managed in these tests).
    fn all(members: &[Member], rules: &[CompiledRule]) -> Vec<Policy> {
        compute_all(members, rules, &keys()).into_iter().map(|p| p.expect("managed")).collect()
    }

    fn set(addresses: &[&str]) -> Vec<IpNet> {
        addresses.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn web_to_db_gives_inbound_on_db_and_outbound_on_web() {
        let members = [
            member(1, &[ROLE_WEB], &["198.18.0.2"]),
            member(2, &[ROLE_DB], &["198.18.0.3", "2001:db8::3"]),
            member(3, &[], &["198.18.0.4"]),
        ];
        let rules = [rule(7, &[ROLE_WEB], &[ROLE_DB], &[(5432, 5432, Protocol::Tcp)])];
        let policies: Vec<Policy> = compute_all(&members, &rules, &keys()).into_iter().flatten().collect();

        let web = &policies[0];
        assert_eq!(web.ip_sets, vec![IpSet { id: 15, members: set(&["198.18.0.3", "2001:db8::3"]) }]);
        assert_eq!(
            web.rules,
            vec![Rule {
                id: 7500,
                direction: Direction::Outbound,
                peers: Peers::Set(15),
                protocol: Protocol::Tcp,
                ports: Some(PortRange { first: 5432, last: 5432 }),
            }]
        );
        let db = &policies[1];
        assert_eq!(db.ip_sets, vec![IpSet { id: 14, members: set(&["198.18.0.2"]) }]);
        assert_eq!(db.rules.len(), 1);
        assert_eq!((db.rules[0].id, db.rules[0].direction), (7000, Direction::Inbound));
        assert!(policies[2].rules.is_empty() && policies[2].ip_sets.is_empty());
        assert!(policies.iter().all(|p| p.version == 0 && p.state == PolicyState::Enforced));
    }

    #[test]
    fn keys_are_anded_and_values_ored() {
        let keys = keys();
        let actors = [ROLE_WEB, ROLE_DB, ENV_PROD];
        assert!(matches(&[ROLE_WEB, ENV_PROD], &actors, &keys));
        assert!(matches(&[ROLE_DB, ENV_PROD], &actors, &keys));
        assert!(!matches(&[ROLE_WEB], &actors, &keys));
        assert!(!matches(&[ROLE_WEB, ENV_DEV], &actors, &keys));
        assert!(!matches(&[], &actors, &keys));
        assert!(!matches(&[99], &[99], &keys), "an unknown label matches nothing");
        assert!(matches(&[], &[], &keys), "an empty list matches everyone");
    }

    #[test]
    fn loopback_and_lo_are_ignored_and_addresses_become_hosts() {
        let interfaces = vec![
            Interface { name: "lo".into(), addresses: set(&["127.0.0.1/8", "::1/128"]) },
            Interface {
                name: "eth0".into(),
                addresses: set(&["198.18.0.2/24", "127.0.0.2/8", "2001:db8::2/64", "198.18.0.2/16"]),
            },
        ];
        assert_eq!(host_addresses(&interfaces), set(&["198.18.0.2/32", "2001:db8::2/128"]));
    }

    #[test]
    fn empty_peer_sets_are_emitted_and_self_and_offline_peers_left_out() {
        let mut offline = member(3, &[ROLE_WEB], &["198.18.0.4"]);
        offline.is_peer = false;
        let members =
            [member(1, &[ROLE_WEB], &["198.18.0.2"]), member(2, &[ROLE_DB], &["198.18.0.3"]), offline];
        let rules = [
            rule(1, &[ROLE_WEB], &[ROLE_WEB], &[(80, 80, Protocol::Tcp)]),
            rule(2, &[ROLE_DB], &[ENV_PROD], &[(53, 53, Protocol::Udp)]),
        ];
        let policies: Vec<Policy> = compute_all(&members, &rules, &keys()).into_iter().flatten().collect();
        // web 1 is provider and consumer of rule 1; it sees neither itself nor offline web 3.
        assert_eq!(
            policies[0].ip_sets,
            vec![IpSet { id: 2, members: vec![] }, IpSet { id: 3, members: vec![] }]
        );
        // db consumes rule 2 whose providers (env=prod) match nobody: an empty set still.
        assert_eq!(policies[1].ip_sets, vec![IpSet { id: 5, members: vec![] }]);
        assert_eq!(policies[1].rules[0].protocol, Protocol::Udp);
        // The offline workload still gets its own policy.
        assert_eq!(policies[2].ip_sets[0].members, set(&["198.18.0.2"]));
    }

    #[test]
    fn ids_are_unique_and_independent_of_other_rules() {
        let members = [member(1, &[ROLE_WEB], &["198.18.0.2"]), member(2, &[ROLE_DB], &["198.18.0.3"])];
        let services = [(80, 80, Protocol::Tcp), (1000, 2000, Protocol::Udp), (0, 0, Protocol::Icmp)];
        let first = all(&members, &[rule(5, &[ROLE_WEB], &[ROLE_DB], &services)]);
        let extra = rule(3, &[ROLE_DB], &[ROLE_WEB], &[(22, 22, Protocol::Tcp)]);
        let second = all(&members, &[rule(5, &[ROLE_WEB], &[ROLE_DB], &services), extra]);
        for (before, after) in first.iter().zip(&second) {
            for rule in &before.rules {
                assert!(after.rules.contains(rule), "rule {} moved", rule.id);
            }
            let mut ids: Vec<u32> = after.rules.iter().map(|r| r.id).collect();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), after.rules.len());
        }
        let icmp = first[1].rules.iter().find(|r| r.protocol == Protocol::Icmp).unwrap();
        assert_eq!((icmp.id, icmp.ports), (5002, None));
    }

    #[test]
    fn custom_rules_are_the_workloads_own_in_id_order() {
        use ven_proto::CustomChain;
        let custom = |id, rule: &str| CustomRule {
            id,
            family: RuleFamily::V4,
            chain: CustomChain::Input,
            rule: rule.to_string(),
        };
        let rules = [custom(5, "-p udp --dport 53 -j ACCEPT"), custom(2, "-p tcp --dport 9000 -j DROP")];
        let mut web = member(1, &[ROLE_WEB], &["198.18.0.2"]);
        web.custom_rules = &rules;
        let db = member(2, &[ROLE_DB], &["198.18.0.3"]);
        let policies = all(&[web, db], &[]);
        assert_eq!(policies[0].custom_rules.iter().map(|r| r.id).collect::<Vec<_>>(), vec![2, 5]);
        assert!(policies[1].custom_rules.is_empty());
    }

    #[test]
    fn families_parse_their_names_only() {
        for family in [RuleFamily::V4, RuleFamily::V6, RuleFamily::Both] {
            assert_eq!(parse_family(family_name(family)), Ok(family));
        }
        assert!(parse_family("ipv4").unwrap_err().contains("v4, v6 or both"));
    }

    #[test]
    fn the_policy_state_is_the_workloads() {
        let mut idle = member(1, &[], &[]);
        idle.state = PolicyState::Idle;
        assert_eq!(all(&[idle], &[])[0].state, PolicyState::Idle);
    }

    #[test]
    fn scopes_narrow_both_sides_and_unscoped_consumers_only_the_providers() {
        // Two apps, each a web and a db; the rule set's scopes are app=a and app=b.
        const APP_A: u64 = 10;
        const APP_B: u64 = 11;
        let keys = HashMap::from([(ROLE_WEB, "role"), (ROLE_DB, "role"), (APP_A, "app"), (APP_B, "app")]);
        let (a_web, a_db, b_web, b_db) =
            ([ROLE_WEB, APP_A], [ROLE_DB, APP_A], [ROLE_WEB, APP_B], [ROLE_DB, APP_B]);
        let members = [
            member(1, &a_web, &["198.18.0.1"]),
            member(2, &a_db, &["198.18.0.2"]),
            member(3, &b_web, &["198.18.0.3"]),
            member(4, &b_db, &["198.18.0.4"]),
        ];
        let mut scoped = rule(9, &[ROLE_WEB], &[ROLE_DB], &[(5432, 5432, Protocol::Tcp)]);
        scoped.scopes = vec![vec![APP_A], vec![APP_B]];
        let policies: Vec<Policy> =
            compute_all(&members, &[scoped.clone()], &keys).into_iter().flatten().collect();
        // Each db admits only its own app's web.
        assert_eq!(policies[1].ip_sets, vec![IpSet { id: 18, members: set(&["198.18.0.1"]) }]);
        assert_eq!(policies[3].ip_sets, vec![IpSet { id: 18, members: set(&["198.18.0.3"]) }]);
        assert_eq!(policies[0].ip_sets, vec![IpSet { id: 19, members: set(&["198.18.0.2"]) }]);

        // Unscoped consumers: every web reaches the dbs of both scopes.
        scoped.unscoped_consumers = true;
        let policies: Vec<Policy> = compute_all(&members, &[scoped], &keys).into_iter().flatten().collect();
        assert_eq!(policies[1].ip_sets, vec![IpSet { id: 18, members: set(&["198.18.0.1", "198.18.0.3"]) }]);
        assert_eq!(policies[0].ip_sets, vec![IpSet { id: 19, members: set(&["198.18.0.2", "198.18.0.4"]) }]);
    }

    #[test]
    fn ip_lists_all_workloads_and_unmanaged_members() {
        let mut unmanaged = member(3, &[ROLE_WEB], &["198.18.0.9"]);
        unmanaged.managed = false;
        let members = [member(1, &[ROLE_DB], &["198.18.0.1"]), member(2, &[], &["198.18.0.2"]), unmanaged];
        let from_list = ActorSet { nets: set(&["198.18.7.0/24"]), ..ActorSet::default() };
        let mut inbound = rule(4, &[ROLE_WEB], &[ROLE_DB], &[(22, 22, Protocol::Tcp)]);
        inbound.consumers.nets = from_list.nets.clone();
        let everyone = CompiledRule {
            providers: ActorSet { all_workloads: true, ..ActorSet::default() },
            consumers: from_list,
            ..rule(6, &[], &[], &[(53, 53, Protocol::Udp)])
        };
        let policies = compute_all(&members, &[inbound, everyone], &keys());
        assert!(policies[2].is_none(), "an unmanaged workload gets no policy");
        let db = policies[0].as_ref().unwrap();
        // The unmanaged web is a peer; the IP list's network comes along.
        assert_eq!(db.ip_sets[0], IpSet { id: 8, members: set(&["198.18.0.9", "198.18.7.0/24"]) });
        // ams: both managed workloads admit the IP list on 53/udp.
        for policy in policies.iter().flatten() {
            assert!(policy.ip_sets.contains(&IpSet { id: 12, members: set(&["198.18.7.0/24"]) }));
        }
    }

    /// `compute_changed` gives exactly `compute_all`'s policies for the members it returns, and
    /// every member it leaves out has the policy it had before the change.
    #[test]
    fn changed_members_recompute_what_compute_all_would_change() {
        const APP_A: u64 = 10;
        const APP_B: u64 = 11;
        let mut keys = keys();
        keys.insert(APP_A, "app");
        keys.insert(APP_B, "app");
        let labels: Vec<Vec<u64>> = (0..24u64)
            .map(|i| {
                let role = if i % 2 == 0 { ROLE_WEB } else { ROLE_DB };
                let app = if i % 3 == 0 { APP_A } else { APP_B };
                if i % 7 == 6 { vec![role] } else { vec![role, app] }
            })
            .collect();
        let addresses: Vec<String> = (0..24).map(|i| format!("198.18.1.{}", i + 1)).collect();
        let mut scoped = rule(3, &[ROLE_WEB], &[ROLE_DB], &[(5432, 5432, Protocol::Tcp)]);
        scoped.scopes = vec![vec![APP_A], vec![APP_B]];
        let mut unscoped = rule(4, &[ROLE_DB], &[ROLE_WEB], &[(80, 80, Protocol::Tcp)]);
        unscoped.scopes = vec![vec![APP_A]];
        unscoped.unscoped_consumers = true;
        let mut one = rule(5, &[], &[], &[(22, 22, Protocol::Tcp)]);
        one.consumers.workloads = vec![4];
        one.providers.all_workloads = true;
        let rules = [scoped, unscoped, one, rule(6, &[ENV_PROD], &[ENV_DEV], &[(1, 1, Protocol::Udp)])];
        let members = |present: usize, offline: Option<usize>| -> Vec<Member> {
            (0..present)
                .map(|i| {
                    let mut m = member(i as u64 + 1, &labels[i], &[addresses[i].as_str()]);
                    m.is_peer = offline != Some(i);
                    m.managed = i % 5 != 4;
                    m
                })
                .collect()
        };
        let check_with = |rules: &[CompiledRule], before: &[Member], after: &[Member], changed: usize| {
            let old = compute_all(before, rules, &keys);
            let new = compute_all(after, rules, &keys);
            let some = compute_changed(after, rules, &keys, &[changed]);
            assert!(some.iter().any(|(i, _)| *i == changed) || !after[changed].managed);
            for (index, policy) in &some {
                assert_eq!(Some(policy), new[*index].as_ref(), "member {index} after {changed} changed");
            }
            for index in (0..after.len()).filter(|i| !some.iter().any(|(j, _)| j == i)) {
                assert_eq!(old.get(index).cloned().flatten(), new[index], "member {index} left out");
            }
            some.len()
        };
        let check =
            |before: &[Member], after: &[Member], changed: usize| check_with(&rules, before, after, changed);
        // A member joins (activation), at each position of the fleet's end.
        for present in 1..24 {
            check(&members(present, None), &members(present + 1, None), present);
        }
        // With scoped rules only, a member joining app A leaves app B's policies alone.
        let recomputed = check_with(&rules[..1], &members(23, None), &members(24, None), 23);
        assert!(recomputed < 20, "{recomputed} of the 20 managed recomputed");
        // A member goes offline, and comes back.
        for gone in 0..24 {
            check(&members(24, None), &members(24, Some(gone)), gone);
            check(&members(24, Some(gone)), &members(24, None), gone);
        }
    }
}
