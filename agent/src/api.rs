//! The local control API: HTTP/1.1 + JSON over a unix socket (server and client).
//!
//! The socket is created mode 0600 and every connection's peer credentials are checked:
//! only root, the daemon's own uid and `daemon.api_user` are served; anyone else gets
//! 403. The API acts for the calling user ([`caller`]): what a request names (`save
//! --repo`, a dry run, a service's log file) is read with that user's own permissions,
//! so the API never reads for a user what the user could not read. Connections are
//! capped and timed ([`conns`]). Routes and bodies are documented in
//! `agent_proto::local`.

pub mod caller;
mod conns;

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use agent_proto::local::{
    ActionReply, ApiError, Event, EventKind, Lifecycle, ShutdownRequest, Status,
};
use axum::body::Body;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::state::Shared;

/// Peer credentials of a connection.
#[derive(Clone, Debug)]
pub struct Peer {
    pub uid: Option<u32>,
    pub caller: Option<Arc<caller::Caller>>,
}

impl Peer {
    fn of(stream: &tokio::net::UnixStream) -> Peer {
        let caller = caller::Caller::of(stream);
        Peer {
            uid: caller.as_ref().map(|c| c.uid),
            caller: caller.map(Arc::new),
        }
    }
}

fn err(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(ApiError { error: msg.into() })).into_response()
}

/// The uid allowed besides root and the daemon's own (`daemon.api_user`).
static API_UID: std::sync::Mutex<Option<u32>> = std::sync::Mutex::new(None);
/// The socket being served, for [`set_api_user`] after a config reload.
static SERVED: std::sync::Mutex<Option<std::path::PathBuf>> = std::sync::Mutex::new(None);

/// Serve `api_user` (a user name or uid; `None`: root and the daemon's uid only) from
/// now on: the socket is handed to that user (still 0600) or back to the daemon's own
/// ids. A user that does not exist here leaves root and the daemon's uid only, loudly.
pub fn set_api_user(api_user: Option<&str>) -> std::io::Result<()> {
    let socket = SERVED.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let extra = match api_user.map(|u| crate::procs::resolve_user(u, None)) {
        None => {
            if let Some(socket) = &socket {
                std::os::unix::fs::chown(
                    socket,
                    Some(nix::unistd::geteuid().as_raw()),
                    Some(nix::unistd::getegid().as_raw()),
                )?;
            }
            None
        }
        Some(Ok(r)) => {
            // The user owns the socket (still 0600), so it can connect; root always can.
            if let Some(socket) = &socket {
                std::os::unix::fs::chown(socket, Some(r.uid), Some(r.gid))?;
            }
            Some(r.uid)
        }
        Some(Err(e)) => {
            // A user of the image that does not exist here: serve root alone, loudly.
            tracing::error!(error = %e, "daemon.api_user: serving root and the daemon's uid only");
            None
        }
    };
    *API_UID.lock().unwrap_or_else(|e| e.into_inner()) = extra;
    Ok(())
}

async fn check_peer(ConnectInfo(peer): ConnectInfo<Peer>, req: Request, next: Next) -> Response {
    let me = nix::unistd::geteuid().as_raw();
    let extra = *API_UID.lock().unwrap_or_else(|e| e.into_inner());
    match peer.uid {
        Some(0) => next.run(req).await,
        Some(uid) if uid == me || Some(uid) == extra => next.run(req).await,
        Some(uid) => {
            tracing::warn!(uid, "local API request refused: peer uid not allowed");
            err(
                StatusCode::FORBIDDEN,
                format!("permission denied: uid {uid} may not use this socket"),
            )
        }
        None => err(StatusCode::FORBIDDEN, "permission denied: unknown peer"),
    }
}

/// Bind the socket and serve until `cancel`.
pub fn serve(
    socket: &Path,
    shared: Arc<Shared>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Created with a restrictive umask so there is no window where it is open to all.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(socket);
    nix::sys::stat::umask(old);
    let listener = listener?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    let api_user = shared
        .config
        .read()
        .expect("lock")
        .config
        .daemon
        .api_user
        .clone();
    *SERVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(socket.to_path_buf());
    set_api_user(api_user.as_deref())?;
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/services/{name}/{action}", post(service_action))
        .route("/v1/services/{name}/logs", get(service_logs))
        .route("/v1/shutdown", post(shutdown))
        .route("/v1/events", get(events))
        .route("/v1/save", post(save))
        .route("/v1/metrics", get(metrics))
        .merge(crate::startup::routes())
        .layer(axum::middleware::from_fn(read_body))
        .layer(axum::middleware::from_fn(check_peer))
        .with_state(shared);
    tracing::info!(socket = %socket.display(), "local API listening");
    tracker.spawn(conns::serve(listener, app, tracker.clone(), cancel));
    Ok(())
}

/// The largest request body (requests are small JSON objects).
const MAX_BODY: usize = 64 * 1024;

/// Read a request's body whole within [`conns::BODY_TIMEOUT`]: a client that sends half
/// a body and stalls gets `408` instead of holding its handler (and connection) for ever.
async fn read_body(req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(conns::BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(e)) => err(
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body (at most {MAX_BODY} bytes): {e}"),
        ),
        Err(_) => err(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s",
                conns::BODY_TIMEOUT.as_secs()
            ),
        ),
    }
}

async fn status(State(s): State<Arc<Shared>>) -> Json<Status> {
    Json(s.status())
}

/// Prometheus metrics (`/v1/metrics`, and `[daemon] metrics` over TCP).
async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let st = s.status();
    let body = crate::metrics::render(&st.services, st.lifecycle == Lifecycle::Ready);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        body,
    )
        .into_response()
}

/// Serve `/metrics` (and `/v1/metrics`) over TCP on `addr` until `cancel`: only the
/// metrics, read-only, for a Prometheus scraper that cannot reach the unix socket.
pub async fn serve_metrics(
    addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/metrics", get(metrics))
        .with_state(shared);
    tracing::info!(address = %bound, "metrics listening");
    tracker.spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
    });
    Ok(bound)
}

async fn service_action(
    State(s): State<Arc<Shared>>,
    UrlPath((name, action)): UrlPath<(String, String)>,
) -> Response {
    // A clone of the handle: the supervisor is not held while the service stops.
    let Some(h) = s.services().handle(&name) else {
        return err(StatusCode::NOT_FOUND, format!("no service named {name:?}"));
    };
    match action.as_str() {
        "start" => h.start().await,
        "restart" => h.restart().await,
        "stop" => h.stop(h.cfg.stop_timeout).await,
        other => {
            return err(
                StatusCode::NOT_FOUND,
                format!("unknown action {other:?} (start, stop, restart)"),
            );
        }
    }
    let st = h.status();
    Json(ActionReply {
        ok: true,
        message: format!("{name}: {action} requested; now {}", st.state),
    })
    .into_response()
}

#[derive(serde::Deserialize)]
struct LogsQuery {
    n: Option<usize>,
    #[serde(default)]
    follow: bool,
    /// Only lines from this time on (RFC 3339 UTC with milliseconds, as stored).
    since: Option<String>,
    /// Prefix each line with its time.
    #[serde(default)]
    timestamps: bool,
}

impl LogsQuery {
    fn view(&self) -> crate::logline::View {
        crate::logline::View {
            since: self.since.clone(),
            timestamps: self.timestamps,
        }
    }

    /// The last `n` of `stored` that the view keeps, rendered, one per line.
    fn head(&self, stored: Vec<String>, render: impl Fn(&str) -> Option<String>) -> String {
        let mut lines: Vec<String> = stored.iter().filter_map(|l| render(l)).collect();
        let skip = lines.len().saturating_sub(self.n.unwrap_or(100));
        lines.drain(..skip);
        let mut head = lines.join("\n");
        if !head.is_empty() {
            head.push('\n');
        }
        head
    }

    /// Lines read for [`LogsQuery::head`]: all of them when `since` filters.
    fn wanted(&self) -> usize {
        if self.since.is_some() {
            usize::MAX
        } else {
            self.n.unwrap_or(100)
        }
    }
}

/// `wsagent logs NAME`: a service's output; else a one-time or startup task's; else,
/// for `daemon`, the daemon's own log.
async fn service_logs(
    State(s): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<LogsQuery>,
) -> Response {
    let Some(caller) = peer.caller else {
        return err(StatusCode::FORBIDDEN, "permission denied: unknown peer");
    };
    let (path, own, follow_rx) = {
        let sup = s.services();
        let Some(h) = sup.get(&name) else {
            drop(sup);
            return other_logs(&s, &name, &q);
        };
        let (path, own) = h
            .sink
            .file
            .lock()
            .map(|f| (f.path().to_path_buf(), f.own_files()))
            .unwrap_or_default();
        (path, own, q.follow.then(|| h.sink.follow.subscribe()))
    };
    // Opened without following links, for this caller: a link the user put at the
    // log's path is refused, not read as root.
    let n = q.wanted();
    let read = tokio::task::spawn_blocking(move || caller::read_log(&caller, &path, &own, n)).await;
    let lines = match read {
        Ok(Ok(lines)) => lines,
        Ok(Err(denied)) => {
            tracing::warn!(service = %name, error = %denied, "log read refused");
            return err(StatusCode::FORBIDDEN, denied.to_string());
        }
        Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let view = q.view();
    let head = q.head(lines, |l| view.render(l));
    match follow_rx {
        None => head.into_response(),
        Some(rx) => {
            let first =
                futures::stream::once(async move { Ok::<Bytes, Infallible>(Bytes::from(head)) });
            let rest = futures::stream::unfold((rx, view), |(mut rx, view)| async move {
                loop {
                    match rx.recv().await {
                        Ok(line) => {
                            let Some(line) = view.render(&line) else {
                                continue;
                            };
                            return Some((
                                Ok::<Bytes, Infallible>(Bytes::from(line + "\n")),
                                (rx, view),
                            ));
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => return None,
                    }
                }
            });
            let all = futures::StreamExt::chain(first, rest);
            Body::from_stream(futures::StreamExt::take_until(
                all,
                s.exit.clone().cancelled_owned(),
            ))
            .into_response()
        }
    }
}

/// The logs of a task, or the daemon's own (`daemon`).
fn other_logs(s: &Arc<Shared>, name: &str, q: &LogsQuery) -> Response {
    let exit = s.exit.clone().cancelled_owned();
    if let Some(task) = s.tasks.get(name) {
        // A terminal's output: no per-line time to filter on or show.
        let lines = crate::supervisor::output::tail(&task.log_path, q.wanted());
        let head = q.head(lines, |l| Some(l.to_string()));
        if !q.follow {
            return head.into_response();
        }
        let (_, rx) = task.subscribe();
        let first =
            futures::stream::once(async move { Ok::<Bytes, Infallible>(Bytes::from(head)) });
        let rest = futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(b) => {
                        let text = String::from_utf8_lossy(&b).replace("\r\n", "\n");
                        return Some((Ok::<Bytes, Infallible>(Bytes::from(text)), rx));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return None,
                }
            }
        });
        return Body::from_stream(futures::StreamExt::take_until(
            futures::StreamExt::chain(first, rest),
            exit,
        ))
        .into_response();
    }
    if name != "daemon" {
        return err(
            StatusCode::NOT_FOUND,
            format!("no service or task named {name:?} (`daemon` is the daemon's own log)"),
        );
    }
    let path = s.state_dir.join("wsagent.log");
    let view = q.view();
    let render = |l: &str| view.render(&crate::logline::from_daemon_json(l));
    let head = q.head(crate::supervisor::output::tail(&path, q.wanted()), render);
    if !q.follow {
        return head.into_response();
    }
    let first = futures::stream::once(async move { Ok::<Bytes, Infallible>(Bytes::from(head)) });
    let rest = crate::logline::follow_daemon(path, view);
    Body::from_stream(futures::StreamExt::take_until(
        futures::StreamExt::chain(first, rest),
        exit,
    ))
    .into_response()
}

fn is_final(ev: &Event) -> bool {
    matches!(
        ev.kind,
        EventKind::Lifecycle {
            state: Lifecycle::Off | Lifecycle::ShutdownError | Lifecycle::ShutdownTimeout
        }
    )
}

/// Counts one open event stream in [`Shared::open_streams`] for as long as it lives.
struct StreamGuard(Arc<AtomicUsize>);

impl StreamGuard {
    fn new(count: &Arc<AtomicUsize>) -> StreamGuard {
        count.fetch_add(1, Ordering::SeqCst);
        StreamGuard(count.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn event_stream(
    rx: tokio::sync::broadcast::Receiver<Event>,
    until_final: bool,
    exit: CancellationToken,
    guard: StreamGuard,
) -> Body {
    event_stream_with(Vec::new(), rx, until_final, exit, guard)
}

fn event_stream_with(
    history: Vec<Event>,
    rx: tokio::sync::broadcast::Receiver<Event>,
    until_final: bool,
    exit: CancellationToken,
    guard: StreamGuard,
) -> Body {
    // A history that already holds the end ends the stream after it.
    let ended = until_final && history.iter().any(is_final);
    let head = futures::stream::iter(history.into_iter().map(|ev| {
        let mut line = serde_json::to_vec(&ev).unwrap_or_default();
        line.push(b'\n');
        Ok::<Bytes, Infallible>(Bytes::from(line))
    }));
    let stream = futures::stream::unfold((rx, ended), move |(mut rx, done)| async move {
        if done {
            return None;
        }
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    let fin = until_final && is_final(&ev);
                    let mut line = serde_json::to_vec(&ev).unwrap_or_default();
                    line.push(b'\n');
                    return Some((Ok::<Bytes, Infallible>(Bytes::from(line)), (rx, fin)));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    });
    let all = futures::StreamExt::chain(head, stream);
    let counted = futures::StreamExt::map(all, move |item| {
        let _open = &guard;
        item
    });
    Body::from_stream(futures::StreamExt::take_until(
        counted,
        exit.cancelled_owned(),
    ))
}

async fn shutdown(State(s): State<Arc<Shared>>, body: Option<Json<ShutdownRequest>>) -> Response {
    let req = body.map(|Json(b)| b).unwrap_or_default();
    let (history, rx) = s.events.subscribe_with_history();
    let already = s.stop.is_cancelled();
    s.stop.cancel();
    if req.wait {
        // Joining a stop already under way: what it has done so far comes first (from
        // its `shutting_down`), so the save it made is reported, not lost.
        let from = history
            .iter()
            .rposition(|e| {
                matches!(
                    e.kind,
                    EventKind::Lifecycle {
                        state: Lifecycle::ShuttingDown
                    }
                )
            })
            .filter(|_| already)
            .unwrap_or(history.len());
        event_stream_with(
            history[from..].to_vec(),
            rx,
            true,
            s.exit.clone(),
            StreamGuard::new(&s.open_streams),
        )
        .into_response()
    } else {
        let message = if already {
            "the stop sequence is already running"
        } else {
            "stop sequence started"
        };
        Json(ActionReply {
            ok: true,
            message: message.into(),
        })
        .into_response()
    }
}

/// Save now, or join the save already running: stream `started`, each repository's
/// outcome as it lands, then all of them. During the stop sequence the request follows
/// the stop's own save (waiting for it to begin, or reporting it when it has ended):
/// this is what the Coder agent's `shutdown_script` runs, after wsagent saved.
///
/// For a caller other than root (`daemon.api_user`), the repository `--repo` names must
/// be one that caller can read, and a save of it (or a dry run, which shows files) is
/// done with the caller's permissions: the API never reads a repository for a user who
/// could not read it.
async fn save(
    State(s): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    body: Option<Json<agent_proto::local::SaveRequest>>,
) -> Response {
    let req = body.map(|Json(b)| b).unwrap_or_default();
    let Some(caller) = peer.caller.filter(|c| c.is_limited()).map(|c| (*c).clone()) else {
        return save_as(s, req, None).await;
    };
    let mut req = req;
    if let Some(repo) = &req.repo {
        let (c, path, home) = (caller.clone(), PathBuf::from(repo), s.home.clone());
        let checked = tokio::task::spawn_blocking(move || {
            crate::save::fsids::prepare_for_root(&home);
            caller::readable_repo(&c, &path)
        })
        .await;
        match checked {
            // The checked repository itself, not a path that may change under it.
            Ok(Ok(Some(top))) => req.repo = Some(top.display().to_string()),
            Ok(Ok(None)) => {}
            Ok(Err(denied)) => {
                tracing::warn!(error = %denied, "save refused");
                return err(StatusCode::FORBIDDEN, denied.to_string());
            }
            Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
    let act_as = (req.repo.is_some() || req.dry_run).then(|| caller.ids());
    save_as(s, req, act_as).await
}

async fn save_as(
    s: Arc<Shared>,
    req: agent_proto::local::SaveRequest,
    act_as: Option<crate::save::fsids::Ids>,
) -> Response {
    use agent_proto::local::SaveLine;
    let only = req.repo.map(PathBuf::from);
    let budget = s.config.read().expect("lock").config.shutdown.budget;
    let (run, joined) = if s.stop.is_cancelled() {
        if req.dry_run {
            return err(
                StatusCode::CONFLICT,
                "the stop sequence is running: it saves the work itself (no dry run now)",
            );
        }
        // The stop sequence's save begins after its pre_stop phase.
        let mut rx = s.stop_save.subscribe();
        let begun = tokio::time::timeout(budget, rx.wait_for(|r| r.is_some())).await;
        match begun {
            Ok(Ok(r)) => (r.clone().expect("checked"), true),
            _ => {
                return err(
                    StatusCode::CONFLICT,
                    "the stop sequence is running and has not saved: see `wsagent status`",
                );
            }
        }
    } else {
        s.start_save_as(
            crate::save::Reason::Manual,
            only.clone(),
            req.dry_run,
            act_as,
            tokio::time::Instant::now() + budget,
        )
    };
    let reason = run.reason.as_str().to_string();
    let line = |l: &SaveLine| {
        let mut v = serde_json::to_vec(l).unwrap_or_default();
        v.push(b'\n');
        Ok::<Bytes, Infallible>(Bytes::from(v))
    };
    let one = only.is_some();
    let mine = move |o: &agent_proto::save::RepoOutcome| {
        only.as_deref().is_none_or(|p| crate::saverun::is_of(o, p))
    };
    struct Cursor {
        rx: tokio::sync::watch::Receiver<crate::saverun::Progress>,
        started: bool,
        sent: usize,
        ended: bool,
    }
    let cursor = Cursor {
        rx: run.subscribe(),
        started: false,
        sent: 0,
        ended: false,
    };
    // Keep the run alive as long as the stream.
    let stream = futures::stream::unfold((cursor, run), move |(mut c, run)| {
        let (reason, mine) = (reason.clone(), mine.clone());
        async move {
            if c.ended {
                return None;
            }
            loop {
                let (item, ended) = {
                    let p = c.rx.borrow_and_update();
                    let (total, n) = (p.total, p.outcomes.len());
                    if !c.started && total.is_some() {
                        c.started = true;
                        let repos = if one && run.only.is_none() {
                            // One repository asked for, out of a save of all.
                            1
                        } else {
                            total.unwrap_or(0)
                        };
                        (
                            Some(SaveLine::Started {
                                repos,
                                joined,
                                reason: reason.clone(),
                            }),
                            false,
                        )
                    } else if c.started && c.sent < n {
                        let o = p.outcomes[c.sent].clone();
                        c.sent += 1;
                        if !mine(&o) {
                            continue;
                        }
                        (Some(SaveLine::Repo { outcome: o }), false)
                    } else if let Some(done) = &p.done {
                        match done {
                            Ok(all) => (
                                Some(SaveLine::Done {
                                    outcomes: all.iter().filter(|o| mine(o)).cloned().collect(),
                                }),
                                true,
                            ),
                            Err(e) => (
                                Some(SaveLine::Progress {
                                    event: agent_proto::local::Event {
                                        at: crate::events::now_rfc3339(),
                                        level: agent_proto::local::Level::Error,
                                        message: format!("save failed: {e}"),
                                        kind: EventKind::Note,
                                    },
                                }),
                                true,
                            ),
                        }
                    } else {
                        (None, false)
                    }
                };
                if let Some(l) = item {
                    c.ended = ended;
                    return Some((line(&l), (c, run)));
                }
                if c.rx.changed().await.is_err() {
                    return None;
                }
            }
        }
    });
    Body::from_stream(stream).into_response()
}

#[derive(serde::Deserialize)]
struct EventsQuery {
    #[serde(default)]
    replay: bool,
}

async fn events(State(s): State<Arc<Shared>>, Query(q): Query<EventsQuery>) -> Response {
    if q.replay {
        let (history, rx) = s.events.subscribe_with_history();
        event_stream_with(
            history,
            rx,
            false,
            s.exit.clone(),
            StreamGuard::new(&s.open_streams),
        )
        .into_response()
    } else {
        event_stream(
            s.events.subscribe(),
            false,
            s.exit.clone(),
            StreamGuard::new(&s.open_streams),
        )
        .into_response()
    }
}

// ---------------------------------------------------------------------------------
// Client

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the wsagent daemon at {socket}: {source} (is `wsagent run` running? set WSAGENT_SOCKET or --socket)"
    )]
    Unreachable {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Api(String),
    #[error("protocol error talking to {socket}: {message}")]
    Protocol { socket: PathBuf, message: String },
}

pub struct Client {
    pub socket: PathBuf,
}

/// A response whose body can be read whole or line by line.
pub struct Reply {
    pub status: u16,
    body: hyper::body::Incoming,
    buf: Vec<u8>,
    socket: PathBuf,
}

impl Reply {
    pub async fn bytes(mut self) -> Result<Vec<u8>, ClientError> {
        let mut out = std::mem::take(&mut self.buf);
        let collected = self
            .body
            .collect()
            .await
            .map_err(|e| ClientError::Protocol {
                socket: self.socket.clone(),
                message: e.to_string(),
            })?;
        out.extend_from_slice(&collected.to_bytes());
        Ok(out)
    }

    /// The next line of a streamed body (without its newline); `None` at the end.
    pub async fn next_line(&mut self) -> Option<String> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
            }
            match self.body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
                _ => {
                    if self.buf.is_empty() {
                        return None;
                    }
                    let rest = std::mem::take(&mut self.buf);
                    return Some(String::from_utf8_lossy(&rest).into_owned());
                }
            }
        }
    }

    /// Decode a JSON body, turning an [`ApiError`] status into an error.
    pub async fn json<T: serde::de::DeserializeOwned>(self) -> Result<T, ClientError> {
        let status = self.status;
        let socket = self.socket.clone();
        let bytes = self.bytes().await?;
        if !(200..300).contains(&status) {
            let msg = serde_json::from_slice::<ApiError>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)));
            return Err(ClientError::Api(msg));
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
            socket,
            message: format!("bad reply: {e}"),
        })
    }
}

impl Client {
    pub fn new(socket: PathBuf) -> Client {
        Client { socket }
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| ClientError::Unreachable {
                socket: self.socket.clone(),
                source: e,
            })?;
        let proto = |e: &dyn std::fmt::Display| ClientError::Protocol {
            socket: self.socket.clone(),
            message: e.to_string(),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<
            _,
            http_body_util::Full<Bytes>,
        >(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| proto(&e))?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "wsagent")
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(Bytes::from(
                body.unwrap_or_default(),
            )))
            .map_err(|e| proto(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| proto(&e))?;
        Ok(Reply {
            status: resp.status().as_u16(),
            body: resp.into_body(),
            buf: Vec::new(),
            socket: self.socket.clone(),
        })
    }

    pub async fn status(&self) -> Result<Status, ClientError> {
        self.request("GET", "/v1/status", None).await?.json().await
    }

    /// Wait up to `timeout` for the daemon to answer.
    pub async fn wait_reachable(&self, timeout: Duration) -> Result<Status, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.status().await {
                Ok(s) => return Ok(s),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

/// The socket path: `--socket`, config `daemon.socket`/`WSAGENT_SOCKET`, else
/// `/run/wsagent/wsagent.sock` as root, `$XDG_RUNTIME_DIR/wsagent.sock` otherwise.
pub fn socket_path(explicit: Option<PathBuf>, config: Option<&crate::config::Config>) -> PathBuf {
    if let Some(p) = explicit {
        return p;
    }
    if let Some(s) = config.and_then(|c| c.daemon.socket.clone()) {
        return crate::paths::expand_home(&s, &crate::paths::home_dir());
    }
    if let Some(s) = std::env::var_os("WSAGENT_SOCKET") {
        return PathBuf::from(s);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/wsagent/wsagent.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("wsagent.sock"),
        None => std::env::temp_dir().join(format!("wsagent-{}.sock", nix::unistd::geteuid())),
    }
}
