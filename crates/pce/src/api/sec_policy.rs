//! `/orgs/1/sec_policy`: the policy objects in their draft and active versions, the pending
//! changes, provisioning (`POST /sec_policy`) and the policy versions it creates.
//!
//! Objects are edited in the draft only (`/sec_policy/draft/...`); the active version is read-only
//! and changes by provisioning, which recomputes the workloads' policies and sends a lightning
//! bolt to the VENs whose policy changed.

use super::{
    Answer, ORG, collection, error, invalid_field, method_not_allowed, not_found, ok, parse_id, parse_json,
    store_error,
};
use crate::app::App;
use crate::clock;
use crate::http::{Request, Response};
use crate::policy::model::{Kind, ObjectRef, PolicyObjects};
use crate::store::PolicyVersion;
use serde::Deserialize;
use serde_json::{Value, json};

/// `draft` or `active`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Draft,
    Active,
}

impl Version {
    fn parse(text: &str) -> Option<Version> {
        match text {
            "draft" => Some(Version::Draft),
            "active" => Some(Version::Active),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Version::Draft => "draft",
            Version::Active => "active",
        }
    }

    pub fn objects(self, state: &crate::store::State) -> &PolicyObjects {
        match self {
            Version::Draft => &state.draft,
            Version::Active => &state.active,
        }
    }
}

/// `/orgs/1/sec_policy/VERSION/KIND/ID`.
pub fn href(version: Version, kind: Kind, id: u64) -> String {
    format!("/orgs/{ORG}/sec_policy/{}/{}/{id}", version.as_str(), kind.as_str())
}

/// The object an href of either version names: `/orgs/1/sec_policy/(draft|active)/KIND/ID`.
pub fn object_in_href(href: &str) -> Option<ObjectRef> {
    let rest = href.strip_prefix("/orgs/1/sec_policy/")?;
    let mut parts = rest.split('/');
    let (version, kind, id) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || Version::parse(version).is_none() {
        return None;
    }
    Some((Kind::parse(kind)?, parse_id(id)?))
}

/// The id of an object of `kind` named by `href`, or a 400 naming `field`.
pub fn id_in_href(href: &str, kind: Kind, field: &str) -> Result<u64, Response> {
    match object_in_href(href) {
        Some((found, id)) if found == kind => Ok(id),
        _ => Err(invalid_field(field, &format!("{href:?} is not an href of {}", kind.as_str()))),
    }
}

pub fn route(app: &App, method: &str, rest: &[&str], request: &Request) -> Answer {
    match (method, rest) {
        ("POST", []) => provision(app, request),
        ("GET", []) => Ok(versions(app, request)),
        ("GET", ["pending"]) => Ok(pending(app)),
        ("GET", [id]) if parse_id::<u64>(id).is_some() => version(app, id),
        (_, [version, kind, tail @ ..]) => {
            let Some(version) = Version::parse(version) else { return Err(not_found()) };
            if version == Version::Active && method != "GET" {
                return Err(error(
                    405,
                    "method_not_allowed",
                    "the active policy changes only by provisioning: edit the draft, then POST /sec_policy",
                ));
            }
            match Kind::parse(kind) {
                Some(Kind::IpLists) => super::ip_lists::route(app, method, version, tail, request),
                Some(Kind::Services) => super::services::route(app, method, version, tail, request),
                Some(Kind::RuleSets) => super::rule_sets::route(app, method, version, tail, request),
                // Kinds this PCE does not model: none exist (clients that load every kind work).
                None if super::UNMODELLED_POLICY_KINDS.contains(kind)
                    && tail.is_empty()
                    && method == "GET" =>
                {
                    Ok(collection(Vec::new(), request))
                }
                None => Err(not_found()),
            }
        }
        (_, [] | ["pending"]) => Err(method_not_allowed(method, request)),
        _ => Err(not_found()),
    }
}

#[derive(Deserialize, Default)]
struct ProvisionBody {
    #[serde(default)]
    update_description: String,
    /// `{"rule_sets": [{"href": ...}], "ip_lists": [...], "services": [...]}`; absent: all.
    change_subset: Option<serde_json::Map<String, Value>>,
}

fn provision(app: &App, request: &Request) -> Answer {
    let body: ProvisionBody =
        if request.body.is_empty() { ProvisionBody::default() } else { parse_json(request)? };
    let subset = match &body.change_subset {
        None => None,
        Some(subset) => {
            let mut objects = Vec::new();
            for (kind_name, refs) in subset {
                let Some(kind) = Kind::parse(kind_name) else {
                    return Err(invalid_field(
                        &format!("change_subset.{kind_name}"),
                        "this PCE provisions ip_lists, services and rule_sets",
                    ));
                };
                let refs = refs.as_array().ok_or_else(|| {
                    invalid_field(&format!("change_subset.{kind_name}"), "must be a list of {\"href\": ...}")
                })?;
                for (index, reference) in refs.iter().enumerate() {
                    let field = format!("change_subset.{kind_name}[{index}].href");
                    let href = reference.get("href").and_then(Value::as_str).unwrap_or_default();
                    objects.push((kind, id_in_href(href, kind, &field)?));
                }
            }
            Some(objects)
        }
    };
    // The bolts leave as soon as the versions are known, while the store commits.
    let (version, _changes) = app
        .store()
        .provision(subset, &body.update_description, clock::now(), &|changes| app.publish(changes))
        .map_err(store_error)?;
    log::info!(
        "provisioned security policy version {} ({} objects, {} workloads affected)",
        version.version,
        version.objects.len(),
        version.workloads_affected
    );
    let counts = object_counts(&app.store().state().active);
    Ok(ok(201, version_json(&version, Some(counts))))
}

fn object_counts(active: &PolicyObjects) -> Value {
    json!({
        "ip_lists": active.ip_lists.len(),
        "services": active.services.len(),
        "rule_sets": active.rule_sets.len(),
    })
}

fn version_json(version: &PolicyVersion, counts: Option<Value>) -> Value {
    let objects: Vec<Value> = version
        .objects
        .iter()
        .map(|(kind, id)| json!({ "href": href(Version::Active, *kind, *id), "type": kind.as_str() }))
        .collect();
    json!({
        "href": format!("/orgs/{ORG}/sec_policy/{}", version.version),
        "version": version.version,
        "commit_message": version.description,
        "created_at": clock::rfc3339(version.created_at),
        "workloads_affected": version.workloads_affected,
        "object_counts": counts,
        "provisioned_objects": objects,
    })
}

/// `GET /sec_policy`: the policy versions, newest first.
fn versions(app: &App, request: &Request) -> Response {
    let store = app.store();
    let items = store.state().policy_versions.iter().rev().map(|v| version_json(v, None)).collect();
    collection(items, request)
}

fn version(app: &App, id: &str) -> Answer {
    let store = app.store();
    let id: u64 = parse_id(id).ok_or_else(not_found)?;
    let found = store.state().policy_versions.iter().find(|v| v.version == id);
    found.map(|v| ok(200, version_json(v, None))).ok_or_else(not_found)
}

/// `GET /sec_policy/pending`: the draft objects that differ from the active ones.
fn pending(app: &App) -> Response {
    let store = app.store();
    let state = store.state();
    let mut by_kind = serde_json::Map::new();
    for (kind, id) in store.pending_changes() {
        let change = if !state.active.contains((kind, id)) {
            "create"
        } else if !state.draft.contains((kind, id)) {
            "delete"
        } else {
            "update"
        };
        let entry = by_kind.entry(kind.as_str()).or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(list) = entry {
            list.push(json!({ "href": href(Version::Draft, kind, id), "change_type": change }));
        }
    }
    ok(200, Value::Object(by_kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hrefs_of_either_version_name_the_object() {
        assert_eq!(object_in_href("/orgs/1/sec_policy/draft/ip_lists/3"), Some((Kind::IpLists, 3)));
        assert_eq!(object_in_href("/orgs/1/sec_policy/active/rule_sets/12"), Some((Kind::RuleSets, 12)));
        assert_eq!(href(Version::Draft, Kind::Services, 4), "/orgs/1/sec_policy/draft/services/4");
        for bad in [
            "/orgs/1/sec_policy/pending/ip_lists/3",
            "/orgs/2/sec_policy/draft/ip_lists/3",
            "/orgs/1/sec_policy/draft/label_groups/3",
            "/orgs/1/sec_policy/draft/ip_lists/03",
            "/orgs/1/sec_policy/draft/rule_sets/1/sec_rules/2",
        ] {
            assert_eq!(object_in_href(bad), None, "{bad}");
        }
    }
}
