//! The C allocator's trimming, tuned for a process that runs large batches.
//!
//! glibc's malloc gives the top of its heap back to the kernel as soon as more than
//! `M_TRIM_THRESHOLD` lies free there (128 KiB until it adapts), and serves blocks above
//! `M_MMAP_THRESHOLD` from fresh mappings. A batch of 10 000 items allocates about a megabyte
//! (item pages, entries, ids) and frees it as it ends; whether the next batch then faults those
//! pages in again depends on where the blocks happened to lie, so an unrelated change of a
//! struct's size moved the engine's 10 000-item figure by a quarter (`wqd-bench
//! --profile-engine 300 summary batch=10000`: about 320 page faults per batch, 0.69–0.73 s
//! against 0.56 s for the same binary with the thresholds set). [`keep_freed`] fixes both thresholds, so that the process keeps up to
//! `bytes` of freed heap for its next batches: its resident size stays at the high-water mark
//! of recent use, at most `bytes` above what is in use (the bounds of `[limits]` are on what
//! is in use).
//!
//! Invariant: a no-op except on glibc; meant to be called once, at start, by the program (the
//! daemon does; a library does not choose its host's allocator).

/// Keeps up to `bytes` of freed heap for reuse instead of giving it back to the kernel at
/// once, and serves blocks below `min(bytes, 32 MiB)` from the heap. Returns whether the
/// allocator took the setting (`false` off glibc).
pub fn keep_freed(bytes: usize) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit).
        let mmap = bytes.min(32 << 20);
        let (Ok(trim), Ok(mmap)) = (libc::c_int::try_from(bytes), libc::c_int::try_from(mmap))
        else {
            return false;
        };
        // SAFETY: mallopt only sets allocator parameters; any value is accepted or refused.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, trim) == 1
                && libc::mallopt(libc::M_MMAP_THRESHOLD, mmap) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = bytes;
        false
    }
}

#[cfg(test)]
mod tests {
    /// Freed heap is kept after `keep_freed`: a megabyte freed at the top of the heap is not
    /// given back, so allocating it again faults no page in. Fails if the call does nothing
    /// (glibc's default trims at 128 KiB and every round faults about 256 pages in).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_heap_is_kept_for_the_next_round() {
        fn minor_faults() -> i64 {
            // SAFETY: getrusage writes the struct it is given.
            let mut u: libc::rusage = unsafe { std::mem::zeroed() };
            unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) };
            u.ru_minflt
        }
        assert!(super::keep_freed(32 << 20));
        // Rounds of many small blocks (below any mmap threshold), all freed together.
        let round = || {
            let v: Vec<Box<[u8; 4096]>> = (0..256).map(|_| Box::new([1u8; 4096])).collect();
            std::hint::black_box(&v);
        };
        round();
        let before = minor_faults();
        for _ in 0..20 {
            round();
        }
        let faults = minor_faults() - before;
        assert!(
            faults < 100,
            "{faults} page faults in 20 rounds of a freed megabyte"
        );
    }
}
