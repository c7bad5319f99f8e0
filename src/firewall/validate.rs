//! Checks a policy before anything reaches the kernel, so that a policy the firewall cannot
//! express is refused whole (naming the rule or set and the problem) and never half-applied.

use std::collections::HashSet;

use ven_proto::{Peers, Policy, PortRange, Protocol};

/// Most members one set of a policy may hold (the kernel sets we create have room for twice as
/// many, so a delta can add before it deletes).
pub const MAX_SET_MEMBERS: usize = 65536;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("rule id {0} is used by more than one rule")]
    DuplicateRuleId(u32),
    #[error("set id {0} is used by more than one set")]
    DuplicateSetId(u32),
    #[error("rule {rule} refers to set {set}, which the policy does not define")]
    UnknownSet { rule: u32, set: u32 },
    #[error("rule {rule}: ports {}:{} {problem}", ports.first, ports.last)]
    BadPorts { rule: u32, ports: PortRange, problem: &'static str },
    #[error("set {set} has {members} members, more than the {max} a set can hold")]
    SetTooLarge { set: u32, members: usize, max: usize },
}

/// Checks that every id is unique, every set a rule names exists, every port range is usable
/// and every set fits in a kernel set.
pub fn validate(policy: &Policy) -> Result<(), PolicyError> {
    let mut set_ids = HashSet::with_capacity(policy.ip_sets.len());
    for set in &policy.ip_sets {
        if !set_ids.insert(set.id) {
            return Err(PolicyError::DuplicateSetId(set.id));
        }
        if set.members.len() > MAX_SET_MEMBERS {
            return Err(PolicyError::SetTooLarge {
                set: set.id,
                members: set.members.len(),
                max: MAX_SET_MEMBERS,
            });
        }
    }
    let mut rule_ids = HashSet::with_capacity(policy.rules.len());
    for rule in &policy.rules {
        if !rule_ids.insert(rule.id) {
            return Err(PolicyError::DuplicateRuleId(rule.id));
        }
        if let Peers::Set(set) = rule.peers {
            if !set_ids.contains(&set) {
                return Err(PolicyError::UnknownSet { rule: rule.id, set });
            }
        }
        if let Some(ports) = rule.ports {
            let problem = match rule.protocol {
                Protocol::Icmp | Protocol::Any => {
                    Some("given for a protocol without ports (only tcp and udp have ports)")
                }
                Protocol::Tcp | Protocol::Udp if ports.first == 0 => Some("include port 0"),
                Protocol::Tcp | Protocol::Udp if ports.first > ports.last => {
                    Some("are reversed (first > last)")
                }
                Protocol::Tcp | Protocol::Udp => None,
            };
            if let Some(problem) = problem {
                return Err(PolicyError::BadPorts { rule: rule.id, ports, problem });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ven_proto::{Direction, IpSet, PolicyState, Rule};

    fn rule(id: u32, peers: Peers, protocol: Protocol, ports: Option<(u16, u16)>) -> Rule {
        Rule {
            id,
            direction: Direction::Inbound,
            peers,
            protocol,
            ports: ports.map(|(first, last)| PortRange { first, last }),
        }
    }

    fn policy(rules: Vec<Rule>) -> Policy {
        Policy {
            version: 3,
            state: PolicyState::Enforced,
            ip_sets: vec![IpSet { id: 1, members: vec!["198.18.0.2".parse().unwrap()] }],
            rules,
            custom_rules: Vec::new(),
        }
    }

    #[test]
    fn accepts_a_sound_policy() {
        let good = policy(vec![
            rule(1, Peers::Set(1), Protocol::Tcp, Some((22, 22))),
            rule(2, Peers::Any, Protocol::Udp, Some((1000, 2000))),
            rule(3, Peers::Any, Protocol::Icmp, None),
            rule(4, Peers::Set(1), Protocol::Any, None),
            rule(5, Peers::Any, Protocol::Tcp, None),
        ]);
        assert_eq!(validate(&good), Ok(()));
    }

    #[test]
    fn names_the_rule_or_set_and_the_problem() {
        let cases = [
            (
                policy(vec![
                    rule(7, Peers::Any, Protocol::Tcp, None),
                    rule(7, Peers::Any, Protocol::Udp, None),
                ]),
                PolicyError::DuplicateRuleId(7),
                "rule id 7 is used by more than one rule",
            ),
            (
                policy(vec![rule(8, Peers::Set(2), Protocol::Tcp, None)]),
                PolicyError::UnknownSet { rule: 8, set: 2 },
                "rule 8 refers to set 2, which the policy does not define",
            ),
            (
                policy(vec![rule(9, Peers::Any, Protocol::Tcp, Some((0, 80)))]),
                PolicyError::BadPorts {
                    rule: 9,
                    ports: PortRange { first: 0, last: 80 },
                    problem: "include port 0",
                },
                "rule 9: ports 0:80 include port 0",
            ),
            (
                policy(vec![rule(10, Peers::Any, Protocol::Udp, Some((90, 80)))]),
                PolicyError::BadPorts {
                    rule: 10,
                    ports: PortRange { first: 90, last: 80 },
                    problem: "are reversed (first > last)",
                },
                "rule 10: ports 90:80 are reversed (first > last)",
            ),
            (
                policy(vec![rule(11, Peers::Any, Protocol::Icmp, Some((8, 8)))]),
                PolicyError::BadPorts {
                    rule: 11,
                    ports: PortRange { first: 8, last: 8 },
                    problem: "given for a protocol without ports (only tcp and udp have ports)",
                },
                "rule 11: ports 8:8 given for a protocol without ports (only tcp and udp have ports)",
            ),
        ];
        for (policy, error, message) in cases {
            assert_eq!(validate(&policy), Err(error.clone()));
            assert_eq!(error.to_string(), message);
        }
        let mut any_ports = policy(vec![rule(12, Peers::Any, Protocol::Any, Some((1, 2)))]);
        assert!(matches!(validate(&any_ports), Err(PolicyError::BadPorts { rule: 12, .. })));
        any_ports.rules.clear();
        any_ports.ip_sets.push(IpSet { id: 1, members: Vec::new() });
        assert_eq!(validate(&any_ports), Err(PolicyError::DuplicateSetId(1)));
    }

    #[test]
    fn refuses_a_set_larger_than_a_kernel_set() {
        let mut big = policy(Vec::new());
        big.ip_sets[0].members = vec!["198.18.0.2".parse().unwrap(); MAX_SET_MEMBERS + 1];
        assert_eq!(
            validate(&big),
            Err(PolicyError::SetTooLarge { set: 1, members: MAX_SET_MEMBERS + 1, max: MAX_SET_MEMBERS })
        );
    }
}
