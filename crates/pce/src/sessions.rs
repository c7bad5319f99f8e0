//! The registry of agents connected to the event service: who is connected, with which protocol
//! version, and a short queue of bolts to tell each (see `events` for the sessions themselves).

use smol::channel::{Receiver, Sender};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// Most agents registered at once.
pub const MAX_EVENT_SESSIONS: usize = 16_384;
/// Pending events per session; versions only grow, so a short queue loses nothing that matters
/// (and a support-report request is repeated by every heartbeat answer until it is answered).
pub const SESSION_QUEUE: usize = 4;

/// What a session is to tell its VEN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bolt {
    PolicyChanged(u64),
    /// A support report is asked for (the request's id).
    SupportReport(u64),
    /// The operator ordered an upgrade to this release (protocol 6).
    Upgrade(String),
}

/// Whether a bolt reached a session's queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    Queued,
    /// The VEN is not connected, or its queue is full.
    NotConnected,
    /// The VEN's protocol version cannot decode this bolt; it is not sent.
    TooOld {
        protocol_version: u16,
    },
}

/// The registry of connected agents.
pub struct Sessions {
    by_agent: Mutex<HashMap<u64, Entry>>,
    next_serial: AtomicU64,
    dropped_events: AtomicU64,
}

struct Entry {
    serial: u64,
    /// What the VEN's Hello announced: bolts it could not decode are never queued.
    protocol_version: u16,
    events: Sender<Bolt>,
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
                if entry.events.try_send(Bolt::PolicyChanged(*version)).is_err() {
                    let dropped = self.dropped_events.fetch_add(1, Ordering::Relaxed) + 1;
                    if dropped.is_power_of_two() {
                        log::warn!("event queue of agent {agent_id} full: {dropped} events dropped so far");
                    }
                }
            }
        }
    }

    /// Queues a support-report bolt for `agent_id` if it is connected with a protocol version that
    /// knows it (an older VEN could not decode the frame and would drop its session).
    pub fn request_support_report(&self, agent_id: u64, request: u64) -> Delivery {
        let sessions = self.lock();
        let Some(entry) = sessions.get(&agent_id) else { return Delivery::NotConnected };
        if entry.protocol_version < ven_proto::SUPPORT_REPORT_PROTOCOL_VERSION {
            return Delivery::TooOld { protocol_version: entry.protocol_version };
        }
        match entry.events.try_send(Bolt::SupportReport(request)) {
            Ok(()) => Delivery::Queued,
            Err(_) => Delivery::NotConnected,
        }
    }

    /// Queues an upgrade bolt for `agent_id` if it is connected with a protocol version that
    /// knows it (6; an older VEN could not decode the frame and would drop its session).
    pub fn request_upgrade(&self, agent_id: u64, version: &str) -> Delivery {
        let sessions = self.lock();
        let Some(entry) = sessions.get(&agent_id) else { return Delivery::NotConnected };
        if entry.protocol_version < ven_proto::UPGRADE_PROTOCOL_VERSION {
            return Delivery::TooOld { protocol_version: entry.protocol_version };
        }
        match entry.events.try_send(Bolt::Upgrade(version.to_string())) {
            Ok(()) => Delivery::Queued,
            Err(_) => Delivery::NotConnected,
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

    /// Names the instance of an agent's session that came without one (a plain Hello from before
    /// the agent held a clone token): the original's, since a plain Hello is refused once tokens
    /// exist. Without it the holder would look disconnected until its session reconnects.
    pub fn adopt(&self, agent_id: u64, instance: &str) {
        if let Some(entry) = self.lock().get_mut(&agent_id) {
            if entry.instance.is_none() {
                entry.instance = Some(instance.to_string());
            }
        }
    }

    /// Registers a session for `agent_id` (speaking `protocol_version`; of `instance`, when the
    /// Hello named one), replacing an older one. `None` when the registry is full.
    pub fn register(
        &self,
        agent_id: u64,
        protocol_version: u16,
        instance: Option<String>,
    ) -> Option<(u64, Receiver<Bolt>)> {
        let mut sessions = self.lock();
        if sessions.len() >= MAX_EVENT_SESSIONS && !sessions.contains_key(&agent_id) {
            return None;
        }
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let (events, receiver) = smol::channel::bounded(SESSION_QUEUE);
        sessions.insert(agent_id, Entry { serial, protocol_version, events, instance });
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
        let version = ven_proto::PROTOCOL_VERSION;
        let (old_serial, old) = sessions.register(1, version, Some("a".into())).unwrap();
        assert!(sessions.has_session(1, "a"));
        let (new_serial, new) = sessions.register(1, version, Some("b".into())).unwrap();
        assert!(!sessions.has_session(1, "a") && sessions.has_session(1, "b"));
        sessions.adopt(1, "c");
        assert!(sessions.has_session(1, "b"), "a named session keeps its instance");
        let (unnamed_serial, _unnamed) = sessions.register(2, version, None).unwrap();
        sessions.adopt(2, "d");
        assert!(sessions.has_session(2, "d"));
        sessions.unregister(2, unnamed_serial);
        assert!(old.is_closed(), "the replaced session's queue closes");
        sessions.unregister(1, old_serial);
        assert_eq!(sessions.len(), 1, "a stale unregister leaves the newer session");
        sessions.notify(&[(1, 5), (2, 6)]);
        assert_eq!(new.try_recv(), Ok(Bolt::PolicyChanged(5)));
        for version in 0..(SESSION_QUEUE as u64 + 2) {
            sessions.notify(&[(1, version)]);
        }
        assert_eq!(sessions.dropped_events.load(Ordering::Relaxed), 2);
        sessions.unregister(1, new_serial);
        assert_eq!(sessions.len(), 0);
    }

    #[test]
    fn support_report_bolts_go_only_to_vens_that_know_them() {
        let sessions = Sessions::default();
        assert_eq!(sessions.request_support_report(1, 9), Delivery::NotConnected);
        let (_, old) = sessions.register(1, 4, None).unwrap();
        assert_eq!(sessions.request_support_report(1, 9), Delivery::TooOld { protocol_version: 4 });
        assert!(old.try_recv().is_err(), "nothing an old VEN cannot decode is queued");
        let (_, new) = sessions.register(1, ven_proto::SUPPORT_REPORT_PROTOCOL_VERSION, None).unwrap();
        assert_eq!(sessions.request_support_report(1, 9), Delivery::Queued);
        assert_eq!(new.try_recv(), Ok(Bolt::SupportReport(9)));
    }

    #[test]
    fn upgrade_bolts_go_only_to_vens_of_protocol_6() {
        let sessions = Sessions::default();
        assert_eq!(sessions.request_upgrade(1, "1.2.0"), Delivery::NotConnected);
        let (_, old) = sessions.register(1, 5, None).unwrap();
        assert_eq!(sessions.request_upgrade(1, "1.2.0"), Delivery::TooOld { protocol_version: 5 });
        assert!(old.try_recv().is_err(), "nothing a protocol-5 VEN cannot decode is queued");
        let (_, new) = sessions.register(1, ven_proto::UPGRADE_PROTOCOL_VERSION, None).unwrap();
        assert_eq!(sessions.request_upgrade(1, "1.2.0"), Delivery::Queued);
        assert_eq!(new.try_recv(), Ok(Bolt::Upgrade("1.2.0".into())));
    }
}
