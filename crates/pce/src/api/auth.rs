//! Who may call the admin API, and the API keys themselves (Illumio's `/users/:id/api_keys`).
//!
//! Two credentials are accepted: HTTP Basic with an API key's `auth_username` and secret (what
//! illumio-py and pylo send), and `Bearer <admin key>` (the key `pce serve` writes to
//! `DIR/admin.key` on first start, which the `pce` CLI uses). Both are checked on the request head,
//! before anything else about the request is looked at.

use super::{Answer, collection, error, not_found, ok, parse_json, store_error};
use crate::app::App;
use crate::clock;
use crate::http::{Head, Request};
use crate::store::ApiKey;
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

/// The one user this PCE has: the administrator, who owns every API key.
pub const USER: &str = "1";
/// Longest API key name or description, in bytes.
const MAX_KEY_TEXT: usize = 255;

/// The credentials a request carries, as far as their form goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Credentials<'a> {
    /// `Authorization: Bearer <admin key>`.
    AdminKey(&'a str),
    /// `Authorization: Basic base64(user:secret)`.
    ApiKey { auth_username: String, secret: String },
}

/// Reads the `Authorization` header's value; `None` when it is missing or not of a form we take.
pub fn credentials(authorization: Option<&str>) -> Option<Credentials<'_>> {
    let value = authorization?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(Credentials::AdminKey(rest));
    }
    if !scheme.eq_ignore_ascii_case("basic") || rest.len() > 1024 {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(rest).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, secret) = decoded.split_once(':')?;
    Some(Credentials::ApiKey { auth_username: user.to_string(), secret: secret.to_string() })
}

/// Whether the credentials of a request head are good.
pub fn authenticated(app: &App, head: &Head) -> bool {
    match credentials(head.header("authorization")) {
        Some(Credentials::AdminKey(key)) => app.is_admin_key(key),
        Some(Credentials::ApiKey { auth_username, secret }) => {
            app.store().api_key_matches(&auth_username, &secret)
        }
        None => false,
    }
}

fn key_href(key_id: &str) -> String {
    format!("/users/{USER}/api_keys/{key_id}")
}

fn key_json(key: &ApiKey) -> Value {
    json!({
        "href": key_href(&key.key_id),
        "key_id": key.key_id,
        "auth_username": key.auth_username,
        "name": key.name,
        "description": key.description,
        "created_at": clock::rfc3339(key.created_at),
    })
}

#[derive(Deserialize)]
struct NewKey {
    #[serde(default)]
    name: String,
    #[serde(default)]
    description: String,
}

/// `/users/1/api_keys[/KEY_ID]`.
pub fn route(app: &App, method: &str, rest: &[&str], request: &Request) -> Answer {
    match (method, rest) {
        ("GET", []) => {
            let store = app.store();
            Ok(collection(store.state().api_keys.iter().map(key_json).collect(), request))
        }
        ("POST", []) => {
            let new: NewKey = parse_json(request)?;
            for (field, text) in [("name", &new.name), ("description", &new.description)] {
                if text.len() > MAX_KEY_TEXT || text.chars().any(char::is_control) {
                    return Err(super::invalid_field(
                        field,
                        &format!("at most {MAX_KEY_TEXT} bytes, no control characters"),
                    ));
                }
            }
            let (key, secret) =
                app.store().create_api_key(&new.name, &new.description, clock::now()).map_err(store_error)?;
            log::info!("API key {} created", key.key_id);
            let mut body = key_json(&key);
            body["secret"] = Value::String(secret);
            Ok(ok(201, body))
        }
        ("GET", [key_id]) => {
            let store = app.store();
            let key = store.state().api_keys.iter().find(|key| key.key_id == *key_id);
            key.map(|key| ok(200, key_json(key))).ok_or_else(not_found)
        }
        ("DELETE", [key_id]) => {
            app.store().delete_api_key(key_id).map_err(store_error)?;
            log::info!("API key {key_id} deleted");
            Ok(crate::http::Response::empty(204))
        }
        (_, [] | [_]) => Err(super::method_not_allowed(method, request)),
        _ => Err(not_found()),
    }
}

/// The 401 every unauthenticated call gets.
pub fn refused() -> crate::http::Response {
    error(
        401,
        "authentication_failed",
        "missing or wrong credentials: use an API key (HTTP Basic) or the admin key",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(text: &str) -> String {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(text))
    }

    #[test]
    fn basic_and_bearer_credentials_are_read() {
        assert_eq!(
            credentials(Some(&basic("api_1f:s3cret:with:colons"))),
            Some(Credentials::ApiKey { auth_username: "api_1f".into(), secret: "s3cret:with:colons".into() })
        );
        assert_eq!(credentials(Some("Bearer abc")), Some(Credentials::AdminKey("abc")));
        assert_eq!(credentials(Some("bearer  abc ")), Some(Credentials::AdminKey("abc")));
    }

    #[test]
    fn malformed_credentials_are_none() {
        for bad in ["", "Basic", "Basic !!!", "Digest abc", "Basic bm9jb2xvbg=="] {
            assert_eq!(credentials(Some(bad)), None, "{bad:?}");
        }
        assert_eq!(credentials(None), None);
        let huge = format!("Basic {}", "A".repeat(2000));
        assert_eq!(credentials(Some(&huge)), None);
    }
}
