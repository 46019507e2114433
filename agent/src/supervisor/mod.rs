//! Supervision: the set of services, their start in dependency order, their stop in
//! reverse order, and reloads that restart only what changed.
//!
//! Each service is one task ([`service::run`]) reached through a [`ServiceHandle`].

pub mod output;
pub mod policy;
pub mod service;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use agent_proto::local::{Health, ServiceState, ServiceStatus};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;

use crate::config::{Config, ServiceConfig};
use crate::events::Events;
use service::{Cmd, ServiceSpec};

/// Variables that hold secrets: never passed to a child unless its service lists the
/// variable in `secret_env`.
pub const SECRET_VARS: &[&str] = &["CODER_AGENT_TOKEN"];

/// One service's controls: cloneable, and no control holds a lock shared with another
/// service (a stop that takes its whole `stop_timeout` blocks nobody else).
#[derive(Clone)]
pub struct ServiceHandle {
    pub name: String,
    pub cfg: ServiceConfig,
    cmd: mpsc::Sender<Cmd>,
    status: watch::Receiver<ServiceStatus>,
    pub sink: output::Sink,
}

impl ServiceHandle {
    pub fn status(&self) -> ServiceStatus {
        self.status.borrow().clone()
    }

    pub fn watch(&self) -> watch::Receiver<ServiceStatus> {
        self.status.clone()
    }

    pub async fn start(&self) {
        let _ = self.cmd.send(Cmd::Start).await;
    }

    pub async fn restart(&self) {
        let _ = self.cmd.send(Cmd::Restart).await;
    }

    /// Pass `sig` on to the running child's process group; false when the service has
    /// no child now.
    pub fn signal(&self, sig: nix::sys::signal::Signal) -> bool {
        let s = self.status();
        if s.pid.is_none() || !matches!(s.state, ServiceState::Starting | ServiceState::Running) {
            return false;
        }
        self.cmd.try_send(Cmd::Signal(sig)).is_ok()
    }

    /// Stop and wait until the child is gone (bounded by `timeout` plus a little).
    pub async fn stop(&self, timeout: Duration) {
        let (done, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Stop { timeout, done }).await.is_ok() {
            let _ = tokio::time::timeout(timeout + Duration::from_secs(2), rx).await;
        }
    }
}

/// The environment every service starts from: the daemon's own, less secrets.
pub fn base_env() -> Vec<(OsString, OsString)> {
    std::env::vars_os()
        .filter(|(k, v)| {
            let k = k.to_string_lossy();
            if SECRET_VARS.contains(&k.as_ref()) || k.starts_with("WSAGENT_") {
                return false;
            }
            crate::secrets::redact(&v.to_string_lossy()) == v.to_string_lossy()
        })
        .collect()
}

pub struct Supervisor {
    services: BTreeMap<String, ServiceHandle>,
    events: Events,
    tracker: TaskTracker,
    log_dir: PathBuf,
    logs: crate::config::LogsConfig,
}

impl Supervisor {
    pub fn new(
        events: Events,
        tracker: TaskTracker,
        log_dir: PathBuf,
        logs: crate::config::LogsConfig,
    ) -> Supervisor {
        Supervisor {
            services: BTreeMap::new(),
            events,
            tracker,
            log_dir,
            logs,
        }
    }

    /// Drop every handle: each service task then ends (call after `stop_all`).
    pub fn detach_all(&mut self) {
        self.services.clear();
    }

    pub fn get(&self, name: &str) -> Option<&ServiceHandle> {
        self.services.get(name)
    }

    /// A handle of `name` to use after the lock on the supervisor is released.
    pub fn handle(&self, name: &str) -> Option<ServiceHandle> {
        self.services.get(name).cloned()
    }

    /// Handles of every service, to stop or signal them without holding the lock.
    pub fn handles(&self) -> BTreeMap<String, ServiceHandle> {
        self.services.clone()
    }

    pub fn names(&self) -> Vec<String> {
        self.services.keys().cloned().collect()
    }

    /// Start every configured service (each waits for its dependencies itself).
    pub fn start_all(&mut self, config: &Config) {
        for name in start_order(&config.services) {
            self.start_one(&name, &config.services[&name]);
        }
    }

    fn start_one(&mut self, name: &str, cfg: &ServiceConfig) {
        let (cmd_tx, cmd_rx) = mpsc::channel(8);
        let initial = ServiceStatus {
            name: name.into(),
            state: ServiceState::Pending,
            pid: None,
            restarts: 0,
            health: Health::Unknown,
            last_exit: None,
            message: None,
            since: Some(crate::logline::now()),
        };
        let (status_tx, status_rx) = watch::channel(initial);
        let deps = cfg
            .depends_on
            .iter()
            .filter_map(|d| self.services.get(d).map(|h| (d.clone(), h.watch())))
            .collect();
        let file = output::RotatingFile::new(
            self.log_dir.join(format!("{name}.log")),
            self.logs.max_bytes,
            self.logs.keep,
        );
        let sink = output::Sink::new(name, file);
        let (env, run_as, absent) = prepare(name, cfg);
        let spec = ServiceSpec {
            name: name.into(),
            cfg: cfg.clone(),
            absent,
            env,
            run_as,
            sink: sink.clone(),
        };
        self.tracker.spawn(service::run(
            spec,
            cmd_rx,
            status_tx,
            deps,
            self.events.clone(),
        ));
        self.services.insert(
            name.into(),
            ServiceHandle {
                name: name.into(),
                cfg: cfg.clone(),
                cmd: cmd_tx,
                status: status_rx,
                sink,
            },
        );
    }

    /// Apply a new config, first half: removed and changed services leave the set and
    /// are returned to be stopped (without the lock); [`Supervisor::reload_start`] then
    /// starts the changed and new ones. Unchanged ones keep running untouched.
    pub fn reload_plan(&mut self, config: &Config) -> (Vec<ServiceHandle>, Vec<String>) {
        let mut changes = Vec::new();
        let mut stop = Vec::new();
        let old: Vec<String> = self.services.keys().cloned().collect();
        for name in &old {
            match config.services.get(name) {
                None => {
                    stop.push(self.services.remove(name).expect("present"));
                    changes.push(format!("removed {name}"));
                }
                Some(new) if *new != self.services[name].cfg => {
                    stop.push(self.services.remove(name).expect("present"));
                    changes.push(format!("restarted {name} (changed)"));
                }
                Some(_) => {}
            }
        }
        for name in start_order(&config.services) {
            if !self.services.contains_key(&name) && !old.contains(&name) {
                changes.push(format!("started {name} (new)"));
            }
        }
        (stop, changes)
    }

    /// Apply a new config, second half: start every configured service not in the set.
    pub fn reload_start(&mut self, config: &Config) {
        for name in start_order(&config.services) {
            if !self.services.contains_key(&name) {
                self.start_one(&name, &config.services[&name]);
            }
        }
    }

    /// Pass `sig` on to every running service (its process group); the names reached.
    pub fn signal_all(&self, sig: nix::sys::signal::Signal) -> Vec<String> {
        self.services
            .values()
            .filter(|h| h.signal(sig))
            .map(|h| h.name.clone())
            .collect()
    }
}

/// Stop every service (handles taken from the supervisor, no lock held) in stop order before `deadline`: groups by `stop_order`,
/// within a group dependents before their dependencies (each level concurrently).
/// Returns the names of services that were still running at the deadline.
pub async fn stop_all(
    services: &BTreeMap<String, ServiceHandle>,
    deadline: tokio::time::Instant,
) -> Vec<String> {
    for level in stop_levels(
        &services
            .iter()
            .map(|(k, h)| (k.clone(), h.cfg.clone()))
            .collect(),
    ) {
        let now = tokio::time::Instant::now();
        let left = deadline.saturating_duration_since(now);
        let stops = level.iter().filter_map(|n| services.get(n)).map(|h| {
            let t = h
                .cfg
                .stop_timeout
                .min(left.saturating_sub(Duration::from_millis(100)));
            h.stop(t)
        });
        let _ = tokio::time::timeout_at(deadline, futures::future::join_all(stops)).await;
    }
    services
        .values()
        .filter(|h| {
            let s = h.status();
            s.pid.is_some() && !matches!(s.state, ServiceState::Stopped | ServiceState::Absent)
        })
        .map(|h| h.name.clone())
        .collect()
}

/// Environment, user and absence of a service, resolved before its task starts.
fn prepare(
    name: &str,
    cfg: &ServiceConfig,
) -> (
    Vec<(OsString, OsString)>,
    Option<crate::procs::RunAs>,
    Option<String>,
) {
    let mut env: HashMap<OsString, OsString> = base_env().into_iter().collect();
    for var in &cfg.secret_env {
        if let Some(v) = std::env::var_os(var) {
            env.insert(var.into(), v);
        }
    }
    let mut run_as = None;
    let mut absent = None;
    if let Some(user) = &cfg.user {
        match crate::procs::resolve_user(user, cfg.group.as_deref()) {
            Ok(r) => {
                env.insert("HOME".into(), r.home.clone().into());
                env.insert("USER".into(), r.name.clone().into());
                env.insert("LOGNAME".into(), r.name.clone().into());
                run_as = Some(r);
            }
            Err(e) => absent = Some(format!("cannot run as {user:?}: {e}")),
        }
    }
    for (k, v) in &cfg.env {
        env.insert(k.into(), v.into());
    }
    for var in &cfg.requires_env {
        if std::env::var_os(var).is_none_or(|v| v.is_empty()) {
            absent = Some(format!("{var} is not set"));
        }
    }
    if cfg.default && absent.is_none() && cfg.command.is_some() {
        let argv = cfg.argv();
        let path = env
            .get(&OsString::from("PATH"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if crate::procs::which(&argv[0], &path).is_none() {
            absent = Some(format!("{} is not installed", argv[0]));
        }
    }
    let _ = name;
    (env.into_iter().collect(), run_as, absent)
}

/// Services in an order where dependencies come first (ties by name).
pub fn start_order(services: &BTreeMap<String, ServiceConfig>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    fn visit(
        n: &str,
        s: &BTreeMap<String, ServiceConfig>,
        out: &mut Vec<String>,
        seen: &mut Vec<String>,
    ) {
        if out.iter().any(|x| x == n) || seen.iter().any(|x| x == n) {
            return;
        }
        seen.push(n.into());
        if let Some(c) = s.get(n) {
            for d in &c.depends_on {
                visit(d, s, out, seen);
            }
        }
        out.push(n.into());
    }
    let mut seen = Vec::new();
    for n in services.keys() {
        visit(n, services, &mut out, &mut seen);
    }
    out
}

/// Stop levels: by `stop_order` ascending; within one, the services nothing else
/// (still running) depends on go first.
pub fn stop_levels(services: &BTreeMap<String, ServiceConfig>) -> Vec<Vec<String>> {
    let mut orders: Vec<i32> = services.values().map(|s| s.stop_order).collect();
    orders.sort();
    orders.dedup();
    let mut levels = Vec::new();
    for o in orders {
        let mut left: Vec<String> = services
            .iter()
            .filter(|(_, s)| s.stop_order == o)
            .map(|(k, _)| k.clone())
            .collect();
        while !left.is_empty() {
            let level: Vec<String> = left
                .iter()
                .filter(|n| !left.iter().any(|m| services[m].depends_on.contains(n)))
                .cloned()
                .collect();
            let level = if level.is_empty() {
                left.clone()
            } else {
                level
            };
            left.retain(|n| !level.contains(n));
            levels.push(level);
        }
    }
    levels
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(deps: &[&str], order: i32) -> ServiceConfig {
        ServiceConfig {
            command: Some(vec!["true".into()]),
            depends_on: deps.iter().map(|s| s.to_string()).collect(),
            stop_order: order,
            ..Default::default()
        }
    }

    #[test]
    fn the_default_services_stop_code_server_then_dockerd_then_the_agent() {
        let loaded = crate::config::load(&crate::config::Sources::default()).unwrap();
        let levels = stop_levels(&loaded.config.services);
        assert_eq!(
            levels,
            vec![
                vec!["code-server".to_string()],
                vec!["dockerd".into()],
                vec!["coder-agent".into()]
            ]
        );
    }

    #[test]
    fn dependencies_start_first_and_stop_last() {
        let mut m = BTreeMap::new();
        m.insert("a".to_string(), svc(&["c"], 0));
        m.insert("b".to_string(), svc(&["a"], 0));
        m.insert("c".to_string(), svc(&[], 0));
        assert_eq!(start_order(&m), ["c", "a", "b"]);
        assert_eq!(
            stop_levels(&m),
            vec![vec!["b".to_string()], vec!["a".into()], vec!["c".into()]]
        );
    }
}
