//! Giving back what the idle daemon does not use, once the workspace is ready.
//!
//! Starting a workspace runs much code once (config parsing, the startup steps, TLS
//! setup); the pages of that code and of its constants stay mapped in the process (and
//! counted in its RSS) although an idle supervisor never uses them again. Once startup
//! has settled ([`SETTLE`] after it ends, its last log line written), [`trim`] unmaps the
//! process's read-only file pages (`madvise(MADV_DONTNEED)` on its `r-xp` and `r--p` file
//! mappings: the pages stay in the page cache, and whatever runs later maps its pages
//! back with a minor fault) and returns freed heap to the kernel (`malloc_trim`). Only mappings no one wrote to are touched: a page copied on write
//! (relocated data made read-only afterwards, a debugger's breakpoint) would be lost, so
//! a mapping with any anonymous page is left alone.

/// How long after startup the daemon waits before [`trim`]: what follows `ready` runs
/// once first (status reports, the first polls of watched files, log lines).
pub const SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

/// How long the daemon lets its log writer thread write the line announcing the trim.
pub const WRITER_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

/// Resident set size of this process in KiB (from `/proc/self/statm`).
pub fn rss_kib() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(4096) as u64 / 1024)
}

/// Unmap clean read-only file pages and return freed heap; see the module documentation.
/// It measures nothing itself: whatever runs after the unmapping maps its pages back.
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory of the allocator to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
    if let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") {
        for (start, end) in clean_code_mappings(&smaps) {
            // SAFETY: the range is one of this process's own file-backed, read-only,
            // never-written mappings; dropping its pages only makes the next use fault
            // them back in from the page cache, with the same bytes.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
    }
}

/// `(start, end)` of every read-only (`r-xp`, `r--p`) mapping of a file that has no
/// anonymous (copied on write) page, from the text of `/proc/<pid>/smaps`.
fn clean_code_mappings(smaps: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    let mut flush = |current: &mut Option<(usize, usize)>, anon_kib: u64| {
        if let Some(r) = current.take()
            && anon_kib == 0
        {
            out.push(r);
        }
    };
    let mut anon_kib = 0;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let Some(first) = f.next() else { continue };
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
        {
            // A mapping header: range perms offset dev inode [path]
            flush(&mut current, anon_kib);
            anon_kib = 0;
            let perms = f.next().unwrap_or("");
            let path = f.nth(3).unwrap_or("");
            if (perms == "r-xp" || perms == "r--p") && path.starts_with('/') && a < b {
                current = Some((a, b));
            }
        } else if first == "Anonymous:" {
            anon_kib = f.next().and_then(|v| v.parse().ok()).unwrap_or(1);
        }
    }
    flush(&mut current, anon_kib);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_never_written_code_mappings_of_files_are_picked() {
        let smaps = "\
55d0a0000000-55d0a0100000 r--p 00000000 fd:00 12 /usr/local/bin/wsagent
Rss:                 400 kB
Anonymous:             0 kB
55d0a0f00000-55d0a0f10000 r--p 00000000 fd:00 12 /usr/local/bin/wsagent
Rss:                  64 kB
Anonymous:            12 kB
55d0a0100000-55d0a0500000 r-xp 00100000 fd:00 12 /usr/local/bin/wsagent
Rss:                4000 kB
Anonymous:             0 kB
55d0a0500000-55d0a0600000 rw-p 00500000 fd:00 12 /usr/local/bin/wsagent
Anonymous:            40 kB
7f0000000000-7f0000100000 r-xp 00028000 fd:00 99 /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                1100 kB
Anonymous:             4 kB
7f0000200000-7f0000300000 r-xp 00000000 00:00 0 [vdso]
Anonymous:             0 kB
7f0000400000-7f0000500000 r-xp 00000000 fd:00 7 /opt/with space/lib.so
Anonymous:             0 kB
";
        assert_eq!(
            clean_code_mappings(smaps),
            vec![
                (0x55d0a0000000, 0x55d0a0100000),
                (0x55d0a0100000, 0x55d0a0500000),
                (0x7f0000400000, 0x7f0000500000)
            ]
        );
    }

    #[test]
    fn trimming_this_process_keeps_it_running_and_does_not_grow_it() {
        let before = rss_kib().unwrap();
        trim();
        let after = rss_kib().unwrap();
        assert!(after <= before + 64, "RSS {before} KiB -> {after} KiB");
        // Code still runs after its pages were dropped: format, allocate, hash.
        let s: String = (0..1000).map(|i| format!("{i:x}")).collect();
        assert!(s.len() > 1000);
        assert!(before > 0);
    }
}
