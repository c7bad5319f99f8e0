//! A policy from the PCE is untrusted: whatever decodes must either be refused by validation or
//! render into text that keeps every rule on its own line (no operator text can add a command).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(policy) = ven_proto::decode::<ven_proto::Policy>(data) else { return };
    let _ = ven::firewall::render_check(&policy);
});
