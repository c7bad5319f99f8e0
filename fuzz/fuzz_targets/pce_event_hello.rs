//! What an unauthenticated client controls first on the PCE's event port: the session's first
//! frame, which must be a Hello and must come alone (trailing bytes refuse the session), cut from
//! input that arrives in two reads (the first byte says where the split is). Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pce::fuzzing::event_hello(data);
});
