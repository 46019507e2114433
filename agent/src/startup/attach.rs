//! `wsagent tasks` and `wsagent attach TASK`: the local API handlers and the framing
//! (the clients are in `cli::attach`).
//!
//! Attaching is an HTTP/1.1 upgrade on the local socket (`GET /v1/tasks/{name}/attach`,
//! `Upgrade: wsagent-attach/1`), then the framed protocol documented in
//! [`agent_proto::local::attach`]: the server replays the task's buffered output, streams
//! the rest, and ends with an `EXIT` frame; the client sends typed input and its window
//! size. The client puts the user's terminal in raw mode (restored on every way out),
//! forwards SIGWINCH as a resize, and detaches on Ctrl-] (the task keeps running).

use std::sync::Arc;

use agent_proto::local::{ApiError, AttachExit, TaskStatus, attach as proto};
use axum::Json;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::state::Shared;
use crate::state::tasks::Task;

// ---------------------------------------------------------------------------------
// Framing

/// Write one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    for chunk in payload.chunks(proto::MAX_FRAME).chain(
        // An empty payload is still one frame.
        payload.is_empty().then_some(&[][..]),
    ) {
        let mut head = [0u8; 5];
        head[0] = kind;
        head[1..].copy_from_slice(&(chunk.len() as u32).to_be_bytes());
        w.write_all(&head).await?;
        w.write_all(chunk).await?;
    }
    w.flush().await
}

/// Read one frame; `None` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > proto::MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("attach frame of {len} bytes is over the limit"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some((head[0], payload)))
}

pub fn resize_payload(cols: u16, rows: u16) -> [u8; 4] {
    let mut p = [0u8; 4];
    p[..2].copy_from_slice(&cols.to_be_bytes());
    p[2..].copy_from_slice(&rows.to_be_bytes());
    p
}

// ---------------------------------------------------------------------------------
// Server

fn api_err(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(ApiError { error: msg.into() })).into_response()
}

/// `GET /v1/tasks`.
pub async fn list(State(s): State<Arc<Shared>>) -> Json<Vec<TaskStatus>> {
    Json(s.tasks.list())
}

/// `GET /v1/tasks/{name}/attach` (upgrade).
pub async fn attach(
    State(s): State<Arc<Shared>>,
    UrlPath(name): UrlPath<String>,
    mut req: Request,
) -> Response {
    let Some(task) = s.tasks.get(&name) else {
        return api_err(StatusCode::NOT_FOUND, format!("no task named {name:?}"));
    };
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(proto::PROTOCOL));
    if !wants {
        return api_err(
            StatusCode::UPGRADE_REQUIRED,
            format!("attach needs `Upgrade: {}`", proto::PROTOCOL),
        );
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let exit = s.exit.clone();
    s.tasks.tracker().spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let io = hyper_util::rt::TokioIo::new(upgraded);
        tokio::select! {
            _ = session(io, task) => {}
            _ = exit.cancelled() => {}
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, proto::PROTOCOL)
        .body(axum::body::Body::empty())
        .unwrap_or_else(|_| api_err(StatusCode::INTERNAL_SERVER_ERROR, "cannot upgrade"))
}

async fn session<IO: AsyncRead + AsyncWrite + Unpin>(io: IO, task: Arc<Task>) {
    let (mut rd, mut wr) = tokio::io::split(io);
    // Watch before subscribing: an exit seen by the watch comes after every byte the
    // subscription can deliver.
    let mut status = task.watch();
    let (replay, mut live) = task.subscribe();
    let output = async {
        if write_frame(&mut wr, proto::DATA, &replay).await.is_err() {
            return;
        }
        loop {
            let fin = status.borrow_and_update().state.is_final();
            if fin {
                // Everything written before the final state is in the channel already.
                while let Ok(b) = live.try_recv() {
                    if write_frame(&mut wr, proto::DATA, &b).await.is_err() {
                        return;
                    }
                }
                let s = status.borrow().clone();
                let exit = AttachExit {
                    state: s.state,
                    exit_code: s.exit_code,
                    signal: s.signal,
                };
                let body = serde_json::to_vec(&exit).unwrap_or_default();
                let _ = write_frame(&mut wr, proto::EXIT, &body).await;
                let _ = wr.shutdown().await;
                return;
            }
            tokio::select! {
                b = live.recv() => match b {
                    Ok(b) => {
                        if write_frame(&mut wr, proto::DATA, &b).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let note = format!("\r\n[wsagent: {n} chunks of output skipped]\r\n");
                        if write_frame(&mut wr, proto::DATA, note.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                },
                r = status.changed() => if r.is_err() { return },
            }
        }
    };
    let input = async {
        loop {
            match read_frame(&mut rd).await {
                Ok(Some((proto::DATA, data))) => task.input(&data).await,
                Ok(Some((proto::RESIZE, p))) if p.len() == 4 => {
                    let cols = u16::from_be_bytes([p[0], p[1]]);
                    let rows = u16::from_be_bytes([p[2], p[3]]);
                    if cols > 0 && rows > 0 {
                        task.resize(cols, rows);
                    }
                }
                Ok(Some(_)) => {}
                // The client closed: it detached. The task keeps running.
                Ok(None) | Err(_) => return,
            }
        }
    };
    tokio::select! {
        _ = output => {}
        _ = input => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_including_empty_ones() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write_frame(&mut a, proto::DATA, b"hello").await.unwrap();
        write_frame(&mut a, proto::DATA, b"").await.unwrap();
        write_frame(&mut a, proto::RESIZE, &resize_payload(80, 24))
            .await
            .unwrap();
        drop(a);
        assert_eq!(
            read_frame(&mut b).await.unwrap(),
            Some((proto::DATA, b"hello".to_vec()))
        );
        assert_eq!(
            read_frame(&mut b).await.unwrap(),
            Some((proto::DATA, vec![]))
        );
        assert_eq!(
            read_frame(&mut b).await.unwrap(),
            Some((proto::RESIZE, vec![0, 80, 0, 24]))
        );
        assert_eq!(read_frame(&mut b).await.unwrap(), None);
    }
}
