//! `wsagent tasks` and `wsagent attach TASK`: the local API handlers and the clients.
//!
//! Attaching is an HTTP/1.1 upgrade on the local socket (`GET /v1/tasks/{name}/attach`,
//! `Upgrade: wsagent-attach/1`), then the framed protocol documented in
//! [`agent_proto::local::attach`]: the server replays the task's buffered output, streams
//! the rest, and ends with an `EXIT` frame; the client sends typed input and its window
//! size. The client puts the user's terminal in raw mode (restored on every way out),
//! forwards SIGWINCH as a resize, and detaches on Ctrl-] (the task keeps running).

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use agent_proto::local::{ApiError, AttachExit, TaskStatus, attach as proto};
use axum::Json;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::tasks::Task;
use crate::api::{Client, ClientError};
use crate::daemon::Shared;

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

fn resize_payload(cols: u16, rows: u16) -> [u8; 4] {
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

// ---------------------------------------------------------------------------------
// Clients

fn fail(e: ClientError) -> ExitCode {
    eprintln!("wsagent: {e}");
    match e {
        ClientError::Unreachable { .. } => ExitCode::from(crate::cli::EX_UNAVAILABLE),
        _ => ExitCode::from(crate::cli::EX_FAILED),
    }
}

/// Human rendering of `wsagent tasks`.
pub fn render_tasks(tasks: &[TaskStatus]) -> String {
    if tasks.is_empty() {
        return "no tasks configured ([[once]] and [[task]] in the config)\n".into();
    }
    let mut out = format!(
        "{:<20} {:<5} {:<10} {:>5} {:>10}  {}\n",
        "TASK", "KIND", "STATE", "EXIT", "DURATION", "NOTE"
    );
    for t in tasks {
        let exit = match (t.exit_code, t.signal) {
            (Some(c), _) => c.to_string(),
            (None, Some(s)) => format!("sig{s}"),
            _ => "-".into(),
        };
        let dur = t
            .duration_ms
            .map(|d| {
                let d = std::time::Duration::from_millis(d);
                crate::supervisor::service::fmt_dur(d)
            })
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<20} {:<5} {:<10} {:>5} {:>10}  {}\n",
            t.name,
            t.kind.as_str(),
            t.state.as_str(),
            exit,
            dur,
            t.message.clone().unwrap_or_default()
        ));
    }
    out
}

/// `wsagent tasks [--json]`.
pub async fn cli_tasks(client: &Client, json: bool) -> ExitCode {
    let tasks: Vec<TaskStatus> = match client.request("GET", "/v1/tasks", None).await {
        Ok(r) => match r.json().await {
            Ok(t) => t,
            Err(e) => return fail(e),
        },
        Err(e) => return fail(e),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&tasks).unwrap_or_default()
        );
    } else {
        print!("{}", render_tasks(&tasks));
    }
    ExitCode::SUCCESS
}

/// Puts a terminal in raw mode and restores it when dropped.
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    fn enable() -> Option<RawMode> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

/// The size of the user's terminal, if stdout or stdin is one.
fn terminal_size() -> Option<(u16, u16)> {
    for fd in [libc::STDOUT_FILENO, libc::STDIN_FILENO] {
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one `winsize` into the pointer, valid for the call.
        let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
        if r == 0 && ws.ws_col > 0 && ws.ws_row > 0 {
            return Some((ws.ws_col, ws.ws_row));
        }
    }
    None
}

async fn upgrade(client: &Client, name: &str) -> Result<hyper::upgrade::Upgraded, ExitCode> {
    let stream = tokio::net::UnixStream::connect(&client.socket)
        .await
        .map_err(|source| {
            fail(ClientError::Unreachable {
                socket: client.socket.clone(),
                source,
            })
        })?;
    let proto_err = |m: String| {
        fail(ClientError::Protocol {
            socket: client.socket.clone(),
            message: m,
        })
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, http_body_util::Empty<Bytes>>(
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .map_err(|e| proto_err(e.to_string()))?;
    tokio::spawn(conn.with_upgrades());
    let req = hyper::Request::builder()
        .method("GET")
        .uri(format!("/v1/tasks/{name}/attach"))
        .header("host", "wsagent")
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, proto::PROTOCOL)
        .body(http_body_util::Empty::new())
        .map_err(|e| proto_err(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| proto_err(e.to_string()))?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        use http_body_util::BodyExt;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let msg = serde_json::from_slice::<ApiError>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| format!("HTTP {status}"));
        eprintln!("wsagent: {msg}");
        return Err(ExitCode::from(crate::cli::EX_FAILED));
    }
    hyper::upgrade::on(resp)
        .await
        .map_err(|e| proto_err(format!("upgrade failed: {e}")))
}

enum FromServer {
    Data(Vec<u8>),
    Exit(Option<AttachExit>),
    Closed,
}

/// `wsagent attach TASK`: replay the task's output, then connect this terminal to the
/// task's until Ctrl-] (detach; the task keeps running) or the task ends. Exit code 0 on
/// detach or when the task ended; 1 when the task is unknown.
pub async fn cli_attach(client: &Client, name: &str) -> ExitCode {
    let upgraded = match upgrade(client, name).await {
        Ok(u) => u,
        Err(code) => return code,
    };
    let (mut rd, mut wr) = tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));

    // Server frames on their own task, so the select below only awaits channels.
    let (srv_tx, mut srv_rx) = tokio::sync::mpsc::channel::<FromServer>(64);
    let reader = tokio::spawn(async move {
        loop {
            let msg = match read_frame(&mut rd).await {
                Ok(Some((proto::DATA, d))) => FromServer::Data(d),
                Ok(Some((proto::EXIT, d))) => FromServer::Exit(serde_json::from_slice(&d).ok()),
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => FromServer::Closed,
            };
            let end = !matches!(msg, FromServer::Data(_));
            if srv_tx.send(msg).await.is_err() || end {
                return;
            }
        }
    });

    // stdin on a plain thread: a blocked read must never hold the runtime at exit.
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            match std::io::Read::read(&mut stdin, &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if in_tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });

    let raw = RawMode::enable();
    let mut err = std::io::stderr();
    let _ = write!(
        err,
        "[wsagent: attached to task {name}; detach with Ctrl-]]\r\n"
    );
    if let Some((c, r)) = terminal_size() {
        let _ = write_frame(&mut wr, proto::RESIZE, &resize_payload(c, r)).await;
    }
    let mut winch =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
    let mut stdin_open = true;
    let mut out = std::io::stdout();
    let end = loop {
        let winch_fut = async {
            match winch.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            m = srv_rx.recv() => match m {
                Some(FromServer::Data(d)) => {
                    let _ = out.write_all(&d);
                    let _ = out.flush();
                }
                Some(FromServer::Exit(e)) => break Some(e),
                Some(FromServer::Closed) | None => break None,
            },
            i = in_rx.recv(), if stdin_open => match i {
                Some(data) => {
                    if let Some(pos) = data.iter().position(|&b| b == proto::DETACH_KEY) {
                        if pos > 0 {
                            let _ = write_frame(&mut wr, proto::DATA, &data[..pos]).await;
                        }
                        drop(raw);
                        let _ = write!(err, "\r\n[wsagent: detached from task {name}; it keeps running]\r\n");
                        reader.abort();
                        let _ = wr.shutdown().await;
                        return ExitCode::SUCCESS;
                    }
                    if write_frame(&mut wr, proto::DATA, &data).await.is_err() {
                        break None;
                    }
                }
                None => stdin_open = false,
            },
            _ = winch_fut => {
                if let Some((c, r)) = terminal_size() {
                    let _ = write_frame(&mut wr, proto::RESIZE, &resize_payload(c, r)).await;
                }
            }
        }
    };
    drop(raw);
    reader.abort();
    match end {
        Some(Some(e)) => {
            let how = match (e.exit_code, e.signal) {
                (Some(c), _) => format!("exit code {c}"),
                (None, Some(s)) => format!("signal {s}"),
                _ => "no exit status".into(),
            };
            let _ = write!(
                err,
                "\r\n[wsagent: task {name} ended: {} ({how})]\r\n",
                e.state
            );
        }
        Some(None) => {
            let _ = write!(err, "\r\n[wsagent: task {name} ended]\r\n");
        }
        None => {
            let _ = write!(err, "\r\n[wsagent: the daemon closed the connection]\r\n");
        }
    }
    ExitCode::SUCCESS
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

    #[test]
    fn the_task_table_shows_state_exit_and_duration() {
        let t = TaskStatus {
            name: "web".into(),
            kind: agent_proto::local::TaskKind::Task,
            state: agent_proto::local::TaskState::Failed,
            pid: None,
            exit_code: Some(3),
            signal: None,
            started_at: None,
            duration_ms: Some(1500),
            blocks_ready: false,
            tty: true,
            message: Some("exit code 3".into()),
        };
        let s = render_tasks(&[t]);
        assert!(s.contains("web"), "{s}");
        assert!(s.contains("failed"), "{s}");
        assert!(s.contains(" 3 "), "{s}");
    }
}
