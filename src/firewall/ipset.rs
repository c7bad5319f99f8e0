//! ipset: runs `ipset save` and `ipset restore`, reads the save output for our sets (`ven-*`),
//! computes the delta to the desired contents and renders it as one `ipset restore` session.
//!
//! Guarantees: only sets named `ven-*` are read or written; a set that stays is changed by adding
//! and deleting members, never flushed and refilled, so it is never briefly empty; the session
//! runs with `-exist`, so replaying a delta that was partly applied is harmless.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use ven_proto::IpNet;

use super::render::DesiredSets;
use super::{Family, FirewallError, MAX_SET_MEMBERS, kernel};

/// Prefix of every set we own.
pub(crate) const SET_PREFIX: &str = "ven-";

/// `maxelem` of the sets we create: twice what a policy may put in one, so that a delta's adds
/// fit before its deletes run (a limit, not preallocated memory).
const SET_MAXELEM: usize = 2 * MAX_SET_MEMBERS;

/// Runs `ipset save` (all sets: ipset cannot list by prefix).
pub(crate) fn save(program: &Path) -> Result<String, FirewallError> {
    let output = kernel::run(program, &["save"], None)?;
    if !output.status.success() {
        return Err(FirewallError::Save {
            command: format!("{} save", program.display()),
            status: output.status,
            stderr: kernel::stderr_text(&output.stderr),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
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

/// Whether an existing set can hold what we put in sets of `family`.
pub(crate) fn compatible(header: &str, family: Family) -> bool {
    let words: Vec<&str> = header.split_whitespace().collect();
    words.first() == Some(&"hash:net") && words.windows(2).any(|w| w == ["family", family.ipset_family()])
}

/// Reads our sets out of `ipset save` output; foreign sets are skipped.
pub(crate) fn parse_save(text: &str) -> Result<KernelSets, FirewallError> {
    let mut sets = KernelSets::new();
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
                sets.insert(name.to_string(), KernelSet { header, members: BTreeSet::new() });
            }
            "add" => {
                let member: IpNet = words.next().and_then(|text| text.parse().ok()).ok_or_else(malformed)?;
                let set = sets.get_mut(name).ok_or_else(malformed)?;
                set.members.insert(member.network());
            }
            _ => return Err(malformed()),
        }
    }
    Ok(sets)
}

/// A set of changes to our sets, in the order one `ipset restore` session applies them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SetPlan {
    family: Family,
    create: Vec<String>,
    delete: Vec<(String, IpNet)>,
    add: Vec<(String, IpNet)>,
    /// Sets to destroy, with how many members they held.
    destroy: Vec<(String, usize)>,
}

/// The changes that turn `current` into `desired`: missing sets are created, members added and
/// deleted, sets not desired destroyed.
pub(crate) fn plan(family: Family, current: &KernelSets, desired: &DesiredSets) -> SetPlan {
    let empty = BTreeSet::new();
    let mut plan =
        SetPlan { family, create: Vec::new(), delete: Vec::new(), add: Vec::new(), destroy: Vec::new() };
    for (name, wanted) in desired {
        let have = match current.get(name) {
            Some(set) => &set.members,
            None => {
                plan.create.push(name.clone());
                &empty
            }
        };
        plan.delete.extend(have.difference(wanted).map(|member| (name.clone(), *member)));
        plan.add.extend(wanted.difference(have).map(|member| (name.clone(), *member)));
    }
    for (name, set) in current {
        if !desired.contains_key(name) {
            plan.destroy.push((name.clone(), set.members.len()));
        }
    }
    plan
}

impl SetPlan {
    pub(crate) fn is_empty(&self) -> bool {
        self.create.is_empty() && self.delete.is_empty() && self.add.is_empty() && self.destroy.is_empty()
    }

    /// Splits off the destroys (which must wait until no rule refers to those sets).
    pub(crate) fn take_destroy(&mut self) -> SetPlan {
        SetPlan {
            family: self.family,
            create: Vec::new(),
            delete: Vec::new(),
            add: Vec::new(),
            destroy: std::mem::take(&mut self.destroy),
        }
    }

    pub(crate) fn added(&self) -> usize {
        self.add.len()
    }

    /// Members deleted, plus the members of destroyed sets.
    pub(crate) fn removed(&self) -> usize {
        self.delete.len() + self.destroy.iter().map(|(_, members)| members).sum::<usize>()
    }

    /// The `ipset restore` input: creates, then adds, then deletes, then destroys. Adding before
    /// deleting keeps an address matched throughout when a member is replaced by an overlapping
    /// one (a /24 by the /23 holding it); [`SET_MAXELEM`] leaves room for both at once.
    pub(crate) fn render(&self) -> String {
        let mut input = String::new();
        for name in &self.create {
            let _ = writeln!(
                input,
                "create {name} hash:net family {} hashsize 1024 maxelem {SET_MAXELEM}",
                self.family.ipset_family()
            );
        }
        for (name, member) in &self.add {
            let _ = writeln!(input, "add {name} {}", member_text(self.family, member));
        }
        for (name, member) in &self.delete {
            let _ = writeln!(input, "del {name} {}", member_text(self.family, member));
        }
        for (name, _) in &self.destroy {
            let _ = writeln!(input, "destroy {name}");
        }
        input
    }
}

/// A member as ipset prints it: a bare address for a host, `address/prefix` otherwise.
fn member_text(family: Family, member: &IpNet) -> String {
    if member.prefix() == family.host_prefix() { member.addr().to_string() } else { member.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured in a fresh network namespace (ipset v7.17) after applying the `enforced` golden
    /// policy next to a foreign set: `ip netns exec NS ipset save`
    const SAVED: &str = include_str!("testdata/ipset-save.txt");

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
        assert!(compatible(&one.header, Family::V4));
        assert_eq!(one.members, [net("198.18.0.2"), net("198.18.1.0/24")].into_iter().collect());
        assert!(sets["ven-3"].members.is_empty());
    }

    #[test]
    fn recognises_sets_we_cannot_use() {
        assert!(!compatible("hash:ip family inet hashsize 1024", Family::V4));
        assert!(!compatible("hash:net family inet6 hashsize 1024", Family::V4));
        assert!(!compatible("", Family::V4));
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
        let mut plan = plan(Family::V4, &current, &desired(&[("ven-2", &["198.18.0.2", "198.18.2.0/28"])]));
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
        assert!(plan(Family::V4, &current, &same).is_empty());
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
}
