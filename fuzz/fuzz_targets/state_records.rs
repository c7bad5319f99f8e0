//! State files read back after a crash, a torn write or tampering: corrupt input is reported,
//! never misread or panicked on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ven::state::{Identity, RecordKind, SavedStatus, Suspension, decode_record};

fuzz_target!(|data: &[u8]| {
    let _ = decode_record::<Identity>(data, RecordKind::Identity);
    let _ = decode_record::<ven_proto::Policy>(data, RecordKind::Policy);
    let _ = decode_record::<SavedStatus>(data, RecordKind::Status);
    let _ = decode_record::<ven::firewall::Snapshot>(data, RecordKind::SavedFirewall);
    let _ = decode_record::<Suspension>(data, RecordKind::Suspended);
});
