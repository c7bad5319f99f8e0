//! Policy computation: from labels, workloads and the active rules to each workload's
//! [`ven_proto::Policy`]. Pure functions, no I/O.
//!
//! A workload matches an actor list (a rule's consumers or providers, as label ids) when, for every
//! label key present in the list, it carries one of that key's listed labels: keys AND, values OR.
//! For a workload W and every rule:
//! - W matches the providers: one inbound rule per service, peers = the consumers' addresses;
//! - W matches the consumers: one outbound rule per service, peers = the providers' addresses.
//!
//! Peers never include W itself nor workloads that are not peers any more (offline: the spec's
//! peer isolation; a suspended workload stays a peer). An empty peer set is still emitted; it
//! matches nothing. W's own custom iptables rules are carried as they are, by increasing id.
//!
//! Ids are derived from the PCE rule id, so they stay put when unrelated rules come and go and can
//! be traced back from a log prefix: rule `R*1000 + n` is service n of PCE rule R inbound,
//! `R*1000 + 500 + n` outbound; set `2R` holds the inbound peers of rule R, `2R + 1` the outbound.

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

/// A rule as the administrator wrote it: actor lists are label ids.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleDef {
    pub id: u64,
    pub consumers: Vec<u64>,
    pub providers: Vec<u64>,
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

/// Whether a workload with `labels` matches the actor list `actors` (label ids). `keys` maps label
/// ids to their key; an actor label missing from it matches nothing. An empty list matches every
/// workload (the admin API refuses to store one).
pub fn matches(labels: &[u64], actors: &[u64], keys: &HashMap<u64, &str>) -> bool {
    actors.iter().all(|actor| {
        let Some(key) = keys.get(actor) else { return false };
        actors.iter().any(|other| keys.get(other) == Some(key) && labels.contains(other))
    })
}

/// Computes every member's policy, in the order of `members`, each with version 0 (the store
/// assigns versions).
pub fn compute_all(members: &[Member], rules: &[RuleDef], keys: &HashMap<u64, &str>) -> Vec<Policy> {
    let mut rules: Vec<&RuleDef> = rules.iter().collect();
    rules.sort_by_key(|rule| rule.id);
    let matched: Vec<(Vec<bool>, Vec<bool>)> = rules
        .iter()
        .map(|rule| {
            let side = |actors: &[u64]| members.iter().map(|m| matches(m.labels, actors, keys)).collect();
            (side(&rule.consumers), side(&rule.providers))
        })
        .collect();
    (0..members.len()).map(|target| policy_for(target, members, &rules, &matched)).collect()
}

fn policy_for(
    target: usize,
    members: &[Member],
    rules: &[&RuleDef],
    matched: &[(Vec<bool>, Vec<bool>)],
) -> Policy {
    let mut policy = Policy {
        version: 0,
        state: members[target].state,
        ip_sets: Vec::new(),
        rules: Vec::new(),
        custom_rules: members[target].custom_rules.to_vec(),
    };
    policy.custom_rules.sort_by_key(|rule| rule.id);
    for (rule, (consumers, providers)) in rules.iter().zip(matched) {
        if rule.id > MAX_RULE_ID {
            continue;
        }
        if providers[target] {
            emit(&mut policy, rule, Direction::Inbound, peers(target, members, consumers));
        }
        if consumers[target] {
            emit(&mut policy, rule, Direction::Outbound, peers(target, members, providers));
        }
    }
    policy
}

/// Addresses of the matched members other than `target`, sorted and deduplicated.
fn peers(target: usize, members: &[Member], matched: &[bool]) -> Vec<IpNet> {
    let mut addresses: Vec<IpNet> = members
        .iter()
        .zip(matched)
        .enumerate()
        .filter(|(index, (member, is_match))| **is_match && *index != target && member.is_peer)
        .flat_map(|(_, (member, _))| member.addresses.iter().copied())
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

fn emit(policy: &mut Policy, rule: &RuleDef, direction: Direction, members: Vec<IpNet>) {
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
            custom_rules: &[],
        }
    }

    fn rule(id: u64, consumers: &[u64], providers: &[u64], ports: &[(u16, u16, Protocol)]) -> RuleDef {
        RuleDef {
            id,
            consumers: consumers.to_vec(),
            providers: providers.to_vec(),
            services: ports
                .iter()
                .map(|&(first, last, protocol)| Service { ports: PortRange { first, last }, protocol })
                .collect(),
        }
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
        let policies = compute_all(&members, &rules, &keys());

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
        let policies = compute_all(&members, &rules, &keys());
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
        let first = compute_all(&members, &[rule(5, &[ROLE_WEB], &[ROLE_DB], &services)], &keys());
        let extra = rule(3, &[ROLE_DB], &[ROLE_WEB], &[(22, 22, Protocol::Tcp)]);
        let second = compute_all(&members, &[rule(5, &[ROLE_WEB], &[ROLE_DB], &services), extra], &keys());
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
        let policies = compute_all(&[web, db], &[], &keys());
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
        assert_eq!(compute_all(&[idle], &[], &keys())[0].state, PolicyState::Idle);
    }
}
