//! git's smart HTTP protocol for libgit2, over reqwest and rustls.
//!
//! libgit2 keeps the git protocol (ref advertisement, negotiation, packs, report-status)
//! and calls this module for the bytes on the wire, for every `http://` and `https://`
//! remote of the process ([`register`]). Doing HTTP here instead of libgit2's built-in
//! client means:
//!
//! - one TLS stack in the binary (rustls, the one the control plane uses) instead of a
//!   second one (OpenSSL) inside libgit2, with the system's trust store;
//! - the token is sent with the first request (no `401` round trip per push), and
//!   connections are kept alive across the requests of a push and across repositories
//!   on the same host;
//! - the token goes only into an `Authorization` header marked sensitive, never into a
//!   URL, and reqwest drops it on a redirect to another host.
//!
//! Credentials and the deadline of the push running on the current thread come from a
//! [`Scope`] (libgit2 runs a push synchronously on the caller's thread). A request runs
//! on reqwest's blocking client, so this is only ever called from blocking threads, as
//! every libgit2 call of the daemon is.

use std::cell::{Cell, RefCell};
use std::io::{self, Read, Seek, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use git2::Error;
use git2::transport::{Service, SmartSubtransport, SmartSubtransportStream, Transport};

use crate::tokens::Credential;

/// What a request may take at most when no deadline is set (dotfiles have their own).
const NO_DEADLINE_TIMEOUT: Duration = Duration::from_secs(600);
/// A request body (a pack being pushed) is kept in memory up to this size, then in an
/// unnamed temporary file.
const BODY_IN_MEMORY: usize = 8 << 20;
/// What git servers (GitHub among them) expect before they speak the smart protocol.
const USER_AGENT: &str = concat!("git/2.0 (wsagent ", env!("CARGO_PKG_VERSION"), ")");

struct Context {
    creds: Vec<Credential>,
    deadline: Option<Instant>,
    http: HttpConfig,
    /// The credential the next request sends (the index into `creds`).
    next: Cell<usize>,
    auth_failed: Cell<bool>,
    /// What libgit2 is shown of a receive-pack ref advertisement ([`Scope::with_ref_filter`]).
    ref_filter: Option<RefFilter>,
    /// The pack a push sends in place of libgit2's empty one ([`Scope::with_pack`]).
    pack: Option<PackSource>,
}

/// One line of a ref advertisement: an object id (hex) and a ref name (`.have` for an
/// object the server has that no ref names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdvertisedRef {
    pub oid: String,
    pub name: String,
}

/// Given the refs a server advertised for a push, the ones libgit2 should see: libgit2
/// hides every advertised commit it has locally from the pack and walks each one's whole
/// tree, so a push shows it only what the new objects are based on (see
/// `save::push_bases`).
pub type RefFilter = Box<dyn Fn(&[AdvertisedRef]) -> Vec<AdvertisedRef>>;

/// Given the new ids of a push's commands, the pack to send, read into the request as
/// it is made (sent chunked), or `None` to send libgit2's. Asked only when libgit2's
/// pack is empty (the ref filter showed it the pushed tips as objects the server has,
/// so that it would not read and hold every object it sends; see `save::pack`), and
/// again for each retry of the request. The reader is read on the pushing thread.
pub type PackSource = Box<dyn Fn(&[git2::Oid]) -> io::Result<Option<PackBody>>>;

/// A pack made while it is read.
pub type PackBody = Box<dyn Read + Send>;

thread_local! {
    static CONTEXT: RefCell<Option<Context>> = const { RefCell::new(None) };
}

/// Credentials and deadline for the libgit2 network operations made on this thread
/// while the scope lives. The first credential is sent with the first request; after a
/// `401` the next one is tried, and the list running out fails the operation as an
/// authentication failure ([`Scope::auth_failed`]).
pub struct Scope(());

impl Scope {
    pub fn new(creds: &[Credential], deadline: Option<Instant>) -> Scope {
        register();
        CONTEXT.with(|c| {
            *c.borrow_mut() = Some(Context {
                creds: creds.to_vec(),
                deadline,
                http: HttpConfig::default(),
                next: Cell::new(0),
                auth_failed: Cell::new(false),
                ref_filter: None,
                pack: None,
            })
        });
        Scope(())
    }

    /// Use the repository's HTTP settings (its git config's `http.*`) for this scope.
    pub fn with_http(self, http: HttpConfig) -> Scope {
        CONTEXT.with(|c| {
            if let Some(c) = c.borrow_mut().as_mut() {
                c.http = http;
            }
        });
        self
    }

    /// Show libgit2 only `filter`'s choice of the refs a receive-pack advertisement
    /// lists (the capabilities and the server's reply are untouched).
    pub fn with_ref_filter(self, filter: RefFilter) -> Scope {
        CONTEXT.with(|c| {
            if let Some(c) = c.borrow_mut().as_mut() {
                c.ref_filter = Some(filter);
            }
        });
        self
    }

    /// Send `source`'s pack with a push whose own pack libgit2 left empty.
    pub fn with_pack(self, source: PackSource) -> Scope {
        CONTEXT.with(|c| {
            if let Some(c) = c.borrow_mut().as_mut() {
                c.pack = Some(source);
            }
        });
        self
    }

    /// Whether the server refused every credential (or asked for one and none was known).
    pub fn auth_failed(&self) -> bool {
        CONTEXT.with(|c| c.borrow().as_ref().is_some_and(|c| c.auth_failed.get()))
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        CONTEXT.with(|c| *c.borrow_mut() = None);
    }
}

/// Route libgit2's `http://` and `https://` remotes through this module. Idempotent;
/// [`Scope::new`] calls it, and so must any code that clones or fetches over HTTP.
pub fn register() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for scheme in ["http", "https"] {
            // SAFETY: the Once runs this before any transport of ours is created, and
            // libgit2 is initialised by git2 inside `register`.
            let r = unsafe {
                git2::transport::register(scheme, |remote| {
                    Transport::smart(remote, true, HttpTransport::default())
                })
            };
            if let Err(e) = r {
                tracing::error!(scheme, error = %e.message(), "cannot register the git HTTP transport");
            }
        }
    });
}

/// What a repository's git config says about HTTP, as git reads it: `http.<url>.<key>`
/// whose URL is a prefix of the remote's (the longest wins) before `http.<key>`.
/// Honoured: `sslVerify`, `sslCAInfo` (the only CAs trusted, as with git), `proxy` (an
/// empty value: no proxy, not even from the environment) and `extraHeader` (every value,
/// an empty one clears those before it; an `Authorization` among them replaces the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    pub ssl_verify: bool,
    pub ssl_ca_info: Option<std::path::PathBuf>,
    pub proxy: Option<String>,
    pub extra_headers: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            ssl_verify: true,
            ssl_ca_info: None,
            proxy: None,
            extra_headers: Vec::new(),
        }
    }
}

impl HttpConfig {
    /// The settings for `url` (no userinfo) in `config`; `home` expands `~/` in paths.
    pub fn from_git(config: &git2::Config, url: &str, home: &std::path::Path) -> HttpConfig {
        // (specificity, key, value) in the order git reads them.
        let mut found: Vec<(usize, String, String)> = Vec::new();
        if let Ok(mut entries) = config.entries(Some(r"^http\.")) {
            while let Some(Ok(e)) = entries.next() {
                let (Ok(name), Ok(value)) = (e.name(), e.value()) else {
                    continue;
                };
                let rest = &name["http.".len()..];
                let (spec, key) = match rest.rsplit_once('.') {
                    Some((sub, key)) => match url_match(sub, url) {
                        Some(n) => (n, key),
                        None => continue,
                    },
                    None => (0, rest),
                };
                found.push((spec, key.to_ascii_lowercase(), value.to_string()));
            }
        }
        let pick = |key: &str| -> Option<String> {
            let mut best: Option<(usize, &str)> = None;
            for (spec, k, v) in &found {
                if k == key && best.is_none_or(|(b, _)| *spec >= b) {
                    best = Some((*spec, v));
                }
            }
            best.map(|(_, v)| v.to_string())
        };
        let mut out = HttpConfig::default();
        if let Some(v) = pick("sslverify") {
            out.ssl_verify = !matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "false" | "no" | "off" | "0"
            );
        }
        out.ssl_ca_info =
            pick("sslcainfo")
                .filter(|v| !v.is_empty())
                .map(|v| match v.strip_prefix("~/") {
                    Some(rest) => home.join(rest),
                    None => std::path::PathBuf::from(v),
                });
        out.proxy = pick("proxy");
        for (_, k, v) in &found {
            if k == "extraheader" {
                if v.is_empty() {
                    out.extra_headers.clear();
                } else {
                    out.extra_headers.push(v.clone());
                }
            }
        }
        out
    }
}

/// How specific the config URL `pattern` is for `url` (its length), or `None` when it
/// does not apply: `pattern` must be `url` or a prefix of it ending at a path boundary.
fn url_match(pattern: &str, url: &str) -> Option<usize> {
    if !pattern.contains("://") {
        return None;
    }
    let p = pattern.trim_end_matches('/');
    let rest = url.strip_prefix(p)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(p.len() + 1)
}

fn client_builder() -> reqwest::blocking::ClientBuilder {
    crate::tls::install_provider();
    reqwest::blocking::Client::builder()
        .user_agent(USER_AGENT)
        .connect_timeout(Duration::from_secs(30))
        .timeout(None)
}

/// The client of git HTTP requests with default settings: rustls with the system's trust
/// roots, where the platform verifier honours `SSL_CERT_FILE` and `SSL_CERT_DIR` as git
/// does (tested with a private CA).
fn client() -> &'static reqwest::blocking::Client {
    static CLIENT: OnceLock<reqwest::blocking::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        client_builder().build().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "git HTTP client: falling back to the defaults");
            reqwest::blocking::Client::new()
        })
    })
}

/// The client for a repository's HTTP settings: the default one, or one built for
/// those settings (kept for the next push with the same ones). Errors name the setting.
fn client_for(http: &HttpConfig) -> io::Result<reqwest::blocking::Client> {
    type Key = (bool, Option<std::path::PathBuf>, Option<String>);
    static CLIENTS: OnceLock<Mutex<std::collections::HashMap<Key, reqwest::blocking::Client>>> =
        OnceLock::new();
    let key: Key = (
        http.ssl_verify,
        http.ssl_ca_info.clone(),
        http.proxy.clone(),
    );
    if key == (true, None, None) {
        return Ok(client().clone());
    }
    let clients = CLIENTS.get_or_init(Default::default);
    if let Some(c) = clients.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(c.clone());
    }
    let mut b = client_builder();
    if !http.ssl_verify {
        b = b.tls_danger_accept_invalid_certs(true);
    }
    if let Some(path) = &http.ssl_ca_info {
        let pem = std::fs::read(path)
            .map_err(|e| other(format!("http.sslCAInfo {}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            other(format!(
                "http.sslCAInfo {}: not PEM certificates: {e}",
                path.display()
            ))
        })?;
        if certs.is_empty() {
            return Err(other(format!(
                "http.sslCAInfo {}: no certificate in the file",
                path.display()
            )));
        }
        b = b.tls_certs_only(certs);
    }
    match http.proxy.as_deref() {
        Some("") => b = b.no_proxy(),
        Some(p) => {
            let url = if p.contains("://") {
                p.to_string()
            } else {
                format!("http://{p}")
            };
            let proxy = reqwest::Proxy::all(&url)
                .map_err(|e| other(format!("http.proxy: not a proxy URL: {e}")))?;
            b = b.proxy(proxy);
        }
        None => {}
    }
    let c = b
        .build()
        .map_err(|e| other(format!("git HTTP client: {}", describe(&e))))?;
    clients
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, c.clone());
    Ok(c)
}

/// `Name: value` lines as headers, marked sensitive (they often carry credentials).
fn extra_headers(lines: &[String]) -> io::Result<reqwest::header::HeaderMap> {
    let mut map = reqwest::header::HeaderMap::new();
    for line in lines {
        let bad = || other("http.extraHeader: not a `Name: value` header (value not shown)");
        let (name, value) = line.split_once(':').ok_or_else(bad)?;
        let name =
            reqwest::header::HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| bad())?;
        let mut value = reqwest::header::HeaderValue::from_str(value.trim()).map_err(|_| bad())?;
        value.set_sensitive(true);
        map.append(name, value);
    }
    Ok(map)
}

/// One remote's transport: libgit2 asks it for a stream per action.
#[derive(Default)]
struct HttpTransport {
    /// Where the ref advertisement was redirected to: the pack request follows it, as
    /// git does.
    redirected: Redirect,
}

/// Where a ref advertisement landed after redirects: `(asked base, landed base)`.
type Redirect = Arc<Mutex<Option<(String, String)>>>;

impl SmartSubtransport for HttpTransport {
    fn action(
        &self,
        url: &str,
        action: Service,
    ) -> Result<Box<dyn SmartSubtransportStream>, Error> {
        let (service, ls) = match action {
            Service::UploadPackLs => ("upload-pack", true),
            Service::UploadPack => ("upload-pack", false),
            Service::ReceivePackLs => ("receive-pack", true),
            Service::ReceivePack => ("receive-pack", false),
        };
        let mut base = strip_userinfo(url.trim_end_matches('/'));
        if !ls
            && let Some((from, to)) = self
                .redirected
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            && from == base
        {
            base = to;
        }
        Ok(Box::new(Stream {
            service,
            ls,
            base,
            body: Body::default(),
            response: None,
            rewritten: None,
            redirected: ls.then(|| self.redirected.clone()),
        }))
    }

    fn close(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// A request body: what libgit2 wrote before its first read (for a push whose pack the
/// scope makes, the commands, then that pack).
#[derive(Default)]
struct Body {
    memory: Vec<u8>,
    file: Option<std::fs::File>,
    len: u64,
    /// The scope makes the pack after `memory`: the push's new ids, and the first
    /// pack made (a retry asks for another).
    pack: Option<(Vec<git2::Oid>, Option<PackBody>)>,
    /// Bytes of the scope's pack read into requests so far.
    pack_sent: Arc<std::sync::atomic::AtomicU64>,
}

/// The length of an empty version 2 pack: its header and its SHA-1.
const EMPTY_PACK_LEN: usize = 12 + 20;

/// A reader that counts what is read from it.
struct Counted<R> {
    inner: R,
    count: Arc<std::sync::atomic::AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

impl Body {
    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if self.file.is_none() && self.memory.len() + data.len() > BODY_IN_MEMORY {
            let mut f = tempfile::tempfile()?;
            f.write_all(&self.memory)?;
            self.memory = Vec::new();
            self.file = Some(f);
        }
        match &mut self.file {
            Some(f) => f.write_all(data)?,
            None => self.memory.extend_from_slice(data),
        }
        self.len += data.len() as u64;
        Ok(())
    }

    fn request_body(&mut self) -> io::Result<reqwest::blocking::Body> {
        if let Some((news, first)) = self.pack.as_mut() {
            let pack = match first.take() {
                Some(p) => p,
                None => CONTEXT
                    .with(
                        |c| match c.borrow().as_ref().and_then(|c| c.pack.as_ref()) {
                            Some(source) => source(news),
                            None => Ok(None),
                        },
                    )?
                    .ok_or_else(|| other("the push's pack cannot be made again for a retry"))?,
            };
            self.pack_sent
                .store(0, std::sync::atomic::Ordering::Relaxed);
            let head = io::Cursor::new(self.memory.clone());
            return Ok(reqwest::blocking::Body::new(head.chain(Counted {
                inner: pack,
                count: self.pack_sent.clone(),
            })));
        }
        Ok(match &self.file {
            Some(f) => {
                let mut f = f.try_clone()?;
                f.rewind()?;
                reqwest::blocking::Body::sized(f, self.len)
            }
            None => reqwest::blocking::Body::from(self.memory.clone()),
        })
    }

    /// A push body of commands and an empty pack: the commands' new ids and where the
    /// pack starts. `None` for anything else (libgit2's pack is then sent as it is).
    fn empty_push(&self) -> Option<(Vec<git2::Oid>, usize)> {
        if self.file.is_some() {
            return None;
        }
        let data = &self.memory;
        let mut at = 0;
        let mut news = Vec::new();
        loop {
            let len =
                usize::from_str_radix(std::str::from_utf8(data.get(at..at + 4)?).ok()?, 16).ok()?;
            if len == 0 {
                at += 4;
                break;
            }
            let line = data.get(at + 4..at + len)?;
            let text = std::str::from_utf8(line.split(|b| *b == 0).next()?).ok()?;
            let mut words = text.split(' ');
            let (_old, new) = (words.next()?, words.next()?);
            let new = git2::Oid::from_str(new).ok()?;
            if !new.is_zero() {
                news.push(new);
            }
            at += len;
        }
        let pack = &data[at..];
        let empty = pack.len() == EMPTY_PACK_LEN
            && pack.starts_with(b"PACK")
            && pack[4..12] == [0, 0, 0, 2, 0, 0, 0, 0];
        (empty && !news.is_empty()).then_some((news, at))
    }

    /// Replace an empty push pack by the scope's pack (see [`PackSource`]).
    fn use_scope_pack(&mut self) -> io::Result<()> {
        let Some((news, at)) = self.empty_push() else {
            return Ok(());
        };
        let made = CONTEXT.with(
            |c| match c.borrow().as_ref().and_then(|c| c.pack.as_ref()) {
                Some(source) => source(&news),
                None => Ok(None),
            },
        )?;
        if let Some(pack) = made {
            self.memory.truncate(at);
            self.len = at as u64;
            self.pack = Some((news, Some(pack)));
        }
        Ok(())
    }

    /// Bytes sent (or being sent) by the last request.
    fn sent(&self) -> u64 {
        self.len + self.pack_sent.load(std::sync::atomic::Ordering::Relaxed)
    }
}

struct Stream {
    service: &'static str,
    ls: bool,
    base: String,
    body: Body,
    response: Option<reqwest::blocking::Response>,
    /// A receive-pack advertisement rewritten by the scope's ref filter, read from here.
    rewritten: Option<io::Cursor<Vec<u8>>>,
    redirected: Option<Redirect>,
}

fn other(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

impl Stream {
    fn url(&self) -> String {
        if self.ls {
            format!("{}/info/refs?service=git-{}", self.base, self.service)
        } else {
            format!("{}/git-{}", self.base, self.service)
        }
    }

    /// Send the request (retrying with the next credential after a 401) and check the
    /// reply is git's.
    fn send(&mut self) -> io::Result<reqwest::blocking::Response> {
        let url = self.url();
        if !self.ls && self.service == "receive-pack" {
            self.body.use_scope_pack()?;
        }
        loop {
            let (mut cred, timeout, http) = CONTEXT.with(|c| {
                let c = c.borrow();
                let Some(c) = c.as_ref() else {
                    return (None, NO_DEADLINE_TIMEOUT, HttpConfig::default());
                };
                let timeout = match c.deadline {
                    Some(d) => d.saturating_duration_since(Instant::now()),
                    None => NO_DEADLINE_TIMEOUT,
                };
                (c.creds.get(c.next.get()).cloned(), timeout, c.http.clone())
            });
            if timeout.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
            }
            let client = client_for(&http)?;
            let headers = extra_headers(&http.extra_headers)?;
            if headers.contains_key(reqwest::header::AUTHORIZATION) {
                // The repository says how to authenticate.
                cred = None;
            }
            let mut req = if self.ls {
                client.get(&url).header("Accept", "*/*")
            } else {
                client
                    .post(&url)
                    .header(
                        "Content-Type",
                        format!("application/x-git-{}-request", self.service),
                    )
                    .header(
                        "Accept",
                        format!("application/x-git-{}-result", self.service),
                    )
                    .body(self.body.request_body()?)
            };
            req = req.timeout(timeout).headers(headers);
            let sent_cred = cred.is_some();
            if let Some(c) = &cred {
                req = req.basic_auth(&c.username, Some(c.token.expose()));
            }
            let resp = req.send().map_err(|e| other(describe(&e)))?;
            let status = resp.status();
            if status == reqwest::StatusCode::UNAUTHORIZED {
                let more = CONTEXT.with(|c| {
                    let c = c.borrow();
                    let Some(c) = c.as_ref() else { return false };
                    c.next.set(c.next.get() + 1);
                    let more = sent_cred && c.next.get() < c.creds.len();
                    if !more {
                        c.auth_failed.set(true);
                    }
                    more
                });
                if more {
                    continue;
                }
                return Err(other(if sent_cred {
                    "authentication failed: every token for this host was rejected (HTTP 401)"
                } else {
                    "authentication required and no token is known for this host (HTTP 401)"
                }));
            }
            if !status.is_success() {
                let what = match status.as_u16() {
                    403 => " (forbidden: the token may lack the right to push here)",
                    404 => " (repository not found)",
                    _ => "",
                };
                if status == reqwest::StatusCode::FORBIDDEN {
                    CONTEXT.with(|c| {
                        if let Some(c) = c.borrow().as_ref() {
                            c.auth_failed.set(true);
                        }
                    });
                }
                return Err(other(format!(
                    "the git server answered HTTP {status}{what}"
                )));
            }
            let want = if self.ls {
                format!("application/x-git-{}-advertisement", self.service)
            } else {
                format!("application/x-git-{}-result", self.service)
            };
            let got = resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            if got.split(';').next().unwrap_or("").trim() != want {
                return Err(other(format!(
                    "the server does not speak git's smart HTTP protocol (Content-Type {:?}, \
                     expected {want}; dumb HTTP is not supported)",
                    got
                )));
            }
            if !self.ls && self.service == "receive-pack" {
                crate::metrics::pushed_bytes(self.body.sent());
            }
            if let Some(note) = &self.redirected {
                let landed = resp.url().as_str();
                let suffix = format!("/info/refs?service=git-{}", self.service);
                if landed != url
                    && let Some(base) = landed.strip_suffix(&suffix)
                {
                    *note.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((self.base.clone(), base.to_string()));
                }
            }
            return Ok(resp);
        }
    }
}

/// Largest ref advertisement rewritten (a server with millions of refs is passed through).
const ADVERTISEMENT_MAX: u64 = 64 << 20;

/// The advertisement in `resp` as the scope's ref filter wants it, or `None` when there
/// is no filter (or it is too large to hold): the reply is then read as it comes.
fn filter_advertisement(resp: &mut reqwest::blocking::Response) -> io::Result<Option<Vec<u8>>> {
    let has_filter = CONTEXT.with(|c| c.borrow().as_ref().is_some_and(|c| c.ref_filter.is_some()));
    if !has_filter || resp.content_length().is_some_and(|n| n > ADVERTISEMENT_MAX) {
        return Ok(None);
    }
    let mut raw = Vec::new();
    resp.by_ref()
        .take(ADVERTISEMENT_MAX + 1)
        .read_to_end(&mut raw)
        .map_err(|e| other(format!("reading the git server's reply: {e}")))?;
    if raw.len() as u64 > ADVERTISEMENT_MAX {
        return Err(other(
            "the git server's ref advertisement is larger than 64 MiB",
        ));
    }
    let Some(adv) = Advertisement::parse(&raw) else {
        // Not what we know how to read: libgit2 reads it as it is and says what is wrong.
        return Ok(Some(raw));
    };
    let shown = CONTEXT.with(|c| {
        let c = c.borrow();
        match c.as_ref().and_then(|c| c.ref_filter.as_ref()) {
            Some(f) => f(&adv.refs),
            None => adv.refs.clone(),
        }
    });
    Ok(Some(adv.render(&shown)))
}

/// A receive-pack ref advertisement (protocol v0) taken apart: the lines before the refs
/// (`# service=` and its flush), the refs, the capabilities of the first line.
struct Advertisement<'a> {
    head: &'a [u8],
    refs: Vec<AdvertisedRef>,
    caps: String,
}

/// One pkt-line: its payload (`None` for a flush) and the offset just past it.
type PktLine<'a> = (Option<&'a [u8]>, usize);

/// Splits pkt-lines; `None` when `data` is not made of them.
fn pkt_lines(mut data: &[u8]) -> Option<Vec<PktLine<'_>>> {
    let mut out = Vec::new();
    let mut at = 0;
    while !data.is_empty() {
        let len = usize::from_str_radix(std::str::from_utf8(data.get(..4)?).ok()?, 16).ok()?;
        if len == 0 {
            out.push((None, at + 4));
            data = &data[4..];
            at += 4;
            continue;
        }
        if len < 4 || len > data.len() {
            return None;
        }
        out.push((Some(&data[4..len]), at + len));
        data = &data[len..];
        at += len;
    }
    Some(out)
}

impl<'a> Advertisement<'a> {
    fn parse(raw: &'a [u8]) -> Option<Advertisement<'a>> {
        let lines = pkt_lines(raw)?;
        let mut i = 0;
        let mut head_end = 0;
        if let Some((Some(first), _)) = lines.first()
            && first.starts_with(b"# service=")
        {
            // The service line and the flush after it.
            if !matches!(lines.get(1), Some((None, _))) {
                return None;
            }
            head_end = lines[1].1;
            i = 2;
        }
        let mut refs = Vec::new();
        let mut caps = None;
        for (line, _) in &lines[i..] {
            let Some(line) = line else { break };
            let text = std::str::from_utf8(line).ok()?.trim_end_matches('\n');
            let (text, c) = match text.split_once('\0') {
                Some((t, c)) => (t, Some(c)),
                None => (text, None),
            };
            if caps.is_none() {
                caps = Some(c?.to_string());
            }
            let (oid, name) = text.split_once(' ')?;
            if oid.len() != 40 || !oid.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            if name == "capabilities^{}" {
                continue;
            }
            refs.push(AdvertisedRef {
                oid: oid.to_string(),
                name: name.to_string(),
            });
        }
        Some(Advertisement {
            head: &raw[..head_end],
            refs,
            caps: caps?,
        })
    }

    /// The advertisement with only `refs`, the capabilities on the first line.
    fn render(&self, refs: &[AdvertisedRef]) -> Vec<u8> {
        let mut out = self.head.to_vec();
        let mut pkt = |payload: String| {
            out.extend_from_slice(format!("{:04x}", payload.len() + 4).as_bytes());
            out.extend_from_slice(payload.as_bytes());
        };
        match refs.split_first() {
            None => pkt(format!(
                "{} capabilities^{{}}\0{}\n",
                "0".repeat(40),
                self.caps
            )),
            Some((first, rest)) => {
                pkt(format!("{} {}\0{}\n", first.oid, first.name, self.caps));
                for r in rest {
                    pkt(format!("{} {}\n", r.oid, r.name));
                }
            }
        }
        out.extend_from_slice(b"0000");
        out
    }
}

/// A reqwest error as one line, with its causes and without any URL.
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut out = kind.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

fn strip_userinfo(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.as_str().trim_end_matches('/').to_string()
        }
        _ => url.to_string(),
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.response.is_none() {
            let mut resp = self.send()?;
            self.body = Body::default();
            if self.ls && self.service == "receive-pack" {
                self.rewritten = filter_advertisement(&mut resp)?.map(io::Cursor::new);
            }
            self.response = Some(resp);
        }
        if let Some(r) = self.rewritten.as_mut() {
            return r.read(buf);
        }
        match self.response.as_mut() {
            Some(r) => r.read(buf).map_err(|e| match e.kind() {
                io::ErrorKind::TimedOut => e,
                _ => other(format!("reading the git server's reply: {e}")),
            }),
            None => Ok(0),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.response.is_some() {
            return Err(other("git wrote to an HTTP request already sent"));
        }
        self.body.write(data)?;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libgit2's push body when its pack is empty: the commands' new ids are found and
    /// the pack's place; a pack with objects in it, or a delete only, is left alone.
    #[test]
    fn an_empty_push_pack_is_recognised_and_nothing_else() {
        let old = "1".repeat(40);
        let new = "2".repeat(40);
        let cmd = pkt(&format!(
            "{old} {new} refs/heads/x\0report-status side-band-64k\n"
        ));
        let cmd2 = pkt(&format!("{} {new} refs/heads/y\n", "0".repeat(40)));
        let delete = pkt(&format!("{old} {} refs/heads/z\n", "0".repeat(40)));
        let mut empty = b"PACK\0\0\0\x02\0\0\0\0".to_vec();
        empty.extend_from_slice(&[7u8; 20]);
        let mut full = b"PACK\0\0\0\x02\0\0\0\x01".to_vec();
        full.extend_from_slice(&[7u8; 20]);
        let body = |parts: &[&[u8]]| Body {
            memory: parts.concat(),
            ..Body::default()
        };
        let head = format!("{cmd}{cmd2}0000");
        let (news, at) = body(&[head.as_bytes(), &empty]).empty_push().unwrap();
        assert_eq!(news, vec![git2::Oid::from_str(&new).unwrap(); 2]);
        assert_eq!(at, head.len());
        assert!(body(&[head.as_bytes(), &full]).empty_push().is_none());
        assert!(
            body(&[format!("{delete}0000").as_bytes(), &empty])
                .empty_push()
                .is_none()
        );
        assert!(body(&[b"garbage"]).empty_push().is_none());
    }

    #[test]
    fn userinfo_is_never_part_of_the_request_url() {
        assert_eq!(
            strip_userinfo("https://me:secret@example.com/o/r.git"),
            "https://example.com/o/r.git"
        );
        assert_eq!(
            strip_userinfo("https://example.com/o/r.git"),
            "https://example.com/o/r.git"
        );
    }

    fn config_of(text: &str) -> (tempfile::TempDir, git2::Config) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        std::fs::write(&path, text).unwrap();
        let c = git2::Config::open(&path).unwrap();
        (dir, c)
    }

    #[test]
    fn http_settings_are_read_as_git_reads_them_the_most_specific_url_first() {
        let (_d, c) = config_of(
            "[http]\n\tsslVerify = false\n\tproxy = http://proxy.corp:3128\n\textraHeader = X-A: 1\n\
             [http \"https://git.corp/\"]\n\tsslVerify = true\n\tsslCAInfo = ~/corp-ca.pem\n\textraHeader =\n\textraHeader = X-B: 2\n\
             [http \"https://git.corp/team\"]\n\tproxy =\n\
             [http \"https://git.corporate\"]\n\tsslCAInfo = /wrong\n",
        );
        let home = std::path::Path::new("/home/dev");
        let team = HttpConfig::from_git(&c, "https://git.corp/team/app.git", home);
        assert_eq!(
            team,
            HttpConfig {
                ssl_verify: true,
                ssl_ca_info: Some("/home/dev/corp-ca.pem".into()),
                proxy: Some(String::new()),
                extra_headers: vec!["X-B: 2".into()],
            }
        );
        let other = HttpConfig::from_git(&c, "https://example.com/o/r.git", home);
        assert_eq!(
            other,
            HttpConfig {
                ssl_verify: false,
                ssl_ca_info: None,
                proxy: Some("http://proxy.corp:3128".into()),
                extra_headers: vec!["X-A: 1".into()],
            }
        );
        // A prefix that is not a path boundary does not apply.
        assert_eq!(
            url_match("https://git.corp", "https://git.corporate/x"),
            None
        );
        let (_d, empty) = config_of("");
        assert_eq!(
            HttpConfig::from_git(&empty, "https://x/y", home),
            HttpConfig::default()
        );
    }

    #[test]
    fn bad_http_settings_are_errors_naming_the_setting_and_no_header_value() {
        let e = extra_headers(&["Authorization Bearer s3cr3t-value".into()]).unwrap_err();
        assert!(e.to_string().contains("http.extraHeader"), "{e}");
        assert!(!e.to_string().contains("s3cr3t"), "{e}");
        let h = extra_headers(&["Authorization: Bearer abc".into(), "X-Two: 2".into()]).unwrap();
        assert!(h[reqwest::header::AUTHORIZATION].is_sensitive());
        let missing = HttpConfig {
            ssl_ca_info: Some("/nonexistent/ca.pem".into()),
            ..HttpConfig::default()
        };
        let e = client_for(&missing).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("http.sslCAInfo /nonexistent/ca.pem:"),
            "{e}"
        );
    }

    fn pkt(s: &str) -> String {
        format!("{:04x}{s}", s.len() + 4)
    }

    #[test]
    fn a_ref_advertisement_is_rewritten_with_its_capabilities_on_the_first_line() {
        let (a, b, c) = ("a".repeat(40), "b".repeat(40), "c".repeat(40));
        let raw = format!(
            "{}0000{}{}{}0000",
            pkt("# service=git-receive-pack\n"),
            pkt(&format!(
                "{a} refs/heads/main\0report-status side-band-64k\n"
            )),
            pkt(&format!("{b} refs/tags/v1\n")),
            pkt(&format!("{c} refs/heads/wip/x\n")),
        );
        let adv = Advertisement::parse(raw.as_bytes()).unwrap();
        let names: Vec<&str> = adv.refs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["refs/heads/main", "refs/tags/v1", "refs/heads/wip/x"]
        );
        assert_eq!(adv.caps, "report-status side-band-64k");
        let kept = vec![
            adv.refs[2].clone(),
            AdvertisedRef {
                oid: b.clone(),
                name: ".have".into(),
            },
        ];
        assert_eq!(
            String::from_utf8(adv.render(&kept)).unwrap(),
            format!(
                "{}0000{}{}0000",
                pkt("# service=git-receive-pack\n"),
                pkt(&format!(
                    "{c} refs/heads/wip/x\0report-status side-band-64k\n"
                )),
                pkt(&format!("{b} .have\n")),
            )
        );
        // Nothing kept: git's line for a repository without refs carries the capabilities.
        let zero = "0".repeat(40);
        assert_eq!(
            String::from_utf8(adv.render(&[])).unwrap(),
            format!(
                "{}0000{}0000",
                pkt("# service=git-receive-pack\n"),
                pkt(&format!(
                    "{zero} capabilities^{{}}\0report-status side-band-64k\n"
                )),
            )
        );
        let empty = format!(
            "{}0000{}0000",
            pkt("# service=git-receive-pack\n"),
            pkt(&format!("{zero} capabilities^{{}}\0ofs-delta\n"))
        );
        let adv = Advertisement::parse(empty.as_bytes()).unwrap();
        assert!(adv.refs.is_empty());
        assert_eq!(adv.caps, "ofs-delta");
        // Not pkt-lines: left for libgit2 to read and report.
        assert!(Advertisement::parse(b"<html>nope</html>").is_none());
    }

    #[test]
    fn a_large_body_moves_to_a_file_and_is_sent_whole() {
        let mut b = Body::default();
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..10 {
            b.write(&chunk).unwrap();
        }
        assert!(b.file.is_some());
        assert_eq!(b.len, 10 << 20);
        let mut f = b.file.as_ref().unwrap().try_clone().unwrap();
        f.rewind().unwrap();
        let mut all = Vec::new();
        f.read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), 10 << 20);
        assert!(all.iter().all(|&x| x == 7));
    }
}
