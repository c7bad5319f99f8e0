//! What an unauthenticated client controls first on the PCE's API port: the bytes of one
//! connection through the request head parser (httparse, header limits), the body framing
//! (Content-Length rules, chunked and other codings refused) and the serve loop with its
//! admission step (credentials checked on the head, a refusal answered before any body byte is
//! read, nothing after it). Never a panic, never an answer without a status line.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pce::fuzzing::http_connection(data);
});
