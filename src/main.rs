//! The `ven` binary: everything is in the library, except the allocator's tuning, which needs
//! `unsafe` (the library forbids it) and must come before any other thread starts.

fn main() -> std::process::ExitCode {
    allocator::tune();
    ven::cli::main()
}

/// glibc's malloc, left to itself, raises its mmap threshold to the size of each large block
/// freed (up to 32 MiB): once the agent's grown flow table (8.4 MB at 100k flows) is given
/// back at a flush, the next interval's table, the flush's records and redb's page cache all
/// come from the arenas instead, where freed memory stays in the process (measured: 16.3 MB
/// RSS after a 100k-flow flush, against 9.1 MB with the threshold fixed; ARCHITECTURE.md,
/// "Memory budget"). A fixed threshold keeps every block of 128 KiB or more in a mapping of
/// its own, returned to the kernel when freed. musl's malloc already does so.
///
/// Smaller blocks freed after a burst (redb's page cache after a flush) stay in the thread's
/// arena unless they sit at its top: `malloc_trim` returns them, run through
/// [`ven::memory::release_freed`] when a flush or an upload round ends.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod allocator {
    /// glibc's initial value, now fixed (setting it turns the dynamic threshold off).
    const MMAP_THRESHOLD_BYTES: libc::c_int = 128 * 1024;

    pub fn tune() {
        // SAFETY: mallopt only changes malloc's parameters, with a value in its documented
        // range; it runs first in main, before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
        }
        ven::memory::set_release(release);
    }

    fn release() {
        // SAFETY: malloc_trim only returns free pages to the kernel; any thread may call it.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod allocator {
    pub fn tune() {}
}
