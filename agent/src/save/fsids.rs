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

/// Let libgit2 open repositories owned by another user (it refuses by default): a root
/// daemon saves every user's repositories. Only relaxed when running as root.
pub fn allow_foreign_owners() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: geteuid has no preconditions; the libgit2 option is set once, before
        // any repository is opened by the save.
        unsafe {
            if libc::geteuid() == 0 {
                let _ = git2::opts::set_verify_owner_validation(false);
            }
        }
    });
}
