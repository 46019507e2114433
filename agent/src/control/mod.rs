//! Control plane: reports to Coder and keeps git tokens fresh (issue 4).
//!
//! wsagent talks to coderd's agent HTTP routes that are still served
//! (`shared/reference/coder-agent-api.md` §3.1): its own log source and log lines
//! ([`logs`]), external-auth tokens cached in 0600 files ([`git`]), and the app status.
//! Without a URL or an agent token it runs standalone: said once, shown in status,
//! everything else works. Nothing here ever blocks the daemon: every call runs in a
//! tracked task or under a caller's deadline, and queues are bounded.
//!
//! Entry points: [`ControlPlane::new`] (from config + environment), then
//! [`ControlPlane::start`], which gives the [`ControlHandle`] the daemon keeps. In the
//! stop sequence call [`ControlHandle::flush`] before cancelling: events emitted after
//! the cancel are not collected any more. When the stop sequence begins, call
//! [`ControlHandle::stopping`]: from then on every call is best effort, and a refused
//! agent token (401/403, expected during a stop or delete build) ends all calls at once.

pub mod client;
pub mod git;
pub mod logs;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use agent_proto::coder::{APP_STATES, PatchAppStatus};
use agent_proto::local::Level;
use reqwest::Method;
use serde::de::IgnoredAny;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
pub use crate::config::control::{
    ControlPlaneConfig, DEFAULT_LOG_BUDGET, MIN_LOG_BUDGET, validate,
};
use crate::events::Events;
use crate::secrets::Secret;
use crate::tokens::{FreshFetch, GitProvider};
use client::Client;
use git::Fetched;

pub use git::{
    CliContext, cmd_git_askpass, cmd_git_askpass_with, cmd_token, cmd_token_with, write_cache,
};

/// Why wsagent runs standalone (no client could be made).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Standalone {
    #[error("no CODER_AGENT_URL and no control_plane.url")]
    NoUrl,
    #[error("no CODER_AGENT_TOKEN or CODER_AGENT_TOKEN_FILE")]
    NoToken,
    #[error("cannot read CODER_AGENT_TOKEN_FILE {path}: {detail}")]
    TokenFile { path: String, detail: String },
    #[error("{0}")]
    Client(String),
}

/// Build the client from config and environment: URL (`control_plane.url`, else
/// `CODER_AGENT_URL`), token (`CODER_AGENT_TOKEN`, else the trimmed contents of
/// `CODER_AGENT_TOKEN_FILE`, registered as a secret the moment it is read) and extra
/// trust roots (`control_plane.ca_file`, `SSL_CERT_FILE`).
pub fn connect(
    cfg: &ControlPlaneConfig,
    env: &HashMap<String, String>,
) -> Result<Client, Standalone> {
    let nonempty = |k: &str| env.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let url = cfg
        .url
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .or_else(|| nonempty("CODER_AGENT_URL"))
        .ok_or(Standalone::NoUrl)?
        .to_string();
    let token = match nonempty("CODER_AGENT_TOKEN") {
        Some(t) => Secret::new(t),
        None => {
            let path = nonempty("CODER_AGENT_TOKEN_FILE").ok_or(Standalone::NoToken)?;
            let text = std::fs::read_to_string(path).map_err(|e| Standalone::TokenFile {
                path: path.into(),
                detail: e.to_string(),
            })?;
            let t = text.trim();
            if t.is_empty() {
                return Err(Standalone::NoToken);
            }
            Secret::new(t)
        }
    };
    let mut cas = Vec::new();
    if let Some(f) = &cfg.ca_file {
        cas.push(f.clone());
    }
    if let Some(f) = nonempty("SSL_CERT_FILE")
        && std::path::Path::new(f).is_file()
    {
        cas.push(f.to_string());
    }
    Client::new(&url, token, cfg.request_timeout, &cas)
        .map_err(|e| Standalone::Client(e.to_string()))
}

/// What `status()` shows.
#[derive(Debug, Default)]
pub struct Board {
    standalone: Option<String>,
    /// `None` until the first call ended; then whether it reached coderd.
    reached: Option<bool>,
    last_error: Option<String>,
    /// Why dashboard logs stopped, if they did.
    pub(crate) logs: Option<String>,
    pub(crate) dropped_lines: u64,
    /// Providers whose account is not linked, with the sign-in URL.
    sign_in: BTreeMap<String, String>,
    /// Why app status was switched off, if it was.
    app_status_off: Option<String>,
    /// coderd refused the agent token (401/403).
    rejected: Option<String>,
}

impl Board {
    pub(crate) fn reached(&mut self, ok: bool, err: Option<String>) {
        self.reached = Some(ok);
        if ok {
            self.last_error = None;
            self.rejected = None;
        } else if err.is_some() {
            self.last_error = err;
        }
    }

    /// Note a refusal of the agent token; other refusals are the caller's business.
    pub(crate) fn rejected(&mut self, e: &client::ApiError) {
        if matches!(e.status(), Some(401 | 403)) {
            self.rejected = Some(e.to_string());
        }
    }

    fn render(&self) -> String {
        if let Some(why) = &self.standalone {
            return format!("standalone ({why})");
        }
        let mut parts = vec![match (self.reached, &self.rejected) {
            (_, Some(why)) => format!("rejected: {why}"),
            (None, _) => "connecting".to_string(),
            (Some(true), _) => "connected".to_string(),
            (Some(false), _) => format!(
                "unreachable: {}",
                self.last_error.as_deref().unwrap_or("unknown error")
            ),
        }];
        if let Some(l) = &self.logs {
            parts.push(l.clone());
        }
        if self.dropped_lines > 0 {
            parts.push(format!("{} log lines dropped", self.dropped_lines));
        }
        for (id, url) in &self.sign_in {
            parts.push(format!("{id}: not linked, sign in at {url}"));
        }
        if let Some(why) = &self.app_status_off {
            parts.push(why.clone());
        }
        parts.join("; ")
    }
}

/// The control plane before it starts.
pub struct ControlPlane {
    cfg: ControlPlaneConfig,
    client: Result<Client, Standalone>,
    providers: BTreeMap<String, GitProvider>,
    home: PathBuf,
}

impl ControlPlane {
    /// Standalone when there is no URL or no token (see [`connect`]).
    pub fn new(
        cfg: &crate::config::Config,
        env: &HashMap<String, String>,
        home: PathBuf,
    ) -> ControlPlane {
        ControlPlane {
            cfg: cfg.control_plane.clone(),
            client: connect(&cfg.control_plane, env),
            providers: git::providers_of(cfg),
            home,
        }
    }

    /// Spawn the work on `tracker` (log shipping, token refresh, the cache watcher, the
    /// first app status) and return the handle. Returns at once.
    pub fn start(
        self,
        events: &Events,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> ControlHandle {
        let board = Arc::new(Mutex::new(Board::default()));
        let (client, shipper, drain) = match self.client {
            Err(why) => {
                tracing::info!(reason = %why, "control plane: standalone mode; nothing is reported to coder");
                lock(&board).standalone = Some(why.to_string());
                (None, None, None)
            }
            Ok(client) if self.cfg.send_logs => {
                let shipper = Arc::new(logs::Shipper::new(
                    client.clone(),
                    board.clone(),
                    self.cfg.log_queue_lines,
                    self.cfg.log_batch_interval,
                    self.cfg.log_budget,
                ));
                let (tx, rx) = mpsc::channel(4);
                tracker.spawn(logs::pump(
                    shipper.clone(),
                    events.subscribe(),
                    rx,
                    cancel.clone(),
                ));
                tracker.spawn(shipper.clone().run(cancel.clone()));
                (Some(client), Some(shipper), Some(tx))
            }
            Ok(client) => (Some(client), None, None),
        };
        let handle = ControlHandle {
            inner: Arc::new(Inner {
                cfg: self.cfg,
                client,
                board,
                shipper,
                drain,
                providers: self.providers,
                home: self.home,
                events: events.clone(),
                app_lock: Arc::new(tokio::sync::Mutex::new(())),
                app_off: AtomicBool::new(false),
                written: Mutex::new(HashMap::new()),
            }),
        };
        if handle.inner.client.is_some() {
            for (id, p) in &handle.inner.providers {
                let h = handle.clone();
                let (id, every) = (id.clone(), p.refresh_interval);
                tracker.spawn(h.refresh_loop(id, every, cancel.clone()));
            }
            if handle.inner.cfg.app_status_slug.is_some()
                && let Ok(guard) = handle.inner.app_lock.clone().try_lock_owned()
            {
                let h = handle.clone();
                tracker.spawn(async move {
                    let _guard = guard;
                    h.send_app_status("working", "wsagent is preparing the workspace")
                        .await;
                });
            }
        }
        let files = handle.cache_files();
        tracker.spawn(handle.clone().watch_loop(files, cancel.clone()));
        handle
    }
}

/// The most bytes of an app status `message` coderd accepts (a 400 beyond, v2.22.0+).
pub const MAX_APP_STATUS_MESSAGE: usize = 160;

/// `s` cut to at most `max` bytes, on a char boundary.
pub fn cap_bytes(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn lock(board: &Mutex<Board>) -> MutexGuard<'_, Board> {
    board.lock().unwrap_or_else(|e| e.into_inner())
}

struct Inner {
    cfg: ControlPlaneConfig,
    client: Option<Client>,
    board: Arc<Mutex<Board>>,
    shipper: Option<Arc<logs::Shipper>>,
    drain: Option<mpsc::Sender<oneshot::Sender<()>>>,
    providers: BTreeMap<String, GitProvider>,
    home: PathBuf,
    events: Events,
    /// Serialises app-status reports, so they arrive in the order they were made.
    app_lock: Arc<tokio::sync::Mutex<()>>,
    app_off: AtomicBool,
    /// The token last written to each provider's cache by wsagent itself.
    written: Mutex<HashMap<String, String>>,
}

/// The running control plane, as the daemon and the stop sequence see it.
#[derive(Clone)]
pub struct ControlHandle {
    inner: Arc<Inner>,
}

impl ControlHandle {
    /// No client could be made (no URL or token): nothing is reported to Coder.
    pub fn is_standalone(&self) -> bool {
        self.inner.client.is_none()
    }

    /// `standalone (...)`, `connecting`, `connected` or `unreachable: ...`, followed by
    /// anything worth knowing (`logs limit reached`, a provider to sign in to, ...).
    pub fn status(&self) -> String {
        lock(&self.inner.board).render()
    }

    /// The fresh token fetch the save phase tries before the cache
    /// (`Tokens.fresh`): bounded by `control_plane.fresh_token_timeout`; `None` when
    /// standalone, unreachable or not linked (the caller then uses the cache).
    pub fn fresh_fetch(&self) -> FreshFetch {
        let h = self.clone();
        Arc::new(move |id: String| {
            let h = h.clone();
            Box::pin(async move { h.fresh_token(&id).await })
        })
    }

    async fn fresh_token(&self, id: &str) -> Option<Secret> {
        let client = self.inner.client.as_ref()?;
        let deadline = Instant::now() + self.inner.cfg.fresh_token_timeout;
        let r = git::fetch(client, id, deadline).await;
        match self.apply(id, r) {
            Some(Fetched::Token(t, _)) => Some(t),
            _ => None,
        }
    }

    /// The stop sequence has begun: every call to coderd is best effort from now on. A
    /// 401 or 403 (coderd refuses the token of a workspace being stopped or deleted) is
    /// logged once and ends every later call without a request or a retry; the save
    /// then pushes with the cached git token.
    pub fn stopping(&self) {
        if let Some(c) = &self.inner.client {
            c.set_stopping();
        }
    }

    /// Deliver the queued log lines (every event emitted before this call included),
    /// giving up at `deadline`.
    pub async fn flush(&self, deadline: Instant) {
        let Some(shipper) = &self.inner.shipper else {
            return;
        };
        if let Some(drain) = &self.inner.drain {
            let (tx, rx) = oneshot::channel();
            if drain.try_send(tx).is_ok() {
                let _ = tokio::time::timeout_at(deadline, rx).await;
            }
        }
        shipper.flush(deadline).await;
    }

    /// Report `state` (`working`, `complete`, `failure`, `idle`) on the configured app;
    /// a no-op unless `control_plane.app_status_slug` is set. Bounded by the request
    /// timeout; reports keep their order.
    pub async fn app_status(&self, state: &str, message: &str) {
        if self.inner.client.is_none() || self.inner.cfg.app_status_slug.is_none() {
            return;
        }
        let deadline = Instant::now() + self.inner.cfg.request_timeout;
        let Ok(_guard) = tokio::time::timeout_at(deadline, self.inner.app_lock.lock()).await else {
            tracing::warn!(state, "app status not reported: an earlier report is stuck");
            return;
        };
        self.send_app_status(state, message).await;
    }

    async fn send_app_status(&self, state: &str, message: &str) {
        let (Some(client), Some(slug)) = (&self.inner.client, &self.inner.cfg.app_status_slug)
        else {
            return;
        };
        if self.inner.app_off.load(Ordering::Relaxed) {
            return;
        }
        if !APP_STATES.contains(&state) {
            tracing::warn!(state, "not an app status state; not reported");
            return;
        }
        let body = PatchAppStatus {
            app_slug: slug.clone(),
            state: state.into(),
            message: cap_bytes(message, MAX_APP_STATUS_MESSAGE).into(),
            uri: String::new(),
        };
        let deadline = Instant::now() + self.inner.cfg.request_timeout;
        let r = client
            .call_until::<_, IgnoredAny>(Method::PATCH, "/app-status", &[], Some(&body), deadline)
            .await;
        match r {
            Ok(_) => lock(&self.inner.board).reached(true, None),
            Err(e) if e.status() == Some(404) => {
                self.inner.app_off.store(true, Ordering::Relaxed);
                lock(&self.inner.board).app_status_off =
                    Some("app status not supported by coderd".into());
                tracing::info!(error = %e, "coderd has no app status route (older coder); app status is off");
            }
            // State and message are valid by construction: the slug is unknown.
            Err(e) if e.status() == Some(400) => {
                self.inner.app_off.store(true, Ordering::Relaxed);
                lock(&self.inner.board).app_status_off =
                    Some(format!("app status off: no app {slug:?} in this workspace"));
                tracing::warn!(error = %e, slug = %slug, "coderd knows no app with the slug control_plane.app_status_slug names; app status is off");
            }
            Err(e) if e.refused() => {}
            Err(e) => {
                if e.retryable() {
                    lock(&self.inner.board).reached(false, Some(e.to_string()));
                }
                tracing::warn!(error = %e, state, "app status not reported");
            }
        }
    }

    /// Fetch every provider's token once (in parallel) and cache it; bounded by
    /// `timeout`. The startup step "git token" calls this.
    pub async fn refresh_tokens_once(&self, timeout: Duration) {
        let Some(client) = &self.inner.client else {
            return;
        };
        let deadline = Instant::now() + timeout;
        let jobs = self.inner.providers.keys().map(|id| async move {
            let r = tokio::time::timeout_at(deadline, git::fetch(client, id, deadline)).await;
            match r {
                Ok(r) => {
                    self.apply(id, r);
                }
                Err(_) => tracing::warn!(provider = %id, ?timeout, "git token not fetched in time"),
            }
        });
        futures::future::join_all(jobs).await;
    }

    /// Act on a fetch result: cache a token, record a sign-in URL (one log line per new
    /// URL), record an error. Returns the result when it was a success.
    fn apply(&self, id: &str, r: Result<Fetched, client::ApiError>) -> Option<Fetched> {
        match r {
            Ok(Fetched::Token(t, expires)) => {
                crate::metrics::token_fetched(id);
                {
                    let mut b = lock(&self.inner.board);
                    b.reached(true, None);
                    b.sign_in.remove(id);
                }
                if let Some(p) = self.inner.providers.get(id) {
                    let path = p.cache_path(id, &self.inner.home);
                    self.written()
                        .insert(id.to_string(), t.expose().to_string());
                    match git::write_cache(&path, &t) {
                        Ok(true) => {
                            tracing::info!(provider = %id, path = %path.display(), "git token cached")
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(provider = %id, error = %e, "git token not cached")
                        }
                    }
                }
                Some(Fetched::Token(t, expires))
            }
            Ok(Fetched::SignIn(url)) => {
                let new = {
                    let mut b = lock(&self.inner.board);
                    b.reached(true, None);
                    b.sign_in.insert(id.to_string(), url.clone()) != Some(url.clone())
                };
                if new {
                    tracing::warn!(provider = %id, %url, "git account not linked in coder; sign in at this url");
                    self.inner.events.note(
                        Level::Warn,
                        format!("git account for {id} is not linked: sign in at {url}"),
                    );
                }
                Some(Fetched::SignIn(url))
            }
            // Stopping, and the token is refused: said once already.
            Err(e) if e.refused() => None,
            Err(e) => {
                if e.retryable() {
                    lock(&self.inner.board).reached(false, Some(e.to_string()));
                } else {
                    lock(&self.inner.board).rejected(&e);
                }
                tracing::warn!(provider = %id, error = %e, "git token not refreshed");
                None
            }
        }
    }

    fn written(&self) -> MutexGuard<'_, HashMap<String, String>> {
        self.inner.written.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn refresh_loop(self, id: String, every: Duration, cancel: CancellationToken) {
        let client = match &self.inner.client {
            Some(c) => c.clone(),
            None => return,
        };
        let retry_cap = every.clamp(Duration::from_secs(1), Duration::from_secs(300));
        let mut backoff = Backoff::new(Duration::from_secs(2).min(retry_cap), retry_cap);
        loop {
            let deadline = Instant::now() + self.inner.cfg.request_timeout;
            let r = tokio::select! {
                _ = cancel.cancelled() => return,
                r = git::fetch(&client, &id, deadline) => r,
            };
            if client.is_refused() {
                return;
            }
            let next = match self.apply(&id, r) {
                // Ahead of the token's expiry, when coderd gives one.
                Some(Fetched::Token(_, expires)) => {
                    backoff.reset();
                    let next = git::next_refresh(expires, std::time::SystemTime::now(), every);
                    if next < every {
                        tracing::debug!(provider = %id, ?next, "git token expires soon; refreshing ahead of it");
                    }
                    next
                }
                // Not linked: ask again later (the user may sign in meanwhile).
                Some(Fetched::SignIn(_)) => every.min(Duration::from_secs(60)),
                None => backoff.next_delay().max(Duration::from_millis(100)),
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(next) => {}
            }
        }
    }

    /// The cache files to watch, one per provider, their directories made (0700).
    fn cache_files(&self) -> Vec<(String, PathBuf)> {
        let paths: Vec<(String, PathBuf)> = self
            .inner
            .providers
            .iter()
            .map(|(id, p)| (id.clone(), p.cache_path(id, &self.inner.home)))
            .collect();
        let mut dirs: Vec<PathBuf> = paths
            .iter()
            .filter_map(|(_, p)| p.parent().map(PathBuf::from))
            .collect();
        dirs.sort();
        dirs.dedup();
        for d in dirs {
            if let Err(e) = git::private_dir(&d) {
                tracing::warn!(dir = %d.display(), error = %e, "cannot create the token cache directory");
            }
        }
        // Tokens already cached are secrets too.
        for (id, _) in &paths {
            self.reread(id);
        }
        paths
    }

    /// Read a provider's cache file and register its token as a secret; true when it
    /// holds a token wsagent did not write (one written by hand).
    fn reread(&self, id: &str) -> bool {
        let Some(p) = self.inner.providers.get(id) else {
            return false;
        };
        let Ok(Some(t)) = crate::tokens::read_cache(&p.cache_path(id, &self.inner.home)) else {
            return false;
        };
        let t = t.as_str();
        let _ = Secret::new(t);
        self.written().get(id).map(String::as_str) != Some(t)
    }

    /// Notice a cache file changed by someone else (polled: see `crate::watch`) and use
    /// its token. The files are looked at first when this is called.
    fn watch_loop(
        self,
        files: Vec<(String, PathBuf)>,
        cancel: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send {
        let paths = files.iter().map(|(_, p)| p.clone()).collect();
        crate::watch::poll(paths, crate::watch::INTERVAL, cancel, move |i| {
            let (id, path) = &files[i];
            if self.reread(id) {
                tracing::info!(provider = %id, "git token cache changed on disk; using the new token");
                if let Ok(Some(t)) = crate::tokens::read_cache(path) {
                    self.written().insert(id.clone(), t);
                }
            }
        })
    }

    /// Lines dropped from the dashboard queue so far.
    pub fn dropped_lines(&self) -> u64 {
        lock(&self.inner.board).dropped_lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        assert!(validate(&ControlPlaneConfig::default()).is_empty());
        let bad = ControlPlaneConfig {
            url: Some("coder.internal".into()),
            request_timeout: Duration::ZERO,
            log_queue_lines: 0,
            log_budget: 2 << 20,
            ..Default::default()
        };
        let keys: Vec<_> = validate(&bad).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "control_plane.url",
                "control_plane.request_timeout",
                "control_plane.log_queue_lines",
                "control_plane.log_budget"
            ]
        );
        let small = ControlPlaneConfig {
            log_budget: 100,
            ..Default::default()
        };
        assert_eq!(validate(&small)[0].0, "control_plane.log_budget");
    }

    #[test]
    fn app_status_messages_are_cut_to_160_bytes_on_a_char_boundary() {
        assert_eq!(cap_bytes("short", 160), "short");
        let e = "é".repeat(100); // 200 bytes
        let cut = cap_bytes(&e, MAX_APP_STATUS_MESSAGE);
        assert_eq!(cut.len(), 160);
        let odd = format!("x{e}"); // every é starts at an even offset + 1
        assert_eq!(cap_bytes(&odd, 160).len(), 159);
    }

    #[test]
    fn status_reads_state_first_then_what_is_worth_knowing() {
        let mut b = Board::default();
        assert_eq!(b.render(), "connecting");
        b.reached(false, Some("/p: cannot reach coderd".into()));
        assert_eq!(b.render(), "unreachable: /p: cannot reach coderd");
        b.reached(true, None);
        b.logs = Some("logs limit reached".into());
        b.dropped_lines = 3;
        b.sign_in
            .insert("github".into(), "https://c/external-auth/github".into());
        assert_eq!(
            b.render(),
            "connected; logs limit reached; 3 log lines dropped; github: not linked, sign in at https://c/external-auth/github"
        );
        b.standalone = Some("no CODER_AGENT_URL and no control_plane.url".into());
        assert!(b.render().starts_with("standalone"));
    }

    #[test]
    fn no_url_or_no_token_means_standalone() {
        let cfg = ControlPlaneConfig::default();
        let env = |kv: &[(&str, &str)]| -> HashMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(matches!(connect(&cfg, &env(&[])), Err(Standalone::NoUrl)));
        assert!(matches!(
            connect(&cfg, &env(&[("CODER_AGENT_URL", "https://c.example/")])),
            Err(Standalone::NoToken)
        ));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tok");
        std::fs::write(&f, "  0b0e4c1c-1111-4222-8333-944444444444\n").unwrap();
        let c = connect(
            &cfg,
            &env(&[
                ("CODER_AGENT_URL", "https://c.example/"),
                ("CODER_AGENT_TOKEN_FILE", f.to_str().unwrap()),
            ]),
        );
        assert!(c.is_ok());
        assert_eq!(
            crate::secrets::redact("x 0b0e4c1c-1111-4222-8333-944444444444"),
            "x [REDACTED]"
        );
    }
}
