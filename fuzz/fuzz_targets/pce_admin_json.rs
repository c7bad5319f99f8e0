//! The admin API's inputs after the credentials: the first line as an href (every object kind),
//! an id, a query string (`max_results`, `name`) and an `Authorization` value; the rest as a JSON
//! request body, generic and as a label. What is accepted must be canonical (`+1`, `01` never
//! are) and free of control and bidi characters. Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pce::fuzzing::admin_input(data);
});
