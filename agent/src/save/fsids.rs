//! Doing a repository's git work as the repository's owner, or as the user who asked.
//!
//! A root daemon that writes objects or refs into a user's `.git` would leave root-owned
//! files there that the user's own git then cannot update. Linux's filesystem ids (and
//! credentials in general) are per thread, so a blocking thread can take the owner's
//! uid/gid and supplementary groups for file creation and access checks ([`AsOwner`])
//! without affecting any other thread of the daemon: the kernel then applies that user's
//! own permissions to every file the thread opens.
//!
//! Whose ids: the user who asked through the local API when the request names what to
//! save (`wsagent save --repo`, a dry run: [`Ids`] of the caller); else the owner of the
//! worktree, when a user owns it or its `.git` entry, since that user chose what the
//! `.git` points at (a `.git` *file* may name any git directory, root's included); else
//! the owner of the git directory.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A user's filesystem identity: uid, primary gid, supplementary groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Ids {
    /// `uid` with primary group `gid` and the supplementary groups the user database
    /// gives it (just `gid` when the uid has no entry).
    pub fn of_user(uid: u32, gid: u32) -> Ids {
        let groups = nix::unistd::User::from_uid(uid.into())
            .ok()
            .flatten()
            .and_then(|u| std::ffi::CString::new(u.name).ok())
            .and_then(|name| nix::unistd::getgrouplist(&name, gid.into()).ok())
            .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_else(|| vec![gid]);
        Ids { uid, gid, groups }
    }
}

/// This thread's supplementary groups, set with the raw system call: glibc's
/// `setgroups` changes every thread of the process, the kernel's only the caller.
fn set_thread_groups(groups: &[libc::gid_t]) -> std::io::Result<()> {
    // SAFETY: the pointer and length describe a live slice of gid_t.
    let r = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn thread_groups() -> Vec<libc::gid_t> {
    nix::unistd::getgroups()
        .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_default()
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// The owner of `path` itself (a link is not followed).
fn owner(path: &Path) -> Option<(u32, u32)> {
    let path: PathBuf = path.components().collect();
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.uid(), m.gid()))
}

/// While alive, this thread's filesystem uid/gid and groups are another user's;
/// restored on drop.
#[must_use]
pub struct AsOwner {
    prev: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    /// How the error of [`AsOwner::check_reachable`] names this user.
    role: Role,
}

/// Why a thread has a user's ids: that user owns the work, or asked for it.
#[derive(Clone, Debug)]
pub enum Role {
    /// The owner of this path (the worktree, or the git directory).
    OwnerOf(PathBuf),
    /// The user who asked through the local API.
    Caller,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::OwnerOf(p) => write!(f, "the owner of {}", p.display()),
            Role::Caller => f.write_str("the user who asked for this save"),
        }
    }
}

impl AsOwner {
    /// Take the uid/gid owning `git_dir` when running as root and they differ; a no-op
    /// otherwise.
    pub fn of(git_dir: &Path) -> AsOwner {
        match owner(git_dir) {
            Some((uid, gid)) if uid != 0 => Self::take(
                &Ids::of_user(uid, gid),
                Role::OwnerOf(git_dir.to_path_buf()),
            ),
            _ => AsOwner::none(),
        }
    }

    /// The ids a save of `repo` works with: `act_as` when given (the user who asked),
    /// else the owner of the worktree or of its `.git` entry when that is a user (not
    /// root), else the owner of the git directory. See the module documentation.
    pub fn of_repo(repo: &git2::Repository, act_as: Option<&Ids>) -> AsOwner {
        if let Some(ids) = act_as {
            return Self::take(ids, Role::Caller);
        }
        if let Some(wd) = repo.workdir() {
            let wd: PathBuf = wd.components().collect();
            for p in [wd.clone(), wd.join(".git")] {
                if let Some((uid, gid)) = owner(&p).filter(|(u, _)| *u != 0) {
                    return Self::take(&Ids::of_user(uid, gid), Role::OwnerOf(wd));
                }
            }
        }
        Self::of(repo.commondir())
    }

    /// Take `ids` when running as root (a no-op otherwise: a daemon that is not root
    /// already has no more rights than the user it serves).
    pub fn take(ids: &Ids, role: Role) -> AsOwner {
        if euid() != 0 || ids.uid == 0 {
            return AsOwner { prev: None, role };
        }
        let groups = thread_groups();
        if let Err(e) = set_thread_groups(&ids.groups) {
            // Without the groups the ids would keep root's: refuse every access instead.
            tracing::error!(error = %e, "cannot take the supplementary groups of uid {}", ids.uid);
            let _ = set_thread_groups(&[]);
        }
        // SAFETY: setfsuid/setfsgid only change this thread's filesystem ids; the
        // previous values they return are restored in Drop. A nonzero fsuid drops the
        // filesystem capabilities (DAC override) from the thread's effective set.
        let prev = unsafe {
            let g = libc::setfsgid(ids.gid) as libc::gid_t;
            let u = libc::setfsuid(ids.uid) as libc::uid_t;
            (u, g, groups)
        };
        AsOwner {
            prev: Some(prev),
            role,
        }
    }

    fn none() -> AsOwner {
        AsOwner {
            prev: None,
            role: Role::Caller,
        }
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
            who: self.role.to_string(),
            path: path.to_path_buf(),
            blocker,
            uid,
            mode: md.as_ref().map(|m| m.mode() & 0o7777),
            owner: md.as_ref().map(|m| m.uid()),
        })
    }
}

/// The user whose ids a save uses cannot reach the repository: see
/// [`AsOwner::check_reachable`].
#[derive(Debug, thiserror::Error)]
#[error(
    "uid {uid}, {who}, cannot reach {path}: {blocker} is not searchable by that user{}; \
     wsagent works on a repository with its owner's permissions (or those of the user who \
     asked), so that user must be able to reach it (check the modes of the image's or the \
     volume's directories, and where a `.git` file points)",
    match (mode, owner) { (Some(m), Some(o)) => format!(" (mode {m:04o}, owner uid {o})"), _ => String::new() }
)]
pub struct Unreachable {
    /// How the user is named: "the owner of PATH", "the user who asked for this save".
    pub who: String,
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
        // SAFETY: as in AsOwner::take; restored in Drop.
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
        // SAFETY: see AsOwner::take.
        unsafe {
            libc::setfsgid(self.prev.1);
            libc::setfsuid(self.prev.0);
        }
    }
}

impl Drop for AsOwner {
    fn drop(&mut self) {
        if let Some((u, g, groups)) = self.prev.take() {
            // SAFETY: see AsOwner::take.
            unsafe {
                libc::setfsuid(u);
                libc::setfsgid(g);
            }
            if let Err(e) = set_thread_groups(&groups) {
                tracing::error!(error = %e, "cannot restore this thread's groups");
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
