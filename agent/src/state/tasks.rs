//! The registry of one-time and startup tasks (`Shared::tasks`): each task's status,
//! output ring (replayed on attach), log file and live broadcast, and its terminal.
//! `startup::tasks` runs them; `wsagent tasks` / `wsagent attach` read them.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use agent_proto::local::{TaskKind, TaskState, TaskStatus};
use bytes::Bytes;
use tokio::io::unix::AsyncFd;
use tokio::sync::{broadcast, watch};
use tokio_util::task::TaskTracker;

/// Output kept per task for `wsagent attach` to replay.
pub const RING_BYTES: usize = 256 * 1024;
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

    pub(crate) fn register(&self, task: Arc<Task>) {
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
    pub(crate) started: Mutex<Option<Instant>>,
    output: Mutex<Output>,
    live: broadcast::Sender<Bytes>,
    pub(crate) master: Mutex<Option<Arc<AsyncFd<OwnedFd>>>>,
    pub log_path: PathBuf,
}

impl Task {
    pub(crate) fn new(
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

    pub(crate) fn output(&self, data: &[u8]) {
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

    pub(crate) fn header(&self, line: &str) {
        let mut o = self.output.lock().expect("lock");
        o.log.write_bytes(line.as_bytes());
    }

    pub(crate) fn master(&self) -> Option<Arc<AsyncFd<OwnedFd>>> {
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

    pub(crate) fn set_status(&self, f: impl FnOnce(&mut TaskStatus)) {
        self.status.send_modify(f);
    }
}

pub(crate) fn set_winsize(fd: &OwnedFd, cols: u16, rows: u16) {
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
