//! Doing a repository's git work as the repository's owner.
//!
//! A root daemon that writes objects or refs into a user's `.git` would leave root-owned
//! files there that the user's own git then cannot update. Linux's filesystem ids are
//! per thread, so a blocking thread can take the owner's uid/gid for file creation and
//! access checks ([`AsOwner`]) without affecting any other thread of the daemon.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

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
