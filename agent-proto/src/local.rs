//! The local control API: HTTP/1.1 + JSON over the daemon's unix socket.
//!
//! Routes (all under `/v1`):
//! - `GET  /v1/status` → [`Status`]
//! - `POST /v1/services/{name}/{start|stop|restart}` → [`ActionReply`]
//! - `GET  /v1/services/{name}/logs?n=N&follow=BOOL` → `text/plain` lines (streamed when following)
//! - `POST /v1/shutdown` with [`ShutdownRequest`] → [`ActionReply`], or with `wait` a
//!   stream of [`Event`] as JSON lines until the daemon is `off`
//! - `GET  /v1/events` → a stream of [`Event`] as JSON lines
//! - `GET  /v1/tasks` → `Vec<`[`TaskStatus`]`>` (one-time tasks and startup tasks)
//! - `GET  /v1/tasks/{name}/attach` with `Connection: Upgrade` and
//!   `Upgrade: wsagent-attach/1` → `101 Switching Protocols`, then the [`attach`]
//!   protocol on the upgraded connection
//!
//! Errors are a non-2xx status with an [`ApiError`] body.

use serde::{Deserialize, Serialize};

/// Workspace lifecycle, in Coder's vocabulary and order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    Created,
    Starting,
    StartTimeout,
    StartError,
    Ready,
    ShuttingDown,
    ShutdownTimeout,
    ShutdownError,
    Off,
}

impl Lifecycle {
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Created => "created",
            Lifecycle::Starting => "starting",
            Lifecycle::StartTimeout => "start_timeout",
            Lifecycle::StartError => "start_error",
            Lifecycle::Ready => "ready",
            Lifecycle::ShuttingDown => "shutting_down",
            Lifecycle::ShutdownTimeout => "shutdown_timeout",
            Lifecycle::ShutdownError => "shutdown_error",
            Lifecycle::Off => "off",
        }
    }
}

impl std::fmt::Display for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// State of one supervised service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    /// Not started yet (waiting for its turn or for a dependency to become healthy).
    Pending,
    /// Running, health check not yet passed.
    Starting,
    /// Running and healthy (or running with no health check).
    Running,
    /// Running, but the health check has failed past its threshold.
    Unhealthy,
    /// Exited; waiting out the restart delay.
    Backoff,
    /// Being stopped.
    Stopping,
    /// Stopped on request (or exited with `restart = never` / clean exit under `on-failure`).
    Stopped,
    /// Gave up: too many failures in the window, or never became healthy. Stays so until
    /// started by hand.
    Failed,
    /// A default service whose program is not installed.
    Absent,
}

impl ServiceState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Pending => "pending",
            ServiceState::Starting => "starting",
            ServiceState::Running => "running",
            ServiceState::Unhealthy => "unhealthy",
            ServiceState::Backoff => "backoff",
            ServiceState::Stopping => "stopping",
            ServiceState::Stopped => "stopped",
            ServiceState::Failed => "failed",
            ServiceState::Absent => "absent",
        }
    }
}

impl std::fmt::Display for ServiceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Result of the last health check of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// The service has no health check.
    None,
    /// No verdict yet.
    Unknown,
    Healthy,
    Unhealthy,
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code, when it exited normally.
    pub code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
    /// RFC 3339 time of the exit.
    pub at: String,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit {c}"),
            (None, Some(s)) => write!(f, "signal {s}"),
            _ => f.write_str("unknown"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub state: ServiceState,
    pub pid: Option<u32>,
    /// Restarts since the daemon started (by policy or by hand).
    pub restarts: u32,
    pub health: Health,
    pub last_exit: Option<ExitInfo>,
    /// Why the service is in its state (e.g. the failing health check, the missing program).
    pub message: Option<String>,
    /// When it entered this state, or its process started (RFC 3339 UTC).
    #[serde(default)]
    pub since: Option<String>,
}

/// One step of the startup pipeline or one phase of the stop sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepStatus {
    pub name: String,
    /// `running`, `ok`, `failed`, `cut` or `skipped`.
    pub outcome: String,
    pub duration_ms: Option<u64>,
    pub message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    /// True when the daemon runs as PID 1 of its pid namespace.
    pub pid1: bool,
    pub lifecycle: Lifecycle,
    pub uptime_ms: u64,
    pub config_files: Vec<String>,
    pub services: Vec<ServiceStatus>,
    /// Startup steps, in order.
    pub startup: Vec<StepStatus>,
    /// Stop phases, in order (empty until the stop sequence starts).
    pub shutdown: Vec<StepStatus>,
    /// Control-plane state: `standalone`, `connected`, `unreachable`, ...
    #[serde(default)]
    pub control_plane: Option<String>,
    /// The most recent save of each repository (from the journal).
    #[serde(default)]
    pub last_save: Vec<crate::save::RepoOutcome>,
    /// Snapshots of this workspace's branches on the remotes that the worktrees have not
    /// seen (checked at start), each with the command that restores it.
    #[serde(default)]
    pub remote_snapshots: Vec<RemoteSnapshot>,
}

/// A snapshot on a repository's remote, of this workspace and branch, that the worktree
/// has not seen (not what it last saved or restored, nor in its history).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteSnapshot {
    pub repo: String,
    pub branch: String,
    /// The remote ref holding it.
    pub r#ref: String,
    pub commit: String,
    /// The local snapshot ref this worktree saves to.
    pub local_ref: String,
    /// The command that restores it.
    pub command: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionReply {
    pub ok: bool,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ShutdownRequest {
    /// Stream progress until the daemon is `off`.
    #[serde(default)]
    pub wait: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// Log levels, in Coder's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// What an [`Event`] is about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
// `Save` carries a whole journal line; events are few, and boxing it would change the
// constructors every producer uses.
#[allow(clippy::large_enum_variant)]
pub enum EventKind {
    /// The workspace lifecycle changed.
    Lifecycle { state: Lifecycle },
    /// A startup step or a stop phase started or ended.
    Step {
        /// `startup` or `shutdown`.
        stage: String,
        name: String,
        outcome: String,
        duration_ms: Option<u64>,
    },
    /// A service changed state or health.
    Service {
        name: String,
        state: ServiceState,
        health: Health,
        pid: Option<u32>,
    },
    /// One repository's save finished.
    Save { outcome: crate::save::RepoOutcome },
    /// Anything else worth a line in the dashboard.
    Note,
}

/// Something the daemon did that a user may want to see: the unit of the event sink that
/// the control-plane reporter, `shutdown --wait` and `save` stream consume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339 time.
    pub at: String,
    pub level: Level,
    /// One human-readable line.
    pub message: String,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// `POST /v1/save`: save git work now (what Coder's `shutdown_script` runs).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SaveRequest {
    /// Only the repository containing this path.
    #[serde(default)]
    pub repo: Option<String>,
    /// Report what would be saved; change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// One line of the `POST /v1/save` stream: `started` once the repositories are found,
/// a `repo` line as each one's outcome lands, then `done` with all of them (or a
/// `progress` line saying why the save could not run). A client ignores types it does
/// not know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)]
pub enum SaveLine {
    Started {
        /// Repositories this save covers (for a request about one repository that
        /// joined a save of all of them: 1).
        repos: usize,
        /// The save was already running (or, during a stop, already ended) and this
        /// request follows it rather than starting another.
        joined: bool,
        /// Why the followed save runs: `stop`, `manual`, `signal`.
        reason: String,
    },
    Repo {
        outcome: crate::save::RepoOutcome,
    },
    Progress {
        event: Event,
    },
    Done {
        outcomes: Vec<crate::save::RepoOutcome>,
    },
}

/// Whether a task is a `[[once]]` task or a `[[task]]` startup task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    Once,
    Task,
}

impl TaskKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Once => "once",
            TaskKind::Task => "task",
        }
    }
}

/// State of a one-time task or a startup task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Not started yet.
    Pending,
    Running,
    /// Exited with code 0.
    Succeeded,
    /// Exited non-zero, was killed by a signal, or could not start.
    Failed,
    /// Killed after its `timeout`.
    TimedOut,
    /// Ended by the stop sequence.
    Stopped,
    /// Not run (a one-time task whose marker exists).
    Skipped,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::TimedOut => "timed_out",
            TaskState::Stopped => "stopped",
            TaskState::Skipped => "skipped",
        }
    }

    /// The task will not produce more output.
    pub fn is_final(self) -> bool {
        !matches!(self, TaskState::Pending | TaskState::Running)
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One task, as `wsagent tasks` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub name: String,
    pub kind: TaskKind,
    pub state: TaskState,
    pub pid: Option<u32>,
    pub exit_code: Option<i32>,
    /// Signal number, when a signal ended it.
    pub signal: Option<i32>,
    /// RFC 3339 time it started.
    pub started_at: Option<String>,
    /// How long it ran (so far, while running).
    pub duration_ms: Option<u64>,
    pub blocks_ready: bool,
    /// It runs in a pseudo-terminal (and takes input through `wsagent attach`).
    pub tty: bool,
    /// Why it is in its state (e.g. the marker that skipped it, the spawn error).
    pub message: Option<String>,
}

/// The attach protocol, spoken both ways on the upgraded connection of
/// `GET /v1/tasks/{name}/attach`.
///
/// Every message is a frame: one kind byte, a big-endian `u32` payload length, then the
/// payload. The server first sends the task's buffered output (up to 256 KiB) as
/// [`DATA`](attach::DATA) frames, then its live output; when the task ends it sends one
/// [`EXIT`](attach::EXIT) frame (an [`AttachExit`] as JSON) and closes. The client sends
/// typed input as `DATA` and its window size as [`RESIZE`](attach::RESIZE)
/// (`cols: u16, rows: u16`, big-endian). Detaching is the client closing the connection:
/// the task keeps running. `wsagent attach` detaches on [`DETACH_KEY`](attach::DETACH_KEY).
pub mod attach {
    /// The `Upgrade` header value.
    pub const PROTOCOL: &str = "wsagent-attach/1";
    /// Terminal bytes (output from the server, input from the client).
    pub const DATA: u8 = 0;
    /// Client → server: the terminal size, `cols: u16, rows: u16` big-endian.
    pub const RESIZE: u8 = 1;
    /// Server → client: the task ended; payload is an [`super::AttachExit`] as JSON.
    pub const EXIT: u8 = 2;
    /// Ctrl-] detaches `wsagent attach` (as in telnet); the task keeps running.
    pub const DETACH_KEY: u8 = 0x1d;
    /// The largest payload either side sends or accepts.
    pub const MAX_FRAME: usize = 1 << 20;
}

/// Payload of the attach protocol's `EXIT` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachExit {
    pub state: TaskState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
}
