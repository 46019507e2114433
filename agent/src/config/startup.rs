//! `[startup]`, `[dotfiles]`, `[[once]]` and `[[task]]`: what the start-up pipeline does.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[startup]`: directories and the skeleton.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StartupConfig {
    /// Directories created at every start (`~` is HOME). The state dir is always added.
    pub directories: Vec<String>,
    /// Files copied into HOME where the target is absent (never overwriting).
    pub skel_dir: String,
    /// The workspace user (name or uid). When wsagent runs as root, what the daemon
    /// does in HOME it does as this user (see `userfs`; a directory root owns on
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
pub fn validate(config: &super::Config) -> Vec<(String, String)> {
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
