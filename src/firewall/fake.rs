//! A fake kernel for unit tests: a tiny model of table `filter` and of ipset that understands the
//! save/restore text the firewall writes, records every call, and fails on request. It models
//! what the firewall relies on: iptables-restore is atomic, `ipset restore` is not, and with
//! nf_tables every committed iptables change (ours or anyone's) moves the ruleset generation
//! while reads and ipset changes do not.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt as _;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, MutexGuard};

use super::kernel::{Kernel, excerpt};
use super::{Family, FirewallError};

#[derive(Clone, Default)]
pub(crate) struct FakeKernel {
    state: Arc<Mutex<State>>,
}

struct State {
    /// Per family: chains in creation order, each with its rule specs.
    chains: BTreeMap<Family, Vec<(String, Vec<String>)>>,
    /// Sets by name: header and member texts in insertion order.
    sets: BTreeMap<String, (String, Vec<String>)>,
    calls: Vec<(&'static str, String)>,
    fail_filter: Option<String>,
    /// Family whose next `restore_filter` fails (after the other family's may have succeeded).
    fail_filter_family: Option<Family>,
    fail_ipset_after: Option<usize>,
    /// The nf_tables ruleset generation; `None`: the legacy backend.
    generation: Option<u32>,
    /// The next successful restore is accompanied by someone else's commit.
    foreign_commit_with_next_restore: bool,
}

impl State {
    /// One committed nf_tables transaction (the kernel skips 0 when it wraps).
    fn commit(&mut self) {
        self.generation = self.generation.map(|g| g.checked_add(1).unwrap_or(1));
    }

    /// A restore of ours committed (and maybe someone else's change with it).
    fn committed(&mut self) {
        self.commit();
        if std::mem::take(&mut self.foreign_commit_with_next_restore) {
            self.commit();
        }
    }
}

impl Default for State {
    fn default() -> Self {
        Self {
            chains: Family::ALL
                .into_iter()
                .map(|family| {
                    (
                        family,
                        ["INPUT", "FORWARD", "OUTPUT"].iter().map(|c| (c.to_string(), Vec::new())).collect(),
                    )
                })
                .collect(),
            sets: BTreeMap::new(),
            calls: Vec::new(),
            fail_filter: None,
            fail_filter_family: None,
            fail_ipset_after: None,
            generation: Some(1),
            foreign_commit_with_next_restore: false,
        }
    }
}

fn failure() -> ExitStatus {
    ExitStatus::from_raw(1 << 8)
}

impl FakeKernel {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn calls(&self) -> Vec<(&'static str, String)> {
        self.lock().calls.clone()
    }

    pub(crate) fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// The next `restore_filter` fails with this stderr and changes nothing.
    pub(crate) fn fail_next_filter_restore(&self, stderr: &str) {
        self.lock().fail_filter = Some(stderr.to_string());
    }

    /// The next `restore_filter` of `family` fails with this stderr and changes nothing.
    pub(crate) fn fail_next_filter_restore_of(&self, family: Family, stderr: &str) {
        let mut state = self.lock();
        state.fail_filter = Some(stderr.to_string());
        state.fail_filter_family = Some(family);
    }

    /// Replaces table `filter` of `family` as `iptables-restore --noflush` would (a tamperer):
    /// one commit, the generation moves.
    pub(crate) fn tamper(&self, family: Family, input: &str) {
        self.tamper_keeping_generation(family, input);
        self.lock().commit();
    }

    /// As [`FakeKernel::tamper`], but the generation stays: a change nf_tables would not report
    /// (impossible with the real nft backend; it shows what a quick check skips).
    pub(crate) fn tamper_keeping_generation(&self, family: Family, input: &str) {
        let mut state = self.lock();
        let chains = state.chains.get_mut(&family).expect("family");
        apply_filter(chains, input).expect("tamper input");
    }

    /// Someone else commits an nf_tables change that is not ours to see (`nft add table ...`).
    pub(crate) fn commit_elsewhere(&self) {
        self.lock().commit();
    }

    /// Someone else commits while the next successful restore runs.
    pub(crate) fn commit_elsewhere_during_next_restore(&self) {
        self.lock().foreign_commit_with_next_restore = true;
    }

    /// The generation `ruleset_generation` reports; `None` models the legacy backend.
    pub(crate) fn set_generation(&self, generation: Option<u32>) {
        self.lock().generation = generation;
    }

    pub(crate) fn generation(&self) -> Option<u32> {
        self.lock().generation
    }

    /// The next `ipset_restore` applies `lines` lines, then fails on the one after.
    pub(crate) fn fail_ipset_restore_after_lines(&self, lines: usize) {
        self.lock().fail_ipset_after = Some(lines);
    }

    pub(crate) fn set_members(&self, name: &str) -> Option<Vec<String>> {
        self.lock().sets.get(name).map(|(_, members)| members.clone())
    }

    pub(crate) fn set_ipset_text(&self, text: &str) {
        let mut state = self.lock();
        state.sets.clear();
        apply_ipset(&mut state.sets, text, usize::MAX).expect("fake ipset text");
    }

    pub(crate) fn ipset_text(&self) -> String {
        render_sets(&self.lock().sets)
    }

    /// Table `filter` of IPv4 as iptables-save prints it.
    pub(crate) fn filter_text(&self) -> String {
        self.filter_text_of(Family::V4)
    }

    pub(crate) fn filter_text_of(&self, family: Family) -> String {
        let state = self.lock();
        let chains = &state.chains[&family];
        let mut text = String::from("*filter\n");
        for (name, _) in chains {
            let policy = if matches!(name.as_str(), "INPUT" | "FORWARD" | "OUTPUT") { "ACCEPT" } else { "-" };
            text.push_str(&format!(":{name} {policy} [0:0]\n"));
        }
        for (name, rules) in chains {
            for rule in rules {
                text.push_str(&format!("-A {name} {rule}\n"));
            }
        }
        text.push_str("COMMIT\n");
        text
    }
}

/// `ipset list -t` output of the fake's sets.
fn render_terse(sets: &BTreeMap<String, (String, Vec<String>)>) -> String {
    let mut text = String::new();
    for (name, (header, members)) in sets {
        let (kind, rest) = header.split_once(' ').unwrap_or((header.as_str(), ""));
        text.push_str(&format!(
            "Name: {name}\nType: {kind}\nRevision: 7\nHeader: {rest}\nSize in memory: 1\nReferences: 0\nNumber of entries: {}\n",
            members.len()
        ));
    }
    text
}

fn render_sets(sets: &BTreeMap<String, (String, Vec<String>)>) -> String {
    let mut text = String::new();
    for (name, (header, members)) in sets {
        text.push_str(&format!("create {name} {header}\n"));
        for member in members {
            text.push_str(&format!("add {name} {member}\n"));
        }
    }
    text
}

/// `ipset -exist restore` semantics; returns the number of the failing line.
fn apply_ipset(
    sets: &mut BTreeMap<String, (String, Vec<String>)>,
    input: &str,
    fail_after: usize,
) -> Result<(), usize> {
    for (index, line) in input.lines().enumerate() {
        if index >= fail_after {
            return Err(index + 1);
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["create", name, header @ ..] => {
                sets.entry(name.to_string()).or_insert_with(|| (header.join(" "), Vec::new()));
            }
            ["add", name, member] => {
                let (_, members) = sets.get_mut(*name).ok_or(index + 1)?;
                if !members.iter().any(|m| m == member) {
                    members.push(member.to_string());
                }
            }
            ["del", name, member] => {
                let (_, members) = sets.get_mut(*name).ok_or(index + 1)?;
                members.retain(|m| m != member);
            }
            ["destroy", name] => {
                sets.remove(*name);
            }
            ["flush", name] => {
                sets.get_mut(*name).ok_or(index + 1)?.1.clear();
            }
            ["swap", from, to] => {
                let first = sets.remove(*from).ok_or(index + 1)?;
                let second = sets.remove(*to).ok_or(index + 1)?;
                sets.insert(from.to_string(), second);
                sets.insert(to.to_string(), first);
            }
            [] => {}
            _ => return Err(index + 1),
        }
    }
    Ok(())
}

/// iptables-restore --noflush semantics for the commands the firewall writes; returns the
/// number of the failing line.
fn apply_filter(chains: &mut Vec<(String, Vec<String>)>, input: &str) -> Result<(), usize> {
    fn find<'a>(chains: &'a mut [(String, Vec<String>)], name: &str) -> Option<&'a mut Vec<String>> {
        chains.iter_mut().find(|(n, _)| n == name).map(|(_, rules)| rules)
    }
    for (index, line) in input.lines().enumerate() {
        let bad = index + 1;
        if line == "*filter" || line == "COMMIT" || line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(declaration) = line.strip_prefix(':') {
            let name = declaration.split_whitespace().next().ok_or(bad)?;
            match find(chains, name) {
                Some(rules) => rules.clear(),
                None => chains.push((name.to_string(), Vec::new())),
            }
            continue;
        }
        let (command, rest) = line.split_once(' ').ok_or(bad)?;
        let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
        match command {
            "-A" => find(chains, chain).ok_or(bad)?.push(spec.to_string()),
            "-I" => {
                let (position, spec) = spec.split_once(' ').ok_or(bad)?;
                let position: usize = position.parse().map_err(|_| bad)?;
                let rules = find(chains, chain).ok_or(bad)?;
                if position == 0 || position > rules.len() + 1 {
                    return Err(bad);
                }
                rules.insert(position - 1, spec.to_string());
            }
            "-D" => {
                let rules = find(chains, chain).ok_or(bad)?;
                let at = rules.iter().position(|rule| rule == spec).ok_or(bad)?;
                rules.remove(at);
            }
            "-F" => find(chains, chain).ok_or(bad)?.clear(),
            "-X" => {
                let referenced =
                    chains.iter().any(|(_, rules)| rules.iter().any(|r| r.ends_with(&format!("-j {chain}"))));
                let at = chains.iter().position(|(n, rules)| n == chain && rules.is_empty()).ok_or(bad)?;
                if referenced {
                    return Err(bad);
                }
                chains.remove(at);
            }
            _ => return Err(bad),
        }
    }
    Ok(())
}

impl Kernel for FakeKernel {
    fn save_filter(&self, family: Family) -> Result<String, FirewallError> {
        let text = self.filter_text_of(family);
        self.lock().calls.push(("save_filter", family.name().to_string()));
        Ok(text)
    }

    fn restore_filter(&self, family: Family, input: &str) -> Result<(), FirewallError> {
        let mut state = self.lock();
        state.calls.push(("restore_filter", input.to_string()));
        let mut chains = state.chains[&family].clone();
        let this_family = state.fail_filter_family.is_none_or(|f| f == family);
        let failure_now = if this_family { state.fail_filter.take() } else { None };
        if failure_now.is_some() {
            state.fail_filter_family = None;
        }
        let stderr = match failure_now {
            Some(stderr) => stderr,
            None => match apply_filter(&mut chains, input) {
                Ok(()) => {
                    state.chains.insert(family, chains);
                    state.committed();
                    return Ok(());
                }
                Err(line) => format!("fake iptables-restore: Error occurred at line: {line}"),
            },
        };
        Err(FirewallError::Restore {
            program: "iptables-restore".into(),
            table: "filter",
            status: failure(),
            input_excerpt: excerpt(input, &stderr),
            stderr,
        })
    }

    fn save_tables(&self, family: Family) -> Result<String, FirewallError> {
        let text = self.filter_text_of(family);
        self.lock().calls.push(("save_tables", family.name().to_string()));
        Ok(text)
    }

    /// A full restore of table `filter`: the chains become exactly what `input` declares.
    fn restore_tables(&self, family: Family, input: &str) -> Result<(), FirewallError> {
        let mut state = self.lock();
        state.calls.push(("restore_tables", input.to_string()));
        let mut chains = Vec::new();
        apply_filter(&mut chains, input).map_err(|line| FirewallError::Restore {
            program: "iptables-restore".into(),
            table: "all",
            status: failure(),
            input_excerpt: excerpt(input, &format!("line {line}")),
            stderr: format!("fake iptables-restore: Error occurred at line: {line}"),
        })?;
        state.chains.insert(family, chains);
        state.committed();
        Ok(())
    }

    fn ipset_sizes(&self) -> Result<BTreeMap<String, usize>, FirewallError> {
        let text = render_terse(&self.lock().sets);
        self.lock().calls.push(("ipset_sizes", String::new()));
        Ok(super::ipset::parse_terse(&text))
    }

    fn ipset_save(&self) -> Result<String, FirewallError> {
        let text = self.ipset_text();
        self.lock().calls.push(("ipset_save", String::new()));
        Ok(text)
    }

    fn ruleset_generation(&self) -> Option<u32> {
        self.lock().generation
    }

    fn ipset_restore(&self, input: &str) -> Result<(), FirewallError> {
        let mut state = self.lock();
        state.calls.push(("ipset_restore", input.to_string()));
        let fail_after = state.fail_ipset_after.take().unwrap_or(usize::MAX);
        match apply_ipset(&mut state.sets, input, fail_after) {
            Ok(()) => Ok(()),
            Err(line) => {
                let stderr = format!("fake ipset: Error in line {line}: refused");
                Err(FirewallError::IpsetRestore {
                    status: failure(),
                    input_excerpt: excerpt(input, &stderr),
                    stderr,
                })
            }
        }
    }
}
