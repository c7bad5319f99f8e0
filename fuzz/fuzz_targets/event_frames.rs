//! The event service's framing, from both ends: a stream of hostile bytes ends in frames or an
//! error, never a panic or a buffer past MAX_FRAME_BYTES.
//! The body is `ven::fuzzing::event_frames`, which tests/fuzz_corpus.rs replays on the corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ven::fuzzing::event_frames(data));
