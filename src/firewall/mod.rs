//! PlatformHandler: programs the host's policy into the kernel with iptables, ip6tables and ipset,
//! checks that it stays there, and repairs it when it does not.
//!
//! Mechanism: `render` turns a [`Policy`] into iptables-restore text for table `filter` and the
//! desired contents of our sets, per family (pure, golden-tested); [`Firewall::apply`] reads the
//! kernel's state once (`iptables-save -t filter` per family, `ipset save`), changes the sets in
//! one `ipset restore` session (deltas; temp set + `swap` for full reloads), replaces our chains
//! with one `iptables-restore --noflush` per family (skipped when the kernel already holds them
//! hash for hash), then destroys the sets no longer used. Every kernel call goes through the
//! narrow `kernel::Kernel` seam; `backend` picks legacy or nft tools the way Felix does.
//!
//! Guarantees:
//! - only our objects are touched: chains `VEN-*`, sets `ven-*`, and one jump tagged `ven:jump`
//!   at position 1 of INPUT and OUTPUT (and FORWARD when the board routes); foreign chains,
//!   rules and sets are never changed;
//! - loopback, established connections, the management channel to the PCE, IPv6 neighbour
//!   discovery and the board's fail-safe services are allowed before any custom rule, policy
//!   rule or default drop, whatever the policy says;
//! - an apply is all or nothing: when validation, ipset or iptables-restore fails, the previous
//!   ruleset stays in force (families already replaced are put back from their saved text) and
//!   set changes already made are undone (between the set delta and the iptables-restore, for
//!   milliseconds, the old rules see the new set members);
//! - sets change by delta or by swapping in a filled temp set, never flush-then-add, so a set is
//!   never briefly empty;
//! - [`Firewall::verify`] compares the kernel with the last applied rulesets (rule hashes, jumps,
//!   set sizes or members) and [`Firewall::repair`] converges back; neither looks at anything
//!   that is not ours;
//! - with the nf_tables backend, a quick check skips reading the tables back only when the
//!   kernel's ruleset generation (`generation`) is the one at which our chains were last known
//!   to be right: read before the tables were read by a verify that found them right, or around
//!   our own apply or repair when nobody else committed in between. Any doubt (legacy backend,
//!   the generation unreadable, another commit during our apply, a failed apply) means the full
//!   comparison.

pub mod backend;
mod generation;
mod ipset;
mod ipset_sizes;
mod iptables;
mod kernel;
mod render;
mod validate;

#[cfg(test)]
mod fake;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitStatus;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use ven_proto::{IpNet, Policy, PolicyState, RuleFamily};

use crate::config::Config;
pub use crate::config::{Caps, Service, ServiceDirection};
pub use backend::{Backend, Tools};
use kernel::{Kernel, SystemKernel};
pub use render::{LogVerdict, log_prefix, parse_log_prefix};
pub use validate::{PolicyError, validate};

/// How the firewall is laid out on this board (from the configuration).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub ipv6: bool,
    /// FORWARD jumps to our chain too (custom forward rules).
    pub routes: bool,
    pub failsafe: Vec<Service>,
    pub ignored_interfaces: Vec<String>,
    pub nflog_group: u16,
    pub caps: Caps,
}

impl Options {
    pub fn from_config(config: &Config) -> Self {
        Self {
            ipv6: config.ipv6,
            routes: config.routes,
            failsafe: config.failsafe_services.clone(),
            ignored_interfaces: config.ignored_interfaces.clone(),
            nflog_group: config.nflog_group,
            caps: config.caps,
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Self::from_config(&Config::default())
    }
}

/// Where the kernel tools are and how the firewall is laid out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirewallConfig {
    pub tools: Tools,
    pub options: Options,
}

impl FirewallConfig {
    /// Tools for the configured backend (detected when `auto`), options from the configuration.
    /// IPv6 is turned off, with a warning, when ip6tables is not usable here.
    pub fn from_config(config: &Config) -> Self {
        let tools = backend::select(config.firewall_backend);
        let mut options = Options::from_config(config);
        if options.ipv6 && !tools.ipv6_usable() {
            log::warn!("ip6tables is not usable on this host; IPv6 traffic is not policed");
            options.ipv6 = false;
        }
        Self { tools, options }
    }
}

impl Default for FirewallConfig {
    /// The tools as found in `PATH` under their plain names (whatever backend they are), default
    /// options.
    fn default() -> Self {
        Self { tools: Tools::plain(), options: Options::default() }
    }
}

/// What stays reachable whatever the policy says (never lock the operator out).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Safeguards {
    /// PCE API and event service endpoints: TCP to them is always allowed.
    pub management: Vec<std::net::SocketAddr>,
}

/// What an apply wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplySummary {
    /// Rules in our chains (safeguards, log rules, policy rules, custom rules and final
    /// verdicts), all families.
    pub rules: usize,
    /// Kernel sets the policy asked for, all families.
    pub sets: usize,
    pub set_members_added: usize,
    /// Members deleted from sets that stay, plus the members of sets destroyed.
    pub set_members_removed: usize,
    /// Whether anything in the kernel changed.
    pub changed: bool,
}

/// Address family of one iptables instance and its sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn name(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }

    pub(crate) fn contains(self, net: &IpNet) -> bool {
        match self {
            Self::V4 => net.is_ipv4(),
            Self::V6 => !net.is_ipv4(),
        }
    }

    /// Whether a custom rule for `family` goes into this family's chains.
    pub(crate) fn takes(self, family: RuleFamily) -> bool {
        matches!(
            (self, family),
            (_, RuleFamily::Both) | (Self::V4, RuleFamily::V4) | (Self::V6, RuleFamily::V6)
        )
    }

    /// Name of the kernel set holding set `id` of the policy: `ven-<id>` or `ven-<id>-6`.
    // INVARIANT: at most 31 characters (ipset's limit) with the temp suffix: "ven-" + 10 digits
    // of a u32 + "-6" + "-t".
    pub(crate) fn set_name(self, id: u32) -> String {
        match self {
            Self::V4 => format!("{}{id}", ipset::SET_PREFIX),
            Self::V6 => format!("{}{id}{}", ipset::SET_PREFIX, ipset::V6_SUFFIX),
        }
    }

    /// Whether the set `name` (one of ours) belongs to this family.
    pub(crate) fn owns_set(self, name: &str) -> bool {
        let base = name.strip_suffix(ipset::TEMP_SUFFIX).unwrap_or(name);
        name.starts_with(ipset::SET_PREFIX) && (base.ends_with(ipset::V6_SUFFIX) == (self == Self::V6))
    }

    /// The `family` argument of `ipset create`.
    pub(crate) fn ipset_family(self) -> &'static str {
        match self {
            Self::V4 => "inet",
            Self::V6 => "inet6",
        }
    }

    pub(crate) fn host_prefix(self) -> u8 {
        match self {
            Self::V4 => 32,
            Self::V6 => 128,
        }
    }

    /// The `-p` value for ICMP, as iptables-save prints it.
    pub(crate) fn icmp(self) -> &'static str {
        match self {
            Self::V4 => "icmp",
            Self::V6 => "ipv6-icmp",
        }
    }
}

/// Why applying, checking or removing the firewall failed. Unless noted, the kernel is as it was
/// before.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("invalid policy: {0}")]
    Policy(#[from] PolicyError),
    #[error("cannot run {}: {cause}", program.display())]
    Spawn { program: std::path::PathBuf, cause: std::io::Error },
    #[error("`{command}` failed ({status}): {stderr}")]
    Save { command: String, status: ExitStatus, stderr: String },
    #[error("unexpected output of `{command}` at line {line}: {text:?}")]
    SaveOutput { command: String, line: usize, text: String },
    #[error("{} rejected table {table} ({status}): {stderr}\n{input_excerpt}", program.display())]
    Restore {
        program: std::path::PathBuf,
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
    /// The apply failed and putting the previous state back failed too: the kernel may differ
    /// from before.
    #[error("{cause}; restoring the previous state also failed: {rollback}")]
    Rollback { cause: Box<FirewallError>, rollback: Box<FirewallError> },
    #[error("nothing has been applied yet, so there is nothing to check or repair")]
    NothingApplied,
}

/// How thoroughly [`Firewall::verify`] compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckDepth {
    /// Our chains by rule hash, the jumps, and the size of every set (`ipset list -t`): cheap,
    /// catches flushes, deleted or added rules and deleted members. With the nf_tables backend
    /// the chains are read back (`iptables-save`, the costly part) only when the kernel's ruleset
    /// generation moved since they were last known right; the set sizes are always read (ipset
    /// changes do not move the generation).
    Quick,
    /// As quick, plus every set member (`ipset save`), and the chains are always read back:
    /// catches a swapped member too.
    Full,
}

/// The host's firewall as it was before ven touched it (the `saved` of `deactivate`), without
/// any object of ours.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// `iptables-save` output (all tables).
    pub v4: String,
    /// `ip6tables-save` output, when IPv6 is in use.
    pub v6: Option<String>,
    /// `ipset save` output (foreign sets only).
    pub ipsets: String,
}

/// Table `filter` of each family as a check read it, and the generation read before it.
struct TablesRead {
    generation: Option<u32>,
    filters: Vec<(Family, iptables::FilterState)>,
}

/// What [`Firewall::check_and_repair`] found and did.
#[derive(Debug)]
pub struct Repair {
    /// What differed, one line per difference.
    pub drift: Vec<String>,
    /// The repair: what it wrote, or why it failed (the firewall is then as the check found it,
    /// or as the failed apply's rollback left it).
    pub result: Result<ApplySummary, FirewallError>,
}

/// What a removal took away.
struct Removal {
    /// Set members that went with the sets.
    members: usize,
    /// Whether anything of ours was there.
    changed: bool,
}

/// The last rulesets applied, per family: what verify compares with and repair restores.
struct Applied {
    rulesets: Vec<(Family, render::Ruleset)>,
    /// What the chains were rendered from ([`rules_fingerprint`]).
    rules_fingerprint: Fingerprint,
    /// What each set was filled from, by policy set id ([`members_fingerprint`]).
    set_fingerprints: BTreeMap<u32, Fingerprint>,
    /// The nf_tables ruleset generation at which our chains were last known to be exactly
    /// `rulesets` (after our last apply or repair, when nobody else committed meanwhile, or read
    /// before the tables by the last verify that compared them and found them right). `None`:
    /// not known, so the next quick check reads the chains back.
    generation: Option<u32>,
}

type Fingerprint = [u8; 32];

/// SHA-256 of everything the chains are rendered from besides the board's options (fixed for a
/// `Firewall`): the state, the rules, the custom rules and the management endpoints.
fn rules_fingerprint(policy: &Policy, safeguards: &Safeguards) -> Fingerprint {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(&ven_proto::encode(&(policy.state, &policy.rules, &policy.custom_rules)));
    for endpoint in &safeguards.management {
        context.update(endpoint.to_string().as_bytes());
        context.update(&[0]);
    }
    fingerprint_of(context)
}

/// SHA-256 of one set's members as the policy lists them.
fn members_fingerprint(members: &[IpNet]) -> Fingerprint {
    // Fed member by member through a small buffer: no copy of a large set is made.
    const CHUNK: usize = 4096;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = Vec::with_capacity(CHUNK + 18);
    for member in members {
        // A tag first: every record then says its own length, so no two lists hash alike.
        match member.addr() {
            std::net::IpAddr::V4(addr) => {
                buffer.push(4);
                buffer.extend_from_slice(&addr.octets());
            }
            std::net::IpAddr::V6(addr) => {
                buffer.push(6);
                buffer.extend_from_slice(&addr.octets());
            }
        }
        buffer.push(member.prefix());
        if buffer.len() >= CHUNK {
            context.update(&buffer);
            buffer.clear();
        }
    }
    context.update(&buffer);
    fingerprint_of(context)
}

fn fingerprint_of(context: ring::digest::Context) -> Fingerprint {
    let mut fingerprint = [0; 32];
    fingerprint.copy_from_slice(context.finish().as_ref());
    fingerprint
}

/// The PlatformHandler: applies policies, verifies and repairs them, and removes everything it
/// owns. Calls are serialised: one kernel operation at a time per `Firewall`.
pub struct Firewall {
    kernel: Box<dyn Kernel>,
    options: Options,
    applied: Mutex<Option<Applied>>,
}

impl Firewall {
    pub fn new(config: FirewallConfig) -> Self {
        let options = config.options.clone();
        Self::with_kernel(Box::new(SystemKernel::new(config.tools)), options)
    }

    pub(crate) fn with_kernel(kernel: Box<dyn Kernel>, options: Options) -> Self {
        Self { kernel, options, applied: Mutex::new(None) }
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    fn families(&self) -> Vec<Family> {
        Family::ALL.into_iter().filter(|family| *family == Family::V4 || self.options.ipv6).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Applied>> {
        self.applied.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Validates, renders and applies the policy. Idle state = remove everything we own.
    /// On error the previous ruleset (and set contents) stays fully in force.
    pub fn apply(&self, policy: &Policy, safeguards: &Safeguards) -> Result<ApplySummary, FirewallError> {
        validate(policy, &self.options.caps)?;
        let mut applied = self.lock();
        if policy.state == PolicyState::Idle {
            let removal = self.remove_locked()?;
            *applied = None;
            return Ok(ApplySummary {
                set_members_removed: removal.members,
                changed: removal.changed,
                ..ApplySummary::default()
            });
        }
        let rules_fingerprint = rules_fingerprint(policy, safeguards);
        let set_fingerprints: BTreeMap<u32, Fingerprint> =
            policy.ip_sets.iter().map(|set| (set.id, members_fingerprint(&set.members))).collect();
        if let Some(previous) = applied.as_mut().filter(|p| p.rules_fingerprint == rules_fingerprint) {
            // Sets only: the chains, and so the generation they were right at, stay.
            return self.apply_members(previous, policy, set_fingerprints);
        }
        let rulesets: Vec<(Family, render::Ruleset)> = self
            .families()
            .into_iter()
            .map(|family| (family, render::render(family, policy, safeguards, &self.options)))
            .collect();
        if let Some(previous) = applied.as_mut() {
            // A failed apply may have committed and rolled back: the chains are no longer known.
            previous.generation = None;
        }
        let (summary, generation) = self.apply_rulesets(&rulesets, None)?;
        *applied = Some(Applied { rulesets, rules_fingerprint, set_fingerprints, generation });
        Ok(summary)
    }

    /// The fast path for a policy whose chains are what this firewall last applied (same rules,
    /// state, custom rules and management endpoints) and only set members differ, the common
    /// case of a peer coming or going: nothing is rendered, only the sets whose members changed
    /// are normalised and compared, and one `ipset restore` writes the delta from the last
    /// applied members, without reading the kernel back (`iptables-save` of a large table costs
    /// hundreds of milliseconds). Keeping the kernel equal to what was applied is the tamper
    /// checks' job, as in Felix; the session runs with `-exist`, so a member someone already
    /// removed or added does not fail it. On failure the sets are put back from the kernel's
    /// state and `applied` stays as it was.
    fn apply_members(
        &self,
        applied: &mut Applied,
        policy: &Policy,
        set_fingerprints: BTreeMap<u32, Fingerprint>,
    ) -> Result<ApplySummary, FirewallError> {
        let maxelem = 2 * self.options.caps.max_set_members;
        let changed: Vec<u32> = set_fingerprints
            .iter()
            .filter(|(id, fingerprint)| applied.set_fingerprints.get(id) != Some(fingerprint))
            .map(|(id, _)| *id)
            .chain(applied.set_fingerprints.keys().filter(|id| !set_fingerprints.contains_key(id)).copied())
            .collect();
        let mut update = ipset::SetPlan::default();
        let mut next: Vec<(Family, render::DesiredSets)> = Vec::with_capacity(applied.rulesets.len());
        for (family, ruleset) in &applied.rulesets {
            let mut new = render::DesiredSets::new();
            for id in &changed {
                let name = family.set_name(*id);
                let wanted = policy
                    .ip_sets
                    .iter()
                    .find(|set| set.id == *id)
                    .map(|set| render::set_members(*family, &set.members));
                let have = ruleset.sets.get(&name).map(|members| (members, false));
                update.change(*family, &name, have, wanted.as_ref(), maxelem);
                if let Some(wanted) = wanted {
                    new.insert(name, wanted);
                }
            }
            next.push((*family, new));
        }
        let summary = ApplySummary {
            rules: applied.rulesets.iter().map(|(_, ruleset)| ruleset.rule_count()).sum(),
            sets: policy.ip_sets.len() * applied.rulesets.len(),
            set_members_added: update.added(),
            set_members_removed: update.removed(),
            changed: !update.is_empty(),
        };
        if !update.is_empty() {
            // No rule refers to a set that goes (the chains are unchanged and name only sets
            // that stay), so destroys need not wait.
            if let Err(cause) = self.kernel.ipset_restore(&update.render()) {
                // Every set of ours goes back to what was applied (sets this delta created go).
                let header = |family: Family| ipset::header(family, maxelem);
                let before: ipset::KernelSets = applied
                    .rulesets
                    .iter()
                    .flat_map(|(family, ruleset)| {
                        ruleset.sets.iter().map(move |(name, members)| {
                            (
                                name.clone(),
                                ipset::KernelSet { header: header(*family), members: members.clone() },
                            )
                        })
                    })
                    .collect();
                return Err(self.restore_sets(&before, cause, maxelem));
            }
        }
        for ((family, ruleset), (_, new)) in applied.rulesets.iter_mut().zip(next) {
            for id in &changed {
                ruleset.sets.remove(&family.set_name(*id));
            }
            ruleset.sets.extend(new);
        }
        applied.set_fingerprints = set_fingerprints;
        Ok(summary)
    }

    /// Removes every chain, jump and set we own (deactivate with `--firewall open`, suspend);
    /// idempotent. Returns how many set members went with the sets.
    pub fn remove(&self) -> Result<usize, FirewallError> {
        let mut applied = self.lock();
        let removal = self.remove_locked()?;
        *applied = None;
        Ok(removal.members)
    }

    /// Compares the kernel with the last applied policy; returns what differs (empty: nothing).
    ///
    /// The chains of every family are read back (`iptables-save -t filter`) and compared by rule
    /// hash, except in a [`CheckDepth::Quick`] check when the nf_tables ruleset generation equals
    /// the one remembered with the applied policy: then no iptables-nft rule (of either family,
    /// they share the generation) has changed since our chains were last known right, and only
    /// the sets are checked. The generation is read before the tables, so a change made while
    /// they are read moves it past the one remembered; a comparison that finds the chains right
    /// remembers it, one that finds drift forgets it.
    pub fn verify(&self, depth: CheckDepth) -> Result<Vec<String>, FirewallError> {
        let mut applied = self.lock();
        let applied = applied.as_mut().ok_or(FirewallError::NothingApplied)?;
        self.verify_locked(applied, depth).map(|(drift, _)| drift)
    }

    /// A check, and when it finds drift, the repair, reusing the tables the check read (a large
    /// table costs as much to read as to write). `None` when nothing differed; otherwise what
    /// differed and how the repair went.
    pub fn check_and_repair(&self, depth: CheckDepth) -> Result<Option<Repair>, FirewallError> {
        let mut applied = self.lock();
        let applied = applied.as_mut().ok_or(FirewallError::NothingApplied)?;
        let (drift, read) = self.verify_locked(applied, depth)?;
        if drift.is_empty() {
            return Ok(None);
        }
        applied.generation = None;
        let result = self.apply_rulesets(&applied.rulesets, read).map(|(summary, generation)| {
            applied.generation = generation;
            summary
        });
        Ok(Some(Repair { drift, result }))
    }

    /// The comparison behind [`Firewall::verify`]; also returns the tables it read, if it read
    /// them.
    fn verify_locked(
        &self,
        applied: &mut Applied,
        depth: CheckDepth,
    ) -> Result<(Vec<String>, Option<TablesRead>), FirewallError> {
        // INVARIANT: read before the tables are read (see above), never after.
        let generation = self.kernel.ruleset_generation();
        let unchanged = generation.is_some() && generation == applied.generation;
        let mut drift = Vec::new();
        let mut read = None;
        if depth == CheckDepth::Full || !unchanged {
            let mut filters = Vec::with_capacity(applied.rulesets.len());
            for (family, ruleset) in &applied.rulesets {
                let filter = iptables::parse_save(&self.kernel.save_filter(*family)?)?;
                for difference in iptables::drift(&ruleset.chains, &filter) {
                    drift.push(format!("{}: {difference}", family.name()));
                }
                filters.push((*family, filter));
            }
            read = Some(TablesRead { generation, filters });
            if unchanged && !drift.is_empty() {
                log::warn!(
                    "our chains changed while the nf_tables generation stood still; quick checks will \
                     read them back until they are right again"
                );
            }
            applied.generation = if drift.is_empty() { generation } else { None };
        }
        let wanted = applied.rulesets.iter().flat_map(|(_, ruleset)| ruleset.sets.iter());
        match depth {
            CheckDepth::Quick => {
                let sizes = self.kernel.ipset_sizes()?;
                for (name, members) in wanted {
                    match sizes.get(name) {
                        None => drift.push(format!("set {name} missing")),
                        Some(&size) if size != members.len() => {
                            drift.push(format!("set {name} holds {size} members, not {}", members.len()))
                        }
                        Some(_) => {}
                    }
                }
            }
            CheckDepth::Full => {
                let sets = ipset::parse_save(&self.kernel.ipset_save()?)?;
                for (name, members) in wanted {
                    match sets.get(name) {
                        None => drift.push(format!("set {name} missing")),
                        Some(set) => {
                            let missing = members.difference(&set.members).count();
                            let extra = set.members.difference(members).count();
                            if missing + extra > 0 {
                                drift.push(format!(
                                    "set {name}: {missing} members missing, {extra} unexpected"
                                ));
                            }
                        }
                    }
                }
            }
        }
        Ok((drift, read))
    }

    /// Puts the last applied policy back (after [`Firewall::verify`] found drift).
    pub fn repair(&self) -> Result<ApplySummary, FirewallError> {
        let mut applied = self.lock();
        let applied = applied.as_mut().ok_or(FirewallError::NothingApplied)?;
        applied.generation = None;
        let (summary, generation) = self.apply_rulesets(&applied.rulesets, None)?;
        applied.generation = generation;
        Ok(summary)
    }

    /// The nf_tables ruleset generation of the calling thread's network namespace, when this
    /// firewall's tools program nf_tables; `None` with the legacy backend or when the kernel
    /// does not answer.
    pub fn ruleset_generation(&self) -> Option<u32> {
        self.kernel.ruleset_generation()
    }

    /// The last applied firewall as text: our chains per family in iptables-restore syntax, then
    /// our sets with their member counts (what `ven history` keeps and prints).
    pub fn applied_text(&self) -> String {
        let applied = self.lock();
        applied.as_ref().map_or_else(String::new, |applied| ruleset_text(&applied.rulesets))
    }

    /// Takes the host's firewall as it is, without our objects (for `deactivate --firewall saved`).
    pub fn snapshot(&self) -> Result<Snapshot, FirewallError> {
        let _applied = self.lock();
        let v4 = iptables::without_ours(&self.kernel.save_tables(Family::V4)?);
        let v6 = if self.options.ipv6 {
            Some(iptables::without_ours(&self.kernel.save_tables(Family::V6)?))
        } else {
            None
        };
        let ipsets = ipset::without_ours(&self.kernel.ipset_save()?);
        Ok(Snapshot { v4, v6, ipsets })
    }

    /// Removes everything of ours and puts the snapshot back exactly: every set it holds gets its
    /// saved members (refilled through a temp set and `swap`, so it is never empty), every table
    /// in it is replaced as it was (one transaction per family), then sets created since the
    /// snapshot are destroyed (one that something still uses stays, with a warning).
    pub fn restore_snapshot(&self, snapshot: &Snapshot) -> Result<(), FirewallError> {
        let mut applied = self.lock();
        self.remove_locked()?;
        *applied = None;
        let now = self.kernel.ipset_save()?;
        let plan = ipset::snapshot_plan(&snapshot.ipsets, &now);
        if !plan.session.is_empty() {
            self.kernel.ipset_restore(&plan.session)?;
        }
        if !snapshot.v4.trim().is_empty() {
            self.kernel.restore_tables(Family::V4, &snapshot.v4)?;
        }
        if let Some(v6) = snapshot.v6.as_ref().filter(|text| !text.trim().is_empty()) {
            self.kernel.restore_tables(Family::V6, v6)?;
        }
        for name in plan.created_since {
            if let Err(e) = self.kernel.ipset_restore(&format!("destroy {name}\n")) {
                log::warn!("set {name} was created after activation and stays (it is in use): {e}");
            }
        }
        Ok(())
    }

    /// Applies rendered rulesets: sets first (one session, all families), then one
    /// iptables-restore per family, then stale sets go. Families not in `rulesets` lose our
    /// chains in the same pass. Returns, with the summary, the ruleset generation at which the
    /// chains are now exactly `rulesets`, when that is certain: the generation read after our
    /// restores is the one read before the tables were, moved once per restore of ours (each
    /// commits one transaction), so nobody else committed in between. `None` otherwise.
    ///
    /// `read` is the tables as a check just read them (with the generation read before them), so
    /// that a repair does not read a large table twice; `None` reads them here.
    fn apply_rulesets(
        &self,
        rulesets: &[(Family, render::Ruleset)],
        read: Option<TablesRead>,
    ) -> Result<(ApplySummary, Option<u32>), FirewallError> {
        let TablesRead { generation: generation_before, filters } = match read {
            Some(read) => read,
            // INVARIANT: the generation is read before the tables are read.
            None => {
                TablesRead { generation: self.kernel.ruleset_generation(), filters: self.read_filters()? }
            }
        };
        let before = ipset::parse_save(&self.kernel.ipset_save()?)?;
        let maxelem = 2 * self.options.caps.max_set_members;

        let mut update = ipset::SetPlan::default();
        for (family, ruleset) in rulesets {
            for name in ruleset.sets.keys() {
                if let Some(existing) = before.get(name) {
                    if !ipset::same_type(&existing.header, *family) {
                        return Err(FirewallError::SetType {
                            set: name.clone(),
                            found: existing.header.clone(),
                            family: family.ipset_family(),
                        });
                    }
                }
            }
            update.extend(ipset::plan(*family, &before, &ruleset.sets, maxelem));
        }
        // A family turned off keeps no sets of ours (its chains go below, the sets after them).
        for family in Family::ALL.into_iter().filter(|family| !rulesets.iter().any(|(f, _)| f == family)) {
            update.extend(ipset::plan(family, &before, &render::DesiredSets::new(), maxelem));
        }
        // Sets no longer wanted may still be referenced by the old chains: they go last.
        let stale = update.take_destroy();
        let mut summary = ApplySummary {
            rules: rulesets.iter().map(|(_, ruleset)| ruleset.rule_count()).sum(),
            sets: rulesets.iter().map(|(_, ruleset)| ruleset.sets.len()).sum(),
            set_members_added: update.added(),
            set_members_removed: update.removed() + stale.removed(),
            changed: !update.is_empty() || !stale.is_empty(),
        };
        if !update.is_empty() {
            if let Err(cause) = self.kernel.ipset_restore(&update.render()) {
                // ipset restore stops at the first bad line, after applying the ones before it.
                return Err(self.restore_sets(&before, cause, maxelem));
            }
        }

        let mut replaced: Vec<(Family, &iptables::FilterState)> = Vec::new();
        let mut commits: u32 = 0;
        for (family, filter) in &filters {
            let empty = Vec::new();
            let chains = rulesets.iter().find(|(f, _)| f == family).map_or(&empty, |(_, r)| &r.chains);
            let input = if chains.is_empty() {
                iptables::removal_input(filter)
            } else if iptables::drift(chains, filter).is_empty() {
                None
            } else {
                Some(iptables::restore_input(chains, filter))
            };
            let Some(input) = input else { continue };
            if let Err(cause) = self.kernel.restore_filter(*family, &input) {
                // iptables-restore is atomic per table: this family's old chains are intact; put
                // back the families already replaced, then the sets.
                let cause = self.roll_back_filters(&replaced, cause);
                return Err(self.restore_sets(&before, cause, maxelem));
            }
            summary.changed = true;
            commits += 1;
            replaced.push((*family, filter));
        }
        // INVARIANT: read after our last restore (it moved the generation).
        let generation = generation_before
            .zip(self.kernel.ruleset_generation())
            .filter(|(before, after)| *after == before.wrapping_add(commits))
            .map(|(_, after)| after);

        if !stale.is_empty() {
            // The policy is in force; a set we cannot destroy (a foreign rule refers to it) only
            // costs memory, and the next apply tries again.
            if let Err(e) = self.kernel.ipset_restore(&stale.render()) {
                log::warn!("firewall applied, but destroying unused sets failed: {e}");
                summary.set_members_removed -= stale.removed();
            }
        }
        Ok((summary, generation))
    }

    /// Puts our chains of each family in `replaced` back as they were saved before this apply.
    fn roll_back_filters(
        &self,
        replaced: &[(Family, &iptables::FilterState)],
        cause: FirewallError,
    ) -> FirewallError {
        for (family, previous) in replaced {
            let result =
                self.kernel.save_filter(*family).and_then(|text| iptables::parse_save(&text)).and_then(
                    |now| match iptables::rollback_input(previous, &now) {
                        Some(input) => self.kernel.restore_filter(*family, &input),
                        None => Ok(()),
                    },
                );
            if let Err(rollback) = result {
                return FirewallError::Rollback { cause: Box::new(cause), rollback: Box::new(rollback) };
            }
        }
        cause
    }

    /// Puts the contents of every set of ours back as they were in `before`, and destroys the
    /// sets this apply created. Returns the error to report for the failed apply.
    fn restore_sets(
        &self,
        before: &ipset::KernelSets,
        cause: FirewallError,
        maxelem: usize,
    ) -> FirewallError {
        let result = self.kernel.ipset_save().and_then(|text| ipset::parse_save(&text)).and_then(|now| {
            let mut back = ipset::SetPlan::default();
            for family in Family::ALL {
                // Every set of ours now: those this apply created (temp sets included) go.
                let touched = now
                    .iter()
                    .filter(|(name, _)| family.owns_set(name))
                    .map(|(name, set)| (name.clone(), set.clone()))
                    .collect();
                let target = before
                    .iter()
                    .filter(|(name, _)| family.owns_set(name))
                    .map(|(name, set)| (name.clone(), set.members.clone()))
                    .collect();
                back.extend(ipset::plan(family, &touched, &target, maxelem));
            }
            if back.is_empty() { Ok(()) } else { self.kernel.ipset_restore(&back.render()) }
        });
        match result {
            Ok(()) => cause,
            Err(rollback) => FirewallError::Rollback { cause: Box::new(cause), rollback: Box::new(rollback) },
        }
    }

    /// Table `filter` of every family this firewall may have written: the enabled ones (an error
    /// is an error), and a disabled IPv6 when ip6tables answers, so that chains of ours left by
    /// an earlier configuration with IPv6 on are found and removed.
    fn read_filters(&self) -> Result<Vec<(Family, iptables::FilterState)>, FirewallError> {
        let mut filters = Vec::with_capacity(Family::ALL.len());
        for family in Family::ALL {
            let enabled = self.families().contains(&family);
            match self.kernel.save_filter(family) {
                Ok(text) => filters.push((family, iptables::parse_save(&text)?)),
                Err(e) if enabled => return Err(e),
                Err(_) => {}
            }
        }
        Ok(filters)
    }

    /// Removes our jumps and chains in one iptables-restore per family, then destroys our sets
    /// (only once no family's rules can refer to them).
    fn remove_locked(&self) -> Result<Removal, FirewallError> {
        let mut changed = false;
        for (family, filter) in self.read_filters()? {
            if let Some(input) = iptables::removal_input(&filter) {
                self.kernel.restore_filter(family, &input)?;
                changed = true;
            }
        }
        let sets = ipset::parse_save(&self.kernel.ipset_save()?)?;
        let mut teardown = ipset::SetPlan::default();
        for family in Family::ALL {
            teardown.extend(ipset::plan(family, &sets, &render::DesiredSets::new(), 0));
        }
        if !teardown.is_empty() {
            self.kernel.ipset_restore(&teardown.render())?;
            changed = true;
        }
        Ok(Removal { members: teardown.removed(), changed })
    }
}

/// For the kernel test and the `ipset_sizes` fuzz target: our sets' sizes read over netlink in
/// the calling thread's namespace, and the decoder of one datagram of that dump.
#[doc(hidden)]
pub fn kernel_set_sizes() -> Result<std::collections::BTreeMap<String, usize>, String> {
    ipset_sizes::our_set_sizes().map_err(|e| e.to_string())
}

#[doc(hidden)]
pub fn parse_set_sizes_datagram(
    datagram: &[u8],
) -> Result<std::collections::BTreeMap<String, usize>, String> {
    let mut sizes = std::collections::BTreeMap::new();
    ipset_sizes::parse_datagram(datagram, 1, &mut sizes).map_err(|e| e.to_string())?;
    Ok(sizes)
}

/// For the `nft_generation` fuzz target: the parser of the kernel's answer to NFT_MSG_GETGEN.
#[doc(hidden)]
pub fn parse_generation_reply(datagram: &[u8], seq: u32) -> Result<Option<u32>, String> {
    generation::parse_reply(datagram, seq).map_err(|e| e.to_string())
}

/// Rulesets as text: our chains per family in iptables-restore syntax, then our sets with their
/// member counts (what `ven history` keeps, and [`crate::history::diff_summary`] reads).
fn ruleset_text(rulesets: &[(Family, render::Ruleset)]) -> String {
    let mut text = String::new();
    for (family, ruleset) in rulesets {
        let _ = writeln!(text, "# {}", family.name());
        text.push_str(&iptables::restore_input(&ruleset.chains, &iptables::FilterState::default()));
    }
    text.push_str("# sets\n");
    for (family, ruleset) in rulesets {
        for (name, members) in &ruleset.sets {
            let _ = writeln!(text, "{name} hash:net {} {} members", family.ipset_family(), members.len());
        }
    }
    text
}

/// For the `policy_restore` fuzz target: what restoring `policy` as the last-known-good policy
/// programs, before the kernel is touched: validated against the default caps, rendered for both
/// families, as the text the history records (see [`Firewall::applied_text`]), with the number
/// of rules in it (hook jumps included).
#[doc(hidden)]
pub fn restored_text(policy: &Policy) -> Result<(String, usize), PolicyError> {
    let options = Options::default();
    validate(policy, &options.caps)?;
    let safeguards = Safeguards { management: vec![std::net::SocketAddr::from(([198, 18, 0, 1], 8443))] };
    let rulesets: Vec<(Family, render::Ruleset)> = Family::ALL
        .iter()
        .map(|family| (*family, render::render(*family, policy, &safeguards, &options)))
        .collect();
    // Each hooked chain adds its jump (`-I <hook> 1 ...`) to the rules.
    let rules = rulesets
        .iter()
        .map(|(_, ruleset)| ruleset.rule_count() + ruleset.chains.iter().filter(|c| c.hook.is_some()).count())
        .sum();
    Ok((ruleset_text(&rulesets), rules))
}

/// For the `iptables_save`, `ipset_save` and `ipset_list` fuzz targets: the parsers of the
/// tools' output that every tamper check reads.
#[doc(hidden)]
pub use ipset::{fuzz_list as fuzz_ipset_list, fuzz_save as fuzz_ipset_save};
#[doc(hidden)]
pub use iptables::fuzz_save as fuzz_iptables_save;

/// For the `policy_rendering` fuzz target: validates `policy` against the default caps and, when
/// it passes, renders it for both families and checks the invariant that makes custom rule text
/// safe: every line is one `-A VEN-...` rule. Panics when the invariant breaks.
#[doc(hidden)]
pub fn render_check(policy: &Policy) -> Result<(), PolicyError> {
    let options = Options::default();
    validate(policy, &options.caps)?;
    let safeguards = Safeguards { management: vec![std::net::SocketAddr::from(([198, 18, 0, 1], 8443))] };
    for family in Family::ALL {
        let ruleset = render::render(family, policy, &safeguards, &options);
        for chain in &ruleset.chains {
            for rule in &chain.rules {
                assert!(rule.starts_with(&format!("-A {} ", chain.name)), "{rule:?}");
                assert!(!rule.contains(['\n', '\r', '\0']), "{rule:?}");
                assert!(iptables::hash_of(rule).is_some(), "{rule:?}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::fake::FakeKernel;
    use super::*;
    use ven_proto::{CustomChain, CustomRule, Direction, IpSet, Peers, PortRange, Protocol, Rule};

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

    /// IPv4 only and no fail-safe services: the call sequences stay short to read.
    fn v4_only() -> Options {
        Options { ipv6: false, failsafe: Vec::new(), ..Options::default() }
    }

    fn firewall(fake: &FakeKernel) -> Firewall {
        Firewall::with_kernel(Box::new(fake.clone()), v4_only())
    }

    fn call_names(fake: &FakeKernel) -> Vec<&'static str> {
        fake.calls().iter().map(|c| c.0).collect()
    }

    #[test]
    fn apply_creates_sets_then_chains_and_counts_members() {
        let fake = FakeKernel::default();
        let summary = firewall(&fake)
            .apply(&policy(PolicyState::Enforced, &["198.18.0.2", "198.18.1.0/24"]), &safeguards())
            .unwrap();
        assert_eq!(
            summary,
            ApplySummary { rules: 12, sets: 1, set_members_added: 2, set_members_removed: 0, changed: true }
        );
        assert_eq!(fake.set_members("ven-1"), Some(vec!["198.18.0.2".into(), "198.18.1.0/24".into()]));
        let calls = fake.calls();
        // IPv6 is off, but its table is read: chains of ours left from when it was on must go.
        assert_eq!(
            call_names(&fake),
            ["save_filter", "save_filter", "ipset_save", "ipset_restore", "restore_filter"]
        );
        assert!(calls[4].1.contains("-I INPUT 1 -m comment --comment \"ven:jump\" -j VEN-INPUT"));
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
        assert_eq!(calls[3], ("ipset_restore", "add ven-1 198.18.0.4\ndel ven-1 198.18.0.2\n".into()));
        assert_eq!(calls[4].0, "restore_filter");
        assert_eq!(calls[5], ("ipset_restore", "destroy ven-2\n".into()));
        assert!(!calls[3].1.contains("flush"), "never flush-then-add");
    }

    #[test]
    fn applying_the_same_policy_again_writes_nothing() {
        let fake = FakeKernel::default();
        let fw = firewall(&fake);
        let same = policy(PolicyState::Enforced, &["198.18.0.2"]);
        fw.apply(&same, &safeguards()).unwrap();
        fake.clear_calls();
        let summary = fw.apply(&same, &safeguards()).unwrap();
        assert_eq!((summary.set_members_added, summary.set_members_removed, summary.changed), (0, 0, false));
        assert!(fake.calls().is_empty(), "same chains: nothing read, nothing written: {:?}", fake.calls());
        // A new firewall (a restarted agent) knows nothing: it reads the kernel and finds it right.
        let summary = firewall(&fake).apply(&same, &safeguards()).unwrap();
        assert!(!summary.changed);
        assert_eq!(call_names(&fake), ["save_filter", "save_filter", "ipset_save"]);
    }

    #[test]
    fn a_members_only_change_writes_one_delta_without_reading_the_kernel() {
        let fake = FakeKernel::default();
        let fw = firewall(&fake);
        fw.apply(&policy(PolicyState::Enforced, &["198.18.0.2", "198.18.0.3"]), &safeguards()).unwrap();
        fake.clear_calls();
        let mut next = policy(PolicyState::Enforced, &["198.18.0.2", "198.18.0.3", "198.18.0.4"]);
        next.version = 2;
        let summary = fw.apply(&next, &safeguards()).unwrap();
        assert_eq!((summary.set_members_added, summary.set_members_removed, summary.changed), (1, 0, true));
        assert_eq!(fake.calls(), [("ipset_restore", "add ven-1 198.18.0.4\n".to_string())]);
        // A failed delta puts the members back as they were.
        fake.fail_ipset_restore_after_lines(1);
        let err = fw.apply(&policy(PolicyState::Enforced, &["198.18.0.5", "198.18.0.6"]), &safeguards());
        assert!(matches!(err, Err(FirewallError::IpsetRestore { .. })), "{err:?}");
        assert_eq!(
            fake.set_members("ven-1").map(|mut m| {
                m.sort();
                m
            }),
            Some(vec!["198.18.0.2".into(), "198.18.0.3".into(), "198.18.0.4".into()])
        );
        assert!(fake.set_members("ven-1-t").is_none(), "the temp set of the reload went too");
        assert_eq!(fw.verify(CheckDepth::Full).unwrap(), Vec::<String>::new());

        // A set no rule names comes and goes without touching the chains or the other sets.
        let mut with_spare = next.clone();
        with_spare.ip_sets.push(IpSet { id: 9, members: vec![net("198.18.9.9")] });
        fake.clear_calls();
        fw.apply(&with_spare, &safeguards()).unwrap();
        assert_eq!(
            fake.calls(),
            [(
                "ipset_restore",
                "create ven-9 hash:net family inet hashsize 1024 maxelem 262144\nadd ven-9 198.18.9.9\n"
                    .to_string()
            )]
        );
        fake.clear_calls();
        fw.apply(&next, &safeguards()).unwrap();
        assert_eq!(fake.calls(), [("ipset_restore", "destroy ven-9\n".to_string())]);
        assert_eq!(fw.verify(CheckDepth::Full).unwrap(), Vec::<String>::new());

        // A rule change takes the full path: the kernel is read and the chains rewritten.
        let mut new_rule = next.clone();
        new_rule.rules.push(outbound_rule(11, 1));
        fake.clear_calls();
        fw.apply(&new_rule, &safeguards()).unwrap();
        assert_eq!(call_names(&fake), ["save_filter", "save_filter", "ipset_save", "restore_filter"]);
    }

    #[test]
    fn both_families_are_programmed_with_their_own_sets() {
        let fake = FakeKernel::default();
        let fw = Firewall::with_kernel(Box::new(fake.clone()), Options::default());
        fw.apply(&policy(PolicyState::Enforced, &["198.18.0.2", "2001:2::/64"]), &safeguards()).unwrap();
        assert_eq!(fake.set_members("ven-1"), Some(vec!["198.18.0.2".into()]));
        assert_eq!(fake.set_members("ven-1-6"), Some(vec!["2001:2::/64".into()]));
        let v6 = fake.filter_text_of(Family::V6);
        assert!(v6.contains("-m set --match-set ven-1-6 src"), "{v6}");
        assert!(v6.contains("--icmpv6-type 135"), "{v6}");
        assert!(!fake.filter_text().contains("ven-1-6"));
        fw.remove().unwrap();
        assert!(!fake.filter_text_of(Family::V6).contains("VEN-"));
        assert_eq!(fake.ipset_text(), "");
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
    fn a_family_that_fails_takes_the_other_back_too() {
        let fake = FakeKernel::default();
        let fw = Firewall::with_kernel(Box::new(fake.clone()), Options::default());
        fw.apply(&policy(PolicyState::Enforced, &["198.18.0.2", "2001:2::2"]), &safeguards()).unwrap();
        let (v4_before, v6_before, sets_before) =
            (fake.filter_text(), fake.filter_text_of(Family::V6), fake.ipset_text());
        fake.fail_next_filter_restore_of(Family::V6, "ip6tables-restore: line 3 failed");
        let err =
            fw.apply(&policy(PolicyState::Test, &["198.18.0.3", "2001:2::3"]), &safeguards()).unwrap_err();
        assert!(matches!(err, FirewallError::Restore { .. }), "{err}");
        assert_eq!(fake.filter_text(), v4_before, "IPv4 went back to the previous policy");
        assert_eq!(fake.filter_text_of(Family::V6), v6_before);
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
        // A restarted agent applies its last-known-good policy and finds the jumps out of place.
        firewall(&fake).apply(&policy(PolicyState::Enforced, &[]), &safeguards()).unwrap();
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
        assert_eq!(
            summary,
            ApplySummary { set_members_removed: 1, changed: true, ..ApplySummary::default() }
        );
        assert_eq!(fake.ipset_text(), "");
        assert!(!fake.filter_text().contains("VEN-"), "{}", fake.filter_text());

        fake.clear_calls();
        fw.remove().unwrap();
        assert_eq!(call_names(&fake), ["save_filter", "save_filter", "ipset_save"]);
    }

    #[test]
    fn idle_after_empty_sets_reports_the_change_and_ipv6_turned_off_is_cleaned_up() {
        let fake = FakeKernel::default();
        let with_v6 = Firewall::with_kernel(Box::new(fake.clone()), Options::default());
        with_v6.apply(&policy(PolicyState::Enforced, &[]), &safeguards()).unwrap();
        assert!(fake.filter_text_of(Family::V6).contains("VEN-INPUT"));
        // The configuration turns IPv6 off and the agent restarts.
        let without_v6 = firewall(&fake);
        let summary = without_v6.apply(&policy(PolicyState::Enforced, &[]), &safeguards()).unwrap();
        assert!(summary.changed);
        assert!(!fake.filter_text_of(Family::V6).contains("VEN-"), "{}", fake.filter_text_of(Family::V6));
        assert!(fake.set_members("ven-1-6").is_none(), "the IPv6 set went once nothing referred to it");
        let summary = without_v6.apply(&policy(PolicyState::Idle, &[]), &safeguards()).unwrap();
        assert!(summary.changed, "chains and empty sets went: that is a change");
        assert_eq!(summary.set_members_removed, 0);
        with_v6.apply(&policy(PolicyState::Enforced, &[]), &safeguards()).unwrap();
        without_v6.remove().unwrap();
        assert!(!fake.filter_text_of(Family::V6).contains("VEN-") && fake.ipset_text().is_empty());
    }

    #[test]
    fn check_and_repair_reads_the_tables_once() {
        let fake = FakeKernel::default();
        let fw = firewall(&fake);
        fw.apply(&policy(PolicyState::Enforced, &["198.18.0.2"]), &safeguards()).unwrap();
        let intact = fake.filter_text();
        assert!(fw.check_and_repair(CheckDepth::Quick).unwrap().is_none());
        fake.tamper(Family::V4, "-F VEN-INPUT\n");
        fake.clear_calls();
        let repair = fw.check_and_repair(CheckDepth::Quick).unwrap().expect("drift");
        assert_eq!(repair.drift, ["IPv4: VEN-INPUT: 7 rules missing, 0 unexpected"]);
        assert!(repair.result.unwrap().changed);
        let reads = fake.calls().iter().filter(|call| call.0 == "save_filter").count();
        assert_eq!(reads, 1, "the repair reused the check's read: {:?}", call_names(&fake));
        assert_eq!(fake.filter_text(), intact);
        assert!(fw.check_and_repair(CheckDepth::Full).unwrap().is_none());
    }

    #[test]
    fn verify_finds_tampering_and_repair_converges() {
        let fake = FakeKernel::default();
        let fw = firewall(&fake);
        assert!(matches!(fw.verify(CheckDepth::Quick), Err(FirewallError::NothingApplied)));
        fw.apply(&policy(PolicyState::Enforced, &["198.18.0.2", "198.18.0.3"]), &safeguards()).unwrap();
        assert_eq!(fw.verify(CheckDepth::Quick).unwrap(), Vec::<String>::new());
        assert_eq!(fw.verify(CheckDepth::Full).unwrap(), Vec::<String>::new());
        let intact = (fake.filter_text(), fake.ipset_text());

        fake.tamper(Family::V4, "-D INPUT -m comment --comment \"ven:jump\" -j VEN-INPUT\n-F VEN-OUTPUT\n");
        assert_eq!(
            fw.verify(CheckDepth::Quick).unwrap(),
            ["IPv4: jump from INPUT to VEN-INPUT missing", "IPv4: VEN-OUTPUT: 5 rules missing, 0 unexpected"]
        );
        fake.clear_calls();
        fw.repair().unwrap();
        let restore = fake.calls().into_iter().find(|call| call.0 == "restore_filter").unwrap().1;
        assert!(restore.contains(":VEN-OUTPUT - [0:0]\n"), "{restore}");
        assert!(!restore.contains(":VEN-INPUT"), "only the damaged chain is rewritten: {restore}");
        assert!(restore.contains("-I INPUT 1 -m comment --comment \"ven:jump\" -j VEN-INPUT\n"), "{restore}");
        assert_eq!(fw.verify(CheckDepth::Full).unwrap(), Vec::<String>::new());
        assert_eq!(fake.filter_text(), intact.0);

        // A member swapped for another keeps the size: only the full check sees it.
        fake.set_ipset_text(&intact.1.replace("198.18.0.3", "198.18.0.99"));
        assert_eq!(fw.verify(CheckDepth::Quick).unwrap(), Vec::<String>::new());
        assert_eq!(fw.verify(CheckDepth::Full).unwrap(), ["set ven-1: 1 members missing, 1 unexpected"]);
        fake.set_ipset_text(&intact.1.replace("add ven-1 198.18.0.3\n", ""));
        assert_eq!(fw.verify(CheckDepth::Quick).unwrap(), ["set ven-1 holds 1 members, not 2"]);
        fw.repair().unwrap();
        assert_eq!(fake.ipset_text(), intact.1);
        fw.remove().unwrap();
        assert!(matches!(fw.repair(), Err(FirewallError::NothingApplied)));
    }

    #[test]
    fn quick_verify_skips_the_chains_while_the_generation_stands_still() {
        let fake = FakeKernel::default();
        let fw = Firewall::with_kernel(Box::new(fake.clone()), Options::default());
        fw.apply(&policy(PolicyState::Enforced, &["198.18.0.2", "2001:2::2"]), &safeguards()).unwrap();
        fake.clear_calls();
        assert_eq!(fw.verify(CheckDepth::Quick).unwrap(), Vec::<String>::new());
        assert_eq!(call_names(&fake), ["ipset_sizes"], "no family is read back after our apply");

        // The skip is real: a change the generation does not show goes unseen by quick checks,
        // the full check reads the chains and finds it.
        let rules = fake.filter_text_of(Family::V6).matches("-A VEN-OUTPUT ").count();
        let drift = format!("IPv6: VEN-OUTPUT: {rules} rules missing, 0 unexpected");
        fake.tamper_keeping_generation(Family::V6, "-F VEN-OUTPUT\n");
        assert_eq!(fw.verify(CheckDepth::Quick).unwrap(), Vec::<String>::new());
        fake.clear_calls();
        assert_eq!(fw.verify(CheckDepth::Full).unwrap(), [drift.as_str()]);
        assert_eq!(call_names(&fake), ["save_filter", "save_filter", "ipset_save"]);
        // Found drift forgets the generation: quick checks read the chains back until repaired.
        fake.clear_calls();
        assert_eq!(fw.verify(CheckDepth::Quick).unwrap(), [drift.as_str()]);
        assert_eq!(call_names(&fake), ["save_filter", "save_filter", "ipset_sizes"]);

        // Set sizes are checked whatever the generation says (ipset does not move it).
        fw.repair().unwrap();
        fake.set_ipset_text(&fake.ipset_text().replace("add ven-1 198.18.0.2\n", ""));
        fake.clear_calls();
        assert_eq!(fw.verify(CheckDepth::Quick).unwrap(), ["set ven-1 holds 0 members, not 1"]);
        assert_eq!(call_names(&fake), ["ipset_sizes"]);
    }

    #[test]
    fn a_moved_generation_means_a_full_comparison_then_skips_again() {
        let fake = FakeKernel::default();
        let fw = firewall(&fake);
        fw.apply(&policy(PolicyState::Enforced, &["198.18.0.2"]), &safeguards()).unwrap();
        // A foreign nf_tables change: the chains are compared, found right, and the new
        // generation is remembered.
        fake.commit_elsewhere();
        fake.clear_calls();
        assert_eq!(fw.verify(CheckDepth::Quick).unwrap(), Vec::<String>::new());
        assert_eq!(call_names(&fake), ["save_filter", "ipset_sizes"]);
        fake.clear_calls();
        assert_eq!(fw.verify(CheckDepth::Quick).unwrap(), Vec::<String>::new());
        assert_eq!(call_names(&fake), ["ipset_sizes"]);
        // Our rule deleted (the generation moves): found.
        let rules = iptables::parse_save(&fake.filter_text()).unwrap();
        let last = rules.rules.iter().rev().find(|rule| rule.chain == "VEN-INPUT").unwrap();
        fake.tamper(Family::V4, &format!("-D VEN-INPUT {}\n", last.spec));
        assert_eq!(fw.verify(CheckDepth::Quick).unwrap(), ["IPv4: VEN-INPUT: 1 rules missing, 0 unexpected"]);
    }

    #[test]
    fn without_a_generation_every_quick_check_compares() {
        let fake = FakeKernel::default();
        fake.set_generation(None);
        let fw = firewall(&fake);
        fw.apply(&policy(PolicyState::Enforced, &["198.18.0.2"]), &safeguards()).unwrap();
        for _ in 0..2 {
            fake.clear_calls();
            assert_eq!(fw.verify(CheckDepth::Quick).unwrap(), Vec::<String>::new());
            assert_eq!(call_names(&fake), ["save_filter", "ipset_sizes"]);
        }
        // The generation becomes unreadable after a clean check (the legacy tools, an error):
        // `None` never equals what was remembered.
        fake.set_generation(Some(7));
        fw.verify(CheckDepth::Quick).unwrap();
        fake.set_generation(None);
        fake.clear_calls();
        fw.verify(CheckDepth::Quick).unwrap();
        assert_eq!(call_names(&fake), ["save_filter", "ipset_sizes"]);
    }

    #[test]
    fn repair_remembers_the_generation_it_leaves() {
        let fake = FakeKernel::default();
        let fw = firewall(&fake);
        fw.apply(&policy(PolicyState::Enforced, &["198.18.0.2"]), &safeguards()).unwrap();
        fake.tamper(Family::V4, "-F VEN-OUTPUT\n");
        assert_eq!(
            fw.verify(CheckDepth::Quick).unwrap(),
            ["IPv4: VEN-OUTPUT: 5 rules missing, 0 unexpected"]
        );
        let before = fake.generation().unwrap();
        assert!(fw.repair().unwrap().changed);
        assert_eq!(fake.generation(), Some(before + 1), "one restore, one commit");
        fake.clear_calls();
        assert_eq!(fw.verify(CheckDepth::Quick).unwrap(), Vec::<String>::new());
        assert_eq!(call_names(&fake), ["ipset_sizes"], "the repair's own commit is not a change");
    }

    #[test]
    fn a_foreign_commit_during_our_apply_or_a_failed_apply_is_never_skipped() {
        let fake = FakeKernel::default();
        let fw = firewall(&fake);
        fake.commit_elsewhere_during_next_restore();
        fw.apply(&policy(PolicyState::Enforced, &["198.18.0.2"]), &safeguards()).unwrap();
        fake.clear_calls();
        fw.verify(CheckDepth::Quick).unwrap();
        assert_eq!(call_names(&fake), ["save_filter", "ipset_sizes"], "two commits, one ours");
        fake.clear_calls();
        fw.verify(CheckDepth::Quick).unwrap();
        assert_eq!(call_names(&fake), ["ipset_sizes"]);

        // A failed apply commits nothing here, yet what it did is doubt: compare.
        fake.fail_next_filter_restore("line 3 failed");
        fw.apply(&policy(PolicyState::Test, &["198.18.0.2"]), &safeguards()).unwrap_err();
        fake.clear_calls();
        assert_eq!(fw.verify(CheckDepth::Quick).unwrap(), Vec::<String>::new());
        assert_eq!(call_names(&fake), ["save_filter", "ipset_sizes"]);

        // A members-only change writes no rule: the remembered generation stands.
        fw.apply(&policy(PolicyState::Enforced, &["198.18.0.2", "198.18.0.3"]), &safeguards()).unwrap();
        fake.clear_calls();
        assert_eq!(fw.verify(CheckDepth::Quick).unwrap(), Vec::<String>::new());
        assert_eq!(call_names(&fake), ["ipset_sizes"]);
    }

    #[test]
    fn custom_rules_get_their_own_chain_and_go_with_the_policy() {
        let fake = FakeKernel::default();
        let fw = firewall(&fake);
        let mut with_custom = policy(PolicyState::Enforced, &[]);
        with_custom.custom_rules.push(CustomRule {
            id: 1,
            family: RuleFamily::Both,
            chain: CustomChain::Input,
            rule: "-p tcp --dport 9000 -j ACCEPT".into(),
        });
        fw.apply(&with_custom, &safeguards()).unwrap();
        let text = fake.filter_text();
        assert!(text.contains(":VEN-CUSTOM-IN - [0:0]"), "{text}");
        assert!(text.contains("-A VEN-CUSTOM-IN -p tcp --dport 9000 -m comment --comment \"ven:"), "{text}");
        fw.apply(&policy(PolicyState::Enforced, &[]), &safeguards()).unwrap();
        assert!(!fake.filter_text().contains("VEN-CUSTOM-IN"), "{}", fake.filter_text());
    }

    #[test]
    fn snapshot_leaves_ours_out_and_restoring_it_brings_the_host_back() {
        let fake = FakeKernel::default();
        let fw = firewall(&fake);
        Kernel::restore_filter(
            &fake,
            Family::V4,
            "*filter\n:HOST - [0:0]\n-A HOST -j RETURN\n-A INPUT -j HOST\nCOMMIT\n",
        )
        .unwrap();
        fake.set_ipset_text(
            "create host-set hash:ip family inet hashsize 1024 maxelem 65536\nadd host-set 198.18.5.5\n",
        );
        let before = fake.filter_text();
        fw.apply(&policy(PolicyState::Enforced, &["198.18.0.2"]), &safeguards()).unwrap();
        let snapshot = fw.snapshot().unwrap();
        assert!(!snapshot.v4.contains("VEN-") && !snapshot.ipsets.contains("ven-"), "{snapshot:?}");
        assert_eq!(snapshot.v6, None, "IPv6 is off on this board");
        Kernel::restore_filter(&fake, Family::V4, "*filter\n-D INPUT -j HOST\nCOMMIT\n").unwrap();
        fw.restore_snapshot(&snapshot).unwrap();
        assert_eq!(fake.filter_text(), before);
        assert!(fake.ipset_text().contains("add host-set 198.18.5.5"));
        assert!(!fake.ipset_text().contains("ven-"));
    }

    #[test]
    fn applied_text_shows_chains_per_family_and_set_sizes() {
        let fake = FakeKernel::default();
        let fw = Firewall::with_kernel(Box::new(fake.clone()), Options::default());
        assert_eq!(fw.applied_text(), "");
        fw.apply(&policy(PolicyState::Enforced, &["198.18.0.2", "2001:2::2"]), &safeguards()).unwrap();
        let text = fw.applied_text();
        assert!(text.starts_with("# IPv4\n*filter\n:VEN-INPUT - [0:0]\n"), "{text}");
        assert!(text.contains("# IPv6\n*filter\n"), "{text}");
        assert!(
            text.ends_with("# sets\nven-1 hash:net inet 1 members\nven-1-6 hash:net inet6 1 members\n"),
            "{text}"
        );
    }
}
