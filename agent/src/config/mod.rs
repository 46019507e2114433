//! Configuration: the TOML schema, its layering and its validation.
//!
//! Layers, later ones winning key by key: the defaults embedded in the binary
//! (`default-config.toml`), `/etc/wsagent/config.toml`, the `--config` file, then the
//! `WSAGENT_*` environment variables of [`ENV_OVERRIDES`]. Every problem found is
//! reported with its file, line, column and key ([`Problem`]); a config with any problem
//! is rejected as a whole and nothing starts (exit 78, EX_CONFIG).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod check;
pub mod control;
pub mod providers;
pub mod save;
pub mod startup;

/// The embedded defaults.
pub const DEFAULTS: &str = include_str!("default-config.toml");
/// The system-wide config file, read when it exists.
pub const SYSTEM_FILE: &str = "/etc/wsagent/config.toml";

/// Environment variables that override common keys (documented in README.md).
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("WSAGENT_STATE_DIR", "daemon.state_dir"),
    ("WSAGENT_LOG_LEVEL", "daemon.log_level"),
    ("WSAGENT_SOCKET", "daemon.socket"),
    ("WSAGENT_SHUTDOWN_BUDGET", "shutdown.budget"),
    ("WSAGENT_SAVE_MODE", "save.mode"),
    ("WSAGENT_SAVE_ROOTS", "save.roots"),
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub shutdown: ShutdownConfig,
    pub logs: LogsConfig,
    pub services: BTreeMap<String, ServiceConfig>,
    pub save: save::SaveConfig,
    pub control_plane: control::ControlPlaneConfig,
    /// Git hosts whose tokens wsagent caches and pushes with, by Coder provider id.
    pub git_providers: BTreeMap<String, providers::GitProvider>,
    pub startup: startup::StartupConfig,
    pub dotfiles: startup::DotfilesConfig,
    /// `[[once]]`: one-time tasks guarded by marker files.
    pub once: Vec<startup::OnceConfig>,
    /// `[[task]]`: startup tasks, each in a pseudo-terminal.
    pub task: Vec<startup::TaskConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Persistent state (journal, logs). `~` is the daemon's HOME.
    pub state_dir: String,
    /// Per-service log files; default `<state_dir>/logs`.
    pub log_dir: Option<String>,
    /// Local API socket; default `/run/wsagent/wsagent.sock` as root,
    /// `$XDG_RUNTIME_DIR/wsagent.sock` otherwise.
    pub socket: Option<String>,
    /// `trace`, `debug`, `info`, `warn`, `error`, or a tracing filter.
    pub log_level: String,
    /// A user (name or uid) served by the local API besides root and the daemon's own
    /// uid: the workspace user, so Coder's `shutdown_script` (`wsagent save`, run by the
    /// Coder agent as that user) works. The socket is then owned by that user (mode 0600).
    pub api_user: Option<String>,
    /// Serve Prometheus metrics over HTTP on this address (`127.0.0.1:9100`) as well as
    /// on the local API's `/v1/metrics`; off by default. Anyone who can reach the port
    /// can read them: keep it on loopback or behind the pod's network policy.
    pub metrics: Option<std::net::SocketAddr>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            state_dir: "~/.local/state/wsagent".into(),
            log_dir: None,
            socket: None,
            log_level: "info".into(),
            api_user: None,
            metrics: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// The whole stop sequence must end inside this.
    #[serde(with = "humantime_serde")]
    pub budget: Duration,
    /// Shell commands run first in the stop sequence (`sh -c`), in order.
    pub pre_stop: Vec<String>,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            budget: Duration::from_secs(25),
            pre_stop: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogsConfig {
    /// A per-service log file is rotated when it reaches this size.
    pub max_bytes: u64,
    /// Rotated files kept per service.
    pub keep: u32,
}

impl Default for LogsConfig {
    fn default() -> Self {
        LogsConfig {
            max_bytes: 1 << 20,
            keep: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// argv; exclusive with `shell`.
    pub command: Option<Vec<String>>,
    /// Run with `sh -c`; exclusive with `command`.
    pub shell: Option<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// Drop privileges to this user (name or uid) for this child only.
    pub user: Option<String>,
    pub group: Option<String>,
    /// Start after these services are healthy (or absent).
    pub depends_on: Vec<String>,
    pub restart: RestartPolicy,
    pub backoff: BackoffConfig,
    pub health: Option<HealthConfig>,
    /// A service that has not become healthy this long after it started counts as failed
    /// to start.
    #[serde(with = "humantime_serde")]
    pub start_timeout: Duration,
    pub stop_signal: String,
    #[serde(with = "humantime_serde")]
    pub stop_timeout: Duration,
    /// Stop groups run in increasing order; within a group, reverse dependency order.
    pub stop_order: i32,
    /// A default service: skipped with a warning (state `absent`) when its program is not
    /// installed or a variable of `requires_env` is unset.
    pub default: bool,
    /// Skipped (state `absent`) unless each of these variables is set and non-empty.
    pub requires_env: Vec<String>,
    /// `false` removes the service (e.g. to turn off a default one).
    pub enabled: bool,
    /// Secret variables of the daemon's environment passed to this service (all others
    /// are withheld from every child), e.g. `CODER_AGENT_TOKEN` for the Coder agent.
    pub secret_env: Vec<String>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            command: None,
            shell: None,
            env: BTreeMap::new(),
            cwd: None,
            user: None,
            group: None,
            depends_on: Vec::new(),
            restart: RestartPolicy::Always,
            backoff: BackoffConfig::default(),
            health: None,
            start_timeout: Duration::from_secs(60),
            stop_signal: "SIGTERM".into(),
            stop_timeout: Duration::from_secs(10),
            stop_order: 0,
            default: false,
            requires_env: Vec::new(),
            enabled: true,
            secret_env: Vec::new(),
        }
    }
}

impl ServiceConfig {
    /// The argv to execute.
    pub fn argv(&self) -> Vec<String> {
        match (&self.command, &self.shell) {
            (Some(argv), _) => argv.clone(),
            (None, Some(sh)) => vec!["/bin/sh".into(), "-c".into(), sh.clone()],
            (None, None) => Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffConfig {
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// A run that lasted this long resets the delay to `initial`.
    #[serde(with = "humantime_serde")]
    pub reset_after: Duration,
    /// After this many failures within `window` the service becomes `failed`.
    pub max_failures: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(60),
            max_failures: 10,
            window: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthKind {
    Http,
    UnixHttp,
    Tcp,
    Exec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    pub kind: HealthKind,
    /// `http`: the URL to GET.
    #[serde(default)]
    pub url: Option<String>,
    /// `unix-http`: the socket path.
    #[serde(default)]
    pub socket: Option<String>,
    /// `unix-http`: the request path (default `/`).
    #[serde(default)]
    pub path: Option<String>,
    /// `tcp`: `host:port`.
    #[serde(default)]
    pub address: Option<String>,
    /// `exec`: argv, healthy on exit 0.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// `http`/`unix-http`: the expected status; default: any status below 500.
    #[serde(default)]
    pub expect_status: Option<u16>,
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive failures before a running service counts as unhealthy.
    #[serde(default = "default_threshold")]
    pub failure_threshold: u32,
    /// Restart a service that is unhealthy past its threshold.
    #[serde(default = "default_true")]
    pub restart_on_unhealthy: bool,
}

fn default_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_threshold() -> u32 {
    3
}
fn default_true() -> bool {
    true
}

/// One thing wrong with a config, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// 1-based line and column, when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Dotted key path, when known.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, ":{l}:{c}")?;
        }
        if let Some(k) = &self.key {
            write!(f, ": {k}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A config that cannot be used; lists every problem found.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "invalid configuration ({n} problem{})",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

/// Where the config came from, for `config show` and status.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// The files read, in order (`<embedded defaults>` first).
    pub files: Vec<String>,
}

/// What to read: the system file (when it exists) and an explicit file.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub system_file: Option<PathBuf>,
    pub explicit: Option<PathBuf>,
    /// The `WSAGENT_*` variables to apply (usually `std::env::vars()`).
    pub env: Vec<(String, String)>,
}

impl Sources {
    /// The standard sources for a daemon or CLI invocation.
    pub fn standard(explicit: Option<PathBuf>) -> Sources {
        let system = PathBuf::from(
            std::env::var("WSAGENT_SYSTEM_CONFIG").unwrap_or_else(|_| SYSTEM_FILE.into()),
        );
        Sources {
            system_file: Some(system),
            explicit,
            env: std::env::vars()
                .filter(|(k, _)| k.starts_with("WSAGENT_"))
                .collect(),
        }
    }
}

/// Load, merge and validate every layer.
pub fn load(sources: &Sources) -> Result<Loaded, ConfigError> {
    let mut problems = Vec::new();
    let mut merged = toml::Table::new();
    let mut files = Vec::new();
    // Which file last defined each service, to place semantic problems.
    let mut service_origin: BTreeMap<String, (String, String)> = BTreeMap::new();

    let mut layers: Vec<(String, String)> = vec![("<embedded defaults>".into(), DEFAULTS.into())];
    if let Some(sys) = &sources.system_file {
        match std::fs::read_to_string(sys) {
            Ok(text) => layers.push((sys.display().to_string(), text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => problems.push(Problem {
                file: sys.display().to_string(),
                line: None,
                column: None,
                key: None,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    if let Some(path) = &sources.explicit {
        match std::fs::read_to_string(path) {
            Ok(text) => layers.push((path.display().to_string(), text)),
            Err(e) => problems.push(Problem {
                file: path.display().to_string(),
                line: None,
                column: None,
                key: None,
                message: format!("cannot read: {e}"),
            }),
        }
    }

    for (name, text) in &layers {
        let before = problems.len();
        check_layer(name, text, &mut problems);
        files.push(name.clone());
        if problems.len() > before {
            continue;
        }
        match toml::from_str::<toml::Table>(text) {
            Ok(table) => {
                if let Some(toml::Value::Table(svcs)) = table.get("services") {
                    for k in svcs.keys() {
                        service_origin.insert(k.clone(), (name.clone(), text.clone()));
                    }
                }
                merge(&mut merged, table);
            }
            Err(e) => problems.push(toml_problem(name, text, &e, None)),
        }
    }

    for (var, key) in ENV_OVERRIDES {
        let Some((_, value)) = sources.env.iter().find(|(k, _)| k == var) else {
            continue;
        };
        let place = format!("environment {var}");
        let parsed = if *key == "save.roots" {
            toml::Value::Array(
                value
                    .split(':')
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.into()))
                    .collect(),
            )
        } else {
            toml::Value::String(value.clone())
        };
        set_path(&mut merged, key, parsed);
        // Validate the override alone so its problem names the variable.
        let mut probe = toml::Table::new();
        set_path(
            &mut probe,
            key,
            merged_get(&merged, key)
                .cloned()
                .unwrap_or(toml::Value::Boolean(false)),
        );
        if let Err(e) = toml::Value::Table(probe).try_into::<Config>() {
            problems.push(Problem {
                file: place,
                line: None,
                column: None,
                key: Some((*key).into()),
                message: e.message().to_string(),
            });
        }
    }

    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }

    let mut config: Config = match toml::Value::Table(merged).try_into() {
        Ok(c) => c,
        Err(e) => {
            return Err(ConfigError {
                problems: vec![Problem {
                    file: "<merged configuration>".into(),
                    line: None,
                    column: None,
                    key: None,
                    message: e.message().to_string(),
                }],
            });
        }
    };
    let disabled: BTreeSet<String> = config
        .services
        .iter()
        .filter(|(_, s)| !s.enabled)
        .map(|(n, _)| n.clone())
        .collect();
    config.services.retain(|_, s| s.enabled);
    // A dependency on a service that is switched off is satisfied: turning `dockerd` off
    // alone must not make the embedded defaults (coder-agent depends on it) invalid.
    for s in config.services.values_mut() {
        s.depends_on.retain(|d| !disabled.contains(d));
    }

    for (key, message) in validate(&config) {
        let service = key
            .strip_prefix("services.")
            .and_then(|r| r.split('.').next());
        let (file, line, column) = match service.and_then(|s| service_origin.get(s)) {
            Some((file, text)) => {
                let (l, c) = locate_key(text, &key).unwrap_or((0, 0));
                (file.clone(), (l > 0).then_some(l), (c > 0).then_some(c))
            }
            None => ("<merged configuration>".into(), None, None),
        };
        problems.push(Problem {
            file,
            line,
            column,
            key: Some(key),
            message,
        });
    }
    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }
    Ok(Loaded { config, files })
}

/// Parse one file and type-check each section on its own, so that one bad section does
/// not hide the problems of the others.
fn check_layer(name: &str, text: &str, problems: &mut Vec<Problem>) {
    let first = problems.len();
    check_sections(name, text, problems);
    // In the file's order.
    problems[first..].sort_by_key(|p| (p.line, p.column));
}

fn check_sections(name: &str, text: &str, problems: &mut Vec<Problem>) {
    let (doc, errors) = toml::de::DeTable::parse_recoverable(text);
    if !errors.is_empty() {
        for e in errors {
            problems.push(toml_problem(name, text, &e, None));
        }
        return;
    }
    let doc = doc.into_inner();
    for (key, value) in doc.iter() {
        let section = key.get_ref().to_string();
        match section.as_str() {
            "services" => {
                let Some(table) = value.get_ref().as_table() else {
                    problems.push(span_problem(
                        name,
                        text,
                        value.span(),
                        "services",
                        "must be a table of services",
                    ));
                    continue;
                };
                for (svc, body) in table.iter() {
                    let k = format!("services.{}", svc.get_ref());
                    let found = check::every_problem(body, |b| {
                        ServiceConfig::deserialize(toml::de::ValueDeserializer::from(b)).map(|_| ())
                    });
                    for f in found {
                        problems.push(found_problem(name, text, &k, f));
                    }
                }
            }
            _ => {
                let found = check::every_problem(value, |v| {
                    let mut one = toml::de::DeTable::new();
                    one.insert(key.clone(), v);
                    let span = 0..text.len();
                    let de = toml::de::Deserializer::from(toml::Spanned::new(span, one));
                    Config::deserialize(de).map(|_| ())
                });
                for f in found {
                    problems.push(found_problem(name, text, &section, f));
                }
            }
        }
    }
}

fn found_problem(file: &str, text: &str, section: &str, f: check::Found) -> Problem {
    let (line, column) = match f.span {
        Some(span) => {
            let (l, c) = line_col(text, span.start);
            (Some(l), Some(c))
        }
        None => (None, None),
    };
    Problem {
        file: file.into(),
        line,
        column,
        key: Some(check::dotted(section, &f.path)),
        message: f.message,
    }
}

fn toml_problem(file: &str, text: &str, e: &toml::de::Error, key: Option<&str>) -> Problem {
    let (line, column) = match e.span() {
        Some(span) => {
            let (l, c) = line_col(text, span.start);
            (Some(l), Some(c))
        }
        None => (None, None),
    };
    Problem {
        file: file.into(),
        line,
        column,
        key: key.map(String::from),
        message: e.message().trim().to_string(),
    }
}

fn span_problem(
    file: &str,
    text: &str,
    span: std::ops::Range<usize>,
    key: &str,
    msg: &str,
) -> Problem {
    let (l, c) = line_col(text, span.start);
    Problem {
        file: file.into(),
        line: Some(l),
        column: Some(c),
        key: Some(key.into()),
        message: msg.into(),
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, col)
}

/// Find the span of a dotted key path in a document (best effort: the deepest key found).
fn locate_key(text: &str, path: &str) -> Option<(usize, usize)> {
    let doc = toml::de::DeTable::parse(text).ok()?.into_inner();
    let mut parts = path.split('.');
    let first = parts.next()?;
    let (mut k, mut v) = doc
        .iter()
        .find(|(k, _)| k.get_ref() == first)
        .map(|(k, v)| (k.clone(), v.clone()))?;
    for part in parts {
        let Some(t) = v.get_ref().as_table() else {
            break;
        };
        let Some((nk, nv)) = t.iter().find(|(k, _)| k.get_ref() == part) else {
            break;
        };
        k = nk.clone();
        v = nv.clone();
    }
    Some(line_col(text, k.span().start))
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

fn set_path(table: &mut toml::Table, path: &str, value: toml::Value) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().expect("non-empty path");
    let mut t = table;
    for p in parts {
        let entry = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        t = entry.as_table_mut().expect("table");
    }
    t.insert(last.into(), value);
}

fn merged_get<'a>(table: &'a toml::Table, path: &str) -> Option<&'a toml::Value> {
    let mut parts = path.split('.');
    let mut v = table.get(parts.next()?)?;
    for p in parts {
        v = v.as_table()?.get(p)?;
    }
    Some(v)
}

/// Semantic checks of a merged config: (dotted key, message) for each problem.
pub fn validate(config: &Config) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if config.shutdown.budget.is_zero() {
        out.push(("shutdown.budget".into(), "must be greater than zero".into()));
    }
    if config
        .daemon
        .api_user
        .as_deref()
        .is_some_and(|u| u.trim().is_empty())
    {
        out.push(("daemon.api_user".into(), "must not be empty".into()));
    }
    if parse_level(&config.daemon.log_level).is_none() {
        out.push((
            "daemon.log_level".into(),
            format!(
                "unknown level {:?} (trace, debug, info, warn, error)",
                config.daemon.log_level
            ),
        ));
    }
    for (name, s) in &config.services {
        let key = |f: &str| format!("services.{name}.{f}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            out.push((
                format!("services.{name}"),
                "service names use letters, digits, '-' and '_'".into(),
            ));
        }
        match (&s.command, &s.shell) {
            (Some(_), Some(_)) => out.push((
                key("shell"),
                "give either `command` or `shell`, not both".into(),
            )),
            (None, None) => out.push((
                format!("services.{name}"),
                "needs `command` (argv) or `shell`".into(),
            )),
            (Some(argv), None) if argv.is_empty() || argv[0].is_empty() => {
                out.push((key("command"), "must name a program".into()))
            }
            _ => {}
        }
        if crate::procs::parse_signal(&s.stop_signal).is_none() {
            out.push((
                key("stop_signal"),
                format!("unknown signal {:?}", s.stop_signal),
            ));
        }
        for dep in &s.depends_on {
            if dep == name {
                out.push((
                    key("depends_on"),
                    "a service cannot depend on itself".into(),
                ));
            } else if !config.services.contains_key(dep) {
                out.push((key("depends_on"), format!("unknown service {dep:?}")));
            }
        }
        if s.backoff.initial > s.backoff.max {
            out.push((key("backoff.initial"), "must not exceed backoff.max".into()));
        }
        if s.backoff.max_failures == 0 {
            out.push((key("backoff.max_failures"), "must be at least 1".into()));
        }
        if let Some(h) = &s.health {
            let missing = match h.kind {
                HealthKind::Http => h.url.is_none().then_some("url"),
                HealthKind::UnixHttp => h.socket.is_none().then_some("socket"),
                HealthKind::Tcp => h.address.is_none().then_some("address"),
                HealthKind::Exec => h
                    .command
                    .as_ref()
                    .is_none_or(|c| c.is_empty())
                    .then_some("command"),
            };
            if let Some(m) = missing {
                out.push((key("health"), format!("a {:?} check needs `{m}`", h.kind)));
            }
            if let Some(u) = &h.url
                && !u.starts_with("http://")
                && !u.starts_with("https://")
            {
                out.push((key("health.url"), format!("not an http(s) URL: {u:?}")));
            }
            if h.interval.is_zero() {
                out.push((key("health.interval"), "must be greater than zero".into()));
            }
            if h.failure_threshold == 0 {
                out.push((key("health.failure_threshold"), "must be at least 1".into()));
            }
        }
    }
    if let Some(cycle) = dependency_cycle(config) {
        out.push((
            format!("services.{}.depends_on", cycle[0]),
            format!("dependency cycle: {}", cycle.join(" -> ")),
        ));
    }
    out.extend(save::validate(&config.save));
    out.extend(control::validate(&config.control_plane));
    out.extend(startup::validate(config));
    out
}

fn dependency_cycle(config: &Config) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        config: &Config,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(pos) = stack.iter().position(|s| s == n) {
            let mut c = stack[pos..].to_vec();
            c.push(n.into());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.into());
        if let Some(s) = config.services.get(n) {
            for d in &s.depends_on {
                if let Some(c) = visit(d, config, stack, done) {
                    return Some(c);
                }
            }
        }
        stack.pop();
        done.insert(n.into());
        None
    }
    let mut done = BTreeSet::new();
    for n in config.services.keys() {
        if let Some(c) = visit(n, config, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

pub fn parse_level(s: &str) -> Option<tracing::Level> {
    match s.to_ascii_lowercase().as_str() {
        "trace" => Some(tracing::Level::TRACE),
        "debug" => Some(tracing::Level::DEBUG),
        "info" => Some(tracing::Level::INFO),
        "warn" | "warning" => Some(tracing::Level::WARN),
        "error" => Some(tracing::Level::ERROR),
        _ => None,
    }
}

impl Config {
    /// Render the effective config as TOML (for `config show`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    pub fn state_dir(&self, home: &Path) -> PathBuf {
        crate::paths::expand_home(&self.daemon.state_dir, home)
    }

    pub fn log_dir(&self, home: &Path) -> PathBuf {
        match &self.daemon.log_dir {
            Some(d) => crate::paths::expand_home(d, home),
            None => self.state_dir(home).join("logs"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Loaded, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        load(&Sources {
            system_file: None,
            explicit: Some(p),
            env: vec![],
        })
    }

    #[test]
    fn embedded_defaults_are_valid_and_define_the_three_services() {
        let l = load(&Sources::default()).unwrap();
        let names: Vec<_> = l.config.services.keys().cloned().collect();
        assert_eq!(names, ["code-server", "coder-agent", "dockerd"]);
        assert_eq!(l.config.shutdown.budget, Duration::from_secs(25));
    }

    #[test]
    fn every_problem_is_listed_with_line_column_and_key() {
        let err = load_text(
            "[services.a]\ncommand = [\"true\"]\nrestart = \"sometimes\"\n\n[services.b]\ncommand = 3\n\n[shutdown]\nbudget = \"soon\"\n",
        )
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 3, "{text}");
        assert!(text.contains("c.toml:3:11: services.a"), "{text}");
        assert!(text.contains("c.toml:6:11: services.b"), "{text}");
        assert!(text.contains("c.toml:9:10: shutdown"), "{text}");
    }

    #[test]
    fn syntax_errors_have_a_place() {
        let err = load_text("[daemon\nstate_dir = 1\n").unwrap_err();
        assert!(err.to_string().contains("c.toml:1:"), "{err}");
    }

    #[test]
    fn unknown_dependency_and_cycles_are_placed_on_their_service() {
        let err = load_text(
            "[services.a]\ncommand=[\"x\"]\ndepends_on=[\"b\"]\n[services.b]\ncommand=[\"x\"]\ndepends_on=[\"a\", \"zz\"]\n",
        )
        .unwrap_err();
        let t = err.to_string();
        assert!(t.contains("unknown service \"zz\""), "{t}");
        assert!(t.contains("dependency cycle: a -> b -> a"), "{t}");
        assert!(t.contains("c.toml:6:1: services.b.depends_on"), "{t}");
    }

    #[test]
    fn layers_merge_key_by_key_and_env_wins() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[services.dockerd]\nstop_timeout = \"3s\"\n[services.code-server]\nenabled = false\n",
        )
        .unwrap();
        let l = load(&Sources {
            system_file: None,
            explicit: Some(p),
            env: vec![("WSAGENT_SHUTDOWN_BUDGET".into(), "7s".into())],
        })
        .unwrap();
        let d = &l.config.services["dockerd"];
        assert_eq!(d.stop_timeout, Duration::from_secs(3));
        assert_eq!(d.argv(), ["dockerd"]);
        assert!(!l.config.services.contains_key("code-server"));
        assert_eq!(l.config.shutdown.budget, Duration::from_secs(7));
    }

    #[test]
    fn a_bad_env_override_names_the_variable() {
        let err = load(&Sources {
            system_file: None,
            explicit: None,
            env: vec![("WSAGENT_SHUTDOWN_BUDGET".into(), "lots".into())],
        })
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("environment WSAGENT_SHUTDOWN_BUDGET: shutdown.budget"),
            "{err}"
        );
    }
}
