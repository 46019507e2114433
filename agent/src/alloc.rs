//! Giving the allocator's free memory back to the system after a burst of work.
//!
//! A save of a large repository allocates tens of MiB (libgit2's object caches, the
//! index, tree builders) and frees them when it ends; glibc keeps freed memory in its
//! arenas for reuse, so without a trim the daemon's anonymous memory (what the
//! workspace's cgroup is charged) stays at the save's peak for as long as it runs.
//! `malloc_trim` returns every free page of every arena, also from the middle of a
//! heap, and the free top of the main heap; the free top of a thread arena's heap is
//! given back on `free` once it passes the trim threshold, which the CLI fixes at start
//! (`tune_malloc`). It costs a walk over the free lists, a millisecond or so: it runs
//! once per save, never on a hot path. Measured in `scripts/bench` (the `scale` section's
//! "RssAnon 10 s after that save" row).

/// Return the allocator's free memory to the kernel (glibc); a no-op elsewhere.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only gives free memory of the allocator back to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}
