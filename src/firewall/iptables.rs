//! iptables: runs `iptables-save -t filter` and `iptables-restore --noflush`, reads the save
//! output for our chains and jumps, and builds the restore input that replaces our chains and
//! puts our jumps right.
//!
//! Guarantees: the restore input names only our chains (`VEN-*`) and rules that jump to them, so
//! foreign chains and rules are never touched; it is one table in one transaction
//! (iptables-restore commits a table atomically or not at all).

use std::fmt::Write as _;
use std::path::Path;

use super::render::{OurChain, jump_spec};
use super::{FirewallError, kernel};

/// Prefix of every chain we own.
pub(crate) const CHAIN_PREFIX: &str = "VEN-";

/// How long iptables-restore waits for the xtables lock (legacy backend) before failing, so a
/// stuck holder cannot hang the agent.
const LOCK_WAIT: &str = "--wait=30";

/// Runs `iptables-save -t filter`.
pub(crate) fn save(program: &Path) -> Result<String, FirewallError> {
    let output = kernel::run(program, &["-t", "filter"], None)?;
    if !output.status.success() {
        return Err(FirewallError::Save {
            command: format!("{} -t filter", program.display()),
            status: output.status,
            stderr: kernel::stderr_text(&output.stderr),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `iptables-restore --noflush` with `input` (one table).
pub(crate) fn restore(program: &Path, table: &'static str, input: &str) -> Result<(), FirewallError> {
    let output = kernel::run(program, &["--noflush", LOCK_WAIT], Some(input))?;
    if !output.status.success() {
        let stderr = kernel::stderr_text(&output.stderr);
        return Err(FirewallError::Restore {
            program: program.to_path_buf(),
            table,
            status: output.status,
            input_excerpt: kernel::excerpt(input, &stderr),
            stderr,
        });
    }
    Ok(())
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

/// The iptables-restore input that makes our chains exactly `chains` and leaves one jump to each
/// at rule 1 of its hook. Declaring a chain flushes it (or creates it): our rules are replaced in
/// the same transaction, with no moment where the chain is empty.
pub(crate) fn restore_input(chains: &[OurChain], current: &FilterState) -> String {
    let mut input = String::from("*filter\n");
    for chain in chains {
        let _ = writeln!(input, ":{} - [0:0]", chain.name);
    }
    for chain in chains {
        for rule in &chain.rules {
            input.push_str(rule);
            input.push('\n');
        }
    }
    for chain in chains {
        for line in jump_fixes(current, chain.hook, chain.name) {
            input.push_str(&line);
            input.push('\n');
        }
    }
    input.push_str("COMMIT\n");
    input
}

/// Whether the kernel already holds exactly `chains` (rule for rule, as iptables-save prints
/// them) with their jumps right, so that an apply has nothing to write.
pub(crate) fn up_to_date(chains: &[OurChain], current: &FilterState) -> bool {
    chains.iter().all(|chain| {
        let prefix = format!("-A {} ", chain.name);
        let have =
            current.rules.iter().filter(|rule| rule.chain == chain.name).map(|rule| rule.spec.as_str());
        let want = chain.rules.iter().map(|rule| rule.strip_prefix(&prefix).unwrap_or(rule));
        current.chains.iter().any(|name| name == chain.name)
            && have.eq(want)
            && jump_fixes(current, chain.hook, chain.name).is_empty()
    })
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

#[cfg(test)]
mod tests {
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

    #[test]
    fn a_capture_of_our_own_rules_is_up_to_date_once_the_jumps_are_right() {
        use super::super::render::OurChain;
        let state = parse_save(SAVED).unwrap();
        let ours = |name: &'static str, hook: &'static str| OurChain {
            name,
            hook,
            rules: state
                .rules
                .iter()
                .filter(|r| r.chain == name)
                .map(|r| format!("-A {name} {}", r.spec))
                .collect(),
        };
        let chains = [ours("VEN-INPUT", "INPUT"), ours("VEN-OUTPUT", "OUTPUT")];
        assert!(!up_to_date(&chains, &state), "the capture's jumps are out of place");
        let mut fixed = state.clone();
        fixed.rules.retain(|r| {
            r.target().as_deref() != Some("VEN-INPUT") && r.target().as_deref() != Some("VEN-OUTPUT")
        });
        fixed.rules.insert(0, SavedRule { chain: "INPUT".into(), spec: jump_spec("VEN-INPUT") });
        fixed.rules.insert(0, SavedRule { chain: "OUTPUT".into(), spec: jump_spec("VEN-OUTPUT") });
        assert!(up_to_date(&chains, &fixed));
        fixed.rules.pop();
        assert!(!up_to_date(&chains, &fixed), "a missing rule");
        assert!(!up_to_date(&chains, &FilterState::default()));
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
