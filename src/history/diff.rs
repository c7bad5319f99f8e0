//! The one-line summary of what changed between two recorded rulesets (pure).
//!
//! What an operator auditing the history wants to know at a glance is how the rules that decide
//! traffic changed, not how the text changed:
//! - rules (`-A`/`-I` lines) are compared as multisets per section (`# IPv4`, `# IPv6`) and table,
//!   with the `ven:<hex>` hash comment removed: the hash chains over the previous rule, so one
//!   inserted rule changes the hash of every rule after it, and comparing with it would report the
//!   whole rest of the chain as removed and added again;
//! - a rule kept but in another position is reported as moved (order decides the verdict), counted
//!   as the fewest rules whose move explains the new order (kept rules minus the longest run of them
//!   still in the same relative order), so one rule moved is "1 rule moved", not "+1 -1 rules";
//! - sets are compared by name (created or destroyed) and by member count (the ruleset text carries
//!   counts, not members). Counts are read as any u64 (the text is read back from a file, so it
//!   may hold anything) and summed as u128, which no number of u64 counts a text can hold
//!   overflows: the total is exact, never a wrapped or a panicking sum.

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::{MAX_RULESET_BYTES, TRUNCATION_PREFIX};

/// Most set names listed for each of "created" and "destroyed" before "+N more".
const MAX_SET_NAMES: usize = 4;

/// `+3 -1 rules, 1 rule moved, sets: +ven-7 -ven-2, members 120 -> 121`; `no change` when the
/// rules and sets are the same; `first entry: 14 rules, 3 sets (27 members)` without a previous
/// ruleset. A note `(partial: ...)` is added when either text was cut at [`MAX_RULESET_BYTES`].
pub fn diff_summary(previous: Option<&str>, next: &str) -> String {
    let next = Parsed::new(next);
    let Some(previous) = previous.map(Parsed::new) else {
        return format!("first entry: {}", describe_parsed(&next));
    };
    let mut parts = Vec::new();

    let rules = compare_rules(&previous.rules, &next.rules);
    if rules.added > 0 || rules.removed > 0 {
        parts.push(format!("+{} -{} rules", rules.added, rules.removed));
    }
    if rules.moved > 0 {
        parts.push(format!("{} moved", plural(rules.moved, "rule")));
    }

    let created: Vec<&str> =
        next.sets.keys().filter(|name| !previous.sets.contains_key(*name)).map(String::as_str).collect();
    let destroyed: Vec<&str> =
        previous.sets.keys().filter(|name| !next.sets.contains_key(*name)).map(String::as_str).collect();
    if !created.is_empty() || !destroyed.is_empty() {
        let mut names = Vec::new();
        names.extend(name_list('+', &created));
        names.extend(name_list('-', &destroyed));
        parts.push(format!("sets: {}", names.join(" ")));
    }
    let (before, after) = (previous.members(), next.members());
    let resized =
        next.sets.iter().filter(|(name, count)| previous.sets.get(*name).is_some_and(|c| c != *count));
    let resized = resized.count();
    if before != after {
        parts.push(format!("members {before} -> {after}"));
    } else if resized > 0 {
        parts.push(format!("members changed in {} ({after} in all)", plural(resized, "set")));
    }

    let summary = if !parts.is_empty() {
        parts.join(", ")
    } else if previous.other != next.other {
        "rules and sets unchanged, chain or table lines differ".to_string()
    } else {
        "no change".to_string()
    };
    with_partial(summary, previous.truncated || next.truncated)
}

/// `14 rules, 3 sets (27 members)`, for an entry with nothing to compare against.
pub(super) fn describe_ruleset(text: &str) -> String {
    describe_parsed(&Parsed::new(text))
}

fn describe_parsed(parsed: &Parsed) -> String {
    with_partial(parsed.describe(), parsed.truncated)
}

fn with_partial(summary: String, truncated: bool) -> String {
    if truncated {
        format!("{summary} (partial: a ruleset was cut at {} KiB)", MAX_RULESET_BYTES / 1024)
    } else {
        summary
    }
}

fn plural(n: usize, noun: &str) -> String {
    if n == 1 { format!("1 {noun}") } else { format!("{n} {noun}s") }
}

/// `+a +b +c +d +2 more`.
fn name_list(sign: char, names: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = names.iter().take(MAX_SET_NAMES).map(|name| format!("{sign}{name}")).collect();
    if names.len() > MAX_SET_NAMES {
        out.push(format!("{sign}{} more", names.len() - MAX_SET_NAMES));
    }
    out
}

/// A ruleset text reduced to what the summary compares.
struct Parsed {
    /// `section \t table \t rule without its hash comment`, in order.
    rules: Vec<String>,
    /// Set name -> member count.
    sets: BTreeMap<String, u64>,
    /// Chain declarations, `COMMIT` and unparsed set lines, with their section.
    other: Vec<String>,
    /// The text ends with the truncation note.
    truncated: bool,
}

impl Parsed {
    fn new(text: &str) -> Self {
        let mut parsed =
            Parsed { rules: Vec::new(), sets: BTreeMap::new(), other: Vec::new(), truncated: false };
        let mut section = "";
        let mut table = "";
        let mut in_sets = false;
        for line in text.lines().map(str::trim_end).filter(|line| !line.is_empty()) {
            if line.starts_with(TRUNCATION_PREFIX) {
                parsed.truncated = true;
            } else if line.starts_with('#') {
                section = line;
                in_sets = line.trim_start_matches('#').trim().eq_ignore_ascii_case("sets");
            } else if in_sets {
                match parse_set_line(line) {
                    Some((name, count)) => {
                        parsed.sets.insert(name.to_string(), count);
                    }
                    None => parsed.other.push(format!("{section}\t{line}")),
                }
            } else if line.starts_with('*') {
                table = line;
            } else if line.starts_with("-A ") || line.starts_with("-I ") {
                parsed.rules.push(format!("{section}\t{table}\t{}", strip_hash_comment(line)));
            } else {
                parsed.other.push(format!("{section}\t{table}\t{line}"));
            }
        }
        parsed
    }

    /// The exact total: at most `usize::MAX` lines of `u64::MAX` each fit in a u128.
    fn members(&self) -> u128 {
        self.sets.values().fold(0u128, |total, &count| total.saturating_add(u128::from(count)))
    }

    fn describe(&self) -> String {
        format!(
            "{}, {} ({} members)",
            plural(self.rules.len(), "rule"),
            plural(self.sets.len(), "set"),
            self.members()
        )
    }
}

/// `ven-1 hash:net inet 12 members` -> (`ven-1`, 12).
fn parse_set_line(line: &str) -> Option<(&str, u64)> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        [name, .., count, "members" | "member"] => Some((*name, count.parse().ok()?)),
        _ => None,
    }
}

/// Removes ` -m comment --comment "ven:<hex>"` (the rule hash); other comments, `ven:jump`
/// included, are part of the rule.
fn strip_hash_comment(line: &str) -> String {
    const MARK: &str = " -m comment --comment \"ven:";
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find(MARK) {
        let after = &rest[at + MARK.len()..];
        let hex_len = after.bytes().take_while(u8::is_ascii_hexdigit).count();
        let is_hash = hex_len > 0 && after.as_bytes().get(hex_len) == Some(&b'"');
        if is_hash {
            out.push_str(&rest[..at]);
            rest = &after[hex_len + 1..];
        } else {
            out.push_str(&rest[..at + MARK.len()]);
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[derive(Debug, PartialEq, Eq)]
struct RuleChanges {
    added: usize,
    removed: usize,
    moved: usize,
}

fn compare_rules(previous: &[String], next: &[String]) -> RuleChanges {
    // The k-th occurrence of a rule before is paired with its k-th occurrence after.
    let mut positions: HashMap<&str, VecDeque<usize>> = HashMap::new();
    for (index, rule) in next.iter().enumerate() {
        positions.entry(rule.as_str()).or_default().push_back(index);
    }
    let mut kept_positions = Vec::new();
    for rule in previous {
        if let Some(index) = positions.get_mut(rule.as_str()).and_then(VecDeque::pop_front) {
            kept_positions.push(index);
        }
    }
    let kept = kept_positions.len();
    RuleChanges {
        added: next.len() - kept,
        removed: previous.len() - kept,
        moved: kept - longest_increasing_run(&kept_positions),
    }
}

/// Length of the longest strictly increasing subsequence (patience sorting, O(n log n)).
fn longest_increasing_run(values: &[usize]) -> usize {
    let mut tails: Vec<usize> = Vec::new();
    for &value in values {
        let at = tails.partition_point(|&tail| tail < value);
        if at == tails.len() {
            tails.push(value);
        } else {
            tails[at] = value;
        }
    }
    tails.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LO: &str = "-A VEN-INPUT -i lo -m comment --comment \"ven:1a2b3c4d5e6f7a8b\" -j ACCEPT";
    const SSH: &str = "-A VEN-INPUT -p tcp -m set --match-set ven-1 src -m tcp --dport 22 -m conntrack \
                       --ctstate NEW -m comment --comment \"ven:0123456789abcdef\" -j ACCEPT";
    const DNS: &str =
        "-A VEN-INPUT -p udp -m udp --dport 53 -m comment --comment \"ven:00000000000000aa\" -j ACCEPT";
    const DROP: &str = "-A VEN-INPUT -m comment --comment \"ven:ffffffffffffffff\" -j DROP";

    fn ruleset(rules: &[&str], sets: &[&str]) -> String {
        let mut text = String::from("# IPv4\n*filter\n:VEN-INPUT - [0:0]\n");
        for rule in rules {
            text.push_str(rule);
            text.push('\n');
        }
        text.push_str("COMMIT\n# sets\n");
        for set in sets {
            text.push_str(set);
            text.push('\n');
        }
        text
    }

    /// The same rule with another hash, as the renderer produces when an earlier rule changes.
    fn rehashed(rule: &str) -> String {
        let at = rule.find("ven:").unwrap() + 4;
        format!("{}{}{}", &rule[..at], "9".repeat(16), &rule[at + 16..])
    }

    #[test]
    fn first_entry_describes_the_ruleset() {
        let text =
            ruleset(&[LO, SSH, DROP], &["ven-1 hash:net inet 12 members", "ven-2 hash:net inet 1 members"]);
        assert_eq!(diff_summary(None, &text), "first entry: 3 rules, 2 sets (13 members)");
        assert_eq!(diff_summary(None, ""), "first entry: 0 rules, 0 sets (0 members)");
    }

    #[test]
    fn identical_rulesets_are_no_change() {
        let text = ruleset(&[LO, SSH, DROP], &["ven-1 hash:net inet 12 members"]);
        assert_eq!(diff_summary(Some(&text), &text), "no change");
    }

    #[test]
    fn added_rule_does_not_count_rehashed_followers() {
        let before = ruleset(&[LO, SSH, DROP], &[]);
        let after = ruleset(&[LO, SSH, DNS, &rehashed(DROP)], &[]);
        assert_eq!(diff_summary(Some(&before), &after), "+1 -0 rules");
    }

    #[test]
    fn removed_rule() {
        let before = ruleset(&[LO, SSH, DNS, DROP], &[]);
        let after = ruleset(&[LO, DNS, DROP], &[]);
        assert_eq!(diff_summary(Some(&before), &after), "+0 -1 rules");
    }

    #[test]
    fn moved_rule_counts_once_as_moved() {
        let before = ruleset(&[LO, SSH, DNS, DROP], &[]);
        let after = ruleset(&[LO, &rehashed(DNS), &rehashed(SSH), DROP], &[]);
        assert_eq!(diff_summary(Some(&before), &after), "1 rule moved");
        let after = ruleset(&[&rehashed(DROP), LO, SSH, DNS], &[]);
        assert_eq!(diff_summary(Some(&before), &after), "1 rule moved");
    }

    #[test]
    fn same_rule_in_another_family_is_a_change() {
        let before = ruleset(&[LO], &[]);
        let after = before.replace("# IPv4", "# IPv6");
        assert_eq!(diff_summary(Some(&before), &after), "+1 -1 rules");
    }

    #[test]
    fn sets_created_destroyed_and_resized() {
        let before = ruleset(&[LO], &["ven-1 hash:net inet 12 members", "ven-2 hash:net inet 3 members"]);
        let after = ruleset(&[LO], &["ven-1 hash:net inet 12 members", "ven-7 hash:net inet 4 members"]);
        assert_eq!(diff_summary(Some(&before), &after), "sets: +ven-7 -ven-2, members 15 -> 16");

        let after = ruleset(&[LO], &["ven-1 hash:net inet 13 members", "ven-2 hash:net inet 2 members"]);
        assert_eq!(diff_summary(Some(&before), &after), "members changed in 2 sets (15 in all)");

        let many: Vec<String> = (10..16).map(|id| format!("ven-{id} hash:net inet 0 members")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let after = ruleset(&[LO], &many);
        assert_eq!(
            diff_summary(Some(&ruleset(&[LO], &[])), &after),
            "sets: +ven-10 +ven-11 +ven-12 +ven-13 +2 more"
        );
    }

    #[test]
    fn everything_at_once_and_firewall_removed() {
        let before = ruleset(&[LO, SSH, DROP], &["ven-1 hash:net inet 12 members"]);
        let after =
            ruleset(&[LO, DNS, DROP], &["ven-1 hash:net inet 12 members", "ven-2 hash:net inet 1 members"]);
        assert_eq!(diff_summary(Some(&before), &after), "+1 -1 rules, sets: +ven-2, members 12 -> 13");
        assert_eq!(diff_summary(Some(&before), ""), "+0 -3 rules, sets: -ven-1, members 12 -> 0");
    }

    #[test]
    fn other_lines_and_truncation_are_noted() {
        let before = ruleset(&[LO], &[]);
        let after = before.replace(":VEN-INPUT - [0:0]", ":VEN-INPUT - [0:0]\n:VEN-OUTPUT - [0:0]");
        assert_eq!(
            diff_summary(Some(&before), &after),
            "rules and sets unchanged, chain or table lines differ"
        );
        let cut = format!("{before}{TRUNCATION_PREFIX} 3 more lines left out\n");
        assert_eq!(diff_summary(Some(&before), &cut), "no change (partial: a ruleset was cut at 512 KiB)");
    }

    /// Issue 17: member counts near u64::MAX overflowed the sum (a panic with overflow checks on,
    /// a wrapped total in release). The regression input of the `history_diff` fuzz target is
    /// fuzz/regressions/history_diff/member-count-overflow.
    #[test]
    fn huge_member_counts_sum_exactly() {
        let text = "#sets\nt 18446744073709551615 member\nv 1 member\n";
        assert_eq!(diff_summary(None, text), "first entry: 0 rules, 2 sets (18446744073709551616 members)");
        let before = ruleset(&[LO], &["ven-1 hash:net inet 18446744073709551615 members"]);
        let after = ruleset(
            &[LO],
            &["ven-1 hash:net inet 18446744073709551615 members", "ven-2 hash:net inet 1 members"],
        );
        assert_eq!(
            diff_summary(Some(&before), &after),
            "sets: +ven-2, members 18446744073709551615 -> 18446744073709551616"
        );
        assert_eq!(diff_summary(Some(&after), &after), "no change");
    }

    #[test]
    fn only_hash_comments_are_stripped() {
        assert_eq!(strip_hash_comment(LO), "-A VEN-INPUT -i lo -j ACCEPT");
        let jump = "-I INPUT 1 -m comment --comment \"ven:jump\" -j VEN-INPUT";
        assert_eq!(strip_hash_comment(jump), jump);
        assert_eq!(
            strip_hash_comment("-A X -m comment --comment \"ven:"),
            "-A X -m comment --comment \"ven:"
        );
    }

    #[test]
    fn longest_run() {
        assert_eq!(longest_increasing_run(&[]), 0);
        assert_eq!(longest_increasing_run(&[0, 2, 1, 3]), 3);
        assert_eq!(longest_increasing_run(&[3, 0, 1, 2]), 3);
        assert_eq!(longest_increasing_run(&[3, 2, 1, 0]), 1);
    }
}
