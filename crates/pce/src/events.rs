//! The event service (TLS, default port 8444): one long-lived session per VEN that carries
//! "lightning bolts" (policy changed) and application-level pings.
//!
//! A session starts with the VEN's `Hello` (alone: bytes after it, before the answer, refuse the
//! session; it must come within the admission deadline of accept, `crate::admission`), answered
//! with `Ack` (then at once an event naming the
//! current policy version) or `Nack` and close. The PCE pings every [`PING_INTERVAL`] and drops a
//! session that answered none of the last [`MISSED_PINGS`]. At most [`crate::sessions::MAX_EVENT_SESSIONS`] agents
//! are registered ([`crate::sessions`]); a new session of an agent replaces its old one. Events are
//! hints: when a session's queue is full the event is dropped (and counted), the heartbeat repeats
//! the version.

use crate::admission::Ticket;
use crate::app::App;
use crate::sessions::{Bolt, Sessions};
use serde::de::DeserializeOwned;
use smol::Timer;
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ven_proto::PROTOCOL_VERSION;
use ven_proto::frame::{self, Event, FrameError, PceFrame, VenFrame};

pub const PING_INTERVAL: Duration = Duration::from_secs(30);
pub const MISSED_PINGS: u32 = 3;
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames from a VEN are a few bytes; a small chunk keeps idle sessions cheap.
const READ_CHUNK: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the VEN closed the connection")]
    Closed,
    #[error("session refused: {0}")]
    Refused(String),
    #[error("no pong for {0:?}")]
    DeadPeer(Duration),
    #[error("{0} bytes followed the Hello before it was answered")]
    TrailingBytes(usize),
    #[error("expected Hello")]
    NotHello,
    #[error("the VEN sent a second Hello")]
    UnexpectedHello,
    #[error("the VEN was too slow")]
    Timeout,
    #[error(
        "the Hello's clone token or instance id is longer than {} bytes",
        ven_proto::MAX_CLONE_FIELD_BYTES
    )]
    CloneFieldTooLong,
}

struct Registration<'a> {
    sessions: &'a Sessions,
    agent_id: u64,
    serial: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.sessions.unregister(self.agent_id, self.serial);
    }
}

/// Buffers incoming bytes and cuts them into frames. Never holds more than one maximal frame plus
/// one read chunk. [`FrameReader::next`] is cancel-safe: bytes read are kept in the buffer.
#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    /// Takes one complete frame off the buffer, if there is one.
    pub fn take<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let Some(&[a, b, c, d]) = self.buf.get(..4) else { return Ok(None) };
        let len = frame::frame_len([a, b, c, d])?;
        let Some(body) = self.buf.get(4..4 + len) else { return Ok(None) };
        let decoded = frame::decode_frame(body);
        self.buf.drain(..4 + len);
        decoded.map(Some)
    }

    /// The session's first frame, which must be a Hello and must come alone (a VEN sends nothing
    /// else before the answer). `Ok(None)` while incomplete.
    pub fn take_hello(&mut self) -> Result<Option<Hello>, EventError> {
        match self.take::<VenFrame>()? {
            None => Ok(None),
            Some(_) if !self.buf.is_empty() => Err(EventError::TrailingBytes(self.buf.len())),
            Some(VenFrame::Hello { protocol_version, agent_id, agent_token }) => {
                Ok(Some(Hello { protocol_version, agent_id, agent_token, clone: None }))
            }
            Some(VenFrame::CloneHello { protocol_version, agent_id, agent_token, clone_token, instance }) => {
                let too_long = clone_token.len().max(instance.len()) > ven_proto::MAX_CLONE_FIELD_BYTES;
                if too_long {
                    return Err(EventError::CloneFieldTooLong);
                }
                let clone = Some(CloneFields { clone_token, instance });
                Ok(Some(Hello { protocol_version, agent_id, agent_token, clone }))
            }
            Some(VenFrame::Pong { .. }) => Err(EventError::NotHello),
        }
    }

    /// Reads until the first frame is complete: see [`FrameReader::take_hello`].
    pub async fn hello<S: AsyncRead + Unpin>(&mut self, stream: &mut S) -> Result<Hello, EventError> {
        loop {
            if let Some(hello) = self.take_hello()? {
                return Ok(hello);
            }
            self.fill(stream).await?;
        }
    }

    async fn fill<S: AsyncRead + Unpin>(&mut self, stream: &mut S) -> Result<(), EventError> {
        let mut chunk = [0u8; READ_CHUNK];
        let n = stream.read(&mut chunk).await.map_err(FrameError::Io)?;
        if n == 0 {
            return Err(EventError::Closed);
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    pub async fn next<T: DeserializeOwned, S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
    ) -> Result<T, EventError> {
        loop {
            if let Some(frame) = self.take()? {
                return Ok(frame);
            }
            self.fill(stream).await?;
        }
    }
}

/// The fields of a VEN's Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u16,
    pub agent_id: u64,
    pub agent_token: String,
    /// From a `CloneHello`: which copy of the agent opens the session.
    pub clone: Option<CloneFields>,
}

/// The clone token and instance id of a `CloneHello` (see `store::clone_guard`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneFields {
    pub clone_token: String,
    pub instance: String,
}

/// Reads `data` as the start of a session, in two reads split at `split` (for the fuzz target):
/// a Hello alone, incomplete, or an error; never a panic.
pub fn fuzz_hello(data: &[u8], split: usize) -> Result<Option<Hello>, EventError> {
    let split = split.min(data.len());
    let mut reader = FrameReader { buf: data[..split].to_vec() };
    // A complete Hello with more bytes in a later read is served: those were not there yet.
    if let Some(hello) = reader.take_hello()? {
        return Ok(Some(hello));
    }
    reader.buf.extend_from_slice(&data[split..]);
    reader.take_hello()
}

enum Wake {
    Event(Option<Bolt>),
    Frame(Result<VenFrame, EventError>),
    Ping,
}

/// What a new session tells its VEN at once: the current policy version and a support report
/// waiting to be sent.
struct Current {
    policy_version: Option<u64>,
    support_report: Option<u64>,
    /// The release an order names for this workload (see `venapi::upgrade_for`).
    upgrade: Option<String>,
}

/// What the agent is to be told at once if `agent_token` is its token and the session comes from
/// the original copy of the agent (`store::clone_guard`: a copy's session must not replace the
/// original's), else why not. Runs on the blocking pool: the store's lock may be held for a while
/// (a provision recomputes every policy), and an executor thread waiting for it would stall every
/// connection it serves.
async fn authenticate(
    app: &Arc<App>,
    agent_id: u64,
    agent_token: String,
    clone: Option<CloneFields>,
) -> Result<Current, String> {
    let app = app.clone();
    crate::http::blocking(move || {
        let mut store = app.store();
        if !store.authenticate(agent_id, &agent_token) {
            store.lost_agent(agent_id, "event service", crate::clock::now());
            return Err("unknown agent or wrong token".to_string());
        }
        let (token, instance) = match &clone {
            Some(fields) => (Some(fields.clone_token.as_str()), Some(fields.instance.as_str())),
            None => (None, None),
        };
        let live = |holder: &str| app.sessions.has_session(agent_id, holder);
        let standing = store
            .present_clone_token(
                agent_id,
                token,
                instance,
                crate::clock::now(),
                app.clone_grace_s(),
                false,
                &live,
            )
            .map_err(|e| format!("the PCE could not check the session: {e}"))?;
        if !standing.is_original() {
            return Err(format!("{}: no event session for this copy of the agent", standing.refusal()));
        }
        let policy_version = store.policy(agent_id).map(|policy| policy.version);
        let target = store.agent_facts(agent_id).and_then(|facts| facts.target.clone());
        let agent_version = store.state().workloads.get(&agent_id).map(|w| w.agent_version.clone());
        drop(store);
        let upgrade = crate::venapi::upgrade_for(&app, agent_id, target.as_deref(), agent_version.as_deref());
        Ok(Current { policy_version, support_report: app.support_reports().pending(agent_id), upgrade })
    })
    .await
}

/// Runs one event session until either side ends it.
/// `ticket` is the connection's admission: the Hello must arrive by its deadline, and a good one
/// marks the connection authenticated.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    app: &Arc<App>,
    ticket: &mut Ticket,
) -> Result<(), EventError> {
    let mut reader = FrameReader::default();
    let deadline = ticket.pending_deadline().unwrap_or_else(|| Instant::now() + PING_INTERVAL);
    let hello = match timed(deadline, reader.hello(&mut stream)).await {
        Ok(hello) => Ok(hello),
        Err(e @ (EventError::TrailingBytes(_) | EventError::NotHello)) => Err(e),
        Err(other) => return Err(other),
    };
    let instance = hello.as_ref().ok().and_then(|h| h.clone.as_ref()).map(|c| c.instance.clone());
    let (agent_id, protocol_version, current, refusal) = match hello {
        Err(e) => (0, 0, None, Some(e.to_string())),
        Ok(Hello { protocol_version, .. }) if !ven_proto::protocol_supported(protocol_version) => (
            0,
            protocol_version,
            None,
            Some(format!(
                "protocol version {protocol_version} is not supported (this PCE speaks {PROTOCOL_VERSION})"
            )),
        ),
        Ok(Hello { agent_id, agent_token, protocol_version, clone }) => {
            match authenticate(app, agent_id, agent_token, clone).await {
                Ok(current) => (agent_id, protocol_version, Some(current), None),
                Err(why) => (agent_id, protocol_version, None, Some(why)),
            }
        }
    };
    let registered = match refusal {
        Some(reason) => Err(reason),
        None => app
            .sessions
            .register(agent_id, protocol_version, instance)
            .ok_or_else(|| "the event service is full".to_string()),
    };
    let (serial, events) = match registered {
        Ok(registered) => registered,
        Err(reason) => {
            send(&mut stream, &PceFrame::Nack { reason: reason.clone() }).await?;
            return Err(EventError::Refused(reason));
        }
    };
    let _registration = Registration { sessions: &app.sessions, agent_id, serial };
    ticket.authenticated();
    log::debug!("agent {agent_id} connected to the event service ({} sessions)", app.sessions.len());
    send(&mut stream, &PceFrame::Ack { ping_interval_s: PING_INTERVAL.as_secs() as u32 }).await?;
    let current = current.unwrap_or(Current { policy_version: None, support_report: None, upgrade: None });
    if let Some(version) = current.policy_version {
        send(&mut stream, &PceFrame::Event(Event::PolicyChanged { version })).await?;
    }
    // INVARIANT: a VEN is sent only bolts its protocol version decodes.
    if let Some(request) = current.support_report {
        if protocol_version >= ven_proto::SUPPORT_REPORT_PROTOCOL_VERSION {
            send(&mut stream, &PceFrame::Event(Event::SupportReportRequested { request })).await?;
        }
    }
    // An order placed while the VEN had no session reaches it now, not at its next heartbeat.
    if let Some(version) = current.upgrade {
        if protocol_version >= ven_proto::UPGRADE_PROTOCOL_VERSION {
            send(&mut stream, &PceFrame::Event(Event::UpgradeRequested { version })).await?;
        }
    }

    let (mut nonce, mut last_pong, mut next_ping) = (0u64, Instant::now(), Instant::now() + PING_INTERVAL);
    loop {
        let wake = smol::future::or(
            async { Wake::Event(events.recv().await.ok()) },
            smol::future::or(async { Wake::Frame(reader.next(&mut stream).await) }, async {
                Timer::at(next_ping).await;
                Wake::Ping
            }),
        )
        .await;
        match wake {
            Wake::Event(Some(Bolt::PolicyChanged(version))) => {
                send(&mut stream, &PceFrame::Event(Event::PolicyChanged { version })).await?
            }
            // Queued only for sessions whose version knows it (`Sessions::request_support_report`).
            Wake::Event(Some(Bolt::SupportReport(request))) => {
                send(&mut stream, &PceFrame::Event(Event::SupportReportRequested { request })).await?
            }
            // Queued only for sessions of protocol 6 or more (`Sessions::request_upgrade`).
            Wake::Event(Some(Bolt::Upgrade(version))) => {
                send(&mut stream, &PceFrame::Event(Event::UpgradeRequested { version })).await?
            }
            // Replaced by a newer session, or the agent was deactivated.
            Wake::Event(None) => return Ok(()),
            Wake::Frame(Ok(VenFrame::Pong { .. })) => last_pong = Instant::now(),
            Wake::Frame(Ok(VenFrame::Hello { .. } | VenFrame::CloneHello { .. })) => {
                return Err(EventError::UnexpectedHello);
            }
            Wake::Frame(Err(e)) => return Err(e),
            Wake::Ping => {
                let silence = last_pong.elapsed();
                if silence > PING_INTERVAL * MISSED_PINGS {
                    return Err(EventError::DeadPeer(silence));
                }
                nonce += 1;
                next_ping += PING_INTERVAL;
                send(&mut stream, &PceFrame::Ping { nonce }).await?;
            }
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, message: &PceFrame) -> Result<(), EventError> {
    let deadline = Instant::now() + WRITE_TIMEOUT;
    timed(deadline, async { stream.write_all(&frame::encode_frame(message)).await.map_err(FrameError::Io) })
        .await?;
    timed(deadline, async { stream.flush().await.map_err(FrameError::Io) }).await?;
    Ok(())
}

async fn timed<T, E: Into<EventError>>(
    deadline: Instant,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, EventError> {
    smol::future::or(async { work.await.map_err(Into::into) }, async {
        Timer::at(deadline).await;
        Err(EventError::Timeout)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_cut_from_partial_input() {
        let hello = VenFrame::Hello { protocol_version: 1, agent_id: 7, agent_token: "t".into() };
        let mut wire = frame::encode_frame(&hello);
        wire.extend(frame::encode_frame(&VenFrame::Pong { nonce: 3 }));
        let mut reader = FrameReader::default();
        for byte in &wire[..wire.len() - 1] {
            reader.buf.push(*byte);
            if let Some(frame) = reader.take::<VenFrame>().unwrap() {
                assert_eq!(frame, hello);
            }
        }
        assert!(reader.take::<VenFrame>().unwrap().is_none());
        reader.buf.push(wire[wire.len() - 1]);
        assert_eq!(reader.take::<VenFrame>().unwrap(), Some(VenFrame::Pong { nonce: 3 }));
        assert!(reader.buf.is_empty());
    }

    #[test]
    fn a_hello_must_come_alone() {
        let hello = VenFrame::Hello { protocol_version: 1, agent_id: 7, agent_token: "t".into() };
        let wire = frame::encode_frame(&hello);
        let expected = Hello { protocol_version: 1, agent_id: 7, agent_token: "t".into(), clone: None };
        for split in 0..=wire.len() {
            assert_eq!(fuzz_hello(&wire, split).unwrap(), Some(expected.clone()), "split at {split}");
        }
        assert_eq!(fuzz_hello(&wire[..wire.len() - 1], 3).unwrap(), None);
        let mut trailing = wire.clone();
        trailing.push(0);
        assert!(matches!(fuzz_hello(&trailing, trailing.len()), Err(EventError::TrailingBytes(1))));
        let mut two = wire.clone();
        two.extend(frame::encode_frame(&VenFrame::Pong { nonce: 1 }));
        assert!(matches!(fuzz_hello(&two, two.len()), Err(EventError::TrailingBytes(_))));
        let pong = frame::encode_frame(&VenFrame::Pong { nonce: 1 });
        assert!(matches!(fuzz_hello(&pong, pong.len()), Err(EventError::NotHello)));
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors() {
        let mut reader = FrameReader { buf: (frame::MAX_FRAME_BYTES as u32 + 1).to_be_bytes().to_vec() };
        assert!(matches!(reader.take::<VenFrame>(), Err(FrameError::TooLarge(_))));
        let mut reader = FrameReader { buf: vec![0, 0, 0, 2, 0xff, 0xff] };
        assert!(matches!(reader.take::<VenFrame>(), Err(FrameError::Malformed(_))));
        let mut empty: &[u8] = &[];
        let closed = smol::block_on(FrameReader::default().next::<VenFrame, _>(&mut empty));
        assert!(matches!(closed, Err(EventError::Closed)));
    }
}
