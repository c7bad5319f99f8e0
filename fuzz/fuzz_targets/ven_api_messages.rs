//! Every VEN API body either side decodes: bytes from the network must give a value or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ven_proto::*;

fuzz_target!(|data: &[u8]| {
    if let Ok(policy) = decode::<Policy>(data) {
        // What decodes must encode back to something that decodes to the same value.
        assert_eq!(decode::<Policy>(&encode(&policy)).ok(), Some(policy));
    }
    let _ = decode::<ActivateRequest>(data);
    let _ = decode::<ActivateResponse>(data);
    let _ = decode::<HeartbeatRequest>(data);
    let _ = decode::<HeartbeatResponse>(data);
    let _ = decode::<ErrorBody>(data);
    let _ = decode::<Goodbye>(data);
});
