//! Pairing profiles in the store: creating, changing and deleting them, generating keys, and
//! finding the profile (and key) an activation code belongs to.
//!
//! Keys are kept as SHA-256 digests and compared in constant time; a key is valid while its
//! profile is enabled, it is younger than the profile's `key_lifespan_s` and it has been used
//! fewer than `allowed_uses_per_key` times. The uses are counted when a workload is created.

use super::{ACTIVATION_CODE_BYTES, PairingKey, PairingProfile, Store, StoreError};
use crate::crypto;

/// Profiles, and generated keys per profile (the oldest key is dropped past it).
pub const MAX_PAIRING_PROFILES: usize = 1_000;
pub const MAX_KEYS_PER_PROFILE: usize = 1_000;

impl Store {
    pub fn pairing_profile(&self, id: u64) -> Option<&PairingProfile> {
        self.state.pairing_profiles.iter().find(|profile| profile.id == id)
    }

    /// Creates a profile (its id is assigned here; it has no standing code).
    pub fn create_pairing_profile(
        &mut self,
        mut profile: PairingProfile,
    ) -> Result<PairingProfile, StoreError> {
        if self.state.pairing_profiles.len() >= MAX_PAIRING_PROFILES {
            return Err(StoreError::Rejected(format!(
                "the PCE holds its maximum of {MAX_PAIRING_PROFILES} pairing profiles"
            )));
        }
        self.check_profile(&profile, None)?;
        profile.id = self.state.pairing_profiles.iter().map(|p| p.id).max().unwrap_or(0) + 1;
        profile.activation_code.clear();
        profile.keys.clear();
        self.state.pairing_profiles.push(profile.clone());
        self.save()?;
        Ok(profile)
    }

    /// Replaces profile `profile.id`'s settings; its standing code and keys stay.
    pub fn update_pairing_profile(&mut self, profile: PairingProfile) -> Result<(), StoreError> {
        self.check_profile(&profile, Some(profile.id))?;
        let slot = self
            .state
            .pairing_profiles
            .iter_mut()
            .find(|p| p.id == profile.id)
            .ok_or(StoreError::NoProfile(profile.id))?;
        let (code, keys) = (std::mem::take(&mut slot.activation_code), std::mem::take(&mut slot.keys));
        *slot = PairingProfile { activation_code: code, keys, ..profile };
        self.save()
    }

    pub fn delete_pairing_profile(&mut self, id: u64) -> Result<(), StoreError> {
        let before = self.state.pairing_profiles.len();
        self.state.pairing_profiles.retain(|profile| profile.id != id);
        if self.state.pairing_profiles.len() == before {
            return Err(StoreError::NoProfile(id));
        }
        self.save()
    }

    /// A new activation code for profile `id`; only its digest is kept.
    pub fn generate_pairing_key(&mut self, id: u64, now: u64) -> Result<String, StoreError> {
        let code = crypto::random_hex(ACTIVATION_CODE_BYTES)?;
        let profile =
            self.state.pairing_profiles.iter_mut().find(|p| p.id == id).ok_or(StoreError::NoProfile(id))?;
        if !profile.enabled {
            return Err(StoreError::Rejected(format!("pairing profile {id} is disabled")));
        }
        if profile.keys.len() >= MAX_KEYS_PER_PROFILE {
            profile.keys.remove(0);
        }
        profile.keys.push(PairingKey {
            code_sha256: crypto::sha256_hex(code.as_bytes()),
            created_at: now,
            uses: 0,
        });
        self.save()?;
        Ok(code)
    }

    /// The profile (index) and generated key (index, `None` for a standing code) of `code`, or
    /// why it cannot pair now.
    pub(super) fn pairing_key(&self, code: &str, now: u64) -> Result<(usize, Option<usize>), StoreError> {
        let digest = crypto::sha256_hex(code.as_bytes());
        for (index, profile) in self.state.pairing_profiles.iter().enumerate() {
            let standing = !profile.activation_code.is_empty()
                && crypto::constant_time_eq(profile.activation_code.as_bytes(), code.as_bytes());
            let key = profile
                .keys
                .iter()
                .position(|key| crypto::constant_time_eq(key.code_sha256.as_bytes(), digest.as_bytes()));
            if !standing && key.is_none() {
                continue;
            }
            if !profile.enabled {
                return Err(StoreError::Activation(format!(
                    "pairing profile {:?} is disabled: ask the administrator to enable it or for another key",
                    profile.name
                )));
            }
            if let Some(key_index) = key.filter(|_| !standing) {
                let key = &profile.keys[key_index];
                if let Some(lifespan) = profile.key_lifespan_s {
                    if now >= key.created_at.saturating_add(lifespan) {
                        return Err(StoreError::Activation(format!(
                            "this activation code of pairing profile {:?} expired {} s after it was made: \
                             ask for a new one",
                            profile.name, lifespan
                        )));
                    }
                }
                if let Some(allowed) = profile.allowed_uses_per_key {
                    if key.uses >= allowed {
                        return Err(StoreError::Activation(format!(
                            "this activation code of pairing profile {:?} has been used {} time(s), its limit: \
                             ask for a new one",
                            profile.name, key.uses
                        )));
                    }
                }
                return Ok((index, Some(key_index)));
            }
            return Ok((index, None));
        }
        Err(StoreError::Activation("unknown activation code".to_string()))
    }

    /// The profile (index) and key (index, `None` for its standing code) a suspected clone of a
    /// workload paired from profile `id` re-pairs with (issue 16): the profile must be enabled
    /// and have a standing code or a key still valid now (not expired, uses left; one is used).
    pub(super) fn reactivation_key(&self, id: u64, now: u64) -> Result<(usize, Option<usize>), StoreError> {
        let index = self.state.pairing_profiles.iter().position(|p| p.id == id).ok_or_else(|| {
            StoreError::Activation(format!("the pairing profile {id} it came from is gone"))
        })?;
        let profile = &self.state.pairing_profiles[index];
        if !profile.enabled {
            return Err(StoreError::Activation(format!("pairing profile {:?} is disabled", profile.name)));
        }
        if !profile.activation_code.is_empty() {
            return Ok((index, None));
        }
        let valid = |key: &PairingKey| {
            profile.key_lifespan_s.is_none_or(|lifespan| now < key.created_at.saturating_add(lifespan))
                && profile.allowed_uses_per_key.is_none_or(|allowed| key.uses < allowed)
        };
        match profile.keys.iter().position(valid) {
            Some(key) => Ok((index, Some(key))),
            None => Err(StoreError::Activation(format!(
                "pairing profile {:?} has no key with uses left: ask the administrator for a new one",
                profile.name
            ))),
        }
    }

    fn check_profile(&self, profile: &PairingProfile, except: Option<u64>) -> Result<(), StoreError> {
        if self.state.pairing_profiles.iter().any(|p| p.name == profile.name && Some(p.id) != except) {
            return Err(StoreError::Rejected(format!(
                "name: a pairing profile named {:?} exists",
                profile.name
            )));
        }
        self.check_labels(&profile.labels).map_err(|e| StoreError::Rejected(format!("labels: {e}")))?;
        if profile.allowed_uses_per_key == Some(0) {
            return Err(StoreError::Rejected("allowed_uses_per_key: at least 1 (or unlimited)".to_string()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{host, populated};
    use super::*;
    use crate::fsutil::scratch_dir;
    use ven_proto::PolicyState;

    fn profile(name: &str, labels: Vec<u64>, uses: Option<u32>, lifespan: Option<u64>) -> PairingProfile {
        PairingProfile {
            id: 0,
            name: name.to_string(),
            policy_state: PolicyState::Enforced,
            activation_code: String::new(),
            description: String::new(),
            enabled: true,
            labels,
            allowed_uses_per_key: uses,
            key_lifespan_s: lifespan,
            keys: Vec::new(),
        }
    }

    #[test]
    fn keys_carry_the_profiles_labels_and_state_until_used_up_or_expired() {
        let dir = scratch_dir("pairing-keys");
        let (mut store, _, _) = populated(&dir);
        let db_label = store.state().labels[1].id;
        let created =
            store.create_pairing_profile(profile("dbs", vec![db_label], Some(1), Some(600))).unwrap();
        let code = store.generate_pairing_key(created.id, 1000).unwrap();

        let paired = store.activate(&code, host("db2", "198.18.0.4/24"), 1001).unwrap();
        let workload = &store.state().workloads[&paired.agent_id];
        assert_eq!((workload.labels.clone(), workload.policy_state), (vec![db_label], PolicyState::Enforced));

        let used = store.activate(&code, host("db3", "198.18.0.5/24"), 1002);
        assert!(matches!(used, Err(StoreError::Activation(m)) if m.contains("used 1 time")));
        let fresh = store.generate_pairing_key(created.id, 1000).unwrap();
        let expired = store.activate(&fresh, host("db3", "198.18.0.5/24"), 1600);
        assert!(matches!(expired, Err(StoreError::Activation(m)) if m.contains("expired")));
        let workloads = store.state().workloads.len();

        let mut disabled = store.pairing_profile(created.id).unwrap().clone();
        disabled.enabled = false;
        store.update_pairing_profile(disabled).unwrap();
        let third = store.generate_pairing_key(created.id, 1000);
        assert!(matches!(third, Err(StoreError::Rejected(_))), "a disabled profile makes no keys");
        assert_eq!(store.state().workloads.len(), workloads, "refused activations pair nothing");
        // Only digests are stored.
        let state = serde_json::to_string(store.state()).unwrap();
        assert!(!state.contains(&code) && !state.contains(&fresh));
    }

    #[test]
    fn profiles_are_checked() {
        let dir = scratch_dir("pairing-checks");
        let (mut store, _, _) = populated(&dir);
        assert!(matches!(
            store.create_pairing_profile(profile("default", vec![], None, None)),
            Err(StoreError::Rejected(_))
        ));
        assert!(matches!(
            store.create_pairing_profile(profile("x", vec![99], None, None)),
            Err(StoreError::Rejected(_))
        ));
        assert!(matches!(
            store.create_pairing_profile(profile("x", vec![], Some(0), None)),
            Err(StoreError::Rejected(_))
        ));
        assert!(matches!(store.generate_pairing_key(42, 1), Err(StoreError::NoProfile(42))));
        assert!(matches!(store.delete_pairing_profile(42), Err(StoreError::NoProfile(42))));
    }
}
