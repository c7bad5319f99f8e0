//! Frames of the event service (TLS, default port 8444).
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of postcard. The session:
//! the VEN sends [`VenFrame::Hello`]; the PCE answers [`PceFrame::Ack`] (or [`PceFrame::Nack`] and
//! closes); then the PCE sends [`PceFrame::Event`]s and a [`PceFrame::Ping`] every
//! `ping_interval_s`, which the VEN answers with [`VenFrame::Pong`]. A VEN that hears nothing for
//! three ping intervals treats the connection as dead and reconnects. Events are hints only: the
//! heartbeat answer always carries the current policy version too, so a lost event costs at most
//! one heartbeat interval.

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

/// Largest frame either side accepts; anything larger is a protocol error.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VenFrame {
    Hello {
        protocol_version: u16,
        agent_id: u64,
        agent_token: String,
    },
    Pong {
        nonce: u64,
    },
    /// A Hello with the clone token and instance id (issue 16), sent once the VEN holds a clone
    /// token (only a PCE that knows this frame hands those out). Appended: older frames keep
    /// their encoding.
    CloneHello {
        protocol_version: u16,
        agent_id: u64,
        agent_token: String,
        clone_token: String,
        instance: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PceFrame {
    Ack {
        ping_interval_s: u32,
    },
    /// The PCE refused the session (bad credentials or protocol version) and closes it.
    Nack {
        reason: String,
    },
    Event(Event),
    Ping {
        nonce: u64,
    },
}

/// Asynchronous notifications ("lightning bolts").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A new policy version exists for this VEN; fetch it over the VEN API.
    PolicyChanged { version: u64 },
    /// The PCE asks for a support report (protocol 5: sent only to VENs whose Hello names 5 or
    /// more; an older VEN could not decode it). The heartbeat answer repeats the request.
    SupportReportRequested { request: u64 },
    /// The PCE wants the VEN to run release `version` (protocol 6: sent only to VENs whose Hello
    /// names 6 or more). The heartbeat answer repeats it.
    UpgradeRequested { version: String },
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("event frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    #[error("malformed event frame: {0}")]
    Malformed(postcard::Error),
    #[error("event connection: {0}")]
    Io(#[from] io::Error),
}

/// Encodes one frame: length prefix and body.
pub fn encode_frame<T: Serialize>(message: &T) -> Vec<u8> {
    let body = crate::encode(message);
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Writes one frame and flushes it.
pub fn write_frame<T: Serialize>(writer: &mut impl Write, message: &T) -> Result<(), FrameError> {
    writer.write_all(&encode_frame(message))?;
    writer.flush()?;
    Ok(())
}

/// Parses the length prefix of a frame, refusing anything over [`MAX_FRAME_BYTES`].
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes a frame body (without its prefix).
pub fn decode_frame<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    postcard::from_bytes(body).map_err(FrameError::Malformed)
}

/// Reads one whole frame from a blocking reader. `buf` is reused between calls and never grows
/// past [`MAX_FRAME_BYTES`].
pub fn read_frame<T: for<'a> Deserialize<'a>>(
    reader: &mut impl Read,
    buf: &mut Vec<u8>,
) -> Result<T, FrameError> {
    let mut prefix = [0u8; 4];
    reader.read_exact(&mut prefix)?;
    let len = frame_len(prefix)?;
    buf.clear();
    buf.resize(len, 0);
    reader.read_exact(buf)?;
    decode_frame(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &PceFrame::Event(Event::PolicyChanged { version: 9 })).unwrap();
        write_frame(&mut wire, &PceFrame::Ping { nonce: 1 }).unwrap();
        let mut reader = &wire[..];
        let mut buf = Vec::new();
        assert_eq!(
            read_frame::<PceFrame>(&mut reader, &mut buf).unwrap(),
            PceFrame::Event(Event::PolicyChanged { version: 9 })
        );
        assert_eq!(read_frame::<PceFrame>(&mut reader, &mut buf).unwrap(), PceFrame::Ping { nonce: 1 });
        assert!(matches!(read_frame::<PceFrame>(&mut reader, &mut buf), Err(FrameError::Io(_))));
    }

    #[test]
    fn oversized_and_garbage_frames_are_refused() {
        let huge = ((MAX_FRAME_BYTES + 1) as u32).to_be_bytes();
        assert!(matches!(frame_len(huge), Err(FrameError::TooLarge(_))));
        let garbage = [0u8, 0, 0, 2, 0xff, 0xff];
        assert!(matches!(
            read_frame::<PceFrame>(&mut &garbage[..], &mut Vec::new()),
            Err(FrameError::Malformed(_))
        ));
    }
}
