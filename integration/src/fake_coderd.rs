//! A fake coderd: a real axum HTTP server on `127.0.0.1:0` that serves the agent routes
//! wsagent uses, with the validations of `shared/reference/coder-agent-api.md`.
//!
//! Served (all under `/api/v2/workspaceagents/me`): `POST /log-source`, `PATCH /logs`,
//! `GET /external-auth` (and its alias `/gitauth`), `PATCH /app-status`. Every request
//! is recorded (method, path, query, headers, body, status) before anything else, so
//! tests can assert on exactly what was sent. Tests steer it with switches: down (the
//! port refuses connections), slow (a delay before every answer), a fault (HTML 502,
//! malformed JSON, any status), app-status answering 404 like an older coderd,
//! log-source answering 404 like a coderd before v2.13, every agent token refused (401,
//! as during a stop or delete build), the request body cap (413 "Request body too
//! large." over 4 MiB, Coder >= 2.37; settable), and the linked tokens of external-auth
//! providers, which can be rotated and given an expiry.
//!
//! Limits as the reference's §0 states them: a log line is stored cut to 1024
//! characters but its full bytes count against the 1 MiB per-agent total (shared with
//! what [`FakeCoderd::set_logs_length`] says other sources spent); an app-status
//! `message` over 160 bytes and an unknown `app_slug` are each a 400; states are
//! case-insensitive; `expires_at` is always in the external-auth answer (the zero time
//! when the token has no expiry).
//!
//! [`FakeCoderd::start_tls`] serves HTTPS with a given certificate (e.g. one signed by a
//! private CA, as clusters reaching coderd by an internal name have).
//!
//! Differences from coderd, on purpose: a provider's `match` is a plain substring test
//! instead of a Go regex; `listen` long-polls only work with `id` (and poll every 20 ms);
//! every answer carries `Connection: close`, so "down" takes effect at the next request
//! instead of after the client's pooled connections time out.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use agent_proto::coder::{
    self, ExternalAuthResponse, PatchAppStatus, PatchLogs, PostLogSourceRequest, Response,
    WorkspaceAgentLogSource,
};
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::IntoResponse;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path without the query, e.g. `/api/v2/workspaceagents/me/logs`.
    pub path: String,
    /// The raw query string (empty when none).
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The status answered.
    pub status: u16,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The query parameters, decoded.
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        self.query
            .split('&')
            .filter(|s| !s.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect()
    }
    pub fn body_json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// A stored log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLog {
    pub log_source_id: Uuid,
    pub output: String,
    /// Normalised: an empty level is stored as `info`.
    pub level: String,
    /// The server's time of the batch (RFC 3339); the client's `created_at` is ignored.
    pub created_at: String,
}

/// A fault injected into every answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// 502 with an HTML body, like a proxy in front of a dead coderd.
    Html502,
    /// 200 with a body that is not JSON.
    MalformedJson,
    /// This status with a `codersdk.Response` body.
    Status(u16),
    /// 429 with `Retry-After: <seconds>`.
    RateLimited(u32),
}

/// An external-auth provider of the fake deployment.
#[derive(Debug, Clone)]
pub struct Provider {
    pub id: String,
    /// Provider type: `github`, `gitlab`, `bitbucket-cloud`, ...
    pub kind: String,
    /// Substring matched against `match` (coderd uses a regex).
    pub matches: String,
    /// The user's linked token; `None` when the account is not linked.
    pub token: Option<String>,
}

/// coderd's `max_logs_length` is counted in bytes; a stored line keeps this many chars.
pub const STORED_LINE_CHARS: usize = 1024;

/// Coder >= 2.37 refuses a request body over 4 MiB.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// The most bytes of an app status `message` (since v2.22.0).
pub const MAX_APP_STATUS_MESSAGE: usize = 160;

pub use coder::ZERO_TIME;

#[derive(Default)]
struct State {
    agent_tokens: HashSet<String>,
    agent_id: Uuid,
    requests: Vec<Recorded>,
    log_sources: BTreeMap<Uuid, WorkspaceAgentLogSource>,
    logs: Vec<StoredLog>,
    logs_length: usize,
    logs_overflowed: bool,
    providers: Vec<Provider>,
    app_statuses: Vec<PatchAppStatus>,
    app_status_404: bool,
    /// The slugs of the agent's apps (an unknown one is a 400).
    app_slugs: HashSet<String>,
    log_source_404: bool,
    /// Every agent token refused (401), though [`FakeCoderd::token`] still names one.
    tokens_revoked: bool,
    /// Bodies over this many bytes get 413 "Request body too large."; `None`: no cap.
    max_body: Option<usize>,
    /// RFC 3339 expiry of each provider's token (absent: the zero time).
    expires_at: BTreeMap<String, String>,
    delay: Duration,
    fault: Option<Fault>,
    in_flight: usize,
}

struct Shared {
    state: Mutex<State>,
    /// The access URL, without a trailing slash.
    access_url: String,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The fake server. Dropping it stops it.
pub struct FakeCoderd {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Mutex<Option<JoinHandle<()>>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// A TCP listener that completes the TLS handshake before handing a connection to axum
/// (also serves the git server's HTTPS mode).
pub(crate) struct TlsListener {
    pub(crate) tcp: TcpListener,
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
}

/// A TLS acceptor for this certificate chain and private key (PEM), with ring.
pub(crate) fn tls_acceptor(cert_chain_pem: &[u8], key_pem: &[u8]) -> tokio_rustls::TlsAcceptor {
    use tokio_rustls::rustls::{self, pki_types::pem::PemObject};
    let certs: Vec<rustls::pki_types::CertificateDer<'static>> =
        rustls::pki_types::CertificateDer::pem_slice_iter(cert_chain_pem)
            .collect::<Result<_, _>>()
            .expect("certificate chain PEM");
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem).expect("key PEM");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server certificate");
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            // A client that refuses the certificate fails here; the next one is served.
            let hs = self.acceptor.accept(tcp);
            if let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(5), hs).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

impl Drop for FakeCoderd {
    fn drop(&mut self) {
        if let Some(h) = self.server.lock().unwrap_or_else(|e| e.into_inner()).take() {
            h.abort();
        }
    }
}

impl FakeCoderd {
    /// Start serving on a fresh port, with one agent token and a `github` provider whose
    /// account is not linked.
    pub async fn start() -> FakeCoderd {
        let fake = FakeCoderd::start_down().await;
        fake.set_down(false).await;
        fake
    }

    /// Reserve a port but do not listen on it yet (connections are refused until
    /// `set_down(false)`).
    pub async fn start_down() -> FakeCoderd {
        FakeCoderd::reserve(None).await
    }

    /// Serve HTTPS with this certificate chain and private key (PEM); the URL names the
    /// host `localhost`, so the certificate must be valid for it.
    pub async fn start_tls(cert_chain_pem: &[u8], key_pem: &[u8]) -> FakeCoderd {
        let acceptor = tls_acceptor(cert_chain_pem, key_pem);
        let fake = FakeCoderd::reserve(Some(acceptor)).await;
        fake.set_down(false).await;
        fake
    }

    async fn reserve(tls: Option<tokio_rustls::TlsAcceptor>) -> FakeCoderd {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake coderd");
        let addr = listener.local_addr().expect("local addr");
        drop(listener);
        let state = State {
            agent_tokens: [Uuid::new_v4().to_string()].into(),
            agent_id: Uuid::new_v4(),
            providers: vec![Provider {
                id: "github".into(),
                kind: "github".into(),
                matches: "github.com".into(),
                token: None,
            }],
            app_slugs: ["workspace".to_string(), "code-server".to_string()].into(),
            max_body: Some(MAX_BODY_BYTES),
            ..State::default()
        };
        let access_url = match tls {
            Some(_) => format!("https://localhost:{}", addr.port()),
            None => format!("http://{addr}"),
        };
        FakeCoderd {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                access_url,
            }),
            addr,
            server: Mutex::new(None),
            tls,
        }
    }

    /// The access URL as the init script gives it (`CODER_AGENT_URL`): with a trailing `/`.
    pub fn url(&self) -> String {
        format!("{}/", self.shared.access_url)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// An agent token the fake accepts.
    pub fn token(&self) -> String {
        self.shared
            .lock()
            .agent_tokens
            .iter()
            .next()
            .cloned()
            .unwrap_or_default()
    }

    /// The agent's id (the `workspace_agent_id` of log sources).
    pub fn agent_id(&self) -> Uuid {
        self.shared.lock().agent_id
    }

    /// Stop listening (new connections are refused) or listen again on the same port.
    pub async fn set_down(&self, down: bool) {
        let mut server = self.server.lock().unwrap_or_else(|e| e.into_inner());
        if down {
            if let Some(h) = server.take() {
                h.abort();
            }
            return;
        }
        if server.is_some() {
            return;
        }
        // The old listener is gone; rebinding the same port works (SO_REUSEADDR).
        let mut tries = 0;
        let listener = loop {
            match std::net::TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(_) if tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("rebind fake coderd on {}: {e}", self.addr),
            }
        };
        listener.set_nonblocking(true).expect("nonblocking");
        let listener = TcpListener::from_std(listener).expect("tokio listener");
        let shared = self.shared.clone();
        // coderd's own body cap is modelled in `answer` (413 "Request body too large.").
        let app = axum::Router::new()
            .fallback(move |method, uri, headers, body| {
                handle(shared.clone(), method, uri, headers, body)
            })
            .layer(axum::extract::DefaultBodyLimit::disable());
        *server = Some(match self.tls.clone() {
            None => tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            }),
            Some(acceptor) => tokio::spawn(async move {
                let _ = axum::serve(
                    TlsListener {
                        tcp: listener,
                        acceptor,
                    },
                    app,
                )
                .await;
            }),
        });
    }

    /// Delay every answer by this much (zero: none).
    pub fn set_delay(&self, delay: Duration) {
        self.shared.lock().delay = delay;
    }

    /// Answer every request with this fault (after auth and recording), or normally.
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.shared.lock().fault = fault;
    }

    /// Answer `PATCH /me/app-status` with 404 "Route not found", like a coderd without it.
    pub fn set_app_status_404(&self, on: bool) {
        self.shared.lock().app_status_404 = on;
    }

    /// Answer `POST /me/log-source` with 404 "Route not found", like coderd before v2.13.
    pub fn set_log_source_404(&self, on: bool) {
        self.shared.lock().log_source_404 = on;
    }

    /// Refuse every agent token from now on (401 "Workspace agent not authorized."), as
    /// coderd does during a stop build before v2.30 and during every delete build.
    pub fn revoke_agent_tokens(&self) {
        self.shared.lock().tokens_revoked = true;
    }

    /// Cap request bodies at this many bytes (413 "Request body too large."); `None`
    /// removes the cap (Coder before 2.37). The default is [`MAX_BODY_BYTES`].
    pub fn set_max_body(&self, bytes: Option<usize>) {
        self.shared.lock().max_body = bytes;
    }

    /// The app slugs the agent has (default `workspace`, `code-server`).
    pub fn set_app_slugs(&self, slugs: &[&str]) {
        self.shared.lock().app_slugs = slugs.iter().map(|s| s.to_string()).collect();
    }

    /// The `expires_at` answered with a provider's token (RFC 3339); `None`: the zero
    /// time (no expiry).
    pub fn set_external_token_expiry(&self, provider_id: &str, expires_at: Option<&str>) {
        let mut s = self.shared.lock();
        match expires_at {
            Some(t) => s.expires_at.insert(provider_id.into(), t.into()),
            None => s.expires_at.remove(provider_id),
        };
    }

    /// Accept another agent token.
    pub fn add_agent_token(&self, token: &str) {
        self.shared.lock().agent_tokens.insert(token.into());
    }

    /// Add (or replace) an external-auth provider.
    pub fn add_provider(&self, provider: Provider) {
        let mut s = self.shared.lock();
        s.providers.retain(|p| p.id != provider.id);
        s.providers.push(provider);
    }

    /// Link (or rotate) the user's token of a provider; `None` unlinks it.
    pub fn set_external_token(&self, provider_id: &str, token: Option<&str>) {
        let mut s = self.shared.lock();
        match s.providers.iter_mut().find(|p| p.id == provider_id) {
            Some(p) => p.token = token.map(String::from),
            None => panic!("fake coderd has no provider {provider_id}"),
        }
    }

    /// Pretend other sources already used this many bytes of the agent's log limit.
    pub fn set_logs_length(&self, bytes: usize) {
        self.shared.lock().logs_length = bytes;
    }

    /// Requests received and not answered yet (held by a delay or a `listen`).
    pub fn in_flight(&self) -> usize {
        self.shared.lock().in_flight
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    /// Recorded requests whose path ends with `suffix` (e.g. `/me/logs`).
    pub fn requests_to(&self, suffix: &str) -> Vec<Recorded> {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.path.ends_with(suffix))
            .cloned()
            .collect()
    }

    pub fn logs(&self) -> Vec<StoredLog> {
        self.shared.lock().logs.clone()
    }

    pub fn log_sources(&self) -> Vec<WorkspaceAgentLogSource> {
        self.shared.lock().log_sources.values().cloned().collect()
    }

    /// The sum of the output bytes received (before the 1024-character cut), as the DB
    /// constraint counts them.
    pub fn logs_length(&self) -> usize {
        self.shared.lock().logs_length
    }

    pub fn logs_overflowed(&self) -> bool {
        self.shared.lock().logs_overflowed
    }

    pub fn app_statuses(&self) -> Vec<PatchAppStatus> {
        self.shared.lock().app_statuses.clone()
    }

    /// Poll `cond` every 10 ms until it holds; false when `timeout` passes first.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut cond: impl FnMut(&FakeCoderd) -> bool,
    ) -> bool {
        let end = tokio::time::Instant::now() + timeout;
        loop {
            if cond(self) {
                return true;
            }
            if tokio::time::Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Counts a request as in flight until its handler ends (answered or dropped).
struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.lock().in_flight -= 1;
    }
}

type Answer = (StatusCode, Vec<(&'static str, String)>, Vec<u8>);

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Answer {
    (
        status,
        vec![("content-type", "application/json".into())],
        serde_json::to_vec(body).unwrap_or_default(),
    )
}

fn error(status: StatusCode, message: &str, detail: &str) -> Answer {
    json(status, &Response::new(message, detail))
}

async fn handle(
    shared: Arc<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let mut recorded = Recorded {
        method: method.to_string(),
        path: uri.path().to_string(),
        query: uri.query().unwrap_or("").to_string(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
            .collect(),
        body: body.to_vec(),
        status: 0,
    };
    let delay = {
        let mut s = shared.lock();
        s.in_flight += 1;
        s.delay
    };
    let _in_flight = InFlight(shared.clone());
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    listen(&shared, &recorded).await;
    let (status, hdrs, bytes) = answer(&shared, &recorded, &headers);
    recorded.status = status.as_u16();
    shared.lock().requests.push(recorded);
    let mut resp = (status, bytes).into_response();
    for (k, v) in hdrs {
        if let Ok(v) = header::HeaderValue::from_str(&v) {
            resp.headers_mut().insert(k, v);
        }
    }
    resp.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    resp
}

/// `GET /me/external-auth?...&listen`: hold the request until the provider's token
/// changes to a new, valid one (coderd polls once a second; the fake every 20 ms). Auth
/// and validation happen afterwards, in [`answer`], on the state at that moment.
async fn listen(shared: &Shared, rec: &Recorded) {
    let is_auth = rec.path.ends_with("/me/external-auth") || rec.path.ends_with("/me/gitauth");
    let q = rec.query_pairs();
    if rec.method != "GET" || !is_auth || !q.iter().any(|(k, _)| k == "listen") {
        return;
    }
    let id = q
        .iter()
        .find(|(k, _)| k == "id")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let token_of = |s: &State| {
        s.providers
            .iter()
            .find(|p| p.id == id)
            .and_then(|p| p.token.clone())
    };
    let before = token_of(&shared.lock());
    loop {
        let now = token_of(&shared.lock());
        if now.is_some() && now != before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The token as `httpmw.APITokenFromRequest` finds it: cookie, query, then header.
fn token_of(rec: &Recorded, headers: &HeaderMap) -> Option<String> {
    for c in headers.get_all(header::COOKIE) {
        let c = String::from_utf8_lossy(c.as_bytes());
        for part in c.split(';') {
            if let Some((k, v)) = part.trim().split_once('=')
                && k == coder::SESSION_TOKEN_COOKIE
                && !v.is_empty()
            {
                return Some(v.to_string());
            }
        }
    }
    if let Some((_, v)) = rec
        .query_pairs()
        .into_iter()
        .find(|(k, v)| k == coder::SESSION_TOKEN_COOKIE && !v.is_empty())
    {
        return Some(v);
    }
    headers
        .get(coder::SESSION_TOKEN_HEADER)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .filter(|v| !v.is_empty())
}

fn answer(shared: &Shared, rec: &Recorded, headers: &HeaderMap) -> Answer {
    let Some(rest) = rec.path.strip_prefix(coder::AGENT_ME) else {
        return error(StatusCode::NOT_FOUND, "Route not found.", "");
    };
    // Authentication (httpmw.ExtractWorkspaceAgentAndLatestBuild).
    let Some(token) = token_of(rec, headers) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "Cookie \"coder_session_token\" must be provided.",
            "",
        );
    };
    if Uuid::parse_str(&token).is_err() {
        return error(
            StatusCode::UNAUTHORIZED,
            "Workspace agent token invalid.",
            "An agent token must be a valid UUIDv4",
        );
    }
    let mut s = shared.lock();
    if s.tokens_revoked || !s.agent_tokens.contains(&token) {
        return error(
            StatusCode::UNAUTHORIZED,
            "Workspace agent not authorized.",
            "The agent cannot authenticate until the workspace provision job has been completed. If the job is no longer running, this agent is invalid.",
        );
    }
    if let Some(max) = s.max_body
        && rec.body.len() > max
    {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large.", "");
    }
    if let Some(fault) = s.fault.clone() {
        return match fault {
            Fault::Html502 => (
                StatusCode::BAD_GATEWAY,
                vec![("content-type", "text/html".into())],
                b"<html><body><h1>502 Bad Gateway</h1></body></html>".to_vec(),
            ),
            Fault::MalformedJson => (
                StatusCode::OK,
                vec![("content-type", "application/json".into())],
                b"{\"access_token\": \"unterminated".to_vec(),
            ),
            Fault::RateLimited(secs) => {
                let (status, mut hdrs, body) = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "You've been rate limited.",
                    "",
                );
                hdrs.push(("retry-after", secs.to_string()));
                (status, hdrs, body)
            }
            Fault::Status(code) => error(
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                "Injected fault.",
                "",
            ),
        };
    }
    match (rec.method.as_str(), rest) {
        ("POST", "/log-source") if !s.log_source_404 => post_log_source(&mut s, &rec.body),
        ("PATCH", "/logs") => patch_logs(&mut s, &rec.body),
        ("GET", "/external-auth") | ("GET", "/gitauth") => {
            external_auth(&s, &shared.access_url, rec)
        }
        ("PATCH", "/app-status") if !s.app_status_404 => patch_app_status(&mut s, &rec.body),
        _ => error(StatusCode::NOT_FOUND, "Route not found.", ""),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Answer> {
    serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "Request body must be valid JSON.",
            &e.to_string(),
        )
    })
}

fn post_log_source(s: &mut State, body: &[u8]) -> Answer {
    let req: PostLogSourceRequest = match read_json(body) {
        Ok(r) => r,
        Err(a) => return a,
    };
    let source = WorkspaceAgentLogSource {
        workspace_agent_id: s.agent_id,
        id: req.id,
        created_at: now(),
        display_name: req.display_name,
        icon: req.icon,
    };
    // A duplicate id also answers 201, echoing the request.
    s.log_sources
        .entry(req.id)
        .or_insert_with(|| source.clone());
    json(StatusCode::CREATED, &source)
}

fn patch_logs(s: &mut State, body: &[u8]) -> Answer {
    let req: PatchLogs = match read_json(body) {
        Ok(r) => r,
        Err(a) => return a,
    };
    if req.logs.is_empty() {
        return error(StatusCode::BAD_REQUEST, "No logs provided.", "");
    }
    let mut levels = Vec::with_capacity(req.logs.len());
    for l in &req.logs {
        let level = if l.level.is_empty() {
            "info"
        } else {
            l.level.as_str()
        };
        if !coder::LOG_LEVELS.contains(&level) {
            return error(
                StatusCode::BAD_REQUEST,
                "Invalid log level provided.",
                &format!("invalid log level: {:?}", l.level),
            );
        }
        levels.push(level.to_string());
    }
    let added: usize = req.logs.iter().map(|l| l.output.len()).sum();
    if s.logs_overflowed || s.logs_length + added > coder::MAX_LOGS_LENGTH {
        s.logs_overflowed = true;
        return error(StatusCode::PAYLOAD_TOO_LARGE, "Logs limit exceeded", "");
    }
    let source = if req.log_source_id.is_nil() {
        let id = coder::EXTERNAL_LOG_SOURCE_ID;
        let agent = s.agent_id;
        s.log_sources
            .entry(id)
            .or_insert_with(|| WorkspaceAgentLogSource {
                workspace_agent_id: agent,
                id,
                created_at: now(),
                display_name: "External".into(),
                icon: "/emojis/1f310.png".into(),
            });
        id
    } else {
        req.log_source_id
    };
    let at = now();
    s.logs_length += added;
    for (l, level) in req.logs.into_iter().zip(levels) {
        s.logs.push(StoredLog {
            log_source_id: source,
            output: l.output.chars().take(STORED_LINE_CHARS).collect(),
            level,
            created_at: at.clone(),
        });
    }
    (
        StatusCode::OK,
        vec![("content-type", "application/json".into())],
        b"null".to_vec(),
    )
}

fn external_auth(s: &State, access_url: &str, rec: &Recorded) -> Answer {
    let q = rec.query_pairs();
    let get = |k: &str| {
        q.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let id = get("id");
    let mut matcher = get("match");
    if matcher.is_empty() {
        matcher = get("url");
    }
    if id.is_empty() && matcher.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "'url' or 'id' must be provided!",
            "",
        );
    }
    if !id.is_empty() && !matcher.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "'url' and 'id' cannot be provided together!",
            "",
        );
    }
    let provider = if !id.is_empty() {
        s.providers.iter().find(|p| p.id == id)
    } else {
        s.providers
            .iter()
            .rfind(|p| !p.matches.is_empty() && matcher.contains(&p.matches))
    };
    let Some(p) = provider else {
        let what = if id.is_empty() { &matcher } else { &id };
        let regexes: Vec<_> = s.providers.iter().map(|p| p.matches.clone()).collect();
        return error(
            StatusCode::NOT_FOUND,
            &format!("No matching external auth provider found in Coder for the url {what:?}."),
            &format!("External auth provider regexes: {}", regexes.join(", ")),
        );
    };
    let resp = match &p.token {
        None => ExternalAuthResponse {
            url: format!("{access_url}/external-auth/{}", p.id),
            ..Default::default()
        },
        Some(t) => {
            let (username, password) = match p.kind.as_str() {
                "gitlab" => ("oauth2".to_string(), t.clone()),
                "bitbucket-cloud" | "bitbucket-server" | "bitbucket" => {
                    ("x-token-auth".to_string(), t.clone())
                }
                _ => (t.clone(), String::new()),
            };
            ExternalAuthResponse {
                access_token: t.clone(),
                token_extra: None,
                url: String::new(),
                kind: p.kind.clone(),
                username,
                password,
                expires_at: Some(
                    s.expires_at
                        .get(&p.id)
                        .cloned()
                        .unwrap_or_else(|| ZERO_TIME.into()),
                ),
            }
        }
    };
    json(StatusCode::OK, &resp)
}

fn patch_app_status(s: &mut State, body: &[u8]) -> Answer {
    let req: PatchAppStatus = match read_json(body) {
        Ok(r) => r,
        Err(a) => return a,
    };
    if !coder::APP_STATES.contains(&req.state.to_ascii_lowercase().as_str()) {
        return error(
            StatusCode::BAD_REQUEST,
            "Invalid state provided.",
            "State must be one of: complete, failure, working, idle.",
        );
    }
    if req.message.len() > MAX_APP_STATUS_MESSAGE {
        return error(
            StatusCode::BAD_REQUEST,
            "Message is too long.",
            &format!("Message must be at most {MAX_APP_STATUS_MESSAGE} bytes."),
        );
    }
    if !s.app_slugs.contains(&req.app_slug) {
        return error(
            StatusCode::BAD_REQUEST,
            "Failed to get workspace app.",
            &format!("No app found with slug {:?}", req.app_slug),
        );
    }
    s.app_statuses.push(req);
    json(StatusCode::OK, &Response::new("App status updated.", ""))
}

fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
