//! Running the real `wsagent` binary in a throwaway workspace, talking to it through its
//! own CLI, and making sure nothing it started outlives the test.
//!
//! A [`Workspace`] is a temp dir with a HOME, a state dir, the local API socket path and a
//! config file. [`Daemon::start`] runs `wsagent run --config <file>` there with a clean
//! environment; [`Daemon::start_pid1`] runs it as PID 1 of a new pid namespace
//! (`unshare --pid --fork --mount-proc`). Every process gets a unique `WSAGENT_TEST_TAG`
//! in its environment, so that [`Drop`] can find and SIGKILL whatever the daemon started,
//! even what escaped its process tree.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_proto::local::{Lifecycle, ServiceStatus, Status};
pub use nix::sys::signal::Signal;
use nix::sys::signal::kill;
use nix::unistd::Pid;

use crate::procfs::{self, Proc};
use crate::wait::try_wait_until;

/// The environment variable holding each workspace's unique tag.
pub const TAG_VAR: &str = "WSAGENT_TEST_TAG";
/// Where tests point the system config file so `/etc/wsagent/config.toml` is never read.
pub const NO_SYSTEM_CONFIG: &str = "/nonexistent/wsagent/config.toml";
/// How long one CLI call may take before the test fails (a hung daemon must not hang CI).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// The `wsagent` binary under test: `$WSAGENT_BIN`, else `wsagent` next to the test
/// binary's `deps/` directory (`target/debug/wsagent`).
pub fn wsagent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WSAGENT_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "WSAGENT_BIN={} does not exist: run `cargo build -p agent` first",
            p.display()
        );
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut candidates = Vec::new();
    if let Some(dir) = exe.parent() {
        let dir = if dir.ends_with("deps") {
            dir.parent().unwrap_or(dir)
        } else {
            dir
        };
        candidates.push(dir.join("wsagent"));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/wsagent"));
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "wsagent binary not found (looked at {}): run `cargo build -p agent` first",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// A throwaway workspace: HOME, state dir, socket path and config file under one temp
/// dir, removed on drop (kept, and its path printed, with `WSAGENT_TEST_KEEP=1`).
pub struct Workspace {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    tag: String,
    extra_env: Vec<(String, String)>,
}

impl Default for Workspace {
    fn default() -> Self {
        Self::new()
    }
}

impl Workspace {
    pub fn new() -> Workspace {
        // Short prefix: the socket path must fit in sun_path (108 bytes).
        let dir = tempfile::Builder::new()
            .prefix("wsa")
            .tempdir()
            .expect("create temp dir");
        let root = dir.path().to_path_buf();
        for d in ["home", "state"] {
            std::fs::create_dir_all(root.join(d)).expect("create workspace dirs");
        }
        Workspace {
            dir: Some(dir),
            root,
            tag: uuid::Uuid::new_v4().to_string(),
            extra_env: Vec::new(),
        }
    }

    /// The temp dir everything lives in; tests may put their own files here.
    pub fn path(&self) -> &Path {
        &self.root
    }
    pub fn home(&self) -> PathBuf {
        self.root.join("home")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }
    pub fn socket(&self) -> PathBuf {
        self.root.join("wsagent.sock")
    }
    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    /// `<state_dir>/logs/<service>.log`.
    pub fn service_log_path(&self, service: &str) -> PathBuf {
        self.state_dir().join("logs").join(format!("{service}.log"))
    }
    /// The unique value of [`TAG_VAR`] in this workspace's environment.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Add a variable to the environment of the daemon and of CLI calls.
    pub fn set_env(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.extra_env.push((key.into(), value.into()));
    }
    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.set_env(key, value);
        self
    }

    /// The whole environment given to `wsagent` (and nothing else from the test's own).
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("HOME".to_string(), self.home().display().to_string()),
            (
                "PATH".into(),
                std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            ),
            ("WSAGENT_SOCKET".into(), self.socket().display().to_string()),
            (
                "WSAGENT_STATE_DIR".into(),
                self.state_dir().display().to_string(),
            ),
            ("WSAGENT_SYSTEM_CONFIG".into(), NO_SYSTEM_CONFIG.into()),
            (
                "WSAGENT_LOG_LEVEL".into(),
                std::env::var("WSAGENT_TEST_LOG_LEVEL").unwrap_or_else(|_| "debug".into()),
            ),
            (TAG_VAR.into(), self.tag.clone()),
        ];
        for (k, v) in &self.extra_env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        env
    }

    /// A command for `program` with exactly this workspace's environment.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear().envs(self.env()).stdin(Stdio::null());
        cmd
    }

    pub fn write_config(&self, toml: &str) {
        std::fs::write(self.config_path(), toml).expect("write config");
    }

    /// `wsagent <args>` with this workspace's environment (works without a daemon, e.g.
    /// to check what the CLI says when none is running). Fails the test past
    /// [`CLI_TIMEOUT`].
    pub fn cli<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(wsagent_bin());
        cmd.args(args);
        output_within(cmd, CLI_TIMEOUT)
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if std::env::var("WSAGENT_TEST_KEEP").is_ok_and(|v| v == "1")
            && let Some(dir) = self.dir.take()
        {
            eprintln!("keeping workspace {}", dir.keep().display());
            return;
        }
        // A SIGKILLed dockerd leaves its data-root bind-mounted on itself; the temp dir
        // cannot be removed (nor the mount reclaimed) until it is detached.
        for m in procfs::mounts_under(&self.root) {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Run `cmd` to completion with its output captured; panic (after killing it) when it
/// takes longer than `timeout`.
pub fn output_within(mut cmd: Command, timeout: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let out = Capture::spawn(child.stdout.take(), None);
    let err = Capture::spawn(child.stderr.take(), None);
    let status = try_wait_until(timeout, || child.try_wait().expect("try_wait"));
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{what} did not finish within {timeout:?}\nstderr: {}",
            err.text()
        );
    };
    Output {
        status,
        stdout: out.finish(),
        stderr: err.finish(),
    }
}

/// A pipe drained by its own thread into a shared buffer, so the child never blocks on a
/// full pipe and the test can read what arrived so far.
struct Capture {
    buf: Arc<Mutex<Vec<u8>>>,
    /// Set by the thread at end of file.
    eof: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Capture {
    fn spawn(pipe: Option<impl Read + Send + 'static>, echo: Option<&'static str>) -> Capture {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let eof = Arc::new(std::sync::atomic::AtomicBool::new(pipe.is_none()));
        let thread = pipe.map(|mut pipe| {
            let buf = buf.clone();
            let eof = eof.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    if let Some(prefix) = echo {
                        eprint!("{prefix}{}", String::from_utf8_lossy(&chunk[..n]));
                    }
                    buf.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
                eof.store(true, std::sync::atomic::Ordering::SeqCst);
            })
        });
        Capture { buf, eof, thread }
    }

    /// Wait (bounded: a leftover grandchild may hold the pipe open) until everything the
    /// process wrote before it exited has been read.
    fn wait_eof(&self, timeout: Duration) {
        let _ = try_wait_until(timeout, || {
            self.eof.load(std::sync::atomic::Ordering::SeqCst)
        });
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }

    /// Wait for the pipe to close (the process and everything holding it are gone).
    fn finish(mut self) -> Vec<u8> {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.buf.lock().unwrap())
    }
}

/// A running `wsagent run`, killed with everything it started when dropped.
pub struct Daemon {
    child: Child,
    /// Host pid of wsagent itself (inside the namespace for [`Daemon::start_pid1`]).
    pid: u32,
    pid1: bool,
    env: Vec<(String, String)>,
    tag: String,
    state_dir: PathBuf,
    stdout: Capture,
    stderr: Capture,
    exit: Option<ExitStatus>,
    /// A failure message already carried the report; Drop need not print it again.
    reported: std::cell::Cell<bool>,
}

impl Daemon {
    /// Write `config_toml` to the workspace's config file and run
    /// `wsagent run --config <file>`.
    pub fn start(ws: &Workspace, config_toml: &str) -> Daemon {
        Daemon::spawn(ws, config_toml, false)
    }

    /// Like [`Daemon::start`], as PID 1 of a new pid (and mount) namespace. Needs root.
    pub fn start_pid1(ws: &Workspace, config_toml: &str) -> Daemon {
        Daemon::spawn(ws, config_toml, true)
    }

    /// Like [`Daemon::start`], run through `wrapper` (a program and its arguments that ends
    /// by exec'ing the rest of its argv, e.g. `unshare --mount sh -c '...; exec "$@"' sh`),
    /// so the daemon's pid is the wrapper's. Used to give it a private mount namespace.
    pub fn start_wrapped(ws: &Workspace, config_toml: &str, wrapper: &[String]) -> Daemon {
        Daemon::spawn_with(ws, config_toml, false, wrapper)
    }

    fn spawn(ws: &Workspace, config_toml: &str, pid1: bool) -> Daemon {
        Daemon::spawn_with(ws, config_toml, pid1, &[])
    }

    fn spawn_with(ws: &Workspace, config_toml: &str, pid1: bool, wrapper: &[String]) -> Daemon {
        ws.write_config(config_toml);
        let bin = wsagent_bin();
        let mut cmd = if let Some((prog, args)) = wrapper.split_first() {
            let mut c = ws.command(prog);
            c.args(args).arg(&bin);
            c
        } else if pid1 {
            // --kill-child: if the test process dies, unshare dies (PDEATHSIG below) and
            // takes the namespace with it.
            let mut c = ws.command("unshare");
            c.args(["--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL"])
                .arg(&bin);
            c
        } else {
            ws.command(&bin)
        };
        cmd.arg("run")
            .arg("--config")
            .arg(ws.config_path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let echo = std::env::var("WSAGENT_TEST_ECHO")
            .is_ok_and(|v| v == "1")
            .then_some("wsagent| ");
        let stdout = Capture::spawn(child.stdout.take(), echo);
        let stderr = Capture::spawn(child.stderr.take(), echo);
        let mut daemon = Daemon {
            pid: child.id(),
            child,
            pid1,
            env: ws.env(),
            tag: ws.tag().to_string(),
            state_dir: ws.state_dir(),
            stdout,
            stderr,
            exit: None,
            reported: Default::default(),
        };
        if pid1 {
            daemon.pid = daemon.find_namespace_init(&bin);
        }
        daemon
    }

    /// The host pid of the namespace's PID 1 once it has exec'd wsagent: a child of the
    /// unshare process.
    fn find_namespace_init(&mut self, bin: &Path) -> u32 {
        let unshare = self.child.id();
        let comm: String = bin
            .file_name()
            .map(|n| n.to_string_lossy().chars().take(15).collect())
            .unwrap_or_default();
        let found = try_wait_until(Duration::from_secs(10), || {
            let text = std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
                .unwrap_or_default();
            let pid = text
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .chain(procfs::children(unshare).into_iter().map(|p| p.pid))
                .next()?;
            procfs::stat(pid).filter(|p| p.comm == comm).map(|p| p.pid)
        });
        match found {
            Some(pid) => pid,
            None => panic!(
                "wsagent did not start as PID 1 under unshare (pid {unshare}) within 10s\n{}",
                self.report()
            ),
        }
    }

    /// Host pid of the daemon.
    pub fn pid(&self) -> u32 {
        self.pid
    }
    pub fn is_pid1(&self) -> bool {
        self.pid1
    }
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Everything the daemon wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }
    pub fn stdout(&self) -> String {
        self.stdout.text()
    }

    /// `<state_dir>/logs/<service>.log` (empty when missing).
    pub fn service_log(&self, service: &str) -> String {
        std::fs::read_to_string(self.state_dir.join("logs").join(format!("{service}.log")))
            .unwrap_or_default()
    }

    /// `wsagent <args>` with the daemon's environment.
    pub fn cli<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(wsagent_bin());
        cmd.env_clear()
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .args(args);
        output_within(cmd, CLI_TIMEOUT)
    }

    /// `wsagent status --json`, parsed; `Err` says why not (daemon unreachable, bad JSON).
    pub fn try_status(&self) -> Result<Status, String> {
        let out = self.cli(["status", "--json"]);
        if !out.status.success() {
            return Err(format!(
                "`wsagent status --json` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "`wsagent status --json` printed no Status ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `wsagent status --json`, parsed; fails the test when it cannot be had.
    #[track_caller]
    pub fn status(&self) -> Status {
        match self.try_status() {
            Ok(s) => s,
            Err(e) => panic!("{e}\n{}", self.report()),
        }
    }

    /// One service's status; fails the test when the daemon does not list it.
    #[track_caller]
    pub fn service(&self, name: &str) -> ServiceStatus {
        let status = self.status();
        match status.services.iter().find(|s| s.name == name) {
            Some(s) => s.clone(),
            None => panic!("no service {name:?} in {status:#?}"),
        }
    }

    /// Poll the status until `pick` returns something; fail early if the daemon exits.
    #[track_caller]
    pub fn wait_status<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        mut pick: impl FnMut(&Status) -> Option<T>,
    ) -> T {
        let mut last = String::from("no answer yet");
        let mut exited = None;
        let got = try_wait_until(timeout, || {
            if let Some(st) = self.try_exit() {
                exited = Some(st);
                return Some(None);
            }
            match self.try_status() {
                Ok(s) => match pick(&s) {
                    Some(v) => Some(Some(v)),
                    None => {
                        last = format!("{s:#?}");
                        None
                    }
                },
                Err(e) => {
                    last = e;
                    None
                }
            }
        });
        match (got, exited) {
            (Some(Some(v)), _) => v,
            (_, Some(st)) => panic!(
                "wsagent exited ({st}) while waiting for {what}; last status: {last}\n{}",
                self.report()
            ),
            _ => panic!(
                "timed out after {timeout:?} waiting for {what}; last status: {last}\n{}",
                self.report()
            ),
        }
    }

    /// Wait until the workspace lifecycle is `want`; returns that status.
    #[track_caller]
    pub fn wait_lifecycle(&mut self, want: Lifecycle, timeout: Duration) -> Status {
        self.wait_status(timeout, &format!("lifecycle {want}"), |s| {
            (s.lifecycle == want).then(|| s.clone())
        })
    }

    /// Wait until service `name` is listed and `pred` holds for it; returns it.
    #[track_caller]
    pub fn wait_service(
        &mut self,
        name: &str,
        pred: impl Fn(&ServiceStatus) -> bool,
        timeout: Duration,
    ) -> ServiceStatus {
        self.wait_status(timeout, &format!("service {name:?} to match"), |s| {
            s.services
                .iter()
                .find(|svc| svc.name == name && pred(svc))
                .cloned()
        })
    }

    /// Send `sig` to the daemon itself (never to the unshare process, which ignores
    /// TERM/INT while it waits for its child).
    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid as i32), sig)
            .unwrap_or_else(|e| panic!("cannot send {sig} to wsagent (pid {}): {e}", self.pid));
    }

    /// The exit status if the daemon has exited (for [`Daemon::start_pid1`]: unshare's,
    /// which mirrors its child's).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("try_wait on wsagent");
            if self.exit.is_some() {
                // The pipes may still hold its last lines: a test reading stderr() right
                // after the exit must see them.
                self.stdout.wait_eof(Duration::from_secs(2));
                self.stderr.wait_eof(Duration::from_secs(2));
            }
        }
        self.exit
    }

    /// Wait for the daemon to exit; fails the test after `timeout`.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match try_wait_until(timeout, || self.try_exit()) {
            Some(st) => st,
            None => panic!(
                "wsagent (pid {}) did not exit within {timeout:?}\n{}",
                self.pid,
                self.report()
            ),
        }
    }

    /// The daemon's descendants now (for PID 1: everything else in its namespace).
    pub fn descendants(&self) -> Vec<Proc> {
        if self.pid1 {
            procfs::in_namespace_of(self.pid)
                .into_iter()
                .filter(|p| p.pid != self.pid)
                .collect()
        } else {
            procfs::descendants(self.pid)
        }
    }

    /// Zombies among [`Daemon::descendants`].
    pub fn zombies(&self) -> Vec<Proc> {
        self.descendants()
            .into_iter()
            .filter(Proc::is_zombie)
            .collect()
    }

    /// Live processes carrying this daemon's tag, the daemon and unshare aside: what it
    /// started and that still runs. Empty after a clean stop.
    pub fn leftovers(&self) -> Vec<Proc> {
        procfs::with_env(TAG_VAR, &self.tag)
            .into_iter()
            .filter(|p| p.pid != self.pid && p.pid != self.child.id() && !p.is_zombie())
            .collect()
    }

    /// A block for failure messages: the daemon's stderr and its processes.
    pub fn report(&self) -> String {
        self.reported.set(true);
        format!(
            "--- wsagent (pid {}) stderr ---\n{}\n--- its processes ---\n{}",
            self.pid,
            self.stderr(),
            procfs::describe(&procfs::with_env(TAG_VAR, &self.tag))
        )
    }

    /// SIGKILL the daemon and everything it started.
    fn kill_everything(&mut self) {
        if self.try_exit().is_none() {
            if self.pid1 {
                // The kernel kills the whole namespace with its PID 1.
                let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
            } else {
                self.freeze_and_kill();
            }
        }
        // Whatever escaped the tree (reparented after an early exit of the daemon).
        for _ in 0..5 {
            let rest = procfs::with_env(TAG_VAR, &self.tag);
            if rest.is_empty() {
                break;
            }
            for p in rest {
                let _ = kill(Pid::from_raw(p.pid as i32), Signal::SIGKILL);
            }
        }
        let _ = self.child.kill();
        let _ = try_wait_until(Duration::from_secs(10), || self.try_exit());
        let _ = try_wait_until(Duration::from_secs(10), || {
            procfs::with_env(TAG_VAR, &self.tag).is_empty()
        });
    }

    /// Stop the daemon, then its descendants until no new one appears (a stopped process
    /// cannot fork), then kill them all: no child escapes between the scan and the kill.
    fn freeze_and_kill(&mut self) {
        let mut frozen = vec![self.pid];
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGSTOP);
        for _ in 0..100 {
            let new: Vec<u32> = procfs::descendants(self.pid)
                .into_iter()
                .map(|p| p.pid)
                .chain(
                    procfs::with_env(TAG_VAR, &self.tag)
                        .into_iter()
                        .map(|p| p.pid),
                )
                .filter(|p| !frozen.contains(p))
                .collect();
            if new.is_empty() {
                break;
            }
            for pid in new {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGSTOP);
                frozen.push(pid);
            }
        }
        for pid in frozen {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.reported.get() {
            eprintln!("{}", self.report());
        }
        self.kill_everything();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workspace_environment_is_clean_and_complete() {
        let ws = Workspace::new()
            .with_env("EXTRA", "1")
            .with_env("WSAGENT_LOG_LEVEL", "trace");
        let env = ws.env();
        let get = |k: &str| env.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.as_str());
        assert_eq!(get("HOME"), Some(ws.home().to_str().unwrap()));
        assert_eq!(get("WSAGENT_SOCKET"), Some(ws.socket().to_str().unwrap()));
        assert_eq!(
            get("WSAGENT_STATE_DIR"),
            Some(ws.state_dir().to_str().unwrap())
        );
        assert_eq!(get("WSAGENT_SYSTEM_CONFIG"), Some(NO_SYSTEM_CONFIG));
        assert_eq!(get("WSAGENT_LOG_LEVEL"), Some("trace"));
        assert_eq!(get("EXTRA"), Some("1"));
        assert_eq!(get(TAG_VAR), Some(ws.tag()));
        assert!(get("CARGO_MANIFEST_DIR").is_none());
        assert!(ws.home().is_dir() && ws.state_dir().is_dir());
        assert!(ws.socket().as_os_str().len() < 100);
    }

    #[test]
    fn commands_run_with_the_workspace_environment_and_a_deadline() {
        let ws = Workspace::new().with_env("EXTRA", "yes");
        let mut cmd = ws.command("sh");
        cmd.args(["-c", "echo $HOME $EXTRA; echo oops >&2; exit 3"]);
        let out = output_within(cmd, Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{} yes\n", ws.home().display())
        );
        assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    }

    #[test]
    fn a_command_past_its_deadline_fails_the_test_and_is_killed() {
        let ws = Workspace::new();
        let mut cmd = ws.command("sleep");
        cmd.arg("30");
        let start = std::time::Instant::now();
        let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            output_within(cmd, Duration::from_millis(200))
        }))
        .unwrap_err();
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("did not finish within"), "{msg}");
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(procfs::with_env(TAG_VAR, ws.tag()).is_empty());
    }

    #[test]
    fn everything_written_before_the_exit_is_in_stderr_once_the_exit_is_seen() {
        // The exit is often noticed before the capture thread has drained the pipe.
        let ws = Workspace::new();
        for _ in 0..20 {
            let mut cmd = ws.command("sh");
            cmd.args([
                "-c",
                "head -c 100000 /dev/zero | tr '\\0' x >&2; echo end >&2; exit 78",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
            let mut child = cmd.spawn().unwrap();
            let stdout = Capture::spawn(child.stdout.take(), None);
            let stderr = Capture::spawn(child.stderr.take(), None);
            let mut d = Daemon {
                pid: child.id(),
                child,
                pid1: false,
                env: ws.env(),
                tag: ws.tag().to_string(),
                state_dir: ws.state_dir(),
                stdout,
                stderr,
                exit: None,
                reported: Default::default(),
            };
            assert_eq!(d.wait_exit(Duration::from_secs(10)).code(), Some(78));
            assert!(d.stderr().ends_with("xend\n"), "{} bytes", d.stderr().len());
        }
    }

    #[test]
    fn dropping_a_workspace_detaches_mounts_left_inside_it() {
        // What a SIGKILLed dockerd leaves behind: its data-root bind-mounted on itself.
        if !crate::real::require_root("bind mounts need root") {
            return;
        }
        let ws = Workspace::new();
        let root = ws.path().join("docker/root");
        std::fs::create_dir_all(&root).unwrap();
        nix::mount::mount(
            Some(&root),
            &root,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        assert_eq!(procfs::mounts_under(ws.path()), std::slice::from_ref(&root));
        let dir = ws.path().to_path_buf();
        drop(ws);
        assert!(procfs::mounts_under(&dir).is_empty());
        assert!(!dir.exists(), "{} was not removed", dir.display());
    }

    #[test]
    fn dropping_a_daemon_kills_the_whole_tree_including_escaped_children() {
        // A stand-in for wsagent: a shell with a child and a double-forked grandchild
        // that escapes the tree; all carry the workspace tag and must die with the drop.
        let ws = Workspace::new();
        let mut cmd = ws.command("sh");
        cmd.args(["-c", "sleep 300 & (setsid sleep 301 &) ; exec sleep 302"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().unwrap();
        let stdout = Capture::spawn(child.stdout.take(), None);
        let stderr = Capture::spawn(child.stderr.take(), None);
        let tag = ws.tag().to_string();
        let daemon = Daemon {
            pid: child.id(),
            child,
            pid1: false,
            env: ws.env(),
            tag: tag.clone(),
            state_dir: ws.state_dir(),
            stdout,
            stderr,
            exit: None,
            reported: Default::default(),
        };
        crate::wait_until(Duration::from_secs(10), "three tagged sleeps", || {
            procfs::with_env(TAG_VAR, &tag)
                .iter()
                .filter(|p| p.comm == "sleep")
                .count()
                == 3
        });
        assert_eq!(daemon.leftovers().len(), 2, "{}", daemon.report());
        drop(daemon);
        assert!(
            procfs::with_env(TAG_VAR, &tag).is_empty(),
            "{}",
            procfs::describe(&procfs::with_env(TAG_VAR, &tag))
        );
    }
}
