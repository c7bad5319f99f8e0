//! `/orgs/1/labels`: create, list, get, update, delete. A label in use (on a workload or in a
//! rule) cannot be deleted (406 `object_in_use`).

use super::{
    Answer, collection, href_id, invalid_field, method_not_allowed, not_found, ok, org_href, parse_id,
    parse_json, query_value, store_error,
};
use crate::app::App;
use crate::http::{Request, Response};
use crate::policy::Label;
use crate::store::Store;
use serde::Deserialize;
use serde_json::{Value, json};

const MAX_LABEL_TEXT: usize = 255;

pub fn href(id: u64) -> String {
    org_href("labels", id)
}

pub fn json(label: &Label) -> Value {
    json!({ "href": href(label.id), "key": label.key, "value": label.value })
}

/// The id of an existing label named by `href`, or a 400 naming `field`.
pub fn existing(store: &Store, href: &str, field: &str) -> Result<u64, Response> {
    href_id(href, "labels")
        .filter(|id| store.label(*id).is_some())
        .ok_or_else(|| invalid_field(field, &format!("label {href} does not exist")))
}

#[derive(Deserialize)]
struct LabelBody {
    key: Option<String>,
    value: Option<String>,
}

pub fn route(app: &App, method: &str, rest: &[&str], request: &Request) -> Answer {
    match (method, rest) {
        ("GET", []) => {
            let store = app.store();
            let (key, value) =
                (query_value(&request.head.query, "key"), query_value(&request.head.query, "value"));
            let labels = store
                .state()
                .labels
                .iter()
                .filter(|label| key.as_deref().is_none_or(|key| label.key == key))
                .filter(|label| value.as_deref().is_none_or(|value| label.value == value))
                .map(json)
                .collect();
            Ok(collection(labels, request))
        }
        ("POST", []) => {
            let body: LabelBody = parse_json(request)?;
            let (Some(key), Some(value)) = (&body.key, &body.value) else {
                return Err(invalid_field(if body.key.is_none() { "key" } else { "value" }, "is required"));
            };
            check_text("key", key)?;
            check_text("value", value)?;
            let label = app.store().create_label(key, value).map_err(store_error)?;
            Ok(ok(201, json(&label)))
        }
        ("GET", [id]) => {
            let store = app.store();
            parse_id(id)
                .and_then(|id| store.label(id))
                .map(|label| ok(200, json(label)))
                .ok_or_else(not_found)
        }
        ("PUT", [id]) => {
            let id = parse_id(id).ok_or_else(not_found)?;
            let body: LabelBody = parse_json(request)?;
            if let Some(key) = &body.key {
                check_text("key", key)?;
            }
            if let Some(value) = &body.value {
                check_text("value", value)?;
            }
            app.store().update_label(id, body.key.as_deref(), body.value.as_deref()).map_err(store_error)?;
            Ok(Response::empty(204))
        }
        ("DELETE", [id]) => {
            let id = parse_id(id).ok_or_else(not_found)?;
            app.store().delete_label(id).map_err(store_error)?;
            Ok(Response::empty(204))
        }
        (_, [] | [_]) => Err(method_not_allowed(method, request)),
        _ => Err(not_found()),
    }
}

/// Characters that reorder or hide text on a terminal: the bidirectional embeddings, overrides
/// and isolates, the marks, and the zero-width ones.
pub fn is_bidi_or_invisible(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{061c}' | '\u{feff}')
}

/// Label keys and values: 1 to 255 bytes, no control, bidi or zero-width characters (they would
/// reach operators' terminals); keys without `=` or `,`, values without `,` (the CLI's
/// `key=value,key=value` lists).
fn check_text(field: &str, text: &str) -> Result<(), Response> {
    if text.is_empty() || text.len() > MAX_LABEL_TEXT {
        return Err(invalid_field(field, &format!("must have 1 to {MAX_LABEL_TEXT} bytes")));
    }
    if let Some(c) = text.chars().find(|c| c.is_control() || is_bidi_or_invisible(*c)) {
        return Err(invalid_field(
            field,
            &format!("{c:?} is a control, bidi or invisible character; none is allowed"),
        ));
    }
    let forbidden: &[char] = if field == "key" { &['=', ','] } else { &[','] };
    match text.chars().find(|c| forbidden.contains(c)) {
        Some(c) => Err(invalid_field(field, &format!("{text:?} must not contain {c:?}"))),
        None => Ok(()),
    }
}

/// For the fuzz target: `request`'s body as a label, through the same checks as a POST; what
/// passes holds no control or bidi character.
pub fn fuzz_body(request: &Request) {
    let Ok(body) = parse_json::<LabelBody>(request) else { return };
    for (field, text) in [("key", body.key), ("value", body.value)] {
        if let Some(text) = text {
            if check_text(field, &text).is_ok() {
                assert!(!text.chars().any(|c| c.is_control() || is_bidi_or_invisible(c)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_texts_refuse_control_and_bidi_characters() {
        assert!(check_text("key", "role").is_ok());
        assert!(check_text("value", "Ünïcödé web").is_ok());
        for bad in ["", "a\x1b[2J", "a\nb", "\u{202e}gpj.exe", "a\u{200b}b", "a\u{2066}b", "a=b"] {
            assert!(check_text("key", bad).is_err(), "{bad:?}");
        }
        assert!(check_text("value", &"a".repeat(MAX_LABEL_TEXT + 1)).is_err());
        let refused = check_text("value", "x\u{202e}y").unwrap_err();
        let body: Value = serde_json::from_slice(&refused.body).unwrap();
        assert!(body[0]["message"].as_str().unwrap().starts_with("value: '\\u{202e}'"), "{body}");
    }
}
