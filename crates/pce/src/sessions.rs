//! The registry of agents connected to the event service: who is connected, and a short queue of
//! policy versions to tell each (see `events` for the sessions themselves).

use smol::channel::{Receiver, Sender};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// Most agents registered at once.
pub const MAX_EVENT_SESSIONS: usize = 16_384;
/// Pending events per session; versions only grow, so a short queue loses nothing that matters.
pub const SESSION_QUEUE: usize = 4;

/// The registry of connected agents.
pub struct Sessions {
    by_agent: Mutex<HashMap<u64, Entry>>,
    next_serial: AtomicU64,
    dropped_events: AtomicU64,
}

struct Entry {
    serial: u64,
    events: Sender<u64>,
    /// The agent process's instance id, from a `CloneHello` (see `store::clone_guard`).
    instance: Option<String>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            by_agent: Mutex::new(HashMap::new()),
            next_serial: AtomicU64::new(1),
            dropped_events: AtomicU64::new(0),
        }
    }
}

impl Sessions {
    /// Queues a `PolicyChanged` for every connected agent among `changes` (agent id, version).
    pub fn notify(&self, changes: &[(u64, u64)]) {
        let sessions = self.lock();
        for (agent_id, version) in changes {
            if let Some(entry) = sessions.get(agent_id) {
                if entry.events.try_send(*version).is_err() {
                    let dropped = self.dropped_events.fetch_add(1, Ordering::Relaxed) + 1;
                    if dropped.is_power_of_two() {
                        log::warn!("event queue of agent {agent_id} full: {dropped} events dropped so far");
                    }
                }
            }
        }
    }

    /// Ends the agent's session, if any (its queue closes).
    pub fn disconnect(&self, agent_id: u64) {
        self.lock().remove(&agent_id);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether instance `instance` of agent `agent_id` has a session now: the clone guard's sign
    /// that the holder of its newest token is alive (a process that dies closes its socket).
    pub fn has_session(&self, agent_id: u64, instance: &str) -> bool {
        self.lock().get(&agent_id).is_some_and(|entry| entry.instance.as_deref() == Some(instance))
    }

    /// Registers a session for `agent_id` (of `instance`, when the Hello named one), replacing an
    /// older one. `None` when the registry is full.
    pub fn register(&self, agent_id: u64, instance: Option<String>) -> Option<(u64, Receiver<u64>)> {
        let mut sessions = self.lock();
        if sessions.len() >= MAX_EVENT_SESSIONS && !sessions.contains_key(&agent_id) {
            return None;
        }
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let (events, receiver) = smol::channel::bounded(SESSION_QUEUE);
        sessions.insert(agent_id, Entry { serial, events, instance });
        Some((serial, receiver))
    }

    /// Removes the session `serial` of `agent_id`, unless a newer one replaced it.
    pub fn unregister(&self, agent_id: u64, serial: u64) {
        let mut sessions = self.lock();
        if sessions.get(&agent_id).is_some_and(|entry| entry.serial == serial) {
            sessions.remove(&agent_id);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.by_agent.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_replace_notify_and_unregister() {
        let sessions = Sessions::default();
        let (old_serial, old) = sessions.register(1, Some("a".into())).unwrap();
        assert!(sessions.has_session(1, "a"));
        let (new_serial, new) = sessions.register(1, Some("b".into())).unwrap();
        assert!(!sessions.has_session(1, "a") && sessions.has_session(1, "b"));
        assert!(old.is_closed(), "the replaced session's queue closes");
        sessions.unregister(1, old_serial);
        assert_eq!(sessions.len(), 1, "a stale unregister leaves the newer session");
        sessions.notify(&[(1, 5), (2, 6)]);
        assert_eq!(new.try_recv(), Ok(5));
        for version in 0..(SESSION_QUEUE as u64 + 2) {
            sessions.notify(&[(1, version)]);
        }
        assert_eq!(sessions.dropped_events.load(Ordering::Relaxed), 2);
        sessions.unregister(1, new_serial);
        assert_eq!(sessions.len(), 0);
    }
}
