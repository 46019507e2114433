//! Where a save's new objects go: into memory first, then onto disk as one pack.
//!
//! Written one by one, every new blob, tree and commit is a loose object: a file of its
//! own, often in a fan-out directory made for it. A save of a hundred changed files then
//! creates a few hundred inodes, and on a busy filesystem allocating them is most of the
//! save's CPU time (a filesystem without a journal searches past every recently deleted
//! inode). [`Staged`] puts an in-memory object database (libgit2's mempack backend) in
//! front of the repository's for writes; [`Staged::flush`] packs exactly the objects it
//! holds (nothing the repository already has) and stores the pack through the
//! repository's own pack backend (a `.pack` and its `.idx`, named by their content).
//!
//! A flush of fewer than [`UNPACK_LIMIT`] objects (a checkpoint's few changed files)
//! writes them loose instead, as git itself stores what a small fetch or push brings
//! (`transfer.unpackLimit`, 100): a pack per checkpoint would leave the repository with
//! thousands of packs, which git only merges at 50 (`gc.autoPackLimit`) by rewriting
//! them all, while loose objects are what the user's next `git gc --auto` packs anyway
//! (at 6 700, `gc.auto`). wsagent never repacks or deletes anything itself: the
//! user's git may be running.
//!
//! Nothing may refer to a staged object before it is flushed: callers flush before they
//! write the index or move a ref. Objects left staged when the repository is dropped are
//! discarded, which is right for the paths that move no ref.
//!
//! Memory stays bounded: files of [`LARGE_BLOB`] bytes or more are streamed to a loose
//! object, and the staged bytes are flushed whenever they pass [`FLUSH_AT`]. A large
//! file no filter applies to (no `text`/`eol`/`filter` attribute, no `core.autocrlf`
//! conversion) is written by [`write_large_loose`]: one read of the file that hashes
//! and deflates it, at zlib's fastest level as git stores loose objects, or stored
//! without compression when a sample of it does not shrink (deflating random bytes takes
//! as long as deflating text and gains nothing; see [`level_for`]). One that needs a filter goes
//! through libgit2 (`blob_path`) on a second handle of the repository.

use std::ffi::{CString, c_char, c_int, c_void};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use flate2::Compression;
use flate2::write::ZlibEncoder;
use sha1::{Digest, Sha1};

use git2::{Binding, Mempack, Odb, Oid, Repository};

/// Above every built-in backend (loose 1, packs 2): writes go to memory.
const PRIORITY: i32 = 1000;
/// Blobs from files this large go straight to disk, streamed, as loose objects (and are
/// streamed into a push's pack, see `save::pack`).
pub(crate) const LARGE_BLOB: u64 = 1024 * 1024;
/// Staged content past which the staged objects are packed at once.
const FLUSH_AT: u64 = 32 * 1024 * 1024;
/// A flush of fewer objects writes them loose (git's `transfer.unpackLimit`).
pub(crate) const UNPACK_LIMIT: usize = 100;

// libgit2's `sys/mempack.h`; compiled into the vendored libgit2 but not declared by
// libgit2-sys.
unsafe extern "C" {
    fn git_mempack_write_thin_pack(backend: *mut c_void, pb: *mut c_void) -> c_int;
    fn git_mempack_object_count(count: *mut usize, backend: *mut c_void) -> c_int;
    fn git_filter_list_load(
        filters: *mut *mut c_void,
        repo: *mut c_void,
        blob: *mut c_void,
        path: *const c_char,
        mode: c_int,
        flags: u32,
    ) -> c_int;
    fn git_filter_list_free(filters: *mut c_void);
}

/// libgit2's `GIT_FILTER_TO_ODB`.
const FILTER_TO_ODB: c_int = 1;
/// The buffer a large file moves through, and the sample its compression is judged by.
const CHUNK: usize = 256 * 1024;

fn check(code: c_int) -> Result<(), git2::Error> {
    if code < 0 {
        Err(git2::Error::last_error(code))
    } else {
        Ok(())
    }
}

/// New objects of one repository, held in memory until [`Staged::flush`].
pub(crate) struct Staged<'o, 'r> {
    repo: &'r Repository,
    odb: &'o Odb<'r>,
    mem: Mempack<'o>,
    bytes: u64,
    flush_at: u64,
    unpack_limit: usize,
    /// A handle of the same repository without the in-memory backend, for large blobs.
    direct: Option<Repository>,
}

impl<'o, 'r> Staged<'o, 'r> {
    /// Route `repo`'s object writes through memory. `odb` must be `repo.odb()`.
    pub fn attach(repo: &'r Repository, odb: &'o Odb<'r>) -> Result<Self, git2::Error> {
        Ok(Staged {
            repo,
            odb,
            mem: odb.add_new_mempack_backend(PRIORITY)?,
            bytes: 0,
            flush_at: FLUSH_AT,
            unpack_limit: UNPACK_LIMIT,
            direct: None,
        })
    }

    /// The blob of the file at `path` (`len` bytes): staged, or streamed straight to
    /// disk when large.
    pub fn blob_from_file(&mut self, path: &Path, len: u64) -> Result<Oid, git2::Error> {
        if len >= LARGE_BLOB {
            if self.no_filter(path) == Some(true) {
                return write_large_loose(&self.repo.commondir().join("objects"), path, len)
                    .map_err(|e| git2::Error::from_str(&format!("{}: {e}", path.display())));
            }
            return self.direct()?.blob_path(path);
        }
        let id = self.repo.blob_path(path)?;
        self.bytes += len;
        Ok(id)
    }

    /// Whether no filter applies to `path` (in the worktree) on its way into the object
    /// database; `None` when that cannot be told.
    fn no_filter(&self, path: &Path) -> Option<bool> {
        let rel = path.strip_prefix(self.repo.workdir()?).ok()?;
        let rel = CString::new(rel.as_os_str().as_bytes()).ok()?;
        let mut list: *mut c_void = std::ptr::null_mut();
        // SAFETY: the repository handle is alive for the call; `list` is a valid
        // out-pointer; a list returned is freed below.
        let code = unsafe {
            git_filter_list_load(
                &mut list,
                self.repo.raw().cast(),
                std::ptr::null_mut(),
                rel.as_ptr(),
                FILTER_TO_ODB,
                0,
            )
        };
        if code < 0 {
            return None;
        }
        if list.is_null() {
            return Some(true);
        }
        // SAFETY: `list` came from git_filter_list_load and is freed once.
        unsafe { git_filter_list_free(list) };
        Some(false)
    }

    /// The repository's own object database, without the in-memory backend.
    fn direct(&mut self) -> Result<&Repository, git2::Error> {
        if self.direct.is_none() {
            // The common dir holds the objects (also for a linked worktree).
            self.direct = Some(Repository::open(self.repo.commondir())?);
        }
        Ok(self.direct.as_ref().expect("opened"))
    }

    /// Flush if the staged content has passed the bound (see the module documentation).
    pub fn flush_if_full(&mut self) -> Result<(), git2::Error> {
        if self.bytes >= self.flush_at {
            self.flush()?;
        }
        Ok(())
    }

    /// Number of objects staged and not yet on disk.
    pub fn pending(&self) -> usize {
        let mut n = 0usize;
        // SAFETY: the backend is alive (borrowed from the odb for 'o) and `n` is a valid
        // out-pointer.
        let code = unsafe { git_mempack_object_count(&mut n, self.mem.raw().cast()) };
        if code < 0 { 0 } else { n }
    }

    /// Write the staged objects to the repository, as one pack or (fewer than
    /// [`UNPACK_LIMIT`]) loose, and empty the memory. Returns how many were written.
    pub fn flush(&mut self) -> Result<usize, git2::Error> {
        let n = self.pending();
        if n == 0 {
            return Ok(0);
        }
        let mut buf = git2::Buf::new();
        {
            let mut pb = self.repo.packbuilder()?;
            // SAFETY: both pointers are live libgit2 objects owned by `self.mem` and
            // `pb`; the call only inserts the backend's object ids into the builder.
            check(unsafe { git_mempack_write_thin_pack(self.mem.raw().cast(), pb.raw().cast()) })?;
            pb.write_buf(&mut buf)?;
        }
        if n < self.unpack_limit {
            self.write_loose(&buf)?;
            self.mem.reset()?;
            self.bytes = 0;
            return Ok(n);
        }
        let pack_dir = self.repo.commondir().join("objects/pack");
        let mut w = self
            .odb
            .packwriter()
            .map_err(|e| pack_error(&pack_dir, e))?;
        if w.write_all(&buf).is_err() {
            // git2 says only "Write error"; libgit2's own error has the cause.
            return Err(pack_error(&pack_dir, git2::Error::last_error(-1)));
        }
        w.commit().map_err(|e| pack_error(&pack_dir, e))?;
        drop(w);
        self.mem.reset()?;
        self.bytes = 0;
        Ok(n)
    }
}

impl Staged<'_, '_> {
    /// Write the objects of `pack` (the staged objects, packed) loose: the pack is
    /// indexed in a temporary directory for their ids, each is read from memory and
    /// written through the repository's own (loose) backend.
    fn write_loose(&mut self, pack: &[u8]) -> Result<(), git2::Error> {
        let objects = self.repo.commondir().join("objects");
        let io = |e: std::io::Error| pack_error(&objects, git2::Error::from_str(&e.to_string()));
        let tmp = tempfile::tempdir().map_err(io)?;
        let mut indexer = git2::Indexer::new(None, tmp.path(), 0o600, false)?;
        indexer.write_all(pack).map_err(io)?;
        let name = indexer.commit()?;
        let idx = std::fs::read(tmp.path().join(format!("pack-{name}.idx"))).map_err(io)?;
        let ids = idx_ids(&idx).ok_or_else(|| {
            git2::Error::from_str("the index of the staged objects is not a pack index v2")
        })?;
        let odb = self.odb;
        let direct = self.direct()?.odb()?;
        for id in ids {
            let obj = odb.read(id)?;
            direct
                .write(obj.kind(), obj.data())
                .map_err(|e| pack_error(&objects, e))?;
        }
        Ok(())
    }
}

/// The object ids listed by a pack index (version 2).
/// How to deflate bytes like `sample`: zlib's fastest level, or no compression at all
/// when the sample does not shrink by a tenth (already compressed or random data).
pub(crate) fn level_for(sample: &[u8]) -> Compression {
    if sample.is_empty() {
        return Compression::fast();
    }
    let mut z = ZlibEncoder::new(Vec::with_capacity(sample.len()), Compression::fast());
    match z.write_all(sample).and_then(|_| z.finish()) {
        Ok(out) if (out.len() as u64) * 10 < (sample.len() as u64) * 9 => Compression::fast(),
        Ok(_) => Compression::none(),
        Err(_) => Compression::fast(),
    }
}

/// Fill `buf` from `r` as far as it goes; the number of bytes read.
pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The blob of the file at `path`, `len` bytes as its size was read, written as a loose
/// object under `objects` in one pass (hashed and deflated as it is read, never held in
/// memory). The file is opened without following a symlink; one that changes size
/// while it is read is an error (the save's caller decides what to do), as libgit2's.
pub(crate) fn write_large_loose(objects: &Path, path: &Path, len: u64) -> std::io::Result<Oid> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let mut buf = vec![0u8; CHUNK];
    let mut n = read_full(&mut file, &mut buf)?;
    let header = format!("blob {len}\0");
    let mut hash = Sha1::new();
    hash.update(header.as_bytes());
    let tmp = tempfile::Builder::new()
        .prefix("tmp_obj_")
        .tempfile_in(objects)?;
    let mut z = ZlibEncoder::new(
        std::io::BufWriter::with_capacity(CHUNK, tmp.as_file()),
        level_for(&buf[..n]),
    );
    z.write_all(header.as_bytes())?;
    let mut total: u64 = 0;
    while n > 0 {
        total += n as u64;
        if total > len {
            break;
        }
        hash.update(&buf[..n]);
        z.write_all(&buf[..n])?;
        n = read_full(&mut file, &mut buf)?;
    }
    if total != len {
        return Err(std::io::Error::other(format!(
            "the file changed size while it was read ({len} bytes, then {total} or more)"
        )));
    }
    z.finish()?.flush()?;
    let id = Oid::from_bytes(&hash.finalize()).map_err(std::io::Error::other)?;
    let hex = id.to_string();
    let dir = objects.join(&hex[..2]);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let dest = dir.join(&hex[2..]);
    if std::fs::symlink_metadata(&dest).is_ok() {
        // Already there (the same content saved before): the temporary file goes.
        return Ok(id);
    }
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o444))?;
    match tmp.persist_noclobber(&dest) {
        Ok(_) => Ok(id),
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(id),
        Err(e) => Err(e.error),
    }
}

fn idx_ids(idx: &[u8]) -> Option<Vec<Oid>> {
    if idx.get(..8)? != b"\xfftOc\0\0\0\x02" {
        return None;
    }
    let n = u32::from_be_bytes(idx.get(8 + 255 * 4..8 + 256 * 4)?.try_into().ok()?) as usize;
    let ids = idx.get(8 + 1024..8 + 1024 + n * 20)?;
    ids.chunks(20).map(|c| Oid::from_bytes(c).ok()).collect()
}

/// An error writing the pack into `dir`, named as the user would: a full disk is
/// "no space left on device", with the directory.
fn pack_error(dir: &Path, e: git2::Error) -> git2::Error {
    let msg = e.message();
    let lower = msg.to_ascii_lowercase();
    if lower.contains("no space left on device") {
        git2::Error::from_str(&format!(
            "cannot write the new objects to {}: no space left on device",
            dir.display()
        ))
    } else if lower.contains("disk quota exceeded") {
        git2::Error::from_str(&format!(
            "cannot write the new objects to {}: disk quota exceeded",
            dir.display()
        ))
    } else {
        git2::Error::from_str(&format!(
            "cannot write the new objects to {}: {msg}",
            dir.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loose_count(repo: &Repository) -> usize {
        let objects = repo.path().join("objects");
        std::fs::read_dir(&objects)
            .unwrap()
            .flatten()
            .filter(|d| d.file_name().len() == 2)
            .map(|d| std::fs::read_dir(d.path()).unwrap().count())
            .sum()
    }

    fn packs(repo: &Repository) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(repo.path().join("objects/pack"))
            .unwrap()
            .flatten()
            .map(|d| d.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn staged_objects_reach_disk_as_one_pack_that_git_reads() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(dir.path()).unwrap();
        let existing = repo.blob(b"already here\n").unwrap();
        assert_eq!(loose_count(&repo), 1);
        for i in 0..20 {
            std::fs::write(dir.path().join(format!("f{i}")), format!("file {i}\n")).unwrap();
        }
        std::fs::write(dir.path().join("same"), "already here\n").unwrap();

        let odb = repo.odb().unwrap();
        let mut staged = Staged::attach(&repo, &odb).unwrap();
        // Past the loose limit (lowered here): one pack.
        staged.unpack_limit = 10;
        let mut tb = repo.treebuilder(None).unwrap();
        for i in 0..20 {
            let p = dir.path().join(format!("f{i}"));
            let id = staged.blob_from_file(&p, 7).unwrap();
            tb.insert(format!("f{i}"), id, 0o100644).unwrap();
        }
        let same = staged.blob_from_file(&dir.path().join("same"), 13).unwrap();
        assert_eq!(same, existing);
        tb.insert("same", same, 0o100644).unwrap();
        let tree = tb.write().unwrap();
        drop(tb);
        // 20 new blobs and the tree; the blob the repository had is not staged again.
        assert_eq!(staged.pending(), 21);
        assert_eq!(loose_count(&repo), 1, "nothing written loose");
        assert!(packs(&repo).is_empty());

        assert_eq!(staged.flush().unwrap(), 21);
        assert_eq!(staged.pending(), 0);
        assert_eq!(staged.flush().unwrap(), 0, "an empty flush writes nothing");
        let p = packs(&repo);
        assert_eq!(p.len(), 2, "one .pack and its .idx: {p:?}");
        assert!(p.iter().any(|f| f.ends_with(".pack")) && p.iter().any(|f| f.ends_with(".idx")));
        drop(staged);
        drop(odb);
        drop(repo);

        // A fresh handle (no memory backend) and git itself read everything.
        let repo = Repository::open(dir.path()).unwrap();
        let t = repo.find_tree(tree).unwrap();
        assert_eq!(t.len(), 21);
        let out = std::process::Command::new("git")
            .args(["-C", &dir.path().display().to_string(), "fsck", "--strict"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = std::process::Command::new("git")
            .args(["-C", &dir.path().display().to_string(), "cat-file", "-p"])
            .arg(format!("{tree}:f7"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "file 7\n");
    }

    #[test]
    fn a_few_objects_are_written_loose_not_as_a_pack_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(dir.path()).unwrap();
        let odb = repo.odb().unwrap();
        let mut staged = Staged::attach(&repo, &odb).unwrap();
        let mut ids = Vec::new();
        for i in 0..5 {
            let p = dir.path().join(format!("f{i}"));
            std::fs::write(&p, format!("small {i}\n")).unwrap();
            ids.push(staged.blob_from_file(&p, 8).unwrap());
        }
        let mut tb = repo.treebuilder(None).unwrap();
        for (i, id) in ids.iter().enumerate() {
            tb.insert(format!("f{i}"), *id, 0o100644).unwrap();
        }
        let tree = tb.write().unwrap();
        drop(tb);
        assert_eq!(loose_count(&repo), 0, "staged, not written yet");
        assert_eq!(staged.flush().unwrap(), 6);
        assert_eq!(staged.pending(), 0);
        assert!(packs(&repo).is_empty(), "no pack for six objects");
        assert_eq!(loose_count(&repo), 6);
        drop(staged);
        drop(odb);
        drop(repo);
        let out = std::process::Command::new("git")
            .args(["-C", &dir.path().display().to_string(), "fsck", "--strict"])
            .arg(tree.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = std::process::Command::new("git")
            .args(["-C", &dir.path().display().to_string(), "cat-file", "-p"])
            .arg(format!("{tree}:f3"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "small 3\n");
    }

    /// A large file written by wsagent's own loose writer is the object git makes of
    /// it, compressible or not; a file with a filter (CRLF conversion) goes through
    /// libgit2 and gets git's blob too; a file that is a symlink is refused.
    #[test]
    fn large_loose_objects_are_what_git_makes_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(dir.path()).unwrap();
        let git = |args: &[&str]| {
            let out = std::process::Command::new("git")
                .arg("-C")
                .arg(dir.path())
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        };
        let n = LARGE_BLOB as usize + 4321;
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let random: Vec<u8> = (0..n)
            .map(|_| {
                // xorshift64: bytes deflate cannot shrink.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let text: Vec<u8> = (0..n).map(|i| b"line of text\r\n"[i % 14]).collect();
        std::fs::write(dir.path().join("random.bin"), &random).unwrap();
        std::fs::write(dir.path().join("text.txt"), &text).unwrap();
        std::fs::write(dir.path().join("crlf.txt"), &text).unwrap();
        std::fs::write(dir.path().join(".gitattributes"), "crlf.txt text eol=lf\n").unwrap();
        std::os::unix::fs::symlink("random.bin", dir.path().join("link")).unwrap();
        assert_eq!(level_for(&random[..CHUNK]), Compression::none());
        assert_eq!(level_for(&text[..CHUNK]), Compression::fast());
        let odb = repo.odb().unwrap();
        let mut staged = Staged::attach(&repo, &odb).unwrap();
        for name in ["random.bin", "text.txt", "crlf.txt"] {
            let id = staged
                .blob_from_file(&dir.path().join(name), n as u64)
                .unwrap();
            assert_eq!(id.to_string(), git(&["hash-object", name]), "{name}");
            assert_eq!(git(&["cat-file", "-t", &id.to_string()]), "blob");
        }
        let crlf = git(&["hash-object", "crlf.txt"]);
        assert_eq!(
            git(&["cat-file", "-s", &crlf]),
            (n - n / 14).to_string(),
            "the filter ran: CRs gone"
        );
        git(&["fsck", "--strict"]);
        let objects = dir.path().join(".git/objects");
        assert!(write_large_loose(&objects, &dir.path().join("link"), n as u64).is_err());
        let e =
            write_large_loose(&objects, &dir.path().join("random.bin"), n as u64 + 1).unwrap_err();
        assert!(e.to_string().contains("changed size"), "{e}");
        let left: Vec<_> = std::fs::read_dir(&objects)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("tmp_obj_"))
            .collect();
        assert!(left.is_empty(), "no temporary file is left behind");
    }

    #[test]
    fn large_files_are_streamed_loose_and_staged_bytes_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(dir.path()).unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; LARGE_BLOB as usize]).unwrap();
        let odb = repo.odb().unwrap();
        let mut staged = Staged::attach(&repo, &odb).unwrap();
        let id = staged.blob_from_file(&big, LARGE_BLOB).unwrap();
        assert_eq!(staged.pending(), 0, "a large blob is not held in memory");
        assert_eq!(loose_count(&repo), 1);
        assert!(repo.find_blob(id).is_ok());

        // Staged content past the bound is packed at once.
        staged.flush_at = 100;
        staged.unpack_limit = 0;
        for i in 0..4u8 {
            let p = dir.path().join(format!("m{i}"));
            std::fs::write(&p, vec![b'a' + i; 24]).unwrap();
            staged.blob_from_file(&p, 24).unwrap();
            staged.flush_if_full().unwrap();
        }
        assert_eq!(staged.pending(), 4, "under the bound: still staged");
        let p = dir.path().join("m4");
        std::fs::write(&p, vec![b'z'; 24]).unwrap();
        staged.blob_from_file(&p, 24).unwrap();
        staged.flush_if_full().unwrap();
        assert_eq!(staged.pending(), 0, "past the bound: flushed");
        assert_eq!(loose_count(&repo), 1, "only the large blob is loose");
        assert_eq!(packs(&repo).len(), 2);
    }
}
