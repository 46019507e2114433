//! The local API's connections: how many, how long, and how they end.
//!
//! A client that connects and sends nothing, or half a request, must not hold a file
//! descriptor for ever: with enough of them the daemon runs out of descriptors, and
//! everything that opens a file (repository discovery, a save) fails. So:
//! - at most [`MAX_CONNECTIONS`] are served at once; one more is answered `503` and
//!   closed at once;
//! - a request head must arrive whole within [`HEAD_TIMEOUT`] of the connection (or of
//!   the previous response): an idle or half-sent connection is closed then (hyper's
//!   `header_read_timeout`); a request body within [`BODY_TIMEOUT`] (see
//!   `read_body` in `api.rs`);
//! - a response that streams (events, `logs -f`, `save`, an attach) is not timed: it
//!   ends with what it follows, or at the daemon's exit;
//! - at the daemon's exit every connection is asked to end (idle ones close at once),
//!   and whatever is still open [`EXIT_GRACE`] later is dropped: a stuck client never
//!   holds the exit.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::connect_info::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Peer;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// From the connection (or the end of the previous response) to the end of a request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// For a request body, from the end of its head.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connections may take to end once the daemon exits.
const EXIT_GRACE: Duration = Duration::from_millis(200);

/// Serve `app` on `listener` until `cancel`; every connection is a task of `tracker`.
pub async fn serve(
    listener: UnixListener,
    app: Router,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT);
    let (mut warned, mut refusing) = (false, false);
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors, say: wait for some to close, without spinning.
                    if !warned {
                        tracing::warn!(error = %e, "local API: cannot accept a connection");
                        warned = true;
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            }
        };
        warned = false;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if !refusing {
                tracing::warn!(
                    max = MAX_CONNECTIONS,
                    "local API: too many connections, refusing more"
                );
                refusing = true;
            }
            refuse(stream);
            continue;
        };
        refusing = false;
        let peer = Peer::of(&stream);
        let svc = hyper_util::service::TowerToHyperService::new(
            app.clone().layer(axum::Extension(ConnectInfo(peer))),
        );
        let conn = http
            .serve_connection(TokioIo::new(stream), svc)
            .with_upgrades();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let _slot = slot;
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = cancel.cancelled() => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(EXIT_GRACE, conn).await;
        });
    }
}

/// Answer a connection over the limit with `503` and close it, without waiting for it.
fn refuse(stream: tokio::net::UnixStream) {
    let body = format!(
        "{{\"error\":\"the wsagent daemon is serving {MAX_CONNECTIONS} connections already: try again\"}}"
    );
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // A fresh socket's send buffer takes it whole; if not, the close says enough.
    let _ = stream.try_write(reply.as_bytes());
}
