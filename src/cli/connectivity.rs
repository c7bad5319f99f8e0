//! `ven connectivity-test [PEER[:PORT[/PROTO]]]...`: the spec's connectivity checking tool, run on
//! the workload. First the PCE (both ports, the TLS handshake verified by the pinned CA, as
//! `check-env` does), then each peer: a TCP connect with a short time limit (UDP cannot be
//! verified without an answer, so it is only judged), and which rule of the policy this agent
//! applied would allow or drop the connection outbound from this host. One line per check with
//! ok, warn or fail and a hint; the exit status is non-zero when one fails.
//!
//! The judgement mirrors `VEN-OUTPUT` as `firewall::render` writes it: loopback, the management
//! channel, fail-safe outbound services, (custom rules, which are the operator's iptables syntax
//! and only named), the policy's outbound rules in order, then the state's verdict.

use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use ven_proto::{CustomChain, Direction, Peers, Policy, PolicyState, Protocol, RuleFamily};

use super::check_env::{Check, Verdict};
use crate::config::{Config, ServiceDirection};
use crate::state::{self, DataDir, Identity, RecordKind};

/// How long a TCP connect to a peer may take.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// Most peers one run tests (each can cost [`PEER_TIMEOUT`]).
pub const MAX_PEERS: usize = 64;
/// Longest PEER argument (a DNS name is at most 253 bytes).
const MAX_TARGET_BYTES: usize = 300;

/// One `PEER[:PORT[/PROTO]]` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub text: String,
    pub host: String,
    pub port: Option<u16>,
    /// Tcp or Udp; with no port, Icmp (only judged).
    pub protocol: Protocol,
}

impl Target {
    /// Parses `198.18.0.3`, `db.example:5432`, `198.18.0.3:53/udp`, `[2001:db8::1]:443`,
    /// `2001:db8::1`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{text:?}: {why} (expected PEER[:PORT[/tcp|/udp]])");
        if text.is_empty() || text.len() > MAX_TARGET_BYTES || text.chars().any(char::is_whitespace) {
            return Err(bad("not a peer"));
        }
        let (host, rest) = if let Some(bracketed) = text.strip_prefix('[') {
            let (host, rest) = bracketed.split_once(']').ok_or_else(|| bad("no closing ]"))?;
            (host, rest.strip_prefix(':'))
        } else if text.matches(':').count() > 1 {
            (text, None)
        } else {
            match text.split_once(':') {
                Some((host, rest)) => (host, Some(rest)),
                None => (text, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no peer"));
        }
        let (port, protocol) = match rest {
            None => (None, Protocol::Icmp),
            Some(rest) => {
                let (port, protocol) = rest.split_once('/').unwrap_or((rest, "tcp"));
                let port: u16 = port.parse().map_err(|_| bad("the port is not a number from 1 to 65535"))?;
                if port == 0 {
                    return Err(bad("the port is not a number from 1 to 65535"));
                }
                let protocol = match protocol {
                    "tcp" => Protocol::Tcp,
                    "udp" => Protocol::Udp,
                    _ => return Err(bad("the protocol is tcp or udp")),
                };
                (Some(port), protocol)
            }
        };
        Ok(Self { text: text.to_string(), host: host.to_string(), port, protocol })
    }
}

/// What the applied policy does with a connection from this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judgement {
    /// The firewall lets it out (in test and build states, also what no rule allows).
    pub passes: bool,
    pub why: String,
}

/// The firewall's outbound side as this agent applied it.
pub struct OutboundModel {
    /// `None`: nothing of ven's is in the firewall (not activated, no policy yet, suspended).
    policy: Option<Policy>,
    why_none: &'static str,
    management: Vec<SocketAddr>,
    failsafe: Vec<(Protocol, u16)>,
    ipv6: bool,
}

impl OutboundModel {
    pub fn load(data: &DataDir, config: &Config, identity: Option<&Identity>) -> Self {
        let (policy, why_none) = if data.suspended_path().exists() {
            (None, "suspended: nothing of ven's is in the firewall, the host's own rules decide")
        } else if identity.is_none() {
            (None, "not activated: the host's own rules decide")
        } else {
            match state::read_record::<Policy>(&data.policy_path(), RecordKind::Policy) {
                Ok(Some(policy)) => (Some(policy), ""),
                Ok(None) => (None, "no policy applied yet: the host's own rules decide"),
                Err(_) => (None, "the applied policy record is unreadable (see `ven status`)"),
            }
        };
        Self {
            policy,
            why_none,
            management: identity
                .map(|i| crate::agent::lifecycle::safeguards(i).management)
                .unwrap_or_default(),
            failsafe: config
                .failsafe_services
                .iter()
                .filter(|s| s.direction == ServiceDirection::Outbound)
                .map(|s| (s.protocol, s.port))
                .collect(),
            ipv6: config.ipv6,
        }
    }

    /// What `VEN-OUTPUT` does with a new connection to `peer`:`port` over `protocol` (no port:
    /// ICMP).
    pub fn judge(&self, peer: IpAddr, port: Option<u16>, protocol: Protocol) -> Judgement {
        let pass = |why: String| Judgement { passes: true, why };
        let Some(policy) = &self.policy else { return pass(self.why_none.to_string()) };
        if policy.state == PolicyState::Idle {
            return pass("idle: ven does not touch the firewall".into());
        }
        if peer.is_loopback() {
            return pass("allowed: loopback is always allowed".into());
        }
        if peer.is_ipv6() && !self.ipv6 {
            return pass("allowed: IPv6 is not policed on this host (ipv6 = false)".into());
        }
        if let Some(port) = port {
            if protocol == Protocol::Tcp && self.management.contains(&SocketAddr::new(peer, port)) {
                return pass("allowed: the management channel to the PCE".into());
            }
            if self.failsafe.contains(&(protocol, port)) {
                return pass(format!("allowed: fail-safe service out:{}/{port}", protocol.as_str()));
            }
        }
        let family = if peer.is_ipv4() { RuleFamily::V4 } else { RuleFamily::V6 };
        let custom = policy
            .custom_rules
            .iter()
            .filter(|c| {
                c.chain == CustomChain::Output && (c.family == family || c.family == RuleFamily::Both)
            })
            .count();
        let custom_note = if custom > 0 {
            format!(" ({custom} custom output rules come first and may decide otherwise)")
        } else {
            String::new()
        };
        let matching = policy.rules.iter().find(|rule| {
            rule.direction == Direction::Outbound
                && (rule.protocol == Protocol::Any || rule.protocol == protocol)
                && match (rule.ports, port) {
                    (None, _) => true,
                    (Some(range), Some(port)) => range.first <= port && port <= range.last,
                    (Some(_), None) => false,
                }
                && match rule.peers {
                    Peers::Any => true,
                    Peers::Set(id) => policy
                        .ip_sets
                        .iter()
                        .find(|set| set.id == id)
                        .is_some_and(|set| set.members.iter().any(|net| contains(net, peer))),
                }
        });
        if let Some(rule) = matching {
            let ports = match rule.ports {
                None => "all ports".to_string(),
                Some(r) if r.first == r.last => format!("port {}", r.first),
                Some(r) => format!("ports {}-{}", r.first, r.last),
            };
            let peers = match rule.peers {
                Peers::Any => "any peer".to_string(),
                Peers::Set(id) => format!("set {id}"),
            };
            return pass(format!(
                "allowed by rule {} (outbound {} {ports} to {peers}){custom_note}",
                rule.id,
                rule.protocol.as_str()
            ));
        }
        match policy.state {
            PolicyState::Enforced => Judgement {
                passes: false,
                why: format!(
                    "dropped by the default deny (enforced, version {}: no rule allows it){custom_note}",
                    policy.version
                ),
            },
            PolicyState::Test => pass(format!(
                "no rule allows it: test state lets it through and logs it as would-be dropped{custom_note}"
            )),
            PolicyState::Build | PolicyState::Idle => {
                pass(format!("no rule allows it: build state lets it through (observed){custom_note}"))
            }
        }
    }
}

/// Whether `net` holds `addr`.
fn contains(net: &ven_proto::IpNet, addr: IpAddr) -> bool {
    net.is_ipv4() == addr.is_ipv4()
        && ven_proto::IpNet::new(addr, net.prefix()).is_ok_and(|host| host.network() == net.network())
}

/// The PCE's checks, then one per target.
pub fn run(data: &DataDir, config: &Config, targets: &[Target]) -> Vec<Check> {
    let identity = state::read_record::<Identity>(&data.identity_path(), RecordKind::Identity).ok().flatten();
    let mut checks = match &identity {
        Some(identity) => super::check_env::pce_checks(identity),
        None => vec![Check {
            verdict: Verdict::Warn,
            name: "PCE".into(),
            detail: "not activated: no PCE to test".into(),
            hint: "ven activate --management-server ...".into(),
        }],
    };
    let model = OutboundModel::load(data, config, identity.as_ref());
    for target in targets.iter().take(MAX_PEERS) {
        checks.push(check_target(&model, target));
    }
    if targets.len() > MAX_PEERS {
        checks.push(Check {
            verdict: Verdict::Warn,
            name: "peers".into(),
            detail: format!("only the first {MAX_PEERS} of {} peers were tested", targets.len()),
            hint: "test the rest in another run".into(),
        });
    }
    checks
}

fn check_target(model: &OutboundModel, target: &Target) -> Check {
    let name = target.text.clone();
    let fail = |detail: String, hint: &str| Check {
        verdict: Verdict::Fail,
        name: name.clone(),
        detail,
        hint: hint.into(),
    };
    let addr = match (target.host.as_str(), target.port.unwrap_or(0)).to_socket_addrs() {
        Ok(mut addrs) => match addrs.next() {
            Some(addr) => addr,
            None => {
                return fail(format!("{}: no address", target.host), "check the name, or give an address");
            }
        },
        Err(e) => return fail(format!("{}: cannot resolve: {e}", target.host), "check the name and DNS"),
    };
    let judgement = model.judge(addr.ip(), target.port, target.protocol);
    let policy = format!("policy: {}", judgement.why);
    let (verdict, reach, hint) = match (target.port, target.protocol) {
        (None, _) => (
            Verdict::Warn,
            format!("{}: reachability not tested (no port given)", addr.ip()),
            "give PEER:PORT to test a TCP connection",
        ),
        (Some(_), Protocol::Udp) => (
            Verdict::Warn,
            format!("{addr}/udp: cannot be verified without an answer"),
            "check the service's own answer (e.g. dig for DNS)",
        ),
        (Some(_), _) => {
            let started = Instant::now();
            match TcpStream::connect_timeout(&addr, PEER_TIMEOUT) {
                Ok(_) => (
                    Verdict::Ok,
                    format!("{addr}/tcp: connected in {} ms", started.elapsed().as_millis()),
                    "",
                ),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => (
                    Verdict::Fail,
                    format!("{addr}/tcp: refused (the peer answered; nothing listens there)"),
                    "start the service on the peer, or check the port",
                ),
                Err(e) => {
                    let hint = if judgement.passes {
                        "this host's policy lets it out: check the route, the peer's inbound policy and its firewall"
                    } else {
                        "this host's policy drops it: a rule on the PCE must allow it outbound from here"
                    };
                    let what = if e.kind() == std::io::ErrorKind::TimedOut {
                        format!("no answer within {} s", PEER_TIMEOUT.as_secs())
                    } else {
                        e.to_string()
                    };
                    (Verdict::Fail, format!("{addr}/tcp: {what}"), hint)
                }
            }
        }
    };
    Check { verdict, name, detail: format!("{reach}; {policy}"), hint: hint.into() }
}

pub fn render(checks: &[Check]) -> String {
    super::check_env::render(checks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ven_proto::{IpNet, IpSet, PortRange, Rule};

    #[test]
    fn targets_parse_with_and_without_port_and_protocol() {
        let t = Target::parse("198.18.0.3:5432").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.protocol), ("198.18.0.3", Some(5432), Protocol::Tcp));
        let t = Target::parse("dns.example:53/udp").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.protocol), ("dns.example", Some(53), Protocol::Udp));
        let t = Target::parse("[2001:2::3]:22").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("2001:2::3", Some(22)));
        assert_eq!(Target::parse("2001:2::3").unwrap().port, None);
        assert_eq!(Target::parse("db").unwrap().protocol, Protocol::Icmp);
        for bad in ["", "db:0", "db:70000", "db:22/sctp", ":22", "[::1", "a b"] {
            assert!(Target::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    fn model(state: PolicyState) -> OutboundModel {
        let net = |text: &str| {
            let (addr, prefix) = text.split_once('/').unwrap();
            IpNet::new(addr.parse().unwrap(), prefix.parse().unwrap()).unwrap()
        };
        let policy = Policy {
            version: 7,
            state,
            ip_sets: vec![IpSet { id: 2, members: vec![net("198.18.0.0/30")] }],
            rules: vec![
                Rule {
                    id: 11,
                    direction: Direction::Inbound,
                    peers: Peers::Any,
                    protocol: Protocol::Tcp,
                    ports: Some(PortRange { first: 22, last: 22 }),
                },
                Rule {
                    id: 12,
                    direction: Direction::Outbound,
                    peers: Peers::Set(2),
                    protocol: Protocol::Tcp,
                    ports: Some(PortRange { first: 5432, last: 5432 }),
                },
            ],
            custom_rules: Vec::new(),
        };
        OutboundModel {
            policy: Some(policy),
            why_none: "",
            management: vec!["198.18.0.1:8443".parse().unwrap()],
            failsafe: vec![(Protocol::Udp, 53)],
            ipv6: true,
        }
    }

    #[test]
    fn the_judgement_names_the_rule_or_the_default() {
        let enforced = model(PolicyState::Enforced);
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let allowed = enforced.judge(ip("198.18.0.3"), Some(5432), Protocol::Tcp);
        assert!(allowed.passes && allowed.why.starts_with("allowed by rule 12"), "{allowed:?}");
        let dropped = enforced.judge(ip("198.18.0.3"), Some(22), Protocol::Tcp);
        assert!(
            !dropped.passes && dropped.why.contains("default deny"),
            "inbound rules do not count: {dropped:?}"
        );
        let outside = enforced.judge(ip("198.18.0.9"), Some(5432), Protocol::Tcp);
        assert!(!outside.passes, "not in the set: {outside:?}");
        assert!(enforced.judge(ip("198.18.0.1"), Some(8443), Protocol::Tcp).why.contains("management"));
        assert!(enforced.judge(ip("192.0.2.1"), Some(53), Protocol::Udp).why.contains("fail-safe"));
        assert!(enforced.judge(ip("127.0.0.1"), Some(1), Protocol::Tcp).passes);
        let test = model(PolicyState::Test).judge(ip("198.18.0.3"), Some(22), Protocol::Tcp);
        assert!(test.passes && test.why.contains("would-be dropped"), "{test:?}");
        let none = OutboundModel { policy: None, why_none: "not activated", ..model(PolicyState::Enforced) };
        assert!(none.judge(ip("198.18.0.3"), Some(22), Protocol::Tcp).passes);
    }
}
