//! The agent's side of clone detection (issue 16; the PCE's is `store::clone_guard` in the pce
//! crate).
//!
//! Every VEN API call carries the clone token the PCE handed out last (`state/clone-token`) and
//! the process's instance id: random at each start and never stored, so a copied data directory
//! started elsewhere is another instance. A new token from an answer is written to the data
//! directory (atomically, fsynced) before any call presents it: a crash in between leaves the
//! previous token, which the PCE accepts until the new one has been used.
//!
//! One-shot commands (`ven activate`, and suspend/unsuspend/deactivate run without an agent) name
//! themselves with [`ONE_SHOT_PREFIX`]: the PCE lets the agent that starts next take over at once.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock, PoisonError};

use crate::state::{self, DataDir, RecordKind, StateError};

/// Random bytes of an instance id (hex on the wire).
const INSTANCE_BYTES: usize = 16;
/// Instance ids of one-shot commands start so (the PCE's `store::clone_guard` knows it).
pub const ONE_SHOT_PREFIX: &str = "once-";

/// Serialises the token's read-modify-write between the agent's threads (manager, uploader).
static TOKEN_LOCK: Mutex<()> = Mutex::new(());

/// The running agent's instance id.
pub fn agent_instance() -> &'static str {
    static INSTANCE: OnceLock<String> = OnceLock::new();
    INSTANCE.get_or_init(|| random_hex(INSTANCE_BYTES))
}

/// The instance id of a one-shot command.
pub fn one_shot_instance() -> &'static str {
    static INSTANCE: OnceLock<String> = OnceLock::new();
    INSTANCE.get_or_init(|| format!("{ONE_SHOT_PREFIX}{}", random_hex(INSTANCE_BYTES)))
}

fn random_hex(len: usize) -> String {
    let mut bytes = vec![0u8; len];
    // Without randomness the id is still unique enough for its purpose: the process and time.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        let fallback = format!("{}-{}", std::process::id(), crate::clock::now());
        return fallback.chars().take(len * 2).collect();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The clone token of one data directory, and the instance id that presents it.
#[derive(Clone, Debug)]
pub struct CloneToken {
    path: PathBuf,
    instance: &'static str,
}

impl CloneToken {
    pub fn new(data: &DataDir, instance: &'static str) -> Self {
        CloneToken { path: data.clone_token_path(), instance }
    }

    pub fn instance(&self) -> &'static str {
        self.instance
    }

    /// The token to present; `None` before the PCE handed one out (or when the record is
    /// damaged: the PCE then treats this copy as one with an old token).
    pub fn current(&self) -> Option<String> {
        let _guard = TOKEN_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        match state::read_record::<String>(&self.path, RecordKind::CloneToken) {
            Ok(token) => token,
            Err(e) => {
                log::error!("{e}");
                None
            }
        }
    }

    /// Keeps the PCE's next token. A token that is not 1 to 64 hex digits is refused.
    pub fn store(&self, token: &str) -> Result<(), CloneTokenError> {
        let valid = !token.is_empty()
            && token.len() <= ven_proto::MAX_CLONE_FIELD_BYTES
            && token.bytes().all(|b| b.is_ascii_hexdigit());
        if !valid {
            return Err(CloneTokenError::Malformed);
        }
        let _guard = TOKEN_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        state::write_record(&self.path, RecordKind::CloneToken, &token.to_string(), 0o600)?;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CloneTokenError {
    #[error("the PCE sent a clone token that is not 1 to 64 hex digits")]
    Malformed,
    #[error("keeping the clone token: {0}")]
    State(#[from] StateError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_kept_and_checked() {
        let dir = std::env::temp_dir().join(format!("ven-clone-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let data = DataDir::new(&dir);
        data.ensure().unwrap();
        let token = CloneToken::new(&data, agent_instance());
        assert_eq!(token.current(), None);
        token.store("00ff").unwrap();
        assert_eq!(token.current().as_deref(), Some("00ff"));
        assert!(matches!(token.store("x\r\nset-cookie: 1"), Err(CloneTokenError::Malformed)));
        assert!(matches!(token.store(&"a".repeat(65)), Err(CloneTokenError::Malformed)));
        assert_eq!(token.current().as_deref(), Some("00ff"));
        assert_ne!(agent_instance(), one_shot_instance());
        assert!(one_shot_instance().starts_with(ONE_SHOT_PREFIX));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
