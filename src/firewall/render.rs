//! Pure rendering: a policy and the safeguards become our chains (iptables-restore rule lines for
//! table `filter`) and the desired members of our sets, for one address family.
//!
//! Guarantees: the same input always gives the same text; every rule carries a hash comment
//! `ven:<16 hex>` (SHA-256 over chain, previous rule's hash and rule text, so identical rules in
//! one chain differ and a reordered chain shows); loopback, established connections and the
//! management channel come before any policy rule or final verdict.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ven_proto::{Direction, IpNet, Peers, Policy, PolicyState, Protocol, Rule};

use super::{Family, Safeguards};

/// Our chain for traffic to this host, jumped to from INPUT.
pub(crate) const INPUT_CHAIN: &str = "VEN-INPUT";
/// Our chain for traffic from this host, jumped to from OUTPUT.
pub(crate) const OUTPUT_CHAIN: &str = "VEN-OUTPUT";
// INVARIANT: our chain names are at most 28 characters (iptables' limit) and start with
// `iptables::CHAIN_PREFIX`, which is how read-back and removal recognise them.
const _: () = assert!(INPUT_CHAIN.len() <= 28 && OUTPUT_CHAIN.len() <= 28);

/// Comment of the jump from a built-in chain into ours.
pub(crate) const JUMP_COMMENT: &str = "ven:jump";

/// Members wanted in each of our sets, by kernel set name.
pub(crate) type DesiredSets = BTreeMap<String, BTreeSet<IpNet>>;

/// One of our chains and the built-in chain that jumps to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OurChain {
    pub name: &'static str,
    /// The built-in chain whose rule 1 jumps here.
    pub hook: &'static str,
    /// Complete `-A <name> ...` lines, in order.
    pub rules: Vec<String>,
}

/// Everything one family needs in the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ruleset {
    pub chains: Vec<OurChain>,
    pub sets: DesiredSets,
}

impl Ruleset {
    pub(crate) fn rule_count(&self) -> usize {
        self.chains.iter().map(|chain| chain.rules.len()).sum()
    }
}

/// The jump rule (without `-A`/`-I <hook>`) from a built-in chain into `chain`.
pub(crate) fn jump_spec(chain: &str) -> String {
    format!("-m comment --comment \"{JUMP_COMMENT}\" -j {chain}")
}

/// Renders the policy for one family. The policy must have passed [`super::validate`].
pub(crate) fn render(family: Family, policy: &Policy, safeguards: &Safeguards) -> Ruleset {
    let sets = policy
        .ip_sets
        .iter()
        .map(|set| (family.set_name(set.id), set_members(family, &set.members)))
        .collect();

    let management = management_endpoints(family, safeguards);
    let mut input = ChainBuilder::new(INPUT_CHAIN);
    input.push("-i lo", "ACCEPT");
    input.push("-m conntrack --ctstate RELATED,ESTABLISHED", "ACCEPT");
    // INVARIANT: the PCE's side of the management channel is accepted before any policy rule or
    // default drop, without conntrack: a connection opened before our rules loaded (no conntrack
    // hooks in the namespace yet) is picked up mid-stream as NEW, and the PCE's next packet would
    // otherwise be dropped (the spec's 8444 caveat). Not SYN (`! --syn`, written as iptables-save
    // prints it so that read-back compares equal): it never opens a connection.
    for (host, port) in &management {
        input.push(
            &format!("-s {host} -p tcp -m tcp --sport {port} ! --tcp-flags FIN,SYN,RST,ACK SYN"),
            "ACCEPT",
        );
    }
    for rule in policy.rules.iter().filter(|rule| rule.direction == Direction::Inbound) {
        input.push(&rule_matches(family, rule, "src"), "ACCEPT");
    }
    push_verdict(&mut input, policy.state);

    let mut output = ChainBuilder::new(OUTPUT_CHAIN);
    output.push("-o lo", "ACCEPT");
    output.push("-m conntrack --ctstate RELATED,ESTABLISHED", "ACCEPT");
    // INVARIANT: the management channel is allowed before any policy rule or default drop.
    for (host, port) in &management {
        output.push(&format!("-d {host} -p tcp -m tcp --dport {port}"), "ACCEPT");
    }
    for rule in policy.rules.iter().filter(|rule| rule.direction == Direction::Outbound) {
        output.push(&rule_matches(family, rule, "dst"), "ACCEPT");
    }
    push_verdict(&mut output, policy.state);

    Ruleset {
        chains: vec![
            OurChain { name: INPUT_CHAIN, hook: "INPUT", rules: input.rules },
            OurChain { name: OUTPUT_CHAIN, hook: "OUTPUT", rules: output.rules },
        ],
        sets,
    }
}

/// The last rule of a chain: what happens to traffic no rule allowed.
fn push_verdict(chain: &mut ChainBuilder, state: PolicyState) {
    // Logging seam (flows milestone): NFLOG rules go here, before the verdict: new connections
    // in build, would-be drops in test, drops in enforced; the prefix encodes verdict and rule id.
    match state {
        PolicyState::Enforced => chain.push("", "DROP"),
        // Idle never reaches the renderer (it removes everything); were it to, allow all.
        PolicyState::Build | PolicyState::Test | PolicyState::Idle => chain.push("", "ACCEPT"),
    }
}

/// Matches of one policy rule; `peer_side` is `src` (inbound) or `dst` (outbound).
fn rule_matches(family: Family, rule: &Rule, peer_side: &str) -> String {
    let mut matches = String::new();
    let protocol = match rule.protocol {
        Protocol::Tcp => Some("tcp"),
        Protocol::Udp => Some("udp"),
        Protocol::Icmp => Some(family.icmp()),
        Protocol::Any => None,
    };
    if let Some(protocol) = protocol {
        let _ = write!(matches, "-p {protocol} ");
    }
    if let Peers::Set(id) = rule.peers {
        let _ = write!(matches, "-m set --match-set {} {peer_side} ", family.set_name(id));
    }
    // Validation guarantees ports only come with tcp or udp.
    if let (Some(protocol), Some(ports)) = (protocol, rule.ports) {
        if ports.first == ports.last {
            let _ = write!(matches, "-m {protocol} --dport {} ", ports.first);
        } else {
            let _ = write!(matches, "-m {protocol} --dport {}:{} ", ports.first, ports.last);
        }
    }
    matches.push_str("-m conntrack --ctstate NEW");
    matches
}

/// The PCE endpoints of this family, as host prefix and port, without duplicates, in order.
fn management_endpoints(family: Family, safeguards: &Safeguards) -> Vec<(IpNet, u16)> {
    let mut seen = BTreeSet::new();
    safeguards
        .management
        .iter()
        .map(|endpoint| (IpNet::host(endpoint.ip()), endpoint.port()))
        .filter(|(host, _)| family.contains(host))
        .filter(|endpoint| seen.insert(*endpoint))
        .collect()
}

/// The members of a set as the kernel will hold them: this family only, host bits cleared,
/// without duplicates. `/0` (which hash:net refuses) becomes its two halves, which cover all.
pub(crate) fn set_members(family: Family, members: &[IpNet]) -> BTreeSet<IpNet> {
    let mut out = BTreeSet::new();
    for member in members.iter().filter(|member| family.contains(member)) {
        let network = member.network();
        if network.prefix() == 0 {
            return halves(family);
        }
        out.insert(network);
    }
    out
}

fn halves(family: Family) -> BTreeSet<IpNet> {
    match family {
        Family::V4 => [[0, 0, 0, 0], [128, 0, 0, 0]]
            .into_iter()
            .filter_map(|octets| IpNet::new(IpAddr::from(octets), 1).ok())
            .collect(),
    }
}

/// Appends rules to one chain, chaining their hashes.
struct ChainBuilder {
    name: &'static str,
    previous_hash: String,
    rules: Vec<String>,
}

impl ChainBuilder {
    fn new(name: &'static str) -> Self {
        Self { name, previous_hash: String::new(), rules: Vec::new() }
    }

    /// Adds `-A <chain> <matches> -m comment --comment "ven:<hash>" -j <target>`.
    fn push(&mut self, matches: &str, target: &str) {
        let text = if matches.is_empty() { format!("-j {target}") } else { format!("{matches} -j {target}") };
        let hash = rule_hash(self.name, &self.previous_hash, &text);
        let separator = if matches.is_empty() { "" } else { " " };
        self.rules.push(format!(
            "-A {} {matches}{separator}-m comment --comment \"ven:{hash}\" -j {target}",
            self.name
        ));
        self.previous_hash = hash;
    }
}

/// 16 hex characters of SHA-256 over chain name, previous rule's hash and rule text.
pub(crate) fn rule_hash(chain: &str, previous: &str, text: &str) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [chain, previous, text] {
        context.update(part.as_bytes());
        context.update(&[0]);
    }
    let digest = context.finish();
    digest.as_ref()[..8].iter().fold(String::with_capacity(16), |mut hex, byte| {
        let _ = write!(hex, "{byte:02x}");
        hex
    })
}

#[cfg(test)]
mod tests {
    use super::super::{ipset, iptables};
    use super::*;
    use ven_proto::{IpSet, PortRange};

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
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

    fn safeguards() -> Safeguards {
        Safeguards {
            management: vec![
                "198.18.0.1:8443".parse().unwrap(),
                "198.18.0.1:8444".parse().unwrap(),
                "[2001:db8::1]:8443".parse().unwrap(),
                "198.18.0.1:8443".parse().unwrap(),
            ],
        }
    }

    fn full_policy(state: PolicyState) -> Policy {
        Policy {
            version: 12,
            state,
            ip_sets: vec![
                IpSet { id: 1, members: vec![net("198.18.1.5/24"), net("198.18.0.2"), net("2001:db8::2")] },
                IpSet { id: 2, members: vec![net("198.18.2.0/28"), net("198.18.0.2")] },
                IpSet { id: 3, members: Vec::new() },
            ],
            rules: vec![
                rule(100, Direction::Inbound, Peers::Set(1), Protocol::Tcp, Some((22, 22))),
                rule(101, Direction::Inbound, Peers::Any, Protocol::Tcp, Some((8000, 8080))),
                rule(102, Direction::Inbound, Peers::Set(2), Protocol::Udp, Some((53, 53))),
                rule(103, Direction::Inbound, Peers::Any, Protocol::Icmp, None),
                rule(104, Direction::Inbound, Peers::Set(3), Protocol::Any, None),
                rule(200, Direction::Outbound, Peers::Set(2), Protocol::Tcp, Some((5432, 5432))),
                rule(201, Direction::Outbound, Peers::Any, Protocol::Udp, Some((123, 123))),
                rule(202, Direction::Outbound, Peers::Set(1), Protocol::Any, None),
            ],
            custom_rules: Vec::new(),
        }
    }

    /// Compares with `src/firewall/testdata/<name>.rules` (iptables-restore input applied to a
    /// kernel holding nothing of ours) and `<name>.sets` (the `ipset restore` input for it).
    /// Regenerate after an intended change with `UPDATE_GOLDEN=1 cargo test -p ven --lib firewall`
    /// and review the diff.
    fn golden(name: &str, policy: &Policy) {
        let ruleset = render(Family::V4, policy, &safeguards());
        let rules = iptables::restore_input(&ruleset.chains, &iptables::FilterState::default());
        let sets = ipset::plan(Family::V4, &ipset::KernelSets::new(), &ruleset.sets).render();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/firewall/testdata");
        for (extension, actual) in [("rules", rules), ("sets", sets)] {
            let path = dir.join(format!("{name}.{extension}"));
            if std::env::var_os("UPDATE_GOLDEN").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &actual).unwrap();
                continue;
            }
            let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!("{}: {e} (run with UPDATE_GOLDEN=1 to create it)", path.display())
            });
            assert_eq!(actual, expected, "{} differs (UPDATE_GOLDEN=1 regenerates it)", path.display());
        }
    }

    #[test]
    fn golden_enforced() {
        golden("enforced", &full_policy(PolicyState::Enforced));
    }

    #[test]
    fn golden_build() {
        golden("build", &full_policy(PolicyState::Build));
    }

    #[test]
    fn golden_test() {
        golden("test", &full_policy(PolicyState::Test));
    }

    #[test]
    fn golden_empty_enforced() {
        golden(
            "empty-enforced",
            &Policy {
                version: 1,
                state: PolicyState::Enforced,
                ip_sets: Vec::new(),
                rules: Vec::new(),
                custom_rules: Vec::new(),
            },
        );
    }

    #[test]
    fn management_comes_before_policy_rules_and_verdict() {
        let ruleset = render(Family::V4, &full_policy(PolicyState::Enforced), &safeguards());
        let output = &ruleset.chains[1];
        assert_eq!(output.name, OUTPUT_CHAIN);
        let first_management = output.rules.iter().position(|r| r.contains("--dport 8443")).unwrap();
        let first_policy = output.rules.iter().position(|r| r.contains("--ctstate NEW")).unwrap();
        assert!(first_management < first_policy);
        assert!(output.rules.last().unwrap().ends_with("-j DROP"));
        assert_eq!(output.rules.iter().filter(|r| r.contains("-d 198.18.0.1/32")).count(), 2, "deduplicated");
        assert!(!output.rules.iter().any(|r| r.contains("2001:db8")), "IPv6 endpoints skipped");

        let input = &ruleset.chains[0];
        let replies: Vec<&String> = input.rules.iter().filter(|r| r.contains("-s 198.18.0.1/32")).collect();
        assert_eq!(replies.len(), 2, "the PCE's side of both channels: {replies:?}");
        assert!(
            replies
                .iter()
                .all(|r| r.contains("! --tcp-flags FIN,SYN,RST,ACK SYN") && r.contains("--sport 844"))
        );
        let first_policy = input.rules.iter().position(|r| r.contains("--ctstate NEW")).unwrap();
        let last_reply = input.rules.iter().rposition(|r| r.contains("-s 198.18.0.1/32")).unwrap();
        assert!(last_reply < first_policy, "before any policy rule or the drop");
    }

    #[test]
    fn hashes_are_stable_and_differ_for_identical_rules() {
        let mut policy = full_policy(PolicyState::Enforced);
        let first = render(Family::V4, &policy, &safeguards());
        assert_eq!(first, render(Family::V4, &policy, &safeguards()));
        policy.rules.push(rule(105, Direction::Inbound, Peers::Any, Protocol::Icmp, None));
        let again = render(Family::V4, &policy, &safeguards());
        let icmp: Vec<&String> = again.chains[0].rules.iter().filter(|r| r.contains("-p icmp")).collect();
        assert_eq!(icmp.len(), 2);
        assert_ne!(icmp[0], icmp[1]);
        assert_eq!(rule_hash("VEN-INPUT", "", "-i lo -j ACCEPT").len(), 16);
    }

    #[test]
    fn set_members_are_normalised_for_the_kernel() {
        let members = set_members(
            Family::V4,
            &[net("198.18.1.5/24"), net("198.18.1.0/24"), net("198.18.0.2/32"), net("2001:db8::/64")],
        );
        assert_eq!(
            members.into_iter().map(|m| m.to_string()).collect::<Vec<_>>(),
            ["198.18.0.2/32", "198.18.1.0/24"]
        );
        let everything = set_members(Family::V4, &[net("198.18.0.2"), net("10.0.0.0/0")]);
        assert_eq!(
            everything.into_iter().map(|m| m.to_string()).collect::<Vec<_>>(),
            ["0.0.0.0/1", "128.0.0.0/1"]
        );
    }
}
