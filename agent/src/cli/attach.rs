//! The clients of `wsagent tasks` and `wsagent attach TASK` (the server side and the
//! framing are in `startup::attach`).
//!
//! The client puts the user's terminal in raw mode (crossterm; restored on every way out), forwards
//! SIGWINCH as a resize, and detaches on Ctrl-] (the task keeps running).

use std::io::Write;
use std::process::ExitCode;

use agent_proto::local::{ApiError, AttachExit, TaskStatus, attach as proto};
use axum::http::{StatusCode, header};
use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use crate::api::{Client, ClientError};
use crate::startup::attach::{read_frame, resize_payload, write_frame};

fn fail(e: ClientError) -> ExitCode {
    eprintln!("wsagent: {e}");
    match e {
        ClientError::Unreachable { .. } => ExitCode::from(super::EX_UNAVAILABLE),
        _ => ExitCode::from(super::EX_FAILED),
    }
}

/// Human rendering of `wsagent tasks`.
pub fn render_tasks(tasks: &[TaskStatus]) -> String {
    if tasks.is_empty() {
        return "no tasks configured ([[once]] and [[task]] in the config)\n".into();
    }
    let rows = tasks
        .iter()
        .map(|t| {
            let exit = match (t.exit_code, t.signal) {
                (Some(c), _) => c.to_string(),
                (None, Some(s)) => format!("sig{s}"),
                _ => "-".into(),
            };
            let dur = t
                .duration_ms
                .map(|d| crate::supervisor::service::fmt_dur(std::time::Duration::from_millis(d)))
                .unwrap_or_else(|| "-".into());
            vec![
                t.name.clone(),
                t.kind.as_str().to_string(),
                t.state.as_str().to_string(),
                exit,
                dur,
                t.message.clone().unwrap_or_default(),
            ]
        })
        .collect();
    use super::table::{left, right};
    super::table::render(
        &[
            left("TASK"),
            left("KIND"),
            left("STATE"),
            right("EXIT"),
            right("DURATION"),
            left("NOTE"),
        ],
        rows,
        "",
    )
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

/// Puts the user's terminal in raw mode (crossterm) and restores it when dropped; only
/// when stdin is a terminal (crossterm would otherwise reach for /dev/tty).
struct RawMode;

impl RawMode {
    fn enable() -> Option<RawMode> {
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() {
            return None;
        }
        crossterm::terminal::enable_raw_mode().ok()?;
        Some(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

/// The size of the user's terminal (columns, rows), if there is one.
fn terminal_size() -> Option<(u16, u16)> {
    use std::io::IsTerminal;
    // Without a terminal crossterm would ask `tput`: there is no size to send then.
    if !std::io::stdout().is_terminal() && !std::io::stdin().is_terminal() {
        return None;
    }
    crossterm::terminal::size()
        .ok()
        .filter(|(c, r)| *c > 0 && *r > 0)
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
        return Err(ExitCode::from(super::EX_FAILED));
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
