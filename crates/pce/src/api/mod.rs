//! The admin API: JSON under `/api/v2`, in the shapes of the public Illumio REST API v2, so that
//! the public clients (illumio-py, pylo) drive this PCE as they drive Illumio's.
//!
//! Conventions, as those clients expect them:
//! - Paths: organisation objects under `/api/v2/orgs/1/...` (this PCE has one organisation; the
//!   same paths without `orgs/1/` are kept as aliases for older scripts and the `pce` CLI);
//!   global ones (`/health`, `/product_version`, `/users/1/api_keys`) without it. Hrefs have the
//!   form `/orgs/1/labels/7`, `/orgs/1/sec_policy/draft/rules/3`.
//! - Every call needs credentials ([`auth`]), checked first; otherwise 401.
//! - Collections answer with `X-Total-Count` (all that match) and honour `max_results` (the
//!   first N; `max_results=0` gives none, which illumio-py uses to learn the count).
//! - GET 200; POST 201 with the created object; PUT and DELETE 204; errors are a JSON array
//!   `[{"token": ..., "message": ...}]`: 400 for malformed input, 401, 404 for a missing object
//!   or endpoint, 405, 406 for a valid request the state refuses (an object in use).
//!
//! One module per resource: `auth` (credentials, API keys), `labels`, `workloads` (and their
//! custom iptables rules), `sec_policy` (draft and active versions, provisioning, policy
//! versions) with `ip_lists`, `services` and `rule_sets` (and their rules), `pairing`, `events`,
//! `traffic`, `support_reports` (requests to VENs and the reports received), `upgrades` (VEN
//! upgrade orders: `PUT /orgs/1/vens/upgrade` answers 200 with counts, not 204).

mod auth;
mod events;
mod ip_lists;
mod jobs;
mod labels;
mod pairing;
mod rule_sets;
mod sec_policy;
mod services;
mod support_reports;
mod traffic;
mod upgrades;
mod workloads;

use crate::app::App;
use crate::http::{Admission, Head, Request, Response};
use crate::policy::model::MAX_TEXT;
use crate::store::StoreError;
use serde::Deserialize;
use serde_json::{Value, json};

/// Illumio object kinds this PCE does not model; their collections are empty, so that clients
/// that load every kind (pylo's Organization) work. Creating one is a 404.
const UNMODELLED_POLICY_KINDS: [&str; 3] = ["label_groups", "virtual_services", "virtual_servers"];
const UNMODELLED_ORG_KINDS: [&str; 2] = ["security_principals", "label_dimensions"];

pub const PREFIX: &str = "/api/v2/";
/// The one organisation, for paths and hrefs in Illumio's `/orgs/<org>/...` form.
pub const ORG: &str = "1";

/// Checks the credentials on the request head, before its body is read: every admin call needs
/// them; without, 401 `authentication_failed` at once.
pub fn admit(app: &App, head: &Head) -> Admission {
    if auth::authenticated(app, head) {
        Admission::Authenticated
    } else {
        Admission::Refused(auth::refused())
    }
}

pub fn handle(app: &App, request: &Request) -> Response {
    if !auth::authenticated(app, &request.head) {
        return auth::refused();
    }
    let path = request.head.path.strip_prefix(PREFIX).unwrap_or_default().trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').collect();
    let method = request.head.method.as_str();
    let result = match segments.as_slice() {
        ["health"] if method == "GET" => Ok(health(app)),
        ["product_version"] if method == "GET" => Ok(product_version()),
        ["health" | "product_version"] => Err(method_not_allowed(method, request)),
        ["users", auth::USER, "api_keys", rest @ ..] => auth::route(app, method, rest, request),
        ["orgs", ORG, rest @ ..] => org_route(app, method, rest, request),
        ["orgs", org, ..] => {
            Err(error(404, "not_found", &format!("no organisation {org:?} (this PCE has org 1)")))
        }
        rest => org_route(app, method, rest, request),
    };
    let answer = result.unwrap_or_else(|response| response);
    if method == "GET" && jobs::wants_async(request) {
        jobs::defer_collection(app, request, answer)
    } else {
        answer
    }
}

/// Objects of the organisation, with the `orgs/1/` prefix taken off.
fn org_route(app: &App, method: &str, segments: &[&str], request: &Request) -> Answer {
    match segments {
        ["labels", rest @ ..] => labels::route(app, method, rest, request),
        ["workloads", rest @ ..] => workloads::route(app, method, rest, request),
        ["events"] if method == "GET" => events::list(app, request),
        ["traffic_flows"] if method == "GET" => traffic::flows(app, request),
        ["traffic_flows", "async_queries", ..] | ["jobs", ..] | ["datafiles", ..] => {
            jobs::route(app, method, segments, request)
        }
        ["sec_policy", rest @ ..] => sec_policy::route(app, method, rest, request),
        ["pairing_profiles", rest @ ..] => pairing::route(app, method, rest, request),
        ["support_report_requests", rest @ ..] => support_reports::requests(app, method, rest, request),
        ["support_reports", rest @ ..] => support_reports::reports(app, method, rest, request),
        ["vens", rest @ ..] => upgrades::route(app, method, rest, request),
        ["settings", "workloads"] if method == "GET" => Ok(workload_settings(app)),
        [kind] if method == "GET" && UNMODELLED_ORG_KINDS.contains(kind) => {
            Ok(collection(Vec::new(), request))
        }
        ["events" | "traffic_flows"] | ["settings", "workloads"] => Err(method_not_allowed(method, request)),
        _ => Err(not_found()),
    }
}

/// `GET /api/v2/health`: one node, as Illumio answers for a single-node cluster.
fn health(app: &App) -> Response {
    ok(
        200,
        json!([{
            "status": "normal",
            "type": "snc0",
            "generated_at": crate::clock::rfc3339(crate::clock::now()),
            "available_seconds": app.uptime_seconds(),
            "notifications": [],
        }]),
    )
}

/// `GET /orgs/1/settings/workloads`: when a silent workload goes offline (the spec: 12 missed
/// heartbeats) and when one that said goodbye does (at once). illumio-py's connection check
/// reads it to validate the organisation.
fn workload_settings(app: &App) -> Response {
    let offline_after = u64::from(app.heartbeat_interval_s) * u64::from(app.offline_after_heartbeats);
    ok(
        200,
        json!({
            "href": format!("/orgs/{ORG}/settings/workloads"),
            "workload_disconnected_timeout_seconds": [{ "scope": [], "value": offline_after }],
            "workload_goodbye_timeout_seconds": [{ "scope": [], "value": 0 }],
        }),
    )
}

/// `GET /api/v2/product_version`.
fn product_version() -> Response {
    let version = env!("CARGO_PKG_VERSION");
    ok(
        200,
        json!({
            "version": version,
            "build": 0,
            "short_display": version,
            "long_display": format!("{version}-0"),
            "product": "ven reference PCE",
        }),
    )
}

/// An answer, or the error answer that ends the request.
type Answer = Result<Response, Response>;

/// An error answer: `[{"token": ..., "message": ...}]`.
pub fn error(status: u16, token: &str, message: &str) -> Response {
    ok(status, json!([{ "token": token, "message": message }]))
}

fn ok(status: u16, body: Value) -> Response {
    Response::with_body(status, "application/json", body.to_string().into_bytes())
}

/// A collection: the first `max_results` items (all without it), `X-Total-Count` counting all.
fn collection(items: Vec<Value>, request: &Request) -> Response {
    let total = items.len();
    let shown = match max_results(&request.head.query) {
        Ok(Some(max)) => items.into_iter().take(max).collect(),
        Ok(None) => items,
        Err(response) => return response,
    };
    ok(200, Value::Array(shown)).header("x-total-count", total.to_string())
}

/// The `max_results` query parameter: a whole number, without sign or leading zeros.
fn max_results(query: &str) -> Result<Option<usize>, Response> {
    let Some(value) = query_value(query, "max_results") else { return Ok(None) };
    parse_id(&value).map(Some).ok_or_else(|| invalid_field("max_results", "must be a whole number"))
}

/// The value of `key` in a query string (the first), decoded as a form value: `+` is a space and
/// `%XX` a byte, as requests (illumio-py, pylo) encode them. A malformed escape leaves the value
/// as given.
fn query_value(query: &str, key: &str) -> Option<String> {
    let raw = query.split('&').filter_map(|pair| pair.split_once('=')).find(|(k, _)| *k == key)?.1;
    Some(crate::traffic::percent_decode(&raw.replace('+', " ")).unwrap_or_else(|_| raw.to_string()))
}

/// A decimal id as it appears in paths and hrefs: digits only, no sign, no leading zero.
fn parse_id<T: std::str::FromStr>(text: &str) -> Option<T> {
    let canonical = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if canonical { text.parse().ok() } else { None }
}

fn not_found() -> Response {
    error(404, "not_found", "no such object or endpoint")
}

fn method_not_allowed(method: &str, request: &Request) -> Response {
    error(405, "method_not_allowed", &format!("{method} is not allowed on {}", request.head.path))
}

fn invalid(message: &str) -> Response {
    error(400, "input_validation_error", message)
}

/// A 400 naming the field that is wrong.
fn invalid_field(field: &str, problem: &str) -> Response {
    invalid(&format!("{field}: {problem}"))
}

fn store_error(e: StoreError) -> Response {
    match e {
        StoreError::Rejected(message) => invalid(&message),
        StoreError::InUse(message) => error(406, "object_in_use", &message),
        StoreError::NoWorkload(_)
        | StoreError::NoLabel(_)
        | StoreError::NoApiKey(_)
        | StoreError::NoObject
        | StoreError::NoProfile(_) => not_found(),
        e @ StoreError::NoCustomRule { .. } => error(404, "not_found", &e.to_string()),
        other => {
            log::error!("admin API: {other}");
            error(500, "internal_error", "the PCE could not record the change")
        }
    }
}

/// The request body as `T`; a 400 naming the field that is wrong (`labels[1].href: ...`), or
/// `invalid_json` for a body that is not JSON.
fn parse_json<'a, T: Deserialize<'a>>(request: &'a Request) -> Result<T, Response> {
    let mut body = serde_json::Deserializer::from_slice(&request.body);
    serde_path_to_error::deserialize(&mut body).map_err(|e| {
        let (path, inner) = (e.path().to_string(), e.into_inner());
        if inner.is_syntax() || inner.is_eof() {
            error(400, "invalid_json", &format!("request body: {inner}"))
        } else if path == "." {
            invalid(&format!("request body: {inner}"))
        } else {
            invalid_field(&path, &inner.to_string())
        }
    })
}

#[derive(Deserialize, Debug)]
struct Href {
    href: String,
}

/// The id in an href of `kind` (`labels`, `workloads`): `/orgs/1/KIND/ID`, or the older
/// `/api/v2/KIND/ID`.
fn href_id(href: &str, kind: &str) -> Option<u64> {
    let rest = href.strip_prefix("/orgs/1/").or_else(|| href.strip_prefix(PREFIX))?;
    parse_id(rest.strip_prefix(kind)?.strip_prefix('/')?)
}

/// A name: 1 to [`MAX_TEXT`] bytes, no control characters.
fn check_name(field: &str, name: String) -> Result<String, Response> {
    if name.trim().is_empty() {
        return Err(invalid_field(field, "must not be empty"));
    }
    check_text(field, name)
}

/// A description: at most [`MAX_TEXT`] bytes, no control characters.
fn check_text(field: &str, text: String) -> Result<String, Response> {
    if text.len() > MAX_TEXT || text.chars().any(char::is_control) {
        return Err(invalid_field(field, &format!("at most {MAX_TEXT} bytes, no control characters")));
    }
    Ok(text)
}

/// The `name` filter of collections: a case-insensitive substring, as Illumio matches it.
fn name_matches(name: &str, wanted: &str) -> bool {
    name.to_lowercase().contains(&wanted.to_lowercase())
}

fn org_href(kind: &str, id: impl std::fmt::Display) -> String {
    format!("/orgs/{ORG}/{kind}/{id}")
}

/// For the fuzz target `pce_admin_json`: the first line of `data` as an href, id, query string
/// and `Authorization` value, the rest as a request body, through the admin API's readers. Checks
/// that what they accept is canonical; a violation panics.
pub fn fuzz_admin_input(data: &[u8]) {
    let (first, body) = match data.iter().position(|b| *b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    if let Ok(text) = std::str::from_utf8(first) {
        for kind in ["labels", "workloads", "ip_lists", "services", "rule_sets", "pairing_profiles"] {
            if let Some(id) = href_id(text, kind) {
                assert!(text.ends_with(&format!("/{kind}/{id}")), "{text:?} read as {kind} {id}");
            }
        }
        if let Some(id) = parse_id::<u64>(text) {
            assert_eq!(id.to_string(), text, "a non-canonical id accepted");
        }
        // Query values are form-decoded first (`%37` is `7`); what is accepted is then canonical.
        if let Ok(Some(max)) = max_results(text) {
            assert_eq!(query_value(text, "max_results"), Some(max.to_string()), "{text:?}");
        }
        let _ = query_value(text, "name");
        let _ = auth::credentials(Some(text));
    }
    let request = Request {
        head: Head {
            method: "POST".into(),
            path: format!("{PREFIX}labels"),
            query: String::new(),
            headers: Vec::new(),
            keep_alive: true,
        },
        body: body.to_vec(),
    };
    if let Err(response) = parse_json::<Value>(&request) {
        assert_eq!(response.status, 400);
    }
    labels::fuzz_body(&request);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_an_array_of_token_and_message() {
        let response = error(404, "not_found", "nope");
        let body: Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(body, json!([{ "token": "not_found", "message": "nope" }]));
    }

    #[test]
    fn body_errors_name_the_field() {
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct Body {
            labels: Vec<Href>,
        }
        let request = |body: &str| Request {
            head: crate::http::Head {
                method: "POST".into(),
                path: "/api/v2/x".into(),
                query: String::new(),
                headers: Vec::new(),
                keep_alive: true,
            },
            body: body.as_bytes().to_vec(),
        };
        let message = |response: Response| -> Value { serde_json::from_slice(&response.body).unwrap() };
        let wrong = message(
            parse_json::<Body>(&request(r#"{"labels": [{"href": "/orgs/1/labels/1"}, {"href": 5}]}"#))
                .unwrap_err(),
        );
        assert_eq!(wrong[0]["token"], "input_validation_error");
        assert!(wrong[0]["message"].as_str().unwrap().starts_with("labels[1].href: invalid type"), "{wrong}");
        let broken = message(parse_json::<Body>(&request(r#"{"labels": ["#)).unwrap_err());
        assert_eq!(broken[0]["token"], "invalid_json");
    }

    #[test]
    fn ids_are_canonical_decimal() {
        assert_eq!(parse_id::<u64>("17"), Some(17));
        assert_eq!(parse_id::<u64>("0"), Some(0));
        for bad in ["", "+1", "01", "-1", "1a", " 1", "99999999999999999999999"] {
            assert_eq!(parse_id::<u64>(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn hrefs_of_both_forms_name_their_object() {
        assert_eq!(href_id("/orgs/1/labels/7", "labels"), Some(7));
        assert_eq!(href_id("/api/v2/labels/7", "labels"), Some(7));
        assert_eq!(href_id("/orgs/2/labels/7", "labels"), None);
        assert_eq!(href_id("/orgs/1/workloads/7", "labels"), None);
        assert_eq!(href_id("/orgs/1/labels/07", "labels"), None);
        assert_eq!(href_id("/orgs/1/labels/7/x", "labels"), None);
        assert_eq!(org_href("labels", 7), "/orgs/1/labels/7");
    }

    #[test]
    fn query_values_are_percent_decoded() {
        let name = |query: &str| query_value(query, "name").unwrap();
        assert_eq!(name("name=Any+%280.0.0.0%2F0%29"), "Any (0.0.0.0/0)");
        assert_eq!(name("name=100%"), "100%");
        assert_eq!(name("name=%zz%4"), "%zz%4");
        assert!(name_matches("All Services", &name("max_results=3&name=all+serv")));
    }

    #[test]
    fn max_results_is_read_strictly() {
        assert_eq!(max_results("a=1&max_results=0").unwrap(), Some(0));
        assert_eq!(max_results("max_results=25").unwrap(), Some(25));
        assert_eq!(max_results("name=x").unwrap(), None);
        assert!(max_results("max_results=-1").is_err());
        assert!(max_results("max_results=+3").is_err());
    }
}
