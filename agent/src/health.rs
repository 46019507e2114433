//! Health checks: `http` (GET), `unix-http` (GET over a unix socket, e.g. dockerd's
//! `/_ping`), `tcp` (connect) and `exec` (exit 0). One check is one call of [`check`];
//! the interval, threshold and what follows from the verdict belong to the supervisor.

use std::ffi::OsString;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;

use crate::config::{HealthConfig, HealthKind};

/// Run one check, bounded by its timeout. `Err` carries why it failed, for status.
pub async fn check(h: &HealthConfig, env: &[(OsString, OsString)]) -> Result<(), String> {
    match tokio::time::timeout(h.timeout, run(h, env)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "timed out after {}",
            humantime::format_duration(h.timeout)
        )),
    }
}

fn status_ok(h: &HealthConfig, status: u16) -> Result<(), String> {
    let ok = match h.expect_status {
        Some(want) => status == want,
        None => status < 500,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("HTTP status {status}"))
    }
}

async fn run(h: &HealthConfig, env: &[(OsString, OsString)]) -> Result<(), String> {
    match h.kind {
        HealthKind::Http => {
            let url = h.url.as_deref().unwrap_or_default();
            let client = http_client();
            let resp = client
                .get(url)
                .timeout(h.timeout)
                .send()
                .await
                .map_err(|e| {
                    // reqwest errors carry the URL; health URLs hold no secrets but keep it short.
                    format!("GET {url}: {}", error_chain(&e))
                })?;
            status_ok(h, resp.status().as_u16())
        }
        HealthKind::UnixHttp => {
            let socket = h.socket.as_deref().unwrap_or_default();
            let path = h.path.as_deref().unwrap_or("/");
            let status = unix_get(socket, path).await?;
            status_ok(h, status)
        }
        HealthKind::Tcp => {
            let addr = h.address.as_deref().unwrap_or_default();
            tokio::net::TcpStream::connect(addr)
                .await
                .map(drop)
                .map_err(|e| format!("connect {addr}: {e}"))
        }
        HealthKind::Exec => {
            let argv = h.command.clone().unwrap_or_default();
            let mut spec = crate::procs::Spec::new(argv.clone());
            spec.env = env.to_vec();
            // Killed if it outlives its timeout (the future is dropped then).
            spec.kill_on_drop = true;
            let mut child =
                crate::procs::spawn(spec).map_err(|e| format!("cannot run {:?}: {e}", argv[0]))?;
            let st = child.wait().await;
            if st.success() {
                Ok(())
            } else {
                Err(format!("{:?} ended with {st}", argv[0]))
            }
        }
    }
}

fn http_client() -> reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            crate::tls::install_provider();
            reqwest::Client::builder()
                .no_proxy()
                .connect_timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default()
        })
        .clone()
}

/// GET `path` over the unix socket at `socket`; returns the HTTP status.
pub async fn unix_get(socket: &str, path: &str) -> Result<u16, String> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("connect {socket}: {e}"))?;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io)
        .await
        .map_err(|e| format!("{socket}: {e}"))?;
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", "localhost")
        .body(Empty::new())
        .map_err(|e| format!("bad path {path:?}: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("GET {path} on {socket}: {e}"));
    let out = match resp {
        Ok(r) => {
            let status = r.status().as_u16();
            let _ = r.into_body().collect().await;
            Ok(status)
        }
        Err(e) => Err(e),
    };
    conn.abort();
    out
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
