//! The HTTP client of coderd's agent API: one request at a time, typed errors, and the
//! retry policy ([`crate::backoff::Backoff`] with full jitter; `Retry-After` on 429).
//!
//! The agent token travels only in the `Coder-Session-Token` header (marked sensitive);
//! error messages name the route path and never the token or a full URL.
//!
//! Once the daemon is stopping ([`Client::set_stopping`]), coderd may refuse the agent
//! token (a stop or delete build: reference §0). The first 401 or 403 then is logged
//! once ([`REFUSED_AT_STOP`]) and every later call of any clone of this client fails at
//! once with [`ApiError::Refused`], without a request: nothing retries, nothing waits.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agent_proto::coder;
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::secrets::Secret;

/// Why one call to coderd failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{path}: cannot reach coderd: {detail}")]
    Connect { path: String, detail: String },
    #[error("{path}: no answer within {after:?}")]
    Timeout { path: String, after: Duration },
    #[error("{path}: http {status}: {message}")]
    Status {
        path: String,
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("{path}: malformed answer (http {status}): {detail}")]
    Decode {
        path: String,
        status: u16,
        detail: String,
    },
    /// The daemon is stopping and coderd refused the agent token (401/403): not sent.
    #[error("{path}: not sent: {REFUSED_AT_STOP}")]
    Refused { path: String },
}

/// The one line logged when coderd refuses the agent token during the stop.
pub const REFUSED_AT_STOP: &str =
    "the control plane no longer accepts this workspace's token; it is being stopped";

impl ApiError {
    /// Worth trying again: connect errors, timeouts, 5xx, 429 and undecodable answers
    /// (a proxy's error page); not other 4xx.
    pub fn retryable(&self) -> bool {
        match self {
            ApiError::Connect { .. } | ApiError::Timeout { .. } | ApiError::Decode { .. } => true,
            ApiError::Status { status, .. } => *status >= 500 || *status == 429,
            ApiError::Refused { .. } => false,
        }
    }

    /// The token was refused while stopping (expected; already logged once).
    pub fn refused(&self) -> bool {
        matches!(self, ApiError::Refused { .. })
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A configured client: base URL, agent token, per-call timeout.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    /// The base URL without a trailing `/`.
    base: String,
    token: Secret,
    pub timeout: Duration,
    /// Shared by every clone: stopping, and refused since.
    gate: Arc<Gate>,
}

#[derive(Debug, Default)]
struct Gate {
    stopping: AtomicBool,
    refused: AtomicBool,
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("control plane url {url:?} is not an http(s) url")]
    BadUrl { url: String },
    #[error("cannot read ca bundle {path}: {detail}")]
    CaFile { path: String, detail: String },
    #[error("cannot build the http client: {0}")]
    Build(String),
}

impl Client {
    /// `ca_files`: PEM bundles trusted in addition to the system roots.
    pub fn new(
        base_url: &str,
        token: Secret,
        timeout: Duration,
        ca_files: &[String],
    ) -> Result<Client, ClientError> {
        let base = base_url.trim().trim_end_matches('/').to_string();
        match Url::parse(&base) {
            Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => {}
            _ => return Err(ClientError::BadUrl { url: base }),
        }
        crate::tls::install_provider();
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("wsagent/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .timeout(timeout);
        for path in ca_files {
            let pem = std::fs::read(path).map_err(|e| ClientError::CaFile {
                path: path.clone(),
                detail: e.to_string(),
            })?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ClientError::CaFile {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::Build(error_chain(&e.without_url())))?;
        Ok(Client {
            http,
            base,
            token,
            timeout,
            gate: Arc::default(),
        })
    }

    /// The daemon is stopping: from now on a 401 or 403 means coderd no longer takes
    /// this workspace's token, and no call is made after it.
    pub fn set_stopping(&self) {
        self.gate.stopping.store(true, Ordering::Relaxed);
    }

    /// Coderd refused the token during the stop: calls are not made any more.
    pub fn is_refused(&self) -> bool {
        self.gate.refused.load(Ordering::Relaxed)
    }

    /// One call of `METHOD <AGENT_ME><route>` with a JSON body; the answer's body is
    /// decoded as `R` when the status is 2xx. `timeout` bounds the whole call.
    pub async fn call<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        method: Method,
        route: &str,
        query: &[(&str, &str)],
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<(u16, R), ApiError> {
        let path = format!("{}{route}", coder::AGENT_ME);
        if self.is_refused() {
            return Err(ApiError::Refused { path });
        }
        let mut url =
            Url::parse(&format!("{}{path}", self.base)).map_err(|e| ApiError::Connect {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let mut headers = HeaderMap::new();
        let mut tok =
            HeaderValue::from_str(self.token.expose()).map_err(|_| ApiError::Connect {
                path: path.clone(),
                detail: "the agent token is not a valid header value".into(),
            })?;
        tok.set_sensitive(true);
        headers.insert(coder::SESSION_TOKEN_HEADER, tok);
        let mut req = self
            .http
            .request(method, url)
            .headers(headers)
            .timeout(timeout);
        if let Some(b) = body {
            req = req.json(b);
        }
        let send = async {
            let resp = req
                .send()
                .await
                .map_err(|e| transport_error(&path, e, timeout))?;
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| transport_error(&path, e, timeout))?;
            Ok::<_, ApiError>((status, retry_after, bytes))
        };
        let (status, retry_after, bytes) = match tokio::time::timeout(timeout, send).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(ApiError::Timeout {
                    path,
                    after: timeout,
                });
            }
        };
        if matches!(status.as_u16(), 401 | 403) && self.gate.stopping.load(Ordering::Relaxed) {
            if !self.gate.refused.swap(true, Ordering::Relaxed) {
                tracing::warn!(path = %path, status = status.as_u16(), "{REFUSED_AT_STOP}");
            }
            return Err(ApiError::Refused { path });
        }
        if !status.is_success() {
            return Err(ApiError::Status {
                path,
                status: status.as_u16(),
                message: error_message(status, &bytes),
                retry_after,
            });
        }
        let parsed = if bytes.is_empty() {
            serde_json::from_slice(b"null")
        } else {
            serde_json::from_slice(&bytes)
        };
        match parsed {
            Ok(r) => Ok((status.as_u16(), r)),
            Err(e) => Err(ApiError::Decode {
                path,
                status: status.as_u16(),
                detail: e.to_string(),
            }),
        }
    }

    /// Like [`Client::call`], retrying retryable failures until `deadline` (each attempt
    /// is cut at the deadline too). The last error is returned.
    pub async fn call_until<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        method: Method,
        route: &str,
        query: &[(&str, &str)],
        body: Option<&B>,
        deadline: Instant,
    ) -> Result<(u16, R), ApiError> {
        let mut backoff =
            crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = self
                .call(method.clone(), route, query, body, left.min(self.timeout))
                .await;
            let err = match attempt {
                Ok(v) => return Ok(v),
                Err(e) if !e.retryable() => return Err(e),
                Err(e) => e,
            };
            let delay = err.retry_after().unwrap_or_else(|| backoff.next_delay());
            if Instant::now() + delay >= deadline {
                return Err(err);
            }
            tracing::debug!(error = %err, delay = ?delay, "retrying coderd call");
            tokio::time::sleep(delay).await;
        }
    }
}

fn transport_error(path: &str, e: reqwest::Error, timeout: Duration) -> ApiError {
    if e.is_timeout() {
        ApiError::Timeout {
            path: path.into(),
            after: timeout,
        }
    } else if e.is_decode() || e.is_body() {
        ApiError::Decode {
            path: path.into(),
            status: e.status().map(|s| s.as_u16()).unwrap_or(0),
            detail: error_chain(&e.without_url()),
        }
    } else {
        ApiError::Connect {
            path: path.into(),
            detail: error_chain(&e.without_url()),
        }
    }
}

/// `e: cause: cause`, as one line (redacted, in case a layer quotes a secret).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    crate::secrets::redact(&s).into_owned()
}

/// The `message` of a `codersdk.Response` body, else the start of the body as text.
fn error_message(status: StatusCode, bytes: &[u8]) -> String {
    if let Ok(r) = serde_json::from_slice::<coder::Response>(bytes)
        && !r.message.is_empty()
    {
        return if r.detail.is_empty() {
            r.message
        } else {
            format!("{} ({})", r.message, r.detail)
        };
    }
    let text = String::from_utf8_lossy(bytes);
    let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut short: String = text.chars().take(120).collect();
    if short.is_empty() {
        short = status.canonical_reason().unwrap_or("").to_lowercase();
    }
    crate::secrets::redact(&short).into_owned()
}

/// `Retry-After` in seconds (the HTTP-date form is not worth a date parser here: it
/// falls back to the backoff). Capped at 5 minutes.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let secs: u64 = v.trim().parse().ok()?;
    Some(Duration::from_secs(secs.min(300)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_failures_are_retried() {
        let st = |status| ApiError::Status {
            path: "/p".into(),
            status,
            message: String::new(),
            retry_after: None,
        };
        assert!(st(502).retryable());
        assert!(st(429).retryable());
        assert!(!st(400).retryable());
        assert!(!st(401).retryable());
        assert!(!st(413).retryable());
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn error_messages_prefer_the_codersdk_message() {
        assert_eq!(
            error_message(
                StatusCode::BAD_REQUEST,
                br#"{"message":"No logs provided."}"#
            ),
            "No logs provided."
        );
        assert_eq!(
            error_message(StatusCode::BAD_GATEWAY, b"<html>\n<h1>502</h1></html>"),
            "<html> <h1>502</h1></html>"
        );
    }

    #[test]
    fn a_bad_url_is_refused() {
        let t = Secret::new("11111111-2222-3333-4444-555555555555");
        assert!(matches!(
            Client::new("ftp://x", t.clone(), Duration::from_secs(1), &[]),
            Err(ClientError::BadUrl { .. })
        ));
        assert!(Client::new("https://coder.example.com/", t, Duration::from_secs(1), &[]).is_ok());
    }
}
