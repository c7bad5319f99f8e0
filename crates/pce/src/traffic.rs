//! The traffic query (`GET /api/v2/traffic_flows`, `pce traffic`): its parameters, parsed and
//! checked in one place for the admin API and the CLI; the filter over the stored flows; the JSON.
//!
//! Parameters (all optional, each at most once): `src`, `dst` (an IP address or CIDR), `port`,
//! `proto` (tcp, udp, icmp, icmpv6 or a number 0-255), `verdict` (allowed, observed, would-drop,
//! dropped), `workload` (agent id or hostname), `since`, `until` (Unix seconds or RFC 3339; a
//! flow matches when it was seen at some time in [since, until]), `limit` (default
//! [`DEFAULT_LIMIT`], at most [`MAX_LIMIT`]). Values may be percent-encoded; `+` is a plus sign.
//! Matches come newest received first.

use crate::clock;
use crate::flows::{FlowStats, FlowStore, StoredFlow};
use serde::Serialize;
use std::net::IpAddr;
use ven_proto::{FlowVerdict, IpNet};

pub const DEFAULT_LIMIT: usize = 1000;
pub const MAX_LIMIT: usize = 100_000;
const PARAMETERS: [&str; 9] =
    ["src", "dst", "port", "proto", "verdict", "workload", "since", "until", "limit"];
/// Protocol names the query takes and the JSON shows.
const PROTOCOL_NAMES: [(&str, u8); 4] = [("icmp", 1), ("tcp", 6), ("udp", 17), ("icmpv6", 58)];

/// A traffic query, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// Networks (host bits cleared).
    pub src: Option<IpNet>,
    pub dst: Option<IpNet>,
    pub port: Option<u16>,
    pub proto: Option<u8>,
    pub verdict: Option<FlowVerdict>,
    /// Agent id or hostname.
    pub workload: Option<String>,
    /// Unix seconds.
    pub since: Option<u64>,
    pub until: Option<u64>,
    pub limit: usize,
}

impl Default for Query {
    fn default() -> Self {
        Query {
            src: None,
            dst: None,
            port: None,
            proto: None,
            verdict: None,
            workload: None,
            since: None,
            until: None,
            limit: DEFAULT_LIMIT,
        }
    }
}

impl Query {
    /// Parses a URL query string (`src=198.18.0.0%2F24&proto=tcp`). Errors name the parameter.
    pub fn parse(query: &str) -> Result<Self, String> {
        let mut parsed = Query::default();
        let mut seen: Vec<String> = Vec::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode(key).map_err(|e| format!("parameter name {key:?}: {e}"))?;
            let value = percent_decode(value).map_err(|e| format!("{key}: {e}"))?;
            if seen.contains(&key) {
                return Err(format!("{key}: given more than once"));
            }
            parsed.set(&key, &value)?;
            seen.push(key);
        }
        parsed.check()?;
        Ok(parsed)
    }

    /// Sets one parameter from its text. Errors start with the parameter's name.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        if !PARAMETERS.contains(&key) {
            return Err(format!("unknown parameter {key:?} (expected one of {})", PARAMETERS.join(", ")));
        }
        if value.is_empty() {
            return Err(format!("{key}: no value given"));
        }
        match key {
            "src" | "dst" => {
                let net = value
                    .parse::<IpNet>()
                    .map_err(|e| format!("{key}: {value:?} is not an IP address or CIDR ({e})"))?
                    .network();
                if key == "src" { self.src = Some(net) } else { self.dst = Some(net) }
            }
            "port" => {
                let port = value.parse().map_err(|_| format!("port: {value:?} is not a port 0-65535"))?;
                self.port = Some(port);
            }
            "proto" => self.proto = Some(parse_protocol(value)?),
            "verdict" => self.verdict = Some(value.parse().map_err(|e| format!("verdict: {e}"))?),
            "workload" => self.workload = Some(value.to_string()),
            "since" => self.since = Some(parse_time(value).map_err(|e| format!("since: {e}"))?),
            "until" => self.until = Some(parse_time(value).map_err(|e| format!("until: {e}"))?),
            _ => {
                let limit = value.parse().ok().filter(|limit| *limit <= MAX_LIMIT);
                self.limit =
                    limit.ok_or_else(|| format!("limit: {value:?} is not a number 0-{MAX_LIMIT}"))?;
            }
        }
        Ok(())
    }

    /// Checks the parameters together.
    pub fn check(&self) -> Result<(), String> {
        match (self.since, self.until) {
            (Some(since), Some(until)) if since > until => {
                Err(format!("since ({}) is after until ({})", clock::rfc3339(since), clock::rfc3339(until)))
            }
            _ => Ok(()),
        }
    }

    /// The query as a URL query string that [`Query::parse`] reads back.
    pub fn to_query_string(&self) -> String {
        let mut pairs: Vec<(&str, String)> = Vec::new();
        pairs.extend(self.src.map(|net| ("src", net.to_string())));
        pairs.extend(self.dst.map(|net| ("dst", net.to_string())));
        pairs.extend(self.port.map(|port| ("port", port.to_string())));
        pairs.extend(self.proto.map(|proto| ("proto", protocol_name(proto))));
        pairs.extend(self.verdict.map(|verdict| ("verdict", verdict.as_str().to_string())));
        pairs.extend(self.workload.clone().map(|workload| ("workload", workload)));
        pairs.extend(self.since.map(|since| ("since", since.to_string())));
        pairs.extend(self.until.map(|until| ("until", until.to_string())));
        pairs.push(("limit", self.limit.to_string()));
        let pairs: Vec<String> =
            pairs.iter().map(|(key, value)| format!("{key}={}", percent_encode(value))).collect();
        pairs.join("&")
    }
}

/// The matching flows, newest received first, at most the query's limit; `total` counts all.
pub struct Selection {
    pub total: usize,
    pub flows: Vec<StoredFlow>,
}

/// Runs a query over the store: one pass, newest first.
pub fn select(store: &FlowStore, query: &Query) -> Selection {
    let workload_id = query.workload.as_deref().and_then(|text| text.parse::<u64>().ok());
    let matches = |flow: &StoredFlow| {
        let record = &flow.record;
        query.src.is_none_or(|net| contains(net, record.src))
            && query.dst.is_none_or(|net| contains(net, record.dst))
            && query.port.is_none_or(|port| record.port == port)
            && query.proto.is_none_or(|proto| record.protocol == proto)
            && query.verdict.is_none_or(|verdict| record.verdict == verdict)
            && query.since.is_none_or(|since| u64::from(record.last_seen) >= since)
            && query.until.is_none_or(|until| u64::from(record.first_seen) <= until)
            && query
                .workload
                .as_deref()
                .is_none_or(|text| workload_id == Some(flow.workload_id) || *flow.hostname == *text)
    };
    let mut selection = Selection { total: 0, flows: Vec::with_capacity(query.limit.min(1024)) };
    for flow in store.flows().iter().rev().filter(|flow| matches(flow)) {
        selection.total += 1;
        if selection.flows.len() < query.limit {
            selection.flows.push(flow.clone());
        }
    }
    selection
}

/// Whether `addr` is in `net` (a network: host bits cleared).
pub fn contains(net: IpNet, addr: IpAddr) -> bool {
    addr.is_ipv4() == net.is_ipv4() && IpNet::new(addr, net.prefix()).is_ok_and(|host| host.network() == net)
}

/// The answer of `GET /api/v2/traffic_flows`, as JSON bytes: `{"total", "returned", "more",
/// "flows": [...], "store": {...}}`. Serialised straight from the flows (a `Value` tree of
/// [`MAX_LIMIT`] flows would cost ten times the time and memory).
pub fn answer_json(selection: &Selection, stats: &FlowStats) -> Vec<u8> {
    let answer = Answer {
        total: selection.total,
        returned: selection.flows.len(),
        more: selection.total > selection.flows.len(),
        flows: selection.flows.iter().map(FlowJson::new).collect(),
        store: StoreJson {
            stored: stats.stored,
            capacity: stats.capacity,
            dropped: stats.dropped,
            gaps: stats.gaps,
            missed: stats.missed,
            duplicates: stats.duplicates,
            workloads: stats.workloads,
        },
    };
    // Plain structs, strings and numbers: serialising them into a Vec cannot fail.
    serde_json::to_vec(&answer).unwrap_or_default()
}

#[derive(Serialize)]
struct Answer<'a> {
    total: usize,
    returned: usize,
    more: bool,
    flows: Vec<FlowJson<'a>>,
    store: StoreJson,
}

#[derive(Serialize)]
struct StoreJson {
    stored: usize,
    capacity: usize,
    dropped: u64,
    gaps: u64,
    missed: u64,
    duplicates: u64,
    workloads: usize,
}

/// One flow in the answer.
#[derive(Serialize)]
struct FlowJson<'a> {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    proto_name: String,
    port: u16,
    verdict: &'static str,
    rule: u32,
    /// Connections; `packets` and `bytes` (null: unknown) beside.
    count: u32,
    packets: u64,
    bytes: Option<u64>,
    first_seen: u32,
    first_seen_on: String,
    last_seen: u32,
    last_seen_on: String,
    received: u64,
    received_on: String,
    sampling_scale: u16,
    overflow: bool,
    workload: WorkloadJson<'a>,
}

#[derive(Serialize)]
struct WorkloadJson<'a> {
    href: String,
    id: u64,
    hostname: &'a str,
}

impl<'a> FlowJson<'a> {
    fn new(flow: &'a StoredFlow) -> Self {
        let record = &flow.record;
        FlowJson {
            src: record.src,
            dst: record.dst,
            proto: record.protocol,
            proto_name: protocol_name(record.protocol),
            port: record.port,
            verdict: record.verdict.as_str(),
            rule: record.rule,
            count: record.count,
            packets: record.packets,
            bytes: record.bytes,
            first_seen: record.first_seen,
            first_seen_on: clock::rfc3339(record.first_seen.into()),
            last_seen: record.last_seen,
            last_seen_on: clock::rfc3339(record.last_seen.into()),
            received: flow.received_at,
            received_on: clock::rfc3339(flow.received_at),
            sampling_scale: record.sampling_scale,
            overflow: record.overflow,
            workload: WorkloadJson {
                href: format!("/orgs/1/workloads/{}", flow.workload_id),
                id: flow.workload_id,
                hostname: &flow.hostname,
            },
        }
    }
}

/// tcp, udp, icmp, icmpv6, or the number.
pub fn protocol_name(protocol: u8) -> String {
    PROTOCOL_NAMES
        .iter()
        .find(|(_, number)| *number == protocol)
        .map_or_else(|| protocol.to_string(), |(name, _)| name.to_string())
}

fn parse_protocol(text: &str) -> Result<u8, String> {
    let named = PROTOCOL_NAMES.iter().find(|(name, _)| name.eq_ignore_ascii_case(text));
    match named {
        Some((_, number)) => Ok(*number),
        None => text.parse().map_err(|_| {
            format!("proto: {text:?} is not a protocol (tcp, udp, icmp, icmpv6 or a number 0-255)")
        }),
    }
}

/// Unix seconds, or an RFC 3339 time (`2026-11-27T12:00:00Z`, `...T13:00:00.5+01:00`).
pub fn parse_time(text: &str) -> Result<u64, String> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().map_err(|_| format!("{text:?} is too large"));
    }
    parse_rfc3339(text).ok_or_else(|| {
        format!("{text:?} is neither Unix seconds nor an RFC 3339 time such as 2026-11-27T12:00:00Z")
    })
}

fn parse_rfc3339(text: &str) -> Option<u64> {
    let number = |from: usize, to: usize| -> Option<i64> {
        let digits = text.get(from..to)?;
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    };
    let at = |index: usize, allowed: &[u8]| text.as_bytes().get(index).is_some_and(|b| allowed.contains(b));
    if !(at(4, b"-") && at(7, b"-") && at(10, b"Tt ") && at(13, b":") && at(16, b":")) {
        return None;
    }
    let (year, month, day) = (number(0, 4)?, number(5, 7)?, number(8, 10)?);
    let (hour, minute, second) = (number(11, 13)?, number(14, 16)?, number(17, 19)?);
    let mut rest = text.get(19..)?;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &fraction[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first() {
                Some(b'+') => 1,
                Some(b'-') => -1,
                _ => return None,
            };
            let zone = rest.get(1..)?;
            if zone.len() != 5 || zone.as_bytes()[2] != b':' {
                return None;
            }
            let (hours, minutes) = (zone.get(..2)?, zone.get(3..)?);
            if !(hours.bytes().all(|b| b.is_ascii_digit()) && minutes.bytes().all(|b| b.is_ascii_digit())) {
                return None;
            }
            let (hours, minutes): (i64, i64) = (hours.parse().ok()?, minutes.parse().ok()?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            sign * (hours * 3600 + minutes * 60)
        }
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if day < 1 || day > days_in_month || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset;
    u64::try_from(seconds).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

pub fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = text.get(index + 1..index + 3).and_then(|hex| u8::from_str_radix(hex, 16).ok());
            let Some(byte) = hex.filter(|_| bytes[index + 1].is_ascii_hexdigit()) else {
                return Err(format!("bad percent escape at byte {index} of {text:?}"));
            };
            out.push(byte);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} is not UTF-8 once decoded"))
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Fuzzing: a query string either fails to parse or survives a round trip through
/// [`Query::to_query_string`].
#[doc(hidden)]
pub fn fuzz_query(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(query) = Query::parse(text) {
        assert_eq!(Query::parse(&query.to_query_string()), Ok(query));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::tests::record;
    use serde_json::json;
    use ven_proto::FlowBatch;

    #[test]
    fn parameters_are_parsed_and_errors_name_them() {
        let query = Query::parse(
            "src=198.18.0.9%2F24&dst=2001:db8::1&port=443&proto=udp&verdict=would-drop&workload=web\
             &since=2026-11-27T12:00:00Z&until=1795784400&limit=5",
        )
        .unwrap();
        assert_eq!(query.src, Some("198.18.0.0/24".parse().unwrap()));
        assert_eq!(query.dst, Some("2001:db8::1/128".parse().unwrap()));
        assert_eq!(
            (query.port, query.proto, query.verdict),
            (Some(443), Some(17), Some(FlowVerdict::WouldDrop))
        );
        assert_eq!((query.since, query.until, query.limit), (Some(1_795_780_800), Some(1_795_784_400), 5));
        assert_eq!(query.workload.as_deref(), Some("web"));
        assert_eq!(Query::parse(""), Ok(Query::default()));
        assert_eq!(Query::parse("proto=58").unwrap().proto, Some(58));
        assert_eq!(Query::parse("proto=ICMPv6").unwrap().proto, Some(58));

        for (query, complaint) in [
            ("src=300.1.1.1", "src: \"300.1.1.1\" is not an IP address or CIDR"),
            ("dst=198.18.0.0/33", "dst: "),
            ("port=65536", "port: \"65536\" is not a port"),
            ("proto=gre", "proto: \"gre\" is not a protocol"),
            ("proto=256", "proto: "),
            ("verdict=blocked", "verdict: \"blocked\" is not a verdict"),
            ("since=yesterday", "since: \"yesterday\" is neither"),
            ("until=2026-02-30T00:00:00Z", "until: "),
            ("limit=100001", "limit: \"100001\" is not a number 0-100000"),
            ("limit=-1", "limit: "),
            ("src=", "src: no value given"),
            ("port=1&port=2", "port: given more than once"),
            ("scr=198.18.0.1", "unknown parameter \"scr\""),
            ("src=%zz", "src: bad percent escape"),
            ("since=20&until=10", "since (1970-01-01T00:00:20Z) is after until"),
        ] {
            let error = Query::parse(query).unwrap_err();
            assert!(error.starts_with(complaint), "{query}: {error}");
        }
    }

    #[test]
    fn queries_survive_a_round_trip() {
        let query = Query::parse(
            "src=2001:db8::/32&port=53&proto=icmpv6&verdict=dropped&workload=web%20one&since=1&until=2&limit=0",
        )
        .unwrap();
        assert_eq!(query.workload.as_deref(), Some("web one"));
        let text = query.to_query_string();
        assert!(text.starts_with("src=2001%3Adb8%3A%3A%2F32&port=53&proto=icmpv6&"), "{text}");
        assert_eq!(Query::parse(&text), Ok(query));
        assert_eq!(Query::default().to_query_string(), "limit=1000");
        fuzz_query(b"src=198.18.0.1&proto=200");
    }

    #[test]
    fn rfc3339_times_are_read_like_the_clock_writes_them() {
        for secs in [0, 951_782_400, 1_795_780_800, 4_102_444_799] {
            assert_eq!(parse_time(&clock::rfc3339(secs)), Ok(secs));
        }
        assert_eq!(parse_time("2026-11-27T13:30:00+01:30"), Ok(1_795_780_800));
        assert_eq!(parse_time("2026-11-27t11:00:00.999-01:00"), Ok(1_795_780_800));
        assert_eq!(parse_time("2026-11-27 12:00:00z"), Ok(1_795_780_800));
        assert_eq!(parse_time("2024-02-29T00:00:00Z"), Ok(1_709_164_800));
        assert_eq!(parse_time("1795780800"), Ok(1_795_780_800));
        for bad in [
            "",
            "2023-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-11-27T24:00:00Z",
            "2026-11-27T12:00:00",
            "2026-11-27T12:00:00.Z",
            "2026-11-27T12:00:00+1:00",
            "1969-12-31T23:59:59Z",
            "99999999999999999999999",
            "2026-11-27T12:00:00Zjunk",
            "２０２６-11-27T12:00:00Z",
        ] {
            assert!(parse_time(bad).is_err(), "{bad:?}");
        }
    }

    fn store() -> FlowStore {
        let mut store = FlowStore::in_memory(100);
        let mut web = vec![
            record("198.18.0.2", "198.18.0.3", 5432, 1000),
            record("198.18.0.2", "198.18.1.3", 443, 2000),
            record("2001:db8::2", "2001:db8::3", 443, 3000),
        ];
        web[1].verdict = FlowVerdict::Dropped;
        web[2].protocol = 17;
        let mut db = vec![record("198.18.0.3", "198.18.0.2", 8, 4000)];
        db[0].protocol = 1;
        db[0].verdict = FlowVerdict::Observed;
        store.ingest(1, "web", FlowBatch { first: 1, records: web }, 10).unwrap();
        store.ingest(2, "db", FlowBatch { first: 1, records: db }, 20).unwrap();
        store
    }

    /// Ports of the matches, newest first, and the total.
    fn run(store: &FlowStore, query: &str) -> (Vec<u16>, usize) {
        let selection = select(store, &Query::parse(query).unwrap());
        (selection.flows.iter().map(|flow| flow.record.port).collect(), selection.total)
    }

    #[test]
    fn filters_select_the_matching_flows_newest_first() {
        let store = store();
        assert_eq!(run(&store, ""), (vec![8, 443, 443, 5432], 4));
        assert_eq!(run(&store, "src=198.18.0.0/24"), (vec![8, 443, 5432], 3));
        assert_eq!(run(&store, "src=2001:db8::/64"), (vec![443], 1));
        assert_eq!(run(&store, "src=0.0.0.0/0"), (vec![8, 443, 5432], 3), "IPv4 only");
        assert_eq!(run(&store, "dst=198.18.1.3"), (vec![443], 1));
        assert_eq!(run(&store, "port=443"), (vec![443, 443], 2));
        assert_eq!(run(&store, "proto=tcp"), (vec![443, 5432], 2));
        assert_eq!(run(&store, "proto=1"), (vec![8], 1));
        assert_eq!(run(&store, "verdict=dropped"), (vec![443], 1));
        assert_eq!(run(&store, "workload=db"), (vec![8], 1));
        assert_eq!(run(&store, "workload=1"), (vec![443, 443, 5432], 3));
        // Seen 1000-1005, 2000-2005, 3000-3005, 4000-4005: overlaps count.
        assert_eq!(run(&store, "since=2005"), (vec![8, 443, 443], 3));
        assert_eq!(run(&store, "until=1000"), (vec![5432], 1));
        assert_eq!(run(&store, "since=1003&until=2001"), (vec![443, 5432], 2));
        assert_eq!(run(&store, "since=1006&until=1999"), (vec![], 0));
        assert_eq!(run(&store, "limit=2"), (vec![8, 443], 4));
        assert_eq!(run(&store, "limit=0&proto=tcp"), (vec![], 2));
    }

    #[test]
    fn the_answer_has_flows_counts_and_both_time_forms() {
        let store = store();
        let selection = select(&store, &Query::parse("limit=1").unwrap());
        let answer: serde_json::Value =
            serde_json::from_slice(&answer_json(&selection, &store.stats())).unwrap();
        assert_eq!((answer["total"].as_u64(), answer["returned"].as_u64()), (Some(4), Some(1)));
        assert_eq!(answer["more"], true);
        assert_eq!(answer["store"]["stored"], 4);
        assert_eq!(answer["store"]["capacity"], 100);
        let flow = &answer["flows"][0];
        assert_eq!((&flow["src"], &flow["dst"]), (&json!("198.18.0.3"), &json!("198.18.0.2")));
        assert_eq!(
            (&flow["proto"], &flow["proto_name"], &flow["port"]),
            (&json!(1), &json!("icmp"), &json!(8))
        );
        assert_eq!(
            (&flow["verdict"], &flow["rule"], &flow["count"]),
            (&json!("observed"), &json!(1), &json!(1))
        );
        assert_eq!(
            (&flow["first_seen"], &flow["first_seen_on"]),
            (&json!(4000), &json!("1970-01-01T01:06:40Z"))
        );
        assert_eq!((&flow["last_seen"], &flow["received"]), (&json!(4005), &json!(20)));
        assert_eq!((&flow["sampling_scale"], &flow["overflow"]), (&json!(1), &json!(false)));
        assert_eq!(flow["workload"], json!({ "href": "/orgs/1/workloads/2", "id": 2, "hostname": "db" }));
        assert_eq!(protocol_name(47), "47");
    }
}
