//! One supervised service: a task that owns its child, its health checks and its state.
//!
//! The task is driven by [`Cmd`]s from its [`super::ServiceHandle`] and publishes its
//! [`ServiceStatus`] on a watch channel. What follows an exit is decided by the pure
//! functions of [`super::policy`].

use std::ffi::OsString;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use agent_proto::local::{EventKind, ExitInfo, Health, Level, ServiceState, ServiceStatus};
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot, watch};

use super::output::{Sink, pump};
use super::policy::{AfterExit, Failures, after_exit};
use crate::config::ServiceConfig;
use crate::events::Events;
use crate::procs::{self, ExitStatus, RunAs};

/// Everything a service task needs, prepared by the supervisor.
pub struct ServiceSpec {
    pub name: String,
    pub cfg: ServiceConfig,
    /// Set for a default service that cannot run here (missing program or variable).
    pub absent: Option<String>,
    pub env: Vec<(OsString, OsString)>,
    pub run_as: Option<RunAs>,
    pub sink: Sink,
}

pub enum Cmd {
    /// Start by hand (also clears `failed`).
    Start,
    /// Stop; reply when the child is gone. The timeout caps `stop_timeout`.
    Stop {
        timeout: Duration,
        done: oneshot::Sender<()>,
    },
    /// Stop (if running) then start at once.
    Restart,
    /// Pass a signal on to the running child's process group (nothing when not running).
    Signal(Signal),
}

type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

pub type DepWatch = (String, watch::Receiver<ServiceStatus>);

fn dep_ready(s: &ServiceStatus) -> bool {
    match s.state {
        ServiceState::Running => matches!(s.health, Health::Healthy | Health::None),
        ServiceState::Absent | ServiceState::Failed => true,
        _ => false,
    }
}

struct Task {
    spec: ServiceSpec,
    status: watch::Sender<ServiceStatus>,
    events: Events,
    cmds: mpsc::Receiver<Cmd>,
    failures: Failures,
    epoch: Instant,
}

pub async fn run(
    spec: ServiceSpec,
    cmds: mpsc::Receiver<Cmd>,
    status: watch::Sender<ServiceStatus>,
    deps: Vec<DepWatch>,
    events: Events,
) {
    let mut t = Task {
        spec,
        status,
        events,
        cmds,
        failures: Failures::default(),
        epoch: Instant::now(),
    };
    if let Some(why) = t.spec.absent.clone() {
        t.set(ServiceState::Absent, Health::None, None, Some(why));
        while let Some(cmd) = t.cmds.recv().await {
            if let Cmd::Stop { done, .. } = cmd {
                let _ = done.send(());
            }
        }
        return;
    }
    if !t.wait_for_deps(deps).await {
        return;
    }
    t.supervise().await;
}

impl Task {
    fn name(&self) -> &str {
        &self.spec.name
    }

    fn set(&self, state: ServiceState, health: Health, pid: Option<u32>, message: Option<String>) {
        let changed = {
            let s = self.status.borrow();
            s.state != state || s.health != health || s.pid != pid
        };
        // The event goes out before the watch changes, so whoever reacts to the watch
        // (e.g. the startup pipeline declaring `ready`) reports after this line.
        if changed {
            let mut line = format!("service {}: {state}", self.name());
            if health == Health::Healthy && state == ServiceState::Running {
                line.push_str(" (healthy)");
            }
            if let Some(p) = pid {
                line.push_str(&format!(", pid {p}"));
            }
            if let Some(m) = &message {
                line.push_str(&format!(": {m}"));
            }
            let level = match state {
                ServiceState::Failed | ServiceState::Unhealthy => Level::Error,
                ServiceState::Backoff | ServiceState::Absent => Level::Warn,
                _ => Level::Info,
            };
            match level {
                Level::Error => tracing::error!(service = %self.name(), state = %state, "{line}"),
                Level::Warn => tracing::warn!(service = %self.name(), state = %state, "{line}"),
                _ => tracing::info!(service = %self.name(), state = %state, "{line}"),
            }
            self.events.emit(
                level,
                EventKind::Service {
                    name: self.name().into(),
                    state,
                    health,
                    pid,
                },
                line,
            );
        }
        self.status.send_modify(|s| {
            if s.state != state || s.pid != pid {
                s.since = Some(crate::logline::now());
            }
            s.state = state;
            s.health = health;
            s.pid = pid;
            s.message = message.clone();
        });
    }

    /// Wait until every dependency is healthy (or absent/failed). Returns false when
    /// the handle is gone.
    async fn wait_for_deps(&mut self, mut deps: Vec<DepWatch>) -> bool {
        loop {
            deps.retain(|(_, rx)| rx.has_changed().is_ok());
            let waiting: Vec<String> = deps
                .iter()
                .filter(|(_, rx)| !dep_ready(&rx.borrow()))
                .map(|(n, _)| n.clone())
                .collect();
            if waiting.is_empty() {
                for (n, rx) in &deps {
                    if rx.borrow().state == ServiceState::Failed {
                        tracing::warn!(service = %self.name(), dependency = %n, "starting although dependency failed");
                    }
                }
                return true;
            }
            self.set(
                ServiceState::Pending,
                Health::Unknown,
                None,
                Some(format!("waiting for {}", waiting.join(", "))),
            );
            let changed =
                futures::future::select_all(deps.iter_mut().map(|(_, rx)| Box::pin(rx.changed())));
            tokio::select! {
                _ = changed => {}
                cmd = self.cmds.recv() => match cmd {
                    None => return false,
                    Some(Cmd::Stop { done, .. }) => {
                        self.set(ServiceState::Stopped, Health::Unknown, None, Some("stopped before it started".into()));
                        let _ = done.send(());
                        return self.wait_for_start().await;
                    }
                    Some(Cmd::Start | Cmd::Restart) => return true,
                    Some(Cmd::Signal(_)) => {}
                },
            }
        }
    }

    /// Stopped or failed: wait for a start by hand. False when the handle is gone.
    async fn wait_for_start(&mut self) -> bool {
        loop {
            match self.cmds.recv().await {
                None => return false,
                Some(Cmd::Stop { done, .. }) => {
                    let _ = done.send(());
                }
                Some(Cmd::Start | Cmd::Restart) => {
                    self.failures = Failures::default();
                    return true;
                }
                Some(Cmd::Signal(_)) => {}
            }
        }
    }

    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    async fn supervise(&mut self) {
        loop {
            let outcome = self.run_once().await;
            let (status, failed, ran_for, why) = match outcome {
                RunEnd::Exited {
                    status,
                    failed,
                    ran_for,
                    why,
                } => (status, failed, ran_for, why),
                RunEnd::Stopped => {
                    if !self.wait_for_start().await {
                        return;
                    }
                    self.bump_restarts();
                    continue;
                }
                RunEnd::Restart => {
                    self.bump_restarts();
                    continue;
                }
                RunEnd::Gone => return,
            };
            let jitter = 0.8 + rand::random::<f64>() * 0.4;
            let now = self.now();
            let decision = after_exit(
                self.spec.cfg.restart,
                &self.spec.cfg.backoff,
                &mut self.failures,
                status,
                failed,
                ran_for,
                now,
                jitter,
            );
            match decision {
                AfterExit::Restart(delay) => {
                    self.set(
                        ServiceState::Backoff,
                        Health::Unknown,
                        None,
                        Some(format!("{why}; restarting in {}", fmt_dur(delay))),
                    );
                    let sleep = tokio::time::sleep(delay);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            _ = &mut sleep => {}
                            cmd = self.cmds.recv() => match cmd {
                                None => return,
                                Some(Cmd::Stop { done, .. }) => {
                                    self.set(ServiceState::Stopped, Health::Unknown, None, Some("stopped".into()));
                                    let _ = done.send(());
                                    if !self.wait_for_start().await { return; }
                                }
                                Some(Cmd::Start | Cmd::Restart) => {}
                                // No child to pass it to; the backoff goes on.
                                Some(Cmd::Signal(_)) => continue,
                            },
                        }
                        break;
                    }
                    self.bump_restarts();
                }
                AfterExit::Stop => {
                    self.set(ServiceState::Stopped, Health::Unknown, None, Some(why));
                    if !self.wait_for_start().await {
                        return;
                    }
                    self.bump_restarts();
                }
                AfterExit::GiveUp => {
                    let n = self.failures.at.len();
                    self.set(
                        ServiceState::Failed,
                        Health::Unknown,
                        None,
                        Some(format!(
                            "{why}; gave up after {n} failures within {} (start it by hand: wsagent start {})",
                            fmt_dur(self.spec.cfg.backoff.window),
                            self.name()
                        )),
                    );
                    if !self.wait_for_start().await {
                        return;
                    }
                    self.bump_restarts();
                }
            }
        }
    }

    fn bump_restarts(&self) {
        self.status.send_modify(|s| s.restarts += 1);
    }

    fn record_exit(&self, st: ExitStatus) {
        self.status.send_modify(|s| {
            s.last_exit = Some(ExitInfo {
                code: st.code,
                signal: st.signal,
                at: crate::events::now_rfc3339(),
            })
        });
    }

    fn spawn(&self) -> std::io::Result<procs::Child> {
        let mut spec = procs::Spec::new(self.spec.cfg.argv());
        spec.env = self.spec.env.clone();
        // `~` is the service's HOME: its environment's, else its user's, else ours.
        spec.cwd = self.spec.cfg.cwd.as_deref().map(|cwd| {
            let home = self
                .spec
                .env
                .iter()
                .find(|(k, _)| k == "HOME")
                .map(|(_, v)| std::path::PathBuf::from(v))
                .or_else(|| self.spec.run_as.as_ref().map(|r| r.home.clone()))
                .or_else(|| std::env::var_os("HOME").map(Into::into))
                .unwrap_or_else(|| "/".into());
            crate::paths::expand_home(cwd, &home)
        });
        spec.run_as = self.spec.run_as.clone();
        spec.stdout = procs::Io::Piped;
        spec.stderr = procs::Io::Piped;
        procs::spawn(spec)
    }

    /// One run of the child, from spawn to exit (or stop).
    async fn run_once(&mut self) -> RunEnd {
        let started = Instant::now();
        let mut child = match self.spawn() {
            Ok(c) => c,
            Err(e) => {
                let argv0 = self.spec.cfg.argv().first().cloned().unwrap_or_default();
                return RunEnd::Exited {
                    status: None,
                    failed: true,
                    ran_for: Duration::ZERO,
                    why: format!("cannot start {argv0:?}: {e}"),
                };
            }
        };
        let pid = child.pid;
        let mut pumps = Vec::new();
        if let Some(fd) = child.stdout.take() {
            pumps.push(tokio::spawn(pump(fd, "stdout", self.spec.sink.clone())));
        }
        if let Some(fd) = child.stderr.take() {
            pumps.push(tokio::spawn(pump(fd, "stderr", self.spec.sink.clone())));
        }
        let health_cfg = self.spec.cfg.health.clone();
        let mut health = if health_cfg.is_some() {
            Health::Unknown
        } else {
            Health::None
        };
        let first_state = if health_cfg.is_some() {
            ServiceState::Starting
        } else {
            ServiceState::Running
        };
        self.set(first_state, health, Some(pid), None);

        let mut ever_healthy = health_cfg.is_none();
        let mut consecutive_failures = 0u32;
        let mut next_check = tokio::time::Instant::now();
        let mut fast_delay = Duration::from_millis(20);
        let start_deadline = tokio::time::Instant::now() + self.spec.cfg.start_timeout;
        let mut check: Option<CheckFuture> = None;

        let end = loop {
            let checking = check.is_some();
            let check_fut = async {
                match check.as_mut() {
                    Some(f) => f.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                st = child.wait() => {
                    self.record_exit(st);
                    let failed = !st.success() || !ever_healthy && health_cfg.is_some() && !st.success();
                    break RunEnd::Exited { status: Some(st), failed, ran_for: started.elapsed(), why: format!("exited with {}", st) };
                }
                res = check_fut => {
                    check = None;
                    let h = health_cfg.as_ref().expect("check only with health config");
                    match res {
                        Ok(()) => {
                            consecutive_failures = 0;
                            ever_healthy = true;
                            health = Health::Healthy;
                            self.set(ServiceState::Running, health, Some(pid), None);
                            next_check = tokio::time::Instant::now() + h.interval;
                        }
                        Err(why) => {
                            if ever_healthy {
                                consecutive_failures += 1;
                                tracing::debug!(service = %self.name(), error = %why, "health check failed");
                                if consecutive_failures >= h.failure_threshold {
                                    health = Health::Unhealthy;
                                    let msg = format!("health check failed {consecutive_failures} times: {why}");
                                    self.set(ServiceState::Unhealthy, health, Some(pid), Some(msg.clone()));
                                    if h.restart_on_unhealthy {
                                        let st = self.stop_child(&mut child, self.spec.cfg.stop_timeout).await;
                                        self.record_exit(st);
                                        break RunEnd::Exited { status: Some(st), failed: true, ran_for: started.elapsed(), why: msg };
                                    }
                                }
                                next_check = tokio::time::Instant::now() + h.interval;
                            } else {
                                self.status.send_modify(|s| s.message = Some(format!("not healthy yet: {why}")));
                                next_check = tokio::time::Instant::now() + fast_delay;
                                fast_delay = (fast_delay * 2).min(h.interval);
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(next_check), if !checking && health_cfg.is_some() => {
                    let h = health_cfg.clone().expect("health config");
                    let env = self.spec.env.clone();
                    check = Some(Box::pin(async move { crate::health::check(&h, &env).await }));
                }
                _ = tokio::time::sleep_until(start_deadline), if !ever_healthy => {
                    let msg = format!("not healthy within start_timeout {}", fmt_dur(self.spec.cfg.start_timeout));
                    let st = self.stop_child(&mut child, self.spec.cfg.stop_timeout).await;
                    self.record_exit(st);
                    break RunEnd::Exited { status: Some(st), failed: true, ran_for: started.elapsed(), why: msg };
                }
                cmd = self.cmds.recv() => match cmd {
                    None => {
                        self.stop_child(&mut child, self.spec.cfg.stop_timeout).await;
                        break RunEnd::Gone;
                    }
                    Some(Cmd::Start) => {}
                    Some(Cmd::Signal(sig)) => child.signal_group(sig),
                    Some(Cmd::Restart) => {
                        let st = self.stop_child(&mut child, self.spec.cfg.stop_timeout).await;
                        self.record_exit(st);
                        break RunEnd::Restart;
                    }
                    Some(Cmd::Stop { timeout, done }) => {
                        let st = self.stop_child(&mut child, timeout.min(self.spec.cfg.stop_timeout)).await;
                        self.record_exit(st);
                        self.set(ServiceState::Stopped, Health::Unknown, None, Some(format!("stopped ({st})")));
                        let _ = done.send(());
                        break RunEnd::Stopped;
                    }
                },
            }
        };
        // Output pipes may be held open by grandchildren; do not wait for them forever.
        for p in pumps {
            let _ = tokio::time::timeout(Duration::from_millis(200), p).await;
        }
        end
    }

    /// Stop the child: `stop_signal` to its group, wait `timeout`, then SIGKILL the
    /// group (grandchildren included). Returns the leader's exit status.
    async fn stop_child(&self, child: &mut procs::Child, timeout: Duration) -> ExitStatus {
        let sig = procs::parse_signal(&self.spec.cfg.stop_signal).unwrap_or(Signal::SIGTERM);
        self.set(
            ServiceState::Stopping,
            Health::Unknown,
            Some(child.pid),
            None,
        );
        if let Some(st) = child.try_wait() {
            kill_group(child.pid, Signal::SIGKILL);
            return st;
        }
        child.signal_group(sig);
        let deadline = tokio::time::Instant::now() + timeout;
        let st = match tokio::time::timeout_at(deadline, child.wait()).await {
            Ok(st) => st,
            Err(_) => {
                tracing::warn!(service = %self.name(), timeout = %fmt_dur(timeout), "did not stop in time: killing its process group");
                child.signal_group(Signal::SIGKILL);
                child.wait().await
            }
        };
        // Group members that outlived the leader get what is left of the timeout.
        let pgid = child.pid;
        // Usually they are gone within a millisecond (exiting with the leader): poll
        // quickly first, then back off.
        let mut pause = Duration::from_millis(1);
        while group_alive(pgid) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        kill_group(pgid, Signal::SIGKILL);
        st
    }
}

enum RunEnd {
    Exited {
        status: Option<ExitStatus>,
        failed: bool,
        ran_for: Duration,
        why: String,
    },
    Stopped,
    Restart,
    Gone,
}

fn group_alive(pgid: u32) -> bool {
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid as i32), None).is_ok()
}

fn kill_group(pgid: u32, sig: Signal) {
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid as i32), sig);
}

pub fn fmt_dur(d: Duration) -> String {
    if d.as_millis() < 1000 {
        format!("{}ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}
