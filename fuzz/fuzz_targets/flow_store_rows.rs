//! Rows read back from the flow stores (flow.db's chunks of raw rows, flowsum.db's aggregates)
//! after a torn write, a damaged flash page or tampering: what does not decode is skipped and
//! counted, never misread as another sequence number or panicked on, and an upload batch built
//! from such chunks keeps its promises (after the cursor, consecutive, bounded). Rows of both
//! encodings (tagged, and version 3's bare postcard) are seeded in fuzz/seeds/flow_store_rows:
//! `cargo fuzz run flow_store_rows fuzz/seeds/flow_store_rows`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ven::flows::store::{batch_from_chunks, decode_stored_chunk, decode_stored_summary};

fuzz_target!(|data: &[u8]| {
    // One chunk, as stored: rows numbered from its key, in order, at most one undecodable.
    let first = 1_000;
    let (rows, undecodable) = decode_stored_chunk(first, data);
    assert!(undecodable <= 1);
    for (index, (seq, record)) in rows.iter().enumerate() {
        assert_eq!(*seq, first + index as u64);
        // Rows of either encoding (tagged, or version 3's bare postcard) read back in this
        // version's: written again they are tagged and read the same.
        let mut row = Vec::new();
        ven_proto::flow_row::encode_into(record, &mut row);
        assert_eq!(decode_stored_summary(&row), Some(*record));
    }
    let _ = decode_stored_summary(data);

    // Several chunks: [cursor: 1 byte][max: 1 byte] then [first-seq step: 1][length: 1][bytes].
    let &[cursor, max, ref chunked @ ..] = data else { return };
    let mut rest: &[u8] = chunked;
    let mut chunks = Vec::new();
    let mut key = 1u64;
    while let &[step, len, ref tail @ ..] = rest {
        let len = usize::from(len).min(tail.len());
        key += u64::from(step);
        chunks.push((key, &tail[..len]));
        rest = &tail[len..];
    }
    let acknowledged = u64::from(cursor);
    let (batch, undecodable) = batch_from_chunks(acknowledged, usize::from(max), chunks.iter().copied());
    assert!(undecodable <= chunks.len() as u64);
    if let Some(batch) = batch {
        assert!(batch.first > acknowledged);
        assert!(!batch.records.is_empty());
        assert!(batch.records.len() <= usize::from(max).min(ven_proto::MAX_FLOWS_PER_BATCH));
    }
});
