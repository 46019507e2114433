//! Startup step 5 (one-time tasks) and step 7 (startup tasks), and the registry that
//! `wsagent tasks` and `wsagent attach` read.
//!
//! A startup task runs in a pseudo-terminal (opened with `posix_openpt`, every fd
//! close-on-exec; the child is spawned by [`crate::procs::spawn`] as a session leader
//! with the pty slave as its controlling terminal), so programs that check for a TTY
//! behave as in a terminal. A one-time task runs with its output on a pipe and no
//! input. Either way every byte of output, registered secrets masked, goes to a 256 KiB
//! ring buffer (replayed on attach), a log file under the daemon's log dir
//! (`task-<name>.log`, `once-<name>.log`), and a broadcast channel (live attach clients).
//!
//! Tasks end with the daemon: when the stop sequence starts each task's process group
//! gets SIGHUP (what a terminal hang-up sends), then SIGKILL after [`STOP_GRACE`]; if the
//! runtime goes away first, a drop guard sends SIGKILL. Every task runs on the registry's
//! tracker.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_proto::local::{TaskKind, TaskState, TaskStatus};
use bytes::Bytes;
use nix::sys::signal::Signal;
use tokio::io::unix::AsyncFd;
use tokio::sync::{broadcast, watch};
use tokio_util::task::TaskTracker;

use super::{Ctx, OnceConfig, TaskConfig, argv_of};
use crate::daemon::Shared;
use crate::procs::{ExitStatus, Io, Spec};

/// Output kept per task for `wsagent attach` to replay.
pub const RING_BYTES: usize = 256 * 1024;
/// Between SIGHUP and SIGKILL when the daemon stops or a task times out.
pub const STOP_GRACE: Duration = Duration::from_secs(2);
/// Initial terminal size of a task (until a client attaches and resizes it).
pub const INITIAL_SIZE: (u16, u16) = (120, 40);

/// The registry of tasks: `Shared::tasks`.
pub struct State {
    tasks: Mutex<Vec<Arc<Task>>>,
    tracker: TaskTracker,
}

impl Default for State {
    fn default() -> Self {
        State {
            tasks: Mutex::new(Vec::new()),
            tracker: TaskTracker::new(),
        }
    }
}

impl State {
    pub fn list(&self) -> Vec<TaskStatus> {
        self.tasks
            .lock()
            .expect("lock")
            .iter()
            .map(|t| t.status())
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Task>> {
        self.tasks
            .lock()
            .expect("lock")
            .iter()
            .find(|t| t.name == name)
            .cloned()
    }

    /// The tracker every task (and attach session) runs on.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    fn register(&self, task: Arc<Task>) {
        let mut l = self.tasks.lock().expect("lock");
        l.retain(|t| t.name != task.name);
        l.push(task);
    }
}

/// A fixed-size byte ring: keeps the newest [`RING_BYTES`] bytes.
#[derive(Debug, Default)]
pub struct Ring {
    buf: VecDeque<u8>,
    cap: usize,
}

impl Ring {
    pub fn new(cap: usize) -> Ring {
        Ring {
            buf: VecDeque::with_capacity(cap.min(64 * 1024)),
            cap,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        let data = if data.len() > self.cap {
            &data[data.len() - self.cap..]
        } else {
            data
        };
        let over = (self.buf.len() + data.len()).saturating_sub(self.cap);
        self.buf.drain(..over);
        self.buf.extend(data);
    }

    pub fn contents(&self) -> Vec<u8> {
        self.buf.iter().copied().collect()
    }
}

struct Output {
    ring: Ring,
    log: crate::supervisor::output::RotatingFile,
}

/// One task: its status, output and (for tty tasks) terminal.
pub struct Task {
    pub name: String,
    status: watch::Sender<TaskStatus>,
    started: Mutex<Option<Instant>>,
    output: Mutex<Output>,
    live: broadcast::Sender<Bytes>,
    master: Mutex<Option<Arc<AsyncFd<OwnedFd>>>>,
    pub log_path: PathBuf,
}

impl Task {
    fn new(
        name: &str,
        kind: TaskKind,
        blocks_ready: bool,
        tty: bool,
        log_path: PathBuf,
        max_bytes: u64,
    ) -> Arc<Task> {
        let (status, _) = watch::channel(TaskStatus {
            name: name.into(),
            kind,
            state: TaskState::Pending,
            pid: None,
            exit_code: None,
            signal: None,
            started_at: None,
            duration_ms: None,
            blocks_ready,
            tty,
            message: None,
        });
        let (live, _) = broadcast::channel(256);
        Arc::new(Task {
            name: name.into(),
            status,
            started: Mutex::new(None),
            output: Mutex::new(Output {
                ring: Ring::new(RING_BYTES),
                log: crate::supervisor::output::RotatingFile::new(
                    log_path.clone(),
                    max_bytes.max(64 * 1024),
                    1,
                ),
            }),
            live,
            master: Mutex::new(None),
            log_path,
        })
    }

    pub fn status(&self) -> TaskStatus {
        let mut s = self.status.borrow().clone();
        if s.state == TaskState::Running
            && let Some(t) = *self.started.lock().expect("lock")
        {
            s.duration_ms = Some(t.elapsed().as_millis() as u64);
        }
        s
    }

    /// A receiver that sees every status change (e.g. the exit).
    pub fn watch(&self) -> watch::Receiver<TaskStatus> {
        self.status.subscribe()
    }

    fn output(&self, data: &[u8]) {
        let mut o = self.output.lock().expect("lock");
        o.ring.push(data);
        o.log.write_bytes(data);
        // Sent under the lock, so `subscribe` sees each byte exactly once.
        let _ = self.live.send(Bytes::copy_from_slice(data));
    }

    /// The buffered output and a receiver of what comes after it (no gap, no overlap).
    pub fn subscribe(&self) -> (Vec<u8>, broadcast::Receiver<Bytes>) {
        let o = self.output.lock().expect("lock");
        (o.ring.contents(), self.live.subscribe())
    }

    fn header(&self, line: &str) {
        let mut o = self.output.lock().expect("lock");
        o.log.write_bytes(line.as_bytes());
    }

    fn master(&self) -> Option<Arc<AsyncFd<OwnedFd>>> {
        self.master.lock().expect("lock").clone()
    }

    /// Type into the task's terminal. Ignored for tasks without one or that ended.
    pub async fn input(&self, mut data: &[u8]) {
        let Some(m) = self.master() else { return };
        while !data.is_empty() {
            let Ok(mut guard) = m.writable().await else {
                return;
            };
            match guard.try_io(|fd| {
                nix::unistd::write(fd.get_ref().as_fd(), data).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(_)) => return,
                Err(_would_block) => continue,
            }
        }
    }

    /// Resize the task's terminal (the kernel sends SIGWINCH to its foreground group).
    pub fn resize(&self, cols: u16, rows: u16) {
        if let Some(m) = self.master() {
            set_winsize(m.get_ref(), cols, rows);
        }
    }

    fn set_status(&self, f: impl FnOnce(&mut TaskStatus)) {
        self.status.send_modify(f);
    }
}

fn set_winsize(fd: &OwnedFd, cols: u16, rows: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which outlives the call.
    unsafe {
        libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws);
    }
}

/// A pseudo-terminal pair, both ends close-on-exec (no other child inherits them).
pub fn open_pty(cols: u16, rows: u16) -> std::io::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::OFlag;
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname_r(&master)?;
    let slave = nix::fcntl::open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let master = OwnedFd::from(master);
    set_winsize(&master, cols, rows);
    Ok((master, slave))
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// SIGKILL a process group when dropped (unless forgotten): no child outlives a
/// runtime that went away.
pub struct KillGroupOnDrop(pub u32);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        let _ =
            nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.0 as i32), Signal::SIGKILL);
    }
}

/// What to run.
struct Run {
    argv: Vec<String>,
    env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    cwd: PathBuf,
    run_as: Option<crate::procs::RunAs>,
    timeout: Option<Duration>,
    tty: bool,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ended {
    Exited(ExitStatus),
    TimedOut(Duration),
    Stopped,
    SpawnFailed(String),
}

/// How long a tail that could begin a secret waits for the bytes after it before it is
/// shown anyway (see [`crate::secrets::StreamRedactor`]).
const REDACT_HOLD: Duration = Duration::from_millis(50);

/// Read `fd` (a pty master or a pipe) into the task until EOF/EIO, masking registered
/// secrets (also when one is cut across two reads) before any byte reaches the ring, the
/// log file or an attached terminal.
async fn read_output(task: Arc<Task>, fd: Arc<AsyncFd<OwnedFd>>) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut redactor = crate::secrets::StreamRedactor::default();
    let emit = |bytes: Vec<u8>| {
        if !bytes.is_empty() {
            task.output(&bytes);
        }
    };
    loop {
        let readable = if redactor.holding() {
            tokio::select! {
                r = fd.readable() => r,
                _ = tokio::time::sleep(REDACT_HOLD) => {
                    emit(redactor.release());
                    continue;
                }
            }
        } else {
            fd.readable().await
        };
        let Ok(mut guard) = readable else {
            break;
        };
        match guard.try_io(|fd| {
            nix::unistd::read(fd.get_ref().as_fd(), &mut buf).map_err(std::io::Error::from)
        }) {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => emit(redactor.push(&buf[..n])),
            // EIO: every slave fd is closed (the task and its children are gone).
            Ok(Err(_)) => break,
            Err(_would_block) => continue,
        }
    }
    emit(redactor.finish());
}

async fn execute(task: &Arc<Task>, run: Run, stop: tokio_util::sync::CancellationToken) -> Ended {
    if stop.is_cancelled() {
        return Ended::Stopped;
    }
    let mut spec = Spec::new(run.argv.clone());
    spec.env = run.env;
    spec.cwd = Some(run.cwd.clone());
    spec.run_as = run.run_as;
    let reader_fd;
    if run.tty {
        let (master, slave) = match open_pty(INITIAL_SIZE.0, INITIAL_SIZE.1) {
            Ok(p) => p,
            Err(e) => return Ended::SpawnFailed(format!("cannot open a pseudo-terminal: {e}")),
        };
        let dup = |fd: &OwnedFd| fd.try_clone();
        let (Ok(a), Ok(b)) = (dup(&slave), dup(&slave)) else {
            return Ended::SpawnFailed("cannot duplicate the pty slave".into());
        };
        spec.stdin = Io::Fd(slave);
        spec.stdout = Io::Fd(a);
        spec.stderr = Io::Fd(b);
        spec.controlling_tty = true;
        reader_fd = master;
    } else {
        let (r, w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
            Ok(p) => p,
            Err(e) => return Ended::SpawnFailed(format!("cannot create a pipe: {e}")),
        };
        let Ok(w2) = w.try_clone() else {
            return Ended::SpawnFailed("cannot duplicate a pipe".into());
        };
        spec.stdout = Io::Fd(w);
        spec.stderr = Io::Fd(w2);
        reader_fd = r;
    }
    if let Err(e) = set_nonblocking(&reader_fd) {
        return Ended::SpawnFailed(format!("cannot set up the output: {e}"));
    }
    // SAFETY: the fd is owned by the AsyncFd from here on and never closed elsewhere
    // while registered.
    let afd = match unsafe { AsyncFd::register(reader_fd) } {
        Ok(a) => Arc::new(a),
        Err(e) => return Ended::SpawnFailed(format!("cannot set up the output: {e}")),
    };
    task.header(&format!(
        "\n--- {} started: {:?} in {}\n",
        crate::events::now_rfc3339(),
        run.argv,
        run.cwd.display()
    ));
    let mut child = match crate::procs::spawn(spec) {
        Ok(c) => c,
        Err(e) => {
            return Ended::SpawnFailed(format!(
                "cannot start {:?} in {}: {e}",
                run.argv[0],
                run.cwd.display()
            ));
        }
    };
    let guard = KillGroupOnDrop(child.pid);
    if run.tty {
        *task.master.lock().expect("lock") = Some(afd.clone());
    }
    *task.started.lock().expect("lock") = Some(Instant::now());
    task.set_status(|s| {
        s.state = TaskState::Running;
        s.pid = Some(child.pid);
        s.started_at = Some(crate::events::now_rfc3339());
        s.message = None;
    });
    let mut reader = Box::pin(read_output(task.clone(), afd));
    let mut reader_done = false;
    let deadline = run.timeout.map(|t| tokio::time::Instant::now() + t);
    let timed_out = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(timed_out);
    let mut ended: Option<Ended> = None;
    // Hang up first (what closing a terminal does), SIGKILL after the grace.
    let mut kill_at: Option<tokio::time::Instant> = None;
    let status = loop {
        let kill_sleep = async {
            match kill_at {
                Some(k) => tokio::time::sleep_until(k).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            st = child.wait() => break st,
            _ = &mut reader, if !reader_done => reader_done = true,
            _ = &mut timed_out, if ended.is_none() => {
                ended = Some(Ended::TimedOut(run.timeout.unwrap_or_default()));
                child.signal_group(Signal::SIGHUP);
                kill_at = Some(tokio::time::Instant::now() + STOP_GRACE);
            }
            _ = stop.cancelled(), if ended.is_none() => {
                ended = Some(Ended::Stopped);
                child.signal_group(Signal::SIGHUP);
                kill_at = Some(tokio::time::Instant::now() + STOP_GRACE);
            }
            _ = kill_sleep => {
                child.signal_group(Signal::SIGKILL);
                kill_at = None;
            }
        }
    };
    // The rest of the output (a grandchild holding the terminal open must not keep the
    // task "running": give it a moment, then hang up).
    if !reader_done {
        let _ = tokio::time::timeout(Duration::from_millis(500), &mut reader).await;
    }
    drop(reader);
    // Closing the master hangs the terminal up, as closing a terminal window would.
    *task.master.lock().expect("lock") = None;
    match ended {
        // Timed out or stopped: nothing of the group may stay behind.
        Some(e) => {
            drop(guard);
            e
        }
        // A normal exit leaves what the task deliberately detached (nohup, setsid).
        None => {
            std::mem::forget(guard);
            Ended::Exited(status)
        }
    }
}

/// Run a task to its end and record its final state; returns whether it succeeded and
/// a message.
async fn run_to_end(
    task: &Arc<Task>,
    run: Run,
    stop: tokio_util::sync::CancellationToken,
) -> (TaskState, String) {
    let started = Instant::now();
    let ended = execute(task, run, stop).await;
    let (state, code, signal, msg) = match &ended {
        Ended::Exited(st) if st.success() => (TaskState::Succeeded, st.code, None, st.to_string()),
        Ended::Exited(st) => (TaskState::Failed, st.code, st.signal, st.to_string()),
        Ended::TimedOut(t) => (
            TaskState::TimedOut,
            None,
            Some(Signal::SIGHUP as i32),
            format!(
                "timed out after {} and was killed",
                humantime::format_duration(*t)
            ),
        ),
        Ended::Stopped => (
            TaskState::Stopped,
            None,
            None,
            "stopped by the stop sequence".into(),
        ),
        Ended::SpawnFailed(m) => (TaskState::Failed, None, None, m.clone()),
    };
    let took = task
        .started
        .lock()
        .expect("lock")
        .map(|t| t.elapsed())
        .unwrap_or_else(|| started.elapsed());
    task.set_status(|s| {
        s.state = state;
        s.exit_code = code;
        s.signal = signal;
        s.pid = None;
        s.duration_ms = Some(took.as_millis() as u64);
        s.message = Some(msg.clone());
    });
    (state, msg)
}

fn step_outcome(state: TaskState) -> &'static str {
    match state {
        TaskState::Succeeded => "ok",
        TaskState::Stopped => "cut",
        TaskState::Skipped => "skipped",
        _ => "failed",
    }
}

/// The working directory: `~` is HOME, a relative path is under HOME, default HOME.
fn cwd_of(ctx: &Ctx, cwd: &Option<String>) -> PathBuf {
    cwd.as_deref()
        .map(|c| ctx.home.join(ctx.expand(c)))
        .unwrap_or_else(|| ctx.home.clone())
}

/// The marker of a one-time task (`~` is HOME, a relative path is under HOME).
pub fn marker_path(ctx: &Ctx, o: &OnceConfig) -> PathBuf {
    match &o.marker {
        Some(m) => ctx.home.join(ctx.expand(m)),
        None => ctx.state_dir.join("once").join(format!("{}.done", o.name)),
    }
}

fn write_marker(
    path: &Path,
    o: &OnceConfig,
    owner: Option<&crate::procs::RunAs>,
) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        super::fsprep::create_dir(dir, owner).map_err(|e| e.to_string())?;
    }
    let body = format!(
        "once task {:?} succeeded at {}\n",
        o.name,
        crate::events::now_rfc3339()
    );
    // As the user under HOME, never through a link (see crate::userfs).
    crate::userfs::write_atomic(path, body.as_bytes(), 0o644)
        .map_err(|e| format!("cannot write marker {}: {e}", path.display()))?;
    if let (None, Some(o)) = (crate::userfs::user_for(path), owner) {
        // Outside HOME: the marker just made (a link is never followed) is the user's.
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            path,
            Some(nix::unistd::Uid::from_raw(o.uid)),
            Some(nix::unistd::Gid::from_raw(o.gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| format!("cannot chown marker {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Step 5: one-time tasks, in order. Blocking ones are awaited; the others run in the
/// background on the registry's tracker. `Err` names the first blocking one that failed.
pub async fn run_once_tasks(
    shared: &Arc<Shared>,
    ctx: &Arc<Ctx>,
    once: &[OnceConfig],
) -> Result<(), String> {
    let mut first_err = None;
    for o in once {
        let step = format!("once:{}", o.name);
        let task = Task::new(
            &o.name,
            TaskKind::Once,
            o.blocks_ready,
            false,
            ctx.log_dir.join(format!("once-{}.log", o.name)),
            ctx.logs.max_bytes,
        );
        shared.tasks.register(task.clone());
        let marker = marker_path(ctx, o);
        if marker.exists() {
            let msg = format!("already done (marker {} exists)", marker.display());
            task.set_status(|s| {
                s.state = TaskState::Skipped;
                s.message = Some(msg.clone());
            });
            shared.record("startup", &step, "skipped", Some(Duration::ZERO), Some(msg));
            continue;
        }
        let run = Run {
            argv: argv_of(&o.command, &o.shell),
            env: ctx.child_env(&o.env),
            cwd: cwd_of(ctx, &o.cwd),
            run_as: ctx.owner.clone(),
            timeout: o.timeout,
            tty: false,
        };
        let job = {
            let (shared, ctx, o, task, step) = (
                shared.clone(),
                ctx.clone(),
                o.clone(),
                task.clone(),
                step.clone(),
            );
            async move {
                let t = Instant::now();
                shared.record("startup", &step, "running", None, None);
                let (state, mut msg) = run_to_end(&task, run, shared.stop.clone()).await;
                let mut outcome = step_outcome(state);
                if state == TaskState::Succeeded {
                    match write_marker(&marker, &o, ctx.owner.as_ref()) {
                        Ok(()) => msg = format!("done; marker {}", marker.display()),
                        Err(e) => {
                            outcome = "failed";
                            msg = e;
                        }
                    }
                } else {
                    msg = format!(
                        "{msg}; will retry at the next start (output in {})",
                        task.log_path.display()
                    );
                }
                shared.record(
                    "startup",
                    &step,
                    outcome,
                    Some(t.elapsed()),
                    Some(msg.clone()),
                );
                if outcome == "failed" {
                    Err(format!("{step}: {msg}"))
                } else {
                    Ok(())
                }
            }
        };
        if o.blocks_ready {
            // On the tracker even when awaited: the daemon stops polling the startup
            // pipeline when the stop sequence starts, and the task must still see it.
            let r = shared
                .tasks
                .tracker
                .spawn(job)
                .await
                .unwrap_or_else(|e| Err(format!("{step}: panicked: {e}")));
            if let Err(e) = r
                && first_err.is_none()
            {
                first_err = Some(e);
            }
        } else {
            shared.tasks.tracker.spawn(job);
        }
    }
    match first_err {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// Step 7: start every startup task in its pseudo-terminal, then wait for those with
/// `blocks_ready`. `Err` names the first blocking task that did not succeed.
pub async fn run_startup_tasks(
    shared: &Arc<Shared>,
    ctx: &Arc<Ctx>,
    tasks: &[TaskConfig],
) -> Result<(), String> {
    let mut blocking = Vec::new();
    for tc in tasks {
        let step = format!("task:{}", tc.name);
        let task = Task::new(
            &tc.name,
            TaskKind::Task,
            tc.blocks_ready,
            true,
            ctx.log_dir.join(format!("task-{}.log", tc.name)),
            ctx.logs.max_bytes,
        );
        shared.tasks.register(task.clone());
        let mut env = tc.env.clone();
        env.entry("TERM".into())
            .or_insert_with(|| "xterm-256color".into());
        let run = Run {
            argv: argv_of(&tc.command, &tc.shell),
            env: ctx.child_env(&env),
            cwd: cwd_of(ctx, &tc.cwd),
            run_as: ctx.owner.clone(),
            timeout: tc.timeout,
            tty: true,
        };
        let sh = shared.clone();
        let job = async move {
            let t = Instant::now();
            sh.record("startup", &step, "running", None, None);
            let (state, msg) = run_to_end(&task, run, sh.stop.clone()).await;
            let outcome = step_outcome(state);
            sh.record(
                "startup",
                &step,
                outcome,
                Some(t.elapsed()),
                Some(msg.clone()),
            );
            if outcome == "failed" {
                Err(format!("{step}: {msg}"))
            } else {
                Ok(())
            }
        };
        let handle = shared.tasks.tracker.spawn(job);
        if tc.blocks_ready {
            blocking.push(handle);
        }
    }
    let mut first_err = None;
    for h in blocking {
        let r = h
            .await
            .unwrap_or_else(|e| Err(format!("task panicked: {e}")));
        if let Err(e) = r
            && first_err.is_none()
        {
            first_err = Some(e);
        }
    }
    match first_err {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_bytes() {
        let mut r = Ring::new(8);
        r.push(b"hello ");
        r.push(b"world");
        assert_eq!(r.contents(), b"lo world");
        r.push(b"0123456789abc");
        assert_eq!(r.contents(), b"56789abc");
    }

    #[test]
    fn subscribers_get_the_bounded_buffer_then_every_later_byte_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("task-t.log");
        let t = Task::new("t", TaskKind::Task, false, true, log.clone(), 1 << 20);
        t.output(&vec![b'x'; RING_BYTES + 1000]);
        t.output(b"before");
        let (replay, mut rx) = t.subscribe();
        t.output(b"after");
        assert_eq!(replay.len(), RING_BYTES);
        assert!(replay.ends_with(b"xbefore"));
        assert_eq!(&rx.try_recv().unwrap()[..], b"after");
        assert!(rx.try_recv().is_err());
        let logged = std::fs::read(&log).unwrap();
        assert_eq!(logged.len(), RING_BYTES + 1000 + "beforeafter".len());
    }
}
