//! wsagent's own log source in the Coder dashboard: events become log lines, queued in
//! memory (bounded, oldest dropped first) and sent in batches with `PATCH /me/logs`.
//!
//! The batching follows Coder's Go `LogSender`: at most 100 lines and 1 MiB (counting
//! 21 bytes of overhead per line) per batch; output sanitized (NUL and invalid UTF-8
//! become "❌") and cut to 1024 characters (what coderd stores of a line; it counts the
//! bytes sent, so sending more would only spend the total).
//!
//! coderd refuses any batch that would take the agent past 1 MiB of log output in
//! total, and that total is shared with the Coder agent's own script logs. So wsagent
//! spends at most `control_plane.log_budget` of it, counting the bytes it sent: when the
//! next line would not fit it sends one last line ([`LIMIT_NOTICE`]) and stops. A 413
//! "Logs limit exceeded" (the total is spent by someone) stops it at once; any other
//! 413 (Coder >= 2.37's "Request body too large.", a proxy's body cap) means the batch
//! was too big: it is split in halves and sent again, and a single line still too big
//! is dropped. Coder before v2.13 has no `POST /me/log-source` (404): the lines then go
//! under the nil source id, Coder's built-in "External" source.
//!
//! Only one batch is in flight at a time (the send lock), and lines leave the queue only
//! once coderd has taken them, so a retry or a flush never reorders or loses lines.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_proto::coder::{self, Log, PatchLogs, PostLogSourceRequest};
use agent_proto::local::{Event, Level};
use reqwest::Method;
use serde::de::IgnoredAny;
use tokio::sync::{Notify, broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Board;
use super::client::{ApiError, Client};
use crate::backoff::Backoff;

/// Lines per batch; a queue this long is sent without waiting for the interval.
pub const MAX_LINES_PER_BATCH: usize = 100;
/// A longer line is cut to this many characters (the last one "…") before it is queued:
/// coderd stores no more of a line.
pub const MAX_LINE_CHARS: usize = 1024;
/// Room kept under the budget for the last line.
const NOTICE_RESERVE: usize = 512;
/// The last line sent when wsagent's log budget is spent.
pub const LIMIT_NOTICE: &str = "wsagent: its dashboard log budget (control_plane.log_budget) is spent; the rest is in `wsagent logs`";
/// The message of coderd's 413 when the agent's log total is spent (any other 413 is
/// about the size of one request).
pub const LOGS_LIMIT_EXCEEDED: &str = "Logs limit exceeded";

/// The stable id of wsagent's log source: UUIDv5 of "wsagent" in the URL namespace.
pub fn source_id() -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_URL, b"wsagent")
}

/// Replace NUL bytes and invalid UTF-8 with "❌" (one per bad byte), as Coder does.
pub fn sanitize(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        let valid = chunk.valid();
        if valid.contains('\0') {
            out.push_str(&valid.replace('\0', "❌"));
        } else {
            out.push_str(valid);
        }
        for _ in chunk.invalid() {
            out.push('❌');
        }
    }
    out
}

/// Cut `s` to at most `max` characters, the last of them "…" when it was cut.
fn truncate(mut s: String, max: usize) -> String {
    let Some((end, _)) = s.char_indices().nth(max.saturating_sub(1)) else {
        return s;
    };
    if s[end..].chars().nth(1).is_none() {
        return s; // exactly `max` characters
    }
    s.truncate(end);
    s.push('…');
    s
}

/// One queued line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub seq: u64,
    pub created_at: String,
    pub level: &'static str,
    pub output: String,
}

/// The bounded in-memory queue of lines not yet taken by coderd.
#[derive(Debug)]
pub struct LogQueue {
    lines: VecDeque<Line>,
    next_seq: u64,
    max_lines: usize,
    /// Lines dropped because the queue was full.
    pub dropped: u64,
}

impl LogQueue {
    pub fn new(max_lines: usize) -> LogQueue {
        LogQueue {
            lines: VecDeque::new(),
            next_seq: 0,
            max_lines: max_lines.max(1),
            dropped: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Queue one event: one line per line of its message, sanitized and cut.
    pub fn push_event(&mut self, ev: &Event) {
        let level = match ev.level {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        };
        for raw in ev.message.split('\n') {
            let raw = raw.strip_suffix('\r').unwrap_or(raw);
            let output = truncate(sanitize(raw.as_bytes()), MAX_LINE_CHARS);
            self.push(Line {
                seq: 0,
                created_at: ev.at.clone(),
                level,
                output,
            });
        }
    }

    fn push(&mut self, mut line: Line) {
        line.seq = self.next_seq;
        self.next_seq += 1;
        if self.lines.len() >= self.max_lines {
            self.lines.pop_front();
            self.dropped += 1;
            crate::metrics::dashboard_dropped(1);
        }
        self.lines.push_back(line);
    }

    /// Forget every line up to and including `seq` (coderd took them).
    pub fn ack(&mut self, seq: u64) {
        while self.lines.front().is_some_and(|l| l.seq <= seq) {
            self.lines.pop_front();
        }
    }

    pub fn clear(&mut self) {
        self.lines.clear();
    }

    /// The next batch to send, given the output bytes coderd already holds from us,
    /// wsagent's budget of them, and the batch size allowed.
    pub fn next_batch(&self, bytes_sent: usize, budget: usize, cap: BatchCap) -> Batch {
        let budget = budget
            .min(coder::MAX_LOGS_LENGTH)
            .saturating_sub(NOTICE_RESERVE);
        let mut b = Batch::default();
        let mut size = 0;
        // Room is kept for the notice, so a batch that ends with it still fits.
        let room = cap
            .bytes
            .min(coder::MAX_BYTES_PER_BATCH)
            .saturating_sub(LIMIT_NOTICE.len() + coder::OVERHEAD_PER_LOG);
        for line in self
            .lines
            .iter()
            .take(cap.lines.clamp(1, MAX_LINES_PER_BATCH))
        {
            let n = line.output.len();
            if bytes_sent + b.output_bytes + n > budget {
                b.limit_notice = true;
                break;
            }
            if !b.logs.is_empty() && size + n + coder::OVERHEAD_PER_LOG > room {
                break;
            }
            size += n + coder::OVERHEAD_PER_LOG;
            b.output_bytes += n;
            b.last_seq = Some(line.seq);
            b.logs.push(Log {
                created_at: line.created_at.clone(),
                output: line.output.clone(),
                level: line.level.into(),
            });
        }
        b.size = size;
        if b.limit_notice {
            b.size += LIMIT_NOTICE.len() + coder::OVERHEAD_PER_LOG;
            b.output_bytes += LIMIT_NOTICE.len();
            b.logs.push(Log {
                created_at: crate::events::now_rfc3339(),
                output: LIMIT_NOTICE.into(),
                level: "warn".into(),
            });
        }
        b
    }
}

/// How big a batch may be: shrunk when coderd (or a proxy) finds a body too large.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchCap {
    pub lines: usize,
    /// Counting [`coder::OVERHEAD_PER_LOG`] per line.
    pub bytes: usize,
}

impl Default for BatchCap {
    fn default() -> Self {
        BatchCap {
            lines: MAX_LINES_PER_BATCH,
            bytes: coder::MAX_BYTES_PER_BATCH,
        }
    }
}

/// One `PATCH /me/logs` worth of lines.
#[derive(Debug, Default)]
pub struct Batch {
    pub logs: Vec<Log>,
    /// The seq of the last queued line in it.
    pub last_seq: Option<u64>,
    pub output_bytes: usize,
    /// Output plus [`coder::OVERHEAD_PER_LOG`] per line.
    pub size: usize,
    /// The batch ends with [`LIMIT_NOTICE`]: nothing is sent after it.
    pub limit_notice: bool,
}

/// What the send lock protects.
#[derive(Debug, Default)]
pub struct SendState {
    /// The log source the lines go under, once registered (nil: "External").
    source: Option<Uuid>,
    /// Output bytes coderd accepted from us.
    pub bytes_sent: usize,
    /// Shrunk by each 413 that is about the body's size; kept for the rest of the run.
    pub cap: BatchCap,
    /// One-line batches refused with such a 413 in a row.
    oversize_lines: u32,
}

/// One-line batches refused in a row (413, not the log limit) before shipping stops: a
/// server that takes no line at all is not refusing a size.
const MAX_OVERSIZE_LINES: u32 = 3;

/// Ships the queue to coderd.
pub struct Shipper {
    client: Client,
    board: Arc<Mutex<Board>>,
    queue: Mutex<LogQueue>,
    send: tokio::sync::Mutex<SendState>,
    /// Set for good once sending is over (limit reached, 413, or refused source).
    stopped: AtomicBool,
    wake: Notify,
    interval: Duration,
    /// `control_plane.log_budget`.
    budget: usize,
    /// Batches sent (for tests and status).
    pub batches: AtomicU64,
}

/// How one send step ended.
enum Step {
    /// Sent (or dropped) a batch; there may be more.
    Progress,
    /// Nothing (more) to send.
    Idle,
}

impl Shipper {
    pub fn new(
        client: Client,
        board: Arc<Mutex<Board>>,
        max_lines: usize,
        interval: Duration,
        budget: usize,
    ) -> Shipper {
        Shipper {
            client,
            board,
            queue: Mutex::new(LogQueue::new(max_lines)),
            send: tokio::sync::Mutex::new(SendState::default()),
            stopped: AtomicBool::new(false),
            wake: Notify::new(),
            interval,
            budget,
            batches: AtomicU64::new(0),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, LogQueue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn board(&self) -> std::sync::MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, ev: &Event) {
        if self.stopped.load(Ordering::Relaxed) {
            return;
        }
        let dropped = {
            let mut q = self.queue();
            q.push_event(ev);
            q.dropped
        };
        self.board().dropped_lines = dropped;
        self.wake.notify_one();
    }

    fn count_lagged(&self, n: u64) {
        crate::metrics::dashboard_dropped(n);
        let mut q = self.queue();
        q.dropped += n;
        let d = q.dropped;
        drop(q);
        self.board().dropped_lines = d;
    }

    fn stop(&self, why: &str) {
        self.stopped.store(true, Ordering::Relaxed);
        self.queue().clear();
        self.board().logs = Some(why.to_string());
    }

    /// Register the source if needed, then send the next batch. `timeout` bounds each
    /// call. Retryable failures come back as `Err`; the rest are handled here.
    async fn step(&self, st: &mut SendState, timeout: Duration) -> Result<Step, ApiError> {
        if self.stopped.load(Ordering::Relaxed) {
            return Ok(Step::Idle);
        }
        let source = match st.source {
            Some(id) => id,
            None => {
                let id = self.register(timeout).await?;
                let Some(id) = id else {
                    return Ok(Step::Idle);
                };
                st.source = Some(id);
                id
            }
        };
        let batch = self.queue().next_batch(st.bytes_sent, self.budget, st.cap);
        if batch.logs.is_empty() {
            return Ok(Step::Idle);
        }
        let body = PatchLogs {
            log_source_id: source,
            logs: batch.logs,
        };
        let r = self
            .client
            .call::<_, IgnoredAny>(Method::PATCH, "/logs", &[], Some(&body), timeout)
            .await;
        match r {
            Ok(_) => {
                self.batches.fetch_add(1, Ordering::Relaxed);
                crate::metrics::dashboard_sent(body.logs.len() as u64);
                st.oversize_lines = 0;
                st.bytes_sent += batch.output_bytes;
                if let Some(seq) = batch.last_seq {
                    self.queue().ack(seq);
                }
                if batch.limit_notice {
                    tracing::warn!(
                        bytes = st.bytes_sent,
                        "dashboard log budget spent (control_plane.log_budget); further lines stay in `wsagent logs`"
                    );
                    self.stop("logs limit reached");
                }
                Ok(Step::Progress)
            }
            Err(ApiError::Status {
                status: 413,
                message,
                ..
            }) if message.starts_with(LOGS_LIMIT_EXCEEDED) => {
                tracing::warn!(
                    "coderd's log limit for this agent is exceeded (its total is shared with the coder agent's script logs); no more lines are sent"
                );
                self.stop("logs limit reached");
                Ok(Step::Idle)
            }
            Err(e) if e.status() == Some(413) => {
                let n = body.logs.len();
                if n > 1 {
                    st.cap = BatchCap {
                        lines: n / 2,
                        bytes: (batch.size / 2).max(1),
                    };
                    tracing::info!(error = %e, lines = n, "log batch too large for coderd; sending it in halves");
                } else {
                    tracing::warn!(error = %e, "one log line too large for coderd; dropped");
                    crate::metrics::dashboard_dropped(1);
                    if let Some(seq) = batch.last_seq {
                        self.queue().ack(seq);
                    }
                    st.oversize_lines += 1;
                    if st.oversize_lines >= MAX_OVERSIZE_LINES {
                        tracing::warn!(
                            "coderd answers 413 to single lines; no more lines are sent"
                        );
                        self.stop(&format!("logs not sent: {e}"));
                        return Ok(Step::Idle);
                    }
                    if batch.limit_notice {
                        self.stop("logs limit reached");
                    }
                }
                Ok(Step::Progress)
            }
            Err(e) if e.refused() => {
                self.stop("logs not sent: the token was refused at stop");
                Ok(Step::Idle)
            }
            Err(e) if e.retryable() => Err(e),
            Err(e) => {
                self.board().rejected(&e);
                tracing::warn!(error = %e, lines = body.logs.len(), "coderd refused a log batch; dropped");
                crate::metrics::dashboard_dropped(body.logs.len() as u64);
                if let Some(seq) = batch.last_seq {
                    self.queue().ack(seq);
                }
                Ok(Step::Progress)
            }
        }
    }

    /// `POST /me/log-source`: the source id to send under; `None` when logs are off for
    /// good. Coder before v2.13 has no such route: the nil id ("External") is used.
    async fn register(&self, timeout: Duration) -> Result<Option<Uuid>, ApiError> {
        let body = PostLogSourceRequest {
            id: source_id(),
            display_name: "wsagent".into(),
            icon: "/icon/terminal.svg".into(),
        };
        match self
            .client
            .call::<_, IgnoredAny>(Method::POST, "/log-source", &[], Some(&body), timeout)
            .await
        {
            Ok(_) => Ok(Some(source_id())),
            Err(e) if e.status() == Some(404) => {
                tracing::info!(
                    "coderd has no log-source route (Coder before v2.13); wsagent's lines go to the built-in \"External\" source"
                );
                Ok(Some(Uuid::nil()))
            }
            Err(e) if e.refused() => {
                self.stop("logs not sent: the token was refused at stop");
                Ok(None)
            }
            Err(e) if e.retryable() => Err(e),
            Err(e) => {
                self.board().rejected(&e);
                tracing::warn!(error = %e, "coderd refused wsagent's log source; logs stay local");
                self.stop(&format!("logs not sent: {e}"));
                Ok(None)
            }
        }
    }

    /// The background sender: register at once, then send whenever lines are queued
    /// (after the batch interval, or at once with a full batch), retrying with backoff.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        let mut first = true;
        loop {
            if !first {
                // Wait for a line, then for the batch window.
                while self.queue().is_empty() || self.stopped.load(Ordering::Relaxed) {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = self.wake.notified() => {}
                    }
                }
                let window = Instant::now() + self.interval;
                while self.queue().len() < MAX_LINES_PER_BATCH {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep_until(window) => break,
                    }
                }
            }
            first = false;
            loop {
                let r = {
                    let mut st = self.send.lock().await;
                    self.step(&mut st, self.client.timeout).await
                };
                match r {
                    Ok(Step::Progress) => {
                        backoff.reset();
                        self.board().reached(true, None);
                    }
                    Ok(Step::Idle) => {
                        backoff.reset();
                        break;
                    }
                    Err(e) => {
                        let delay = retry_delay(&e, &mut backoff);
                        tracing::debug!(error = %e, ?delay, "log batch not delivered; retrying");
                        self.board().reached(false, Some(e.to_string()));
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
        }
    }

    /// Deliver what is queued, giving up at `deadline`.
    pub async fn flush(&self, deadline: Instant) {
        let Ok(mut st) = tokio::time::timeout_at(deadline, self.send.lock()).await else {
            return;
        };
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let timeout = left.min(self.client.timeout);
            match tokio::time::timeout_at(deadline, self.step(&mut st, timeout)).await {
                Err(_) => return,
                Ok(Ok(Step::Idle)) => return,
                Ok(Ok(Step::Progress)) => self.board().reached(true, None),
                Ok(Err(e)) => {
                    self.board().reached(false, Some(e.to_string()));
                    let delay = retry_delay(&e, &mut backoff);
                    if Instant::now() + delay >= deadline {
                        return;
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

fn retry_delay(e: &ApiError, backoff: &mut Backoff) -> Duration {
    e.retry_after().unwrap_or_else(|| backoff.next_delay())
}

/// Moves events from the broadcast into the queue; on request, drains what is pending
/// right now (so a flush sees every event emitted before it).
pub async fn pump(
    shipper: Arc<Shipper>,
    mut rx: broadcast::Receiver<Event>,
    mut drain: mpsc::Receiver<oneshot::Sender<()>>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                // Keep what was emitted before the cancel, for a flush that follows it.
                while let Ok(ev) = rx.try_recv() {
                    shipper.push(&ev);
                }
                return;
            }
            req = drain.recv() => {
                let Some(ack) = req else { return };
                loop {
                    match rx.try_recv() {
                        Ok(ev) => shipper.push(&ev),
                        Err(broadcast::error::TryRecvError::Lagged(n)) => shipper.count_lagged(n),
                        Err(_) => break,
                    }
                }
                let _ = ack.send(());
            }
            ev = rx.recv() => match ev {
                Ok(ev) => shipper.push(&ev),
                Err(broadcast::error::RecvError::Lagged(n)) => shipper.count_lagged(n),
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_proto::local::EventKind;

    const BUDGET: usize = coder::MAX_LOGS_LENGTH;

    fn ev(level: Level, message: &str) -> Event {
        Event {
            at: "2026-01-01T00:00:00Z".into(),
            level,
            message: message.into(),
            kind: EventKind::Note,
        }
    }

    #[test]
    fn nul_and_invalid_utf8_become_a_cross() {
        assert_eq!(sanitize(b"ok"), "ok");
        assert_eq!(sanitize(b"a\0b"), "a❌b");
        assert_eq!(sanitize(b"a\xffb\xfe"), "a❌b❌");
        assert_eq!(sanitize("é✓".as_bytes()), "é✓");
    }

    #[test]
    fn multi_line_messages_become_lines_with_their_level() {
        let mut q = LogQueue::new(10);
        q.push_event(&ev(Level::Warn, "one\r\ntwo"));
        let b = q.next_batch(0, BUDGET, BatchCap::default());
        let got: Vec<_> = b
            .logs
            .iter()
            .map(|l| (l.output.as_str(), l.level.as_str()))
            .collect();
        assert_eq!(got, [("one", "warn"), ("two", "warn")]);
        assert_eq!(b.last_seq, Some(1));
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts() {
        let mut q = LogQueue::new(3);
        for i in 0..5 {
            q.push_event(&ev(Level::Info, &i.to_string()));
        }
        assert_eq!(q.dropped, 2);
        let outs: Vec<_> = q
            .next_batch(0, BUDGET, BatchCap::default())
            .logs
            .into_iter()
            .map(|l| l.output)
            .collect();
        assert_eq!(outs, ["2", "3", "4"]);
        q.ack(3);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn batches_hold_at_most_100_lines_and_1_mib_with_overhead() {
        let mut q = LogQueue::new(1000);
        for _ in 0..150 {
            q.push_event(&ev(Level::Info, "x"));
        }
        assert_eq!(q.next_batch(0, BUDGET, BatchCap::default()).logs.len(), 100);

        // 100 lines of 1024 four-byte characters: 400 KiB of output, under 1 MiB.
        let mut q = LogQueue::new(1000);
        let big = "𝄞".repeat(MAX_LINE_CHARS);
        for _ in 0..100 {
            q.push_event(&ev(Level::Info, &big));
        }
        let b = q.next_batch(0, BUDGET, BatchCap::default());
        assert_eq!(b.logs.len(), 100);
        assert_eq!(b.size, 100 * (4096 + 21));
        // A smaller byte cap (after a 413 "Request body too large.") ends it sooner, and
        // a budget ends it with the notice.
        let cap = BatchCap {
            lines: 100,
            bytes: 3 * 4117 + LIMIT_NOTICE.len() + 21,
        };
        assert_eq!(q.next_batch(0, BUDGET, cap).logs.len(), 3);
        let tiny = BatchCap { lines: 1, bytes: 1 };
        assert_eq!(
            q.next_batch(0, BUDGET, tiny).logs.len(),
            1,
            "one line always goes"
        );
        let b = q.next_batch(0, 512 + 2 * 4096, BatchCap::default());
        let outs: Vec<_> = b.logs.iter().map(|l| l.output.len()).collect();
        assert_eq!(outs, [4096, 4096, LIMIT_NOTICE.len()]);
        assert!(b.limit_notice);
    }

    #[test]
    fn near_the_agent_limit_the_last_line_points_at_wsagent_logs() {
        let mut q = LogQueue::new(10);
        q.push_event(&ev(Level::Info, "fits"));
        q.push_event(&ev(Level::Info, &"z".repeat(1000)));
        q.push_event(&ev(Level::Info, "never"));
        let sent = coder::MAX_LOGS_LENGTH - NOTICE_RESERVE - 10;
        let b = q.next_batch(sent, BUDGET, BatchCap::default());
        let outs: Vec<_> = b.logs.iter().map(|l| l.output.as_str()).collect();
        assert_eq!(outs, ["fits", LIMIT_NOTICE]);
        assert!(b.limit_notice);
        assert!(sent + b.output_bytes <= coder::MAX_LOGS_LENGTH);
        // A budget over Coder's total counts as the total.
        let b = q.next_batch(sent, 4 * BUDGET, BatchCap::default());
        assert!(b.limit_notice);
    }

    #[test]
    fn long_lines_are_cut_to_1024_characters() {
        let s = truncate("é".repeat(10), 7);
        assert_eq!(s, format!("{}…", "é".repeat(6)));
        assert_eq!(truncate("abc".into(), 3), "abc");
        let mut q = LogQueue::new(10);
        q.push_event(&ev(Level::Info, &"é".repeat(5000)));
        let out = &q.next_batch(0, BUDGET, BatchCap::default()).logs[0].output;
        assert_eq!(out.chars().count(), MAX_LINE_CHARS);
        assert!(out.ends_with('…'));
    }
}
