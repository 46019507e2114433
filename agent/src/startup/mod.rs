//! The startup pipeline's preparation steps and startup tasks (issue 5).
//!
//! The daemon calls [`before_services`] (directories, skeleton, dotfiles, the git-token
//! hook, one-time tasks) and [`after_services`] (startup tasks in pseudo-terminals), and
//! merges [`routes`] into the local API. Each step records itself with
//! `shared.record(Stage::Startup, name, outcome, duration, message)`, which logs it, shows it
//! in `wsagent status` and sends it as an event. Steps are independent: a failing step
//! does not stop the later ones, but the first failure is returned so the lifecycle
//! becomes `start_error` naming it.
//!
//! Submodules: [`fsprep`] (directories and skeleton), [`dotfiles`] (Coder-compatible
//! dotfiles), [`tasks`] (one-time tasks and startup tasks, their registry, output ring
//! buffers and pseudo-terminals), [`attach`] (the `wsagent tasks` / `wsagent attach`
//! clients and the attach protocol's server side).

pub mod attach;
pub mod dotfiles;
pub mod fsprep;
pub mod tasks;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::state::{Shared, Stage, StepOutcome};

pub use crate::config::startup::{DotfilesConfig, OnceConfig, TaskConfig, argv_of};

/// Declare HOME's user to [`crate::userfs`]: `startup.user` when it resolves, else the
/// owner of HOME (only a root daemon has one).
pub fn set_realm(home: &Path, config: &crate::config::Config) {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let user = config
        .startup
        .user
        .as_deref()
        .and_then(|u| crate::procs::resolve_user(u, None).ok())
        .map(|o| crate::userfs::Ids {
            uid: o.uid,
            gid: o.gid,
        });
    crate::userfs::set_realm(home, user);
}

/// What the steps need to know, resolved once per start.
pub struct Ctx {
    pub home: PathBuf,
    pub state_dir: PathBuf,
    pub log_dir: PathBuf,
    /// Owner for what the pipeline creates (only when running as root with
    /// `startup.user`).
    pub owner: Option<crate::procs::RunAs>,
    pub logs: crate::config::LogsConfig,
}

impl Ctx {
    fn new(shared: &Shared, config: &crate::config::Config) -> Result<Ctx, String> {
        let owner = match &config.startup.user {
            Some(u) if nix::unistd::geteuid().is_root() => Some(
                crate::procs::resolve_user(u, None).map_err(|e| format!("startup.user: {e}"))?,
            ),
            Some(u) => {
                tracing::debug!(user = %u, "startup.user is only used when wsagent runs as root");
                None
            }
            None => None,
        };
        set_realm(&shared.home, config);
        Ok(Ctx {
            home: shared.home.clone(),
            state_dir: shared.state_dir.clone(),
            log_dir: shared.log_dir.clone(),
            owner,
            logs: config.logs.clone(),
        })
    }

    pub fn expand(&self, p: &str) -> PathBuf {
        crate::paths::expand_home(p, &self.home)
    }

    /// The environment of the children the pipeline runs.
    pub fn child_env(
        &self,
        extra: &BTreeMap<String, String>,
    ) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
        let mut env: BTreeMap<std::ffi::OsString, std::ffi::OsString> =
            crate::supervisor::base_env().into_iter().collect();
        env.insert("HOME".into(), self.home.clone().into_os_string());
        if let Some(o) = &self.owner {
            env.insert("USER".into(), o.name.clone().into());
            env.insert("LOGNAME".into(), o.name.clone().into());
        }
        for (k, v) in extra {
            env.insert(k.into(), v.into());
        }
        env.into_iter().collect()
    }
}

/// Run one step, recording `running` and then its outcome.
async fn step<F>(shared: &Shared, name: &str, fut: F) -> Result<(), String>
where
    F: std::future::Future<Output = StepResult>,
{
    let t = Instant::now();
    shared.record(Stage::Startup, name, StepOutcome::Running, None, None);
    match fut.await {
        StepResult::Ok(m) => {
            shared.record(Stage::Startup, name, StepOutcome::Ok, Some(t.elapsed()), m);
            Ok(())
        }
        StepResult::Skipped(m) => {
            shared.record(
                Stage::Startup,
                name,
                StepOutcome::Skipped,
                Some(t.elapsed()),
                Some(m),
            );
            Ok(())
        }
        StepResult::Failed(m) => {
            shared.record(
                Stage::Startup,
                name,
                StepOutcome::Failed,
                Some(t.elapsed()),
                Some(m.clone()),
            );
            Err(format!("{name}: {m}"))
        }
    }
}

/// The outcome of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepResult {
    /// Done, with an optional note (e.g. warnings).
    Ok(Option<String>),
    Skipped(String),
    Failed(String),
}

/// Steps before the services start. Each step records itself with
/// `shared.record(Stage::Startup, name, outcome, duration, message)`. An `Err` names the
/// failing step and makes the lifecycle `start_error` (services still start).
pub async fn before_services(shared: &Arc<Shared>) -> Result<(), String> {
    let config = shared.config.read().expect("lock").config.clone();
    let ctx = match Ctx::new(shared, &config) {
        Ok(c) => Arc::new(c),
        Err(m) => {
            shared.record(
                Stage::Startup,
                "directories",
                StepOutcome::Failed,
                None,
                Some(m.clone()),
            );
            return Err(format!("directories: {m}"));
        }
    };
    let mut first_err: Option<String> = None;
    let mut note = |r: Result<(), String>| {
        if let Err(e) = r
            && first_err.is_none()
        {
            first_err = Some(e);
        }
    };

    // 1. Directories.
    let dirs: Vec<PathBuf> = config
        .startup
        .directories
        .iter()
        .map(|d| ctx.expand(d))
        .chain([ctx.state_dir.clone(), ctx.log_dir.clone()])
        .collect();
    note(
        step(shared, "directories", async {
            fsprep::directories(&dirs, ctx.owner.as_ref())
        })
        .await,
    );

    // 2. Skeleton.
    let skel = ctx.expand(&config.startup.skel_dir);
    note(
        step(shared, "skeleton", async {
            fsprep::skeleton(&skel, &ctx.home, ctx.owner.as_ref())
        })
        .await,
    );

    // 3. Dotfiles.
    let repo = dotfiles_repo(&config.dotfiles);
    note(
        step(shared, "dotfiles", async {
            match repo {
                None => StepResult::Skipped("no dotfiles.repo and no DOTFILES_URI".into()),
                Some(url) => dotfiles::run(&ctx, &config.dotfiles, &url).await,
            }
        })
        .await,
    );

    // 4. Git token: fetched fresh (bounded) before the one-time tasks, which may clone
    //    private repositories, and before the services.
    git_token_step(shared).await;

    // 5. One-time tasks.
    note(tasks::run_once_tasks(shared, &ctx, &config.once).await);

    match first_err {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// The dotfiles URL: `dotfiles.repo`, else `DOTFILES_URI`.
fn dotfiles_repo(cfg: &DotfilesConfig) -> Option<String> {
    cfg.repo
        .clone()
        .filter(|r| !r.trim().is_empty())
        .or_else(|| std::env::var("DOTFILES_URI").ok())
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
}

/// Steps after the services started (startup tasks). Returns once every task with
/// `blocks_ready` has finished; `Err` names the failing task.
pub async fn after_services(shared: &Arc<Shared>) -> Result<(), String> {
    let config = shared.config.read().expect("lock").config.clone();
    let ctx = match Ctx::new(shared, &config) {
        Ok(c) => Arc::new(c),
        Err(m) => return Err(format!("tasks: {m}")),
    };
    tasks::run_startup_tasks(shared, &ctx, &config.task).await
}

/// Extra local API routes (tasks, attach); see [`attach`] for the protocol.
pub fn routes() -> axum::Router<Arc<Shared>> {
    use axum::routing::get;
    axum::Router::new()
        .route("/v1/tasks", get(attach::list))
        .route("/v1/tasks/{name}/attach", get(attach::attach))
}

/// `path` relative to HOME for messages (`~/x`), else as is.
pub fn show(path: &Path, home: &Path) -> String {
    match path.strip_prefix(home) {
        Ok(rest) if rest.as_os_str().is_empty() => "~".into(),
        Ok(rest) => format!("~/{}", rest.display()),
        Err(_) => path.display().to_string(),
    }
}

/// Startup waits briefly (bounded) for a fresh git token before services that need it.
async fn git_token_step(shared: &Arc<Shared>) {
    let Some(c) = shared.control() else { return };
    if c.is_standalone() {
        shared.record(
            Stage::Startup,
            "git token",
            StepOutcome::Skipped,
            None,
            Some("standalone".into()),
        );
        return;
    }
    let t = Instant::now();
    shared.record(
        Stage::Startup,
        "git token",
        StepOutcome::Running,
        None,
        None,
    );
    c.refresh_tokens_once(Duration::from_secs(5)).await;
    shared.record(
        Stage::Startup,
        "git token",
        StepOutcome::Ok,
        Some(t.elapsed()),
        None,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<crate::config::Loaded, crate::config::ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        crate::config::load(&crate::config::Sources {
            system_file: None,
            explicit: Some(p),
            env: vec![],
        })
    }

    #[test]
    fn defaults_create_the_usual_directories_and_time_out_dotfiles_at_two_minutes() {
        let l = load("").unwrap();
        assert_eq!(
            l.config.startup.directories,
            ["~/projects", "~/.config", "~/.cache"]
        );
        assert_eq!(l.config.startup.skel_dir, "/etc/wsagent/skel");
        assert_eq!(l.config.dotfiles.clone_timeout, Duration::from_secs(120));
        assert_eq!(l.config.dotfiles.install_timeout, Duration::from_secs(120));
        assert!(l.config.once.is_empty() && l.config.task.is_empty());
    }

    #[test]
    fn once_and_task_entries_parse_with_their_defaults() {
        let l = load(
            "[[once]]\nname = \"brew\"\nshell = \"true\"\n\n[[task]]\nname = \"web\"\ncommand = [\"npm\", \"start\"]\ntimeout = \"5m\"\n",
        )
        .unwrap();
        assert!(l.config.once[0].blocks_ready);
        assert!(!l.config.task[0].blocks_ready);
        assert_eq!(l.config.task[0].timeout, Some(Duration::from_secs(300)));
        assert_eq!(
            argv_of(&l.config.once[0].command, &l.config.once[0].shell),
            ["/bin/sh", "-c", "true"]
        );
    }

    #[test]
    fn bad_tasks_are_rejected_naming_the_entry() {
        let err = load(
            "[[task]]\nname = \"a b\"\nshell = \"x\"\n[[task]]\nname = \"ok\"\n[[task]]\nname = \"ok\"\nshell = \"x\"\ncommand = [\"y\"]\n[[once]]\nname = \"m\"\nshell = \"x\"\ntimeout = \"0s\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("task[0].name"), "{err}");
        assert!(err.contains("task[1]: needs `command`"), "{err}");
        assert!(err.contains("duplicate task \"ok\""), "{err}");
        assert!(err.contains("task[2].shell"), "{err}");
        assert!(err.contains("once[0].timeout"), "{err}");
    }

    #[test]
    fn unknown_keys_in_startup_sections_are_rejected() {
        let err = load("[dotfiles]\nrepoo = \"x\"\n").unwrap_err().to_string();
        assert!(err.contains("repoo"), "{err}");
    }
}
