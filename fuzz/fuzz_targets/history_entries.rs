//! History files read back after a crash, a torn write or tampering: corrupt input is reported,
//! never misread or panicked on, and what decodes renders without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(entry) = ven::history::decode_entry(data) {
        let _ = ven::history::render_entry(&entry);
    }
});
