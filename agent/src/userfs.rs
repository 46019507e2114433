//! The one place where a root daemon touches files in the workspace user's HOME.
//!
//! wsagent runs as root while the user owns HOME (a persistent volume that outlives the
//! container): everything there, a symbolic link included, is the user's input. The rule
//! this module enforces (ARCHITECTURE.md, *Invariants*): **root never follows the user's
//! links.** Every file operation under HOME is done either
//!
//! - with the user's own filesystem ids (`setfsuid`/`setfsgid` and the user's group as
//!   the only supplementary group, per thread, see [`as_user`]): the kernel applies the
//!   user's permissions, so a link to `/etc/passwd` is the user's link followed by the
//!   user, and fails as it would for them; or
//! - relative to a directory file descriptor reached from HOME without following any
//!   link (`openat(O_NOFOLLOW | O_DIRECTORY)` at every step), with `O_NOFOLLOW` /
//!   `AT_SYMLINK_NOFOLLOW` on the last component, when that directory belongs to root
//!   (say a root-owned HOME): root creates there and gives what it created to the user
//!   (`fchown` of the new descriptor, never a path walk).
//!
//! Which user: the realm set by [`set_realm`] (the daemon calls it at start and at each
//! startup pipeline): `startup.user` when configured, else the owner of HOME. Only a root
//! daemon has a realm; otherwise every function here is the plain operation by path,
//! still refusing a link as the last component where it opens a file. Paths outside HOME
//! are the administrator's and are used as the daemon, as before.
//!
//! Files are opened with `O_NONBLOCK` first (a fifo planted where a log goes must not
//! hang the daemon) and must be regular files. A file the daemon creates goes to a fresh
//! random temporary name with `O_EXCL` and is renamed into place ([`write_atomic`]).
//!
//! The API is small on purpose: [`ensure_dir`], [`private_dir`], [`create`],
//! [`open_append`], [`write_atomic`], [`rename`], [`remove_file`], [`remove_dir_all`],
//! [`symlink`], [`open_read`] / [`read`], [`open_read_as`] (a read on behalf of a given
//! uid, for the local API), and [`as_user`] / [`user_for`] for work that is not one file
//! operation (libgit2 cloning into HOME).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::RwLock;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};

/// A user's uid and primary gid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
}

struct Realm {
    home: PathBuf,
    user: Ids,
}

static REALM: RwLock<Option<Realm>> = RwLock::new(None);

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Declare HOME and its user: `user`, else the owner of `home`. Only takes effect when
/// running as root and the user is not root; otherwise clears the realm.
pub fn set_realm(home: &Path, user: Option<Ids>) {
    let user = user.or_else(|| {
        std::fs::metadata(home).ok().map(|m| Ids {
            uid: m.uid(),
            gid: m.gid(),
        })
    });
    let realm = match user {
        Some(u) if euid() == 0 && u.uid != 0 => Some(Realm {
            home: lexical(home),
            user: u,
        }),
        _ => None,
    };
    *REALM.write().unwrap_or_else(|e| e.into_inner()) = realm;
}

/// `path` with `.` and repeated separators removed (no link is resolved).
fn lexical(path: &Path) -> PathBuf {
    path.components().collect()
}

/// HOME, `path` relative to it, and the user, when `path` is in the user's realm.
fn realm_for(path: &Path) -> Option<(PathBuf, PathBuf, Ids)> {
    let realm = REALM.read().unwrap_or_else(|e| e.into_inner());
    let r = realm.as_ref()?;
    if euid() != 0 {
        return None;
    }
    let p = lexical(path);
    let rel = p.strip_prefix(&r.home).ok()?.to_path_buf();
    Some((r.home.clone(), rel, r.user))
}

/// The user whose ids apply to `path`: `Some` when a root daemon has a realm and `path`
/// is under its HOME.
pub fn user_for(path: &Path) -> Option<Ids> {
    realm_for(path).map(|(_, _, u)| u)
}

/// This thread's filesystem ids and groups are the user's while alive. Not `Send`: it
/// must never cross an `await` (the ids are the thread's, not the task's).
struct Switch {
    prev: Option<(u32, u32, Vec<libc::gid_t>)>,
    _not_send: std::marker::PhantomData<*const ()>,
}

fn switch(ids: Option<Ids>) -> io::Result<Switch> {
    let none = Switch {
        prev: None,
        _not_send: Default::default(),
    };
    let Some(ids) = ids else { return Ok(none) };
    if euid() != 0 {
        return Ok(none);
    }
    // SAFETY: getgroups/setgroups/setfsuid/setfsgid only read or change this thread's
    // credentials (setgroups through the raw syscall: glibc's wrapper would change every
    // thread of the process); the previous values are restored in Drop.
    unsafe {
        let n = libc::getgroups(0, std::ptr::null_mut());
        let mut groups = vec![0 as libc::gid_t; n.max(0) as usize];
        if n > 0 && libc::getgroups(n, groups.as_mut_ptr()) < 0 {
            return Err(io::Error::last_os_error());
        }
        let only: [libc::gid_t; 1] = [ids.gid];
        if libc::syscall(libc::SYS_setgroups, 1usize, only.as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let g = libc::setfsgid(ids.gid) as u32;
        let u = libc::setfsuid(ids.uid) as u32;
        let sw = Switch {
            prev: Some((u, g, groups)),
            _not_send: Default::default(),
        };
        // setfsuid reports no error: read the ids back.
        if libc::setfsuid(u32::MAX) as u32 != ids.uid || libc::setfsgid(u32::MAX) as u32 != ids.gid
        {
            return Err(io::Error::other(format!(
                "cannot take the filesystem ids of uid {}",
                ids.uid
            )));
        }
        Ok(sw)
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        if let Some((u, g, groups)) = self.prev.take() {
            // SAFETY: see `switch`.
            unsafe {
                libc::setfsuid(u);
                libc::setfsgid(g);
                libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr());
            }
        }
    }
}

/// Run `f` on this thread with `ids`' filesystem ids (and only its gid as group): files
/// it creates belong to that user, and the kernel checks the user's permissions, links
/// included. `None`, or not running as root: `f` runs as the daemon. `f` is synchronous:
/// the ids are this thread's.
pub fn as_user<T>(ids: Option<Ids>, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let _sw = switch(ids)?;
    f()
}

/// Where one operation on a path happens.
enum Loc {
    /// Outside the user's realm: by path, as the daemon.
    Plain(PathBuf),
    /// Past one of the user's links (or through `..`): by path, as the user.
    AsUser(PathBuf, Ids),
    /// The parent directory, reached from HOME without following a link; `root` when it
    /// belongs to the daemon (then the daemon works in it and gives what it creates to
    /// the user), else the user works in it.
    At {
        dir: OwnedFd,
        name: OsString,
        user: Ids,
        root: bool,
    },
}

enum Step {
    Dir(OwnedFd),
    Link,
    Missing,
}

fn io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn open_home(home: &Path) -> io::Result<OwnedFd> {
    nix::fcntl::open(
        home,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io)
}

/// One step down from `dir` without following a link.
fn step<Fd: AsFd>(dir: Fd, name: &OsStr) -> io::Result<Step> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    match nix::fcntl::openat(dir.as_fd(), name, flags, Mode::empty()) {
        Ok(fd) => Ok(Step::Dir(fd)),
        Err(Errno::ENOENT) => Ok(Step::Missing),
        Err(Errno::ELOOP) => Ok(Step::Link),
        Err(Errno::ENOTDIR) => {
            match nix::sys::stat::fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFLNK => Ok(Step::Link),
                _ => Err(io(Errno::ENOTDIR)),
            }
        }
        Err(e) => Err(io(e)),
    }
}

/// Whether the daemon (and only it) may write `dir`: then the user cannot change its
/// entries, and the daemon may work in it relative to the descriptor.
fn daemon_owned<Fd: AsFd>(dir: Fd) -> io::Result<bool> {
    let st = nix::sys::stat::fstat(dir).map_err(io)?;
    Ok(st.st_uid == euid() && st.st_mode & 0o022 == 0)
}

fn normal_parts(rel: &Path) -> Option<Vec<&OsStr>> {
    rel.components()
        .map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect()
}

fn locate(path: &Path) -> io::Result<Loc> {
    let Some((home, rel, user)) = realm_for(path) else {
        return Ok(Loc::Plain(path.to_path_buf()));
    };
    let Some(parts) = normal_parts(&rel).filter(|p| !p.is_empty()) else {
        return Ok(Loc::AsUser(path.to_path_buf(), user));
    };
    let (name, dirs) = parts.split_last().expect("not empty");
    let mut dir = open_home(&home)?;
    for d in dirs {
        match step(&dir, d)? {
            Step::Dir(fd) => dir = fd,
            Step::Link => return Ok(Loc::AsUser(path.to_path_buf(), user)),
            Step::Missing => return Err(io(Errno::ENOENT)),
        }
    }
    let root = daemon_owned(&dir)?;
    Ok(Loc::At {
        dir,
        name: name.to_os_string(),
        user,
        root,
    })
}

/// Run one operation on `path`: `at(dir, name, give_to)` relative to its parent (with
/// `give_to` the user when the daemon works in a directory of its own and must give what
/// it creates away), or `by_path(path)` (as the user past a link, as the daemon outside
/// the realm).
fn run<T>(
    path: &Path,
    at: impl FnOnce(&OwnedFd, &OsStr, Option<Ids>) -> io::Result<T>,
    by_path: impl FnOnce(&Path) -> io::Result<T>,
) -> io::Result<T> {
    match locate(path)? {
        Loc::Plain(p) => by_path(&p),
        Loc::AsUser(p, u) => as_user(Some(u), || by_path(&p)),
        Loc::At {
            dir,
            name,
            user,
            root: false,
        } => as_user(Some(user), || at(&dir, &name, None)),
        Loc::At {
            dir,
            name,
            user,
            root: true,
        } => at(&dir, &name, Some(user)),
    }
}

fn give<Fd: AsFd>(fd: Fd, to: Option<Ids>) -> io::Result<()> {
    if let Some(u) = to {
        nix::unistd::fchown(fd, Some(Uid::from_raw(u.uid)), Some(Gid::from_raw(u.gid)))
            .map_err(io)?;
    }
    Ok(())
}

/// Create `dir` and its missing parents. Under HOME: walked from HOME without following
/// links; a missing directory is made as the user (or by the daemon in a directory of
/// its own, then given to the user); a directory on the way that the daemon owns (made
/// by an older version, or before this step) is given to the user ("adopted"). Past a
/// link of the user's the rest is made as the user. Outside HOME, each directory made is
/// given to `owner` (when there is one) through its descriptor.
pub fn ensure_dir(dir: &Path, owner: Option<Ids>) -> io::Result<()> {
    let Some((home, rel, user)) = realm_for(dir) else {
        return ensure_dir_plain(dir, owner);
    };
    let Some(parts) = normal_parts(&rel) else {
        return as_user(Some(user), || std::fs::create_dir_all(dir));
    };
    let mut cur = open_home(&home)?;
    for name in parts {
        let next = match step(&cur, name)? {
            Step::Dir(fd) => fd,
            Step::Link => return as_user(Some(user), || std::fs::create_dir_all(dir)),
            Step::Missing => {
                let made = if daemon_owned(&cur)? {
                    nix::sys::stat::mkdirat(&cur, name, Mode::from_bits_truncate(0o755))
                } else {
                    as_user(Some(user), || {
                        nix::sys::stat::mkdirat(&cur, name, Mode::from_bits_truncate(0o755))
                            .map_err(io)
                    })
                    .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
                };
                match made {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(io(e)),
                }
                match step(&cur, name)? {
                    Step::Dir(fd) => fd,
                    Step::Link => {
                        return as_user(Some(user), || std::fs::create_dir_all(dir));
                    }
                    Step::Missing => return Err(io(Errno::ENOENT)),
                }
            }
        };
        // Below HOME, a directory of the daemon's on the way is the user's.
        let st = nix::sys::stat::fstat(&next).map_err(io)?;
        if st.st_uid == euid() && st.st_uid != user.uid {
            give(&next, Some(user))?;
        }
        cur = next;
    }
    Ok(())
}

fn ensure_dir_plain(dir: &Path, owner: Option<Ids>) -> io::Result<()> {
    let owner = owner.filter(|_| euid() == 0);
    let Some(owner) = owner else {
        return std::fs::create_dir_all(dir);
    };
    let mut missing = Vec::new();
    let mut p = Some(dir);
    while let Some(d) = p {
        if d.as_os_str().is_empty() || std::fs::symlink_metadata(d).is_ok() {
            break;
        }
        missing.push(d);
        p = d.parent();
    }
    for d in missing.into_iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => {
                // Given away through the descriptor of what was just made: a link put in
                // its place since is refused, never followed.
                let fd = nix::fcntl::open(
                    d,
                    OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(io)?;
                give(&fd, Some(owner))?;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// [`ensure_dir`], then make `dir` itself mode 0700 (as the user, or through a
/// descriptor opened without following a link: never the directory behind a link).
pub fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    ensure_dir(dir, None)?;
    let mode = Mode::from_bits_truncate(0o700);
    let chmod = |fd: &OwnedFd| -> io::Result<()> {
        let st = nix::sys::stat::fstat(fd).map_err(io)?;
        if st.st_mode & 0o777 != 0o700 {
            nix::sys::stat::fchmod(fd, mode).map_err(io)?;
        }
        Ok(())
    };
    run(
        dir,
        |parent, name, _| match step(parent, name)? {
            Step::Dir(fd) => chmod(&fd),
            Step::Link => Err(io(Errno::ELOOP)),
            Step::Missing => Err(io(Errno::ENOENT)),
        },
        |p| {
            let m = std::fs::metadata(p)?;
            if m.permissions().mode() & 0o777 != 0o700 {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))?;
            }
            Ok(())
        },
    )
}

/// How [`create`] opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// A new file; fails when anything is there.
    New,
    /// Append, creating when absent; readable too.
    Append,
}

fn oflags(how: Open) -> OFlag {
    let base = OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    match how {
        Open::New => base | OFlag::O_EXCL | OFlag::O_WRONLY,
        Open::Append => base | OFlag::O_APPEND | OFlag::O_RDWR,
    }
}

/// A regular file, blocking again: anything else (a fifo, a device) is refused.
fn regular(fd: OwnedFd, path: &Path) -> io::Result<File> {
    let st = nix::sys::stat::fstat(&fd).map_err(io)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let fl = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).map_err(io)?;
    let fl = OFlag::from_bits_truncate(fl) & !OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(fl)).map_err(io)?;
    Ok(File::from(fd))
}

/// Open (creating) `path` for writing, never through a link as its last component
/// (`ELOOP` then), and only a regular file. Mode `mode` when created (umask applies).
pub fn create(path: &Path, how: Open, mode: u32) -> io::Result<File> {
    let flags = oflags(how);
    let m = Mode::from_bits_truncate(mode);
    let fd = run(
        path,
        |dir, name, give_to| {
            let fd = nix::fcntl::openat(dir, name, flags, m).map_err(io)?;
            let st = nix::sys::stat::fstat(&fd).map_err(io)?;
            if st.st_uid == euid() {
                give(&fd, give_to)?;
            }
            Ok(fd)
        },
        |p| {
            let f = std::fs::OpenOptions::new()
                .custom_flags(flags.bits())
                .write(true)
                .read(how == Open::Append)
                .mode(mode)
                .open(p)?;
            Ok(OwnedFd::from(f))
        },
    )?;
    regular(fd, path)
}

/// [`create`] with [`Open::Append`]; a symbolic link in the file's place is removed (and
/// named in a warning) and a regular file made instead: logs never go through a link.
pub fn open_append(path: &Path, mode: u32) -> io::Result<File> {
    match create(path, Open::Append, mode) {
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            let target = std::fs::read_link(path).unwrap_or_default();
            tracing::warn!(
                path = %path.display(),
                target = %target.display(),
                "a symbolic link is in the place of a file wsagent writes; wsagent never writes through a link: the link is replaced by a regular file"
            );
            remove_file(path)?;
            create(path, Open::Append, mode)
        }
        r => r,
    }
}

/// Open `path` for reading without following a link as its last component, as the
/// user under HOME; only a regular file.
pub fn open_read(path: &Path) -> io::Result<File> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let fd = run(
        path,
        |dir, name, _| nix::fcntl::openat(dir, name, flags, Mode::empty()).map_err(io),
        |p| nix::fcntl::open(p, flags, Mode::empty()).map_err(io),
    )?;
    regular(fd, path)
}

/// The whole of `path`, read as [`open_read`] opens it.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    open_read(path)?.read_to_end(&mut out)?;
    Ok(out)
}

/// Replace `path` with `data` atomically: a new file under a random name beside it
/// (`O_EXCL`, mode `mode`), fsynced, renamed over `path`, the directory fsynced.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let write = || -> io::Result<()> {
        let mut f = create(&tmp, Open::New, mode)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        rename(&tmp, path)?;
        sync_dir(dir)
    };
    write().inspect_err(|_| {
        let _ = remove_file(&tmp);
    })
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let fd = match realm_for(dir) {
        Some(_) => run(
            dir,
            |parent, name, _| match step(parent, name)? {
                Step::Dir(fd) => Ok(fd),
                _ => Err(io(Errno::ENOTDIR)),
            },
            |p| nix::fcntl::open(p, flags, Mode::empty()).map_err(io),
        ),
        None => nix::fcntl::open(dir, flags, Mode::empty()).map_err(io),
    };
    // HOME itself (no parent in the realm) or past a link: by path as the user.
    let fd = match fd {
        Ok(fd) => fd,
        Err(_) => as_user(user_for(dir), || {
            nix::fcntl::open(dir, flags, Mode::empty()).map_err(io)
        })?,
    };
    File::from(fd).sync_all()
}

/// Rename `from` to `to`, two names in the same directory (the link itself when either
/// is a link).
pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    if from.parent() != to.parent() {
        return Err(io::Error::other(format!(
            "{} and {} are not in the same directory",
            from.display(),
            to.display()
        )));
    }
    let old = from.file_name().unwrap_or_default().to_os_string();
    run(
        to,
        |dir, name, _| nix::fcntl::renameat(dir, old.as_os_str(), dir, name).map_err(io),
        |p| std::fs::rename(from, p),
    )
}

/// Remove a file or a link (never what a link points to).
pub fn remove_file(path: &Path) -> io::Result<()> {
    run(
        path,
        |dir, name, _| {
            nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir).map_err(io)
        },
        |p| std::fs::remove_file(p),
    )
}

/// Remove a directory tree, as the user under HOME (std's removal never follows links).
pub fn remove_dir_all(path: &Path) -> io::Result<()> {
    as_user(user_for(path), || std::fs::remove_dir_all(path))
}

/// Make the link `link` pointing at `target` (the user's, under HOME).
pub fn symlink(target: &Path, link: &Path) -> io::Result<()> {
    run(
        link,
        |dir, name, give_to| {
            nix::unistd::symlinkat(target, dir, name).map_err(io)?;
            if let Some(u) = give_to {
                nix::unistd::fchownat(
                    dir,
                    name,
                    Some(Uid::from_raw(u.uid)),
                    Some(Gid::from_raw(u.gid)),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(io)?;
            }
            Ok(())
        },
        |p| std::os::unix::fs::symlink(target, p),
    )
}

/// Serializes the unit tests that set the process-wide realm.
#[cfg(test)]
pub(crate) static TEST_REALM: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn root() -> bool {
        if euid() != 0 {
            eprintln!("not root: the user's ids cannot be taken here");
            return false;
        }
        true
    }

    /// A HOME owned by uid 4321 with a root-owned directory beside it.
    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let home = t.path().join("home");
        let sys = t.path().join("sys");
        std::fs::create_dir(&home).unwrap();
        std::fs::create_dir(&sys).unwrap();
        std::os::unix::fs::chown(&home, Some(4321), Some(4321)).unwrap();
        (t, home, sys)
    }

    #[test]
    fn under_home_root_creates_as_the_user_and_never_through_the_users_links() {
        if !root() {
            return;
        }
        let _g = TEST_REALM.lock().unwrap_or_else(|e| e.into_inner());
        let (_t, home, sys) = setup();
        set_realm(&home, None);
        // A link to a root directory: nothing is made, chmodded or adopted behind it.
        std::os::unix::fs::symlink(&sys, home.join("state")).unwrap();
        std::fs::create_dir(sys.join("wsagent")).unwrap();
        assert!(ensure_dir(&home.join("state/wsagent/x"), None).is_err());
        assert!(private_dir(&home.join("state/wsagent")).is_err());
        let m = std::fs::metadata(sys.join("wsagent")).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o755));
        // A link as the file: refused (ELOOP), the target untouched.
        std::fs::write(sys.join("passwd"), "root:x:0:0").unwrap();
        std::os::unix::fs::symlink(sys.join("passwd"), home.join("log")).unwrap();
        assert_eq!(
            create(&home.join("log"), Open::Append, 0o600)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ELOOP)
        );
        assert!(open_read(&home.join("log")).is_err());
        let mut f = open_append(&home.join("log"), 0o600).unwrap();
        f.write_all(b"line\n").unwrap();
        assert_eq!(std::fs::read(sys.join("passwd")).unwrap(), b"root:x:0:0");
        // What is made belongs to the user.
        ensure_dir(&home.join("a/b"), None).unwrap();
        write_atomic(&home.join("a/b/f"), b"x", 0o600).unwrap();
        for p in ["a", "a/b", "a/b/f", "log"] {
            assert_eq!(
                std::fs::symlink_metadata(home.join(p)).unwrap().uid(),
                4321,
                "{p}"
            );
        }
        set_realm(&home, Some(Ids { uid: 0, gid: 0 }));
    }

    #[test]
    fn in_a_root_owned_home_the_daemon_creates_and_gives_to_the_user() {
        if !root() {
            return;
        }
        let _g = TEST_REALM.lock().unwrap_or_else(|e| e.into_inner());
        let (_t, home, _sys) = setup();
        std::os::unix::fs::chown(&home, Some(0), Some(0)).unwrap();
        std::fs::create_dir(home.join(".local")).unwrap();
        set_realm(
            &home,
            Some(Ids {
                uid: 4321,
                gid: 4322,
            }),
        );
        ensure_dir(&home.join(".local/state/wsagent"), None).unwrap();
        symlink(Path::new("/nowhere"), &home.join(".vimrc")).unwrap();
        write_atomic(&home.join(".profile"), b"p", 0o644).unwrap();
        for p in [
            ".local",
            ".local/state",
            ".local/state/wsagent",
            ".vimrc",
            ".profile",
        ] {
            let m = std::fs::symlink_metadata(home.join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (4321, 4322), "{p}");
        }
        set_realm(&home, Some(Ids { uid: 0, gid: 0 }));
    }
}
