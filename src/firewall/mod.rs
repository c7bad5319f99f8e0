//! PlatformHandler: programs the host's policy into the kernel with iptables and ipset.
//!
//! Mechanism: `render` turns a [`Policy`] into iptables-restore text for table `filter` and the
//! desired contents of our sets (pure, golden-tested); [`Firewall::apply`] reads the kernel's state
//! once (`iptables-save -t filter`, `ipset save`), changes the sets by delta in one `ipset restore`
//! session, replaces our chains in one `iptables-restore --noflush` (skipped when the kernel
//! already holds them rule for rule), then destroys the sets no longer used. Every kernel call goes
//! through the narrow `kernel::Kernel` seam.
//!
//! Guarantees:
//! - only our objects are touched: chains `VEN-*`, sets `ven-*`, and one jump tagged `ven:jump`
//!   at position 1 of INPUT and OUTPUT; foreign chains, rules and sets are never changed;
//! - loopback, established connections and the management channel to the PCE are allowed before
//!   any policy rule or default drop, whatever the policy says;
//! - an apply is all or nothing: when validation, ipset or iptables-restore fails, the previous
//!   ruleset stays in force and set changes already made are undone (between the set delta and
//!   the iptables-restore, for milliseconds, the old rules see the new set members);
//! - sets change by delta, never flush-then-add, so a set is never briefly empty.
//!
//! IPv4 only in this milestone; `Family` is where ip6tables and `family inet6` sets slot in.

mod ipset;
mod iptables;
mod kernel;
mod render;
mod validate;

#[cfg(test)]
mod fake;

use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Mutex;

use ven_proto::{IpNet, Policy, PolicyState};

use kernel::{Kernel, SystemKernel};
pub use validate::{MAX_SET_MEMBERS, PolicyError, validate};

/// Where the kernel tools are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirewallConfig {
    pub iptables_restore: PathBuf,
    pub iptables_save: PathBuf,
    pub ipset: PathBuf,
}

impl Default for FirewallConfig {
    /// The tools as found in `PATH` (the iptables backend is whatever `iptables-restore` is).
    fn default() -> Self {
        Self {
            iptables_restore: PathBuf::from("iptables-restore"),
            iptables_save: PathBuf::from("iptables-save"),
            ipset: PathBuf::from("ipset"),
        }
    }
}

/// What stays reachable whatever the policy says (never lock the operator out).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Safeguards {
    /// PCE API and event service endpoints: outbound TCP to them is always allowed.
    pub management: Vec<std::net::SocketAddr>,
}

/// What an apply wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplySummary {
    /// Rules in our chains (fixed safeguards, policy rules and final verdicts), all families.
    pub rules: usize,
    /// Sets the policy asked for (each `ven-<id>`).
    pub sets: usize,
    pub set_members_added: usize,
    /// Members deleted from sets that stay, plus the members of sets destroyed.
    pub set_members_removed: usize,
}

/// Address family of one iptables instance and its sets.
///
/// IPv6 slots in as a second variant: `ip6tables-restore` paths in [`FirewallConfig`], sets of
/// `family inet6` under names of their own, and `icmpv6` for [`ven_proto::Protocol::Icmp`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Family {
    V4,
}

impl Family {
    pub(crate) fn contains(self, net: &IpNet) -> bool {
        match self {
            Self::V4 => net.is_ipv4(),
        }
    }

    /// Name of the kernel set holding set `id` of the policy.
    // INVARIANT: at most 31 characters (ipset's limit): "ven-" + 10 digits of a u32.
    pub(crate) fn set_name(self, id: u32) -> String {
        match self {
            Self::V4 => format!("{}{id}", ipset::SET_PREFIX),
        }
    }

    /// The `family` argument of `ipset create`.
    pub(crate) fn ipset_family(self) -> &'static str {
        match self {
            Self::V4 => "inet",
        }
    }

    pub(crate) fn host_prefix(self) -> u8 {
        match self {
            Self::V4 => 32,
        }
    }

    /// The `-p` value for ICMP.
    pub(crate) fn icmp(self) -> &'static str {
        match self {
            Self::V4 => "icmp",
        }
    }
}

/// Why applying or removing the firewall failed. Unless noted, the kernel is as it was before.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("invalid policy: {0}")]
    Policy(#[from] PolicyError),
    #[error("cannot run {}: {cause}", program.display())]
    Spawn { program: PathBuf, cause: std::io::Error },
    #[error("`{command}` failed ({status}): {stderr}")]
    Save { command: String, status: ExitStatus, stderr: String },
    #[error("unexpected output of `{command}` at line {line}: {text:?}")]
    SaveOutput { command: String, line: usize, text: String },
    #[error("{} rejected table {table} ({status}): {stderr}\n{input_excerpt}", program.display())]
    Restore {
        program: PathBuf,
        table: &'static str,
        status: ExitStatus,
        stderr: String,
        input_excerpt: String,
    },
    #[error("ipset restore failed ({status}): {stderr}\n{input_excerpt}")]
    IpsetRestore { status: ExitStatus, stderr: String, input_excerpt: String },
    #[error(
        "set {set} exists as {found:?}, not as hash:net family {family}; remove it to let ven recreate it"
    )]
    SetType { set: String, found: String, family: &'static str },
    /// The apply failed and putting the sets back failed too: the sets may differ from before
    /// (the ruleset itself is unchanged).
    #[error("{cause}; restoring the previous set contents also failed: {rollback}")]
    Rollback { cause: Box<FirewallError>, rollback: Box<FirewallError> },
}

/// The PlatformHandler: applies policies and removes everything it owns.
///
/// Calls are serialised: one apply or remove at a time per `Firewall`.
pub struct Firewall {
    kernel: Box<dyn Kernel>,
    busy: Mutex<()>,
}

impl Firewall {
    pub fn new(config: FirewallConfig) -> Self {
        Self::with_kernel(Box::new(SystemKernel::new(config)))
    }

    pub(crate) fn with_kernel(kernel: Box<dyn Kernel>) -> Self {
        Self { kernel, busy: Mutex::new(()) }
    }

    /// Validates, renders and applies the policy. Idle state = remove everything we own.
    /// On error the previous ruleset (and set contents) stays fully in force.
    pub fn apply(&self, policy: &Policy, safeguards: &Safeguards) -> Result<ApplySummary, FirewallError> {
        validate(policy)?;
        let _busy = self.busy.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if policy.state == PolicyState::Idle {
            let removed = self.remove_locked()?;
            return Ok(ApplySummary { set_members_removed: removed, ..ApplySummary::default() });
        }
        self.apply_family(Family::V4, policy, safeguards)
    }

    /// Removes every chain, jump and set we own (deactivate with --firewall open); idempotent.
    pub fn remove(&self) -> Result<(), FirewallError> {
        let _busy = self.busy.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.remove_locked().map(|_| ())
    }

    fn apply_family(
        &self,
        family: Family,
        policy: &Policy,
        safeguards: &Safeguards,
    ) -> Result<ApplySummary, FirewallError> {
        let desired = render::render(family, policy, safeguards);
        let filter = iptables::parse_save(&self.kernel.save_filter(family)?)?;
        let before = ipset::parse_save(&self.kernel.ipset_save()?)?;
        for name in desired.sets.keys() {
            if let Some(existing) = before.get(name) {
                if !ipset::compatible(&existing.header, family) {
                    return Err(FirewallError::SetType {
                        set: name.clone(),
                        found: existing.header.clone(),
                        family: family.ipset_family(),
                    });
                }
            }
        }

        let mut update = ipset::plan(family, &before, &desired.sets);
        // Sets no longer wanted may still be referenced by the old chains: they go last.
        let stale = update.take_destroy();
        let mut summary = ApplySummary {
            rules: desired.rule_count(),
            sets: desired.sets.len(),
            set_members_added: update.added(),
            set_members_removed: update.removed() + stale.removed(),
        };
        if !update.is_empty() {
            if let Err(cause) = self.kernel.ipset_restore(&update.render()) {
                // ipset restore stops at the first bad line, after applying the ones before it.
                return Err(self.restore_sets(family, &before, &desired.sets, cause));
            }
        }

        if !iptables::up_to_date(&desired.chains, &filter) {
            let input = iptables::restore_input(&desired.chains, &filter);
            if let Err(cause) = self.kernel.restore_filter(family, &input) {
                // iptables-restore is atomic per table: the old chains are intact; put the sets back.
                return Err(self.restore_sets(family, &before, &desired.sets, cause));
            }
        }

        if !stale.is_empty() {
            // The policy is in force; a set we cannot destroy (a foreign rule refers to it) only
            // costs memory, and the next apply tries again.
            if let Err(e) = self.kernel.ipset_restore(&stale.render()) {
                log::warn!("firewall applied, but destroying unused sets failed: {e}");
                summary.set_members_removed -= stale.removed();
            }
        }
        Ok(summary)
    }

    /// Puts the contents of every set this apply touched back as they were in `before`, and
    /// destroys the sets it created. Returns the error to report for the failed apply.
    fn restore_sets(
        &self,
        family: Family,
        before: &ipset::KernelSets,
        desired: &render::DesiredSets,
        cause: FirewallError,
    ) -> FirewallError {
        let result = self.kernel.ipset_save().and_then(|text| ipset::parse_save(&text)).and_then(|now| {
            let touched = now
                .into_iter()
                .filter(|(name, _)| before.contains_key(name) || desired.contains_key(name))
                .collect();
            let target = before.iter().map(|(name, set)| (name.clone(), set.members.clone())).collect();
            let back = ipset::plan(family, &touched, &target);
            if back.is_empty() { Ok(()) } else { self.kernel.ipset_restore(&back.render()) }
        });
        match result {
            Ok(()) => cause,
            Err(rollback) => FirewallError::Rollback { cause: Box::new(cause), rollback: Box::new(rollback) },
        }
    }

    /// Removes our jumps and chains in one iptables-restore, then destroys our sets.
    /// Returns how many set members went with the sets.
    fn remove_locked(&self) -> Result<usize, FirewallError> {
        let family = Family::V4;
        let filter = iptables::parse_save(&self.kernel.save_filter(family)?)?;
        if let Some(input) = iptables::removal_input(&filter) {
            self.kernel.restore_filter(family, &input)?;
        }
        let sets = ipset::parse_save(&self.kernel.ipset_save()?)?;
        let teardown = ipset::plan(family, &sets, &render::DesiredSets::new());
        if !teardown.is_empty() {
            self.kernel.ipset_restore(&teardown.render())?;
        }
        Ok(teardown.removed())
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeKernel;
    use super::*;
    use ven_proto::{Direction, IpSet, Peers, PortRange, Protocol, Rule};

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    fn policy(state: PolicyState, members: &[&str]) -> Policy {
        Policy {
            version: 1,
            state,
            ip_sets: vec![IpSet { id: 1, members: members.iter().map(|m| net(m)).collect() }],
            rules: vec![Rule {
                id: 10,
                direction: Direction::Inbound,
                peers: Peers::Set(1),
                protocol: Protocol::Tcp,
                ports: Some(PortRange { first: 22, last: 22 }),
            }],
            custom_rules: Vec::new(),
        }
    }

    fn outbound_rule(id: u32, set: u32) -> Rule {
        Rule {
            id,
            direction: Direction::Outbound,
            peers: Peers::Set(set),
            protocol: Protocol::Any,
            ports: None,
        }
    }

    fn safeguards() -> Safeguards {
        Safeguards { management: vec!["198.18.0.1:8443".parse().unwrap()] }
    }

    fn firewall(fake: &FakeKernel) -> Firewall {
        Firewall::with_kernel(Box::new(fake.clone()))
    }

    #[test]
    fn apply_creates_sets_then_chains_and_counts_members() {
        let fake = FakeKernel::default();
        let summary = firewall(&fake)
            .apply(&policy(PolicyState::Enforced, &["198.18.0.2", "198.18.1.0/24"]), &safeguards())
            .unwrap();
        assert_eq!(summary, ApplySummary { rules: 9, sets: 1, set_members_added: 2, set_members_removed: 0 });
        assert_eq!(fake.set_members("ven-1"), Some(vec!["198.18.0.2".into(), "198.18.1.0/24".into()]));
        let calls = fake.calls();
        assert_eq!(
            calls.iter().map(|c| c.0).collect::<Vec<_>>(),
            ["save_filter", "ipset_save", "ipset_restore", "restore_filter"]
        );
        assert!(calls[3].1.contains("-I INPUT 1 -m comment --comment \"ven:jump\" -j VEN-INPUT"));
    }

    #[test]
    fn second_apply_changes_members_by_delta_and_destroys_unused_sets_last() {
        let fake = FakeKernel::default();
        let fw = firewall(&fake);
        let mut first = policy(PolicyState::Enforced, &["198.18.0.2", "198.18.0.3"]);
        first.ip_sets.push(IpSet { id: 2, members: vec![net("198.18.9.9")] });
        first.rules.push(outbound_rule(11, 2));
        fw.apply(&first, &safeguards()).unwrap();
        fake.clear_calls();

        let summary =
            fw.apply(&policy(PolicyState::Enforced, &["198.18.0.3", "198.18.0.4"]), &safeguards()).unwrap();
        assert_eq!(summary.set_members_added, 1);
        assert_eq!(summary.set_members_removed, 2, "one deleted from ven-1, one with ven-2");
        let calls = fake.calls();
        assert_eq!(calls[2], ("ipset_restore", "add ven-1 198.18.0.4\ndel ven-1 198.18.0.2\n".into()));
        assert_eq!(calls[3].0, "restore_filter");
        assert_eq!(calls[4], ("ipset_restore", "destroy ven-2\n".into()));
        assert!(!calls[2].1.contains("flush"), "never flush-then-add");
    }

    #[test]
    fn applying_the_same_policy_again_writes_nothing() {
        let fake = FakeKernel::default();
        let fw = firewall(&fake);
        let same = policy(PolicyState::Enforced, &["198.18.0.2"]);
        fw.apply(&same, &safeguards()).unwrap();
        fake.clear_calls();
        let summary = fw.apply(&same, &safeguards()).unwrap();
        assert_eq!((summary.set_members_added, summary.set_members_removed), (0, 0));
        assert_eq!(fake.calls().iter().map(|c| c.0).collect::<Vec<_>>(), ["save_filter", "ipset_save"]);
    }

    #[test]
    fn failed_restore_puts_sets_back_and_destroys_created_ones() {
        let fake = FakeKernel::default();
        let fw = firewall(&fake);
        fw.apply(&policy(PolicyState::Enforced, &["198.18.0.2"]), &safeguards()).unwrap();
        let sets_before = fake.ipset_text();

        let mut next = policy(PolicyState::Enforced, &["198.18.0.3"]);
        next.ip_sets.push(IpSet { id: 7, members: vec![net("198.18.7.7")] });
        next.rules.push(outbound_rule(11, 7));
        fake.fail_next_filter_restore("line 4 failed");
        let err = fw.apply(&next, &safeguards()).unwrap_err();
        match &err {
            FirewallError::Restore { table, input_excerpt, .. } => {
                assert_eq!(*table, "filter");
                assert!(input_excerpt.contains(">    4: "), "{input_excerpt}");
            }
            other => panic!("unexpected error {other}"),
        }
        assert_eq!(fake.ipset_text(), sets_before);
    }

    #[test]
    fn failed_ipset_session_is_undone() {
        let fake = FakeKernel::default();
        let fw = firewall(&fake);
        fw.apply(&policy(PolicyState::Enforced, &["198.18.0.2"]), &safeguards()).unwrap();
        let sets_before = fake.ipset_text();
        fake.fail_ipset_restore_after_lines(1);
        let err = fw.apply(&policy(PolicyState::Enforced, &["198.18.0.3", "198.18.0.4"]), &safeguards());
        assert!(matches!(err, Err(FirewallError::IpsetRestore { .. })), "{err:?}");
        assert_eq!(fake.ipset_text(), sets_before);
        assert!(!fake.calls().iter().any(|c| c.0 == "restore_filter" && c.1.contains("198.18.0.3")));
    }

    #[test]
    fn jump_goes_back_to_rule_one_and_foreign_rules_stay() {
        let fake = FakeKernel::default();
        let fw = firewall(&fake);
        fw.apply(&policy(PolicyState::Enforced, &[]), &safeguards()).unwrap();
        Kernel::restore_filter(&fake, Family::V4, "*filter\n:DOCKER-LIKE - [0:0]\n-A DOCKER-LIKE -j RETURN\n-I INPUT 1 -j DOCKER-LIKE\n-A OUTPUT -m comment --comment \"ven:jump\" -j VEN-OUTPUT\nCOMMIT\n").unwrap();
        fw.apply(&policy(PolicyState::Enforced, &[]), &safeguards()).unwrap();
        let saved = iptables::parse_save(&fake.filter_text()).unwrap();
        let chain = |name: &str| {
            saved.rules.iter().filter(|r| r.chain == name).map(|r| r.spec.clone()).collect::<Vec<_>>()
        };
        assert_eq!(chain("INPUT"), [render::jump_spec("VEN-INPUT"), "-j DOCKER-LIKE".to_string()]);
        assert_eq!(chain("OUTPUT"), [render::jump_spec("VEN-OUTPUT")]);
        assert_eq!(chain("DOCKER-LIKE"), ["-j RETURN"]);
        fw.remove().unwrap();
        let saved = iptables::parse_save(&fake.filter_text()).unwrap();
        assert_eq!(saved.chains, ["INPUT", "FORWARD", "OUTPUT", "DOCKER-LIKE"]);
        assert_eq!(saved.rules.len(), 2, "{saved:?}");
    }

    #[test]
    fn invalid_policy_touches_nothing() {
        let fake = FakeKernel::default();
        let mut bad = policy(PolicyState::Enforced, &[]);
        bad.rules.push(bad.rules[0].clone());
        let err = firewall(&fake).apply(&bad, &safeguards()).unwrap_err();
        assert!(matches!(err, FirewallError::Policy(PolicyError::DuplicateRuleId(10))), "{err}");
        assert!(fake.calls().is_empty());
    }

    #[test]
    fn existing_set_of_another_type_is_reported() {
        let fake = FakeKernel::default();
        fake.set_ipset_text("create ven-1 hash:ip family inet hashsize 1024 maxelem 65536\n");
        let err = firewall(&fake).apply(&policy(PolicyState::Enforced, &[]), &safeguards()).unwrap_err();
        assert!(matches!(&err, FirewallError::SetType { set, .. } if set == "ven-1"), "{err}");
    }

    #[test]
    fn idle_and_remove_take_everything_away_and_are_idempotent() {
        let fake = FakeKernel::default();
        let fw = firewall(&fake);
        fw.apply(&policy(PolicyState::Enforced, &["198.18.0.2"]), &safeguards()).unwrap();
        let summary = fw.apply(&policy(PolicyState::Idle, &["198.18.0.2"]), &safeguards()).unwrap();
        assert_eq!(summary, ApplySummary { set_members_removed: 1, ..ApplySummary::default() });
        assert_eq!(fake.ipset_text(), "");
        assert!(!fake.filter_text().contains("VEN-"), "{}", fake.filter_text());

        fake.clear_calls();
        fw.remove().unwrap();
        assert_eq!(fake.calls().iter().map(|c| c.0).collect::<Vec<_>>(), ["save_filter", "ipset_save"]);
    }
}
