//! Text for `ven history` (a table), `ven history --json` (one JSON array) and
//! `ven history --show SEQ` (header lines, then the ruleset as recorded).

use std::fmt::Write as _;

use crate::agent::status::json_string;

use super::{HISTORY_CAPACITY, HistoryEntry, Listed};
use crate::clock::rfc3339;

const HEADERS: [&str; 6] = ["SEQ", "TIME", "REASON", "VERSION", "STATE", "SUMMARY"];

/// One row per file, oldest first; an unreadable file shows its reason and path.
pub fn render_table(entries: &[Listed]) -> String {
    if entries.is_empty() {
        return format!("no firewall changes recorded (the newest {HISTORY_CAPACITY} are kept)\n");
    }
    let rows: Vec<[String; 6]> = entries
        .iter()
        .map(|listed| match listed {
            Listed::Entry(entry) => [
                entry.seq.to_string(),
                rfc3339(entry.at),
                entry.reason.as_str().to_string(),
                version_text(entry.policy_version),
                entry.state.map_or("-", |state| state.as_str()).to_string(),
                entry.summary.clone(),
            ],
            Listed::Unreadable { seq, path, why } => [
                seq.to_string(),
                "-".into(),
                "unreadable".into(),
                "-".into(),
                "-".into(),
                format!("{why} ({})", path.display()),
            ],
        })
        .collect();
    let mut widths = HEADERS.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header = HEADERS.map(String::from);
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (column, cell) in row.iter().enumerate() {
            if column + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[column]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `[{"seq":1,"at":"2026-11-27T12:00:00Z","unix_time":1795780800,"reason":"policy_update",
/// "policy_version":3|null,"state":"enforced"|null,"summary":"...","ruleset_bytes":1234}, ...]`;
/// an unreadable file is `{"seq":2,"error":"...","path":"..."}`. The rulesets are left out (up
/// to 512 KiB each): `ven history --show SEQ` prints one.
pub fn render_json(entries: &[Listed]) -> String {
    let items: Vec<String> = entries
        .iter()
        .map(|listed| match listed {
            Listed::Entry(entry) => format!(
                "{{\"seq\":{},\"at\":{},\"unix_time\":{},\"reason\":{},\"policy_version\":{},\
                 \"state\":{},\"summary\":{},\"ruleset_bytes\":{}}}",
                entry.seq,
                json_string(&rfc3339(entry.at)),
                entry.at,
                json_string(entry.reason.as_str()),
                if entry.policy_version == 0 { "null".to_string() } else { entry.policy_version.to_string() },
                entry.state.map_or("null".to_string(), |state| json_string(state.as_str())),
                json_string(&entry.summary),
                entry.ruleset.len(),
            ),
            Listed::Unreadable { seq, path, why } => format!(
                "{{\"seq\":{seq},\"error\":{},\"path\":{}}}",
                json_string(why),
                json_string(&path.display().to_string())
            ),
        })
        .collect();
    format!("[{}]", items.join(","))
}

/// Header lines, a blank line, then the ruleset as recorded.
pub fn render_entry(entry: &HistoryEntry) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "seq:            {}", entry.seq);
    let _ = writeln!(out, "time:           {}", rfc3339(entry.at));
    let _ = writeln!(out, "reason:         {}", entry.reason);
    let _ = writeln!(out, "policy version: {}", version_text(entry.policy_version));
    let _ = writeln!(out, "state:          {}", entry.state.map_or("- (no policy in force)", |s| s.as_str()));
    let _ = writeln!(out, "summary:        {}", entry.summary);
    out.push('\n');
    out.push_str(&entry.ruleset);
    if !entry.ruleset.is_empty() && !entry.ruleset.ends_with('\n') {
        out.push('\n');
    }
    out
}

fn version_text(version: u64) -> String {
    if version == 0 { "-".to_string() } else { version.to_string() }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use ven_proto::PolicyState;

    use super::super::ChangeReason;
    use super::*;

    const NOON: u64 = 1_795_780_800; // 2026-11-27T12:00:00Z

    fn entries() -> Vec<Listed> {
        vec![
            Listed::Entry(HistoryEntry {
                seq: 7,
                at: NOON,
                reason: ChangeReason::PolicyUpdate,
                policy_version: 12,
                state: Some(PolicyState::Enforced),
                summary: "+1 -0 rules; said \"hi\"".into(),
                ruleset: "*filter\nCOMMIT\n".into(),
            }),
            Listed::Unreadable {
                seq: 8,
                path: PathBuf::from("/d/state/history/00000008"),
                why: "checksum mismatch".into(),
            },
            Listed::Entry(HistoryEntry {
                seq: 9,
                at: NOON + 61,
                reason: ChangeReason::Remove,
                policy_version: 0,
                state: None,
                summary: "+0 -2 rules".into(),
                ruleset: String::new(),
            }),
        ]
    }

    #[test]
    fn table_aligns_columns_and_reports_unreadable_files() {
        let table = render_table(&entries());
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines,
            [
                "SEQ  TIME                  REASON         VERSION  STATE     SUMMARY",
                "7    2026-11-27T12:00:00Z  policy_update  12       enforced  +1 -0 rules; said \"hi\"",
                "8    -                     unreadable     -        -         checksum mismatch \
                 (/d/state/history/00000008)",
                "9    2026-11-27T12:01:01Z  remove         -        -         +0 -2 rules",
            ]
        );
        assert_eq!(render_table(&[]), "no firewall changes recorded (the newest 10 are kept)\n");
    }

    #[test]
    fn json_is_one_array_with_escapes_and_nulls() {
        let json = render_json(&entries());
        assert_eq!(
            json,
            "[{\"seq\":7,\"at\":\"2026-11-27T12:00:00Z\",\"unix_time\":1795780800,\
             \"reason\":\"policy_update\",\"policy_version\":12,\"state\":\"enforced\",\
             \"summary\":\"+1 -0 rules; said \\\"hi\\\"\",\"ruleset_bytes\":15},\
             {\"seq\":8,\"error\":\"checksum mismatch\",\"path\":\"/d/state/history/00000008\"},\
             {\"seq\":9,\"at\":\"2026-11-27T12:01:01Z\",\"unix_time\":1795780861,\"reason\":\"remove\",\
             \"policy_version\":null,\"state\":null,\"summary\":\"+0 -2 rules\",\"ruleset_bytes\":0}]"
        );
        assert_eq!(render_json(&[]), "[]");
        assert_eq!(json_string("a\u{1}\n\\"), "\"a\\u0001\\n\\\\\"");
    }

    #[test]
    fn entry_shows_header_then_ruleset() {
        let Listed::Entry(entry) = &entries()[0] else { unreachable!() };
        assert_eq!(
            render_entry(entry),
            "seq:            7\n\
             time:           2026-11-27T12:00:00Z\n\
             reason:         policy_update\n\
             policy version: 12\n\
             state:          enforced\n\
             summary:        +1 -0 rules; said \"hi\"\n\
             \n\
             *filter\nCOMMIT\n"
        );
    }
}
