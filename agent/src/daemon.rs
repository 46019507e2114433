//! The daemon (`wsagent run`): startup pipeline, the main loop that reacts to signals
//! and API requests, and the stop sequence with its budget.
//!
//! The stop trigger is a [`CancellationToken`] (`Shared::stop`), so SIGTERM, SIGINT,
//! `wsagent shutdown` and tests all drive the same path.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use agent_proto::local::{
    EventKind, Level, Lifecycle, ServiceState, ServiceStatus, Status, StepStatus,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Loaded, Sources};
use crate::events::Events;
use crate::signals::Signal;
use crate::supervisor::Supervisor;
use crate::supervisor::service::fmt_dur;

/// Daemon state shared with the local API.
pub struct Shared {
    pub started: Instant,
    pub pid1: bool,
    pub lifecycle: watch::Sender<Lifecycle>,
    pub supervisor: tokio::sync::Mutex<Supervisor>,
    /// Status watches of the services, readable without the supervisor lock.
    pub service_watch: Mutex<BTreeMap<String, watch::Receiver<ServiceStatus>>>,
    pub config: RwLock<Loaded>,
    pub sources: Sources,
    pub startup: Mutex<Vec<StepStatus>>,
    pub shutdown: Mutex<Vec<StepStatus>>,
    pub events: Events,
    /// Cancelled to start the stop sequence.
    pub stop: CancellationToken,
    /// Cancelled when the daemon exits: ends API streams and background tasks.
    pub exit: CancellationToken,
    pub home: PathBuf,
    pub state_dir: PathBuf,
    pub log_dir: PathBuf,
    pub control_status: Mutex<String>,
    /// One-time and startup tasks (`wsagent tasks`, `wsagent attach`).
    pub tasks: crate::startup::State,
}

impl Shared {
    pub fn status(&self) -> Status {
        let services = self
            .service_watch
            .lock()
            .expect("lock")
            .values()
            .map(|w| w.borrow().clone())
            .collect();
        let config = self.config.read().expect("lock");
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            pid1: self.pid1,
            lifecycle: *self.lifecycle.borrow(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            config_files: config.files.clone(),
            services,
            startup: self.startup.lock().expect("lock").clone(),
            shutdown: self.shutdown.lock().expect("lock").clone(),
            control_plane: Some(self.control_status.lock().expect("lock").clone()),
            last_save: Vec::new(),
        }
    }

    pub fn set_lifecycle(&self, state: Lifecycle) {
        let changed = self.lifecycle.send_if_modified(|l| {
            if *l != state {
                *l = state;
                true
            } else {
                false
            }
        });
        if changed {
            let level = match state {
                Lifecycle::StartError | Lifecycle::ShutdownError => Level::Error,
                Lifecycle::StartTimeout | Lifecycle::ShutdownTimeout => Level::Warn,
                _ => Level::Info,
            };
            tracing::info!(lifecycle = %state, "lifecycle {state}");
            self.events.emit(
                level,
                EventKind::Lifecycle { state },
                format!("lifecycle: {state}"),
            );
        }
    }

    fn refresh_watches(&self, sup: &Supervisor) {
        let mut w = self.service_watch.lock().expect("lock");
        w.clear();
        for n in sup.names() {
            if let Some(h) = sup.get(&n) {
                w.insert(n, h.watch());
            }
        }
    }

    pub(crate) fn record(
        &self,
        stage: &str,
        name: &str,
        outcome: &str,
        took: Option<Duration>,
        message: Option<String>,
    ) {
        let list = if stage == "startup" {
            &self.startup
        } else {
            &self.shutdown
        };
        let step = StepStatus {
            name: name.into(),
            outcome: outcome.into(),
            duration_ms: took.map(|d| d.as_millis() as u64),
            message: message.clone(),
        };
        {
            let mut l = list.lock().expect("lock");
            match l.iter_mut().find(|s| s.name == name) {
                Some(s) => *s = step,
                None => l.push(step),
            }
        }
        let mut line = format!("{stage} {name}: {outcome}");
        if let Some(d) = took {
            line.push_str(&format!(" in {}", fmt_dur(d)));
        }
        if let Some(m) = &message {
            line.push_str(&format!(" ({m})"));
        }
        let level = match outcome {
            "failed" => Level::Error,
            "cut" => Level::Warn,
            _ => Level::Info,
        };
        match level {
            Level::Error => tracing::error!(stage, step = name, outcome, "{line}"),
            Level::Warn => tracing::warn!(stage, step = name, outcome, "{line}"),
            _ => tracing::info!(stage, step = name, outcome, "{line}"),
        }
        self.events.emit(
            level,
            EventKind::Step {
                stage: stage.into(),
                name: name.into(),
                outcome: outcome.into(),
                duration_ms: took.map(|d| d.as_millis() as u64),
            },
            line,
        );
    }
}

/// Options of `wsagent run`.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub sources: Sources,
    pub socket: Option<PathBuf>,
}

/// Home directory of the daemon.
pub fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// The socket path: `--socket`, config `daemon.socket`/`WSAGENT_SOCKET`, else
/// `/run/wsagent/wsagent.sock` as root, `$XDG_RUNTIME_DIR/wsagent.sock` otherwise.
pub fn socket_path(explicit: Option<PathBuf>, config: Option<&crate::config::Config>) -> PathBuf {
    if let Some(p) = explicit {
        return p;
    }
    if let Some(s) = config.and_then(|c| c.daemon.socket.clone()) {
        return crate::config::expand_home(&s, &home_dir());
    }
    if let Some(s) = std::env::var_os("WSAGENT_SOCKET") {
        return PathBuf::from(s);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/wsagent/wsagent.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("wsagent.sock"),
        None => std::env::temp_dir().join(format!("wsagent-{}.sock", nix::unistd::geteuid())),
    }
}

/// Run the daemon until the stop sequence ends. The config has been loaded and
/// logging set up by the caller.
pub async fn run(loaded: Loaded, opts: Options) -> ExitCode {
    let pid1 = std::process::id() == 1;
    if !pid1 && let Err(e) = crate::procs::become_subreaper() {
        tracing::warn!(error = %e, "cannot become a child subreaper: orphans of services will not be reaped");
    }
    let (signal_thread, mut signals) = match crate::signals::start() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return ExitCode::from(71);
        }
    };
    let home = home_dir();
    let config = loaded.config.clone();
    let state_dir = config.state_dir(&home);
    let log_dir = config.log_dir(&home);
    let events = Events::new();
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let (lifecycle, _) = watch::channel(Lifecycle::Created);
    let shared = Arc::new(Shared {
        started: Instant::now(),
        pid1,
        lifecycle,
        supervisor: tokio::sync::Mutex::new(Supervisor::new(
            events.clone(),
            tracker.clone(),
            log_dir.clone(),
            config.logs.clone(),
        )),
        service_watch: Mutex::new(BTreeMap::new()),
        config: RwLock::new(loaded),
        sources: opts.sources.clone(),
        startup: Mutex::new(Vec::new()),
        shutdown: Mutex::new(Vec::new()),
        events: events.clone(),
        stop: CancellationToken::new(),
        exit: cancel.clone(),
        home: home.clone(),
        state_dir: state_dir.clone(),
        log_dir,
        control_status: Mutex::new("standalone".into()),
        tasks: crate::startup::State::default(),
    });
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        pid = std::process::id(),
        pid1,
        "wsagent starting{}",
        if pid1 {
            " as PID 1"
        } else {
            " (child subreaper)"
        }
    );

    let socket = socket_path(opts.socket.clone(), Some(&config));
    let api = match crate::api::serve(&socket, shared.clone(), &tracker, cancel.clone()) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(socket = %socket.display(), error = %e, "cannot serve the local API; continuing without it");
            false
        }
    };

    let mut startup = Box::pin(startup_pipeline(shared.clone()));
    let mut startup_done = false;
    let mut stopping: Option<
        std::pin::Pin<Box<dyn std::future::Future<Output = ExitCode> + Send>>,
    > = None;
    let code = loop {
        tokio::select! {
            _ = &mut startup, if !startup_done && stopping.is_none() => { startup_done = true; }
            sig = signals.recv() => match sig {
                Some(Signal::Terminate(name)) => {
                    if stopping.is_some() {
                        tracing::warn!(signal = name, "{name} received during the stop sequence: ignored, the stop sequence goes on");
                    } else {
                        tracing::info!(signal = name, "{name} received: stopping");
                        shared.stop.cancel();
                    }
                }
                Some(Signal::Reload) => {
                    if stopping.is_some() {
                        tracing::warn!("SIGHUP during the stop sequence: ignored");
                    } else {
                        reload(&shared).await;
                    }
                }
                Some(Signal::SaveNow) => {
                    tracing::info!("SIGUSR1 received: saving git work now");
                    shared.events.note(Level::Info, "SIGUSR1: save requested");
                }
                None => {}
            },
            _ = shared.stop.cancelled(), if stopping.is_none() => {
                stopping = Some(Box::pin(stop_sequence(shared.clone())));
            }
            code = async { stopping.as_mut().expect("guarded").await }, if stopping.is_some() => break code,
        }
    };
    // Let `shutdown --wait` clients read the last events, then end every task.
    if api {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancel.cancel();
    shared.supervisor.lock().await.detach_all();
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
    let _ = std::fs::remove_file(&socket);
    signal_thread.close();
    code
}

async fn reload(shared: &Arc<Shared>) {
    tracing::info!("reloading the configuration");
    match crate::config::load(&shared.sources) {
        Err(e) => {
            for p in &e.problems {
                tracing::error!(place = %p, "config reload rejected: {p}");
            }
            shared.events.note(
                Level::Error,
                format!("config reload rejected, keeping the old one: {e}"),
            );
        }
        Ok(new) => {
            let mut sup = shared.supervisor.lock().await;
            let changes = sup.reload(&new.config).await;
            shared.refresh_watches(&sup);
            drop(sup);
            *shared.config.write().expect("lock") = new;
            let msg = if changes.is_empty() {
                "no service changed".to_string()
            } else {
                changes.join(", ")
            };
            tracing::info!("configuration reloaded: {msg}");
            shared
                .events
                .note(Level::Info, format!("configuration reloaded: {msg}"));
        }
    }
}

async fn startup_pipeline(shared: Arc<Shared>) {
    shared.set_lifecycle(Lifecycle::Starting);
    let config = shared.config.read().expect("lock").config.clone();

    let t = Instant::now();
    shared.record("startup", "directories", "running", None, None);
    let mut failed = None;
    for d in [&shared.state_dir, &shared.log_dir] {
        if let Err(e) = std::fs::create_dir_all(d) {
            failed = Some(format!("{}: {e}", d.display()));
        }
    }
    match &failed {
        None => shared.record("startup", "directories", "ok", Some(t.elapsed()), None),
        Some(m) => shared.record(
            "startup",
            "directories",
            "failed",
            Some(t.elapsed()),
            Some(m.clone()),
        ),
    }

    if failed.is_none()
        && let Err(e) = crate::startup::before_services(&shared).await
    {
        failed = Some(e);
    }

    let t = Instant::now();
    shared.record("startup", "services", "running", None, None);
    {
        let mut sup = shared.supervisor.lock().await;
        sup.start_all(&config);
        shared.refresh_watches(&sup);
    }
    let limit = config
        .services
        .values()
        .map(|s| s.start_timeout)
        .max()
        .unwrap_or_default()
        + Duration::from_secs(5);
    let settled = wait_services_settled(&shared, limit).await;
    let (outcome, lifecycle, msg) = match settled {
        Settled::AllUp => ("ok", Lifecycle::Ready, None),
        Settled::Failed(names) => (
            "failed",
            Lifecycle::StartError,
            Some(format!("failed: {}", names.join(", "))),
        ),
        Settled::TimedOut(names) => (
            "cut",
            Lifecycle::StartTimeout,
            Some(format!("not up in time: {}", names.join(", "))),
        ),
    };
    shared.record("startup", "services", outcome, Some(t.elapsed()), msg);
    if let Err(e) = crate::startup::after_services(&shared).await {
        failed = Some(e);
    }
    let lifecycle = if failed.is_some() {
        Lifecycle::StartError
    } else {
        lifecycle
    };
    shared.set_lifecycle(lifecycle);
}

enum Settled {
    AllUp,
    Failed(Vec<String>),
    TimedOut(Vec<String>),
}

async fn wait_services_settled(shared: &Arc<Shared>, limit: Duration) -> Settled {
    let mut watches: Vec<watch::Receiver<ServiceStatus>> = shared
        .service_watch
        .lock()
        .expect("lock")
        .values()
        .cloned()
        .collect();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut failed = Vec::new();
        let mut waiting = Vec::new();
        for w in &watches {
            let s = w.borrow();
            match s.state {
                ServiceState::Running if s.health != agent_proto::local::Health::Unknown => {}
                ServiceState::Absent | ServiceState::Stopped => {}
                ServiceState::Failed => failed.push(s.name.clone()),
                _ => waiting.push(s.name.clone()),
            }
        }
        if waiting.is_empty() {
            return if failed.is_empty() {
                Settled::AllUp
            } else {
                Settled::Failed(failed)
            };
        }
        let changed =
            futures::future::select_all(watches.iter_mut().map(|w| Box::pin(w.changed())));
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            waiting.extend(failed);
            return Settled::TimedOut(waiting);
        }
    }
}

/// Outcome of one stop phase.
enum Phase {
    Ok(Option<String>),
    Failed(String),
}

async fn run_phase<F>(
    shared: &Arc<Shared>,
    name: &str,
    deadline: tokio::time::Instant,
    fut: F,
) -> &'static str
where
    F: std::future::Future<Output = Phase>,
{
    let t = Instant::now();
    shared.record("shutdown", name, "running", None, None);
    match tokio::time::timeout_at(deadline, fut).await {
        Ok(Phase::Ok(m)) => {
            shared.record("shutdown", name, "ok", Some(t.elapsed()), m);
            "ok"
        }
        Ok(Phase::Failed(m)) => {
            shared.record("shutdown", name, "failed", Some(t.elapsed()), Some(m));
            "failed"
        }
        Err(_) => {
            shared.record(
                "shutdown",
                name,
                "cut",
                Some(t.elapsed()),
                Some("ran out of budget".into()),
            );
            "cut"
        }
    }
}

async fn stop_sequence(shared: Arc<Shared>) -> ExitCode {
    let config = shared.config.read().expect("lock").config.clone();
    let budget = config.shutdown.budget;
    let start = tokio::time::Instant::now();
    let deadline = start + budget;
    shared.set_lifecycle(Lifecycle::ShuttingDown);
    tracing::info!(budget = %fmt_dur(budget), "stop sequence started");
    // Time kept back for later phases, so one slow phase cannot starve the rest.
    let flush_reserve = (budget / 20).min(Duration::from_millis(500));
    let services_reserve = (budget / 4).min(Duration::from_secs(10));
    let mut outcomes = Vec::new();

    let pre_stop_deadline = (start + budget / 5).min(deadline - flush_reserve);
    let pre = config.shutdown.pre_stop.clone();
    outcomes.push(run_phase(&shared, "pre_stop", pre_stop_deadline, pre_stop(pre)).await);

    let save_deadline = deadline - services_reserve - flush_reserve;
    outcomes.push(
        run_phase(
            &shared,
            "save",
            save_deadline,
            save_phase(shared.clone(), save_deadline),
        )
        .await,
    );

    let svc_deadline = deadline - flush_reserve;
    let sup = shared.clone();
    outcomes.push(
        run_phase(&shared, "services", svc_deadline, async move {
            let left = sup.supervisor.lock().await.stop_all(svc_deadline).await;
            if left.is_empty() {
                Phase::Ok(None)
            } else {
                Phase::Failed(format!("still running: {}", left.join(", ")))
            }
        })
        .await,
    );

    let final_state = if outcomes.contains(&"failed") {
        Lifecycle::ShutdownError
    } else if outcomes.contains(&"cut") {
        Lifecycle::ShutdownTimeout
    } else {
        Lifecycle::Off
    };
    outcomes.push(run_phase(&shared, "flush", deadline, flush_phase(shared.clone())).await);
    shared.set_lifecycle(final_state);
    tracing::info!(took = %fmt_dur(start.elapsed()), lifecycle = %final_state, "stop sequence ended");
    if final_state == Lifecycle::Off {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn pre_stop(cmds: Vec<String>) -> Phase {
    let mut errors = Vec::new();
    for c in &cmds {
        let mut spec = crate::procs::Spec::new(vec!["/bin/sh".into(), "-c".into(), c.clone()]);
        spec.env = crate::supervisor::base_env();
        spec.stdout = crate::procs::Io::Inherit;
        spec.stderr = crate::procs::Io::Inherit;
        match crate::procs::spawn(spec) {
            Ok(mut child) => {
                let guard = KillGroupOnDrop(child.pid);
                let st = child.wait().await;
                std::mem::forget(guard);
                if !st.success() {
                    errors.push(format!("{c:?}: {st}"));
                }
            }
            Err(e) => errors.push(format!("{c:?}: {e}")),
        }
    }
    if cmds.is_empty() {
        Phase::Ok(Some("nothing to run".into()))
    } else if errors.is_empty() {
        Phase::Ok(None)
    } else {
        Phase::Failed(errors.join("; "))
    }
}

struct KillGroupOnDrop(u32);
impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.0 as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The save phase: the seam the save-on-stop work fills.
async fn save_phase(_shared: Arc<Shared>, _deadline: tokio::time::Instant) -> Phase {
    Phase::Ok(Some("saving is not configured".into()))
}

/// The flush phase: deliver reports (the control-plane reporter plugs in here).
async fn flush_phase(_shared: Arc<Shared>) -> Phase {
    Phase::Ok(None)
}
