//! Checks a policy before anything reaches the kernel, so that a policy the firewall cannot
//! express, or larger than the board allows, is refused whole (naming the rule or set and the
//! problem) and never half-applied.
//!
//! Custom rules are the one place where policy text reaches an iptables-restore line, so they
//! are held to a strict shape: plain matches and one final `-j` to ACCEPT, DROP, REJECT (with
//! its `--reject-with`) or RETURN; no quotes, no control characters, nothing that names a chain,
//! a table or another jump. The kernel checks the matches themselves when the policy is applied,
//! and a rule it refuses fails the whole apply.

use std::collections::HashSet;

use ven_proto::{Peers, Policy, PortRange, Protocol};

use crate::config::Caps;

/// Longest custom rule accepted.
pub const MAX_CUSTOM_RULE_BYTES: usize = 512;
/// Targets a custom rule may use.
const CUSTOM_TARGETS: [&str; 4] = ["ACCEPT", "DROP", "REJECT", "RETURN"];
/// Words that would make a custom rule do more than match and decide: commands, tables, other
/// jumps or gotos, and comments (ours identify our rules; a forged one would confuse read-back).
const FORBIDDEN_WORDS: [&str; 23] = [
    "--comment",
    "-A",
    "--append",
    "-I",
    "--insert",
    "-D",
    "--delete",
    "-R",
    "--replace",
    "-F",
    "--flush",
    "-X",
    "--delete-chain",
    "-N",
    "--new-chain",
    "-P",
    "--policy",
    "-E",
    "--rename-chain",
    "-t",
    "--table",
    "-g",
    "--goto",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("rule id {0} is used by more than one rule")]
    DuplicateRuleId(u32),
    #[error("set id {0} is used by more than one set")]
    DuplicateSetId(u32),
    #[error("custom rule id {0} is used by more than one custom rule")]
    DuplicateCustomRuleId(u32),
    #[error("rule {rule} refers to set {set}, which the policy does not define")]
    UnknownSet { rule: u32, set: u32 },
    #[error("rule {rule}: ports {}:{} {problem}", ports.first, ports.last)]
    BadPorts { rule: u32, ports: PortRange, problem: &'static str },
    #[error("set {set} has {members} members, more than the {max} this board allows in a set")]
    SetTooLarge { set: u32, members: usize, max: usize },
    #[error("the policy has {count} {what}, more than the {max} this board allows")]
    TooMany { what: &'static str, count: usize, max: usize },
    #[error("custom rule {id} ({rule:?}): {problem}")]
    BadCustomRule { id: u32, rule: String, problem: String },
}

/// Checks that every id is unique, every set a rule names exists, every port range is usable,
/// every custom rule has the allowed shape and the policy fits the board's caps.
pub fn validate(policy: &Policy, caps: &Caps) -> Result<(), PolicyError> {
    let too_many = |what, count: usize, max: usize| {
        if count > max { Err(PolicyError::TooMany { what, count, max }) } else { Ok(()) }
    };
    too_many("rules", policy.rules.len(), caps.max_rules)?;
    too_many("sets", policy.ip_sets.len(), caps.max_sets)?;
    too_many("custom rules", policy.custom_rules.len(), caps.max_custom_rules)?;
    let mut set_ids = HashSet::with_capacity(policy.ip_sets.len());
    for set in &policy.ip_sets {
        if !set_ids.insert(set.id) {
            return Err(PolicyError::DuplicateSetId(set.id));
        }
        if set.members.len() > caps.max_set_members {
            return Err(PolicyError::SetTooLarge {
                set: set.id,
                members: set.members.len(),
                max: caps.max_set_members,
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
    let mut custom_ids = HashSet::with_capacity(policy.custom_rules.len());
    for custom in &policy.custom_rules {
        if !custom_ids.insert(custom.id) {
            return Err(PolicyError::DuplicateCustomRuleId(custom.id));
        }
        check_custom_rule(&custom.rule).map_err(|problem| PolicyError::BadCustomRule {
            id: custom.id,
            rule: custom.rule.chars().take(80).collect(),
            problem,
        })?;
    }
    Ok(())
}

/// The shape a custom rule must have (see the module comment).
fn check_custom_rule(rule: &str) -> Result<(), String> {
    if rule.len() > MAX_CUSTOM_RULE_BYTES {
        return Err(format!("longer than {MAX_CUSTOM_RULE_BYTES} bytes"));
    }
    if let Some(bad) =
        rule.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ') || matches!(c, '"' | '\'' | '\\'))
    {
        return Err(format!("contains {bad:?} (only printable ASCII without quotes or backslashes)"));
    }
    let words: Vec<&str> = rule.split_whitespace().collect();
    if let Some(word) = words.iter().find(|word| FORBIDDEN_WORDS.contains(word)) {
        return Err(format!("{word} is not allowed: a custom rule only matches and decides"));
    }
    let jumps: Vec<usize> = words
        .iter()
        .enumerate()
        .filter(|(_, word)| matches!(**word, "-j" | "--jump"))
        .map(|(at, _)| at)
        .collect();
    let [jump] = jumps.as_slice() else {
        return Err("needs exactly one -j TARGET".into());
    };
    let target = words.get(jump + 1).copied().unwrap_or("");
    if !CUSTOM_TARGETS.contains(&target) {
        return Err(format!("target {target:?} is not one of {}", CUSTOM_TARGETS.join(", ")));
    }
    let after = &words[jump + 2..];
    let reject_with = target == "REJECT" && after.len() == 2 && after[0] == "--reject-with";
    if !after.is_empty() && !reject_with {
        return Err("nothing but REJECT's --reject-with may follow the target".into());
    }
    if words[0] != "-j" && words[0] != "--jump" && !words[0].starts_with('-') && !words[0].starts_with('!') {
        return Err(format!("starts with {:?}, not an option", words[0]));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ven_proto::{CustomChain, CustomRule, Direction, IpSet, PolicyState, Rule, RuleFamily};

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
        assert_eq!(validate(&good, &Caps::default()), Ok(()));
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
            assert_eq!(validate(&policy, &Caps::default()), Err(error.clone()));
            assert_eq!(error.to_string(), message);
        }
        let mut any_ports = policy(vec![rule(12, Peers::Any, Protocol::Any, Some((1, 2)))]);
        assert!(matches!(
            validate(&any_ports, &Caps::default()),
            Err(PolicyError::BadPorts { rule: 12, .. })
        ));
        any_ports.rules.clear();
        any_ports.ip_sets.push(IpSet { id: 1, members: Vec::new() });
        assert_eq!(validate(&any_ports, &Caps::default()), Err(PolicyError::DuplicateSetId(1)));
    }

    #[test]
    fn refuses_what_exceeds_the_boards_caps() {
        let caps = Caps { max_rules: 2, max_sets: 1, max_set_members: 3, max_custom_rules: 0 };
        let mut big = policy(Vec::new());
        big.ip_sets[0].members = vec!["198.18.0.2".parse().unwrap(); 4];
        assert_eq!(validate(&big, &caps), Err(PolicyError::SetTooLarge { set: 1, members: 4, max: 3 }));
        let rules = policy((1..=3).map(|id| rule(id, Peers::Any, Protocol::Tcp, None)).collect());
        let err = validate(&rules, &caps).unwrap_err();
        assert_eq!(err.to_string(), "the policy has 3 rules, more than the 2 this board allows");
        let mut sets = policy(Vec::new());
        sets.ip_sets.push(IpSet { id: 2, members: Vec::new() });
        assert!(matches!(validate(&sets, &caps), Err(PolicyError::TooMany { what: "sets", .. })));
    }

    fn custom(id: u32, text: &str) -> CustomRule {
        CustomRule { id, family: RuleFamily::Both, chain: CustomChain::Input, rule: text.into() }
    }

    #[test]
    fn custom_rules_must_only_match_and_decide() {
        let good = [
            "-p tcp --dport 9000 -j ACCEPT",
            "-s 198.18.0.0/24 -p udp -m udp --dport 53 -j DROP",
            "-j RETURN",
            "! -s 198.18.0.1 -p tcp -j REJECT --reject-with tcp-reset",
            "-m set --match-set foreign src -j ACCEPT",
        ];
        for text in good {
            let mut with = policy(Vec::new());
            with.custom_rules.push(custom(1, text));
            assert_eq!(validate(&with, &Caps::default()), Ok(()), "{text}");
        }
        let bad = [
            ("-p tcp --dport 9000", "exactly one -j"),
            ("-p tcp -j ACCEPT -j DROP", "exactly one -j"),
            ("-p tcp -j VEN-INPUT", "not one of"),
            ("-p tcp -j LOG", "not one of"),
            ("-j ACCEPT\n-A INPUT -j DROP", "contains"),
            ("-m comment --comment \"x\" -j ACCEPT", "contains '\"'"),
            ("-t nat -j ACCEPT", "-t is not allowed"),
            ("-g VEN-OUTPUT", "-g is not allowed"),
            ("-I INPUT 1 -j ACCEPT", "-I is not allowed"),
            ("-j ACCEPT --reject-with x", "nothing but"),
            ("-m comment --comment ven:0123456789abcdef -j ACCEPT", "--comment is not allowed"),
            ("COMMIT -j ACCEPT", "not an option"),
        ];
        for (text, problem) in bad {
            let mut with = policy(Vec::new());
            with.custom_rules.push(custom(4, text));
            let err = validate(&with, &Caps::default()).unwrap_err();
            assert!(matches!(&err, PolicyError::BadCustomRule { id: 4, .. }), "{text}: {err}");
            assert!(err.to_string().contains(problem), "{text}: {err}");
        }
        let mut long = policy(Vec::new());
        long.custom_rules.push(custom(5, &format!("-p tcp {} -j ACCEPT", "-s 198.18.0.1 ".repeat(50))));
        assert!(validate(&long, &Caps::default()).unwrap_err().to_string().contains("longer than"));
        let mut twice = policy(Vec::new());
        twice.custom_rules = vec![custom(6, "-j ACCEPT"), custom(6, "-j DROP")];
        assert_eq!(validate(&twice, &Caps::default()), Err(PolicyError::DuplicateCustomRuleId(6)));
    }
}
