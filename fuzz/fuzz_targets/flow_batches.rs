//! Flow batches from VENs and the PCE's flow log read back after a crash: arbitrary bytes as a
//! `FlowBatch` go through the PCE's checks and into its store (in memory; a re-send must store
//! nothing), as a flow log they replay up to the first damaged entry and survive a compaction, as
//! a traffic query string they parse or fail cleanly. Never a panic, never more than the bound.
//! The body is `pce::fuzzing::flow_batches`, replayed by crates/pce/tests/fuzz_corpus_store.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pce::fuzzing::flow_batches(data));
