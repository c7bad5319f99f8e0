//! One datagram of the kernel's IPSET_CMD_LIST header dump, read on every quick tamper check:
//! truncated or garbled datagrams are errors, never panics, and only our sets come out.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(sizes) = ven::firewall::parse_set_sizes_datagram(data) {
        assert!(sizes.keys().all(|name| name.starts_with("ven-")));
    }
});
