//! The event service's framing, from both ends: a stream of hostile bytes ends in frames or an
//! error, never a panic or a buffer past MAX_FRAME_BYTES.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ven_proto::frame::{MAX_FRAME_BYTES, PceFrame, VenFrame, read_frame};

fuzz_target!(|data: &[u8]| {
    let mut buf = Vec::new();
    let mut reader = data;
    while read_frame::<PceFrame>(&mut reader, &mut buf).is_ok() {
        assert!(buf.len() <= MAX_FRAME_BYTES);
    }
    let mut reader = data;
    while read_frame::<VenFrame>(&mut reader, &mut buf).is_ok() {
        assert!(buf.len() <= MAX_FRAME_BYTES);
    }
});
