//! A full look without libgit2's per-file filter setup: the index's stat data refreshed
//! in memory for every tracked file whose bytes are still the index's.
//!
//! libgit2's status trusts an index entry whose stat data (size, mtime, ctime, inode,
//! owner) matches the file; any other file it hashes, and for each one it first loads
//! the file's filter list: the attribute files of every directory up to the worktree,
//! `info/attributes` and the system and global ones, each checked anew (no session is
//! shared between files). On a checkout whose stat data no longer matches its index
//! (copied, restored from a backup, a fresh clone's index written by another tool,
//! a volume moved to a new node), that setup is most of a full look: about 50 µs per
//! file, 5 s of a 100 000-file save, where `git status` hashes the same files in a
//! fraction of it.
//!
//! [`refreshed_index`] reads the stat data of every tracked regular file; a file whose
//! stat data does not match its entry (or is racily clean: not older than the index) is
//! hashed as it is on disk, without filters, and when that is the entry's id the entry
//! takes the file's current stat data. The status then runs against that copy (in
//! memory: never written, so the user's index is untouched) and finds those files
//! unmodified at the cost of a `stat`; everything else (changed files, files whose
//! stored form differs from their bytes on disk through a filter, new files) it handles
//! exactly as before.
//!
//! A file whose bytes on disk are its index blob's is unmodified for a snapshot whatever
//! a clean filter would do to it: the snapshot holds those very bytes. A file written
//! in the last [`SETTLE`] is left to libgit2 (it hashes it again): its timestamp may
//! not tell a write made after ours from one before.

use std::ffi::CStr;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, SystemTime};

use git2::{Index, IndexEntry, IndexTime, Oid};
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, fstatat};
use sha1::{Digest, Sha1};

/// Files changed more recently than this are not refreshed.
const SETTLE: Duration = Duration::from_secs(2);
/// Files are read in pieces of at most this many bytes.
const SMALL: u64 = 1024 * 1024;
/// `GIT_INDEX_ENTRY_SKIP_WORKTREE` and `GIT_INDEX_ENTRY_INTENT_TO_ADD`.
const SKIP_OR_INTENT: u16 = (1 << 14) | (1 << 13);

/// What a refresh did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refreshed {
    /// Entries whose stat data did not match and whose bytes were hashed.
    pub hashed: usize,
    /// Of those, the entries found unmodified and given fresh stat data.
    pub fresh: usize,
}

/// The index `index` (of the worktree at `workdir`, written at `written`) with fresh stat
/// data for every tracked file whose bytes are its entry's: an in-memory index (never
/// written; it has no file, so libgit2 applies no racy-clean check to it). `None` when no
/// entry needed refreshing: `index` itself serves. `now` is the time of the look.
///
/// The files are read on up to [`THREADS`] threads, made by the calling thread: Linux
/// gives a new thread its creator's credentials, so each reads with the same filesystem
/// ids and groups (the owner's, [`super::fsids::AsOwner`]), never root's.
pub(crate) fn refreshed_index(
    index: &Index,
    workdir: &Path,
    written: Option<SystemTime>,
    now: SystemTime,
) -> Result<Option<(Index, Refreshed)>, git2::Error> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(THREADS));
    let per_thread = index.len().div_ceil(threads).max(MIN_PER_THREAD);
    refreshed_in_parts(index, workdir, written, now, per_thread)
}

/// Threads a refresh reads files on, at most.
const THREADS: usize = 4;
/// Entries below this many are not worth another thread.
const MIN_PER_THREAD: usize = 4096;

/// [`refreshed_index`], with `per_thread` entries to each thread.
fn refreshed_in_parts(
    index: &Index,
    workdir: &Path,
    written: Option<SystemTime>,
    now: SystemTime,
    per_thread: usize,
) -> Result<Option<(Index, Refreshed)>, git2::Error> {
    let when = When {
        settled: now.checked_sub(SETTLE).unwrap_or(SystemTime::UNIX_EPOCH),
        // An entry is racily clean when its file was changed no earlier than the index
        // was written: its stat data cannot tell a later change in the same tick.
        racy_from: written.unwrap_or(SystemTime::UNIX_EPOCH),
    };
    // Every stat and open is relative to the worktree (as git's, run in the worktree):
    // the kernel walks two components per file, not the whole absolute path.
    let Ok(dir) = std::fs::File::open(workdir) else {
        return Ok(None);
    };
    let mut entries: Vec<IndexEntry> = index.iter().collect();
    let mut out = Refreshed::default();
    std::thread::scope(|s| {
        let mut parts = entries.chunks_mut(per_thread.max(1));
        // The first part on this thread, the others each on a helper of its own.
        let first = parts.next();
        let mut helpers = Vec::new();
        for part in parts {
            let dir = &dir;
            let work = move || refresh_part(part, dir, &when);
            // A part whose thread cannot be made keeps its stale stat data: libgit2's
            // status hashes those files, as it did before the refresh existed.
            helpers.push(
                std::thread::Builder::new()
                    .name("wsagent-refresh".into())
                    .spawn_scoped(s, work),
            );
        }
        if let Some(part) = first {
            out.add(refresh_part(part, &dir, &when));
        }
        for h in helpers {
            match h {
                // A helper that panicked refreshed what it verified before: its entries
                // are sound, the count is what is lost.
                Ok(h) => out.add(h.join().unwrap_or_default()),
                Err(e) => tracing::debug!(error = %e, "refresh: no helper thread"),
            }
        }
    });
    if out.fresh == 0 {
        return Ok(None);
    }
    let mut mem = Index::new()?;
    for e in &entries {
        mem.add(e)?;
    }
    Ok(Some((mem, out)))
}

/// The times a refresh compares files with.
#[derive(Clone, Copy)]
struct When {
    /// Files changed after this are left to libgit2.
    settled: SystemTime,
    /// Files changed at or after this are racily clean.
    racy_from: SystemTime,
}

impl Refreshed {
    fn add(&mut self, other: Refreshed) {
        self.hashed += other.hashed;
        self.fresh += other.fresh;
    }
}

/// Refresh the stat data of `entries` in place (see [`refreshed_index`]).
fn refresh_part(entries: &mut [IndexEntry], dir: &std::fs::File, when: &When) -> Refreshed {
    let mut out = Refreshed::default();
    let (mut buf, mut name) = (Vec::new(), Vec::new());
    for e in entries {
        let stage = (e.flags >> 12) & 0x3;
        if stage != 0 || e.flags_extended & SKIP_OR_INTENT != 0 {
            continue;
        }
        // The path with its NUL, in a buffer kept for the whole part: no allocation per
        // file.
        name.clear();
        name.extend_from_slice(&e.path);
        name.push(0);
        let Ok(rel) = CStr::from_bytes_with_nul(&name) else {
            continue;
        };
        let Ok(st) = fstatat(dir, rel, AtFlags::AT_SYMLINK_NOFOLLOW) else {
            continue;
        };
        let mtime = index_time(st.st_mtime, st.st_mtime_nsec);
        let ctime = index_time(st.st_ctime, st.st_ctime_nsec);
        let changed = time(st.st_ctime, st.st_ctime_nsec).max(time(st.st_mtime, st.st_mtime_nsec));
        let racy = changed >= when.racy_from;
        let matches = e.mtime == mtime
            && e.ctime == ctime
            && e.ino == st.st_ino as u32
            && e.uid == st.st_uid
            && e.gid == st.st_gid;
        let regular = (e.mode == 0o100644 || e.mode == 0o100755)
            && st.st_mode & libc::S_IFMT == libc::S_IFREG
            && st.st_size as u32 == e.file_size
            && (st.st_mode & 0o100 != 0) == (e.mode & 0o100 != 0);
        let mut verified = false;
        if regular && (!matches || racy) && changed < when.settled {
            out.hashed += 1;
            if hash_at(dir, rel, st.st_size as u64, &mut buf).is_some_and(|id| id == e.id) {
                out.fresh += 1;
                verified = true;
                e.mtime = mtime;
                e.ctime = ctime;
                e.dev = st.st_dev as u32;
                e.ino = st.st_ino as u32;
                e.uid = st.st_uid;
                e.gid = st.st_gid;
            }
        }
        if racy && matches && !verified {
            // The copy has no racy-clean check of its own: make libgit2 hash this one.
            e.mtime = IndexTime::new(0, 0);
        }
    }
    out
}

/// The blob id of the file `rel` (under `dir`, `len` bytes by its stat data), as it is
/// on disk: no filter. `None` when it cannot be read. A file changed after that stat
/// has a newer timestamp than the one the entry takes, so the status looks at it again.
fn hash_at(dir: &std::fs::File, rel: &CStr, len: u64, buf: &mut Vec<u8>) -> Option<Oid> {
    let fd = openat(
        dir,
        rel,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let mut f = std::fs::File::from(fd);
    let mut h = Sha1::new();
    let mut head = [0u8; 32];
    let mut w = std::io::Cursor::new(&mut head[..]);
    write!(w, "blob {len}\0").ok()?;
    let n = w.position() as usize;
    h.update(&head[..n]);
    // Read in pieces of at most SMALL bytes: a large file is never whole in memory.
    buf.resize(len.min(SMALL) as usize, 0);
    let mut left = len;
    while left > 0 {
        let piece = &mut buf[..left.min(SMALL) as usize];
        f.read_exact(piece).ok()?;
        h.update(&*piece);
        left -= piece.len() as u64;
    }
    Oid::from_bytes(&h.finalize()).ok()
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(s) => SystemTime::UNIX_EPOCH + Duration::new(s, nsecs.clamp(0, 999_999_999) as u32),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

/// An index timestamp as git stores it (32-bit seconds).
fn index_time(secs: i64, nsecs: i64) -> IndexTime {
    IndexTime::new(secs as i32, nsecs as u32)
}

/// While alive, `repo`'s index (in memory) is another one; the original comes back on
/// drop.
pub(crate) struct Swapped<'r> {
    repo: &'r git2::Repository,
    original: Index,
}

impl<'r> Swapped<'r> {
    pub fn new(repo: &'r git2::Repository, with: &mut Index) -> Result<Self, git2::Error> {
        let original = repo.index()?;
        repo.set_index(with)?;
        Ok(Swapped { repo, original })
    }
}

impl Drop for Swapped<'_> {
    fn drop(&mut self) {
        let _ = self.repo.set_index(&mut self.original);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::save::fsids::{self, AsOwner, Role};
    use crate::save::worktree::tests::git;

    /// A checkout copied elsewhere (every entry's stat data stale): the refresh hashes
    /// every file, refreshes the unchanged ones and leaves the changed ones (one of the
    /// same size) to libgit2, so the full look's tree is `git add -A`'s; the user's
    /// index file is not touched.
    #[test]
    fn stale_stat_data_is_refreshed_in_memory_and_changes_still_count() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("d")).unwrap();
        for i in 0..20 {
            std::fs::write(src.join(format!("d/f{i}")), format!("file {i:02}\n")).unwrap();
        }
        git(&src, &["init", "-q"]);
        git(&src, &["add", "-A"]);
        git(&src, &["commit", "-qm", "base"]);
        let copy = tmp.path().join("copy");
        let out = std::process::Command::new("cp")
            .arg("-a")
            .arg(&src)
            .arg(&copy)
            .output()
            .unwrap();
        assert!(out.status.success());
        std::fs::write(copy.join("d/f3"), "file XX\n").unwrap(); // same size, new bytes
        std::fs::write(copy.join("d/f4"), "longer now\n").unwrap();
        std::fs::write(copy.join("d/new"), "new\n").unwrap();
        let index_bytes = std::fs::read(copy.join(".git/index")).unwrap();

        let repo = git2::Repository::open(&copy).unwrap();
        let index = repo.index().unwrap();
        let later = SystemTime::now() + Duration::from_secs(3600);
        let (mut mem, did) = refreshed_index(&index, &copy, None, later)
            .unwrap()
            .unwrap();
        assert_eq!(
            did,
            Refreshed {
                hashed: 19,
                fresh: 18
            },
            "f4's size differs: not hashed"
        );
        // Within the settle time nothing is refreshed.
        assert!(
            refreshed_index(&index, &copy, None, SystemTime::now())
                .unwrap()
                .is_none()
        );

        // libgit2's status against the refreshed copy: exactly the three changes.
        let seen = {
            let _swapped = Swapped::new(&repo, &mut mem).unwrap();
            let mut opts = git2::StatusOptions::new();
            opts.include_untracked(true).show(git2::StatusShow::Workdir);
            let st = repo.statuses(Some(&mut opts)).unwrap();
            let mut seen: Vec<String> = st.iter().map(|s| s.path().unwrap().to_string()).collect();
            seen.sort();
            seen
        };
        assert_eq!(seen, ["d/f3", "d/f4", "d/new"]);
        assert_eq!(
            repo.index().unwrap().len(),
            20,
            "the original index is back"
        );
        assert_eq!(std::fs::read(copy.join(".git/index")).unwrap(), index_bytes);

        // The full look (nothing refreshed yet: the files are too recent) agrees with git.
        let odb = repo.odb().unwrap();
        let mut staged = crate::save::objects::Staged::attach(&repo, &odb).unwrap();
        let wt = crate::save::worktree::worktree_tree(&repo, &mut staged, u64::MAX, None).unwrap();
        staged.flush().unwrap();
        assert_eq!(wt.changed, 3, "{:?}", wt.touched);
        assert_eq!(std::fs::read(copy.join(".git/index")).unwrap(), index_bytes);
        git(&copy, &["add", "-A"]);
        let want = std::process::Command::new("git")
            .arg("-C")
            .arg(&copy)
            .arg("write-tree")
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&want.stdout).trim(),
            wt.tree.to_string()
        );
    }

    /// Parts on helper threads: the same result as one thread, a file larger than a
    /// read piece hashed right, and each helper reads with the ids of the thread that
    /// made it (the owner's): a file only root may read is not refreshed.
    #[test]
    fn helpers_refresh_like_one_thread_and_with_the_owners_ids() {
        if nix::unistd::geteuid().as_raw() != 0 {
            println!("skipped: needs root to take another user's ids");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            tmp.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("d")).unwrap();
        for i in 0..20 {
            std::fs::write(src.join(format!("d/f{i}")), format!("file {i:02}\n")).unwrap();
        }
        let big: Vec<u8> = (0..2 * SMALL + 123).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(src.join("big.bin"), &big).unwrap();
        std::fs::write(src.join("secret"), "root only\n").unwrap();
        git(&src, &["init", "-q"]);
        git(&src, &["add", "-A"]);
        git(&src, &["commit", "-qm", "base"]);
        let copy = tmp.path().join("copy");
        let cp = |args: &[&str]| {
            let out = std::process::Command::new(args[0])
                .args(&args[1..])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        cp(&["cp", "-a", src.to_str().unwrap(), copy.to_str().unwrap()]);
        // Read before the copy changes hands (libgit2 opens only the current user's).
        let index = git2::Repository::open(&copy).unwrap().index().unwrap();
        cp(&["chown", "-R", "65534:65534", copy.to_str().unwrap()]);
        let secret = copy.join("secret");
        cp(&["chown", "0:0", secret.to_str().unwrap()]);
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        std::fs::write(copy.join("d/f3"), "file XX\n").unwrap(); // same size, new bytes

        let later = SystemTime::now() + Duration::from_secs(3600);
        let refresh = |per_thread| {
            let _owner = AsOwner::take(&fsids::Ids::of_user(65534, 65534), Role::Caller);
            let (mem, did) = refreshed_in_parts(&index, &copy, None, later, per_thread)
                .unwrap()
                .unwrap();
            let entries: Vec<(Vec<u8>, i32, u32)> = mem
                .iter()
                .map(|e| (e.path, e.mtime.seconds(), e.ino))
                .collect();
            (did, entries)
        };
        let (one, one_entries) = refresh(usize::MAX);
        let (parts, parts_entries) = refresh(3);
        assert_eq!(
            one,
            Refreshed {
                hashed: 22,
                fresh: 20
            },
            "d/f3 changed; secret unreadable by its owner's ids"
        );
        assert_eq!(parts, one);
        assert_eq!(parts_entries, one_entries);
        let secret_entry = parts_entries.iter().find(|e| e.0 == b"secret").unwrap();
        let orig = index.get_path(Path::new("secret"), 0).unwrap();
        assert_eq!(
            (secret_entry.1, secret_entry.2),
            (orig.mtime.seconds(), orig.ino),
            "a helper read a file its owner may not"
        );
        let big_entry = parts_entries.iter().find(|e| e.0 == b"big.bin").unwrap();
        let big_meta = std::fs::metadata(copy.join("big.bin")).unwrap();
        assert_eq!(
            big_entry.2,
            std::os::unix::fs::MetadataExt::ino(&big_meta) as u32,
            "the large file is refreshed"
        );
    }
}
