//! Clone detection (issue 16): which copy of a workload's agent is the original.
//!
//! A data directory copied to another host (a golden image, a copied appliance) carries the
//! agent's credentials, so both copies authenticate as the same workload. Two things tell them
//! apart: a clone token the PCE rotates (request header `x-ven-clone-token`, the next one in the
//! answer's `x-ven-clone-token-next`; the VEN persists it before using it) and a per-process
//! instance id (`x-ven-instance`, random at each agent start, never stored).
//!
//! The *holder* is the instance that the newest token was handed to. Its requests are the
//! original's, whatever token they carry (a request sent before a rotation may arrive after it).
//! Any other instance is a *challenger*: nothing it sends changes the workload. It becomes:
//! - the holder at once when it presents the newest token, or the previous one while the newest
//!   was never used (an answer lost on the way), and the holder said goodbye, or the holder has
//!   no event session and this instance is new (a process that dies closes its socket): a
//!   restart, also after a crash;
//! - the holder when the holder has been silent for the grace period (a few heartbeat
//!   intervals): a crashed agent restarted, or a host that restored its own backup of the data
//!   directory (its token is older, and the agent that held the newest never comes back);
//! - a suspected clone as soon as the holder presents again after the challenger appeared: both
//!   live. That is recorded once (`clone_detected`) and stays so for that instance.
//!
//! One-shot commands (`ven activate`, and suspend/unsuspend/deactivate without a running agent)
//! name themselves with [`ONE_SHOT_PREFIX`]: they hold the token for their call only, as if they
//! had said goodbye, so the agent that starts next takes over at once.
//!
//! Everything is bounded: at most [`MAX_SUSPECTS`] other instances are tracked per workload (the
//! one heard from least recently is forgotten; if it comes back it starts as a challenger again).

use crate::crypto::{self, RandomError};
use serde::{Deserialize, Serialize};

/// Other instances tracked per workload (challengers and suspected clones).
pub const MAX_SUSPECTS: usize = 16;
/// Random bytes in a clone token.
pub const CLONE_TOKEN_BYTES: usize = 16;
/// Instance ids of one-shot commands start so (the VEN's `agent::clone_token`).
pub const ONE_SHOT_PREFIX: &str = "once-";
/// The instance id the PCE assumes for an agent that sends none (a VEN one protocol version
/// behind) once the workload's tokens exist.
pub const UNNAMED_INSTANCE: &str = "-";

/// A workload's clone-token state. The tokens themselves are never stored, only their SHA-256.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CloneGuard {
    /// The newest token; `None` until the first guarded call (workloads paired before tokens).
    #[serde(default)]
    pub current_sha256: Option<String>,
    /// The token before it: still the holder's until the newest has been presented once.
    #[serde(default)]
    pub previous_sha256: Option<String>,
    /// Whether the newest token has been presented (its answer arrived).
    #[serde(default)]
    pub current_seen: bool,
    /// The instance the newest token was handed to.
    #[serde(default)]
    pub holder: Option<String>,
    /// When the holder was last heard from.
    #[serde(default)]
    pub holder_seen: u64,
    /// The holder said goodbye: the next instance with its token takes over at once.
    #[serde(default)]
    pub holder_released: bool,
    /// The holder before the last handover: its late requests are ignored, not suspected.
    #[serde(default)]
    pub retired: Option<String>,
    #[serde(default)]
    pub suspects: Vec<Suspect>,
}

/// Another instance presenting the workload's credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspect {
    pub instance: String,
    pub first_seen: u64,
    pub last_seen: u64,
    /// Seen while the holder was live: a suspected clone, for good.
    pub confirmed: bool,
}

/// What the PCE does with a call, by who made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Standing {
    /// A workload without tokens and a VEN that sends no instance id: as before clone tokens.
    Unguarded,
    /// The original. `next_token` goes back in `x-ven-clone-token-next`.
    Holder { next_token: Option<String> },
    /// Another instance whose standing is not known yet: its calls change nothing.
    Challenger,
    /// The holder before a handover (its requests after its goodbye): ignored.
    Retired,
    /// A suspected clone: refused.
    Clone,
}

impl Standing {
    /// Whether the call may change the workload.
    pub fn is_original(&self) -> bool {
        matches!(self, Standing::Unguarded | Standing::Holder { .. })
    }

    /// Why a call that is not the original's changes nothing.
    pub fn refusal(&self) -> &'static str {
        match self {
            Standing::Unguarded | Standing::Holder { .. } => "the original",
            Standing::Challenger => {
                "another copy of this agent holds the workload; this one is not accepted \
                 until that one is silent for the grace period"
            }
            Standing::Retired => "this agent process said goodbye and was replaced",
            Standing::Clone => {
                "suspected clone: another live copy of this agent (a copied data directory) holds \
                 the workload; re-pair this host (ven deactivate, then ven activate)"
            }
        }
    }
}

/// A call's [`Standing`], and the instances it revealed as clones (for `clone_detected`).
#[derive(Debug, PartialEq, Eq)]
pub struct Presented {
    pub standing: Standing,
    pub detected: Vec<Suspect>,
    /// Whether the guard changed (its record must be written).
    pub changed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenAge {
    Newest,
    /// The previous token while the newest was never presented.
    PreviousUnused,
    /// Anything older, or none.
    Superseded,
}

impl CloneGuard {
    /// Classifies one call presenting `token` from `instance` at `now` and updates the state.
    /// `rotate`: the call hands the holder a new token (heartbeats and activation do; other calls
    /// would race each other). `grace`: seconds of the holder's silence after which another
    /// instance takes over.
    pub fn present(
        &mut self,
        token: Option<&str>,
        instance: Option<&str>,
        now: u64,
        grace: u64,
        rotate: bool,
        connected: &dyn Fn(&str) -> bool,
    ) -> Result<Presented, RandomError> {
        let presented = self.classify(token, instance, now, grace, rotate, connected)?;
        let one_shot = instance.is_some_and(|i| i.starts_with(ONE_SHOT_PREFIX));
        if one_shot && matches!(presented.standing, Standing::Holder { .. }) {
            self.holder_released = true;
        }
        Ok(presented)
    }

    fn classify(
        &mut self,
        token: Option<&str>,
        instance: Option<&str>,
        now: u64,
        grace: u64,
        rotate: bool,
        connected: &dyn Fn(&str) -> bool,
    ) -> Result<Presented, RandomError> {
        let mut presented = Presented { standing: Standing::Unguarded, detected: Vec::new(), changed: false };
        let instance = match (instance, &self.current_sha256) {
            (None, None) => return Ok(presented),
            (Some(instance), _) => instance,
            (None, Some(_)) => UNNAMED_INSTANCE,
        };
        presented.changed = true;
        let presented_sha256 = token.map(|t| crypto::sha256_hex(t.as_bytes()));
        let age = self.age(presented_sha256.as_deref());
        if self.current_sha256.is_none() {
            // The first guarded call: whoever makes it holds the first token.
            return self
                .hand_over(instance, presented_sha256, now)
                .map(|standing| Presented { standing, ..presented });
        }
        if self.holder.as_deref() == Some(instance) {
            self.holder_seen = now;
            self.holder_released = false;
            if age == TokenAge::Newest {
                self.current_seen = true;
            }
            // Every other instance still around is a second live copy.
            for suspect in self.suspects.iter_mut().filter(|s| !s.confirmed) {
                if suspect.last_seen.saturating_add(grace) >= now {
                    suspect.confirmed = true;
                    presented.detected.push(suspect.clone());
                }
            }
            self.suspects.retain(|s| s.confirmed || s.last_seen.saturating_add(grace) >= now);
            let next_token = if rotate { Some(self.rotate()?) } else { None };
            presented.standing = Standing::Holder { next_token };
            return Ok(presented);
        }
        if self.retired.as_deref() == Some(instance) {
            presented.standing = Standing::Retired;
            return Ok(presented);
        }
        if let Some(suspect) = self.suspects.iter_mut().find(|s| s.instance == instance && s.confirmed) {
            suspect.last_seen = now;
            presented.standing = Standing::Clone;
            return Ok(presented);
        }
        let fresh = !self.suspects.iter().any(|s| s.instance == instance);
        let holder_connected = self.holder.as_deref().is_some_and(connected);
        let restarted = age != TokenAge::Superseded && (self.holder_released || (fresh && !holder_connected));
        let holder_gone = now.saturating_sub(self.holder_seen) > grace;
        if restarted || holder_gone {
            self.suspects.retain(|s| s.instance != instance);
            presented.standing = self.hand_over(instance, presented_sha256, now)?;
            return Ok(presented);
        }
        match self.suspects.iter_mut().find(|s| s.instance == instance) {
            Some(suspect) => suspect.last_seen = now,
            None => {
                if self.suspects.len() >= MAX_SUSPECTS {
                    if let Some(oldest) = (0..self.suspects.len()).min_by_key(|&i| self.suspects[i].last_seen)
                    {
                        self.suspects.remove(oldest);
                    }
                }
                let suspect = Suspect {
                    instance: instance.to_string(),
                    first_seen: now,
                    last_seen: now,
                    confirmed: false,
                };
                self.suspects.push(suspect);
            }
        }
        presented.standing = Standing::Challenger;
        Ok(presented)
    }

    /// `instance` re-paired as a workload of its own: it no longer presents these credentials.
    pub fn forget(&mut self, instance: &str) {
        self.suspects.retain(|s| s.instance != instance);
    }

    /// The holder said goodbye: an instance with its token may take over at once.
    pub fn release(&mut self) {
        self.holder_released = true;
    }

    /// Instances suspected of being clones.
    #[cfg(test)]
    pub fn clones(&self) -> impl Iterator<Item = &Suspect> {
        self.suspects.iter().filter(|s| s.confirmed)
    }

    fn age(&self, presented_sha256: Option<&str>) -> TokenAge {
        let matches = |stored: &Option<String>| match (stored, presented_sha256) {
            (Some(stored), Some(presented)) => {
                crypto::constant_time_eq(stored.as_bytes(), presented.as_bytes())
            }
            _ => false,
        };
        if matches(&self.current_sha256) {
            TokenAge::Newest
        } else if !self.current_seen && matches(&self.previous_sha256) {
            TokenAge::PreviousUnused
        } else {
            TokenAge::Superseded
        }
    }

    /// Makes `instance` the holder with a new token; the token it presented stays valid until
    /// the new one is used.
    fn hand_over(
        &mut self,
        instance: &str,
        presented_sha256: Option<String>,
        now: u64,
    ) -> Result<Standing, RandomError> {
        let next_token = crypto::random_hex(CLONE_TOKEN_BYTES)?;
        if self.holder.as_deref().is_some_and(|holder| holder != instance) {
            self.retired = self.holder.take();
        }
        self.holder = Some(instance.to_string());
        self.holder_seen = now;
        self.holder_released = false;
        self.previous_sha256 = presented_sha256;
        self.current_sha256 = Some(crypto::sha256_hex(next_token.as_bytes()));
        self.current_seen = false;
        Ok(Standing::Holder { next_token: Some(next_token) })
    }

    /// A new newest token. The previous one stays the one the holder was last known to hold.
    fn rotate(&mut self) -> Result<String, RandomError> {
        let next_token = crypto::random_hex(CLONE_TOKEN_BYTES)?;
        if self.current_seen {
            self.previous_sha256 = self.current_sha256.take();
        }
        self.current_sha256 = Some(crypto::sha256_hex(next_token.as_bytes()));
        self.current_seen = false;
        Ok(next_token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: u64 = 600;

    std::thread_local! {
        /// The instances with an event session now (every test's agents start connected).
        static CONNECTED: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    fn connect(instance: &str, up: bool) {
        CONNECTED.with(|c| {
            let mut c = c.borrow_mut();
            c.retain(|i| i != instance);
            if up {
                c.push(instance.to_string());
            }
        });
    }

    /// One agent process: its instance id and the token it holds.
    struct Agent {
        instance: &'static str,
        token: Option<String>,
    }

    impl Agent {
        fn new(instance: &'static str) -> Self {
            connect(instance, true);
            Agent { instance, token: None }
        }

        /// A heartbeat; the answer's token is kept unless `lose_answer`.
        fn heartbeat(&mut self, guard: &mut CloneGuard, now: u64, lose_answer: bool) -> Presented {
            let connected = |holder: &str| CONNECTED.with(|c| c.borrow().iter().any(|i| i == holder));
            let presented = guard
                .present(self.token.as_deref(), Some(self.instance), now, GRACE, true, &connected)
                .unwrap();
            if let Standing::Holder { next_token: Some(next) } = &presented.standing {
                if !lose_answer {
                    self.token = Some(next.clone());
                }
            }
            presented
        }

        /// The same data directory started again, or copied: a new process.
        fn copy(&self, instance: &'static str) -> Self {
            connect(instance, true);
            Agent { instance, token: self.token.clone() }
        }
    }

    fn standing(presented: &Presented) -> &'static str {
        match presented.standing {
            Standing::Unguarded => "unguarded",
            Standing::Holder { .. } => "holder",
            Standing::Challenger => "challenger",
            Standing::Retired => "retired",
            Standing::Clone => "clone",
        }
    }

    fn paired() -> (CloneGuard, Agent) {
        let mut guard = CloneGuard::default();
        let mut original = Agent::new("original");
        assert_eq!(standing(&original.heartbeat(&mut guard, 0, false)), "holder");
        assert!(original.token.is_some(), "the first guarded call hands out the first token");
        (guard, original)
    }

    #[test]
    fn an_agent_without_instance_ids_is_unguarded_until_tokens_exist() {
        let mut guard = CloneGuard::default();
        let presented = guard.present(None, None, 0, GRACE, true, &|_| true).unwrap();
        assert_eq!((presented.standing, presented.changed), (Standing::Unguarded, false));
        let (mut guard, _) = paired();
        let presented = guard.present(None, None, 10, GRACE, true, &|_| true).unwrap();
        assert_eq!(presented.standing, Standing::Challenger, "an unnamed agent is not the holder");
    }

    #[test]
    fn a_live_copy_is_a_clone_and_never_the_original() {
        let (mut guard, mut original) = paired();
        for now in 1..4 {
            assert_eq!(standing(&original.heartbeat(&mut guard, now * 30, false)), "holder");
        }
        // Copied with the newest token, started while the original runs.
        let mut copy = original.copy("copy");
        assert_eq!(standing(&copy.heartbeat(&mut guard, 100, false)), "challenger");
        assert_eq!(standing(&copy.heartbeat(&mut guard, 110, false)), "challenger");
        let presented = original.heartbeat(&mut guard, 120, false);
        assert_eq!(standing(&presented), "holder");
        assert_eq!(presented.detected.len(), 1, "the original's next call reveals the copy");
        assert_eq!(presented.detected[0].instance, "copy");
        // For good: even after the original's grace runs out, and with its goodbye.
        assert_eq!(standing(&copy.heartbeat(&mut guard, 130, false)), "clone");
        guard.release();
        assert_eq!(standing(&copy.heartbeat(&mut guard, 130 + 2 * GRACE, false)), "clone");
        assert_eq!(original.heartbeat(&mut guard, 131 + 2 * GRACE, false).detected, Vec::new(), "once");
        assert_eq!(guard.clones().count(), 1);
    }

    #[test]
    fn a_copy_seen_before_the_holder_lost_its_session_does_not_take_over() {
        let (mut guard, mut original) = paired();
        let mut copy = original.copy("copy");
        assert_eq!(standing(&copy.heartbeat(&mut guard, 10, false)), "challenger");
        // The original's event session drops for a moment (a network blip).
        connect("original", false);
        assert_eq!(standing(&copy.heartbeat(&mut guard, 12, false)), "challenger");
        connect("original", true);
        assert_eq!(original.heartbeat(&mut guard, 14, false).detected.len(), 1);
    }

    #[test]
    fn an_older_copy_is_a_clone_too() {
        let (mut guard, mut original) = paired();
        let mut copy = original.copy("copy");
        original.heartbeat(&mut guard, 30, false);
        original.heartbeat(&mut guard, 60, false);
        assert_eq!(standing(&copy.heartbeat(&mut guard, 70, false)), "challenger");
        assert_eq!(original.heartbeat(&mut guard, 90, false).detected.len(), 1);
        assert_eq!(standing(&copy.heartbeat(&mut guard, 95, false)), "clone");
    }

    #[test]
    fn a_lost_answer_is_no_clone() {
        let (mut guard, mut original) = paired();
        // The answer carrying the next token is lost, twice; the agent then restarts with the
        // token it has, after its goodbye.
        assert_eq!(standing(&original.heartbeat(&mut guard, 30, true)), "holder");
        assert_eq!(standing(&original.heartbeat(&mut guard, 60, true)), "holder");
        guard.present(original.token.as_deref(), Some("original"), 61, GRACE, false, &|_| true).unwrap();
        guard.release();
        let mut restarted = original.copy("restarted");
        let presented = restarted.heartbeat(&mut guard, 65, false);
        assert_eq!(standing(&presented), "holder", "the previous token, its successor never used");
        assert!(presented.detected.is_empty());
        // The stopped process's last request (its uploader) is no clone either.
        let late =
            guard.present(original.token.as_deref(), Some("original"), 66, GRACE, false, &|_| true).unwrap();
        assert_eq!(late.standing, Standing::Retired);
        assert_eq!(guard.clones().count(), 0);
    }

    #[test]
    fn a_restart_and_a_crash_hand_over_at_once_a_power_loss_after_the_grace() {
        let (mut guard, mut original) = paired();
        original.heartbeat(&mut guard, 30, false);
        guard.release();
        let mut restarted = original.copy("restarted");
        assert_eq!(standing(&restarted.heartbeat(&mut guard, 31, false)), "holder");
        // Killed (no goodbye): its event session closed with it, so the next process with the
        // newest token takes over at once.
        connect("restarted", false);
        let mut after_crash = restarted.copy("after-crash");
        assert_eq!(standing(&after_crash.heartbeat(&mut guard, 40, false)), "holder");
        // Killed on a host whose event session stays up for a while (power loss: the PCE finds
        // the dead peer only after three pings): after the grace.
        let mut after_power_loss = after_crash.copy("after-power-loss");
        assert_eq!(standing(&after_power_loss.heartbeat(&mut guard, 50, false)), "challenger");
        assert_eq!(standing(&after_power_loss.heartbeat(&mut guard, 40 + GRACE + 1, false)), "holder");
        assert_eq!(guard.clones().count(), 0);
    }

    #[test]
    fn a_restored_backup_is_accepted_after_the_grace() {
        let (mut guard, mut original) = paired();
        let backup = original.copy("unused");
        for now in 1..10 {
            original.heartbeat(&mut guard, now * 30, false);
        }
        // The host is restored from its backup (an old token) and its agent starts: the agent
        // that held the newest token is gone for good.
        let mut restored = backup.copy("restored");
        assert_eq!(standing(&restored.heartbeat(&mut guard, 300, false)), "challenger");
        assert_eq!(standing(&restored.heartbeat(&mut guard, 270 + GRACE + 1, false)), "holder");
        assert_eq!(standing(&restored.heartbeat(&mut guard, 270 + GRACE + 30, false)), "holder");
        assert_eq!(guard.clones().count(), 0, "no false positive");
    }

    #[test]
    fn the_agent_after_a_one_shot_command_takes_over_at_once() {
        let mut guard = CloneGuard::default();
        let mut activation = Agent::new("once-activate");
        assert_eq!(standing(&activation.heartbeat(&mut guard, 0, false)), "holder");
        let mut agent = activation.copy("agent");
        assert_eq!(standing(&agent.heartbeat(&mut guard, 5, false)), "holder");
        // A one-shot command of a copy, while the agent runs, is not let in.
        let presented =
            guard.present(agent.token.as_deref(), Some("once-copy"), 6, GRACE, false, &|_| true).unwrap();
        assert_eq!(presented.standing, Standing::Challenger);
    }

    #[test]
    fn other_instances_are_bounded() {
        let (mut guard, mut original) = paired();
        let names: Vec<&'static str> =
            (0..MAX_SUSPECTS + 4).map(|i| &*Box::leak(format!("copy{i}").into_boxed_str())).collect();
        for (i, name) in names.iter().enumerate() {
            original.copy(name).heartbeat(&mut guard, 10 + i as u64, false);
        }
        assert_eq!(guard.suspects.len(), MAX_SUSPECTS);
        assert_eq!(original.heartbeat(&mut guard, 40, false).detected.len(), MAX_SUSPECTS);
    }
}
