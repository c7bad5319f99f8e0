//! iptables: runs `iptables-save` and `iptables-restore` (or the ip6tables pair), reads the save
//! output for our chains and jumps, compares them with what we want, and builds the restore input
//! that replaces our chains and puts our jumps right.
//!
//! Guarantees: the restore input names only our chains (`VEN-*`) and rules that jump to them, so
//! foreign chains and rules are never touched; it is one table in one transaction
//! (iptables-restore commits a table atomically or not at all). Read-back recognises our rules by
//! their hash comment (the Felix way), so the kernel's rewriting of a rule's text (`-p tcp
//! --dport` becomes `-p tcp -m tcp --dport`) never looks like a change.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use super::render::{JUMP_COMMENT, OurChain, jump_spec};
use super::{FirewallError, kernel};

/// Prefix of every chain we own.
pub(crate) const CHAIN_PREFIX: &str = "VEN-";

/// How long iptables-restore waits for the xtables lock (legacy backend) before failing, so a
/// stuck holder cannot hang the agent.
const LOCK_WAIT: &str = "--wait=30";
/// Attempts of one restore that fails for a passing reason (exit status 4: resource problem,
/// such as the lock or a concurrent nft transaction), with the first delay, doubling.
const RESTORE_ATTEMPTS: u32 = 5;
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(50);
/// iptables-restore's exit status for a resource problem (xtables.h `RESOURCE_PROBLEM`).
const RESOURCE_PROBLEM: i32 = 4;

/// Runs `<save program> [-t filter]`: one table, or all of them when `table` is `None`.
pub(crate) fn save(program: &Path, table: Option<&str>) -> Result<String, FirewallError> {
    let args: Vec<&str> = table.map(|table| vec!["-t", table]).unwrap_or_default();
    kernel::listing(program, &args)
}

/// Runs `<restore program> --noflush` with `input` (one table), or without `--noflush` when
/// `flush` (a full restore of every table in `input`). Retries a passing failure with backoff;
/// a rejected input fails at once.
pub(crate) fn restore(
    program: &Path,
    table: &'static str,
    input: &str,
    flush: bool,
) -> Result<(), FirewallError> {
    let args: &[&str] = if flush { &[LOCK_WAIT] } else { &["--noflush", LOCK_WAIT] };
    let mut delay = FIRST_RETRY_DELAY;
    for attempt in 1..=RESTORE_ATTEMPTS {
        let output = kernel::run(program, args, Some(input))?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = kernel::stderr_text(&output.stderr);
        if output.status.code() == Some(RESOURCE_PROBLEM) && attempt < RESTORE_ATTEMPTS {
            log::warn!("{} busy (attempt {attempt}): {stderr}; retrying in {delay:?}", program.display());
            std::thread::sleep(delay);
            delay *= 2;
            continue;
        }
        return Err(FirewallError::Restore {
            program: program.to_path_buf(),
            table,
            status: output.status,
            input_excerpt: kernel::excerpt(input, &stderr),
            stderr,
        });
    }
    unreachable!("the last attempt returns")
}

/// One rule of the save output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SavedRule {
    pub chain: String,
    /// Everything after `-A <chain> `, as iptables-restore accepts it back.
    pub spec: String,
}

impl SavedRule {
    /// The chain this rule jumps or goes to, if any.
    pub(crate) fn target(&self) -> Option<String> {
        let words = split_words(&self.spec);
        let at = words.iter().rposition(|w| matches!(w.as_str(), "-j" | "--jump" | "-g" | "--goto"))?;
        words.get(at + 1).cloned()
    }

    fn jumps_to_ours(&self) -> bool {
        !self.chain.starts_with(CHAIN_PREFIX) && self.target().is_some_and(|t| t.starts_with(CHAIN_PREFIX))
    }
}

/// Table `filter` as `iptables-save -t filter` printed it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FilterState {
    /// Every chain, built-in and user-defined, in save order.
    pub chains: Vec<String>,
    /// Every rule, in save order (per chain, the kernel's order).
    pub rules: Vec<SavedRule>,
}

/// Parses the `*filter` section of `iptables-save` output (other tables are skipped).
pub(crate) fn parse_save(text: &str) -> Result<FilterState, FirewallError> {
    let mut state = FilterState::default();
    let mut in_filter = false;
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(table) = line.strip_prefix('*') {
            in_filter = table == "filter";
            continue;
        }
        if !in_filter {
            continue;
        }
        let malformed = || FirewallError::SaveOutput {
            command: "iptables-save -t filter".into(),
            line: index + 1,
            text: line.to_string(),
        };
        if line == "COMMIT" {
            in_filter = false;
        } else if let Some(declaration) = line.strip_prefix(':') {
            let name = declaration.split_whitespace().next().ok_or_else(malformed)?;
            state.chains.push(name.to_string());
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, spec) = rule.split_once(' ').ok_or_else(malformed)?;
            state.rules.push(SavedRule { chain: chain.to_string(), spec: spec.trim().to_string() });
        } else {
            return Err(malformed());
        }
    }
    Ok(state)
}

/// The iptables-restore input that makes our chains exactly `chains`, leaves one jump to each
/// hooked chain at rule 1 of its hook, and removes our chains that are not in `chains`.
/// Declaring a chain flushes it (or creates it): our rules are replaced in the same transaction,
/// with no moment where the chain is empty.
pub(crate) fn restore_input(chains: &[OurChain], current: &FilterState) -> String {
    let mut input = String::from("*filter\n");
    // Only the chains that differ are rewritten (Felix writes only dirty chains): repairing a
    // flushed VEN-INPUT of a large ruleset need not rewrite VEN-OUTPUT too.
    let dirty: Vec<&OurChain> = chains.iter().filter(|chain| !holds(chain, current)).collect();
    for chain in &dirty {
        let _ = writeln!(input, ":{} - [0:0]", chain.name);
    }
    for chain in &dirty {
        for rule in &chain.rules {
            input.push_str(rule);
            input.push('\n');
        }
    }
    for chain in chains {
        if let Some(hook) = &chain.hook {
            for line in jump_fixes(current, hook, &chain.name) {
                input.push_str(&line);
                input.push('\n');
            }
        }
    }
    let stale: Vec<&String> = current
        .chains
        .iter()
        .filter(|name| name.starts_with(CHAIN_PREFIX) && !chains.iter().any(|chain| &chain.name == *name))
        .collect();
    for rule in current.rules.iter().filter(|rule| !rule.chain.starts_with(CHAIN_PREFIX)) {
        if rule.target().is_some_and(|target| stale.contains(&&target)) {
            let _ = writeln!(input, "-D {} {}", rule.chain, rule.spec);
        }
    }
    // Flush all before deleting any: stale chains may refer to each other.
    for name in &stale {
        let _ = writeln!(input, "-F {name}");
    }
    for name in &stale {
        let _ = writeln!(input, "-X {name}");
    }
    input.push_str("COMMIT\n");
    input
}

/// Whether the kernel holds `chain` exactly: declared, with our rules' hashes in order and
/// nothing else.
fn holds(chain: &OurChain, current: &FilterState) -> bool {
    current.chains.contains(&chain.name) && {
        let have =
            current.rules.iter().filter(|rule| rule.chain == chain.name).map(|rule| hash_of(&rule.spec));
        have.eq(chain.rules.iter().map(|rule| hash_of(rule)))
    }
}

/// The `ven:<hash>` comment of a rule (a full `-A` line or a saved spec), if it has one.
pub(crate) fn hash_of(rule: &str) -> Option<&str> {
    // A whole word: "--comment" inside another word (a custom rule's `-d--comment`) is not it;
    // the word itself is forbidden in custom rules, so the only one is ours.
    let at = rule.find(" --comment ")? + " --comment ".len();
    let rest = rule[at..].trim_start_matches('"');
    let hash = rest.strip_prefix("ven:")?.get(..16)?;
    hash.bytes().all(|b| b.is_ascii_hexdigit()).then_some(hash)
}

/// How the kernel differs from `chains` (our chains, rule hashes in order, jumps at rule 1 of
/// their hooks, no other chain of ours), one line per difference; empty when it holds exactly
/// `chains` and an apply has nothing to write.
pub(crate) fn drift(chains: &[OurChain], current: &FilterState) -> Vec<String> {
    let mut differences = Vec::new();
    for chain in chains {
        if !current.chains.contains(&chain.name) {
            differences.push(format!("chain {} missing", chain.name));
        } else {
            let want: Vec<Option<&str>> = chain.rules.iter().map(|rule| hash_of(rule)).collect();
            let have: Vec<Option<&str>> = current
                .rules
                .iter()
                .filter(|rule| rule.chain == chain.name)
                .map(|rule| hash_of(&rule.spec))
                .collect();
            if have != want {
                let mut wanted: HashMap<Option<&str>, usize> = HashMap::new();
                for hash in &want {
                    *wanted.entry(*hash).or_default() += 1;
                }
                let mut unexpected = 0;
                for hash in &have {
                    match wanted.get_mut(hash) {
                        Some(count) if *count > 0 && hash.is_some() => *count -= 1,
                        _ => unexpected += 1,
                    }
                }
                let missing: usize = wanted.values().sum();
                if missing + unexpected == 0 {
                    differences.push(format!("rules of {} reordered", chain.name));
                } else {
                    differences
                        .push(format!("{}: {missing} rules missing, {unexpected} unexpected", chain.name));
                }
            }
        }
        if let Some(hook) = &chain.hook {
            if !jump_fixes(current, hook, &chain.name).is_empty() {
                let jumps = current
                    .rules
                    .iter()
                    .filter(|rule| {
                        rule.chain == *hook && rule.target().as_deref() == Some(chain.name.as_str())
                    })
                    .count();
                differences.push(match jumps {
                    0 => format!("jump from {hook} to {} missing", chain.name),
                    _ => format!("jump from {hook} to {} not alone at rule 1", chain.name),
                });
            }
        }
    }
    for name in &current.chains {
        if name.starts_with(CHAIN_PREFIX) && !chains.iter().any(|chain| chain.name == *name) {
            differences.push(format!("unexpected chain {name}"));
        }
    }
    differences
}

/// Our chains and hooks as `state` holds them, in a form [`restore_input`] can write back.
pub(crate) fn ours(state: &FilterState) -> Vec<OurChain> {
    state
        .chains
        .iter()
        .filter(|name| name.starts_with(CHAIN_PREFIX))
        .map(|name| OurChain {
            name: name.clone(),
            hook: state
                .rules
                .iter()
                .find(|rule| {
                    !rule.chain.starts_with(CHAIN_PREFIX)
                        && rule.spec == jump_spec(name)
                        && rule.target().as_deref() == Some(name.as_str())
                })
                .map(|rule| rule.chain.clone()),
            rules: state
                .rules
                .iter()
                .filter(|rule| rule.chain == *name)
                .map(|rule| format!("-A {name} {}", rule.spec))
                .collect(),
        })
        .collect()
}

/// The input that turns our chains in `now` back into those of `previous`, or `None` when they
/// already are.
pub(crate) fn rollback_input(previous: &FilterState, now: &FilterState) -> Option<String> {
    let chains = ours(previous);
    if chains.is_empty() {
        return removal_input(now);
    }
    let same = ours(now) == chains && drift(&chains, now).is_empty();
    (!same).then(|| restore_input(&chains, now))
}

/// Lines that leave exactly one canonical jump from `hook` to `chain`, at rule 1.
///
/// Copies are deleted by their exact rule text (never by number, which could name a foreign rule
/// if the chain changed since the save), then the canonical jump is inserted at 1; both happen in
/// the same transaction, so traffic never bypasses our chain.
pub(crate) fn jump_fixes(current: &FilterState, hook: &str, chain: &str) -> Vec<String> {
    let canonical = jump_spec(chain);
    let in_hook: Vec<&SavedRule> = current.rules.iter().filter(|rule| rule.chain == hook).collect();
    let copies: Vec<(usize, &SavedRule)> = in_hook
        .iter()
        .enumerate()
        .filter(|(_, rule)| rule.target().as_deref() == Some(chain))
        .map(|(index, rule)| (index + 1, *rule))
        .collect();
    if let [(1, only)] = copies.as_slice() {
        if only.spec == canonical {
            return Vec::new();
        }
    }
    let mut lines: Vec<String> = copies.iter().map(|(_, rule)| format!("-D {hook} {}", rule.spec)).collect();
    lines.push(format!("-I {hook} 1 {canonical}"));
    lines
}

/// The iptables-restore input that removes every jump to our chains and then our chains, or
/// `None` when nothing of ours is present.
pub(crate) fn removal_input(current: &FilterState) -> Option<String> {
    let ours: Vec<&String> = current.chains.iter().filter(|chain| chain.starts_with(CHAIN_PREFIX)).collect();
    let jumps: Vec<&SavedRule> = current.rules.iter().filter(|rule| rule.jumps_to_ours()).collect();
    if ours.is_empty() && jumps.is_empty() {
        return None;
    }
    let mut input = String::from("*filter\n");
    for rule in jumps {
        let _ = writeln!(input, "-D {} {}", rule.chain, rule.spec);
    }
    // Flush all before deleting any: our chains may refer to each other.
    for chain in &ours {
        let _ = writeln!(input, "-F {chain}");
    }
    for chain in &ours {
        let _ = writeln!(input, "-X {chain}");
    }
    input.push_str("COMMIT\n");
    Some(input)
}

/// Full `iptables-save` output (all tables) without our chains, our rules and jumps to them:
/// the host's own firewall, as `iptables-restore` takes it back.
pub(crate) fn without_ours(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        // Read as parse_save reads it (trimmed), so the two never disagree on what is ours.
        let trimmed = line.trim();
        let ours = if let Some(declaration) = trimmed.strip_prefix(':') {
            // The name is the first word, whatever whitespace comes before it.
            declaration.split_whitespace().next().is_some_and(|name| name.starts_with(CHAIN_PREFIX))
        } else if let Some(rule) = trimmed.strip_prefix("-A ") {
            let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
            let saved = SavedRule { chain: chain.to_string(), spec: spec.to_string() };
            chain.starts_with(CHAIN_PREFIX) || saved.jumps_to_ours() || spec.contains(JUMP_COMMENT)
        } else {
            false
        };
        if !ours {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Splits a rule spec into words as iptables-restore does: whitespace separates, double quotes
/// group (with `\"` inside them).
fn split_words(spec: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut started = false;
    let mut chars = spec.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            '"' => {
                quoted = !quoted;
                started = true;
            }
            c if c.is_whitespace() && !quoted => {
                if started || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            c => word.push(c),
        }
    }
    if started || !word.is_empty() {
        words.push(word);
    }
    words
}

/// Fuzzing (the `iptables_save` target): `text` as the `iptables-save` output a tamper check or
/// a snapshot reads (a foreign tool may have written any rule). Never a panic; what parses gives
/// our chains, the drift from them and well-formed restore, rollback and removal inputs; and the
/// host's firewall without ours (the snapshot) holds none of our chains by the parser's reading.
#[doc(hidden)]
pub fn fuzz_save(text: &str) {
    let snapshot = without_ours(text);
    if let Ok(host) = parse_save(&snapshot) {
        assert!(host.chains.iter().all(|name| !name.starts_with(CHAIN_PREFIX)), "{snapshot:?}");
        assert!(host.rules.iter().all(|rule| !rule.chain.starts_with(CHAIN_PREFIX)), "{snapshot:?}");
    }
    let Ok(state) = parse_save(text) else { return };
    let chains = ours(&state);
    for chain in &chains {
        assert!(chain.name.starts_with(CHAIN_PREFIX));
        let head = format!("-A {} ", chain.name);
        assert!(chain.rules.iter().all(|rule| rule.starts_with(&head)));
        if let Some(hook) = &chain.hook {
            let fixes = jump_fixes(&state, hook, &chain.name);
            if let Some(last) = fixes.last() {
                assert_eq!(*last, format!("-I {hook} 1 {}", jump_spec(&chain.name)));
            }
        }
    }
    let _ = drift(&chains, &state);
    let none = FilterState::default();
    for input in [restore_input(&chains, &state), restore_input(&chains, &none)] {
        assert!(input.starts_with("*filter\n") && input.ends_with("COMMIT\n"));
    }
    let _ = rollback_input(&state, &none);
    let _ = rollback_input(&none, &state);
    if let Some(input) = removal_input(&state) {
        assert!(input.starts_with("*filter\n") && input.ends_with("COMMIT\n"));
    }
    for rule in &state.rules {
        let _ = (rule.target(), hash_of(&rule.spec));
    }
}

#[cfg(test)]
mod tests {
    use super::super::render::OurChain;
    use super::*;

    /// Captured in a fresh network namespace (iptables v1.8.9, nf_tables backend) after a foreign
    /// chain, the rendered `enforced` ruleset and a second, stray copy of our jump:
    /// `ip netns exec NS iptables-save -t filter`
    const SAVED: &str = include_str!("testdata/iptables-save.txt");

    #[test]
    fn parses_chains_rules_and_targets_from_a_capture() {
        let state = parse_save(SAVED).unwrap();
        assert_eq!(state.chains, ["INPUT", "FORWARD", "OUTPUT", "DOCKER-LIKE", "VEN-INPUT", "VEN-OUTPUT"]);
        let input: Vec<&SavedRule> = state.rules.iter().filter(|r| r.chain == "INPUT").collect();
        assert_eq!(input[0].spec, "-s 198.18.0.99/32 -j DOCKER-LIKE");
        assert_eq!(input[0].target().as_deref(), Some("DOCKER-LIKE"));
        assert_eq!(input[1].target().as_deref(), Some("VEN-INPUT"));
        assert_eq!(input[1].spec, jump_spec("VEN-INPUT"));
        assert!(
            state.rules.iter().any(|r| r.chain == "VEN-INPUT" && r.spec.contains("--match-set ven-1 src"))
        );
    }

    fn our_chains_of(state: &FilterState) -> Vec<OurChain> {
        let chain = |name: &str, hook: &str| OurChain {
            name: name.into(),
            hook: Some(hook.into()),
            rules: state
                .rules
                .iter()
                .filter(|r| r.chain == name)
                .map(|r| format!("-A {name} {}", r.spec))
                .collect(),
        };
        vec![chain("VEN-INPUT", "INPUT"), chain("VEN-OUTPUT", "OUTPUT")]
    }

    #[test]
    fn a_capture_of_our_own_rules_has_no_drift_once_the_jumps_are_right() {
        let state = parse_save(SAVED).unwrap();
        let chains = our_chains_of(&state);
        assert_eq!(
            drift(&chains, &state),
            [
                "jump from INPUT to VEN-INPUT not alone at rule 1",
                "jump from OUTPUT to VEN-OUTPUT not alone at rule 1"
            ]
        );
        let mut fixed = state.clone();
        fixed.rules.retain(|r| {
            r.target().as_deref() != Some("VEN-INPUT") && r.target().as_deref() != Some("VEN-OUTPUT")
        });
        fixed.rules.insert(0, SavedRule { chain: "INPUT".into(), spec: jump_spec("VEN-INPUT") });
        fixed.rules.insert(0, SavedRule { chain: "OUTPUT".into(), spec: jump_spec("VEN-OUTPUT") });
        assert!(drift(&chains, &fixed).is_empty());

        // Tampering, one kind at a time.
        let mut deleted = fixed.clone();
        let at = deleted.rules.iter().position(|r| r.chain == "VEN-INPUT").unwrap() + 2;
        deleted.rules.remove(at);
        assert_eq!(drift(&chains, &deleted), ["VEN-INPUT: 1 rules missing, 0 unexpected"]);
        let mut added = fixed.clone();
        added
            .rules
            .insert(at, SavedRule { chain: "VEN-INPUT".into(), spec: "-s 198.18.9.9/32 -j ACCEPT".into() });
        assert_eq!(drift(&chains, &added), ["VEN-INPUT: 0 rules missing, 1 unexpected"]);
        let mut modified = fixed.clone();
        modified.rules[at].spec = "-p tcp -m tcp --dport 1 -j ACCEPT".into();
        assert_eq!(drift(&chains, &modified), ["VEN-INPUT: 1 rules missing, 1 unexpected"]);
        let mut reordered = fixed.clone();
        reordered.rules.swap(at, at + 1);
        assert_eq!(drift(&chains, &reordered), ["rules of VEN-INPUT reordered"]);
        let mut unhooked = fixed.clone();
        unhooked.rules.retain(|r| !(r.chain == "OUTPUT" && r.target().as_deref() == Some("VEN-OUTPUT")));
        assert_eq!(drift(&chains, &unhooked), ["jump from OUTPUT to VEN-OUTPUT missing"]);
        let flushed =
            FilterState { chains: vec!["INPUT".into(), "FORWARD".into(), "OUTPUT".into()], rules: vec![] };
        assert_eq!(
            drift(&chains, &flushed),
            [
                "chain VEN-INPUT missing",
                "jump from INPUT to VEN-INPUT missing",
                "chain VEN-OUTPUT missing",
                "jump from OUTPUT to VEN-OUTPUT missing"
            ]
        );
        let mut stray = fixed.clone();
        stray.chains.push("VEN-OLD".into());
        assert_eq!(drift(&chains, &stray), ["unexpected chain VEN-OLD"]);
    }

    #[test]
    fn restore_input_removes_chains_of_ours_no_longer_wanted() {
        let mut state = parse_save(SAVED).unwrap();
        state.chains.push("VEN-CUSTOM-IN".into());
        state.rules.push(SavedRule { chain: "VEN-INPUT".into(), spec: "-j VEN-CUSTOM-IN".into() });
        state.rules.push(SavedRule { chain: "VEN-CUSTOM-IN".into(), spec: "-p tcp -j ACCEPT".into() });
        state.rules.push(SavedRule { chain: "FORWARD".into(), spec: jump_spec("VEN-FORWARD") });
        state.chains.push("VEN-FORWARD".into());
        let chains = our_chains_of(&parse_save(SAVED).unwrap());
        let input = restore_input(&chains, &state);
        assert!(input.contains("-D FORWARD -m comment --comment \"ven:jump\" -j VEN-FORWARD\n"), "{input}");
        assert!(
            input.ends_with("-F VEN-CUSTOM-IN\n-F VEN-FORWARD\n-X VEN-CUSTOM-IN\n-X VEN-FORWARD\nCOMMIT\n"),
            "{input}"
        );
        assert!(!input.contains("DOCKER-LIKE"));
    }

    #[test]
    fn rollback_puts_our_previous_chains_back() {
        let before = parse_save(SAVED).unwrap();
        let now = FilterState { chains: vec!["INPUT".into(), "VEN-INPUT".into()], rules: vec![] };
        let input = rollback_input(&before, &now).unwrap();
        assert!(input.contains(":VEN-OUTPUT - [0:0]\n"), "{input}");
        assert!(
            input.contains("-A VEN-INPUT -i lo -m comment --comment \"ven:2976ea3491b8bb45\" -j ACCEPT\n")
        );
        assert!(input.contains("-I INPUT 1 -m comment --comment \"ven:jump\" -j VEN-INPUT\n"));
        assert_eq!(rollback_input(&FilterState::default(), &FilterState::default()), None);
        let removal = rollback_input(&FilterState::default(), &before).unwrap();
        assert!(removal.contains("-X VEN-INPUT"), "nothing of ours before: remove what is there now");
    }

    #[test]
    fn hash_comments_are_read_from_lines_and_specs() {
        assert_eq!(
            hash_of("-A VEN-INPUT -i lo -m comment --comment \"ven:2976ea3491b8bb45\" -j ACCEPT"),
            Some("2976ea3491b8bb45")
        );
        assert_eq!(hash_of("-m comment --comment ven:2976ea3491b8bb45 -j ACCEPT"), Some("2976ea3491b8bb45"));
        assert_eq!(hash_of(&jump_spec("VEN-INPUT")), None);
        assert_eq!(hash_of("-m comment --comment \"ven:xyz\" -j ACCEPT"), None);
        // Found by the policy_rendering fuzz target: "--comment" inside a custom rule's word.
        assert_eq!(
            hash_of(
                "-A VEN-CUSTOM-OUT -p tcr- -d--comment -m comment --comment \"ven:0774fd492f766474\" -j ACCEPT"
            ),
            Some("0774fd492f766474")
        );
        assert_eq!(hash_of("-j ACCEPT"), None);
    }

    #[test]
    fn the_snapshot_text_leaves_out_everything_of_ours() {
        let text = format!("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n{SAVED}");
        let host = without_ours(&text);
        assert!(host.contains(":DOCKER-LIKE - [0:0]\n-A INPUT -s 198.18.0.99/32 -j DOCKER-LIKE\n"), "{host}");
        assert!(host.contains("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"));
        assert!(!host.contains("VEN-") && !host.contains("ven:"), "{host}");
        // Indented lines are ours as parse_save reads them (issue 17, the iptables_save target's
        // invariant: the snapshot holds none of our chains by the parser's reading).
        let indented =
            "*filter\n :VEN-INPUT - [0:0]\n\t-A VEN-INPUT -j ACCEPT\n -A INPUT -j FOREIGN\nCOMMIT\n";
        assert_eq!(without_ours(indented), "*filter\n -A INPUT -j FOREIGN\nCOMMIT\n");
        fuzz_save(indented);
        // Whitespace between the colon and the name (fuzz/regressions/iptables_save and
        // policy_restore): `iptables-restore` and parse_save both skip it.
        let spaced = "*filter\n: VEN-INPUT - [0:0]\n:\u{b}VEN-OUTPUT - [0:0]\n:INPUT ACCEPT [0:0]\nCOMMIT\n";
        assert_eq!(without_ours(spaced), "*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n");
        fuzz_save(spaced);
    }

    #[test]
    fn jump_fixes_from_a_capture() {
        let state = parse_save(SAVED).unwrap();
        // INPUT: a foreign rule got in front of our jump.
        assert_eq!(
            jump_fixes(&state, "INPUT", "VEN-INPUT"),
            [
                "-D INPUT -m comment --comment \"ven:jump\" -j VEN-INPUT".to_string(),
                "-I INPUT 1 -m comment --comment \"ven:jump\" -j VEN-INPUT".to_string(),
            ]
        );
        // OUTPUT: ours is rule 1, but a duplicate sits further down: all copies go, one comes back.
        assert_eq!(
            jump_fixes(&state, "OUTPUT", "VEN-OUTPUT"),
            [
                "-D OUTPUT -m comment --comment \"ven:jump\" -j VEN-OUTPUT".to_string(),
                "-D OUTPUT -m comment --comment \"ven:jump\" -j VEN-OUTPUT".to_string(),
                "-I OUTPUT 1 -m comment --comment \"ven:jump\" -j VEN-OUTPUT".to_string(),
            ]
        );
    }

    fn filter(rules: &[(&str, &str)]) -> FilterState {
        FilterState {
            chains: vec!["INPUT".into(), "FORWARD".into(), "OUTPUT".into()],
            rules: rules
                .iter()
                .map(|(chain, spec)| SavedRule { chain: (*chain).into(), spec: (*spec).into() })
                .collect(),
        }
    }

    #[test]
    fn jump_fixes_cover_missing_correct_and_odd_jumps() {
        let canonical = jump_spec("VEN-INPUT");
        assert_eq!(jump_fixes(&filter(&[]), "INPUT", "VEN-INPUT"), [format!("-I INPUT 1 {canonical}")]);
        assert!(
            jump_fixes(&filter(&[("INPUT", &canonical), ("INPUT", "-j ACCEPT")]), "INPUT", "VEN-INPUT")
                .is_empty()
        );
        // An uncommented jump (an older version, or someone's hand) is replaced by ours.
        assert_eq!(
            jump_fixes(&filter(&[("INPUT", "-j VEN-INPUT")]), "INPUT", "VEN-INPUT"),
            ["-D INPUT -j VEN-INPUT".to_string(), format!("-I INPUT 1 {canonical}"),]
        );
        // A comment that merely mentions our chain is not a jump.
        let foreign = "-m comment --comment \"not -j VEN-INPUT here\" -j ACCEPT";
        assert_eq!(
            jump_fixes(&filter(&[("INPUT", foreign), ("OUTPUT", &canonical)]), "INPUT", "VEN-INPUT"),
            [format!("-I INPUT 1 {canonical}")]
        );
    }

    #[test]
    fn removal_takes_jumps_then_chains_and_nothing_foreign() {
        let state = parse_save(SAVED).unwrap();
        let input = removal_input(&state).unwrap();
        assert_eq!(
            input,
            "*filter\n\
             -D INPUT -m comment --comment \"ven:jump\" -j VEN-INPUT\n\
             -D OUTPUT -m comment --comment \"ven:jump\" -j VEN-OUTPUT\n\
             -D OUTPUT -m comment --comment \"ven:jump\" -j VEN-OUTPUT\n\
             -F VEN-INPUT\n-F VEN-OUTPUT\n-X VEN-INPUT\n-X VEN-OUTPUT\nCOMMIT\n"
        );
        assert!(!input.contains("DOCKER-LIKE"));
        let foreign_only = filter(&[("INPUT", "-j DOCKER-LIKE")]);
        assert_eq!(removal_input(&foreign_only), None);
    }

    #[test]
    fn skips_other_tables_and_rejects_garbage() {
        let text = "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j VEN-X\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n";
        assert_eq!(
            parse_save(text).unwrap(),
            FilterState { chains: vec!["INPUT".into()], rules: Vec::new() }
        );
        let err = parse_save("*filter\n:INPUT ACCEPT [0:0]\nwhat is this\nCOMMIT\n").unwrap_err();
        assert!(matches!(err, FirewallError::SaveOutput { line: 3, .. }), "{err}");
    }

    #[test]
    fn splits_words_like_iptables_restore() {
        assert_eq!(
            split_words(r#"-m comment --comment "a \"b\" c" -j X"#),
            ["-m", "comment", "--comment", "a \"b\" c", "-j", "X"]
        );
        assert_eq!(split_words(r#"--comment "" -j X"#), ["--comment", "", "-j", "X"]);
    }
}
