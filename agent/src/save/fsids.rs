//! Doing a repository's git work as the repository's owner.
//!
//! A root daemon that writes objects or refs into a user's `.git` would leave root-owned
//! files there that the user's own git then cannot update. Linux's filesystem ids are
//! per thread, so a blocking thread can take the owner's uid/gid for file creation and
//! access checks ([`AsOwner`]) without affecting any other thread of the daemon.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// While alive, this thread's filesystem uid/gid are the owner's; restored on drop.
#[must_use]
pub struct AsOwner {
    prev: Option<(libc::uid_t, libc::gid_t)>,
}

impl AsOwner {
    /// Take the uid/gid owning `git_dir` when running as root and they differ; a no-op
    /// otherwise.
    pub fn of(git_dir: &Path) -> AsOwner {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        let Ok(md) = std::fs::metadata(git_dir) else {
            return AsOwner { prev: None };
        };
        if euid != 0 || md.uid() == 0 {
            return AsOwner { prev: None };
        }
        // SAFETY: setfsuid/setfsgid only change this thread's filesystem ids; the
        // previous values they return are restored in Drop.
        let prev = unsafe {
            let g = libc::setfsgid(md.gid()) as libc::gid_t;
            let u = libc::setfsuid(md.uid()) as libc::uid_t;
            (u, g)
        };
        AsOwner { prev: Some(prev) }
    }

    pub fn active(&self) -> bool {
        self.prev.is_some()
    }

    /// Whether the owner can reach `path` at all: with the owner's ids, a directory on
    /// the way that the owner may not search (say an image whose `/` is mode 0700)
    /// makes every access fail with "Permission denied", which would otherwise surface
    /// as a baffling error about some file deep inside `.git`. Names the directory.
    pub fn check_reachable(&self, path: &Path) -> Result<(), Unreachable> {
        if !self.active() {
            return Ok(());
        }
        let path: PathBuf = path.components().collect();
        let path = path.as_path();
        match std::fs::symlink_metadata(path) {
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {}
            _ => return Ok(()),
        }
        // The first directory, from `/` down, whose entries the owner may not look up.
        let mut blocker = PathBuf::from("/");
        for p in path.ancestors().collect::<Vec<_>>().into_iter().rev() {
            match std::fs::symlink_metadata(p) {
                Ok(_) => blocker = p.to_path_buf(),
                Err(_) => break,
            }
        }
        // The ids are the owner's for this thread: read the blocker's mode with root's.
        let md = {
            let _root = AsRoot::new();
            std::fs::symlink_metadata(&blocker).ok()
        };
        // SAFETY: setfsuid(-1) changes nothing and returns the current fsuid.
        let uid = unsafe { libc::setfsuid(u32::MAX) } as u32;
        Err(Unreachable {
            path: path.to_path_buf(),
            blocker,
            uid,
            mode: md.as_ref().map(|m| m.mode() & 0o7777),
            owner: md.as_ref().map(|m| m.uid()),
        })
    }
}

/// The repository's owner cannot reach it: see [`AsOwner::check_reachable`].
#[derive(Debug, thiserror::Error)]
#[error(
    "uid {uid}, the owner of {path}, cannot reach it: {blocker} is not searchable by that user{}; \
     wsagent works on a repository with its owner's permissions, so the owner must be able to \
     reach it (check the modes of the image's or the volume's directories)",
    match (mode, owner) { (Some(m), Some(o)) => format!(" (mode {m:04o}, owner uid {o})"), _ => String::new() }
)]
pub struct Unreachable {
    pub path: PathBuf,
    pub blocker: PathBuf,
    pub uid: u32,
    pub mode: Option<u32>,
    pub owner: Option<u32>,
}

/// Root's filesystem ids for this thread while alive (inside an [`AsOwner`]).
struct AsRoot {
    prev: (libc::uid_t, libc::gid_t),
}

impl AsRoot {
    fn new() -> AsRoot {
        // SAFETY: as in AsOwner::of; restored in Drop.
        let prev = unsafe {
            let u = libc::setfsuid(0) as libc::uid_t;
            let g = libc::setfsgid(0) as libc::gid_t;
            (u, g)
        };
        AsRoot { prev }
    }
}

impl Drop for AsRoot {
    fn drop(&mut self) {
        // SAFETY: see AsOwner::of.
        unsafe {
            libc::setfsgid(self.prev.1);
            libc::setfsuid(self.prev.0);
        }
    }
}

impl Drop for AsOwner {
    fn drop(&mut self) {
        if let Some((u, g)) = self.prev.take() {
            // SAFETY: see AsOwner::of.
            unsafe {
                libc::setfsuid(u);
                libc::setfsgid(g);
            }
        }
    }
}

/// Prepare libgit2 for a root daemon working on a user's repositories: let it open
/// repositories owned by another user (it refuses by default), and read the user's
/// global git config (`<home>/.gitconfig`, `<home>/.config/git/config`) instead of
/// root's, which the owner's filesystem ids could not even stat. Both settings are
/// process-wide, so they are only made when running as root. A no-op otherwise.
pub fn prepare_for_root(home: &Path) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    // SAFETY: process-wide libgit2 settings, made before this save opens repositories;
    // libgit2 reads them when it next loads a repository's config.
    unsafe {
        let _ = git2::opts::set_verify_owner_validation(false);
        let _ = git2::opts::set_search_path(git2::ConfigLevel::Global, home);
        let _ = git2::opts::set_search_path(git2::ConfigLevel::XDG, home.join(".config/git"));
    }
}
