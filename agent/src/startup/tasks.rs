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

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_proto::local::{TaskKind, TaskState};
use nix::sys::signal::Signal;
use tokio::io::unix::AsyncFd;

use super::{Ctx, OnceConfig, TaskConfig, argv_of};
use crate::procs::{ExitStatus, Io, Spec};
use crate::state::tasks::set_winsize;
use crate::state::tasks::{INITIAL_SIZE, Task};
use crate::state::{Shared, Stage, StepOutcome};

/// Between SIGHUP and SIGKILL when the daemon stops or a task times out.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

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
    // Killed with its group if the runtime goes away before the exit is seen.
    spec.kill_on_drop = true;
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
            child.kill_group();
            e
        }
        // A normal exit leaves what the task deliberately detached (nohup, setsid).
        None => Ended::Exited(status),
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

fn step_outcome(state: TaskState) -> StepOutcome {
    match state {
        TaskState::Succeeded => StepOutcome::Ok,
        TaskState::Stopped => StepOutcome::Cut,
        TaskState::Skipped => StepOutcome::Skipped,
        _ => StepOutcome::Failed,
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
            shared.record(
                Stage::Startup,
                &step,
                StepOutcome::Skipped,
                Some(Duration::ZERO),
                Some(msg),
            );
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
                shared.record(Stage::Startup, &step, StepOutcome::Running, None, None);
                let (state, mut msg) = run_to_end(&task, run, shared.stop.clone()).await;
                let mut outcome = step_outcome(state);
                if state == TaskState::Succeeded {
                    match write_marker(&marker, &o, ctx.owner.as_ref()) {
                        Ok(()) => msg = format!("done; marker {}", marker.display()),
                        Err(e) => {
                            outcome = StepOutcome::Failed;
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
                    Stage::Startup,
                    &step,
                    outcome,
                    Some(t.elapsed()),
                    Some(msg.clone()),
                );
                if outcome == StepOutcome::Failed {
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
                .tracker()
                .spawn(job)
                .await
                .unwrap_or_else(|e| Err(format!("{step}: panicked: {e}")));
            if let Err(e) = r
                && first_err.is_none()
            {
                first_err = Some(e);
            }
        } else {
            shared.tasks.tracker().spawn(job);
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
            sh.record(Stage::Startup, &step, StepOutcome::Running, None, None);
            let (state, msg) = run_to_end(&task, run, sh.stop.clone()).await;
            let outcome = step_outcome(state);
            sh.record(
                Stage::Startup,
                &step,
                outcome,
                Some(t.elapsed()),
                Some(msg.clone()),
            );
            if outcome == StepOutcome::Failed {
                Err(format!("{step}: {msg}"))
            } else {
                Ok(())
            }
        };
        let handle = shared.tasks.tracker().spawn(job);
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
