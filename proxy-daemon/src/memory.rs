//! Giving freed heap back to the system. A configuration load (parse, compile) and a
//! `/config_dump` of a large mesh allocate tens of MiB for a moment; glibc keeps freed
//! chunks in its per-thread arenas, so without a trim the daemon's RSS stays at the peak
//! (measured: 1,000 services × 5 routes left 99 MB after the load and 146 MB after one
//! dump, where the snapshot itself holds 17 MiB).

/// Returns free heap memory to the system (glibc `malloc_trim`); a no-op elsewhere.
pub fn release_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}
