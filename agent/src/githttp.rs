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
    /// The credential the next request sends (the index into `creds`).
    next: Cell<usize>,
    auth_failed: Cell<bool>,
}

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
                next: Cell::new(0),
                auth_failed: Cell::new(false),
            })
        });
        Scope(())
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

/// The client of every git HTTP request: rustls with the system's trust roots, where
/// the platform verifier honours `SSL_CERT_FILE` and `SSL_CERT_DIR` as git does (tested
/// with a private CA).
fn client() -> &'static reqwest::blocking::Client {
    static CLIENT: OnceLock<reqwest::blocking::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        crate::tls::install_provider();
        reqwest::blocking::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(Duration::from_secs(30))
            .timeout(None)
            .build()
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "git HTTP client: falling back to the defaults");
                reqwest::blocking::Client::new()
            })
    })
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
            redirected: ls.then(|| self.redirected.clone()),
        }))
    }

    fn close(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// A request body: what libgit2 wrote before its first read.
#[derive(Default)]
struct Body {
    memory: Vec<u8>,
    file: Option<std::fs::File>,
    len: u64,
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

    fn request_body(&self) -> io::Result<reqwest::blocking::Body> {
        Ok(match &self.file {
            Some(f) => {
                let mut f = f.try_clone()?;
                f.rewind()?;
                reqwest::blocking::Body::sized(f, self.len)
            }
            None => reqwest::blocking::Body::from(self.memory.clone()),
        })
    }
}

struct Stream {
    service: &'static str,
    ls: bool,
    base: String,
    body: Body,
    response: Option<reqwest::blocking::Response>,
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
        loop {
            let (cred, timeout) = CONTEXT.with(|c| {
                let c = c.borrow();
                let Some(c) = c.as_ref() else {
                    return (None, NO_DEADLINE_TIMEOUT);
                };
                let timeout = match c.deadline {
                    Some(d) => d.saturating_duration_since(Instant::now()),
                    None => NO_DEADLINE_TIMEOUT,
                };
                (c.creds.get(c.next.get()).cloned(), timeout)
            });
            if timeout.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
            }
            let mut req = if self.ls {
                client().get(&url).header("Accept", "*/*")
            } else {
                client()
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
            req = req.timeout(timeout);
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
            self.response = Some(self.send()?);
            self.body = Body::default();
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
