//! ipset: runs `ipset save`, `ipset list -t` and `ipset restore`, reads the output for our sets
//! (`ven-*`), computes the changes to the desired contents and renders them as one `ipset
//! restore` session.
//!
//! Guarantees: only sets named `ven-*` are read or written; a set that stays is changed by adding
//! and deleting members, or, when that would rewrite most of it or its size limit changed, by
//! filling a temp set and swapping it in (`swap` exchanges the two atomically for the rules that
//! refer to the set); never flushed and refilled, so it is never briefly empty. The session runs
//! with `-exist`, so replaying a plan that was partly applied is harmless.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use ven_proto::IpNet;

use super::render::DesiredSets;
use super::{Family, FirewallError, kernel};

/// Prefix of every set we own.
pub(crate) const SET_PREFIX: &str = "ven-";
/// Suffix of our IPv6 sets (`ven-<id>-6`).
pub(crate) const V6_SUFFIX: &str = "-6";
/// Suffix of the temp set a full reload fills before swapping it in.
pub(crate) const TEMP_SUFFIX: &str = "-t";
/// `hashsize` of the sets we create: the initial bucket count; the kernel grows it.
const HASHSIZE: usize = 1024;

/// Runs `ipset save` (all sets: ipset cannot list by prefix).
pub(crate) fn save(program: &Path) -> Result<String, FirewallError> {
    kernel::listing(program, &["save"])
}

/// Runs `ipset list -t`: every set's header and size, without members (cheap).
pub(crate) fn list_terse(program: &Path) -> Result<String, FirewallError> {
    kernel::listing(program, &["list", "-t"])
}

/// Runs `ipset -exist restore` with `input`. ipset stops at the first failing line, after
/// applying the lines before it.
pub(crate) fn restore(program: &Path, input: &str) -> Result<(), FirewallError> {
    let output = kernel::run(program, &["-exist", "restore"], Some(input))?;
    if !output.status.success() {
        let stderr = kernel::stderr_text(&output.stderr);
        return Err(FirewallError::IpsetRestore {
            status: output.status,
            input_excerpt: kernel::excerpt(input, &stderr),
            stderr,
        });
    }
    Ok(())
}

/// One of our sets as the kernel holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KernelSet {
    /// Everything after `create <name> ` (type and options), e.g. `hash:net family inet ...`.
    pub header: String,
    pub members: BTreeSet<IpNet>,
}

/// Our sets in the kernel, by name.
pub(crate) type KernelSets = BTreeMap<String, KernelSet>;

/// Whether an existing set is of the type we use for `family` (its contents can be swapped
/// with a set we create).
pub(crate) fn same_type(header: &str, family: Family) -> bool {
    let words: Vec<&str> = header.split_whitespace().collect();
    words.first() == Some(&"hash:net") && words.windows(2).any(|w| w == ["family", family.ipset_family()])
}

/// The `maxelem` in a set header, if any.
fn maxelem_of(header: &str) -> Option<usize> {
    let words: Vec<&str> = header.split_whitespace().collect();
    words.windows(2).find(|w| w[0] == "maxelem").and_then(|w| w[1].parse().ok())
}

/// Reads our sets out of `ipset save` output; foreign sets are skipped.
pub(crate) fn parse_save(text: &str) -> Result<KernelSets, FirewallError> {
    // Members are gathered per set and the trees built once at the end (sorted, in bulk): a
    // 100k-member set costs a fraction of inserting them one by one.
    let mut sets: BTreeMap<String, (String, Vec<IpNet>)> = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        let mut words = line.split_whitespace();
        let (Some(command), Some(name)) = (words.next(), words.next()) else {
            continue;
        };
        if !name.starts_with(SET_PREFIX) {
            continue;
        }
        let malformed = || FirewallError::SaveOutput {
            command: "ipset save".into(),
            line: index + 1,
            text: line.to_string(),
        };
        match command {
            "create" => {
                let header = words.collect::<Vec<_>>().join(" ");
                sets.insert(name.to_string(), (header, Vec::new()));
            }
            "add" => {
                let member: IpNet = words.next().and_then(|text| text.parse().ok()).ok_or_else(malformed)?;
                let (_, members) = sets.get_mut(name).ok_or_else(malformed)?;
                members.push(member.network());
            }
            _ => return Err(malformed()),
        }
    }
    Ok(sets
        .into_iter()
        .map(|(name, (header, members))| (name, KernelSet { header, members: members.into_iter().collect() }))
        .collect())
}

/// Our sets' sizes out of `ipset list -t` output (`Name:` ... `Number of entries:` blocks).
pub(crate) fn parse_terse(text: &str) -> BTreeMap<String, usize> {
    let mut sizes = BTreeMap::new();
    let mut name: Option<&str> = None;
    for line in text.lines() {
        if let Some(value) = line.strip_prefix("Name:") {
            name = Some(value.trim()).filter(|name| name.starts_with(SET_PREFIX));
        } else if let Some(value) = line.strip_prefix("Number of entries:") {
            if let (Some(name), Ok(size)) = (name.take(), value.trim().parse()) {
                sizes.insert(name.to_string(), size);
            }
        }
    }
    sizes
}

/// `ipset save` output without our sets (for the pre-install snapshot).
pub(crate) fn without_ours(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let ours = line.split_whitespace().nth(1).is_some_and(|name| name.starts_with(SET_PREFIX));
        if !ours {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// How to put the host's sets back as a snapshot (`ipset save` text, without ours) holds them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SnapshotPlan {
    /// One `ipset restore` session: sets missing now are created and filled; sets present now
    /// are rebuilt in a temp set (`ven-snap-<n>`, ours by name) and swapped in.
    pub session: String,
    /// Foreign sets present now that the snapshot does not hold.
    pub created_since: Vec<String>,
}

/// Plans restoring the sets of `snapshot` over the sets `now` holds (both `ipset save` text).
pub(crate) fn snapshot_plan(snapshot: &str, now: &str) -> SnapshotPlan {
    let existing: BTreeSet<&str> = now
        .lines()
        .filter_map(|line| line.strip_prefix("create "))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter(|name| !name.starts_with(SET_PREFIX))
        .collect();
    let mut saved: Vec<&str> = Vec::new();
    let mut temp_of: BTreeMap<&str, String> = BTreeMap::new();
    let mut session = String::new();
    let mut swaps = String::new();
    for line in snapshot.lines() {
        let mut words = line.split_whitespace();
        let (Some(command), Some(name)) = (words.next(), words.next()) else { continue };
        if name.starts_with(SET_PREFIX) {
            continue;
        }
        let rest: Vec<&str> = words.collect();
        match command {
            "create" => {
                saved.push(name);
                if existing.contains(name) {
                    let temp = format!("{SET_PREFIX}snap-{}", temp_of.len());
                    let _ = writeln!(session, "create {temp} {}", rest.join(" "));
                    let _ = writeln!(session, "flush {temp}");
                    let _ = writeln!(swaps, "swap {temp} {name}\ndestroy {temp}");
                    temp_of.insert(name, temp);
                } else {
                    let _ = writeln!(session, "{line}");
                }
            }
            "add" => {
                let target = temp_of.get(name).map_or(name, String::as_str);
                let _ = writeln!(session, "add {target} {}", rest.join(" "));
            }
            _ => {}
        }
    }
    session.push_str(&swaps);
    let created_since =
        existing.iter().filter(|name| !saved.contains(name)).map(|name| name.to_string()).collect();
    SnapshotPlan { session, created_since }
}

/// One set rebuilt in a temp set and swapped in.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Reload {
    name: String,
    family: Family,
    members: Vec<IpNet>,
}

/// A set of changes to our sets, in the order one `ipset restore` session applies them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SetPlan {
    /// New sets: name, family, maxelem.
    create: Vec<(String, Family, usize)>,
    delete: Vec<(String, Family, IpNet)>,
    add: Vec<(String, Family, IpNet)>,
    /// Full reloads (temp set + swap), with the maxelem they get.
    reload: Vec<(Reload, usize)>,
    /// Sets to destroy, with how many members they held.
    destroy: Vec<(String, usize)>,
    /// Members a reload adds and removes compared with the set it replaces (for the summary).
    reload_added: usize,
    reload_removed: usize,
}

/// The changes that turn the sets of `family` in `current` into `desired`: missing sets are
/// created, members added and deleted (or the set rebuilt and swapped when that rewrites more
/// than it keeps, or its `maxelem` is not `maxelem`), sets not desired destroyed (leftover
/// temp sets included).
pub(crate) fn plan(family: Family, current: &KernelSets, desired: &DesiredSets, maxelem: usize) -> SetPlan {
    let mut plan = SetPlan::default();
    for (name, wanted) in desired {
        let have = current.get(name).map(|set| (&set.members, maxelem_of(&set.header) != Some(maxelem)));
        plan.change(family, name, have, Some(wanted), maxelem);
    }
    for (name, set) in current.iter().filter(|(name, _)| family.owns_set(name)) {
        if !desired.contains_key(name) {
            plan.change(family, name, Some((&set.members, false)), None, maxelem);
        }
    }
    plan
}

impl SetPlan {
    /// Plans one set from `have` (its members and whether its `maxelem` differs from `maxelem`;
    /// `None`: it does not exist) to `wanted` (`None`: it goes).
    pub(crate) fn change(
        &mut self,
        family: Family,
        name: &str,
        have: Option<(&BTreeSet<IpNet>, bool)>,
        wanted: Option<&BTreeSet<IpNet>>,
        maxelem: usize,
    ) {
        match (have, wanted) {
            (None, None) => {}
            (Some((have, _)), None) => self.destroy.push((name.to_string(), have.len())),
            (None, Some(wanted)) => {
                self.create.push((name.to_string(), family, maxelem));
                self.add.extend(wanted.iter().map(|member| (name.to_string(), family, *member)));
            }
            (Some((have, resize)), Some(wanted)) => {
                let adds: Vec<IpNet> = wanted.difference(have).copied().collect();
                let deletes: Vec<IpNet> = have.difference(wanted).copied().collect();
                let churn = adds.len() + deletes.len();
                if resize || (churn > wanted.len() && !wanted.is_empty()) {
                    self.reload_added += adds.len();
                    self.reload_removed += deletes.len();
                    let reload =
                        Reload { name: name.to_string(), family, members: wanted.iter().copied().collect() };
                    self.reload.push((reload, maxelem));
                } else {
                    self.delete.extend(deletes.into_iter().map(|member| (name.to_string(), family, member)));
                    self.add.extend(adds.into_iter().map(|member| (name.to_string(), family, member)));
                }
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.create.is_empty()
            && self.delete.is_empty()
            && self.add.is_empty()
            && self.reload.is_empty()
            && self.destroy.is_empty()
    }

    /// Appends another plan (another family's) to this one.
    pub(crate) fn extend(&mut self, other: SetPlan) {
        self.create.extend(other.create);
        self.delete.extend(other.delete);
        self.add.extend(other.add);
        self.reload.extend(other.reload);
        self.destroy.extend(other.destroy);
        self.reload_added += other.reload_added;
        self.reload_removed += other.reload_removed;
    }

    /// Splits off the destroys (which must wait until no rule refers to those sets).
    pub(crate) fn take_destroy(&mut self) -> SetPlan {
        SetPlan { destroy: std::mem::take(&mut self.destroy), ..SetPlan::default() }
    }

    pub(crate) fn added(&self) -> usize {
        self.add.len() + self.reload_added
    }

    /// Members deleted, plus the members of destroyed sets.
    pub(crate) fn removed(&self) -> usize {
        self.delete.len()
            + self.reload_removed
            + self.destroy.iter().map(|(_, members)| members).sum::<usize>()
    }

    /// The `ipset restore` input: creates, then adds, then deletes, then reloads, then destroys.
    /// Adding before deleting keeps an address matched throughout when a member is replaced by
    /// an overlapping one (a /24 by the /23 holding it); `maxelem` is twice a set's cap, leaving
    /// room for both at once. A reload fills `<name>-t` (flushed first: it may be left over from
    /// an interrupted run; it is never referenced), swaps it with the set and destroys it.
    pub(crate) fn render(&self) -> String {
        let mut input = String::new();
        for (name, family, maxelem) in &self.create {
            let _ = writeln!(input, "{}", create_line(name, *family, *maxelem));
        }
        for (name, family, member) in &self.add {
            let _ = writeln!(input, "add {name} {}", member_text(*family, member));
        }
        for (name, family, member) in &self.delete {
            let _ = writeln!(input, "del {name} {}", member_text(*family, member));
        }
        for (reload, maxelem) in &self.reload {
            let temp = format!("{}{TEMP_SUFFIX}", reload.name);
            let _ = writeln!(input, "{}", create_line(&temp, reload.family, *maxelem));
            let _ = writeln!(input, "flush {temp}");
            for member in &reload.members {
                let _ = writeln!(input, "add {temp} {}", member_text(reload.family, member));
            }
            let _ = writeln!(input, "swap {temp} {}", reload.name);
            let _ = writeln!(input, "destroy {temp}");
        }
        for (name, _) in &self.destroy {
            let _ = writeln!(input, "destroy {name}");
        }
        input
    }
}

fn create_line(name: &str, family: Family, maxelem: usize) -> String {
    format!("create {name} {}", header(family, maxelem))
}

/// The header (type and options) of the sets we create, as `create` takes it.
pub(crate) fn header(family: Family, maxelem: usize) -> String {
    format!("hash:net family {} hashsize {HASHSIZE} maxelem {maxelem}", family.ipset_family())
}

/// A member as ipset prints it: a bare address for a host, `address/prefix` otherwise.
fn member_text(family: Family, member: &IpNet) -> String {
    if member.prefix() == family.host_prefix() { member.addr().to_string() } else { member.to_string() }
}

/// Fuzzing (the `ipset_save` target): `text` as the `ipset save` output a full tamper check, an
/// apply or a snapshot reads. Never a panic; only our sets come out, plans against them render,
/// the snapshot text without ours parses to no set of ours, and a snapshot restored over the
/// same sets finds none created since.
#[doc(hidden)]
pub fn fuzz_save(text: &str) {
    if let Ok(sets) = parse_save(text) {
        assert!(sets.keys().all(|name| name.starts_with(SET_PREFIX)));
        for family in Family::ALL {
            for set in sets.values() {
                let _ = (same_type(&set.header, family), maxelem_of(&set.header));
            }
            let _ = plan(family, &sets, &DesiredSets::new(), 0).render();
            let kept: DesiredSets = sets
                .iter()
                .filter(|(name, _)| family.owns_set(name))
                .map(|(name, set)| (name.clone(), set.members.clone()))
                .collect();
            let update = plan(family, &sets, &kept, 1024);
            assert_eq!((update.added(), update.removed()), (0, 0));
            let _ = update.render();
        }
    }
    let snapshot = without_ours(text);
    assert!(parse_save(&snapshot).is_ok_and(|sets| sets.is_empty()), "{snapshot:?}");
    assert!(snapshot_plan(&snapshot, &snapshot).created_since.is_empty());
    let _ = snapshot_plan(text, "");
}

/// Fuzzing (the `ipset_list` target): `text` as `ipset list -t` (or `ipset list`) output, read on
/// every quick tamper check where the kernel lacks IPSET_ATTR_ELEMENTS. Only our sets come out.
#[doc(hidden)]
pub fn fuzz_list(text: &str) {
    let sizes = parse_terse(text);
    assert!(sizes.keys().all(|name| name.starts_with(SET_PREFIX)));
    assert!(sizes.len() <= text.matches("Number of entries:").count());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured in a fresh network namespace (ipset v7.17) after applying the `enforced` golden
    /// policy next to a foreign set: `ip netns exec NS ipset save`
    const SAVED: &str = include_str!("testdata/ipset-save.txt");

    /// The maxelem of the captured sets.
    const MAXELEM: usize = 131072;

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    fn desired(sets: &[(&str, &[&str])]) -> DesiredSets {
        sets.iter()
            .map(|(name, members)| (name.to_string(), members.iter().map(|m| net(m)).collect()))
            .collect()
    }

    #[test]
    fn parses_our_sets_from_a_capture_and_skips_foreign_ones() {
        let sets = parse_save(SAVED).unwrap();
        assert_eq!(sets.keys().collect::<Vec<_>>(), ["ven-1", "ven-2", "ven-3"]);
        let one = &sets["ven-1"];
        assert!(
            one.header.starts_with("hash:net family inet hashsize 1024 maxelem 131072"),
            "{}",
            one.header
        );
        assert!(same_type(&one.header, Family::V4));
        assert_eq!(one.members, [net("198.18.0.2"), net("198.18.1.0/24")].into_iter().collect());
        assert!(sets["ven-3"].members.is_empty());
    }

    #[test]
    fn recognises_sets_we_cannot_use() {
        assert!(!same_type("hash:ip family inet hashsize 1024", Family::V4));
        assert!(!same_type("hash:net family inet6 hashsize 1024", Family::V4));
        assert!(same_type("hash:net family inet6 hashsize 1024", Family::V6));
        assert!(!same_type("", Family::V4));
    }

    #[test]
    fn delta_adds_and_deletes_members_and_never_flushes() {
        let current = parse_save(SAVED).unwrap();
        let mut plan = plan(
            Family::V4,
            &current,
            &desired(&[
                ("ven-1", &["198.18.0.2", "198.18.0.7"]),
                ("ven-2", &["198.18.0.2/32", "198.18.2.0/28"]),
                ("ven-3", &[]),
                ("ven-4", &["198.18.4.0/22"]),
            ]),
            MAXELEM,
        );
        assert_eq!(plan.added(), 2);
        assert_eq!(plan.removed(), 1);
        assert_eq!(
            plan.render(),
            "create ven-4 hash:net family inet hashsize 1024 maxelem 131072\n\
             add ven-1 198.18.0.7\n\
             add ven-4 198.18.4.0/22\n\
             del ven-1 198.18.1.0/24\n"
        );
        assert!(plan.take_destroy().is_empty());
    }

    #[test]
    fn sets_no_longer_wanted_are_destroyed_separately() {
        let current = parse_save(SAVED).unwrap();
        let mut plan =
            plan(Family::V4, &current, &desired(&[("ven-2", &["198.18.0.2", "198.18.2.0/28"])]), MAXELEM);
        let stale = plan.take_destroy();
        assert!(plan.is_empty());
        assert_eq!(stale.render(), "destroy ven-1\ndestroy ven-3\n");
        assert_eq!(stale.removed(), 2);
    }

    #[test]
    fn identical_state_needs_nothing() {
        let current = parse_save(SAVED).unwrap();
        let same: DesiredSets =
            current.iter().map(|(name, set)| (name.clone(), set.members.clone())).collect();
        assert!(plan(Family::V4, &current, &same, MAXELEM).is_empty());
    }

    #[test]
    fn malformed_lines_of_our_sets_are_errors() {
        let err = parse_save("create ven-1 hash:net family inet\nadd ven-1 not-an-address\n").unwrap_err();
        assert!(matches!(err, FirewallError::SaveOutput { line: 2, .. }), "{err}");
        assert!(parse_save("add ven-9 198.18.0.1\n").is_err(), "member of a set never created");
        assert!(
            parse_save("add foreign whatever\n").unwrap().is_empty(),
            "foreign lines are not ours to judge"
        );
    }

    #[test]
    fn most_of_a_set_rewritten_or_resized_is_rebuilt_and_swapped() {
        let current = parse_save(SAVED).unwrap();
        let fresh = ["198.18.7.1", "198.18.7.2", "198.18.7.3"];
        let plan_ = plan(
            Family::V4,
            &current,
            &desired(&[("ven-1", &fresh), ("ven-2", &[]), ("ven-3", &[])]),
            MAXELEM,
        );
        assert_eq!(
            plan_.render(),
            "del ven-2 198.18.0.2\n\
             del ven-2 198.18.2.0/28\n\
             create ven-1-t hash:net family inet hashsize 1024 maxelem 131072\n\
             flush ven-1-t\n\
             add ven-1-t 198.18.7.1\nadd ven-1-t 198.18.7.2\nadd ven-1-t 198.18.7.3\n\
             swap ven-1-t ven-1\n\
             destroy ven-1-t\n"
        );
        assert_eq!((plan_.added(), plan_.removed()), (3, 4));
        let resized = plan(Family::V4, &current, &desired(&[("ven-3", &[])]), 2 * MAXELEM);
        assert!(
            resized
                .render()
                .starts_with("create ven-3-t hash:net family inet hashsize 1024 maxelem 262144\n")
        );
        assert!(!resized.render().contains("flush ven-3\n"), "never the live set");
    }

    #[test]
    fn a_family_plans_only_its_own_sets() {
        let mut current = parse_save(SAVED).unwrap();
        current.insert(
            "ven-1-6".into(),
            KernelSet { header: "hash:net family inet6".into(), members: BTreeSet::new() },
        );
        current.insert(
            "ven-9-t".into(),
            KernelSet { header: "hash:net family inet".into(), members: BTreeSet::new() },
        );
        let v4 = plan(Family::V4, &current, &DesiredSets::new(), MAXELEM);
        assert_eq!(v4.render(), "destroy ven-1\ndestroy ven-2\ndestroy ven-3\ndestroy ven-9-t\n");
        let v6 = plan(Family::V6, &current, &desired(&[("ven-2-6", &["2001:2::/64"])]), MAXELEM);
        assert_eq!(
            v6.render(),
            "create ven-2-6 hash:net family inet6 hashsize 1024 maxelem 131072\nadd ven-2-6 2001:2::/64\ndestroy ven-1-6\n"
        );
    }

    #[test]
    fn terse_listing_gives_our_set_sizes() {
        let text = "Name: ven-1\nType: hash:net\nRevision: 7\nHeader: family inet hashsize 1024 maxelem 100\n\
                    Size in memory: 504\nReferences: 1\nNumber of entries: 2\n\
                    Name: foreign\nType: hash:ip\nNumber of entries: 9\n\
                    Name: ven-1-6\nType: hash:net\nNumber of entries: 0\n";
        let sizes = parse_terse(text);
        assert_eq!(
            sizes.into_iter().collect::<Vec<_>>(),
            [("ven-1".to_string(), 2), ("ven-1-6".to_string(), 0)]
        );
    }

    #[test]
    fn the_snapshot_keeps_foreign_sets_only() {
        let kept = without_ours(SAVED);
        assert!(
            kept.contains("create foreign-set hash:ip family inet hashsize 1024 maxelem 65536"),
            "{kept}"
        );
        assert!(kept.contains("add foreign-set 10.0.0.1\n"), "{kept}");
        assert!(!kept.contains("ven-"), "{kept}");
    }

    #[test]
    fn a_snapshot_is_restored_exactly_without_emptying_a_set() {
        let snapshot = "create keep hash:ip family inet hashsize 1024 maxelem 65536\nadd keep 198.18.9.1\n\
                        create gone hash:net family inet hashsize 1024 maxelem 65536\nadd gone 198.18.8.0/24\n";
        let now = "create keep hash:ip family inet hashsize 1024 maxelem 65536\nadd keep 198.18.9.1\nadd keep 198.18.9.2\n\
                   create late hash:ip family inet hashsize 1024 maxelem 65536\n\
                   create ven-1 hash:net family inet hashsize 1024 maxelem 262144\n";
        let plan = snapshot_plan(snapshot, now);
        assert_eq!(
            plan.session,
            "create ven-snap-0 hash:ip family inet hashsize 1024 maxelem 65536\nflush ven-snap-0\nadd ven-snap-0 198.18.9.1\n\
             create gone hash:net family inet hashsize 1024 maxelem 65536\nadd gone 198.18.8.0/24\n\
             swap ven-snap-0 keep\ndestroy ven-snap-0\n"
        );
        assert_eq!(plan.created_since, ["late"], "ours are not the snapshot's business");
        assert_eq!(snapshot_plan("", ""), SnapshotPlan::default());
    }
}
