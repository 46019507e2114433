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
    /// The control-plane reporter (standalone when Coder is not configured).
    pub control: Mutex<Option<crate::control::ControlHandle>>,
    /// Every background task of the daemon, joined at exit.
    pub tracker: TaskTracker,
    /// One save at a time (stop, `wsagent save`, SIGUSR1).
    pub save_lock: tokio::sync::Mutex<()>,
    /// The save running now, or the last one: a request it covers joins it.
    pub current_save: Mutex<Option<Arc<crate::saverun::SaveRun>>>,
    /// The stop sequence's save, once it has begun: a save asked for during the stop
    /// joins it, or gets its result when it has ended.
    pub stop_save: watch::Sender<Option<Arc<crate::saverun::SaveRun>>>,
    /// The latest save outcome of each repository (read from the journal at start, then
    /// kept current by each save), so `status` never re-reads the journal.
    pub last_save: Mutex<Vec<agent_proto::save::RepoOutcome>>,
    /// A fresh-token fetch from the control plane, when there is one.
    pub fresh_token: Mutex<Option<crate::tokens::FreshFetch>>,
    /// One-time and startup tasks (`wsagent tasks`, `wsagent attach`).
    pub tasks: crate::startup::State,
    /// Event streams of the local API still open (`shutdown --wait`, `events`):
    /// the exit waits a little for them to be read, and not at all when there are none.
    pub open_streams: Arc<std::sync::atomic::AtomicUsize>,
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
            control_plane: Some(
                self.control
                    .lock()
                    .expect("lock")
                    .as_ref()
                    .map(|c| c.status())
                    .unwrap_or_else(|| "standalone".into()),
            ),
            last_save: self.last_save.lock().expect("lock").clone(),
        }
    }

    /// What the save needs to know about this workspace.
    pub fn save_env(&self) -> crate::save::SaveEnv {
        let config = self.config.read().expect("lock").config.clone();
        let mut tokens =
            crate::tokens::Tokens::new(config.git_providers.clone(), self.home.clone());
        tokens.fresh = self.fresh_token.lock().expect("lock").clone();
        let nonempty = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        crate::save::SaveEnv {
            home: self.home.clone(),
            state_dir: self.state_dir.clone(),
            workspace: nonempty("CODER_WORKSPACE_NAME").unwrap_or_else(|| {
                nix::unistd::gethostname()
                    .ok()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "workspace".into())
            }),
            owner_name: nonempty("CODER_WORKSPACE_OWNER_NAME"),
            owner_email: nonempty("CODER_WORKSPACE_OWNER_EMAIL"),
            ref_owner: nonempty("CODER_WORKSPACE_OWNER_NAME"),
            tokens,
            events: self.events.clone(),
        }
    }

    /// Save git work, returning by `deadline`: joins the save already running when it
    /// covers the same repositories, else starts one (which waits for the running one).
    pub async fn save(
        self: &Arc<Self>,
        reason: crate::save::Reason,
        only: Option<PathBuf>,
        dry_run: bool,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<agent_proto::save::RepoOutcome>, String> {
        let (run, _joined) = self.start_save(reason, only, dry_run, deadline);
        match tokio::time::timeout_at(deadline, run.wait()).await {
            Ok(r) => r,
            Err(_) => Err("the deadline passed before the save ended".into()),
        }
    }

    /// The save for this request: the running one when it covers it (`true`: joined),
    /// else a new one, started on the daemon's tracker. A stop's save is recorded as the
    /// stop sequence's.
    pub fn start_save(
        self: &Arc<Self>,
        reason: crate::save::Reason,
        only: Option<PathBuf>,
        dry_run: bool,
        deadline: tokio::time::Instant,
    ) -> (Arc<crate::saverun::SaveRun>, bool) {
        let mut current = self.current_save.lock().expect("lock");
        let running = current
            .as_ref()
            .filter(|r| !dry_run && !r.is_done() && r.covers(only.as_deref()))
            .cloned();
        let (run, joined) = match running {
            Some(r) => (r, true),
            None => {
                let run = crate::saverun::SaveRun::new(reason, only, dry_run);
                if !dry_run {
                    *current = Some(run.clone());
                }
                let (s, r) = (self.clone(), run.clone());
                self.tracker.spawn(async move {
                    let result = s.run_save(&r, deadline).await;
                    r.finish(result);
                });
                (run, false)
            }
        };
        drop(current);
        if reason == crate::save::Reason::Stop {
            self.stop_save.send_replace(Some(run.clone()));
        }
        (run, joined)
    }

    /// One save, after the one before it.
    async fn run_save(
        &self,
        run: &Arc<crate::saverun::SaveRun>,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<agent_proto::save::RepoOutcome>, String> {
        let Ok(_guard) = tokio::time::timeout_at(deadline, self.save_lock.lock()).await else {
            return Err("another save was still running at the deadline".into());
        };
        let cfg = self.config.read().expect("lock").config.save.clone();
        let req = crate::save::SaveRequest {
            reason: run.reason,
            only: run.only.clone(),
            dry_run: run.dry_run,
        };
        let observer: Arc<dyn crate::save::Observer> = run.clone();
        let outcomes =
            crate::save::save_all_observed(&cfg, &self.save_env(), &req, deadline, Some(observer))
                .await;
        // What the save allocated is free now: give it back (issue 16, "memory").
        crate::alloc::release_free_memory();
        if !run.dry_run {
            let mut last = self.last_save.lock().expect("lock");
            for o in &outcomes {
                last.retain(|l| l.repo != o.repo);
                last.push(o.clone());
            }
            last.sort_by(|a, b| a.repo.cmp(&b.repo));
        }
        Ok(outcomes)
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

/// The running stop sequence: its exit code and the budget's deadline.
type StopFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = (ExitCode, tokio::time::Instant)> + Send>>;

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
        control: Mutex::new(None),
        tracker: tracker.clone(),
        save_lock: tokio::sync::Mutex::new(()),
        current_save: Mutex::new(None),
        stop_save: watch::Sender::new(None),
        last_save: Mutex::new(crate::save::last_outcomes(&state_dir)),
        fresh_token: Mutex::new(None),
        tasks: crate::startup::State::default(),
        open_streams: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    });
    // The reporter subscribes first, so the dashboard gets every line from here on.
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let control = crate::control::ControlPlane::new(&config, &env, home.clone()).start(
        &events,
        &tracker,
        cancel.clone(),
    );
    *shared.fresh_token.lock().expect("lock") = Some(control.fresh_fetch());
    *shared.control.lock().expect("lock") = Some(control);
    if let Some(summary) = crate::save::previous_save_summary(&state_dir) {
        tracing::info!("previous save: {summary}");
        shared
            .events
            .note(Level::Info, format!("previous save: {summary}"));
    }
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

    if std::env::var("CODER_WORKSPACE_NAME").map_or(true, |v| v.trim().is_empty()) {
        let host = shared.save_env().workspace;
        tracing::warn!(
            host = %host,
            "CODER_WORKSPACE_NAME is not set: snapshot refs are named after the host name \
             ({host}), which a Kubernetes pod changes at every start, so earlier snapshots are \
             hard to find; pass it to the container (see images/coder-template)"
        );
        shared.events.note(
            Level::Warn,
            format!(
                "CODER_WORKSPACE_NAME is not set: snapshots are named after the host name {host}"
            ),
        );
    }

    let socket = socket_path(opts.socket.clone(), Some(&config));
    let api = match crate::api::serve(&socket, shared.clone(), &tracker, cancel.clone()) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(socket = %socket.display(), error = %e, "cannot serve the local API; continuing without it");
            false
        }
    };

    let mut config_changed = watch_config_files(&opts.sources, &tracker, cancel.clone());
    tracker.spawn(checkpoints(shared.clone()));
    let mut startup = Box::pin(startup_pipeline(shared.clone()));
    let mut startup_done = false;
    let mut stopping: Option<StopFuture> = None;
    let (code, deadline) = loop {
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
                Some(Signal::Forward(sig)) => {
                    // Not under the main loop: the stop sequence may hold the supervisor.
                    let s = shared.clone();
                    tracker.spawn(async move {
                        let reached = s.supervisor.lock().await.signal_all(sig);
                        tracing::info!(signal = sig.as_str(), "{} received: forwarded to the services ({})", sig.as_str(), if reached.is_empty() { "none running".to_string() } else { reached.join(", ") });
                    });
                }
                Some(Signal::Ignored(sig)) => {
                    let name = crate::signals::name(sig);
                    tracing::warn!(signal = %name, "{name} received: ignored");
                }
                Some(Signal::Reload) => {
                    if stopping.is_some() {
                        tracing::warn!("SIGHUP during the stop sequence: ignored");
                    } else {
                        reload(&shared).await;
                    }
                }
                Some(Signal::SaveNow) => {
                    if stopping.is_some() {
                        tracing::info!("SIGUSR1 received during the stop sequence: the stop saves anyway");
                    } else {
                        tracing::info!("SIGUSR1 received: saving git work now");
                        let s = shared.clone();
                        let budget = s.config.read().expect("lock").config.shutdown.budget;
                        tracker.spawn(async move {
                            let deadline = tokio::time::Instant::now() + budget;
                            if let Err(e) = s.save(crate::save::Reason::Signal, None, false, deadline).await {
                                tracing::warn!("SIGUSR1 save skipped: {e}");
                            }
                        });
                    }
                }
                None => {}
            },
            Some(()) = config_changed.recv() => {
                // Editors write in several steps: let the burst settle, then reload once.
                tokio::time::sleep(Duration::from_millis(150)).await;
                while config_changed.try_recv().is_ok() {}
                if stopping.is_none() {
                    tracing::info!("a config file changed");
                    reload(&shared).await;
                }
            }
            _ = shared.stop.cancelled(), if stopping.is_none() => {
                stopping = Some(Box::pin(stop_sequence(shared.clone())));
            }
            code = async { stopping.as_mut().expect("guarded").await }, if stopping.is_some() => break code,
        }
    };
    // Let `shutdown --wait` clients read the last events, then end every task.
    // Then end every task, bounded by what is left of the budget (a stuck HTTP call of
    // the reporter must not hold the exit).
    let join_by = deadline.max(tokio::time::Instant::now() + Duration::from_millis(100));
    // Only while a stream is open (a client that has its final event ends its stream at
    // once), so an exit nobody watches does not wait at all.
    if api {
        let until = tokio::time::Instant::now() + Duration::from_millis(50);
        while shared
            .open_streams
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0
            && tokio::time::Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    cancel.cancel();
    shared.supervisor.lock().await.detach_all();
    tracker.close();
    let tasks = shared.tasks.tracker().clone();
    tasks.close();
    let _ = tokio::time::timeout_at(join_by, async {
        tokio::join!(tracker.wait(), tasks.wait())
    })
    .await;
    let _ = std::fs::remove_file(&socket);
    signal_thread.close();
    code
}

/// Watch the config files (polled: see `crate::watch`); the receiver gets `()` after
/// each change. Files that do not exist yet are watched for their creation.
fn watch_config_files(
    sources: &Sources,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> tokio::sync::mpsc::UnboundedReceiver<()> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let files: Vec<PathBuf> = [sources.system_file.clone(), sources.explicit.clone()]
        .into_iter()
        .flatten()
        .collect();
    tracker.spawn(crate::watch::poll(
        files,
        crate::watch::INTERVAL,
        cancel,
        move |_| {
            let _ = tx.send(());
        },
    ));
    rx
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
            let mut changes = sup.reload(&new.config).await;
            shared.refresh_watches(&sup);
            drop(sup);
            let old = shared.config.read().expect("lock").config.clone();
            changes.extend(start_only_changes(&old, &new.config));
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

    // Directories, skeleton, dotfiles, git token, one-time tasks.
    let mut failed = crate::startup::before_services(&shared).await.err();

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
    shared.record(
        "startup",
        "services",
        outcome,
        Some(t.elapsed()),
        msg.clone(),
    );
    if let Err(e) = crate::startup::after_services(&shared).await {
        failed = Some(e);
    }
    let lifecycle = if failed.is_some() {
        Lifecycle::StartError
    } else {
        lifecycle
    };
    shared.set_lifecycle(lifecycle);
    if let Some(c) = shared.control() {
        match lifecycle {
            Lifecycle::Ready => {
                let n = shared.service_watch.lock().expect("lock").len();
                let last = crate::save::previous_save_summary(&shared.state_dir)
                    .map(|s| format!("; last save: {s}"))
                    .unwrap_or_default();
                c.app_status(
                    "complete",
                    &format!("workspace ready, {n} services up{last}"),
                )
                .await;
            }
            _ => {
                let why = failed.or(msg).unwrap_or_else(|| lifecycle.to_string());
                c.app_status("failure", &format!("startup: {why}")).await;
            }
        }
    }
}

/// `save.checkpoint`: once the start has ended, every interval (read anew each time, so
/// a reload applies), save what changed. A save already running is joined; an interval
/// where nothing changed costs the work of noticing it, no request. Ends when the stop
/// sequence begins (its save takes over a checkpoint in flight by joining it).
async fn checkpoints(shared: Arc<Shared>) {
    let mut lifecycle = shared.lifecycle.subscribe();
    let started = lifecycle.wait_for(|l| *l != Lifecycle::Starting);
    tokio::select! {
        _ = started => {}
        _ = shared.stop.cancelled() => return,
    }
    loop {
        let (every, budget) = {
            let c = &shared.config.read().expect("lock").config;
            (c.save.checkpoint.0, c.shutdown.budget)
        };
        // Off: look again now and then, in case a reload turns it on.
        let wait = every.unwrap_or(Duration::from_secs(60));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.stop.cancelled() => return,
        }
        if every.is_none() || shared.stop.is_cancelled() {
            continue;
        }
        let t = Instant::now();
        let deadline = tokio::time::Instant::now() + budget;
        let (run, joined) =
            shared.start_save(crate::save::Reason::Checkpoint, None, false, deadline);
        let result = tokio::select! {
            r = run.wait() => r,
            _ = shared.stop.cancelled() => return,
        };
        match result {
            Ok(outcomes) => {
                let changed = outcomes
                    .iter()
                    .filter(|o| !matches!(o.result.as_str(), "unchanged" | "clean"))
                    .count();
                tracing::debug!(
                    repos = outcomes.len(),
                    changed,
                    joined,
                    took_ms = t.elapsed().as_millis() as u64,
                    "checkpoint done"
                );
            }
            Err(e) => tracing::warn!(error = %e, "checkpoint skipped"),
        }
    }
}

/// What a reload changes outside the services: `daemon.api_user` is applied at once
/// (the socket's owner and the uid served); the rest named here is read at start only,
/// and the reload says so. (`[save]` and `[shutdown]` are read when used, so they
/// apply at once without a word.)
fn start_only_changes(old: &crate::config::Config, new: &crate::config::Config) -> Vec<String> {
    let mut out = Vec::new();
    let (od, nd) = (&old.daemon, &new.daemon);
    if od.api_user != nd.api_user {
        match crate::api::set_api_user(nd.api_user.as_deref()) {
            Ok(()) => out.push(format!(
                "daemon.api_user now {}",
                nd.api_user
                    .as_deref()
                    .unwrap_or("unset (root and the daemon's uid)")
            )),
            Err(e) => {
                tracing::error!(error = %e, "daemon.api_user: cannot hand the socket over");
                out.push(format!("daemon.api_user not applied: {e}"));
            }
        }
    }
    let at_start = [
        ("daemon.state_dir", od.state_dir != nd.state_dir),
        ("daemon.log_dir", od.log_dir != nd.log_dir),
        ("daemon.socket", od.socket != nd.socket),
        ("daemon.log_level", od.log_level != nd.log_level),
        ("control_plane", old.control_plane != new.control_plane),
        ("startup", old.startup != new.startup),
        ("dotfiles", old.dotfiles != new.dotfiles),
        ("once", old.once != new.once),
        ("task", old.task != new.task),
    ];
    for (key, changed) in at_start {
        if changed {
            out.push(format!("{key} changed: takes effect at the next start"));
        }
    }
    if old.git_providers != new.git_providers {
        out.push(
            "git_providers changed: saves use it now, the token refresh from the next start".into(),
        );
    }
    out
}

/// Startup waits briefly (bounded) for a fresh git token before services that need it.
pub(crate) async fn git_token_step(shared: &Arc<Shared>) {
    let Some(c) = shared.control() else { return };
    if c.status().starts_with("standalone") {
        shared.record(
            "startup",
            "git token",
            "skipped",
            None,
            Some("standalone".into()),
        );
        return;
    }
    let t = Instant::now();
    shared.record("startup", "git token", "running", None, None);
    c.refresh_tokens_once(Duration::from_secs(5)).await;
    shared.record("startup", "git token", "ok", Some(t.elapsed()), None);
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

async fn stop_sequence(shared: Arc<Shared>) -> (ExitCode, tokio::time::Instant) {
    let config = shared.config.read().expect("lock").config.clone();
    let budget = config.shutdown.budget;
    let start = tokio::time::Instant::now();
    let deadline = start + budget;
    // From here every Coder call is best effort (a refused token is expected).
    if let Some(c) = shared.control() {
        c.stopping();
    }
    // A checkpoint in flight becomes the stop's save: full priority again.
    crate::save::boost_checkpoints();
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
    tracing::info!(took = %fmt_dur(start.elapsed()), lifecycle = %final_state, "stop sequence ended");
    // The final state first, so the flush delivers it to the dashboard; the flush is
    // best effort and does not change the exit code.
    shared.set_lifecycle(final_state);
    // The flush leaves a little of the budget for the exit itself.
    let flush_deadline = deadline - (budget / 50).min(Duration::from_millis(100));
    run_phase(
        &shared,
        "flush",
        flush_deadline,
        flush_phase(shared.clone(), flush_deadline),
    )
    .await;
    let code = if final_state == Lifecycle::Off {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    };
    (code, deadline)
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

/// The save phase: every repository's unsaved work, committed and pushed.
async fn save_phase(shared: Arc<Shared>, deadline: tokio::time::Instant) -> Phase {
    let outcomes = match shared
        .save(crate::save::Reason::Stop, None, false, deadline)
        .await
    {
        Ok(o) => o,
        Err(e) => return Phase::Failed(e),
    };
    summarize_save(&outcomes)
}

/// `ok` when nothing is left unpushed; the message counts each result.
fn summarize_save(outcomes: &[agent_proto::save::RepoOutcome]) -> Phase {
    if outcomes.is_empty() {
        return Phase::Ok(Some("no repository found".into()));
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for o in outcomes {
        *counts.entry(o.result.as_str()).or_default() += 1;
    }
    let msg = counts
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ");
    if outcomes.iter().all(save_ok) {
        Phase::Ok(Some(msg))
    } else {
        Phase::Failed(msg)
    }
}

/// A repository whose work is safe on its remote (or had nothing to save).
pub fn save_ok(o: &agent_proto::save::RepoOutcome) -> bool {
    matches!(o.result.as_str(), "pushed" | "clean" | "unchanged")
}

/// The flush phase: deliver the last reports to the control plane, within the budget.
async fn flush_phase(shared: Arc<Shared>, deadline: tokio::time::Instant) -> Phase {
    let control = shared.control.lock().expect("lock").clone();
    if let Some(c) = control {
        c.flush(deadline).await;
    }
    Phase::Ok(None)
}

impl Shared {
    fn control(&self) -> Option<crate::control::ControlHandle> {
        self.control.lock().expect("lock").clone()
    }
}
