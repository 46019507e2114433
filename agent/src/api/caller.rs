//! Who is calling the local API, and doing what they ask with their own permissions.
//!
//! The API acts for the *calling* user, known by the connection's peer credentials
//! (`SO_PEERCRED`, `SO_PEERGROUPS`). Root has full access. For a root daemon serving
//! another user (`daemon.api_user`), what a request names is read with that user's own
//! permissions: the checks here run on a blocking thread holding the caller's filesystem
//! ids and groups ([`crate::save::fsids::AsOwner`]), so the kernel applies the user's
//! permissions, and a file is opened without following a link in its last component. A
//! user can thus save, and read the logs of, only what that user could read themself.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::save::fsids::{AsOwner, Ids, Role};

/// `SO_PEERGROUPS` (Linux 4.13; the value of every architecture wsagent is built for).
const SO_PEERGROUPS: libc::c_int = 59;

/// The user at the other end of an API connection.
#[derive(Clone, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the peer's own when the kernel tells them, else the user
    /// database's).
    pub groups: Vec<u32>,
}

impl Caller {
    /// The peer of a unix-socket connection; `None` when the kernel does not say.
    pub fn of(stream: &tokio::net::UnixStream) -> Option<Caller> {
        let cred = stream.peer_cred().ok()?;
        let (uid, gid) = (cred.uid(), cred.gid());
        let groups =
            peer_groups(stream.as_raw_fd()).unwrap_or_else(|| Ids::of_user(uid, gid).groups);
        Some(Caller { uid, gid, groups })
    }

    /// Whether this caller's requests are checked with its own permissions: anyone but
    /// root, when the daemon runs as root. (A daemon that is not root serves only root
    /// and its own uid, and has no more rights than that uid.)
    pub fn is_limited(&self) -> bool {
        // SAFETY: geteuid has no preconditions.
        self.uid != 0 && unsafe { libc::geteuid() } == 0
    }

    pub fn ids(&self) -> Ids {
        Ids {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
        }
    }

    /// Run `f` on this thread with the caller's filesystem ids (a no-op for a caller
    /// that is not limited). Call it on a blocking thread.
    fn with_ids<T>(&self, f: impl FnOnce() -> T) -> T {
        let _ids = self
            .is_limited()
            .then(|| AsOwner::take(&self.ids(), Role::Caller));
        f()
    }
}

fn peer_groups(fd: std::os::fd::RawFd) -> Option<Vec<u32>> {
    let mut buf: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..2 {
        let mut len = (buf.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the buffer is valid for `len` bytes; the kernel writes at most that.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            buf.truncate(n);
            return Some(buf);
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) {
            return None;
        }
        // Too small: the kernel said how much is needed.
        buf = vec![0; n.max(buf.len() * 2)];
    }
    None
}

/// Why a request was refused for this caller (HTTP 403).
#[derive(Debug, thiserror::Error)]
#[error("permission denied: uid {uid} may not {what} {path}: {reason}")]
pub struct Denied {
    pub uid: u32,
    pub what: &'static str,
    pub path: PathBuf,
    pub reason: String,
}

/// The repository containing `path` (its worktree, or its git directory when bare), if
/// the caller may read it: the worktree, the git directory and the objects must all be
/// readable with the caller's permissions. `Ok(None)`: no repository there. Blocking.
pub fn readable_repo(caller: &Caller, path: &Path) -> Result<Option<PathBuf>, Denied> {
    let denied = |reason: String| Denied {
        uid: caller.uid,
        what: "save",
        path: path.to_path_buf(),
        reason,
    };
    caller.with_ids(|| {
        // libgit2 says "not found" for a directory it may not read: ask the kernel first.
        if let Err(e) = std::fs::metadata(path)
            && e.kind() == std::io::ErrorKind::PermissionDenied
        {
            return Err(denied(e.to_string()));
        }
        let repo = match git2::Repository::discover(path) {
            Ok(r) => r,
            Err(e) if e.code() == git2::ErrorCode::NotFound => return Ok(None),
            Err(e) => return Err(denied(e.message().to_string())),
        };
        let mut dirs = vec![repo.path().to_path_buf(), repo.commondir().join("objects")];
        dirs.extend(repo.workdir().map(Path::to_path_buf));
        for d in &dirs {
            if let Err(e) = std::fs::read_dir(d) {
                return Err(denied(format!("{}: {e}", d.display())));
            }
        }
        let top = repo.workdir().unwrap_or(repo.path());
        std::fs::canonicalize(top)
            .map(Some)
            .map_err(|e| denied(format!("{}: {e}", top.display())))
    })
}

/// A file's identity: device and inode.
pub type FileId = (u64, u64);

/// The last `n` lines of a service's log `path` (its newest rotated file `path.1` first),
/// for this caller. A file is opened without following a link; a link or anything but a
/// regular file is refused. Root reads any regular file; another caller a file the daemon
/// itself writes (`own`: the identities of the log files it has open or rotated), or one
/// it can open with its own permissions. Blocking.
pub fn read_log(
    caller: &Caller,
    path: &Path,
    own: &[FileId],
    n: usize,
) -> Result<Vec<String>, Denied> {
    let rotated = PathBuf::from(format!("{}.1", path.display()));
    let mut lines = Vec::new();
    for p in [rotated.as_path(), path] {
        let Some(bytes) = read_own_file(caller, p, own)? else {
            continue;
        };
        lines.extend(String::from_utf8_lossy(&bytes).lines().map(String::from));
    }
    let skip = lines.len().saturating_sub(n);
    Ok(lines.split_off(skip))
}

fn open_nofollow(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        // No link followed, no FIFO waited on, no terminal taken.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
}

/// The whole content of the log file `path`; `None` when there is none.
fn read_own_file(caller: &Caller, path: &Path, own: &[FileId]) -> Result<Option<Vec<u8>>, Denied> {
    let denied = |reason: String| Denied {
        uid: caller.uid,
        what: "read the log",
        path: path.to_path_buf(),
        reason,
    };
    let file = match open_nofollow(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(denied(
                "it is a symbolic link, not the log file wsagent writes".into(),
            ));
        }
        Err(e) => return Err(denied(e.to_string())),
    };
    let md = file.metadata().map_err(|e| denied(e.to_string()))?;
    if !md.file_type().is_file() {
        return Err(denied(
            "it is not a regular file, not the log file wsagent writes".into(),
        ));
    }
    let id = (md.dev(), md.ino());
    let mut file = if !caller.is_limited() || own.contains(&id) {
        file
    } else {
        // Not a file the daemon writes: shown only if the caller could read it anyway.
        match caller.with_ids(|| open_nofollow(path)) {
            Ok(f) if f.metadata().is_ok_and(|m| (m.dev(), m.ino()) == id) => f,
            Ok(_) => return Err(denied("it changed while being opened".into())),
            Err(e) => {
                return Err(denied(format!(
                    "{e}; it is not a log file this daemon writes"
                )));
            }
        }
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| denied(e.to_string()))?;
    Ok(Some(bytes))
}
