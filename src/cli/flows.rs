//! `ven flows`: the spec's four flow views (raw or aggregated, accepted or dropped) read from
//! the stores in log/, filtered, as a table, JSON or CSV. The stores are opened directly, so it
//! works the same whether the agent runs or not (the agent holds them open only while it writes
//! a flush).

use std::fmt::Write as _;
use std::net::IpAddr;

use ven_proto::{FlowRecord, IpNet};

use crate::flows::store::{FlowQuery, QueryResult, StoredFlow, VerdictFilter, View};

/// Rows shown unless `--limit` says otherwise.
pub const DEFAULT_LIMIT: usize = 1000;
/// Most rows one query returns.
pub const MAX_LIMIT: usize = crate::flows::store::MAX_QUERY_ROWS;

/// How the rows are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Csv,
}

/// Parses the command line's filters into a query (`now`: Unix seconds, for relative times).
#[allow(clippy::too_many_arguments)]
pub fn query(
    raw: bool,
    accepted: bool,
    dropped: bool,
    since: Option<&str>,
    src: Option<&str>,
    dst: Option<&str>,
    port: Option<u16>,
    proto: Option<&str>,
    limit: Option<usize>,
    now: u64,
) -> Result<FlowQuery, String> {
    let verdicts = match (accepted, dropped) {
        (true, true) => return Err("give either --accepted or --dropped, not both".into()),
        (true, false) => VerdictFilter::Allowed,
        (false, true) => VerdictFilter::Unallowed,
        (false, false) => VerdictFilter::Any,
    };
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(format!("--limit is from 1 to {MAX_LIMIT}"));
    }
    Ok(FlowQuery {
        view: if raw { View::Raw } else { View::Aggregated },
        verdicts,
        since: since.map(|text| parse_since(text, now)).transpose()?,
        src: src.map(|text| parse_net("--src", text)).transpose()?,
        dst: dst.map(|text| parse_net("--dst", text)).transpose()?,
        port,
        protocol: proto.map(parse_protocol).transpose()?,
        limit,
    })
}

/// `--since`: Unix seconds, or a time ago as a number with s, m, h or d.
fn parse_since(text: &str, now: u64) -> Result<u32, String> {
    let bad = || format!("--since {text:?}: give Unix seconds or a time ago such as 90s, 10m, 2h, 7d");
    let (number, unit) = match text.char_indices().last() {
        Some((at, unit @ ('s' | 'm' | 'h' | 'd'))) => (&text[..at], Some(unit)),
        _ => (text, None),
    };
    let value: u64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        None => return u32::try_from(value).map_err(|_| bad()),
        Some('s') => value,
        Some('m') => value.saturating_mul(60),
        Some('h') => value.saturating_mul(3600),
        _ => value.saturating_mul(86_400),
    };
    Ok(u32::try_from(now.saturating_sub(seconds)).unwrap_or(u32::MAX))
}

/// An address or a CIDR block.
fn parse_net(option: &str, text: &str) -> Result<IpNet, String> {
    let parsed = if text.contains('/') {
        text.parse::<IpNet>().ok()
    } else {
        text.parse::<IpAddr>().ok().and_then(|addr| {
            let prefix = if addr.is_ipv4() { 32 } else { 128 };
            format!("{addr}/{prefix}").parse::<IpNet>().ok()
        })
    };
    parsed.ok_or_else(|| format!("{option} {text:?} is not an IP address or CIDR block"))
}

fn parse_protocol(text: &str) -> Result<u8, String> {
    match text.to_ascii_lowercase().as_str() {
        "tcp" => Ok(6),
        "udp" => Ok(17),
        "icmp" => Ok(1),
        "icmpv6" | "ipv6-icmp" => Ok(58),
        number => number
            .parse()
            .map_err(|_| format!("--proto {text:?}: give tcp, udp, icmp, icmpv6 or a protocol number")),
    }
}

/// The name of an IP protocol number, or the number.
pub fn protocol_name(protocol: u8) -> String {
    match protocol {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        n => n.to_string(),
    }
}

const COLUMNS: [&str; 13] = [
    "seq",
    "first_seen",
    "last_seen",
    "src",
    "dst",
    "proto",
    "port",
    "verdict",
    "rule",
    "count",
    "packets",
    "bytes",
    "sampling",
];

/// The cells of one row, in [`COLUMNS`] order (`seq` is empty in the aggregated views, `bytes`
/// when unknown). `count` is connections, `packets` and `bytes` beside it.
fn cells(row: &StoredFlow) -> [String; 13] {
    let r: &FlowRecord = &row.record;
    let (src, dst) = if r.overflow {
        ("(overflow)".to_string(), "(overflow)".to_string())
    } else {
        (r.src.to_string(), r.dst.to_string())
    };
    [
        row.seq.map(|s| s.to_string()).unwrap_or_default(),
        crate::clock::rfc3339(u64::from(r.first_seen)),
        crate::clock::rfc3339(u64::from(r.last_seen)),
        src,
        dst,
        protocol_name(r.protocol),
        r.port.to_string(),
        r.verdict.as_str().to_string(),
        r.rule.to_string(),
        r.count.to_string(),
        r.packets.to_string(),
        r.bytes.map(|b| b.to_string()).unwrap_or_default(),
        if r.sampling_scale > 1 { format!("1/{}", r.sampling_scale) } else { String::new() },
    ]
}

/// The whole output for `result`.
pub fn render(result: &QueryResult, view: View, format: Format) -> String {
    let skip_seq = view == View::Aggregated;
    let columns: Vec<usize> = (0..COLUMNS.len()).filter(|&i| !(skip_seq && i == 0)).collect();
    let mut out = String::new();
    match format {
        Format::Json => {
            let rows: Vec<String> = result.rows.iter().map(json_row).collect();
            let _ = writeln!(out, "{{\"flows\":[{}],\"more\":{}}}", rows.join(","), result.more);
        }
        Format::Csv => {
            let header: Vec<&str> = columns.iter().map(|&i| COLUMNS[i]).collect();
            let _ = writeln!(out, "{}", header.join(","));
            for row in &result.rows {
                let cells = cells(row);
                let line: Vec<&str> = columns.iter().map(|&i| cells[i].as_str()).collect();
                // No cell can hold a comma or a quote: addresses, numbers and fixed words.
                let _ = writeln!(out, "{}", line.join(","));
            }
        }
        Format::Table => {
            let rows: Vec<[String; 13]> = result.rows.iter().map(cells).collect();
            let widths: Vec<usize> = columns
                .iter()
                .map(|&i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0).max(COLUMNS[i].len()))
                .collect();
            let line = |cells: Vec<&str>| {
                let padded: Vec<String> =
                    cells.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
                padded.join("  ").trim_end().to_string()
            };
            let header: Vec<String> = columns.iter().map(|&i| COLUMNS[i].to_uppercase()).collect();
            let _ = writeln!(out, "{}", line(header.iter().map(String::as_str).collect()));
            for row in &rows {
                let _ = writeln!(out, "{}", line(columns.iter().map(|&i| row[i].as_str()).collect()));
            }
            if result.rows.is_empty() {
                let _ = writeln!(out, "(no flows recorded match)");
            }
            if result.more > 0 {
                let _ = writeln!(out, "({} more rows match; raise --limit to see them)", result.more);
            }
        }
    }
    out
}

fn json_row(row: &StoredFlow) -> String {
    let r = &row.record;
    let address = |addr: IpAddr| if r.overflow { "null".to_string() } else { format!("\"{addr}\"") };
    format!(
        "{{\"seq\":{},\"first_seen\":{},\"last_seen\":{},\"first_seen_time\":\"{}\",\"last_seen_time\":\"{}\",\
         \"src\":{},\"dst\":{},\"protocol\":{},\"proto\":\"{}\",\"port\":{},\"verdict\":\"{}\",\"rule\":{},\
         \"count\":{},\"packets\":{},\"bytes\":{},\"sampling_scale\":{},\"overflow\":{}}}",
        row.seq.map_or("null".to_string(), |s| s.to_string()),
        r.first_seen,
        r.last_seen,
        crate::clock::rfc3339(u64::from(r.first_seen)),
        crate::clock::rfc3339(u64::from(r.last_seen)),
        address(r.src),
        address(r.dst),
        r.protocol,
        protocol_name(r.protocol),
        r.port,
        r.verdict.as_str(),
        r.rule,
        r.count,
        r.packets,
        r.bytes.map_or("null".to_string(), |b| b.to_string()),
        r.sampling_scale,
        r.overflow
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ven_proto::FlowVerdict;

    fn row(seq: Option<u64>, verdict: FlowVerdict, overflow: bool) -> StoredFlow {
        StoredFlow {
            seq,
            record: FlowRecord {
                src: "198.18.0.1".parse().unwrap(),
                dst: "198.18.0.2".parse().unwrap(),
                protocol: 6,
                port: 5432,
                verdict,
                rule: 3,
                count: 12,
                first_seen: 1_800_000_000,
                last_seen: 1_800_000_060,
                sampling_scale: if overflow { 1 } else { 4 },
                overflow,
                packets: 30,
                bytes: if overflow { None } else { Some(1_800) },
            },
        }
    }

    #[test]
    fn filters_parse_into_the_query() {
        let q = query(
            true,
            false,
            true,
            Some("10m"),
            Some("198.18.0.0/15"),
            Some("2001:2::1"),
            Some(22),
            Some("TCP"),
            None,
            10_000,
        )
        .unwrap();
        assert_eq!(q.view, View::Raw);
        assert_eq!(q.verdicts, VerdictFilter::Unallowed);
        assert_eq!(q.since, Some(9_400));
        assert_eq!(q.src, Some("198.18.0.0/15".parse().unwrap()));
        assert_eq!(q.dst, Some("2001:2::1/128".parse().unwrap()));
        assert_eq!((q.port, q.protocol, q.limit), (Some(22), Some(6), DEFAULT_LIMIT));
        let q =
            query(false, true, false, Some("1700000000"), None, None, None, Some("58"), Some(5), 0).unwrap();
        assert_eq!(
            (q.view, q.verdicts, q.since, q.protocol, q.limit),
            (View::Aggregated, VerdictFilter::Allowed, Some(1_700_000_000), Some(58), 5)
        );
    }

    #[test]
    fn bad_filters_name_the_option() {
        let cases = [
            (query(false, true, true, None, None, None, None, None, None, 0), "not both"),
            (query(false, false, false, Some("yesterday"), None, None, None, None, None, 0), "--since"),
            (query(false, false, false, None, Some("10.0.0.300"), None, None, None, None, 0), "--src"),
            (query(false, false, false, None, None, Some("x/8"), None, None, None, 0), "--dst"),
            (query(false, false, false, None, None, None, None, Some("sctpx"), None, 0), "--proto"),
            (query(false, false, false, None, None, None, None, None, Some(0), 0), "--limit"),
        ];
        for (result, option) in cases {
            let error = result.unwrap_err();
            assert!(error.contains(option), "{error}");
        }
    }

    #[test]
    fn every_format_shows_every_row() {
        let result = QueryResult {
            rows: vec![row(Some(7), FlowVerdict::Dropped, false), row(Some(8), FlowVerdict::Allowed, true)],
            more: 3,
        };
        let table = render(&result, View::Raw, Format::Table);
        assert!(table.starts_with("SEQ"), "{table}");
        assert!(
            table.contains("198.18.0.1") && table.contains("dropped") && table.contains("1/4"),
            "{table}"
        );
        assert!(table.contains("(overflow)") && table.contains("3 more rows"), "{table}");
        let csv = render(&result, View::Aggregated, Format::Csv);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "first_seen,last_seen,src,dst,proto,port,verdict,rule,count,packets,bytes,sampling"
        );
        assert_eq!(
            lines[1],
            "2027-01-15T08:00:00Z,2027-01-15T08:01:00Z,198.18.0.1,198.18.0.2,tcp,5432,dropped,3,12,30,1800,1/4"
        );
        assert!(lines[2].ends_with(",allowed,3,12,30,,"), "bytes unknown: an empty cell: {}", lines[2]);
        assert_eq!(lines.len(), 3);
        let json = render(&result, View::Raw, Format::Json);
        assert!(
            json.contains("\"seq\":7") && json.contains("\"src\":null") && json.contains("\"more\":3"),
            "{json}"
        );
        assert!(json.contains("\"verdict\":\"dropped\"") && json.contains("\"proto\":\"tcp\""), "{json}");
        assert!(json.contains("\"count\":12,\"packets\":30,\"bytes\":1800,"), "{json}");
        assert!(json.contains("\"packets\":30,\"bytes\":null,"), "{json}");
    }
}
