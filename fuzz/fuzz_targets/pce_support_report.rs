//! The PCE's support report uploads (`POST /ven/v1/support_report` bodies): the postcard decoder
//! and the whole-archive check, never a panic; what passes is within the size cap.
//! The body is `pce::fuzzing::support_report_upload`, replayed by crates/pce/tests/fuzz_corpus.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pce::fuzzing::support_report_upload(data));
