//! Pure rendering: a policy, the safeguards and the board's options become our chains
//! (iptables-restore rule lines for table `filter`) and the desired members of our sets, for one
//! address family.
//!
//! Guarantees: the same input always gives the same text; every rule carries a hash comment
//! `ven:<16 hex>` (SHA-256 over chain, previous rule's hash and rule text, so identical rules in
//! one chain differ and a reordered chain shows), which is how read-back recognises our rules;
//! loopback, established connections, the management channel, IPv6 neighbour discovery and the
//! board's fail-safe services come before any custom rule, policy rule or final verdict.
//!
//! Chain layout (per family): `VEN-INPUT` (jumped to from rule 1 of INPUT), `VEN-OUTPUT` (from
//! OUTPUT), `VEN-FORWARD` (from FORWARD, only on boards that route), and `VEN-CUSTOM-IN`,
//! `VEN-CUSTOM-OUT`, `VEN-CUSTOM-FWD` holding the operator's custom rules (only when the policy
//! has some for that family and direction), jumped to after the safeguards.
//!
//! Logging: every policy rule is an NFLOG rule followed by the same matches with ACCEPT, so the
//! first packet of each accepted connection is logged with the rule id; the final verdict logs
//! what no rule allowed. The prefix is [`log_prefix`]; the flow pipeline reads it back with
//! [`parse_log_prefix`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ven_proto::{CustomChain, Direction, IpNet, Peers, Policy, PolicyState, Protocol, Rule};

use super::{Family, Options, Safeguards};

/// Our chain for traffic to this host, jumped to from INPUT.
pub(crate) const INPUT_CHAIN: &str = "VEN-INPUT";
/// Our chain for traffic from this host, jumped to from OUTPUT.
pub(crate) const OUTPUT_CHAIN: &str = "VEN-OUTPUT";
/// Our chain for routed traffic, jumped to from FORWARD when the board routes.
pub(crate) const FORWARD_CHAIN: &str = "VEN-FORWARD";
/// Chains of the policy's custom rules.
pub(crate) const CUSTOM_INPUT_CHAIN: &str = "VEN-CUSTOM-IN";
pub(crate) const CUSTOM_OUTPUT_CHAIN: &str = "VEN-CUSTOM-OUT";
pub(crate) const CUSTOM_FORWARD_CHAIN: &str = "VEN-CUSTOM-FWD";
// INVARIANT: our chain names are at most 28 characters (iptables' limit) and start with
// `iptables::CHAIN_PREFIX`, which is how read-back and removal recognise them.
const _: () = assert!(CUSTOM_OUTPUT_CHAIN.len() <= 28 && FORWARD_CHAIN.len() <= 28);

/// Comment of the jump from a built-in chain into ours.
pub(crate) const JUMP_COMMENT: &str = "ven:jump";
/// Bytes of each logged packet copied to the flow pipeline: IPv6 + TCP headers with options.
const NFLOG_COPY_BYTES: u16 = 128;
/// ICMPv6 types the link needs whatever the policy says (RFC 4890 4.4.1, "must not be dropped"
/// for local traffic): multicast listener query, report and done (130-132) and MLDv2 report
/// (143), without which multicast-snooping switches stop delivering neighbour solicitations;
/// router solicitation and advertisement, neighbour solicitation and advertisement (133-136),
/// without which IPv6 stops working on the link.
const LINK_ICMPV6: [u8; 8] = [130, 131, 132, 133, 134, 135, 136, 143];

/// Members wanted in each of our sets, by kernel set name.
pub(crate) type DesiredSets = BTreeMap<String, BTreeSet<IpNet>>;

/// One of our chains and the built-in chain that jumps to it, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OurChain {
    pub name: String,
    /// The built-in chain whose rule 1 jumps here; `None` for chains jumped to from ours.
    pub hook: Option<String>,
    /// Complete `-A <name> ...` lines, in order.
    pub rules: Vec<String>,
}

impl OurChain {
    fn new(name: &str, hook: Option<&str>, rules: Vec<String>) -> Self {
        Self { name: name.to_string(), hook: hook.map(str::to_string), rules }
    }
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

/// What a log rule says about the connection it logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LogVerdict {
    /// Accepted by the policy rule named in the prefix.
    Allowed,
    /// A new connection no rule allowed, accepted because the state is build.
    Observed,
    /// A new connection no rule allowed, accepted because the state is test: enforcement
    /// would drop it.
    WouldDrop,
    /// Dropped by the enforced state's default deny.
    Dropped,
}

impl LogVerdict {
    fn letter(self) -> char {
        match self {
            Self::Allowed => 'a',
            Self::Observed => 'o',
            Self::WouldDrop => 'w',
            Self::Dropped => 'd',
        }
    }
}

/// The NFLOG prefix of a log rule: `ven:<verdict letter>:<rule id>` (rule 0: no rule matched).
pub fn log_prefix(verdict: LogVerdict, rule: u32) -> String {
    format!("ven:{}:{rule}", verdict.letter())
}

/// Reads a prefix written by [`log_prefix`] (as NFLOG delivers it, possibly NUL-terminated).
pub fn parse_log_prefix(prefix: &[u8]) -> Option<(LogVerdict, u32)> {
    let end = prefix.iter().position(|&b| b == 0).unwrap_or(prefix.len());
    let text = std::str::from_utf8(&prefix[..end]).ok()?;
    let rest = text.strip_prefix("ven:")?;
    let (letter, rule) = rest.split_once(':')?;
    let verdict = match letter {
        "a" => LogVerdict::Allowed,
        "o" => LogVerdict::Observed,
        "w" => LogVerdict::WouldDrop,
        "d" => LogVerdict::Dropped,
        _ => return None,
    };
    if rule.is_empty() || !rule.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((verdict, rule.parse().ok()?))
}

/// The jump rule (without `-A`/`-I <hook>`) from a built-in chain into `chain`.
pub(crate) fn jump_spec(chain: &str) -> String {
    format!("-m comment --comment \"{JUMP_COMMENT}\" -j {chain}")
}

/// Renders the policy for one family. The policy must have passed [`super::validate`].
pub(crate) fn render(family: Family, policy: &Policy, safeguards: &Safeguards, options: &Options) -> Ruleset {
    let sets = policy
        .ip_sets
        .iter()
        .map(|set| (family.set_name(set.id), set_members(family, &set.members)))
        .collect();
    let management = management_endpoints(family, safeguards);
    let custom = |chain: CustomChain| -> Vec<(&str, &str)> {
        policy
            .custom_rules
            .iter()
            .filter(|rule| rule.chain == chain && family.takes(rule.family))
            .filter_map(|rule| split_target(&rule.rule))
            .collect()
    };
    let mut chains = Vec::with_capacity(6);

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
    push_neighbour_discovery(&mut input, family);
    for interface in &options.ignored_interfaces {
        input.push(&format!("-i {interface}"), "RETURN");
    }
    for service in options.failsafe.iter().filter(|s| s.direction == super::ServiceDirection::Inbound) {
        let protocol = service.protocol.as_str();
        input.push(
            &format!("-p {protocol} -m {protocol} --dport {} -m conntrack --ctstate NEW", service.port),
            "ACCEPT",
        );
    }
    let custom_input = custom(CustomChain::Input);
    if !custom_input.is_empty() {
        input.push("", CUSTOM_INPUT_CHAIN);
    }
    for rule in policy.rules.iter().filter(|rule| rule.direction == Direction::Inbound) {
        push_policy_rule(&mut input, &rule_matches(family, rule, "src"), rule.id, options);
    }
    push_verdict(&mut input, policy.state, options);
    chains.push(OurChain::new(INPUT_CHAIN, Some("INPUT"), input.rules));

    let mut output = ChainBuilder::new(OUTPUT_CHAIN);
    output.push("-o lo", "ACCEPT");
    output.push("-m conntrack --ctstate RELATED,ESTABLISHED", "ACCEPT");
    // INVARIANT: the management channel is allowed before any policy rule or default drop.
    for (host, port) in &management {
        output.push(&format!("-d {host} -p tcp -m tcp --dport {port}"), "ACCEPT");
    }
    push_neighbour_discovery(&mut output, family);
    for interface in &options.ignored_interfaces {
        output.push(&format!("-o {interface}"), "RETURN");
    }
    for service in options.failsafe.iter().filter(|s| s.direction == super::ServiceDirection::Outbound) {
        let protocol = service.protocol.as_str();
        output.push(
            &format!("-p {protocol} -m {protocol} --dport {} -m conntrack --ctstate NEW", service.port),
            "ACCEPT",
        );
    }
    let custom_output = custom(CustomChain::Output);
    if !custom_output.is_empty() {
        output.push("", CUSTOM_OUTPUT_CHAIN);
    }
    for rule in policy.rules.iter().filter(|rule| rule.direction == Direction::Outbound) {
        push_policy_rule(&mut output, &rule_matches(family, rule, "dst"), rule.id, options);
    }
    push_verdict(&mut output, policy.state, options);
    chains.push(OurChain::new(OUTPUT_CHAIN, Some("OUTPUT"), output.rules));

    // Routed traffic is the board's own business except for the operator's custom rules: the
    // policy describes this host's connections only.
    let custom_forward = if options.routes { custom(CustomChain::Forward) } else { Vec::new() };
    if options.routes {
        let mut forward = ChainBuilder::new(FORWARD_CHAIN);
        if !custom_forward.is_empty() {
            for interface in &options.ignored_interfaces {
                forward.push(&format!("-i {interface}"), "RETURN");
                forward.push(&format!("-o {interface}"), "RETURN");
            }
            forward.push("", CUSTOM_FORWARD_CHAIN);
        }
        chains.push(OurChain::new(FORWARD_CHAIN, Some("FORWARD"), forward.rules));
    }

    for (name, rules) in [
        (CUSTOM_INPUT_CHAIN, custom_input),
        (CUSTOM_OUTPUT_CHAIN, custom_output),
        (CUSTOM_FORWARD_CHAIN, custom_forward),
    ] {
        if rules.is_empty() {
            continue;
        }
        let mut chain = ChainBuilder::new(name);
        for (matches, target) in rules {
            chain.push(matches, target);
        }
        chains.push(OurChain::new(name, None, chain.rules));
    }

    Ruleset { chains, sets }
}

/// A custom rule split into its matches and its target (`-j` and what follows). Validation
/// guarantees exactly one `-j`, no quotes and no other jump.
fn split_target(rule: &str) -> Option<(&str, &str)> {
    let rule = rule.trim();
    if let Some(target) = rule.strip_prefix("-j ") {
        return Some(("", target.trim()));
    }
    let at = rule.find(" -j ")?;
    Some((rule[..at].trim(), rule[at + 4..].trim()))
}

/// IPv6 neighbour discovery and multicast listener messages in and out, before anything can
/// drop them.
fn push_neighbour_discovery(chain: &mut ChainBuilder, family: Family) {
    if family == Family::V6 {
        for icmp_type in LINK_ICMPV6 {
            chain.push(&format!("-p ipv6-icmp -m icmp6 --icmpv6-type {icmp_type}"), "ACCEPT");
        }
    }
}

/// The NFLOG target of a log rule.
fn nflog_target(verdict: LogVerdict, rule: u32, options: &Options) -> String {
    format!(
        "NFLOG --nflog-prefix \"{}\" --nflog-group {} --nflog-size {NFLOG_COPY_BYTES}",
        log_prefix(verdict, rule),
        options.nflog_group
    )
}

/// One allow rule: log the first packet of the connection with the rule id, then accept it.
fn push_policy_rule(chain: &mut ChainBuilder, matches: &str, rule: u32, options: &Options) {
    chain.push(matches, &nflog_target(LogVerdict::Allowed, rule, options));
    chain.push(matches, "ACCEPT");
}

/// The last rules of a chain: what happens to traffic no rule allowed, logged.
fn push_verdict(chain: &mut ChainBuilder, state: PolicyState, options: &Options) {
    const NEW: &str = "-m conntrack --ctstate NEW";
    match state {
        // Every dropped packet is logged (the flow pipeline counts connections, and samples
        // under load); in the other states only the first packet of a connection.
        PolicyState::Enforced => {
            chain.push("", &nflog_target(LogVerdict::Dropped, 0, options));
            chain.push("", "DROP");
        }
        PolicyState::Test => {
            chain.push(NEW, &nflog_target(LogVerdict::WouldDrop, 0, options));
            chain.push("", "ACCEPT");
        }
        PolicyState::Build => {
            chain.push(NEW, &nflog_target(LogVerdict::Observed, 0, options));
            chain.push("", "ACCEPT");
        }
        // Idle never reaches the renderer (it removes everything); were it to, allow all.
        PolicyState::Idle => chain.push("", "ACCEPT"),
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
    let mut out = Vec::with_capacity(members.len());
    for member in members.iter().filter(|member| family.contains(member)) {
        let network = member.network();
        if network.prefix() == 0 {
            return halves(family);
        }
        out.push(network);
    }
    // Collecting sorts once and builds the tree in bulk: much cheaper than one insert per
    // member for the 100k-member sets the benchmark uses.
    out.into_iter().collect()
}

fn halves(family: Family) -> BTreeSet<IpNet> {
    let (low, high): (IpAddr, IpAddr) = match family {
        Family::V4 => ([0u8, 0, 0, 0].into(), [128u8, 0, 0, 0].into()),
        Family::V6 => (std::net::Ipv6Addr::UNSPECIFIED.into(), std::net::Ipv6Addr::from(1u128 << 127).into()),
    };
    [low, high].into_iter().filter_map(|addr| IpNet::new(addr, 1).ok()).collect()
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
    use ven_proto::{CustomRule, IpSet, PortRange, RuleFamily};

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

    /// A board that routes, ignores `wg0`, keeps SSH reachable and lets DNS out.
    fn board() -> Options {
        Options {
            routes: true,
            ignored_interfaces: vec!["wg0".into()],
            failsafe: vec!["tcp/22".parse().unwrap(), "out:udp/53".parse().unwrap()],
            ..Options::default()
        }
    }

    fn custom(id: u32, family: RuleFamily, chain: CustomChain, rule: &str) -> CustomRule {
        CustomRule { id, family, chain, rule: rule.into() }
    }

    /// Compares with `src/firewall/testdata/<name>.rules` (iptables-restore input per family,
    /// applied to a kernel holding nothing of ours) and `<name>.sets` (the `ipset restore` input
    /// for it). Regenerate after an intended change with
    /// `UPDATE_GOLDEN=1 cargo test -p ven --lib firewall` and review the diff.
    fn golden(name: &str, policy: &Policy, options: &Options) {
        let mut rules = String::new();
        let mut sets = String::new();
        for family in Family::ALL {
            let ruleset = render(family, policy, &safeguards(), options);
            rules.push_str(&format!("# {}\n", family.name()));
            rules.push_str(&iptables::restore_input(&ruleset.chains, &iptables::FilterState::default()));
            sets.push_str(&ipset::plan(family, &ipset::KernelSets::new(), &ruleset.sets, 262_144).render());
        }
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
        golden("enforced", &full_policy(PolicyState::Enforced), &Options::default());
    }

    #[test]
    fn golden_build() {
        golden("build", &full_policy(PolicyState::Build), &Options::default());
    }

    #[test]
    fn golden_test() {
        golden("test", &full_policy(PolicyState::Test), &Options::default());
    }

    #[test]
    fn golden_empty_enforced() {
        let empty = Policy {
            version: 1,
            state: PolicyState::Enforced,
            ip_sets: Vec::new(),
            rules: Vec::new(),
            custom_rules: Vec::new(),
        };
        golden("empty-enforced", &empty, &Options { failsafe: Vec::new(), ..Options::default() });
    }

    #[test]
    fn golden_router_with_custom_rules() {
        let mut policy = full_policy(PolicyState::Enforced);
        policy.custom_rules = vec![
            custom(1, RuleFamily::Both, CustomChain::Input, "-p tcp --dport 9000 -j ACCEPT"),
            custom(2, RuleFamily::V4, CustomChain::Input, "-s 198.18.0.66 -j DROP"),
            custom(
                3,
                RuleFamily::V6,
                CustomChain::Output,
                "-p udp --dport 5353 -j REJECT --reject-with icmp6-port-unreachable",
            ),
            custom(4, RuleFamily::Both, CustomChain::Forward, "-i eth1 -o eth0 -j ACCEPT"),
        ];
        golden("router-custom", &policy, &board());
    }

    #[test]
    fn safeguards_come_before_custom_and_policy_rules_and_the_verdict() {
        let mut policy = full_policy(PolicyState::Enforced);
        policy.custom_rules = vec![custom(1, RuleFamily::Both, CustomChain::Input, "-j DROP")];
        let ruleset = render(Family::V4, &policy, &safeguards(), &board());
        let input = &ruleset.chains[0];
        let position = |needle: &str| input.rules.iter().position(|r| r.contains(needle)).unwrap();
        let custom_jump = position("-j VEN-CUSTOM-IN");
        for safeguard in ["-i lo", "RELATED,ESTABLISHED", "--sport 8443", "-i wg0", "--dport 22 -m conntrack"]
        {
            assert!(position(safeguard) < custom_jump, "{safeguard}");
        }
        assert!(custom_jump < position("--match-set ven-1 src"));
        assert_eq!(
            ruleset.chains.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["VEN-INPUT", "VEN-OUTPUT", "VEN-FORWARD", "VEN-CUSTOM-IN"]
        );
        assert_eq!(ruleset.chains[2].hook.as_deref(), Some("FORWARD"));
        assert_eq!(ruleset.chains[3].hook, None);
    }

    #[test]
    fn management_comes_before_policy_rules_and_verdict() {
        let ruleset =
            render(Family::V4, &full_policy(PolicyState::Enforced), &safeguards(), &Options::default());
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

        let v6 = render(Family::V6, &full_policy(PolicyState::Enforced), &safeguards(), &Options::default());
        assert!(
            v6.chains[1].rules.iter().any(|r| r.contains("-d 2001:db8::1/128 -p tcp -m tcp --dport 8443"))
        );
        assert!(v6.chains[0].rules.iter().any(|r| r.contains("--icmpv6-type 135")), "neighbour discovery");
        assert!(v6.sets.contains_key("ven-1-6") && v6.sets["ven-1-6"].len() == 1);
    }

    #[test]
    fn every_state_logs_what_it_should() {
        let verdicts = |state| {
            let ruleset = render(Family::V4, &full_policy(state), &safeguards(), &Options::default());
            ruleset.chains[0].rules.iter().rev().take(2).rev().cloned().collect::<Vec<_>>()
        };
        let enforced = verdicts(PolicyState::Enforced);
        assert!(enforced[0].contains("-j NFLOG --nflog-prefix \"ven:d:0\" --nflog-group 7 --nflog-size 128"));
        assert!(!enforced[0].contains("--ctstate NEW"), "every dropped packet is logged");
        assert!(enforced[1].ends_with("-j DROP"));
        let test = verdicts(PolicyState::Test);
        assert!(test[0].contains("--ctstate NEW") && test[0].contains("\"ven:w:0\""));
        assert!(test[1].ends_with("-j ACCEPT"));
        let build = verdicts(PolicyState::Build);
        assert!(build[0].contains("\"ven:o:0\"") && build[1].ends_with("-j ACCEPT"));
        let ruleset =
            render(Family::V4, &full_policy(PolicyState::Enforced), &safeguards(), &Options::default());
        let logged = ruleset.chains[0].rules.iter().position(|r| r.contains("\"ven:a:100\"")).unwrap();
        assert!(
            ruleset.chains[0].rules[logged + 1].ends_with("-j ACCEPT"),
            "log, then accept the same matches"
        );
    }

    #[test]
    fn log_prefixes_round_trip_and_reject_garbage() {
        for verdict in [LogVerdict::Allowed, LogVerdict::Observed, LogVerdict::WouldDrop, LogVerdict::Dropped]
        {
            let prefix = log_prefix(verdict, 4_294_967_295);
            assert!(prefix.len() < 64, "NFLOG prefixes hold 63 bytes");
            assert_eq!(parse_log_prefix(prefix.as_bytes()), Some((verdict, 4_294_967_295)));
        }
        assert_eq!(parse_log_prefix(b"ven:d:0\0\0"), Some((LogVerdict::Dropped, 0)));
        for garbage in [
            &b"ven:x:1"[..],
            b"ven:a:",
            b"ven:a:-1",
            b"ven:a:99999999999",
            b"other",
            b"",
            b"ven:a:1 2",
            b"\xff",
        ] {
            assert_eq!(parse_log_prefix(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn hashes_are_stable_and_differ_for_identical_rules() {
        let mut policy = full_policy(PolicyState::Enforced);
        let options = Options::default();
        let first = render(Family::V4, &policy, &safeguards(), &options);
        assert_eq!(first, render(Family::V4, &policy, &safeguards(), &options));
        policy.rules.push(rule(105, Direction::Inbound, Peers::Any, Protocol::Icmp, None));
        let again = render(Family::V4, &policy, &safeguards(), &options);
        let icmp: Vec<&String> =
            again.chains[0].rules.iter().filter(|r| r.contains("-p icmp") && r.ends_with("ACCEPT")).collect();
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
        let v6 = set_members(Family::V6, &[net("2001:2::1/64"), net("198.18.0.2"), net("::/0")]);
        assert_eq!(v6.into_iter().map(|m| m.to_string()).collect::<Vec<_>>(), ["::/1", "8000::/1"]);
    }
}
