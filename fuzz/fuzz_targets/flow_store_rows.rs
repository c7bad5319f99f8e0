//! Rows read back from the flow stores (flow.db's chunks of raw rows, flowsum.db's aggregates)
//! after a torn write, a damaged flash page or tampering: what does not decode is skipped and
//! counted, never misread as another sequence number or panicked on, and an upload batch built
//! from such chunks keeps its promises (after the cursor, consecutive, bounded). Rows of both
//! encodings (tagged, and version 3's bare postcard) are seeded in fuzz/seeds/flow_store_rows.
//! The body is `ven::fuzzing::flow_store_rows`, which tests/fuzz_corpus.rs replays on the corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ven::fuzzing::flow_store_rows(data));
