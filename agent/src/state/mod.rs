//! The daemon's state: what the local API reads and the startup pipeline, the stop
//! sequence and the checkpoint loop share (`Shared`), with the task registry
//! ([`tasks`]). Below it: save, control, supervisor; above it: startup, api, daemon.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use agent_proto::local::{EventKind, Level, Lifecycle, ServiceStatus, Status, StepStatus};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Loaded, Sources};
use crate::events::Events;
use crate::supervisor::Supervisor;
use crate::supervisor::service::fmt_dur;

pub mod tasks;

/// Which list a step belongs to (`status` shows both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Startup,
    Shutdown,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Startup => "startup",
            Stage::Shutdown => "shutdown",
        }
    }
}

/// A step's outcome, as `status` and the events name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    Running,
    Ok,
    Skipped,
    Failed,
    /// Ran out of its budget.
    Cut,
}

impl StepOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            StepOutcome::Running => "running",
            StepOutcome::Ok => "ok",
            StepOutcome::Skipped => "skipped",
            StepOutcome::Failed => "failed",
            StepOutcome::Cut => "cut",
        }
    }
}

/// Daemon state shared with the local API.
pub struct Shared {
    pub started: Instant,
    pub pid1: bool,
    pub lifecycle: watch::Sender<Lifecycle>,
    /// The set of services. Held only to look up or clone handles, never across an
    /// await: a service's controls are on its own [`crate::supervisor::ServiceHandle`].
    pub supervisor: Mutex<Supervisor>,
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
    /// The save running now, or the last one: a request it covers joins it.
    pub current_save: Mutex<Option<Arc<crate::saverun::SaveRun>>>,
    /// The stop sequence's save, once it has begun: a save asked for during the stop
    /// joins it, or gets its result when it has ended.
    pub stop_save: watch::Sender<Option<Arc<crate::saverun::SaveRun>>>,
    /// The latest save outcome of each repository (read from the journal at start, then
    /// kept current by each save), so `status` never re-reads the journal.
    pub last_save: Mutex<Vec<agent_proto::save::RepoOutcome>>,
    /// Snapshots on the remotes the worktrees have not seen (the start's check).
    pub remote_snapshots: Mutex<Vec<agent_proto::local::RemoteSnapshot>>,
    /// A fresh-token fetch from the control plane, when there is one.
    pub fresh_token: Mutex<Option<crate::tokens::FreshFetch>>,
    /// One-time and startup tasks (`wsagent tasks`, `wsagent attach`).
    pub tasks: tasks::State,
    /// Event streams of the local API still open (`shutdown --wait`, `events`):
    /// the exit waits a little for them to be read, and not at all when there are none.
    pub open_streams: Arc<std::sync::atomic::AtomicUsize>,
    /// Which repositories changed since their last save (inotify): an idle checkpoint
    /// looks at none of the others.
    pub quiet: crate::save::quiet::Quiet,
}

impl Shared {
    /// The supervisor, locked for a lookup (never held across an await).
    pub fn services(&self) -> std::sync::MutexGuard<'_, Supervisor> {
        self.supervisor.lock().expect("lock")
    }

    pub fn control(&self) -> Option<crate::control::ControlHandle> {
        self.control.lock().expect("lock").clone()
    }

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
            // Asked again locally: a restore since the start check clears it.
            remote_snapshots: self
                .remote_snapshots
                .lock()
                .expect("lock")
                .iter()
                .filter(|n| crate::save::remote_check::still_unseen(n))
                .cloned()
                .collect(),
        }
    }

    /// What the save needs to know about this workspace.
    pub fn save_env(&self) -> crate::save::SaveEnv {
        let config = self.config.read().expect("lock").config.clone();
        let mut tokens =
            crate::tokens::Tokens::new(config.git_providers.clone(), self.home.clone());
        tokens.fresh = self.fresh_token.lock().expect("lock").clone();
        let mut env = crate::save::SaveEnv::from_env(
            self.home.clone(),
            self.state_dir.clone(),
            tokens,
            self.events.clone(),
        );
        env.quiet = Some(self.quiet.clone());
        env
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
        self.start_save_as(reason, only, dry_run, None, deadline)
    }

    /// [`Shared::start_save`] for a user who asked through the local API: a new run is
    /// done with `act_as`'s permissions (see [`crate::save::SaveRequest::act_as`]).
    pub fn start_save_as(
        self: &Arc<Self>,
        reason: crate::save::Reason,
        only: Option<PathBuf>,
        dry_run: bool,
        act_as: Option<crate::save::fsids::Ids>,
        deadline: tokio::time::Instant,
    ) -> (Arc<crate::saverun::SaveRun>, bool) {
        // A checkpoint saves the snapshot ref whatever the mode: in branch mode a stop's
        // or a manual save (a commit on the branch) runs after it instead of joining it.
        let branch_mode =
            self.config.read().expect("lock").config.save.mode == crate::save::SaveMode::Branch;
        let mut current = self.current_save.lock().expect("lock");
        let running = current
            .as_ref()
            .filter(|r| !dry_run && !r.is_done() && r.covers(only.as_deref()))
            .filter(|r| {
                !(branch_mode
                    && r.reason == crate::save::Reason::Checkpoint
                    && reason != crate::save::Reason::Checkpoint)
            })
            .cloned();
        let (run, joined) = match running {
            Some(r) => (r, true),
            None => {
                let run = crate::saverun::SaveRun::new(reason, only, dry_run, act_as);
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
        let Some(held) = crate::save::lock(&self.state_dir, deadline).await else {
            return Err("another save was still running at the deadline".into());
        };
        let cfg = self.config.read().expect("lock").config.save.clone();
        let req = crate::save::SaveRequest {
            reason: run.reason,
            only: run.only.clone(),
            dry_run: run.dry_run,
            act_as: run.act_as.clone(),
        };
        let observer: Arc<dyn crate::save::Observer> = run.clone();
        let outcomes = crate::save::save_all_observed(
            &held,
            &cfg,
            &self.save_env(),
            &req,
            deadline,
            Some(observer),
        )
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

    pub(crate) fn refresh_watches(&self, sup: &Supervisor) {
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
        stage: Stage,
        name: &str,
        outcome: StepOutcome,
        took: Option<Duration>,
        message: Option<String>,
    ) {
        let list = match stage {
            Stage::Startup => &self.startup,
            Stage::Shutdown => &self.shutdown,
        };
        let level = match outcome {
            StepOutcome::Failed => Level::Error,
            StepOutcome::Cut => Level::Warn,
            _ => Level::Info,
        };
        let (stage, outcome) = (stage.as_str(), outcome.as_str());
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
