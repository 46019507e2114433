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

use agent_proto::local::{Level, Lifecycle, ServiceState, ServiceStatus};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Loaded, Sources};
use crate::events::Events;
use crate::signals::Signal;
use crate::state::{Shared, Stage, StepOutcome};
use crate::supervisor::Supervisor;
use crate::supervisor::service::fmt_dur;
use agent_proto::save::SaveResult;

/// The running stop sequence: its exit code and the budget's deadline.
type StopFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = (ExitCode, tokio::time::Instant)> + Send>>;

/// Options of `wsagent run`.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub sources: Sources,
    pub socket: Option<PathBuf>,
    /// The daemon's home (`~` in the config); default `$HOME`.
    pub home: Option<PathBuf>,
}

/// Run the daemon until the stop sequence ends. The config has been loaded and
/// logging set up by the caller. The stop sequence begins at SIGTERM/SIGINT/SIGQUIT,
/// `wsagent shutdown`, or when `shutdown` completes (the CLI passes a future that never
/// does; a test passes its own trigger).
pub async fn run(
    loaded: Loaded,
    opts: Options,
    shutdown: impl std::future::Future<Output = ()>,
) -> ExitCode {
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
    let home = opts.home.clone().unwrap_or_else(crate::paths::home_dir);
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
        supervisor: Mutex::new(Supervisor::new(
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
        current_save: Mutex::new(None),
        stop_save: watch::Sender::new(None),
        last_save: Mutex::new(crate::save::last_outcomes(&state_dir)),
        remote_snapshots: Mutex::new(Vec::new()),
        fresh_token: Mutex::new(None),
        tasks: crate::state::tasks::State::default(),
        open_streams: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        quiet: crate::save::quiet::Quiet::new(),
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

    let socket = crate::api::socket_path(opts.socket.clone(), Some(&config));
    let api = match crate::api::serve(&socket, shared.clone(), &tracker, cancel.clone()) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(socket = %socket.display(), error = %e, "cannot serve the local API; continuing without it");
            false
        }
    };
    if let Some(addr) = config.daemon.metrics
        && let Err(e) =
            crate::api::serve_metrics(addr, shared.clone(), &tracker, cancel.clone()).await
    {
        tracing::error!(address = %addr, error = %e, "cannot serve metrics; continuing without them");
    }

    let mut config_changed = watch_config_files(&opts.sources, &tracker, cancel.clone());
    tracker.spawn(checkpoints(shared.clone()));
    tracker.spawn(check_remote_snapshots(shared.clone()));
    let mut startup = Box::pin(startup_pipeline(shared.clone()));
    let mut startup_done = false;
    let mut stopping: Option<StopFuture> = None;
    let shutdown = futures::FutureExt::fuse(shutdown);
    tokio::pin!(shutdown);
    let (code, deadline) = loop {
        tokio::select! {
            () = &mut shutdown, if stopping.is_none() => {
                tracing::info!("stop requested by the caller");
                shared.stop.cancel();
            }
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
                    let reached = shared.services().signal_all(sig);
                    tracing::info!(signal = sig.as_str(), "{} received: forwarded to the services ({})", sig.as_str(), if reached.is_empty() { "none running".to_string() } else { reached.join(", ") });
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
    shared.services().detach_all();
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
            let (stop, mut changes) = shared.services().reload_plan(&new.config);
            // Stopped without the lock: `logs`, `status` and the other services'
            // controls go on meanwhile.
            futures::future::join_all(stop.iter().map(|h| h.stop(h.cfg.stop_timeout))).await;
            {
                let mut sup = shared.services();
                sup.reload_start(&new.config);
                shared.refresh_watches(&sup);
            }
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
    shared.record(Stage::Startup, "services", StepOutcome::Running, None, None);
    {
        let mut sup = shared.services();
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
        Settled::AllUp => (StepOutcome::Ok, Lifecycle::Ready, None),
        Settled::Failed(names) => (
            StepOutcome::Failed,
            Lifecycle::StartError,
            Some(format!("failed: {}", names.join(", "))),
        ),
        Settled::TimedOut(names) => (
            StepOutcome::Cut,
            Lifecycle::StartTimeout,
            Some(format!("not up in time: {}", names.join(", "))),
        ),
    };
    shared.record(
        Stage::Startup,
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
                    .filter(|o| !matches!(o.result, SaveResult::Unchanged | SaveResult::Clean))
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

/// At start, beside the startup pipeline: one request per repository to its remote;
/// a snapshot of this workspace's branch there that the worktree has not seen is said
/// in `status` and the dashboard, with the command that restores it.
async fn check_remote_snapshots(shared: Arc<Shared>) {
    const LIMIT: Duration = Duration::from_secs(30);
    let cfg = shared.config.read().expect("lock").config.save.clone();
    let env = shared.save_env();
    let deadline = tokio::time::Instant::now() + LIMIT;
    let found = tokio::select! {
        f = crate::save::remote_check::newer_on_remote(&cfg, &env, deadline) => f,
        _ = shared.stop.cancelled() => return,
    };
    for n in &found {
        let line = crate::save::remote_check::message(n);
        tracing::warn!(repo = %n.repo, r#ref = %n.r#ref, "{line}");
        shared.events.note(Level::Warn, line);
    }
    tracing::info!(
        newer = found.len(),
        "checked the remotes for snapshots this workspace has not seen"
    );
    *shared.remote_snapshots.lock().expect("lock") = found;
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

/// How the stop budget is split: the deadline of each phase, counted from the start of
/// the stop. Phases run one after the other, each until its own deadline; reserves
/// kept back for the later phases mean one slow phase cannot starve the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopPlan {
    /// `pre_stop` commands: a fifth of the budget at most.
    pub pre_stop: Duration,
    /// The save: everything up to the services' and the flush's reserves.
    pub save: Duration,
    /// Stopping the services: a quarter of the budget (at most 10 s) is theirs.
    pub services: Duration,
    /// Flushing the dashboard (best effort): a twentieth (at most 500 ms) is its.
    pub flush: Duration,
    /// The whole budget: the process exits by then.
    pub end: Duration,
}

impl StopPlan {
    pub fn new(budget: Duration) -> StopPlan {
        let flush_reserve = (budget / 20).min(Duration::from_millis(500));
        let services_reserve = (budget / 4).min(Duration::from_secs(10));
        StopPlan {
            pre_stop: (budget / 5).min(budget - flush_reserve),
            save: budget - services_reserve - flush_reserve,
            services: budget - flush_reserve,
            // The flush leaves a little of the budget for the exit itself.
            flush: budget - (budget / 50).min(Duration::from_millis(100)),
            end: budget,
        }
    }
}

/// Told each stop phase's name, outcome, duration and message (`Shared::record`).
type Recorder<'a> = dyn Fn(&str, StepOutcome, Option<Duration>, Option<String>) + Sync + 'a;

/// Run one stop phase until `deadline`; `record` is told `running`, then the outcome
/// (`cut` when the deadline came first).
async fn run_phase<F>(
    record: &Recorder<'_>,
    name: &str,
    deadline: tokio::time::Instant,
    fut: F,
) -> StepOutcome
where
    F: std::future::Future<Output = Phase>,
{
    let t = tokio::time::Instant::now();
    record(name, StepOutcome::Running, None, None);
    let (outcome, message) = match tokio::time::timeout_at(deadline, fut).await {
        Ok(Phase::Ok(m)) => (StepOutcome::Ok, m),
        Ok(Phase::Failed(m)) => (StepOutcome::Failed, Some(m)),
        Err(_) => (StepOutcome::Cut, Some("ran out of budget".into())),
    };
    record(name, outcome, Some(t.elapsed()), message);
    outcome
}

async fn stop_sequence(shared: Arc<Shared>) -> (ExitCode, tokio::time::Instant) {
    let config = shared.config.read().expect("lock").config.clone();
    let budget = config.shutdown.budget;
    let start = tokio::time::Instant::now();
    let plan = StopPlan::new(budget);
    // From here every Coder call is best effort (a refused token is expected).
    if let Some(c) = shared.control() {
        c.stopping();
    }
    // A checkpoint in flight becomes the stop's save: full priority again.
    crate::save::boost_checkpoints();
    shared.set_lifecycle(Lifecycle::ShuttingDown);
    tracing::info!(budget = %fmt_dur(budget), "stop sequence started");
    let sh = shared.clone();
    let record = move |name: &str, o: StepOutcome, took: Option<Duration>, m: Option<String>| {
        sh.record(Stage::Shutdown, name, o, took, m)
    };
    let (s1, s2, s3) = (shared.clone(), shared.clone(), shared.clone());
    let pre = config.shutdown.pre_stop.clone();
    let final_state = stop_phases(
        start,
        plan,
        &record,
        pre_stop(pre),
        move |deadline| save_phase(s1, deadline),
        move |deadline| async move {
            let handles = s2.services().handles();
            let left = crate::supervisor::stop_all(&handles, deadline).await;
            if left.is_empty() {
                Phase::Ok(None)
            } else {
                Phase::Failed(format!("still running: {}", left.join(", ")))
            }
        },
        |state| {
            tracing::info!(took = %fmt_dur(start.elapsed()), lifecycle = %state, "stop sequence ended");
            // The final state first, so the flush delivers it to the dashboard; the flush
            // is best effort and does not change the exit code.
            s3.set_lifecycle(state);
        },
        move |deadline| flush_phase(shared, deadline),
    )
    .await;
    let code = if final_state == Lifecycle::Off {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    };
    (code, start + plan.end)
}

/// The stop's phases in order, each under its deadline from `plan`: pre_stop, save,
/// services; then the final state is known (`ended`), then the flush. Returns the final
/// state (`off`, or `shutdown_error` / `shutdown_timeout` when a phase failed or was cut).
#[allow(clippy::too_many_arguments)]
async fn stop_phases<P, S, SF, V, VF, E, F, FF>(
    start: tokio::time::Instant,
    plan: StopPlan,
    record: &Recorder<'_>,
    pre_stop: P,
    save: S,
    services: V,
    ended: E,
    flush: F,
) -> Lifecycle
where
    P: std::future::Future<Output = Phase>,
    S: FnOnce(tokio::time::Instant) -> SF,
    SF: std::future::Future<Output = Phase>,
    V: FnOnce(tokio::time::Instant) -> VF,
    VF: std::future::Future<Output = Phase>,
    E: FnOnce(Lifecycle),
    F: FnOnce(tokio::time::Instant) -> FF,
    FF: std::future::Future<Output = Phase>,
{
    let mut outcomes = Vec::new();
    outcomes.push(run_phase(record, "pre_stop", start + plan.pre_stop, pre_stop).await);
    let d = start + plan.save;
    outcomes.push(run_phase(record, "save", d, save(d)).await);
    let d = start + plan.services;
    outcomes.push(run_phase(record, "services", d, services(d)).await);
    let final_state = if outcomes.contains(&StepOutcome::Failed) {
        Lifecycle::ShutdownError
    } else if outcomes.contains(&StepOutcome::Cut) {
        Lifecycle::ShutdownTimeout
    } else {
        Lifecycle::Off
    };
    ended(final_state);
    let d = start + plan.flush;
    run_phase(record, "flush", d, flush(d)).await;
    final_state
}

async fn pre_stop(cmds: Vec<String>) -> Phase {
    let mut errors = Vec::new();
    for c in &cmds {
        let mut spec = crate::procs::Spec::new(vec!["/bin/sh".into(), "-c".into(), c.clone()]);
        spec.env = crate::supervisor::base_env();
        spec.stdout = crate::procs::Io::Inherit;
        spec.stderr = crate::procs::Io::Inherit;
        spec.kill_on_drop = true;
        match crate::procs::spawn(spec) {
            Ok(mut child) => {
                let st = child.wait().await;
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
    matches!(
        o.result,
        SaveResult::Pushed | SaveResult::Clean | SaveResult::Unchanged
    )
}

/// The flush phase: deliver the last reports to the control plane, within the budget.
async fn flush_phase(shared: Arc<Shared>, deadline: tokio::time::Instant) -> Phase {
    let control = shared.control.lock().expect("lock").clone();
    if let Some(c) = control {
        c.flush(deadline).await;
    }
    Phase::Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    /// The budget split, as a table: (budget) → (pre_stop, save, services, flush).
    #[test]
    fn the_stop_budget_is_split_with_reserves_for_the_later_phases() {
        let s = Duration::from_secs;
        for (budget, pre, save, svc, flush) in [
            // The default 25 s: services keep 6.25 s, the flush 500 ms.
            (s(25), s(5), MS(18_250), MS(24_500), MS(24_900)),
            (s(30), s(6), s(22), MS(29_500), MS(29_900)),
            // Long budgets: the reserves stop growing (10 s, 500 ms, 100 ms).
            (s(120), s(24), MS(109_500), MS(119_500), MS(119_900)),
            // Short ones: everything shrinks in proportion.
            (s(1), MS(200), MS(700), MS(950), MS(980)),
            (MS(100), MS(20), MS(70), MS(95), MS(98)),
        ] {
            let p = StopPlan::new(budget);
            assert_eq!(
                (p.pre_stop, p.save, p.services, p.flush, p.end),
                (pre, save, svc, flush, budget),
                "budget {budget:?}"
            );
            assert!(p.pre_stop <= p.save && p.save <= p.services && p.services <= p.flush);
        }
    }

    type Log = std::sync::Mutex<Vec<(String, StepOutcome, Duration)>>;

    /// Phases of the given lengths (`None`: never ends) run through `stop_phases` under
    /// paused time; each phase's outcome and the virtual time it ended at.
    async fn run_phases(
        budget: Duration,
        lengths: [Option<Duration>; 4],
    ) -> (Lifecycle, Vec<(String, StepOutcome, Duration)>) {
        let start = tokio::time::Instant::now();
        let log: Log = Default::default();
        let record = |name: &str, o: StepOutcome, _: Option<Duration>, _: Option<String>| {
            if o != StepOutcome::Running {
                log.lock().unwrap().push((name.into(), o, start.elapsed()));
            }
        };
        let phase = |len: Option<Duration>| async move {
            match len {
                Some(d) => {
                    tokio::time::sleep(d).await;
                    Phase::Ok(None)
                }
                None => std::future::pending().await,
            }
        };
        let ended = std::sync::Mutex::new(None);
        let state = stop_phases(
            start,
            StopPlan::new(budget),
            &record,
            phase(lengths[0]),
            |_| phase(lengths[1]),
            |_| phase(lengths[2]),
            |s| *ended.lock().unwrap() = Some(s),
            |_| phase(lengths[3]),
        )
        .await;
        assert_eq!(
            *ended.lock().unwrap(),
            Some(state),
            "the final state is told before the flush"
        );
        (state, log.into_inner().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_phase_is_cut_at_its_deadline_and_the_later_ones_still_run() {
        let s = Duration::from_secs;
        let ok = |n: &str, at: Duration| (n.to_string(), StepOutcome::Ok, at);
        let cut = |n: &str, at: Duration| (n.to_string(), StepOutcome::Cut, at);
        // Quick phases: all ok, one after the other, state off.
        let (state, log) =
            run_phases(s(25), [Some(s(1)), Some(s(2)), Some(s(3)), Some(MS(100))]).await;
        assert_eq!(state, Lifecycle::Off);
        assert_eq!(
            log,
            [
                ok("pre_stop", s(1)),
                ok("save", s(3)),
                ok("services", s(6)),
                ok("flush", MS(6_100))
            ]
        );
        // A save that never ends is cut at 18.25 s; the services still get their reserve.
        let (state, log) = run_phases(s(25), [Some(MS(10)), None, Some(s(2)), None]).await;
        assert_eq!(state, Lifecycle::ShutdownTimeout);
        assert_eq!(
            log,
            [
                ok("pre_stop", MS(10)),
                cut("save", MS(18_250)),
                ok("services", MS(20_250)),
                cut("flush", MS(24_900))
            ]
        );
        // Stuck pre_stop and services: cut at 5 s and 24.5 s, and the save between them runs.
        let (state, log) = run_phases(s(25), [None, Some(s(1)), None, Some(MS(1))]).await;
        assert_eq!(state, Lifecycle::ShutdownTimeout);
        assert_eq!(
            log,
            [
                cut("pre_stop", s(5)),
                ok("save", s(6)),
                cut("services", MS(24_500)),
                ok("flush", MS(24_501))
            ]
        );
    }

    /// The stop trigger is a parameter: a caller's future starts the same stop sequence
    /// as SIGTERM, which stops the services and ends `run` with exit code 0.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_callers_shutdown_future_runs_the_stop_sequence() {
        // `run` installs the daemon's signal handlers and its reaper (waitpid(-1)) in
        // this process: only safe with a process of its own, as nextest gives each test.
        if std::env::var_os("NEXTEST").is_none() {
            eprintln!("skipped: needs a process of its own (run it with cargo nextest)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let cfg = d.join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "[daemon]\nstate_dir = \"{state}\"\n[shutdown]\nbudget = \"5s\"\n\
                 [services.dockerd]\nenabled = false\n[services.code-server]\nenabled = false\n\
                 [services.coder-agent]\nenabled = false\n\
                 [services.s]\ncommand = [\"sleep\", \"1000\"]\n\
                 [save]\nroots = []\ncheckpoint = \"off\"\n\
                 [startup]\ndirectories = []\nskel_dir = \"{d}/no-skel\"\n",
                state = d.join("state").display(),
                d = d.display()
            ),
        )
        .unwrap();
        let sources = Sources {
            system_file: None,
            explicit: Some(cfg),
            env: vec![],
        };
        let loaded = crate::config::load(&sources).unwrap();
        let socket = d.join("api.sock");
        let opts = Options {
            sources,
            socket: Some(socket.clone()),
            home: Some(d.to_path_buf()),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let daemon = tokio::spawn(run(loaded, opts, async {
            let _ = rx.await;
        }));
        let client = crate::api::Client::new(socket);
        let pid = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Ok(st) = client.status().await
                    && let Some(pid) = st
                        .services
                        .iter()
                        .find(|s| s.name == "s")
                        .and_then(|s| s.pid)
                    && st.lifecycle == Lifecycle::Ready
                {
                    break pid;
                }
                tokio::time::sleep(MS(20)).await;
            }
        })
        .await
        .expect("the daemon became ready with its service running");
        tx.send(()).unwrap();
        let code = tokio::time::timeout(Duration::from_secs(10), daemon)
            .await
            .expect("run ended within the budget")
            .unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
        assert!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err(),
            "the service's process {pid} is gone"
        );
    }
}
