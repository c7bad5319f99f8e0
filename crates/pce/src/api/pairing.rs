//! `/orgs/1/pairing_profiles`: how VENs pair. A profile sets the labels and enforcement mode a
//! new workload gets; `POST .../pairing_key` makes an activation code that is valid for
//! `key_lifespan` seconds and `allowed_uses_per_key` activations (`"unlimited"` for either).

use super::{
    Answer, Href, collection, invalid_field, method_not_allowed, not_found, ok, org_href, parse_id,
    parse_json, query_value, store_error,
};
use crate::app::App;
use crate::clock;
use crate::http::{Request, Response};
use crate::store::PairingProfile;
use serde::Deserialize;
use serde_json::{Value, json};
use ven_proto::PolicyState;

pub fn route(app: &App, method: &str, rest: &[&str], request: &Request) -> Answer {
    match (method, rest) {
        ("GET", []) => {
            let store = app.store();
            let name = query_value(&request.head.query, "name");
            let profiles = store
                .state()
                .pairing_profiles
                .iter()
                .filter(|p| name.as_deref().is_none_or(|name| super::name_matches(&p.name, name)))
                .map(profile_json)
                .collect();
            Ok(collection(profiles, request))
        }
        ("GET", [id]) => {
            let store = app.store();
            let profile = parse_id(id).and_then(|id| store.pairing_profile(id));
            profile.map(|p| ok(200, profile_json(p))).ok_or_else(not_found)
        }
        ("POST", []) => {
            let body: ProfileBody = parse_json(request)?;
            let profile = body.into_profile(None, app)?;
            let created = app.store().create_pairing_profile(profile).map_err(store_error)?;
            Ok(ok(201, profile_json(&created)))
        }
        ("PUT", [id]) => {
            let id = parse_id(id).ok_or_else(not_found)?;
            let body: ProfileBody = parse_json(request)?;
            let current = app.store().pairing_profile(id).cloned().ok_or_else(not_found)?;
            let profile = body.into_profile(Some(current), app)?;
            app.store().update_pairing_profile(profile).map_err(store_error)?;
            Ok(Response::empty(204))
        }
        ("DELETE", [id]) => {
            let id = parse_id(id).ok_or_else(not_found)?;
            app.store().delete_pairing_profile(id).map_err(store_error)?;
            Ok(Response::empty(204))
        }
        ("POST", [id, "pairing_key"]) => {
            let id = parse_id(id).ok_or_else(not_found)?;
            let code = app.store().generate_pairing_key(id, clock::now()).map_err(store_error)?;
            log::info!("pairing profile {id}: a pairing key was generated");
            Ok(ok(201, json!({ "activation_code": code })))
        }
        (_, [] | [_] | [_, "pairing_key"]) => Err(method_not_allowed(method, request)),
        _ => Err(not_found()),
    }
}

/// Illumio's enforcement modes and this PCE's policy states: `visibility_only` is build (nothing
/// blocked, connections logged), `selective` is test (nothing blocked, what full enforcement
/// would drop logged as such), `full` is enforced.
pub fn enforcement_mode(state: PolicyState) -> &'static str {
    match state {
        PolicyState::Idle => "idle",
        PolicyState::Build => "visibility_only",
        PolicyState::Test => "selective",
        PolicyState::Enforced => "full",
    }
}

pub fn parse_enforcement_mode(text: &str) -> Result<PolicyState, String> {
    match text {
        "idle" => Ok(PolicyState::Idle),
        "visibility_only" => Ok(PolicyState::Build),
        "selective" => Ok(PolicyState::Test),
        "full" => Ok(PolicyState::Enforced),
        other => Err(format!("{other:?} is not idle, visibility_only, selective or full")),
    }
}

/// `"unlimited"`, `null` or a positive whole number.
fn limit(value: &Value, field: &str) -> Result<Option<u64>, Response> {
    match value {
        Value::Null => Ok(None),
        Value::String(text) if text == "unlimited" => Ok(None),
        Value::Number(number) => match number.as_u64().filter(|n| *n >= 1) {
            Some(n) => Ok(Some(n)),
            None => Err(invalid_field(field, "must be a positive whole number or \"unlimited\"")),
        },
        _ => Err(invalid_field(field, "must be a positive whole number or \"unlimited\"")),
    }
}

#[derive(Deserialize)]
struct ProfileBody {
    name: Option<String>,
    description: Option<String>,
    enabled: Option<bool>,
    enforcement_mode: Option<String>,
    labels: Option<Vec<Href>>,
    allowed_uses_per_key: Option<Value>,
    key_lifespan: Option<Value>,
}

impl ProfileBody {
    fn into_profile(self, current: Option<PairingProfile>, app: &App) -> Result<PairingProfile, Response> {
        let creating = current.is_none();
        let mut profile = current.unwrap_or(PairingProfile {
            id: 0,
            name: String::new(),
            policy_state: PolicyState::Idle,
            activation_code: String::new(),
            description: String::new(),
            enabled: true,
            labels: Vec::new(),
            allowed_uses_per_key: None,
            key_lifespan_s: None,
            keys: Vec::new(),
        });
        match self.name {
            Some(name) => profile.name = super::check_name("name", name)?,
            None if creating => return Err(invalid_field("name", "is required")),
            None => {}
        }
        if let Some(description) = self.description {
            profile.description = super::check_text("description", description)?;
        }
        if let Some(enabled) = self.enabled {
            profile.enabled = enabled;
        }
        if let Some(mode) = &self.enforcement_mode {
            profile.policy_state =
                parse_enforcement_mode(mode).map_err(|e| invalid_field("enforcement_mode", &e))?;
        }
        if let Some(labels) = &self.labels {
            let store = app.store();
            profile.labels = labels
                .iter()
                .enumerate()
                .map(|(i, label)| super::labels::existing(&store, &label.href, &format!("labels[{i}]")))
                .collect::<Result<_, _>>()?;
        }
        if let Some(uses) = &self.allowed_uses_per_key {
            let uses = limit(uses, "allowed_uses_per_key")?;
            profile.allowed_uses_per_key = match uses {
                None => None,
                Some(n) => {
                    Some(u32::try_from(n).map_err(|_| invalid_field("allowed_uses_per_key", "too large"))?)
                }
            };
        }
        if let Some(lifespan) = &self.key_lifespan {
            profile.key_lifespan_s = limit(lifespan, "key_lifespan")?;
        }
        Ok(profile)
    }
}

fn profile_json(profile: &PairingProfile) -> Value {
    let unlimited_or = |value: Option<u64>| value.map_or(json!("unlimited"), |n| json!(n));
    let labels: Vec<Value> =
        profile.labels.iter().map(|id| json!({ "href": super::labels::href(*id) })).collect();
    let mut value = json!({
        "href": org_href("pairing_profiles", profile.id),
        "name": profile.name,
        "description": profile.description,
        "enabled": profile.enabled,
        "enforcement_mode": enforcement_mode(profile.policy_state),
        "policy_state": profile.policy_state.as_str(),
        "labels": labels,
        "allowed_uses_per_key": unlimited_or(profile.allowed_uses_per_key.map(u64::from)),
        "key_lifespan": unlimited_or(profile.key_lifespan_s),
        "total_use_count": profile.keys.iter().map(|k| u64::from(k.uses)).sum::<u64>(),
        "last_pairing_key_generated_at": profile.keys.last().map(|k| clock::rfc3339(k.created_at)),
    });
    if !profile.activation_code.is_empty() {
        value["activation_code"] = Value::String(profile.activation_code.clone());
    }
    value
}
