//! The startup pipeline's preparation steps and startup tasks (issue 5).
//!
//! The daemon calls [`before_services`] (directories, skeleton, dotfiles, the git-token
//! hook, one-time tasks) and [`after_services`] (startup tasks in pseudo-terminals), and
//! merges [`routes`] into the local API. Each step records itself with
//! `shared.record("startup", name, outcome, duration, message)`, which logs it, shows it
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

use serde::{Deserialize, Serialize};

use crate::daemon::Shared;

pub use attach::{cli_attach, cli_tasks};
pub use tasks::State;

/// `[startup]`: directories and the skeleton.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StartupConfig {
    /// Directories created at every start (`~` is HOME). The state dir is always added.
    pub directories: Vec<String>,
    /// Files copied into HOME where the target is absent (never overwriting).
    pub skel_dir: String,
    /// The workspace user (name or uid). When wsagent runs as root, what the daemon
    /// does in HOME it does as this user (see `crate::userfs`; a directory root owns on
    /// the way to a configured one is given to the user), what the pipeline creates
    /// outside HOME is given to this user, and the dotfiles install script, the one-time
    /// tasks and the startup tasks run as this user. Ignored when not running as root;
    /// unset, HOME's owner is the user for files in HOME.
    pub user: Option<String>,
}

impl Default for StartupConfig {
    fn default() -> Self {
        StartupConfig {
            directories: vec!["~/projects".into(), "~/.config".into(), "~/.cache".into()],
            skel_dir: "/etc/wsagent/skel".into(),
            user: None,
        }
    }
}

/// `[dotfiles]`, compatible with `coder dotfiles`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DotfilesConfig {
    /// The dotfiles repository URL; when unset, the `DOTFILES_URI` variable is used;
    /// when both are unset the step is skipped.
    pub repo: Option<String>,
    /// Branch to clone (default: the remote's default branch).
    pub branch: Option<String>,
    /// Limit of the clone (or pull).
    #[serde(with = "humantime_serde")]
    pub clone_timeout: Duration,
    /// Limit of the install script.
    #[serde(with = "humantime_serde")]
    pub install_timeout: Duration,
}

impl Default for DotfilesConfig {
    fn default() -> Self {
        DotfilesConfig {
            repo: None,
            branch: None,
            clone_timeout: Duration::from_secs(120),
            install_timeout: Duration::from_secs(120),
        }
    }
}

/// One `[[once]]` entry: a command run at start while its marker file is absent.
///
/// ```toml
/// # Install linuxbrew on the first start only (HOME is on the persistent volume).
/// [[once]]
/// name = "linuxbrew"
/// shell = 'NONINTERACTIVE=1 /bin/bash -c "$(curl -fsSL https://raw.githubusercontent.com/Homebrew/install/HEAD/install.sh)"'
/// marker = "~/.local/state/wsagent/once/linuxbrew.done"
/// timeout = "15m"
/// blocks_ready = false
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnceConfig {
    pub name: String,
    /// argv; exclusive with `shell`.
    pub command: Option<Vec<String>>,
    /// Run with `sh -c`; exclusive with `command`.
    pub shell: Option<String>,
    /// Written after a success; while it exists the task never runs again (`~` is HOME,
    /// a relative path is under HOME). Default `<state_dir>/once/<name>.done`.
    pub marker: Option<String>,
    /// Working directory (`~` is HOME, a relative path is under HOME); default HOME.
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
    /// Killed (and failed) after this long; unset: no limit.
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// `true`: the lifecycle waits for it (and a failure is a `start_error`); `false`: it
    /// runs in the background, tracked and listed by `wsagent tasks`.
    pub blocks_ready: bool,
}

impl Default for OnceConfig {
    fn default() -> Self {
        OnceConfig {
            name: String::new(),
            command: None,
            shell: None,
            marker: None,
            cwd: None,
            env: BTreeMap::new(),
            timeout: None,
            blocks_ready: true,
        }
    }
}

/// One `[[task]]` entry: a startup task run in a pseudo-terminal after the services.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TaskConfig {
    pub name: String,
    /// argv; exclusive with `shell`.
    pub command: Option<Vec<String>>,
    /// Run with `sh -c`; exclusive with `command`.
    pub shell: Option<String>,
    /// Working directory (`~` is HOME, a relative path is under HOME); default HOME.
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
    /// The task's process group gets SIGHUP, then SIGKILL, after this long; unset: no
    /// limit.
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// `true`: the lifecycle becomes `ready` only after it exited 0 (non-zero:
    /// `start_error`); `false` (default): it keeps running in the background.
    pub blocks_ready: bool,
}

/// The argv of a `command`/`shell` pair.
pub fn argv_of(command: &Option<Vec<String>>, shell: &Option<String>) -> Vec<String> {
    match (command, shell) {
        (Some(argv), _) => argv.clone(),
        (None, Some(sh)) => vec!["/bin/sh".into(), "-c".into(), sh.clone()],
        (None, None) => Vec::new(),
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.')
}

fn check_command(
    out: &mut Vec<(String, String)>,
    key: &str,
    command: &Option<Vec<String>>,
    shell: &Option<String>,
) {
    match (command, shell) {
        (Some(_), Some(_)) => out.push((
            format!("{key}.shell"),
            "give either `command` or `shell`, not both".into(),
        )),
        (None, None) => out.push((key.into(), "needs `command` (argv) or `shell`".into())),
        (Some(argv), None) if argv.is_empty() || argv[0].is_empty() => {
            out.push((format!("{key}.command"), "must name a program".into()))
        }
        _ => {}
    }
}

/// Semantic checks of `[startup]`, `[dotfiles]`, `[[once]]`, `[[task]]`.
pub fn validate(config: &crate::config::Config) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if config.startup.skel_dir.is_empty() {
        out.push(("startup.skel_dir".into(), "must not be empty".into()));
    }
    if config.startup.directories.iter().any(|d| d.is_empty()) {
        out.push((
            "startup.directories".into(),
            "an entry is an empty path".into(),
        ));
    }
    if config.dotfiles.clone_timeout.is_zero() {
        out.push((
            "dotfiles.clone_timeout".into(),
            "must be greater than zero".into(),
        ));
    }
    if config.dotfiles.install_timeout.is_zero() {
        out.push((
            "dotfiles.install_timeout".into(),
            "must be greater than zero".into(),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, o) in config.once.iter().enumerate() {
        let key = format!("once[{i}]");
        if !valid_name(&o.name) {
            out.push((
                format!("{key}.name"),
                format!(
                    "{:?}: names use letters, digits, '-', '_' and '.' (not first)",
                    o.name
                ),
            ));
        } else if !seen.insert(("once", o.name.clone())) {
            out.push((
                format!("{key}.name"),
                format!("duplicate once task {:?}", o.name),
            ));
        }
        check_command(&mut out, &key, &o.command, &o.shell);
        if o.timeout.is_some_and(|t| t.is_zero()) {
            out.push((format!("{key}.timeout"), "must be greater than zero".into()));
        }
    }
    for (i, t) in config.task.iter().enumerate() {
        let key = format!("task[{i}]");
        if !valid_name(&t.name) {
            out.push((
                format!("{key}.name"),
                format!(
                    "{:?}: names use letters, digits, '-', '_' and '.' (not first)",
                    t.name
                ),
            ));
        } else if !seen.insert(("task", t.name.clone())) {
            out.push((
                format!("{key}.name"),
                format!("duplicate task {:?}", t.name),
            ));
        }
        check_command(&mut out, &key, &t.command, &t.shell);
        if t.timeout.is_some_and(|t| t.is_zero()) {
            out.push((format!("{key}.timeout"), "must be greater than zero".into()));
        }
    }
    // A once task and a startup task share the `wsagent tasks` namespace.
    for o in &config.once {
        if config.task.iter().any(|t| t.name == o.name) && !o.name.is_empty() {
            out.push((
                "task".into(),
                format!("{:?} is both a once task and a startup task", o.name),
            ));
        }
    }
    out
}

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
        crate::config::expand_home(p, &self.home)
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
    shared.record("startup", name, "running", None, None);
    match fut.await {
        StepResult::Ok(m) => {
            shared.record("startup", name, "ok", Some(t.elapsed()), m);
            Ok(())
        }
        StepResult::Skipped(m) => {
            shared.record("startup", name, "skipped", Some(t.elapsed()), Some(m));
            Ok(())
        }
        StepResult::Failed(m) => {
            shared.record(
                "startup",
                name,
                "failed",
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
/// `shared.record("startup", name, outcome, duration, message)`. An `Err` names the
/// failing step and makes the lifecycle `start_error` (services still start).
pub async fn before_services(shared: &Arc<Shared>) -> Result<(), String> {
    let config = shared.config.read().expect("lock").config.clone();
    let ctx = match Ctx::new(shared, &config) {
        Ok(c) => Arc::new(c),
        Err(m) => {
            shared.record("startup", "directories", "failed", None, Some(m.clone()));
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
    crate::daemon::git_token_step(shared).await;

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
