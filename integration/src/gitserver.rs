//! A real smart-HTTP git server for tests and benchmarks: git's own
//! `git-http-backend` run as CGI behind a small HTTP/1.1 server on 127.0.0.1.
//!
//! Fetches are anonymous (unless [`GitServer::set_auth_for_fetch`]); pushes need HTTP
//! Basic auth whose password is the server's token (any user name), otherwise the answer
//! is `401` with `WWW-Authenticate: Basic`. Switches make it misbehave on purpose:
//! [`GitServer::set_latency`] delays every request, [`GitServer::set_reject`] makes every
//! push fail in a `pre-receive` hook, [`GitServer::set_drop_push_after`] drops a push's
//! connection after reading part of its pack, [`GitServer::set_moved`] redirects a renamed
//! repository. Every request is logged ([`GitServer::requests`]).
//! The server runs on its own thread and runtime, so it serves sync and async tests alike
//! and keeps serving while the test's runtime is busy; dropping it stops it.
//!
//! ```no_run
//! use integration::gitserver::GitServer;
//! let root = tempfile::tempdir().unwrap();
//! let server = GitServer::start(root.path(), "the-token").unwrap();
//! server.create_bare("alice/app.git").unwrap();
//! let url = server.url("alice/app.git"); // http://127.0.0.1:PORT/alice/app.git
//! server.set_latency(std::time::Duration::from_millis(200)); // every request
//! server.set_reject(true); // pre-receive says no
//! assert!(server.requests().iter().all(|r| r.status != 500));
//! # let _ = url;
//! ```
//!
//! Switch semantics: latency is added before each request is answered (a 401 too);
//! trickle paces the body of every answer byte by byte; reject is read when a push
//! reaches the hook. Needs `git` (with `git-http-backend`) on PATH.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// One request the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    pub method: String,
    /// Path without the query, e.g. `/alice/proj.git/info/refs`.
    pub path: String,
    pub query: String,
    /// The Basic-auth user name, when the request carried the right token.
    pub user: Option<String>,
    /// True when the request carried an `Authorization` header (right or wrong).
    pub sent_credentials: bool,
    /// True for the receive-pack (push) service.
    pub push: bool,
    pub status: u16,
    /// Every request header but `Authorization`, names lowercase, in order.
    pub headers: Vec<(String, String)>,
}

struct Shared {
    root: PathBuf,
    backend: PathBuf,
    token: String,
    latency_ms: AtomicU64,
    trickle_ms: AtomicU64,
    reject: AtomicBool,
    /// Bytes of a push's request body read before the connection is dropped; 0: off.
    drop_push_after: AtomicU64,
    auth_fetch: AtomicBool,
    /// Moved repositories: old path prefix (`/old.git`) -> new one.
    moved: Mutex<BTreeMap<String, String>>,
    log: Mutex<Vec<LoggedRequest>>,
}

/// A running server; stops when dropped.
pub struct GitServer {
    addr: SocketAddr,
    scheme: &'static str,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GitServer {
    /// Serve the repositories under `root` (created if missing); pushes need `token`.
    pub fn start(root: impl Into<PathBuf>, token: &str) -> io::Result<GitServer> {
        GitServer::start_with(root.into(), token, None)
    }

    /// Like [`GitServer::start`], over HTTPS with this certificate chain and key (PEM;
    /// e.g. from [`crate::pki::private_ca`], valid for `127.0.0.1`).
    pub fn start_tls(
        root: impl Into<PathBuf>,
        token: &str,
        cert_chain_pem: &[u8],
        key_pem: &[u8],
    ) -> io::Result<GitServer> {
        let acceptor = crate::fake_coderd::tls_acceptor(cert_chain_pem, key_pem);
        GitServer::start_with(root.into(), token, Some(acceptor))
    }

    fn start_with(
        root: PathBuf,
        token: &str,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> io::Result<GitServer> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        std::fs::create_dir_all(&root)?;
        let exec = std::process::Command::new("git")
            .arg("--exec-path")
            .output()?;
        if !exec.status.success() {
            return Err(io::Error::other("`git --exec-path` failed"));
        }
        let backend =
            PathBuf::from(String::from_utf8_lossy(&exec.stdout).trim()).join("git-http-backend");
        if !backend.exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no git-http-backend at {}", backend.display()),
            ));
        }
        let shared = Arc::new(Shared {
            root,
            backend,
            token: token.to_string(),
            latency_ms: AtomicU64::new(0),
            trickle_ms: AtomicU64::new(0),
            reject: AtomicBool::new(false),
            drop_push_after: AtomicU64::new(0),
            auth_fetch: AtomicBool::new(false),
            moved: Mutex::new(BTreeMap::new()),
            log: Mutex::new(Vec::new()),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let state = shared.clone();
        let thread = std::thread::Builder::new()
            .name("gitserver".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("gitserver runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("gitserver listener");
                    let app = axum::Router::new().fallback(handle).with_state(state);
                    let serve = async move {
                        match tls {
                            Some(acceptor) => {
                                let l = crate::fake_coderd::TlsListener {
                                    tcp: listener,
                                    acceptor,
                                };
                                axum::serve(l, app).await
                            }
                            None => axum::serve(listener, app).await,
                        }
                    };
                    tokio::select! {
                        r = serve => {
                            if let Err(e) = r { eprintln!("gitserver: {e}"); }
                        }
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime cancels requests still in flight (e.g. sleeping
                // out the latency), so a stop never waits for them.
                rt.shutdown_timeout(Duration::from_millis(200));
            })?;
        Ok(GitServer {
            addr,
            scheme,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The directory the repositories live in.
    pub fn root(&self) -> &Path {
        &self.shared.root
    }

    /// The token pushes must present.
    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// The URL of the repository at `name` (relative to the root), e.g. `alice/proj.git`.
    pub fn url(&self, name: &str) -> String {
        format!(
            "{}://{}/{}",
            self.scheme,
            self.addr,
            name.trim_start_matches('/')
        )
    }

    /// The path of the repository `name` on disk.
    pub fn path(&self, name: &str) -> PathBuf {
        self.shared.root.join(name.trim_start_matches('/'))
    }

    /// Create an empty bare repository `name` (e.g. `alice/proj.git`) that accepts
    /// pushes, with the `pre-receive` hook [`GitServer::set_reject`] drives.
    pub fn create_bare(&self, name: &str) -> io::Result<PathBuf> {
        let path = self.path(name);
        std::fs::create_dir_all(&path)?;
        let st = std::process::Command::new("git")
            .args(["init", "--quiet", "--bare", "--initial-branch=main"])
            .arg(&path)
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            return Err(io::Error::other(format!(
                "git init --bare {} failed",
                path.display()
            )));
        }
        let st = std::process::Command::new("git")
            .arg("-C")
            .arg(&path)
            .args(["config", "http.receivepack", "true"])
            .status()?;
        if !st.success() {
            return Err(io::Error::other("git config http.receivepack failed"));
        }
        let hook = path.join("hooks/pre-receive");
        std::fs::write(
            &hook,
            "#!/bin/sh\nif [ \"$GITSERVER_REJECT\" = 1 ]; then\n  echo 'push rejected by the test server' >&2\n  exit 1\nfi\nexit 0\n",
        )?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))?;
        Ok(path)
    }

    /// The commit a ref of repository `name` points at (`None` when absent).
    pub fn ref_target(&self, name: &str, refname: &str) -> Option<String> {
        let repo = git2::Repository::open_bare(self.path(name)).ok()?;
        let r = repo.find_reference(refname).ok()?;
        r.resolve().ok()?.target().map(|o| o.to_string())
    }

    /// Delay every request by `d` before answering it.
    pub fn set_latency(&self, d: Duration) {
        self.shared
            .latency_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Send response bodies one byte at a time, pausing `d` between bytes (zero: off).
    /// A client reading such an answer never hits a socket timeout yet never finishes.
    pub fn set_trickle(&self, d: Duration) {
        self.shared
            .trickle_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Make every push fail in the `pre-receive` hook (repos from [`Self::create_bare`]).
    pub fn set_reject(&self, reject: bool) {
        self.shared.reject.store(reject, Ordering::SeqCst);
    }

    /// Drop every push's connection after reading `bytes` of its pack (the request body),
    /// before answering anything but the status line: a reset in the middle of the upload.
    /// `None` turns it off.
    pub fn set_drop_push_after(&self, bytes: Option<u64>) {
        self.shared
            .drop_push_after
            .store(bytes.map_or(0, |b| b.max(1)), Ordering::SeqCst);
    }

    /// Require the token for fetches and clones too.
    pub fn set_auth_for_fetch(&self, on: bool) {
        self.shared.auth_fetch.store(on, Ordering::SeqCst);
    }

    /// The repository `from` (e.g. `old.git`) now lives at `to`: a `GET` under `from`
    /// is answered `301 Moved Permanently` to the same place under `to` (what GitHub does
    /// for a renamed repository); any other method there gets `404`, so a client must
    /// send its pack where the ref advertisement landed.
    pub fn set_moved(&self, from: &str, to: &str) {
        self.shared
            .moved
            .lock()
            .unwrap()
            .insert(format!("/{from}"), format!("/{to}"));
    }

    /// How many pushes the server accepted (receive-pack POSTs answered 200).
    pub fn pushes(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.push && r.method == "POST" && r.status == 200)
            .count()
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.shared.log.lock().unwrap().clone()
    }

    /// Forget the request log.
    pub fn clear_requests(&self) {
        self.shared.log.lock().unwrap().clear();
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn handle(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    let latency = sh.latency_ms.load(Ordering::SeqCst);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let push = query.contains("service=git-receive-pack") || path.ends_with("/git-receive-pack");
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let user = auth.as_deref().and_then(|a| basic_user(a, &sh.token));
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .filter(|(k, _)| *k != header::AUTHORIZATION)
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let log = |status: u16| LoggedRequest {
        method: method.clone(),
        path: path.clone(),
        query: query.clone(),
        user: user.clone(),
        sent_credentials: auth.is_some(),
        push,
        status,
        headers: headers.clone(),
    };
    let moved_to = sh.moved.lock().unwrap().iter().find_map(|(from, to)| {
        path.strip_prefix(from.as_str())
            .filter(|rest| rest.starts_with('/'))
            .map(|rest| format!("{to}{rest}"))
    });
    if let Some(new_path) = moved_to {
        let status = if req.method() == axum::http::Method::GET {
            StatusCode::MOVED_PERMANENTLY
        } else {
            StatusCode::NOT_FOUND
        };
        sh.log.lock().unwrap().push(log(status.as_u16()));
        let location = if query.is_empty() {
            new_path
        } else {
            format!("{new_path}?{query}")
        };
        return Response::builder()
            .status(status)
            .header(header::LOCATION, location)
            .body(Body::from("moved\n"))
            .unwrap();
    }
    let needs_auth = push || sh.auth_fetch.load(Ordering::SeqCst);
    if needs_auth && user.is_none() {
        sh.log.lock().unwrap().push(log(401));
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header(header::WWW_AUTHENTICATE, "Basic realm=\"gitserver\"")
            .body(Body::from("authentication required\n"))
            .unwrap();
    }
    let drop_after = sh.drop_push_after.load(Ordering::SeqCst);
    if push && drop_after > 0 && req.method() == axum::http::Method::POST {
        let mut body = req.into_body().into_data_stream();
        let mut seen = 0u64;
        while seen < drop_after {
            match body.next().await {
                Some(Ok(chunk)) => seen += chunk.len() as u64,
                _ => break,
            }
        }
        sh.log.lock().unwrap().push(log(200));
        // A body that fails at once: hyper aborts the connection after the head.
        let cut = futures::stream::once(async {
            Err::<Bytes, io::Error>(io::Error::other("connection dropped by the test server"))
        });
        return Response::builder()
            .status(StatusCode::OK)
            .header(
                header::CONTENT_TYPE,
                "application/x-git-receive-pack-result",
            )
            .body(Body::from_stream(cut))
            .unwrap();
    }
    let resp = match cgi(&sh, req, &path, &query, user.as_deref()).await {
        Ok(r) => r,
        Err(e) => Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(Body::from(format!("gitserver: {e}\n")))
            .unwrap(),
    };
    sh.log.lock().unwrap().push(log(resp.status().as_u16()));
    resp
}

/// The user name of a `Basic` header whose password is `token`.
fn basic_user(header: &str, token: &str) -> Option<String> {
    let enc = header.strip_prefix("Basic ")?.trim();
    let dec = base64_decode(enc)?;
    let text = String::from_utf8(dec).ok()?;
    let (user, pass) = text.split_once(':')?;
    (pass == token).then(|| user.to_string())
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        let n = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => return None,
        };
        for i in 0..n {
            out.push((acc >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

/// Run `git-http-backend` for one request, streaming the body in and the answer out.
async fn cgi(
    sh: &Shared,
    req: Request,
    path: &str,
    query: &str,
    user: Option<&str>,
) -> io::Result<Response> {
    let headers = req.headers().clone();
    let hv = |h: &HeaderMap, n: header::HeaderName| {
        h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string)
    };
    let mut cmd = tokio::process::Command::new(&sh.backend);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &sh.root)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_PROJECT_ROOT", &sh.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("REQUEST_METHOD", req.method().as_str())
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env(
            "GITSERVER_REJECT",
            if sh.reject.load(Ordering::SeqCst) {
                "1"
            } else {
                "0"
            },
        );
    if let Some(u) = user {
        cmd.env("REMOTE_USER", u);
    }
    if let Some(v) = hv(&headers, header::CONTENT_TYPE) {
        cmd.env("CONTENT_TYPE", v);
    }
    if let Some(v) = hv(&headers, header::CONTENT_LENGTH) {
        cmd.env("CONTENT_LENGTH", v);
    }
    if let Some(v) = hv(&headers, header::CONTENT_ENCODING) {
        cmd.env("HTTP_CONTENT_ENCODING", v);
    }
    if let Some(v) = headers.get("git-protocol").and_then(|v| v.to_str().ok()) {
        cmd.env("HTTP_GIT_PROTOCOL", v);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");

    // Body in and stderr out run beside the reading of stdout, so a backend that
    // answers before it has read everything cannot deadlock us.
    let mut body = req.into_body().into_data_stream();
    tokio::spawn(async move {
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            if stdin.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = stdin.shutdown().await;
    });
    tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf).await;
        if !buf.is_empty() {
            eprintln!(
                "gitserver backend: {}",
                String::from_utf8_lossy(&buf).trim_end()
            );
        }
    });

    let mut out = BufReader::new(stdout);
    let mut status = StatusCode::OK;
    let mut resp_headers: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).await? == 0 {
            return Err(io::Error::other(
                "git-http-backend ended before its headers",
            ));
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        let Some((k, v)) = line.split_once(':') else {
            return Err(io::Error::other(format!("bad CGI header line {line:?}")));
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("status") {
            let code = v.split_whitespace().next().unwrap_or("500");
            status = code
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        } else {
            resp_headers.insert(k.to_string(), v.to_string());
        }
    }
    // The child is kept alive by the stream (kill_on_drop) until the body is read.
    let stream = futures::stream::unfold(Some((out, child)), |st| async move {
        let (mut out, child) = st?;
        let mut buf = vec![0u8; 64 * 1024];
        match out.read(&mut buf).await {
            Ok(0) => {
                let mut child = child;
                let _ = child.wait().await;
                None
            }
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<Bytes, io::Error>(Bytes::from(buf)), Some((out, child))))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    let mut resp = Response::builder().status(status);
    for (k, v) in &resp_headers {
        if let Ok(v) = HeaderValue::from_str(v) {
            resp = resp.header(k.as_str(), v);
        }
    }
    let trickle = sh.trickle_ms.load(Ordering::SeqCst);
    let body = if trickle == 0 {
        Body::from_stream(stream)
    } else {
        let pause = Duration::from_millis(trickle);
        Body::from_stream(
            stream
                .flat_map(|chunk| {
                    let items: Vec<io::Result<Bytes>> = match chunk {
                        Ok(b) => (0..b.len()).map(|i| Ok(b.slice(i..i + 1))).collect(),
                        Err(e) => vec![Err(e)],
                    };
                    futures::stream::iter(items)
                })
                .then(move |item| async move {
                    tokio::time::sleep(pause).await;
                    item
                }),
        )
    };
    resp.body(body).map_err(|e| io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_accepts_only_the_token() {
        // "u:tok" and "u:bad"
        assert_eq!(basic_user("Basic dTp0b2s=", "tok"), Some("u".into()));
        assert_eq!(basic_user("Basic dTpiYWQ=", "tok"), None);
        assert_eq!(basic_user("Bearer x", "tok"), None);
    }
}
