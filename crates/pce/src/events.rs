//! The event service (TLS, default port 8444): one long-lived session per VEN that carries
//! "lightning bolts" (policy changed) and application-level pings.
//!
//! A session starts with the VEN's `Hello`, answered with `Ack` (then at once an event naming the
//! current policy version) or `Nack` and close. The PCE pings every [`PING_INTERVAL`] and drops a
//! session that answered none of the last [`MISSED_PINGS`]. At most [`crate::sessions::MAX_EVENT_SESSIONS`] agents
//! are registered ([`crate::sessions`]); a new session of an agent replaces its old one. Events are
//! hints: when a session's queue is full the event is dropped (and counted), the heartbeat repeats
//! the version.

use crate::app::App;
use crate::sessions::Sessions;
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
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
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
    #[error("the VEN sent a second Hello")]
    UnexpectedHello,
    #[error("the VEN was too slow")]
    Timeout,
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

    pub async fn next<T: DeserializeOwned, S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
    ) -> Result<T, EventError> {
        loop {
            if let Some(frame) = self.take()? {
                return Ok(frame);
            }
            let mut chunk = [0u8; READ_CHUNK];
            let n = stream.read(&mut chunk).await.map_err(FrameError::Io)?;
            if n == 0 {
                return Err(EventError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

enum Wake {
    Event(Option<u64>),
    Frame(Result<VenFrame, EventError>),
    Ping,
}

/// The agent's current policy version if `agent_token` is its token, else `Err(())`. Runs on
/// the blocking pool: the store's lock may be held for a while (a provision recomputes every
/// policy), and an executor thread waiting for it would stall every connection it serves.
async fn authenticate(app: &Arc<App>, agent_id: u64, agent_token: String) -> Result<Option<u64>, ()> {
    let app = app.clone();
    crate::http::blocking(move || {
        let store = app.store();
        if store.authenticate(agent_id, &agent_token) {
            Ok(store.policy(agent_id).map(|policy| policy.version))
        } else {
            Err(())
        }
    })
    .await
}

/// Runs one event session until either side ends it.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    app: &Arc<App>,
) -> Result<(), EventError> {
    let mut reader = FrameReader::default();
    let hello = timed(Instant::now() + HELLO_TIMEOUT, reader.next::<VenFrame, _>(&mut stream)).await?;
    let (agent_id, current, refusal) = match hello {
        VenFrame::Hello { protocol_version, .. } if protocol_version != PROTOCOL_VERSION => (
            0,
            None,
            Some(format!(
                "protocol version {protocol_version} is not supported (this PCE speaks {PROTOCOL_VERSION})"
            )),
        ),
        VenFrame::Hello { agent_id, agent_token, .. } => match authenticate(app, agent_id, agent_token).await
        {
            Ok(current) => (agent_id, current, None),
            Err(()) => (agent_id, None, Some("unknown agent or wrong token".to_string())),
        },
        VenFrame::Pong { .. } => (0, None, Some("expected Hello".to_string())),
    };
    let registered = match refusal {
        Some(reason) => Err(reason),
        None => app.sessions.register(agent_id).ok_or_else(|| "the event service is full".to_string()),
    };
    let (serial, events) = match registered {
        Ok(registered) => registered,
        Err(reason) => {
            send(&mut stream, &PceFrame::Nack { reason: reason.clone() }).await?;
            return Err(EventError::Refused(reason));
        }
    };
    let _registration = Registration { sessions: &app.sessions, agent_id, serial };
    log::debug!("agent {agent_id} connected to the event service ({} sessions)", app.sessions.len());
    send(&mut stream, &PceFrame::Ack { ping_interval_s: PING_INTERVAL.as_secs() as u32 }).await?;
    if let Some(version) = current {
        send(&mut stream, &PceFrame::Event(Event::PolicyChanged { version })).await?;
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
            Wake::Event(Some(version)) => {
                send(&mut stream, &PceFrame::Event(Event::PolicyChanged { version })).await?
            }
            // Replaced by a newer session, or the agent was deactivated.
            Wake::Event(None) => return Ok(()),
            Wake::Frame(Ok(VenFrame::Pong { .. })) => last_pong = Instant::now(),
            Wake::Frame(Ok(VenFrame::Hello { .. })) => return Err(EventError::UnexpectedHello),
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
