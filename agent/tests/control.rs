//! The control plane against a fake coderd that follows the agent API reference: what
//! reaches the dashboard, what survives an outage, the log limit, the git token cache,
//! app status, standalone mode, and that the agent token leaks nowhere.
//!
//! Every test runs on a current-thread runtime, so the tracing subscriber installed by
//! [`Setup`] captures every line the module logs. No fixed sleeps: conditions are polled
//! with a timeout.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent::config::Config;
use agent::control::{self, ControlHandle, ControlPlane, logs::LIMIT_NOTICE};
use agent::events::Events;
use agent_proto::coder::MAX_LOGS_LENGTH;
use agent_proto::local::Level;
use integration::fake_coderd::{FakeCoderd, Fault};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const WAIT: Duration = Duration::from_secs(10);

/// Captured log output of the module.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

struct Setup {
    home: tempfile::TempDir,
    cfg: Config,
    events: Events,
    tracker: TaskTracker,
    cancel: CancellationToken,
    logs: Capture,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Setup {
    fn new() -> Setup {
        let logs = Capture::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        let mut cfg = Config {
            git_providers: agent::tokens::default_providers(),
            ..Config::default()
        };
        cfg.control_plane.log_batch_interval = Duration::from_millis(50);
        cfg.control_plane.request_timeout = Duration::from_secs(2);
        Setup {
            home: tempfile::tempdir().unwrap(),
            cfg,
            events: Events::new(),
            tracker: TaskTracker::new(),
            cancel: CancellationToken::new(),
            logs,
            _guard: guard,
        }
    }

    fn env(fake: &FakeCoderd) -> HashMap<String, String> {
        HashMap::from([
            ("CODER_AGENT_URL".to_string(), fake.url()),
            ("CODER_AGENT_TOKEN".to_string(), fake.token()),
        ])
    }

    fn start(&self, env: &HashMap<String, String>) -> ControlHandle {
        ControlPlane::new(&self.cfg, env, self.home.path().to_path_buf()).start(
            &self.events,
            &self.tracker,
            self.cancel.clone(),
        )
    }

    fn cache(&self) -> std::path::PathBuf {
        self.home.path().join(".cache/coder/github_token")
    }

    /// The agent token appears in no captured log line, no file under HOME, and nowhere
    /// in what coderd received but the session header.
    fn assert_token_kept_secret(&self, fake: &FakeCoderd) {
        let token = fake.token();
        assert!(!self.logs.text().contains(&token), "token in logs");
        assert_no_file_contains(self.home.path(), &token);
        for r in fake.requests() {
            assert!(
                !String::from_utf8_lossy(&r.body).contains(&token),
                "token in a body"
            );
            assert!(!r.query.contains(&token), "token in a query");
            for (k, v) in &r.headers {
                if !k.eq_ignore_ascii_case("coder-session-token") {
                    assert!(!v.contains(&token), "token in header {k}");
                }
            }
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        assert!(
            tokio::time::timeout(WAIT, self.tracker.wait())
                .await
                .is_ok(),
            "control-plane tasks did not end on cancel"
        );
    }
}

fn assert_no_file_contains(dir: &Path, needle: &str) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            assert_no_file_contains(&p, needle);
        } else if let Ok(bytes) = std::fs::read(&p) {
            assert!(
                !String::from_utf8_lossy(&bytes).contains(needle),
                "token in {}",
                p.display()
            );
        }
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What the dashboard shows of wsagent's own lines (without the sign-in notes of the
/// fake's unlinked github account, which the refresh loop adds).
fn dashboard(fake: &FakeCoderd) -> Vec<String> {
    fake.logs()
        .into_iter()
        .map(|l| l.output)
        .filter(|o| !o.contains("is not linked"))
        .collect()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn lines_arrive_in_order_under_wsagents_log_source() {
    let fake = FakeCoderd::start().await;
    let s = Setup::new();
    let h = s.start(&Setup::env(&fake));
    let levels = [
        Level::Trace,
        Level::Debug,
        Level::Info,
        Level::Warn,
        Level::Error,
    ];
    for i in 0..250 {
        s.events.note(levels[i % 5], format!("line {i}"));
    }
    fake.wait_for(WAIT, |f| dashboard(f).len() >= 250).await;
    let want: Vec<_> = (0..250).map(|i| format!("line {i}")).collect();
    assert_eq!(dashboard(&fake), want);
    let logs: Vec<_> = fake
        .logs()
        .into_iter()
        .filter(|l| l.output.starts_with("line "))
        .collect();
    assert!(
        logs.iter()
            .all(|l| l.log_source_id == control::logs::source_id())
    );
    let got_levels: Vec<_> = logs.iter().take(5).map(|l| l.level.as_str()).collect();
    assert_eq!(got_levels, ["trace", "debug", "info", "warn", "error"]);

    let sources = fake.log_sources();
    assert_eq!(sources.len(), 1);
    assert_eq!(sources[0].display_name, "wsagent");
    assert_eq!(sources[0].id, control::logs::source_id());
    let reqs = fake.requests();
    let first = |suffix: &str| reqs.iter().position(|r| r.path.ends_with(suffix)).unwrap();
    assert!(first("/me/log-source") < first("/me/logs"));
    assert!(
        reqs.iter()
            .all(|r| r.header("coder-session-token") == Some(&fake.token()))
    );
    for r in fake.requests_to("/me/logs") {
        let n = r.body_json().unwrap()["logs"].as_array().unwrap().len();
        assert!((1..=100).contains(&n), "batch of {n}");
    }
    assert!(h.status().starts_with("connected"), "{}", h.status());
    s.assert_token_kept_secret(&fake);
    s.stop().await;
}

#[tokio::test]
async fn lines_queued_while_coderd_is_down_are_delivered_once_it_is_up() {
    let fake = FakeCoderd::start_down().await;
    let s = Setup::new();
    let h = s.start(&Setup::env(&fake));
    for i in 0..3 {
        s.events.note(Level::Info, format!("early {i}"));
    }
    eventually("unreachable status", || {
        h.status().starts_with("unreachable")
    })
    .await;
    assert!(
        h.status().contains("/api/v2/workspaceagents/me/"),
        "{}",
        h.status()
    );
    fake.set_down(false).await;
    fake.wait_for(WAIT, |f| dashboard(f).len() >= 3).await;
    assert_eq!(dashboard(&fake), ["early 0", "early 1", "early 2"]);
    eventually("connected status", || h.status().starts_with("connected")).await;
    s.assert_token_kept_secret(&fake);
    s.stop().await;
}

#[tokio::test]
async fn a_413_stops_sending_and_the_request_count_stays_flat() {
    let fake = FakeCoderd::start().await;
    // Other sources of this agent already used nearly all of its 1 MiB.
    fake.set_logs_length(MAX_LOGS_LENGTH - 10);
    let s = Setup::new();
    let h = s.start(&Setup::env(&fake));
    s.events.note(Level::Info, "x".repeat(100));
    eventually("limit status", || h.status().contains("logs limit reached")).await;
    assert!(fake.logs_overflowed());
    let sent = fake.requests_to("/me/logs").len();
    assert_eq!(sent, 1);
    for i in 0..20 {
        s.events.note(Level::Info, format!("after {i}"));
    }
    h.flush(Instant::now() + Duration::from_secs(1)).await;
    assert_eq!(fake.requests_to("/me/logs").len(), sent);
    assert!(dashboard(&fake).is_empty());
    s.stop().await;
}

/// wsagent spends at most `control_plane.log_budget` bytes of the agent's shared log
/// total: the last line it sends says the budget is spent, and nothing follows it.
#[tokio::test]
async fn the_log_budget_ends_with_one_last_line_and_then_nothing() {
    let fake = FakeCoderd::start().await;
    let mut s = Setup::new();
    s.cfg.control_plane.log_budget = 16 * 1024;
    // Linked: no sign-in line joins wsagent's own.
    fake.set_external_token("github", Some("ghp_budget_linked_0001"));
    let h = s.start(&Setup::env(&fake));
    for i in 0..40 {
        s.events
            .note(Level::Info, format!("{i:04} {}", "y".repeat(995)));
    }
    eventually("limit status", || h.status().contains("logs limit reached")).await;
    let logs = dashboard(&fake);
    assert_eq!(logs.last().unwrap(), LIMIT_NOTICE);
    assert_eq!(logs.iter().filter(|l| *l == LIMIT_NOTICE).count(), 1);
    assert!(logs.len() > 10, "{} lines", logs.len());
    assert!(
        !fake.logs_overflowed(),
        "the local count must keep us under the limit"
    );
    assert!(
        fake.logs_length() <= 16 * 1024,
        "{} bytes spent",
        fake.logs_length()
    );
    let before = fake.requests_to("/me/logs").len();
    s.events.note(Level::Info, "more");
    h.flush(Instant::now() + Duration::from_millis(500)).await;
    assert_eq!(fake.requests_to("/me/logs").len(), before);
    s.stop().await;
}

/// Each line is cut to 1024 characters (what coderd stores) before it is sent, so the
/// bytes coderd counts against the total are only those it keeps.
#[tokio::test]
async fn a_long_line_is_cut_to_1024_characters_before_it_is_sent() {
    let fake = FakeCoderd::start().await;
    let s = Setup::new();
    let _h = s.start(&Setup::env(&fake));
    s.events.note(Level::Info, "é".repeat(5000));
    fake.wait_for(WAIT, |f| !dashboard(f).is_empty()).await;
    let sent = fake.requests_to("/me/logs")[0].body_json().unwrap()["logs"][0]["output"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(sent.chars().count(), 1024);
    assert!(sent.ends_with('…'));
    assert_eq!(dashboard(&fake), [sent]);
    let bytes_sent: usize = fake
        .requests_to("/me/logs")
        .iter()
        .flat_map(|r| r.body_json().unwrap()["logs"].as_array().unwrap().clone())
        .map(|l| l["output"].as_str().unwrap().len())
        .sum();
    assert_eq!(fake.logs_length(), bytes_sent);
    s.stop().await;
}

/// A 413 that is not "Logs limit exceeded" (Coder >= 2.37's "Request body too large.")
/// splits the batch and sends it again: every line arrives, in order, and shipping
/// goes on; a single line too large for the cap is dropped alone.
#[tokio::test]
async fn a_413_body_too_large_splits_the_batch_and_everything_arrives() {
    let fake = FakeCoderd::start().await;
    fake.set_max_body(Some(20_000));
    fake.set_external_token("github", Some("ghp_split_linked_0002"));
    let s = Setup::new();
    let h = s.start(&Setup::env(&fake));
    fake.wait_for(WAIT, |f| !f.log_sources().is_empty()).await;
    let want: Vec<_> = (0..100)
        .map(|i| format!("{i:03} {}", "z".repeat(900)))
        .collect();
    for l in &want {
        s.events.note(Level::Info, l.clone());
    }
    fake.wait_for(WAIT, |f| dashboard(f).len() >= 100).await;
    assert_eq!(dashboard(&fake), want);
    let statuses: Vec<u16> = fake
        .requests_to("/me/logs")
        .iter()
        .map(|r| r.status)
        .collect();
    assert!(statuses.contains(&413), "{statuses:?}");
    assert!(
        fake.requests_to("/me/logs")
            .iter()
            .all(|r| r.status != 413 || r.body.len() > 20_000)
    );
    assert!(!h.status().contains("limit"), "{}", h.status());

    // One line bigger than the cap on its own: dropped, the next one still goes.
    fake.set_max_body(Some(600));
    s.events.note(Level::Info, "w".repeat(1000));
    s.events.note(Level::Info, "small after big");
    fake.wait_for(WAIT, |f| dashboard(f).len() >= 101).await;
    assert_eq!(dashboard(&fake)[100], "small after big");
    assert!(
        s.logs.text().contains("one log line too large"),
        "{}",
        s.logs.text()
    );

    // A server answering 413 to every line is not refusing a size: after three single
    // lines refused in a row, shipping stops instead of trying each line.
    fake.set_fault(Some(Fault::Status(413)));
    let before = fake.requests_to("/me/logs").len();
    for i in 0..50 {
        s.events.note(Level::Info, format!("refused {i}"));
    }
    eventually("shipping stopped", || h.status().contains("logs not sent")).await;
    let tried = fake.requests_to("/me/logs").len() - before;
    assert!(tried <= 12, "{tried} requests for 50 lines");
    s.stop().await;
}

/// Coder before v2.13 has no `POST /me/log-source` (404): the lines go under the nil
/// source id, Coder's built-in "External" source, and keep arriving.
#[tokio::test]
async fn without_the_log_source_route_lines_go_to_the_external_source() {
    let fake = FakeCoderd::start().await;
    fake.set_log_source_404(true);
    let s = Setup::new();
    let h = s.start(&Setup::env(&fake));
    for i in 0..3 {
        s.events.note(Level::Info, format!("old coder {i}"));
    }
    fake.wait_for(WAIT, |f| dashboard(f).len() >= 3).await;
    assert_eq!(
        dashboard(&fake),
        ["old coder 0", "old coder 1", "old coder 2"]
    );
    assert!(
        fake.logs()
            .iter()
            .all(|l| l.log_source_id == agent_proto::coder::EXTERNAL_LOG_SOURCE_ID)
    );
    assert!(
        fake.requests_to("/me/logs")
            .iter()
            .all(|r| r.body_json().unwrap()["log_source_id"] == uuid::Uuid::nil().to_string())
    );
    assert_eq!(fake.requests_to("/me/log-source").len(), 1);
    assert_eq!(s.logs.text().matches("before v2.13").count(), 1);
    assert!(h.status().starts_with("connected"), "{}", h.status());
    s.stop().await;
}

/// Once stopping, a 401 or 403 from coderd is expected: it is logged once, and no call
/// is made after it (log lines, app status, token fetches): nothing retries or waits.
#[tokio::test]
async fn at_stop_a_refused_token_is_said_once_and_nothing_is_sent_after_it() {
    for refusal in [401, 403] {
        let fake = FakeCoderd::start().await;
        fake.set_external_token("github", Some("ghp_stop_linked_0003"));
        let mut s = Setup::new();
        s.cfg.control_plane.app_status_slug = Some("workspace".into());
        let h = s.start(&Setup::env(&fake));
        s.events.note(Level::Info, "before the stop");
        fake.wait_for(WAIT, |f| dashboard(f).len() == 1).await;
        h.refresh_tokens_once(Duration::from_secs(2)).await;

        fake.wait_for(WAIT, |f| f.app_statuses().len() == 1).await;
        h.stopping();
        match refusal {
            401 => fake.revoke_agent_tokens(),
            _ => fake.set_fault(Some(Fault::Status(403))),
        }
        let before = fake.requests().len();
        let t0 = Instant::now();
        h.app_status("complete", "stopping").await;
        for i in 0..300 {
            s.events.note(Level::Info, format!("stopping {i}"));
        }
        assert!((h.fresh_fetch())("github".into()).await.is_none());
        h.refresh_tokens_once(Duration::from_secs(5)).await;
        h.flush(Instant::now() + Duration::from_secs(5)).await;
        h.app_status("failure", "still stopping").await;
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(2), "{refusal}: took {took:?}");
        let after: Vec<_> = fake.requests()[before..].to_vec();
        assert_eq!(
            after.len(),
            1,
            "{refusal}: {:?}",
            after
                .iter()
                .map(|r| (&r.path, r.status))
                .collect::<Vec<_>>()
        );
        assert_eq!(after[0].status, refusal);
        let text = s.logs.text();
        assert_eq!(
            text.matches(control::client::REFUSED_AT_STOP).count(),
            1,
            "{text}"
        );
        assert!(!text.contains("git token not refreshed"), "{text}");
        assert!(!text.contains("app status not reported"), "{text}");
        assert_eq!(
            std::fs::read_to_string(s.cache()).unwrap(),
            "ghp_stop_linked_0003"
        );
        s.assert_token_kept_secret(&fake);
        s.stop().await;
    }
}

/// A token with an `expires_at` is refreshed ahead of its expiry (at 80 % of what is
/// left, at least 5 s apart), not after the fixed refresh interval.
#[tokio::test]
async fn a_token_about_to_expire_is_refreshed_ahead_of_its_expiry() {
    let fake = FakeCoderd::start().await;
    fake.set_external_token("github", Some("ghp_expiring_soon_0004"));
    let soon = std::time::SystemTime::now() + Duration::from_secs(6);
    fake.set_external_token_expiry(
        "github",
        Some(&humantime::format_rfc3339_seconds(soon).to_string()),
    );
    let mut s = Setup::new();
    s.cfg.control_plane.send_logs = false;
    // Without the expiry the next refresh would be an hour away.
    s.cfg
        .git_providers
        .get_mut("github")
        .unwrap()
        .refresh_interval = Duration::from_secs(3600);
    let _h = s.start(&Setup::env(&fake));
    let cache = s.cache();
    eventually("first token cached", || {
        std::fs::read_to_string(&cache).is_ok_and(|t| t == "ghp_expiring_soon_0004")
    })
    .await;
    let t0 = Instant::now();
    fake.set_external_token("github", Some("ghp_refreshed_early_0005"));
    fake.set_external_token_expiry("github", Some(agent_proto::coder::ZERO_TIME));
    eventually("the token refreshed before it expires", || {
        std::fs::read_to_string(&cache).is_ok_and(|t| t == "ghp_refreshed_early_0005")
    })
    .await;
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
    let fetches = fake.requests_to("/me/external-auth");
    assert_eq!(fetches.len(), 2, "one scheduled refresh, no retries");
    assert_eq!(fetches[0].query, "id=github&match=");
    s.stop().await;
}

#[tokio::test]
async fn a_rotated_token_replaces_the_cache_file_0600_in_a_0700_dir() {
    let fake = FakeCoderd::start().await;
    fake.set_external_token("github", Some("ghp_rotation_one_111111"));
    let mut s = Setup::new();
    s.cfg
        .git_providers
        .get_mut("github")
        .unwrap()
        .refresh_interval = Duration::from_millis(100);
    let h = s.start(&Setup::env(&fake));
    let cache = s.cache();
    eventually("first token cached", || {
        std::fs::read_to_string(&cache).is_ok_and(|t| t == "ghp_rotation_one_111111")
    })
    .await;
    fake.set_external_token("github", Some("ghp_rotation_two_222222"));
    eventually("rotated token cached", || {
        std::fs::read_to_string(&cache).is_ok_and(|t| t == "ghp_rotation_two_222222")
    })
    .await;
    assert_eq!(mode(&cache), 0o600);
    assert_eq!(mode(cache.parent().unwrap()), 0o700);
    let q = fake.requests_to("/me/external-auth")[0].query.clone();
    assert_eq!(q, "id=github&match=");

    fake.set_external_token("github", Some("ghp_rotation_three_333"));
    let fresh = (h.fresh_fetch())("github".into()).await.unwrap();
    assert_eq!(fresh.expose(), "ghp_rotation_three_333");
    assert_eq!(
        agent::secrets::redact("ghp_rotation_three_333"),
        agent::secrets::MASK
    );
    s.assert_token_kept_secret(&fake);
    s.stop().await;
}

#[tokio::test]
async fn garbage_answers_are_logged_and_nothing_panics() {
    let fake = FakeCoderd::start().await;
    let s = Setup::new();
    let h = s.start(&Setup::env(&fake));
    fake.set_fault(Some(Fault::Html502));
    h.refresh_tokens_once(Duration::from_millis(500)).await;
    eventually("unreachable status", || {
        h.status().starts_with("unreachable")
    })
    .await;
    assert!(s.logs.text().contains("http 502"), "{}", s.logs.text());

    fake.set_fault(Some(Fault::MalformedJson));
    h.refresh_tokens_once(Duration::from_millis(500)).await;
    assert!(
        s.logs.text().contains("malformed answer"),
        "{}",
        s.logs.text()
    );
    assert!(!s.cache().exists());

    fake.set_fault(None);
    fake.set_external_token("github", Some("ghp_after_garbage_4444"));
    h.refresh_tokens_once(Duration::from_secs(2)).await;
    assert_eq!(
        std::fs::read_to_string(s.cache()).unwrap(),
        "ghp_after_garbage_4444"
    );
    s.assert_token_kept_secret(&fake);
    s.stop().await;
}

#[tokio::test]
async fn a_429_waits_for_retry_after_and_other_4xx_are_not_retried() {
    let fake = FakeCoderd::start().await;
    let mut s = Setup::new();
    s.cfg.control_plane.send_logs = false;
    // Only the explicit refreshes below talk to coderd.
    s.cfg
        .git_providers
        .get_mut("github")
        .unwrap()
        .refresh_interval = Duration::from_secs(3600);
    let h = s.start(&Setup::env(&fake));
    fake.wait_for(WAIT, |f| !f.requests().is_empty()).await;
    let base = fake.requests().len();

    fake.set_fault(Some(Fault::Status(400)));
    h.refresh_tokens_once(Duration::from_secs(2)).await;
    assert_eq!(fake.requests().len(), base + 1, "a 400 is not retried");

    fake.set_fault(Some(Fault::RateLimited(1)));
    let t0 = Instant::now();
    h.refresh_tokens_once(Duration::from_millis(2500)).await;
    let reqs = fake.requests();
    assert!(reqs.len() >= base + 3, "a 429 is retried");
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "retry-after honoured"
    );
    assert!(t0.elapsed() < Duration::from_secs(3));
    s.stop().await;
}

#[tokio::test]
async fn an_unknown_agent_token_shows_as_rejected() {
    let fake = FakeCoderd::start().await;
    let s = Setup::new();
    let mut env = Setup::env(&fake);
    env.insert("CODER_AGENT_TOKEN".into(), uuid::Uuid::new_v4().to_string());
    let h = s.start(&env);
    eventually("rejected status", || h.status().starts_with("rejected")).await;
    assert!(h.status().contains("http 401"), "{}", h.status());
    s.stop().await;
}

#[tokio::test]
async fn a_slow_coderd_does_not_stretch_flush_past_its_deadline() {
    let fake = FakeCoderd::start().await;
    fake.set_delay(Duration::from_secs(30));
    let s = Setup::new();
    let h = s.start(&Setup::env(&fake));
    for i in 0..10 {
        s.events.note(Level::Info, format!("slow {i}"));
    }
    let t0 = Instant::now();
    h.flush(t0 + Duration::from_millis(300)).await;
    let took = t0.elapsed();
    // The fake answers after 30 s; anything near the deadline shows flush was cut.
    assert!(took < Duration::from_millis(1500), "flush took {took:?}");
    let t0 = Instant::now();
    h.refresh_tokens_once(Duration::from_millis(300)).await;
    assert!(t0.elapsed() < Duration::from_millis(1500));
    s.stop().await;
}

#[tokio::test]
async fn flush_delivers_events_emitted_just_before_it() {
    let fake = FakeCoderd::start().await;
    let mut s = Setup::new();
    // A long batch window: only the flush can deliver within the test.
    s.cfg.control_plane.log_batch_interval = Duration::from_secs(10);
    let h = s.start(&Setup::env(&fake));
    fake.wait_for(WAIT, |f| !f.log_sources().is_empty()).await;
    s.events.note(Level::Info, "stopping: saving repositories");
    s.events.note(Level::Warn, "stopping: done");
    h.flush(Instant::now() + Duration::from_secs(5)).await;
    assert_eq!(
        dashboard(&fake),
        ["stopping: saving repositories", "stopping: done"]
    );
    s.stop().await;
}

#[tokio::test]
async fn an_unlinked_account_shows_its_sign_in_url_and_token_exits_1() {
    let fake = FakeCoderd::start().await;
    let s = Setup::new();
    let env = Setup::env(&fake);
    let h = s.start(&env);
    h.refresh_tokens_once(Duration::from_secs(2)).await;
    let url = format!("{}external-auth/github", fake.url());
    assert!(h.status().contains(&url), "{}", h.status());
    assert_eq!(s.logs.text().matches("not linked").count(), 1);

    let ctx = control::CliContext {
        env: env.clone(),
        home: s.home.path().to_path_buf(),
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = control::cmd_token_with(&s.cfg, &ctx, None, &mut out, &mut err).await;
    assert_eq!((code, String::from_utf8(out).unwrap()), (1, url));

    fake.set_external_token("github", Some("ghp_linked_now_55555"));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = control::cmd_token_with(&s.cfg, &ctx, Some("github"), &mut out, &mut err).await;
    assert_eq!(
        (code, String::from_utf8(out).unwrap()),
        (0, "ghp_linked_now_55555".to_string())
    );
    assert_eq!(
        std::fs::read_to_string(s.cache()).unwrap(),
        "ghp_linked_now_55555"
    );

    // Control plane down: the cache answers.
    fake.set_down(true).await;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = control::cmd_token_with(&s.cfg, &ctx, None, &mut out, &mut err).await;
    assert_eq!(
        (code, String::from_utf8(out).unwrap()),
        (0, "ghp_linked_now_55555".to_string())
    );
    s.assert_token_kept_secret(&fake);
    s.stop().await;
}

#[tokio::test]
async fn git_askpass_answers_from_the_cache() {
    let s = Setup::new();
    let ctx = control::CliContext {
        env: HashMap::new(),
        home: s.home.path().to_path_buf(),
    };
    let ask = |prompt: &str| {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = control::cmd_git_askpass_with(&s.cfg, &ctx, prompt, &mut out, &mut err);
        (code, String::from_utf8(out).unwrap())
    };
    assert_eq!(ask("Password for 'https://github.com': ").0, 1);
    control::write_cache(
        &s.cache(),
        &agent::secrets::Secret::new("ghp_askpass_token_666"),
    )
    .unwrap();
    assert_eq!(
        ask("Username for 'https://github.com': "),
        (0, "x-access-token\n".into())
    );
    assert_eq!(
        ask("Password for 'https://x-access-token@github.com': "),
        (0, "ghp_askpass_token_666\n".into())
    );
    assert_eq!(ask("Password for 'https://gitlab.com': ").0, 1);
    assert_eq!(ask("Enter passphrase for key: ").0, 1);
}

#[tokio::test]
async fn app_status_reports_in_order_and_a_404_turns_it_off() {
    let fake = FakeCoderd::start().await;
    let mut s = Setup::new();
    s.cfg.control_plane.app_status_slug = Some("workspace".into());
    let h = s.start(&Setup::env(&fake));
    h.app_status("complete", "workspace ready").await;
    let got: Vec<_> = fake
        .app_statuses()
        .into_iter()
        .map(|a| (a.app_slug, a.state))
        .collect();
    assert_eq!(
        got,
        [
            ("workspace".to_string(), "working".to_string()),
            ("workspace".to_string(), "complete".to_string())
        ]
    );

    fake.set_app_status_404(true);
    h.app_status("failure", "dockerd did not start").await;
    h.app_status("failure", "still broken").await;
    assert_eq!(fake.requests_to("/me/app-status").len(), 3);
    assert!(
        h.status().contains("app status not supported"),
        "{}",
        h.status()
    );
    s.stop().await;
}

/// An app status message is cut to 160 bytes on a char boundary (coderd answers 400
/// beyond); a slug coderd does not know (400) switches app status off with one line.
#[tokio::test]
async fn app_status_messages_fit_160_bytes_and_an_unknown_slug_turns_it_off() {
    let fake = FakeCoderd::start().await;
    let mut s = Setup::new();
    s.cfg.control_plane.app_status_slug = Some("workspace".into());
    let h = s.start(&Setup::env(&fake));
    let long = format!("x{}", "é".repeat(100));
    h.app_status("failure", &long).await;
    let got = fake.app_statuses().pop().unwrap();
    assert_eq!(got.state, "failure");
    assert_eq!(got.message.len(), 159, "{:?}", got.message);
    assert!(long.starts_with(&got.message));
    s.stop().await;

    let fake = FakeCoderd::start().await;
    let mut s = Setup::new();
    s.cfg.control_plane.app_status_slug = Some("not-an-app".into());
    let h = s.start(&Setup::env(&fake));
    h.app_status("complete", "ready").await;
    h.app_status("failure", "broken").await;
    let reqs = fake.requests_to("/me/app-status");
    assert_eq!(reqs.len(), 1, "off after the first 400");
    assert_eq!(reqs[0].status, 400);
    assert!(
        h.status().contains("no app \"not-an-app\""),
        "{}",
        h.status()
    );
    assert_eq!(
        s.logs.text().matches("app status is off").count(),
        1,
        "{}",
        s.logs.text()
    );
    s.stop().await;
}

#[tokio::test]
async fn without_url_or_token_it_runs_standalone() {
    let s = Setup::new();
    let h = s.start(&HashMap::new());
    assert!(h.status().starts_with("standalone"), "{}", h.status());
    s.events.note(Level::Info, "nobody hears this");
    let t0 = Instant::now();
    h.flush(t0 + Duration::from_secs(5)).await;
    h.refresh_tokens_once(Duration::from_secs(5)).await;
    h.app_status("complete", "ready").await;
    assert!((h.fresh_fetch())("github".into()).await.is_none());
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "standalone calls must not wait"
    );
    assert_eq!(s.logs.text().matches("standalone").count(), 1);
    s.stop().await;
}

#[tokio::test]
async fn a_token_written_by_hand_is_picked_up_as_a_secret() {
    let s = Setup::new();
    let _h = s.start(&HashMap::new());
    let token = format!("ghp_by_hand_{}", uuid::Uuid::new_v4().simple());
    std::fs::write(s.cache(), &token).unwrap();
    eventually("hand-written token registered", || {
        agent::secrets::redact(&token) == agent::secrets::MASK
    })
    .await;
    eventually("log line", || s.logs.text().contains("changed on disk")).await;
    s.stop().await;
}

#[tokio::test]
async fn the_token_file_is_read_when_the_variable_is_unset() {
    let fake = FakeCoderd::start().await;
    let s = Setup::new();
    let file = s.home.path().join("agent-token");
    std::fs::write(&file, format!("  {}\n", fake.token())).unwrap();
    let env = HashMap::from([
        ("CODER_AGENT_URL".to_string(), fake.url()),
        (
            "CODER_AGENT_TOKEN_FILE".to_string(),
            file.display().to_string(),
        ),
    ]);
    let h = s.start(&env);
    s.events.note(Level::Info, "via token file");
    fake.wait_for(WAIT, |f| !dashboard(f).is_empty()).await;
    assert_eq!(dashboard(&fake), ["via token file"]);
    assert!(h.status().starts_with("connected"), "{}", h.status());
    s.stop().await;
}

/// The fake itself follows the reference: auth, validation and limits.
#[tokio::test]
async fn the_fake_coderd_validates_like_coderd() {
    let fake = FakeCoderd::start().await;
    agent::tls::install_provider();
    let http = reqwest::Client::new();
    let me = format!("{}api/v2/workspaceagents/me", fake.url());
    let call = |method: reqwest::Method, path: &str, token: &str, body: Option<&str>| {
        let mut r = http
            .request(method, format!("{me}{path}"))
            .header("Coder-Session-Token", token);
        if let Some(b) = body {
            r = r
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        async move {
            let resp = r.send().await.unwrap();
            let status = resp.status().as_u16();
            let v: serde_json::Value = resp.json().await.unwrap_or_default();
            (status, v["message"].as_str().unwrap_or("").to_string())
        }
    };
    use reqwest::Method as M;
    let t = fake.token();
    assert_eq!(
        call(M::PATCH, "/logs", "", Some("{}")).await,
        (
            401,
            "Cookie \"coder_session_token\" must be provided.".into()
        )
    );
    assert_eq!(
        call(M::PATCH, "/logs", "not-a-uuid", Some("{}")).await,
        (401, "Workspace agent token invalid.".into())
    );
    let other = uuid::Uuid::new_v4().to_string();
    assert_eq!(
        call(M::PATCH, "/logs", &other, Some("{}")).await,
        (401, "Workspace agent not authorized.".into())
    );
    assert_eq!(
        call(M::PATCH, "/logs", &t, Some(r#"{"logs":[]}"#)).await,
        (400, "No logs provided.".into())
    );
    assert_eq!(
        call(
            M::PATCH,
            "/logs",
            &t,
            Some(r#"{"logs":[{"created_at":"2026-01-01T00:00:00Z","output":"a","level":"loud"}]}"#)
        )
        .await,
        (400, "Invalid log level provided.".into())
    );
    assert_eq!(
        call(
            M::PATCH,
            "/logs",
            &t,
            Some(r#"{"logs":[{"created_at":"2026-01-01T00:00:00Z","output":"a","level":""}]}"#)
        )
        .await
        .0,
        200
    );
    assert_eq!(fake.logs()[0].level, "info");
    assert_eq!(
        fake.logs()[0].log_source_id,
        agent_proto::coder::EXTERNAL_LOG_SOURCE_ID
    );
    assert_eq!(
        call(M::GET, "/external-auth?id=&match=", &t, None).await,
        (400, "'url' or 'id' must be provided!".into())
    );
    assert_eq!(
        call(
            M::GET,
            "/external-auth?id=github&match=https://github.com",
            &t,
            None
        )
        .await
        .0,
        400
    );
    assert_eq!(
        call(M::GET, "/external-auth?id=gitea&match=", &t, None)
            .await
            .0,
        404
    );
    assert_eq!(
        call(
            M::GET,
            "/external-auth?id=&match=https://github.com",
            &t,
            None
        )
        .await
        .0,
        200
    );
    assert_eq!(
        call(
            M::PATCH,
            "/app-status",
            &t,
            Some(r#"{"app_slug":"a","state":"done","message":"m","uri":""}"#)
        )
        .await,
        (400, "Invalid state provided.".into())
    );
    // App status: known slugs only, message at most 160 bytes, states in any case.
    let status = |slug: &str, state: &str, message: &str| {
        serde_json::json!({"app_slug": slug, "state": state, "message": message, "uri": ""})
            .to_string()
    };
    assert_eq!(
        call(
            M::PATCH,
            "/app-status",
            &t,
            Some(&status("nope", "working", "m"))
        )
        .await
        .0,
        400
    );
    assert_eq!(
        call(
            M::PATCH,
            "/app-status",
            &t,
            Some(&status("workspace", "working", &"é".repeat(81)))
        )
        .await
        .0,
        400
    );
    assert_eq!(
        call(
            M::PATCH,
            "/app-status",
            &t,
            Some(&status("workspace", "Working", &"é".repeat(80)))
        )
        .await
        .0,
        200
    );
    // A line is stored cut to 1024 characters; its full bytes count.
    let before = fake.logs_length();
    let long = "é".repeat(3000);
    let body = serde_json::json!({"logs":[{"created_at":"x","output":long,"level":"info"}]});
    assert_eq!(
        call(M::PATCH, "/logs", &t, Some(&body.to_string())).await.0,
        200
    );
    assert_eq!(fake.logs().last().unwrap().output.chars().count(), 1024);
    assert_eq!(fake.logs_length(), before + 6000);
    // External auth answers expires_at: the zero time without an expiry.
    fake.set_external_token("github", Some("ghp_fake_validates_0006"));
    let auth = |fake: &FakeCoderd| {
        let url = format!("{me}/external-auth?id=github&match=");
        let tok = fake.token();
        let http = http.clone();
        async move {
            let r: agent_proto::coder::ExternalAuthResponse = http
                .get(url)
                .header("Coder-Session-Token", tok)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            r.expires_at
        }
    };
    assert_eq!(
        auth(&fake).await.as_deref(),
        Some(agent_proto::coder::ZERO_TIME)
    );
    fake.set_external_token_expiry("github", Some("2026-08-01T10:00:00Z"));
    assert_eq!(auth(&fake).await.as_deref(), Some("2026-08-01T10:00:00Z"));
    // Coder before v2.13: no log-source route.
    let src = r#"{"id":"00000000-0000-0000-0000-000000000001","display_name":"x","icon":""}"#;
    assert_eq!(call(M::POST, "/log-source", &t, Some(src)).await.0, 201);
    fake.set_log_source_404(true);
    assert_eq!(call(M::POST, "/log-source", &t, Some(src)).await.0, 404);
    // Two kinds of 413: a body over the cap, then the per-agent total.
    let huge = "q".repeat(5 << 20);
    let body = serde_json::json!({"logs":[{"created_at":"x","output":huge,"level":"info"}]});
    assert_eq!(
        call(M::PATCH, "/logs", &t, Some(&body.to_string())).await,
        (413, "Request body too large.".into())
    );
    assert!(!fake.logs_overflowed());
    let big = "z".repeat(MAX_LOGS_LENGTH);
    let body = serde_json::json!({"logs":[{"created_at":"x","output":big,"level":"info"}]});
    assert_eq!(
        call(M::PATCH, "/logs", &t, Some(&body.to_string())).await,
        (413, "Logs limit exceeded".into())
    );
    assert!(fake.logs_overflowed());
    // A revoked token (stop or delete build): 401 on every route.
    fake.revoke_agent_tokens();
    assert_eq!(
        call(M::PATCH, "/logs", &t, Some("{}")).await,
        (401, "Workspace agent not authorized.".into())
    );
}

#[tokio::test]
async fn coderd_behind_a_private_ca_is_trusted_through_ca_file_or_ssl_cert_file() {
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = integration::pki::private_ca(pki.path());
    let fake = FakeCoderd::start_tls(&cert, &key).await;
    assert!(fake.url().starts_with("https://localhost:"));

    // Unknown CA: not trusted.
    let s = Setup::new();
    let h = s.start(&Setup::env(&fake));
    s.events.note(Level::Info, "not over untrusted tls");
    eventually("unreachable status", || {
        h.status().starts_with("unreachable")
    })
    .await;
    assert!(fake.requests().is_empty());
    s.stop().await;

    // control_plane.ca_file.
    let mut s = Setup::new();
    s.cfg.control_plane.ca_file = Some(ca.display().to_string());
    let _h = s.start(&Setup::env(&fake));
    s.events.note(Level::Info, "over tls via ca_file");
    fake.wait_for(WAIT, |f| dashboard(f).len() == 1).await;
    assert_eq!(dashboard(&fake), ["over tls via ca_file"]);
    s.stop().await;

    // SSL_CERT_FILE.
    let s = Setup::new();
    let mut env = Setup::env(&fake);
    env.insert("SSL_CERT_FILE".into(), ca.display().to_string());
    let _h = s.start(&env);
    s.events.note(Level::Info, "over tls via SSL_CERT_FILE");
    fake.wait_for(WAIT, |f| dashboard(f).len() == 2).await;
    assert_eq!(dashboard(&fake)[1], "over tls via SSL_CERT_FILE");
    s.stop().await;
}

#[tokio::test]
async fn a_full_queue_drops_the_oldest_lines_and_counts_them() {
    let fake = FakeCoderd::start_down().await;
    let mut s = Setup::new();
    s.cfg.control_plane.log_queue_lines = 5;
    // A linked account: otherwise the token refresh notes a sign-in line when coderd comes
    // back, a sixth line that pushes one of the five out of the full queue.
    fake.set_external_token("github", Some("ghp_linked_account_123"));
    let h = s.start(&Setup::env(&fake));
    for i in 0..20 {
        s.events.note(Level::Info, format!("queued {i}"));
    }
    eventually("drop count in status", || {
        h.status().contains("15 log lines dropped")
    })
    .await;
    fake.set_down(false).await;
    h.flush(Instant::now() + WAIT).await;
    let kept: Vec<_> = dashboard(&fake)
        .into_iter()
        .filter(|l| l.starts_with("queued"))
        .collect();
    assert_eq!(
        kept,
        (15..20).map(|i| format!("queued {i}")).collect::<Vec<_>>(),
        "all lines: {:?}",
        fake.logs()
            .into_iter()
            .map(|l| l.output)
            .collect::<Vec<_>>()
    );
    assert_eq!(h.dropped_lines(), 15);
    s.stop().await;
}

#[tokio::test]
async fn the_fake_holds_a_listen_request_until_the_token_changes() {
    let fake = FakeCoderd::start().await;
    let url = format!(
        "{}api/v2/workspaceagents/me/external-auth?id=github&match=&listen=true",
        fake.url()
    );
    agent::tls::install_provider();
    let req = reqwest::Client::new()
        .get(url)
        .header("Coder-Session-Token", fake.token())
        .send();
    let pending = tokio::spawn(req);
    assert!(fake.wait_for(WAIT, |f| f.in_flight() == 1).await);
    assert!(!pending.is_finished());
    fake.set_external_token("github", Some("ghp_listened_for_999"));
    let resp = tokio::time::timeout(WAIT, pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let body: agent_proto::coder::ExternalAuthResponse = resp.json().await.unwrap();
    assert_eq!(body.access_token, "ghp_listened_for_999");
}
