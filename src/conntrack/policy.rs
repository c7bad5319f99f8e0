//! Which tracked connections the new policy still allows: the pure half of the cut.
//!
//! [`Evaluator`] compiles a [`CutInput`] once (sets into sorted, merged address ranges; rules
//! per direction) so that judging each of many connections costs a binary search per rule, not a
//! scan of every set member.
//!
//! The rules mirror the firewall's chains (`firewall::render`): loopback, the management channel
//! (TCP to the PCE's endpoints; inbound only from their ports) and the policy rules, plus the
//! board's fail-safe inbound services. When in doubt the connection is kept: a cut is destructive,
//! and a connection kept that the firewall would refuse is only kept until it ends.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use ven_proto::{CustomChain, Direction, Peers, PolicyState, PortRange, Protocol, Rule, RuleFamily};

use super::wire::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};
use super::{Connection, CutInput};

/// A [`CutInput`] compiled for judging many connections.
pub(crate) struct Evaluator<'a> {
    enforced: bool,
    local: HashSet<IpAddr>,
    management: HashSet<SocketAddr>,
    failsafe_inbound: &'a [(Protocol, u16)],
    inbound: Vec<CompiledRule>,
    outbound: Vec<CompiledRule>,
    /// Address ranges of each set, by index in [`Evaluator::sets`].
    sets: Vec<Ranges>,
    /// Per direction (inbound, outbound): families for which some custom rule ACCEPTs.
    custom_accept: [FamilyFlags; 2],
}

#[derive(Clone, Copy, Default)]
struct FamilyFlags {
    v4: bool,
    v6: bool,
}

impl FamilyFlags {
    fn add(&mut self, family: RuleFamily) {
        match family {
            RuleFamily::V4 => self.v4 = true,
            RuleFamily::V6 => self.v6 = true,
            RuleFamily::Both => (self.v4, self.v6) = (true, true),
        }
    }

    fn covers(self, addr: IpAddr) -> bool {
        if addr.is_ipv4() { self.v4 } else { self.v6 }
    }
}

struct CompiledRule {
    peers: PeerMatch,
    protocol: Protocol,
    ports: Option<PortRange>,
}

enum PeerMatch {
    Any,
    /// Index into [`Evaluator::sets`].
    Set(usize),
    /// The rule names a set the policy does not have: it allows nobody (as the firewall, which
    /// refuses such a policy, would).
    Nobody,
}

/// Sorted, non-overlapping, non-adjacent inclusive ranges per family (IPv4 values in the low 32
/// bits), so that membership is one binary search.
#[derive(Default)]
struct Ranges {
    v4: Vec<(u128, u128)>,
    v6: Vec<(u128, u128)>,
}

impl Ranges {
    fn new(members: &[ven_proto::IpNet]) -> Self {
        let mut ranges = Self::default();
        for member in members {
            let (value, bits) = match member.addr() {
                IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32u32),
                IpAddr::V6(v6) => (u128::from(v6), 128u32),
            };
            let host_bits = bits - u32::from(member.prefix().min(bits as u8));
            // All ones in the host bits; none for a host (a shift by 128 is None).
            let host_mask = u128::MAX.checked_shr(128 - host_bits).unwrap_or(0);
            let start = value & !host_mask;
            let range = (start, start | host_mask);
            if member.is_ipv4() { ranges.v4.push(range) } else { ranges.v6.push(range) }
        }
        merge(&mut ranges.v4);
        merge(&mut ranges.v6);
        ranges
    }

    fn contains(&self, addr: IpAddr) -> bool {
        let (ranges, value) = match addr {
            IpAddr::V4(v4) => (&self.v4, u128::from(u32::from(v4))),
            IpAddr::V6(v6) => (&self.v6, u128::from(v6)),
        };
        // Ranges are sorted and disjoint: only the last one starting at or before `value` can hold it.
        let after = ranges.partition_point(|&(start, _)| start <= value);
        after.checked_sub(1).and_then(|i| ranges.get(i)).is_some_and(|&(_, end)| value <= end)
    }
}

fn merge(ranges: &mut Vec<(u128, u128)>) {
    ranges.sort_unstable();
    let mut merged: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
    for &(start, end) in ranges.iter() {
        match merged.last_mut() {
            Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    *ranges = merged;
}

impl<'a> Evaluator<'a> {
    pub(crate) fn new(input: &'a CutInput<'a>) -> Self {
        let policy = input.policy;
        let index: HashMap<u32, usize> =
            policy.ip_sets.iter().enumerate().map(|(position, set)| (set.id, position)).collect();
        let sets = policy.ip_sets.iter().map(|set| Ranges::new(&set.members)).collect();
        let compile = |direction: Direction| -> Vec<CompiledRule> {
            policy
                .rules
                .iter()
                .filter(|rule| rule.direction == direction)
                .map(|rule: &Rule| CompiledRule {
                    peers: match rule.peers {
                        Peers::Any => PeerMatch::Any,
                        Peers::Set(id) => index.get(&id).map_or(PeerMatch::Nobody, |&i| PeerMatch::Set(i)),
                    },
                    protocol: rule.protocol,
                    ports: rule.ports,
                })
                .collect()
        };
        let mut custom_accept = [FamilyFlags::default(); 2];
        for custom in policy.custom_rules.iter().filter(|custom| accepts(&custom.rule)) {
            match custom.chain {
                CustomChain::Input => custom_accept[0].add(custom.family),
                CustomChain::Output => custom_accept[1].add(custom.family),
                // Forwarded connections are never cut.
                CustomChain::Forward => {}
            }
        }
        Self {
            enforced: policy.state == PolicyState::Enforced,
            local: input.local_addresses.iter().map(|addr| addr.to_canonical()).collect(),
            management: input
                .management
                .iter()
                .map(|endpoint| SocketAddr::new(endpoint.ip().to_canonical(), endpoint.port()))
                .collect(),
            failsafe_inbound: &input.failsafe_inbound,
            inbound: compile(Direction::Inbound),
            outbound: compile(Direction::Outbound),
            sets,
            custom_accept,
        }
    }

    /// See [`super::allowed`].
    pub(crate) fn allowed(&self, connection: &Connection) -> bool {
        if !self.enforced {
            return true;
        }
        let (src, dst) = (connection.original_src.to_canonical(), connection.original_dst.to_canonical());
        if src.is_loopback() || dst.is_loopback() {
            return true;
        }
        let (direction, peer, peer_port) = match (self.local.contains(&src), self.local.contains(&dst)) {
            (false, true) => (Direction::Inbound, src, connection.src_port),
            (true, false) => (Direction::Outbound, dst, connection.dst_port),
            // The host talking to itself goes over lo, which the firewall always accepts.
            (true, true) => return true,
            // Forwarded traffic: not ours to cut.
            (false, false) => return true,
        };
        if connection.protocol == IPPROTO_TCP {
            if let Some(port) = peer_port {
                if self.management.contains(&SocketAddr::new(peer, port)) {
                    return true;
                }
            }
        }
        let (rules, custom_accept) = match direction {
            Direction::Inbound => {
                let failsafe = self.failsafe_inbound.iter().any(|&(protocol, port)| {
                    protocol_matches(protocol, connection) && connection.dst_port == Some(port)
                });
                if failsafe {
                    return true;
                }
                (&self.inbound, self.custom_accept[0])
            }
            Direction::Outbound => (&self.outbound, self.custom_accept[1]),
        };
        // Custom rules are the operator's iptables text, which the VEN cannot evaluate: if any of
        // them may ACCEPT traffic of this direction and family, keep the connection.
        if custom_accept.covers(peer) {
            return true;
        }
        rules.iter().any(|rule| self.rule_matches(rule, connection, peer))
    }

    fn rule_matches(&self, rule: &CompiledRule, connection: &Connection, peer: IpAddr) -> bool {
        let peer_ok = match rule.peers {
            PeerMatch::Any => true,
            PeerMatch::Set(index) => self.sets.get(index).is_some_and(|set| set.contains(peer)),
            PeerMatch::Nobody => false,
        };
        // As the firewall renders it: ports only constrain TCP and UDP rules.
        let ports_ok = match (rule.protocol, rule.ports) {
            (Protocol::Tcp | Protocol::Udp, Some(ports)) => {
                connection.dst_port.is_some_and(|port| ports.first <= port && port <= ports.last)
            }
            _ => true,
        };
        peer_ok && ports_ok && protocol_matches(rule.protocol, connection)
    }
}

/// Whether `protocol` covers the connection's IP protocol (ICMP means ICMPv6 on IPv6).
fn protocol_matches(protocol: Protocol, connection: &Connection) -> bool {
    match protocol {
        Protocol::Any => true,
        Protocol::Tcp => connection.protocol == IPPROTO_TCP,
        Protocol::Udp => connection.protocol == IPPROTO_UDP,
        Protocol::Icmp if connection.original_src.is_ipv4() => connection.protocol == IPPROTO_ICMP,
        Protocol::Icmp => connection.protocol == IPPROTO_ICMPV6,
    }
}

/// Whether a custom rule's text may jump to ACCEPT. Over-approximates on purpose (a comment
/// reading ACCEPT counts too): a false "yes" only keeps a connection.
fn accepts(rule: &str) -> bool {
    rule.split_whitespace()
        .map(|token| token.trim_matches(|c| c == '"' || c == '\''))
        .any(|token| matches!(token, "ACCEPT" | "-jACCEPT" | "--jump=ACCEPT"))
}

#[cfg(test)]
mod tests {
    use super::super::{Connection, CutInput, Icmp, allowed};
    use super::*;
    use ven_proto::{CustomRule, IpSet, Policy};

    const HOST: &str = "198.18.0.2";
    const HOST6: &str = "2001:2::2";
    const PEER: &str = "198.18.0.1";
    const STRANGER: &str = "198.18.1.7";
    const PCE: &str = "198.18.0.9";

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> Connection {
        Connection {
            protocol: IPPROTO_TCP,
            original_src: ip(src),
            original_dst: ip(dst),
            src_port: Some(sport),
            dst_port: Some(dport),
            icmp: None,
            zone: None,
            id: None,
        }
    }

    fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Connection {
        Connection { protocol: IPPROTO_UDP, ..tcp(src, sport, dst, dport) }
    }

    fn ping(src: &str, dst: &str) -> Connection {
        let protocol = if ip(src).is_ipv4() { IPPROTO_ICMP } else { IPPROTO_ICMPV6 };
        Connection {
            protocol,
            original_src: ip(src),
            original_dst: ip(dst),
            src_port: None,
            dst_port: None,
            icmp: Some(Icmp { id: 7, kind: 8, code: 0 }),
            zone: None,
            id: None,
        }
    }

    fn rule(
        id: u32,
        direction: Direction,
        peers: Peers,
        protocol: Protocol,
        ports: Option<(u16, u16)>,
    ) -> Rule {
        Rule { id, direction, peers, protocol, ports: ports.map(|(first, last)| PortRange { first, last }) }
    }

    fn set(id: u32, members: &[&str]) -> IpSet {
        IpSet { id, members: members.iter().map(|m| m.parse().unwrap()).collect() }
    }

    fn policy(rules: Vec<Rule>, sets: Vec<IpSet>) -> Policy {
        Policy { version: 2, state: PolicyState::Enforced, ip_sets: sets, rules, custom_rules: Vec::new() }
    }

    fn input(policy: &Policy) -> CutInput<'_> {
        CutInput {
            policy,
            local_addresses: vec![ip(HOST), ip(HOST6)],
            management: vec![SocketAddr::new(ip(PCE), 8443)],
            failsafe_inbound: vec![(Protocol::Tcp, 22)],
        }
    }

    #[test]
    fn nothing_is_cut_unless_enforced() {
        for state in [PolicyState::Idle, PolicyState::Build, PolicyState::Test] {
            let policy = Policy { state, ..policy(Vec::new(), Vec::new()) };
            assert!(allowed(&input(&policy), &tcp(STRANGER, 40000, HOST, 9999)), "{state}");
        }
        let enforced = policy(Vec::new(), Vec::new());
        assert!(!allowed(&input(&enforced), &tcp(STRANGER, 40000, HOST, 9999)));
    }

    #[test]
    fn loopback_self_and_forwarded_traffic_are_kept() {
        let policy = policy(Vec::new(), Vec::new());
        let input = input(&policy);
        assert!(allowed(&input, &tcp("127.0.0.1", 40000, "127.0.0.1", 5432)));
        assert!(allowed(&input, &tcp(HOST, 40000, "127.0.0.53", 53)));
        assert!(allowed(&input, &tcp("::1", 40000, "::1", 80)));
        assert!(allowed(&input, &tcp(HOST, 40000, HOST, 80)), "the host to itself");
        assert!(allowed(&input, &tcp(PEER, 40000, STRANGER, 80)), "forwarded");
    }

    #[test]
    fn direction_follows_which_end_is_local() {
        let inbound_only =
            policy(vec![rule(1, Direction::Inbound, Peers::Any, Protocol::Tcp, Some((80, 80)))], vec![]);
        let cut = input(&inbound_only);
        assert!(allowed(&cut, &tcp(PEER, 40000, HOST, 80)), "inbound to 80");
        assert!(!allowed(&cut, &tcp(HOST, 40000, PEER, 80)), "outbound to 80 has no rule");
        let outbound_only =
            policy(vec![rule(1, Direction::Outbound, Peers::Any, Protocol::Tcp, Some((80, 80)))], vec![]);
        let cut = input(&outbound_only);
        assert!(allowed(&cut, &tcp(HOST, 40000, PEER, 80)));
        assert!(!allowed(&cut, &tcp(PEER, 40000, HOST, 80)));
    }

    #[test]
    fn management_endpoints_are_never_cut() {
        let policy = policy(Vec::new(), Vec::new());
        let input = input(&policy);
        assert!(allowed(&input, &tcp(HOST, 40000, PCE, 8443)), "outbound to the PCE's port");
        assert!(allowed(&input, &tcp(PCE, 8443, HOST, 40000)), "inbound from the PCE's port");
        assert!(!allowed(&input, &tcp(HOST, 40000, PCE, 22)), "another port of the PCE host");
        assert!(!allowed(&input, &tcp(PCE, 40000, HOST, 8443)), "inbound to our 8443 is not management");
        assert!(!allowed(&input, &udp(HOST, 40000, PCE, 8443)), "the management channel is TCP");
    }

    #[test]
    fn failsafe_inbound_services_are_never_cut() {
        let policy = policy(Vec::new(), Vec::new());
        let input = input(&policy);
        assert!(allowed(&input, &tcp(STRANGER, 40000, HOST, 22)));
        assert!(!allowed(&input, &udp(STRANGER, 40000, HOST, 22)), "protocol must match");
        assert!(!allowed(&input, &tcp(HOST, 40000, STRANGER, 22)), "inbound only");
        assert!(allowed(&input, &tcp("2001:2::9", 40000, HOST6, 22)), "both families");
    }

    #[test]
    fn peers_must_be_in_the_rule_set_including_networks() {
        let policy = policy(
            vec![
                rule(1, Direction::Inbound, Peers::Set(1), Protocol::Tcp, Some((5432, 5432))),
                rule(2, Direction::Inbound, Peers::Set(99), Protocol::Tcp, None),
            ],
            vec![set(1, &[PEER, "198.18.4.0/22", "198.18.9.5/24", "2001:2:0:1::/64"])],
        );
        let input = input(&policy);
        assert!(allowed(&input, &tcp(PEER, 40000, HOST, 5432)));
        assert!(allowed(&input, &tcp("198.18.7.255", 40000, HOST, 5432)), "inside /22");
        assert!(!allowed(&input, &tcp("198.18.8.0", 40000, HOST, 5432)), "just past /22 (gap before 9.0/24)");
        assert!(allowed(&input, &tcp("198.18.9.200", 40000, HOST, 5432)), "host bits of a member ignored");
        assert!(!allowed(&input, &tcp(STRANGER, 40000, HOST, 5432)), "not a member");
        assert!(allowed(&input, &tcp("2001:2:0:1::abcd", 40000, HOST6, 5432)));
        assert!(!allowed(&input, &tcp("2001:2:0:2::1", 40000, HOST6, 5432)));
        assert!(!allowed(&input, &tcp(PEER, 40000, HOST, 6000)), "set 99 does not exist");
    }

    #[test]
    fn whole_address_space_members() {
        let policy = policy(
            vec![rule(1, Direction::Outbound, Peers::Set(1), Protocol::Any, None)],
            vec![set(1, &["0.0.0.0/0", "::/0"])],
        );
        let input = input(&policy);
        assert!(allowed(&input, &tcp(HOST, 40000, "203.0.113.1", 443)));
        assert!(allowed(&input, &udp(HOST6, 40000, "2001:db8::1", 53)));
    }

    #[test]
    fn protocols_and_ports() {
        let policy = policy(
            vec![
                rule(1, Direction::Inbound, Peers::Any, Protocol::Udp, Some((1000, 2000))),
                rule(2, Direction::Inbound, Peers::Any, Protocol::Icmp, None),
                rule(3, Direction::Outbound, Peers::Any, Protocol::Tcp, None),
            ],
            vec![],
        );
        let input = input(&policy);
        assert!(allowed(&input, &udp(PEER, 5, HOST, 1000)));
        assert!(allowed(&input, &udp(PEER, 5, HOST, 2000)));
        assert!(!allowed(&input, &udp(PEER, 5, HOST, 2001)), "above the range");
        assert!(!allowed(&input, &udp(PEER, 5, HOST, 999)), "below the range");
        assert!(!allowed(&input, &tcp(PEER, 5, HOST, 1500)), "tcp is not udp");
        assert!(allowed(&input, &ping(PEER, HOST)), "icmp rule, IPv4");
        assert!(allowed(&input, &ping("2001:2::9", HOST6)), "icmp rule means ICMPv6 on IPv6");
        let wrong = Connection { protocol: IPPROTO_ICMP, ..ping("2001:2::9", HOST6) };
        assert!(!allowed(&input, &wrong), "protocol 1 over IPv6 is not ICMPv6");
        assert!(allowed(&input, &tcp(HOST, 40000, STRANGER, 1)), "tcp without ports: every port");
        assert!(!allowed(&input, &ping(HOST, PEER)), "no outbound icmp rule");
        let sctp = Connection { protocol: 132, ..tcp(HOST, 1, STRANGER, 1) };
        assert!(!allowed(&input, &sctp));
    }

    #[test]
    fn any_protocol_rule_ignores_ports() {
        let mut any = rule(1, Direction::Inbound, Peers::Any, Protocol::Any, None);
        // Validation refuses ports on an "any" rule; the firewall would render none.
        any.ports = Some(PortRange { first: 1, last: 1 });
        let policy = policy(vec![any], vec![]);
        assert!(allowed(&input(&policy), &tcp(PEER, 1, HOST, 9999)));
        assert!(allowed(&input(&policy), &ping(PEER, HOST)));
    }

    #[test]
    fn accepting_custom_rules_keep_their_direction_and_family() {
        let custom = |id, family, chain, text: &str| CustomRule { id, family, chain, rule: text.into() };
        let mut policy = policy(Vec::new(), Vec::new());
        policy.custom_rules = vec![
            custom(1, RuleFamily::V4, CustomChain::Input, "-p tcp --dport 9000 -j ACCEPT"),
            custom(2, RuleFamily::Both, CustomChain::Output, "-p tcp --dport 9000 -j DROP"),
            custom(3, RuleFamily::Both, CustomChain::Forward, "-j ACCEPT"),
        ];
        let cut = input(&policy);
        assert!(allowed(&cut, &tcp(STRANGER, 1, HOST, 9999)), "inbound v4: custom ACCEPT may apply");
        assert!(!allowed(&cut, &tcp("2001:2::9", 1, HOST6, 9999)), "the accepting rule is v4 only");
        assert!(!allowed(&cut, &tcp(HOST, 1, STRANGER, 9000)), "outbound: only a DROP custom rule");
        policy.custom_rules[1].rule = "--jump=ACCEPT".into();
        assert!(allowed(&input(&policy), &tcp(HOST, 1, STRANGER, 9)));
    }

    #[test]
    fn custom_rule_accept_detection() {
        assert!(accepts("-p tcp -j ACCEPT"));
        assert!(accepts("-p tcp --jump ACCEPT"));
        assert!(accepts("-jACCEPT"));
        assert!(accepts("-j 'ACCEPT'"));
        assert!(!accepts("-p tcp -j DROP"));
        assert!(!accepts("-j REJECT --reject-with tcp-reset"));
    }

    #[test]
    fn ranges_merge_overlapping_and_adjacent_members() {
        let members: Vec<ven_proto::IpNet> =
            ["198.18.0.0/25", "198.18.0.128/25", "198.18.0.64/26", "198.18.2.1", "255.255.255.255"]
                .iter()
                .map(|m| m.parse().unwrap())
                .collect();
        let ranges = Ranges::new(&members);
        let v4 = |text: &str| u128::from(u32::from(text.parse::<std::net::Ipv4Addr>().unwrap()));
        assert_eq!(
            ranges.v4,
            vec![
                (v4("198.18.0.0"), v4("198.18.0.255")),
                (v4("198.18.2.1"), v4("198.18.2.1")),
                (v4("255.255.255.255"), v4("255.255.255.255")),
            ]
        );
        assert!(ranges.contains(ip("255.255.255.255")));
        assert!(!ranges.contains(ip("0.0.0.0")));
        assert!(!ranges.contains(ip("::")), "families do not mix");
    }
}
