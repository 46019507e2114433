//! Where a save's new objects go: into memory first, then onto disk as one pack.
//!
//! Written one by one, every new blob, tree and commit is a loose object: a file of its
//! own, often in a fan-out directory made for it. A save of a hundred changed files then
//! creates a few hundred inodes, and on a busy filesystem allocating them is most of the
//! save's CPU time (a filesystem without a journal searches past every recently deleted
//! inode). [`Staged`] puts an in-memory object database (libgit2's mempack backend) in
//! front of the repository's for writes, and records the id of every object written to
//! it; [`Staged::flush`] writes exactly the objects it holds (nothing the repository
//! already has) as one pack and its index, named by their content
//! ([`super::packfile`]: each object deflated once, the index made from the recorded
//! ids, not by inflating and hashing the pack again as libgit2's indexer does).
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

use super::packfile::PackFile;

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
    // `sys/config.h`, likewise.
    fn git_config_backend_from_string(
        out: *mut *mut libgit2_sys::git_config_backend,
        cfg: *const c_char,
        len: usize,
        opts: *mut c_void,
    ) -> c_int;
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
        let mem = odb.add_new_mempack_backend(PRIORITY)?;
        record_writes(mem.raw())?;
        Ok(Staged {
            repo,
            odb,
            mem,
            bytes: 0,
            flush_at: FLUSH_AT,
            unpack_limit: UNPACK_LIMIT,
            direct: None,
        })
    }

    /// The blob of the file at `path` (`len` bytes): staged, or streamed straight to
    /// disk when large. `plain`: no attribute or config can apply a filter to it (see
    /// [`Plain`]), so its bytes are its blob and libgit2's lookup is skipped.
    pub fn blob_from_file(
        &mut self,
        path: &Path,
        len: u64,
        plain: bool,
    ) -> Result<Oid, git2::Error> {
        let io = |e: std::io::Error| git2::Error::from_str(&format!("{}: {e}", path.display()));
        if len >= LARGE_BLOB {
            if plain || self.no_filter(path) == Some(true) {
                return write_large_loose(&self.repo.commondir().join("objects"), path, len)
                    .map_err(io);
            }
            return self.direct()?.blob_path(path);
        }
        let id = if plain {
            // As libgit2 reads it: the bytes there are now, whatever the size said.
            let bytes = std::fs::read(path).map_err(io)?;
            self.stage(git2::ObjectType::Blob, &bytes)?
        } else {
            self.repo.blob_path(path)?
        };
        self.bytes += len;
        Ok(id)
    }

    /// Stage an object. libgit2's own write (`git_odb_write`) first looks for the object
    /// in every backend and, not finding it (a new object never is found), rereads the
    /// pack directory before it looks again: a directory listing per new object (see the
    /// session 10 profile in bench/results.md). Here the look does not reread the directory
    /// (a pack made by someone else an instant ago only means a copy more), and a new
    /// object goes straight to the memory backend. One found is written the usual way,
    /// which freshens its file as git does.
    fn stage(&mut self, kind: git2::ObjectType, data: &[u8]) -> Result<Oid, git2::Error> {
        let id = Oid::hash_object(kind, data)?;
        if self.odb.exists_ext(id, git2::OdbLookupFlags::NO_REFRESH) {
            return self.odb.write(kind, data);
        }
        let backend = self.mem.raw();
        // SAFETY: the backend is alive (borrowed from the odb for 'o); its `write` is
        // set by libgit2's mempack constructor.
        let write = unsafe { (*backend).write }
            .ok_or_else(|| git2::Error::from_str("the memory backend does not write"))?;
        // SAFETY: a live backend, a valid id and a buffer of `data.len()` bytes, which the
        // backend copies.
        check(write(
            backend,
            id.raw(),
            data.as_ptr().cast(),
            data.len(),
            kind.raw(),
        ))?;
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
        let ids = recorded(self.mem.raw());
        if ids.len() == n {
            if n < self.unpack_limit {
                self.write_loose(&ids)?;
            } else {
                self.write_pack(&ids)?;
            }
            self.reset()?;
            return Ok(n);
        }
        // Every write to the memory backend is recorded, so this is not expected;
        // libgit2's pack of them loses nothing.
        tracing::debug!(
            staged = n,
            recorded = ids.len(),
            "staged objects packed by libgit2"
        );
        let mut buf = git2::Buf::new();
        {
            let mut pb = packbuilder_without_deltas(self.repo)?;
            // SAFETY: both pointers are live libgit2 objects owned by `self.mem` and
            // `pb`; the call only inserts the backend's object ids into the builder.
            check(unsafe { git_mempack_write_thin_pack(self.mem.raw().cast(), pb.raw().cast()) })?;
            pb.write_buf(&mut buf)?;
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
        self.reset()?;
        Ok(n)
    }

    /// Empty the memory backend and what was recorded of it.
    fn reset(&mut self) -> Result<(), git2::Error> {
        self.mem.reset()?;
        forget_writes(self.mem.raw(), true);
        self.bytes = 0;
        Ok(())
    }
}

impl Drop for Staged<'_, '_> {
    fn drop(&mut self) {
        forget_writes(self.mem.raw(), false);
    }
}

impl Staged<'_, '_> {
    /// Write the staged objects `ids` loose through a loose-object backend of the
    /// repository's object directory (as libgit2 makes its own: default compression,
    /// `core.fsyncObjectFiles`). None of them is on disk (a staged object never is), so
    /// the database's write, which looks for each one and rereads the pack directory
    /// first, is not needed.
    fn write_loose(&self, ids: &[Oid]) -> Result<(), git2::Error> {
        let objects = self.repo.commondir().join("objects");
        let fsync = self.fsync_objects();
        let dir = CString::new(objects.as_os_str().as_bytes())
            .map_err(|_| git2::Error::from_str("the objects directory's path has a NUL"))?;
        let mut raw: *mut libgit2_sys::git_odb_backend = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer and `dir` a C string; the backend made is
        // freed by `Loose`'s drop.
        check(unsafe {
            libgit2_sys::git_odb_backend_loose(&mut raw, dir.as_ptr(), -1, c_int::from(fsync), 0, 0)
        })
        .map_err(|e| pack_error(&objects, e))?;
        let loose = Loose(raw);
        // SAFETY: a live backend made just above; libgit2's loose backend sets `write`.
        let write = unsafe { (*loose.0).write }
            .ok_or_else(|| git2::Error::from_str("the loose backend does not write"))?;
        for id in ids {
            let obj = self.odb.read(*id)?;
            let data = obj.data();
            check(write(
                loose.0,
                id.raw(),
                data.as_ptr().cast(),
                data.len(),
                obj.kind().raw(),
            ))
            .map_err(|e| pack_error(&objects, e))?;
        }
        Ok(())
    }
}

impl Staged<'_, '_> {
    /// Write the staged objects `ids` as one pack and its index ([`PackFile`]), then
    /// make the database see the new pack.
    fn write_pack(&self, ids: &[Oid]) -> Result<(), git2::Error> {
        let pack_dir = self.repo.commondir().join("objects/pack");
        let io = |e: std::io::Error| pack_error(&pack_dir, git2::Error::from_str(&e.to_string()));
        let count = u32::try_from(ids.len())
            .map_err(|_| git2::Error::from_str("too many objects for one pack"))?;
        let mut pack = PackFile::new(count);
        for id in ids {
            let obj = self.odb.read(*id)?;
            pack.add(*id, obj.kind(), obj.data()).map_err(io)?;
        }
        pack.finish(&pack_dir, self.fsync_objects()).map_err(io)?;
        self.odb.refresh()
    }

    /// `core.fsyncObjectFiles`, as libgit2 reads it for its own object writes.
    fn fsync_objects(&self) -> bool {
        self.repo
            .config()
            .and_then(|c| c.get_bool("core.fsyncObjectFiles"))
            .unwrap_or(false)
    }
}

/// A loose-object backend not added to any database, freed on drop.
struct Loose(*mut libgit2_sys::git_odb_backend);

impl Drop for Loose {
    fn drop(&mut self) {
        // SAFETY: made by git_odb_backend_loose, owned by no database, freed once.
        if let Some(free) = unsafe { (*self.0).free } {
            free(self.0);
        }
    }
}

type BackendWrite = extern "C" fn(
    *mut libgit2_sys::git_odb_backend,
    *const libgit2_sys::git_oid,
    *const c_void,
    usize,
    libgit2_sys::git_object_t,
) -> c_int;

/// The memory backend's own write (the same function for every one).
static MEMPACK_WRITE: std::sync::OnceLock<BackendWrite> = std::sync::OnceLock::new();
/// The ids written to each live memory backend (by its address) since it was last
/// emptied: libgit2 lists a memory backend's objects only as a pack.
static WRITTEN: std::sync::Mutex<std::collections::BTreeMap<usize, Vec<Oid>>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn written() -> std::sync::MutexGuard<'static, std::collections::BTreeMap<usize, Vec<Oid>>> {
    WRITTEN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Make the memory backend `mem` record the id of every object written to it.
fn record_writes(mem: *mut libgit2_sys::git_odb_backend) -> Result<(), git2::Error> {
    // SAFETY: a live backend just made by libgit2's mempack constructor, which sets its
    // `write`; nothing else uses it yet.
    let own = unsafe { (*mem).write }
        .ok_or_else(|| git2::Error::from_str("the memory backend does not write"))?;
    if *MEMPACK_WRITE.get_or_init(|| own) as usize != own as usize {
        // Not the write known: not recorded (its flushes are packs).
        return Ok(());
    }
    written().insert(mem as usize, Vec::new());
    // SAFETY: as above; the function set has the same signature and calls `own`.
    unsafe { (*mem).write = Some(recording_write) };
    Ok(())
}

extern "C" fn recording_write(
    backend: *mut libgit2_sys::git_odb_backend,
    oid: *const libgit2_sys::git_oid,
    data: *const c_void,
    len: usize,
    kind: libgit2_sys::git_object_t,
) -> c_int {
    let Some(own) = MEMPACK_WRITE.get() else {
        return -1;
    };
    let code = own(backend, oid, data, len, kind);
    if code >= 0 {
        // SAFETY: libgit2 passes a valid object id.
        let id = unsafe { Oid::from_raw(oid) };
        if let Some(ids) = written().get_mut(&(backend as usize)) {
            ids.push(id);
        }
    }
    code
}

/// The distinct ids written to `mem` since it was last emptied.
fn recorded(mem: *mut libgit2_sys::git_odb_backend) -> Vec<Oid> {
    let mut ids = written().get(&(mem as usize)).cloned().unwrap_or_default();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Forget what `mem` recorded: emptied (`keep`: it goes on recording) or dropped.
fn forget_writes(mem: *mut libgit2_sys::git_odb_backend, keep: bool) {
    let mut w = written();
    if keep {
        if let Some(ids) = w.get_mut(&(mem as usize)) {
            ids.clear();
        }
    } else {
        w.remove(&(mem as usize));
    }
}

/// Which files of a worktree go into their blobs byte for byte, told without asking
/// libgit2, whose filter lookup for each file reads every `.gitattributes` on its way
/// and makes each path canonical with `realpath` (the profile: bench/results.md). A file
/// is plain when nothing could give it a filter: no attributes file outside the
/// worktree (`core.attributesFile` or the user's `~/.config/git/attributes`, the
/// system's `gitattributes`, the repository's `info/attributes`), no `core.autocrlf`,
/// and no `.gitattributes` in its directory or any above it, on disk or in the index
/// (git reads both when it adds a file). Anything else, or anything that cannot be
/// told, goes through libgit2 as before.
pub(crate) struct Plain<'i> {
    workdir: std::path::PathBuf,
    index: &'i git2::Index,
    /// Some source outside the worktree could apply a filter to any file.
    anywhere: bool,
    /// Directories (relative to the worktree, `""` for its top) that have a
    /// `.gitattributes`.
    dirs: std::collections::HashMap<std::path::PathBuf, bool>,
}

impl<'i> Plain<'i> {
    pub fn new(repo: &Repository, workdir: &Path, index: &'i git2::Index) -> Plain<'i> {
        Plain {
            workdir: workdir.to_path_buf(),
            index,
            anywhere: filters_from_outside(repo),
            dirs: std::collections::HashMap::new(),
        }
    }

    /// Whether the file at `full` (in the worktree) is plain.
    pub fn is_plain(&mut self, full: &Path) -> bool {
        if self.anywhere {
            return false;
        }
        let Ok(rel) = full.strip_prefix(&self.workdir) else {
            return false;
        };
        let mut dir = rel.parent();
        while let Some(d) = dir {
            if self.has_attributes(d) {
                return false;
            }
            dir = d.parent();
        }
        true
    }

    fn has_attributes(&mut self, dir: &Path) -> bool {
        if let Some(&has) = self.dirs.get(dir) {
            return has;
        }
        let file = dir.join(".gitattributes");
        let has = match std::fs::symlink_metadata(self.workdir.join(&file)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.index.get_path(&file, 0).is_some()
            }
            // There, or cannot be told.
            _ => true,
        };
        self.dirs.insert(dir.to_path_buf(), has);
        has
    }
}

/// Whether a filter could come from outside the worktree (see [`Plain`]).
fn filters_from_outside(repo: &Repository) -> bool {
    let Ok(cfg) = repo.config().and_then(|mut c| c.snapshot()) else {
        return true;
    };
    match cfg.get_string("core.autocrlf") {
        Ok(v)
            if !matches!(
                v.to_ascii_lowercase().as_str(),
                "false" | "no" | "off" | "0"
            ) =>
        {
            return true;
        }
        Err(e) if e.code() != git2::ErrorCode::NotFound => return true,
        _ => {}
    }
    let there = |p: &Path| !matches!(std::fs::symlink_metadata(p), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
    match cfg.get_path("core.attributesfile") {
        Ok(p) if there(&p) => return true,
        Ok(_) => {}
        Err(e) if e.code() != git2::ErrorCode::NotFound => return true,
        // libgit2's default: `attributes` in its XDG directory.
        Err(_) => {
            if search_path_has(git2::ConfigLevel::XDG, "attributes", there) {
                return true;
            }
        }
    }
    if search_path_has(git2::ConfigLevel::System, "gitattributes", there) {
        return true;
    }
    there(&repo.path().join("info/attributes")) || there(&repo.commondir().join("info/attributes"))
}

/// Whether `name` is in one of libgit2's search directories of `level` (true when the
/// directories cannot be told).
fn search_path_has(level: git2::ConfigLevel, name: &str, there: impl Fn(&Path) -> bool) -> bool {
    // SAFETY: reads a process-wide libgit2 setting.
    let Ok(dirs) = (unsafe { git2::opts::get_search_path(level) }) else {
        return true;
    };
    let dirs = std::ffi::OsStr::from_bytes(dirs.as_bytes());
    std::env::split_paths(dirs).any(|d| !d.as_os_str().is_empty() && there(&d.join(name)))
}

/// A pack builder of `repo` that looks for no deltas. A save's new objects are changed
/// files and their trees, which rarely delta against each other, and the search tries
/// every object of 50 bytes or more against the ten before it (the cost: the CPU per
/// repository row of scripts/bench, bench/results.md). libgit2 has no switch for it; its threshold above which
/// an object is not deltified is read from the repository's config at the builder's
/// creation (from `pack.deltaCacheSize`, a slip of libgit2's: git's `bigFileThreshold`),
/// so the builder is made while the repository handle sees a config of one in-memory
/// entry setting it to 0. The handle's own config is put back at once; the
/// repository's files are never touched.
fn packbuilder_without_deltas(repo: &Repository) -> Result<git2::PackBuilder<'_>, git2::Error> {
    const NO_DELTAS: &str = "[pack]\n\tdeltaCacheSize = 0\n";
    let own = repo.config()?;
    let mut raw = std::ptr::null_mut();
    // SAFETY: a valid out-pointer; the new config is owned by `plain` from here on.
    check(unsafe { libgit2_sys::git_config_new(&mut raw) })?;
    // SAFETY: `raw` is the live config just made.
    let plain = unsafe { git2::Config::from_raw(raw) };
    let mut backend = std::ptr::null_mut();
    // SAFETY: the text and its length describe a live string; a valid out-pointer.
    check(unsafe {
        git_config_backend_from_string(
            &mut backend,
            NO_DELTAS.as_ptr().cast(),
            NO_DELTAS.len(),
            std::ptr::null_mut(),
        )
    })?;
    // SAFETY: live config, backend and repository; on success the config owns the
    // backend, on failure it is freed here, through its own free function.
    let added = unsafe {
        libgit2_sys::git_config_add_backend(
            plain.raw(),
            backend,
            libgit2_sys::GIT_CONFIG_LEVEL_APP,
            repo.raw(),
            0,
        )
    };
    if added < 0 {
        // SAFETY: the backend was not taken by the config; `free` is set by its
        // constructor.
        unsafe {
            if let Some(free) = (*backend).free {
                free(backend);
            }
        }
        return Err(git2::Error::last_error(added));
    }
    // SAFETY: both configs are live; the repository takes its own reference to each.
    check(unsafe { libgit2_sys::git_repository_set_config(repo.raw(), plain.raw()) })?;
    let pb = repo.packbuilder();
    // SAFETY: as above; this puts back the config the handle had.
    let back = check(unsafe { libgit2_sys::git_repository_set_config(repo.raw(), own.raw()) });
    let pb = pb?;
    back?;
    Ok(pb)
}

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
pub(crate) mod tests {
    use super::*;

    /// `n` bytes deflate cannot shrink (xorshift64 from `seed`).
    pub(crate) fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

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
            let id = staged.blob_from_file(&p, 7, false).unwrap();
            tb.insert(format!("f{i}"), id, 0o100644).unwrap();
        }
        let same = staged
            .blob_from_file(&dir.path().join("same"), 13, false)
            .unwrap();
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
        assert_eq!(
            repo.find_tree(tree).unwrap().len(),
            21,
            "the same handle reads it"
        );
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

    /// A file is plain only when no `.gitattributes` above it (on disk or in the index),
    /// no `info/attributes` and no `core.autocrlf` could give it a filter; a plain file's
    /// blob is what git makes of it.
    #[test]
    fn plain_files_are_told_from_every_source_of_attributes() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path();
        let repo = Repository::init(w).unwrap();
        std::fs::create_dir_all(w.join("a/b")).unwrap();
        std::fs::create_dir_all(w.join("i")).unwrap();
        for f in ["top.txt", "a/b/c.txt", "i/d.txt"] {
            std::fs::write(w.join(f), "crlf\r\nline\r\n").unwrap();
        }
        let index = repo.index().unwrap();
        let plain = |index: &git2::Index, f: &str| Plain::new(&repo, w, index).is_plain(&w.join(f));
        assert!(plain(&index, "top.txt") && plain(&index, "a/b/c.txt") && plain(&index, "i/d.txt"));

        // The blob of a plain file is git's.
        let odb = repo.odb().unwrap();
        let mut staged = Staged::attach(&repo, &odb).unwrap();
        let id = staged
            .blob_from_file(&w.join("a/b/c.txt"), 12, true)
            .unwrap();
        staged.flush().unwrap();
        drop(staged);
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(w)
            .args(["hash-object", "a/b/c.txt"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), id.to_string());

        // On disk, two levels up.
        std::fs::write(w.join("a/.gitattributes"), "*.txt text eol=lf\n").unwrap();
        assert!(!plain(&index, "a/b/c.txt"));
        assert!(plain(&index, "top.txt") && plain(&index, "i/d.txt"));
        // In the index only (deleted from disk, not yet from the index).
        let mut index = repo.index().unwrap();
        let entry = git2::IndexEntry {
            ctime: git2::IndexTime::new(0, 0),
            mtime: git2::IndexTime::new(0, 0),
            dev: 0,
            ino: 0,
            mode: 0o100644,
            uid: 0,
            gid: 0,
            file_size: 0,
            id: Oid::ZERO_SHA1,
            flags: 0,
            flags_extended: 0,
            path: b"i/.gitattributes".to_vec(),
        };
        index.add_frombuffer(&entry, b"*.txt text\n").unwrap();
        assert!(!plain(&index, "i/d.txt"));
        assert!(plain(&index, "top.txt"));
        // Outside the worktree: the repository's info/attributes, core.autocrlf.
        std::fs::create_dir_all(w.join(".git/info")).unwrap();
        std::fs::write(w.join(".git/info/attributes"), "*.txt text\n").unwrap();
        assert!(!plain(&index, "top.txt"));
        std::fs::remove_file(w.join(".git/info/attributes")).unwrap();
        assert!(plain(&index, "top.txt"));
        repo.config()
            .unwrap()
            .set_str("core.autocrlf", "input")
            .unwrap();
        assert!(!plain(&index, "top.txt"));
        repo.config()
            .unwrap()
            .set_bool("core.autocrlf", false)
            .unwrap();
        assert!(plain(&index, "top.txt"));
    }

    /// Similar files, which libgit2 would store as deltas of each other, go into the
    /// pack whole, and the repository handle keeps its own config.
    #[test]
    fn a_flush_libgit2_packs_looks_for_no_deltas_and_the_handle_keeps_its_config() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(dir.path()).unwrap();
        repo.config().unwrap().set_str("user.name", "Own").unwrap();
        let page: String = (0..100)
            .map(|l| format!("line {l} of a long file\n"))
            .collect();
        let odb = repo.odb().unwrap();
        let mut staged = Staged::attach(&repo, &odb).unwrap();
        staged.unpack_limit = 10;
        for i in 0..20 {
            let p = dir.path().join(format!("f{i}"));
            std::fs::write(&p, format!("{page}only in file {i}\n")).unwrap();
            let len = std::fs::metadata(&p).unwrap().len();
            staged.blob_from_file(&p, len, true).unwrap();
        }
        // Without the record of what was staged, the flush falls back to libgit2's
        // pack builder.
        forget_writes(staged.mem.raw(), true);
        assert_eq!(staged.flush().unwrap(), 20);
        let cfg = repo.config().unwrap().snapshot().unwrap();
        assert_eq!(cfg.get_string("user.name").unwrap(), "Own");
        assert!(cfg.get_i64("pack.deltacachesize").is_err());
        drop(staged);

        let pack = packs(&repo)
            .into_iter()
            .find(|f| f.ends_with(".idx"))
            .unwrap();
        let out = std::process::Command::new("git")
            .arg("verify-pack")
            .arg("-v")
            .arg(repo.path().join("objects/pack").join(pack))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        // A delta's line names its base: seven fields instead of five.
        let blobs: Vec<&str> = text.lines().filter(|l| l.contains(" blob ")).collect();
        assert_eq!(blobs.len(), 20, "{text}");
        assert!(
            blobs.iter().all(|l| l.split_whitespace().count() == 5),
            "no blob is a delta: {text}"
        );
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
            ids.push(staged.blob_from_file(&p, 8, false).unwrap());
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

        // Another repository's staged objects, alive meanwhile, are its own.
        let other_dir = tempfile::tempdir().unwrap();
        let other = Repository::init(other_dir.path()).unwrap();
        let other_odb = other.odb().unwrap();
        let mut other_staged = Staged::attach(&other, &other_odb).unwrap();
        std::fs::write(other_dir.path().join("o"), "other\n").unwrap();
        other_staged
            .blob_from_file(&other_dir.path().join("o"), 6, false)
            .unwrap();

        // A second flush writes what was staged since the first: a blob, and the
        // commit libgit2 itself wrote.
        let p = dir.path().join("late");
        std::fs::write(&p, "late\n").unwrap();
        staged.blob_from_file(&p, 5, false).unwrap();
        let sig = git2::Signature::now("t", "t@example.com").unwrap();
        let commit = repo
            .commit(None, &sig, &sig, "m", &repo.find_tree(tree).unwrap(), &[])
            .unwrap();
        assert_eq!(staged.pending(), 2);
        assert_eq!(staged.flush().unwrap(), 2);
        assert_eq!(loose_count(&repo), 8);
        assert!(packs(&repo).is_empty(), "every write was recorded: no pack");
        assert_eq!(loose_count(&other), 0, "the other's object stays staged");
        assert_eq!(other_staged.flush().unwrap(), 1);
        assert_eq!(loose_count(&other), 1);
        assert!(packs(&other).is_empty());
        drop(staged);
        drop(odb);
        drop(repo);
        let out = std::process::Command::new("git")
            .args(["-C", &dir.path().display().to_string(), "fsck", "--strict"])
            .arg(commit.to_string())
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
        let random = random_bytes(n, 0x2545_F491_4F6C_DD1D);
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
                .blob_from_file(&dir.path().join(name), n as u64, false)
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
        let id = staged.blob_from_file(&big, LARGE_BLOB, false).unwrap();
        assert_eq!(staged.pending(), 0, "a large blob is not held in memory");
        assert_eq!(loose_count(&repo), 1);
        assert!(repo.find_blob(id).is_ok());

        // Staged content past the bound is packed at once.
        staged.flush_at = 100;
        staged.unpack_limit = 0;
        for i in 0..4u8 {
            let p = dir.path().join(format!("m{i}"));
            std::fs::write(&p, vec![b'a' + i; 24]).unwrap();
            staged.blob_from_file(&p, 24, false).unwrap();
            staged.flush_if_full().unwrap();
        }
        assert_eq!(staged.pending(), 4, "under the bound: still staged");
        let p = dir.path().join("m4");
        std::fs::write(&p, vec![b'z'; 24]).unwrap();
        staged.blob_from_file(&p, 24, false).unwrap();
        staged.flush_if_full().unwrap();
        assert_eq!(staged.pending(), 0, "past the bound: flushed");
        assert_eq!(loose_count(&repo), 1, "only the large blob is loose");
        assert_eq!(packs(&repo).len(), 2);
    }
}
