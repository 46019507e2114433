//! Processes: the only module that spawns them and the only one that reaps them.
//!
//! Design (see ARCHITECTURE.md, "Reaping"): one reaper owns every `waitpid`. It calls
//! `waitpid(-1, WNOHANG)` in a loop whenever SIGCHLD arrives, **holding the registry
//! lock**, and hands each status to the waiter registered for that pid; a pid nobody
//! registered is an orphan and its status is dropped. [`spawn`] holds the same lock from
//! before the fork until the pid is registered, so the reaper can never reap a child
//! before its waiter exists, and std's own `waitpid` after a failed `exec` (inside
//! `Command::spawn`) cannot race the reaper either. Nothing else in the daemon may wait
//! for a child: no `tokio::process`, no `Command::output`, no portable-pty `spawn_command`.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit code {c}"),
            (None, Some(s)) => match Signal::try_from(s) {
                Ok(sig) => write!(f, "killed by {sig}"),
                Err(_) => write!(f, "killed by signal {s}"),
            },
            _ => f.write_str("unknown status"),
        }
    }
}

static REGISTRY: Mutex<Option<HashMap<i32, oneshot::Sender<ExitStatus>>>> = Mutex::new(None);

fn registry() -> std::sync::MutexGuard<'static, Option<HashMap<i32, oneshot::Sender<ExitStatus>>>> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reap every child that has exited. Called by the signal thread on SIGCHLD (and once
/// at start). Returns how many were reaped.
pub fn reap_all() -> usize {
    let mut n = 0;
    loop {
        let mut reg = registry();
        let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (
                pid,
                ExitStatus {
                    code: Some(code),
                    signal: None,
                },
            ),
            Ok(WaitStatus::Signaled(pid, sig, _)) => (
                pid,
                ExitStatus {
                    code: None,
                    signal: Some(sig as i32),
                },
            ),
            Ok(WaitStatus::StillAlive) | Err(_) => return n,
            Ok(_) => continue,
        };
        n += 1;
        let (pid, st) = status;
        // An orphan (no waiter registered): its status is dropped.
        if let Some(tx) = reg.get_or_insert_with(HashMap::new).remove(&pid.as_raw()) {
            let _ = tx.send(st);
        }
    }
}

/// Where a child's standard stream goes.
#[derive(Debug)]
pub enum Io {
    Null,
    Inherit,
    Piped,
    Fd(OwnedFd),
}

impl Io {
    fn stdio(self) -> Stdio {
        match self {
            Io::Null => Stdio::null(),
            Io::Inherit => Stdio::inherit(),
            Io::Piped => Stdio::piped(),
            Io::Fd(fd) => Stdio::from(fd),
        }
    }
}

/// A user to run a child as.
#[derive(Debug, Clone)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub name: String,
    pub home: PathBuf,
}

/// Resolve `user` (name or uid) and optional `group` (name or gid).
pub fn resolve_user(user: &str, group: Option<&str>) -> Result<RunAs, String> {
    use nix::unistd::{Gid, Group, Uid, User};
    let u = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)).ok().flatten(),
        Err(_) => User::from_name(user).ok().flatten(),
    };
    let (uid, mut gid, name, home) = match (u, user.parse::<u32>()) {
        (Some(u), _) => (u.uid.as_raw(), u.gid.as_raw(), u.name, u.dir),
        (None, Ok(uid)) => (uid, uid, user.to_string(), PathBuf::from("/")),
        (None, Err(_)) => return Err(format!("unknown user {user:?}")),
    };
    if let Some(g) = group {
        gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => match Group::from_name(g).ok().flatten() {
                Some(gr) => gr.gid.as_raw(),
                None => return Err(format!("unknown group {g:?}")),
            },
        };
    }
    let groups = std::ffi::CString::new(name.clone())
        .ok()
        .and_then(|c| nix::unistd::getgrouplist(&c, Gid::from_raw(gid)).ok())
        .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_else(|| vec![gid]);
    Ok(RunAs {
        uid,
        gid,
        groups,
        name,
        home,
    })
}

/// What to run.
#[derive(Debug)]
pub struct Spec {
    pub argv: Vec<String>,
    /// The complete environment of the child (nothing is inherited implicitly).
    pub env: Vec<(OsString, OsString)>,
    pub cwd: Option<PathBuf>,
    pub run_as: Option<RunAs>,
    /// Put the child in a new process group (pgid = pid), so the whole group can be
    /// signalled.
    pub new_group: bool,
    /// Make the child a session leader with `stdin` as its controlling terminal (PTYs).
    pub controlling_tty: bool,
    pub stdin: Io,
    pub stdout: Io,
    pub stderr: Io,
    /// SIGKILL the child's process group when its [`Child`] is dropped before its exit
    /// was seen (a timed-out health check, a future dropped at a deadline, a runtime
    /// that went away): no child outlives the one who waits for it.
    pub kill_on_drop: bool,
}

impl Spec {
    pub fn new(argv: Vec<String>) -> Spec {
        Spec {
            argv,
            env: Vec::new(),
            cwd: None,
            run_as: None,
            new_group: true,
            controlling_tty: false,
            stdin: Io::Null,
            stdout: Io::Null,
            stderr: Io::Null,
            kill_on_drop: false,
        }
    }
}

/// A running child. Its exit status arrives through [`Child::wait`].
#[derive(Debug)]
pub struct Child {
    pub pid: u32,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    exit: oneshot::Receiver<ExitStatus>,
    kill_on_drop: bool,
    exited: bool,
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.kill_on_drop && !self.exited {
            self.kill_group();
        }
    }
}

impl Child {
    /// Wait for the child to exit (cancel-safe: dropping the future keeps the child
    /// registered; its status is then simply discarded by the reaper).
    pub async fn wait(&mut self) -> ExitStatus {
        let st = (&mut self.exit).await.unwrap_or(ExitStatus {
            code: None,
            signal: None,
        });
        self.exited = true;
        st
    }

    /// The status, if the child has exited already.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let st = self.exit.try_recv().ok();
        self.exited |= st.is_some();
        st
    }

    /// SIGKILL the child's whole process group now (what it left behind included).
    pub fn kill_group(&self) {
        self.signal_group(Signal::SIGKILL);
    }

    /// Signal the child's process group (or the child alone when it has none).
    pub fn signal_group(&self, sig: Signal) {
        let pid = Pid::from_raw(self.pid as i32);
        if killpg(pid, sig).is_err() {
            let _ = nix::sys::signal::kill(pid, sig);
        }
    }
}

/// Spawn a child. See the module docs for why this holds the registry lock.
pub fn spawn(spec: Spec) -> io::Result<Child> {
    let Some(program) = spec.argv.first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty argv"));
    };
    let mut cmd = Command::new(program);
    cmd.args(&spec.argv[1..]);
    cmd.env_clear();
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    cmd.stdin(spec.stdin.stdio())
        .stdout(spec.stdout.stdio())
        .stderr(spec.stderr.stdio());
    let run_as = spec.run_as.clone();
    let new_group = spec.new_group;
    let ctty = spec.controlling_tty;
    let oom = child_oom_bytes();
    // SAFETY: the closure only makes async-signal-safe system calls (open, write, close,
    // setsid, setpgid, ioctl, setgroups, setgid, setuid, sigprocmask) on values prepared
    // before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // Before the user's ids are taken: written by root, it is also the floor
            // the child cannot go below. Best effort: a service never fails to start
            // over it (a read-only /proc, say).
            if let Some((buf, len)) = &oom {
                let fd = libc::open(
                    c"/proc/self/oom_score_adj".as_ptr(),
                    libc::O_WRONLY | libc::O_CLOEXEC,
                );
                if fd >= 0 {
                    let _ = libc::write(fd, buf.as_ptr().cast(), *len);
                    libc::close(fd);
                }
            }
            // Signal handlers are reset by exec, but the mask is inherited: clear it.
            let empty = nix::sys::signal::SigSet::empty();
            let _ = nix::sys::signal::pthread_sigmask(
                nix::sys::signal::SigmaskHow::SIG_SETMASK,
                Some(&empty),
                None,
            );
            if ctty {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if new_group && libc::setpgid(0, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(r) = &run_as {
                // The list prepared before the fork: no allocation here.
                if libc::setgroups(r.groups.len() as _, r.groups.as_ptr()) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setgid(r.gid) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setuid(r.uid) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut reg = registry();
    let mut child = cmd.spawn()?;
    let pid = child.id();
    let (tx, rx) = oneshot::channel();
    reg.get_or_insert_with(HashMap::new).insert(pid as i32, tx);
    drop(reg);
    let stdout = child.stdout.take().map(OwnedFd::from);
    let stderr = child.stderr.take().map(OwnedFd::from);
    // Dropping the std handle neither waits nor kills: the reaper owns the status.
    drop(child);
    Ok(Child {
        pid,
        stdout,
        stderr,
        exit: rx,
        kill_on_drop: spec.kill_on_drop,
        exited: false,
    })
}

/// The kernel's range of `oom_score_adj`.
const OOM_MIN: i32 = -1000;
const OOM_MAX: i32 = 1000;
/// How far below its children the daemon sits (each point is a thousandth of the
/// memory the OOM killer weighs, the container's limit in a memory cgroup): a save's
/// memory is bounded, so the daemon is picked only if it held half the limit more than
/// the largest child.
const OOM_GAP: i32 = 500;
/// No `oom_score_adj` is written for a child.
const OOM_KEEP: i32 = i32::MIN;
/// The `oom_score_adj` every child is given before it runs (`OOM_KEEP`: none).
static CHILD_OOM: AtomicI32 = AtomicI32::new(OOM_KEEP);

/// What [`shield_from_oom`] did: the value the daemon was started with, its own now, and
/// its children's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OomScores {
    pub inherited: i32,
    pub daemon: i32,
    pub children: i32,
}

/// Make the daemon the last process of the container the OOM killer picks. As PID 1 its
/// death ends the container and every process in it, so any child is the better
/// victim. With `CAP_SYS_RESOURCE` the daemon lowers its own `oom_score_adj` by
/// [`OOM_GAP`] and gives every child the value it was started with (what Kubernetes or
/// Docker chose for the container); a child running as a user cannot go below it
/// (the kernel's floor follows the value written with the capability). Without the
/// capability (Docker's and Kubernetes' default set) the daemon can only raise: every
/// child is given the inherited value plus the gap, at most 1000.
pub fn shield_from_oom() -> io::Result<OomScores> {
    let path = "/proc/self/oom_score_adj";
    let inherited: i32 = std::fs::read_to_string(path)?
        .trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: {e}")))?;
    let scores = oom_scores(inherited, |v| std::fs::write(path, v.to_string()).is_ok());
    if scores.children != scores.daemon {
        CHILD_OOM.store(scores.children, Ordering::Relaxed);
    }
    Ok(scores)
}

/// The decision of [`shield_from_oom`]: `lower(v)` sets the daemon's own value and says
/// whether the kernel allowed it.
fn oom_scores(inherited: i32, lower: impl FnOnce(i32) -> bool) -> OomScores {
    let keep = OomScores {
        inherited,
        daemon: inherited,
        children: inherited,
    };
    if inherited <= OOM_MIN {
        // Already never picked: nothing to order.
        return keep;
    }
    // -1000 would make the daemon unkillable, even if it leaked.
    let low = (inherited - OOM_GAP).max(OOM_MIN + 1);
    if low < inherited && lower(low) {
        return OomScores {
            daemon: low,
            ..keep
        };
    }
    OomScores {
        children: (inherited + OOM_GAP).min(OOM_MAX),
        ..keep
    }
}

/// The child's `oom_score_adj` as the bytes to write, formatted before the fork.
fn child_oom_bytes() -> Option<([u8; 8], usize)> {
    let v = CHILD_OOM.load(Ordering::Relaxed);
    if v == OOM_KEEP {
        return None;
    }
    let text = v.to_string();
    let mut buf = [0u8; 8];
    buf[..text.len()].copy_from_slice(text.as_bytes());
    Some((buf, text.len()))
}

/// Become a child subreaper so orphans of our descendants are re-parented to us
/// (only needed when we are not PID 1).
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// Parse a signal name (`SIGTERM`, `TERM`, `15`).
pub fn parse_signal(s: &str) -> Option<Signal> {
    use std::str::FromStr;
    let up = s.trim().to_ascii_uppercase();
    if let Ok(n) = up.parse::<i32>() {
        return Signal::try_from(n).ok();
    }
    let name = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    Signal::from_str(&name).ok()
}

/// Find `program` the way `execvp` would, in `path` (a `PATH` value).
///
/// Kept by hand rather than the `which` crate: the search is in the service's own
/// `PATH` (not the daemon's) and must never consult the daemon's working directory;
/// `which::which_in` would need both spelled out and brings its own dependencies for
/// these dozen lines.
pub fn which(program: &str, path: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_exec = |p: &std::path::Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return is_exec(&p).then_some(p);
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| PathBuf::from(d).join(program))
        .find(|p| is_exec(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The daemon goes 500 below its children: itself when the kernel lets it lower
    /// its value (never to -1000, which no OOM kill could reach), else the children go
    /// up, at most to 1000; a daemon already at -1000 changes nothing.
    #[test]
    fn the_daemon_sits_below_its_children_for_the_oom_killer() {
        let s = |inherited, allowed: bool| {
            let mut asked = None;
            let r = oom_scores(inherited, |v| {
                asked = Some(v);
                allowed
            });
            (r.daemon, r.children, asked)
        };
        assert_eq!(s(0, true), (-500, 0, Some(-500)));
        assert_eq!(s(100, true), (-400, 100, Some(-400)));
        assert_eq!(s(-997, true), (-999, -997, Some(-999)), "Guaranteed QoS");
        assert_eq!(s(0, false), (0, 500, Some(-500)));
        assert_eq!(s(999, false), (999, 1000, Some(499)), "Burstable QoS");
        assert_eq!(
            s(1000, false),
            (1000, 1000, Some(500)),
            "BestEffort: nothing to gain"
        );
        assert_eq!(s(-1000, true), (-1000, -1000, None));
        assert_eq!(
            s(-999, true),
            (-999, -499, None),
            "cannot go lower: children go up"
        );
    }

    #[test]
    fn signal_names_parse_in_all_spellings() {
        assert_eq!(parse_signal("SIGTERM"), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("int"), Some(Signal::SIGINT));
        assert_eq!(parse_signal("9"), Some(Signal::SIGKILL));
        assert_eq!(parse_signal("SIGNOPE"), None);
    }

    #[test]
    fn which_finds_sh_and_not_nonsense() {
        assert!(which("sh", "/usr/bin:/bin").is_some());
        assert!(which("definitely-not-a-program", "/usr/bin:/bin").is_none());
    }

    /// The state letter of `pid` in /proc (`Z` for a zombie), `None` once it is reaped.
    fn state_of(pid: u32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit(')').next()?.trim_start().chars().next()
    }

    fn gone(pid: u32) -> bool {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < until {
            if matches!(state_of(pid), None | Some('Z')) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        false
    }

    /// A child spawned with `kill_on_drop` dies with its group when its handle is
    /// dropped before its exit was seen; one without it, or one already waited for,
    /// is left alone.
    #[test]
    fn kill_on_drop_is_a_property_of_the_child() {
        let spawn = |kill: bool| {
            let mut spec = Spec::new(vec!["sh".into(), "-c".into(), "sleep 1000 & wait".into()]);
            spec.env = vec![("PATH".into(), "/usr/bin:/bin".into())];
            spec.kill_on_drop = kill;
            spawn(spec).expect("spawn sh")
        };
        let kept = spawn(false);
        let killed = spawn(true);
        let (kept_pid, killed_pid) = (kept.pid, killed.pid);
        drop(killed);
        assert!(gone(killed_pid), "the kill_on_drop child was killed");
        assert!(
            matches!(state_of(kept_pid), Some(c) if c != 'Z'),
            "the other child still runs"
        );
        kept.kill_group();
        drop(kept);
        assert!(gone(kept_pid));
    }
}
