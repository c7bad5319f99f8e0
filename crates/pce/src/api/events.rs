//! `/orgs/1/events`: the organisation events, as JSON (Illumio's shape), CEF or LEEF lines.

use super::{Answer, invalid, ok, org_href, parse_id};
use crate::app::App;
use crate::clock;
use crate::http::{Request, Response};
use crate::orgevents::{self, EventType, OrgEvent};
use serde_json::{Value, json};
use std::str::FromStr;

/// What `GET /events` was asked for.
#[derive(Debug, PartialEq)]
struct EventQuery {
    event_type: Option<EventType>,
    max_results: Option<usize>,
    format: EventFormat,
}

#[derive(Debug, PartialEq, Clone, Copy)]
enum EventFormat {
    Json,
    Cef,
    Leef,
}

/// `event_type=T`, `max_results=N` (the newest N), `format=json|cef|leef`; other keys are ignored.
fn event_query(query: &str) -> Result<EventQuery, String> {
    let mut parsed = EventQuery { event_type: None, max_results: None, format: EventFormat::Json };
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "event_type" => parsed.event_type = Some(EventType::from_str(value)?),
            "max_results" => {
                let max =
                    parse_id(value).ok_or_else(|| format!("max_results {value:?} is not a whole number"))?;
                parsed.max_results = Some(max);
            }
            "format" => {
                parsed.format = match value {
                    "json" => EventFormat::Json,
                    "cef" => EventFormat::Cef,
                    "leef" => EventFormat::Leef,
                    _ => return Err(format!("unknown format {value:?} (expected json, cef or leef)")),
                }
            }
            _ => {}
        }
    }
    Ok(parsed)
}

/// The events, oldest first; `X-Total-Count` counts all that match, before `max_results`.
pub fn list(app: &App, request: &Request) -> Answer {
    let query = event_query(&request.head.query).map_err(|e| invalid(&e))?;
    let store = app.store();
    let matching: Vec<&OrgEvent> = store
        .events()
        .iter()
        .filter(|event| query.event_type.is_none_or(|wanted| event.event_type == wanted))
        .collect();
    let total = matching.len();
    let newest = &matching[total - query.max_results.unwrap_or(total).min(total)..];
    let version = env!("CARGO_PKG_VERSION");
    let response = match query.format {
        EventFormat::Json => ok(200, Value::Array(newest.iter().map(|e| event_json(e)).collect())),
        EventFormat::Cef | EventFormat::Leef => {
            let format = if query.format == EventFormat::Cef { orgevents::cef } else { orgevents::leef };
            let text: String = newest.iter().map(|e| format!("{}\n", format(e, version))).collect();
            Response::with_body(200, "text/plain; charset=utf-8", text.into_bytes())
        }
    };
    Ok(response.header("x-total-count", total.to_string()))
}

fn event_json(event: &OrgEvent) -> Value {
    let workload = event
        .workload_id
        .map(|id| json!({ "href": super::workloads::href(id), "id": id, "hostname": event.hostname }));
    json!({
        "href": org_href("events", event.id),
        "id": event.id,
        "timestamp": clock::rfc3339(event.at),
        "event_type": event.event_type.as_str(),
        "severity": event.severity().as_str(),
        "workload": workload,
        "message": event.message,
        "details": event.details,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_queries_are_validated() {
        assert_eq!(
            event_query("").unwrap(),
            EventQuery { event_type: None, max_results: None, format: EventFormat::Json }
        );
        assert_eq!(
            event_query("event_type=tampering&max_results=5&format=cef&other=1").unwrap(),
            EventQuery {
                event_type: Some(EventType::Tampering),
                max_results: Some(5),
                format: EventFormat::Cef
            }
        );
        assert!(event_query("event_type=nope").unwrap_err().contains("unknown event type"));
        assert!(event_query("max_results=-1").unwrap_err().contains("max_results"));
        assert!(event_query("format=xml").unwrap_err().contains("cef"));
    }
}
