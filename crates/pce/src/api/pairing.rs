//! `/orgs/1/pairing_profiles`: the profiles and their activation codes.

use super::{Answer, collection, org_href};
use crate::http::Request;
use crate::serve::App;
use crate::store::PairingProfile;
use serde_json::{Value, json};

pub fn list(app: &App, request: &Request) -> Answer {
    let store = app.store();
    Ok(collection(store.state().pairing_profiles.iter().map(profile_json).collect(), request))
}

fn profile_json(profile: &PairingProfile) -> Value {
    json!({
        "href": org_href("pairing_profiles", profile.id),
        "name": profile.name,
        "policy_state": profile.policy_state.as_str(),
        "activation_code": profile.activation_code,
    })
}
