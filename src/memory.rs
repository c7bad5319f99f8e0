//! Giving memory back to the kernel after the agent's bursts of work.
//!
//! The flow threads work in bursts: a flush of up to `flow_tracked_max` records written to
//! redb (its page cache and the transaction's dirty pages, a few MB), an upload round reading
//! them back. Everything is freed when the burst ends, but glibc's malloc keeps freed memory
//! of a thread's arena unless it sits at the arena's very top: 4.8 MB stayed resident after a
//! 100k-flow flush (ARCHITECTURE.md, "Memory budget"). Its `malloc_trim` returns every free
//! page; calling it needs `unsafe`, which this library forbids, so the binary registers it
//! here ([`set_release`]) and the burst's thread calls [`release_freed`] when the burst ends
//! (at most once per flush or upload round, never per packet). Without a registered function
//! (tests, musl, whose malloc unmaps large blocks at once) it does nothing.

use std::sync::OnceLock;

static RELEASE: OnceLock<fn()> = OnceLock::new();

/// Registers the allocator's "return free memory" call (the first registration wins).
pub fn set_release(release: fn()) {
    let _ = RELEASE.set(release);
}

/// Returns free memory to the kernel, if the binary registered how.
pub fn release_freed() {
    if let Some(release) = RELEASE.get() {
        release();
    }
}
