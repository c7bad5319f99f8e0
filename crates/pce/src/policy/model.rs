//! The security policy objects as the administrator writes them (Illumio's sec_policy model): IP
//! lists, services and rule sets with scopes and rules. Every object exists as a draft and, once
//! provisioned, as an active copy; both copies share the object's id. Pure data and checks.
//!
//! [`compile`] turns the active objects into the [`CompiledRule`]s the computation reads: IP lists
//! become address lists (exclusions subtracted), services become port ranges.

use super::compute::{ActorSet, CompiledRule, Service};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;
use ven_proto::{IpNet, PortRange, Protocol};

/// Per kind of object: at most this many in the draft (the active copy follows the draft).
pub const MAX_OBJECTS_PER_KIND: usize = 10_000;
/// Ranges per IP list, FQDNs per IP list, ports per service, rules per rule set, scopes per rule
/// set, actors per rule side, services per rule.
pub const MAX_RANGES: usize = 1_000;
pub const MAX_FQDNS: usize = 256;
pub const MAX_SERVICE_PORTS: usize = 64;
pub const MAX_RULES_PER_SET: usize = 1_000;
pub const MAX_SCOPES: usize = 64;
pub const MAX_ACTORS: usize = 64;
/// Longest name or description, in bytes.
pub const MAX_TEXT: usize = 255;

/// One version (draft or active) of every policy object, by id.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyObjects {
    pub ip_lists: BTreeMap<u64, IpList>,
    pub services: BTreeMap<u64, ServiceDef>,
    pub rule_sets: BTreeMap<u64, RuleSet>,
}

/// The kinds of provisionable object, by their name in hrefs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    IpLists,
    Services,
    RuleSets,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::IpLists, Kind::Services, Kind::RuleSets];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::IpLists => "ip_lists",
            Kind::Services => "services",
            Kind::RuleSets => "rule_sets",
        }
    }

    pub fn parse(text: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.as_str() == text)
    }
}

/// A provisionable object: its kind and id.
pub type ObjectRef = (Kind, u64);

impl PolicyObjects {
    /// Whether the object exists in this version.
    pub fn contains(&self, (kind, id): ObjectRef) -> bool {
        match kind {
            Kind::IpLists => self.ip_lists.contains_key(&id),
            Kind::Services => self.services.contains_key(&id),
            Kind::RuleSets => self.rule_sets.contains_key(&id),
        }
    }

    /// The objects that differ between `self` (the draft) and `active`: created, changed or
    /// deleted in the draft.
    pub fn pending(&self, active: &PolicyObjects) -> Vec<ObjectRef> {
        fn differing<T: PartialEq>(
            kind: Kind,
            draft: &BTreeMap<u64, T>,
            active: &BTreeMap<u64, T>,
            out: &mut Vec<ObjectRef>,
        ) {
            let ids = draft.keys().chain(active.keys().filter(|id| !draft.contains_key(id)));
            out.extend(ids.filter(|id| draft.get(id) != active.get(id)).map(|id| (kind, *id)));
        }
        let mut out = Vec::new();
        differing(Kind::IpLists, &self.ip_lists, &active.ip_lists, &mut out);
        differing(Kind::Services, &self.services, &active.services, &mut out);
        differing(Kind::RuleSets, &self.rule_sets, &active.rule_sets, &mut out);
        out.sort();
        out
    }

    /// Copies (or removes) `object` from `draft` into `self`.
    pub fn take_from(&mut self, draft: &PolicyObjects, (kind, id): ObjectRef) {
        fn copy<T: Clone>(from: &BTreeMap<u64, T>, to: &mut BTreeMap<u64, T>, id: u64) {
            match from.get(&id) {
                Some(object) => to.insert(id, object.clone()),
                None => to.remove(&id),
            };
        }
        match kind {
            Kind::IpLists => copy(&draft.ip_lists, &mut self.ip_lists, id),
            Kind::Services => copy(&draft.services, &mut self.services, id),
            Kind::RuleSets => copy(&draft.rule_sets, &mut self.rule_sets, id),
        }
    }

    /// The objects `object` refers to (a rule set's IP lists and services).
    pub fn references(&self, (kind, id): ObjectRef) -> Vec<ObjectRef> {
        let Some(rule_set) = (kind == Kind::RuleSets).then(|| self.rule_sets.get(&id)).flatten() else {
            return Vec::new();
        };
        let mut refs = Vec::new();
        for rule in &rule_set.rules {
            for actor in rule.providers.iter().chain(&rule.consumers) {
                if let Actor::IpList(list) = actor {
                    refs.push((Kind::IpLists, *list));
                }
            }
            for service in &rule.services {
                if let ServiceRef::Service(service) = service {
                    refs.push((Kind::Services, *service));
                }
            }
        }
        refs.sort();
        refs.dedup();
        refs
    }

    /// The rule sets that refer to `object` (an IP list or service).
    pub fn referrers(&self, object: ObjectRef) -> Vec<u64> {
        self.rule_sets
            .keys()
            .filter(|id| self.references((Kind::RuleSets, **id)).contains(&object))
            .copied()
            .collect()
    }

    /// Whether label `id` is used in a scope or a rule.
    pub fn uses_label(&self, id: u64) -> Option<u64> {
        self.rule_sets.values().find_map(|set| {
            let in_scope = set.scopes.iter().flatten().any(|label| *label == id);
            let in_rule = set
                .rules
                .iter()
                .flat_map(|rule| rule.providers.iter().chain(&rule.consumers))
                .any(|actor| *actor == Actor::Label(id));
            (in_scope || in_rule).then_some(set.id)
        })
    }
}

/// One range of an IP list: a single address, a CIDR, or `from`..=`to`; `exclusion` removes it
/// from the list's other ranges.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpRange {
    pub from: IpNet,
    pub to: Option<IpAddr>,
    pub exclusion: bool,
    pub description: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpList {
    pub id: u64,
    pub name: String,
    pub description: String,
    pub ranges: Vec<IpRange>,
    /// Stored and shown; the VEN does not resolve names (yet).
    pub fqdns: Vec<String>,
}

/// One port (range) of a service; `ports: None` is every port of the protocol (or ICMP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    pub protocol: Protocol,
    pub ports: Option<PortRange>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDef {
    pub id: u64,
    pub name: String,
    pub description: String,
    pub ports: Vec<ServicePort>,
}

/// Who a rule side names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Actor {
    /// Every workload (Illumio's `{"actors": "ams"}`).
    AllWorkloads,
    Label(u64),
    Workload(u64),
    IpList(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceRef {
    Service(u64),
    Port(ServicePort),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecRule {
    /// Unique across rule sets; the VEN's rule and set ids derive from it.
    pub id: u64,
    pub enabled: bool,
    pub description: String,
    pub providers: Vec<Actor>,
    pub consumers: Vec<Actor>,
    pub services: Vec<ServiceRef>,
    /// The consumers are not narrowed to the rule set's scope (Illumio's extra-scope rule).
    pub unscoped_consumers: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSet {
    pub id: u64,
    pub name: String,
    pub description: String,
    pub enabled: bool,
    /// Each scope is a list of label ids (keys AND, values OR); `[[]]` is every workload.
    pub scopes: Vec<Vec<u64>>,
    pub rules: Vec<SecRule>,
}

/// The name of the IP list every PCE has (illumio-py's `get_default_ip_list`).
pub const ANY_IP_LIST_NAME: &str = "Any (0.0.0.0/0 and ::/0)";
/// The name of the service every PCE has (illumio-py's `get_default_service`).
pub const ALL_SERVICES_NAME: &str = "All Services";

/// The default IP list and service, with these ids.
pub fn defaults(ip_list_id: u64, service_id: u64) -> (IpList, ServiceDef) {
    let any = |text: &str| IpRange {
        from: text.parse().expect("constant"),
        to: None,
        exclusion: false,
        description: String::new(),
    };
    let ip_list = IpList {
        id: ip_list_id,
        name: ANY_IP_LIST_NAME.to_string(),
        description: String::new(),
        ranges: vec![any("0.0.0.0/0"), any("::/0")],
        fqdns: Vec::new(),
    };
    let service = ServiceDef {
        id: service_id,
        name: ALL_SERVICES_NAME.to_string(),
        description: String::new(),
        ports: vec![ServicePort { protocol: Protocol::Any, ports: None }],
    };
    (ip_list, service)
}

/// The addresses an IP list stands for: its ranges less its exclusions, as CIDRs, IPv4 first.
/// No prefix is shorter than /1: the VEN's hash:net sets cannot hold /0.
pub fn ip_list_nets(list: &IpList) -> Vec<IpNet> {
    let mut out = Vec::new();
    for v4 in [true, false] {
        let bounds = |range: &IpRange| -> Option<(u128, u128)> {
            let (first, last) = net_bounds(&range.from);
            let last = match range.to {
                Some(to) => address_value(to),
                None => last,
            };
            (range.from.is_ipv4() == v4).then_some((first, last.max(first)))
        };
        let included: Vec<(u128, u128)> =
            list.ranges.iter().filter(|r| !r.exclusion).filter_map(bounds).collect();
        let excluded: Vec<(u128, u128)> =
            list.ranges.iter().filter(|r| r.exclusion).filter_map(bounds).collect();
        for (first, last) in subtract(merge(included), &merge(excluded)) {
            out.extend(to_cidrs(first, last, v4));
        }
    }
    out
}

fn address_value(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// First and last address of a network.
fn net_bounds(net: &IpNet) -> (u128, u128) {
    let bits = if net.is_ipv4() { 32 } else { 128 };
    let first = address_value(net.network().addr());
    let host_bits = bits - u32::from(net.prefix());
    let span = if host_bits >= 128 { u128::MAX } else { (1u128 << host_bits) - 1 };
    (first, first | span)
}

/// Sorted, non-overlapping, non-adjacent intervals covering the same addresses.
fn merge(mut intervals: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    intervals.sort_unstable();
    let mut merged: Vec<(u128, u128)> = Vec::with_capacity(intervals.len());
    for (first, last) in intervals {
        match merged.last_mut() {
            Some(previous) if first <= previous.1.saturating_add(1) => previous.1 = previous.1.max(last),
            _ => merged.push((first, last)),
        }
    }
    merged
}

/// `included` less `excluded` (both merged).
fn subtract(included: Vec<(u128, u128)>, excluded: &[(u128, u128)]) -> Vec<(u128, u128)> {
    let mut out = Vec::new();
    for (mut first, last) in included {
        let mut whole = true;
        for &(ex_first, ex_last) in excluded {
            if ex_last < first || ex_first > last {
                continue;
            }
            if ex_first > first {
                out.push((first, ex_first - 1));
            }
            if ex_last >= last {
                whole = false;
                break;
            }
            first = ex_last + 1;
        }
        if whole {
            out.push((first, last));
        }
    }
    out
}

/// The fewest CIDRs covering `first..=last` exactly, none shorter than /1.
fn to_cidrs(mut first: u128, last: u128, v4: bool) -> Vec<IpNet> {
    let bits: u32 = if v4 { 32 } else { 128 };
    let mut out = Vec::new();
    loop {
        // The largest block starting at `first`: aligned there, ending at or before `last`.
        let mut size_bits = if first == 0 { bits } else { first.trailing_zeros().min(bits) };
        while size_bits > 0 && (size_bits >= 128 || first + ((1u128 << size_bits) - 1) > last) {
            size_bits -= 1;
        }
        let size_bits = size_bits.min(bits - 1);
        let addr = if v4 { IpAddr::V4((first as u32).into()) } else { IpAddr::V6(first.into()) };
        out.push(IpNet::new(addr, (bits - size_bits) as u8).expect("prefix within the family"));
        let block_last = first + ((1u128 << size_bits) - 1);
        if block_last >= last {
            return out;
        }
        first = block_last + 1;
    }
}

/// The active rules in the computation's terms: enabled rule sets' enabled rules, in rule id
/// order, with IP lists resolved to addresses and services to ports. References to objects the
/// active version lacks resolve to nothing (provisioning refuses to create them).
pub fn compile(active: &PolicyObjects) -> Vec<CompiledRule> {
    let mut compiled = Vec::new();
    for set in active.rule_sets.values().filter(|set| set.enabled) {
        for rule in set.rules.iter().filter(|rule| rule.enabled) {
            let side = |actors: &[Actor]| {
                let mut side = ActorSet::default();
                for actor in actors {
                    match actor {
                        Actor::AllWorkloads => side.all_workloads = true,
                        Actor::Label(id) => side.labels.push(*id),
                        Actor::Workload(id) => side.workloads.push(*id),
                        Actor::IpList(id) => {
                            side.nets.extend(active.ip_lists.get(id).map(ip_list_nets).unwrap_or_default())
                        }
                    }
                }
                side.nets.sort();
                side.nets.dedup();
                side
            };
            let mut services = Vec::new();
            for service in &rule.services {
                let ports: Vec<ServicePort> = match service {
                    ServiceRef::Port(port) => vec![*port],
                    ServiceRef::Service(id) => {
                        active.services.get(id).map(|s| s.ports.clone()).unwrap_or_default()
                    }
                };
                services.extend(ports.into_iter().map(|port| Service {
                    protocol: port.protocol,
                    ports: port.ports.unwrap_or(PortRange { first: 1, last: 65535 }),
                }));
            }
            compiled.push(CompiledRule {
                id: rule.id,
                scopes: set.scopes.clone(),
                unscoped_consumers: rule.unscoped_consumers,
                providers: side(&rule.providers),
                consumers: side(&rule.consumers),
                services,
            });
        }
    }
    compiled.sort_by_key(|rule| rule.id);
    compiled
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(from: &str, to: Option<&str>, exclusion: bool) -> IpRange {
        IpRange {
            from: from.parse().unwrap(),
            to: to.map(|t| t.parse().unwrap()),
            exclusion,
            description: String::new(),
        }
    }

    fn list(ranges: Vec<IpRange>) -> IpList {
        IpList { id: 1, name: "l".into(), description: String::new(), ranges, fqdns: Vec::new() }
    }

    fn nets(list: &IpList) -> Vec<String> {
        ip_list_nets(list).iter().map(|n| format!("{}/{}", n.addr(), n.prefix())).collect()
    }

    #[test]
    fn ranges_become_the_fewest_cidrs() {
        let l = list(vec![range("198.18.0.1", Some("198.18.0.6"), false)]);
        assert_eq!(nets(&l), ["198.18.0.1/32", "198.18.0.2/31", "198.18.0.4/31", "198.18.0.6/32"]);
        let l = list(vec![range("198.18.0.0/24", None, false), range("198.18.1.0/24", None, false)]);
        assert_eq!(nets(&l), ["198.18.0.0/23"]);
    }

    #[test]
    fn exclusions_are_subtracted() {
        let l = list(vec![range("198.18.0.0/24", None, false), range("198.18.0.128/25", None, true)]);
        assert_eq!(nets(&l), ["198.18.0.0/25"]);
        let l = list(vec![range("198.18.0.0/30", None, false), range("198.18.0.1", None, true)]);
        assert_eq!(nets(&l), ["198.18.0.0/32", "198.18.0.2/31"]);
        let l = list(vec![range("198.18.0.0/30", None, false), range("198.18.0.0/16", None, true)]);
        assert!(nets(&l).is_empty());
    }

    #[test]
    fn everything_is_split_in_halves_for_hash_net() {
        let (any, _) = defaults(1, 1);
        assert_eq!(nets(&any), ["0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1"]);
    }

    #[test]
    fn pending_changes_and_provisioning_copy_objects() {
        let (ip_list, service) = defaults(1, 2);
        let mut draft = PolicyObjects::default();
        draft.ip_lists.insert(1, ip_list);
        draft.services.insert(2, service);
        let mut active = PolicyObjects::default();
        assert_eq!(draft.pending(&active), vec![(Kind::IpLists, 1), (Kind::Services, 2)]);
        active.take_from(&draft, (Kind::IpLists, 1));
        assert_eq!(draft.pending(&active), vec![(Kind::Services, 2)]);
        draft.ip_lists.remove(&1);
        assert_eq!(draft.pending(&active), vec![(Kind::IpLists, 1), (Kind::Services, 2)]);
        active.take_from(&draft, (Kind::IpLists, 1));
        assert!(!active.contains((Kind::IpLists, 1)));
    }
}
