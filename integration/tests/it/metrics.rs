//! Prometheus metrics, scraped the way Prometheus would: over `[daemon] metrics` (TCP on
//! a loopback port) and over the local API's `/v1/metrics`, parsed with an independent
//! Prometheus text parser.

use std::io::{Read, Write};

use agent_proto::local::Lifecycle;
use integration::daemon::{Daemon, Workspace};
use integration::fake_coderd::FakeCoderd;
use integration::gitserver::GitServer;
use integration::net::free_port;
use integration::wait_until;

use crate::repos::{cache_token, dirty_repo, provider_for};
use crate::support::{SHORT, config, http_server};

const TOKEN: &str = "ghs_metrics_1a2b3c4d5e";

/// `GET path` over `stream` (HTTP/1.1, one request): status and body.
fn get(mut stream: impl Read + Write, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn scrape_tcp(port: u16) -> String {
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(SHORT)).unwrap();
    let (status, body) = get(s, "/metrics");
    assert_eq!(status, 200, "{body}");
    body
}

fn scrape_api(ws: &Workspace) -> String {
    let s = std::os::unix::net::UnixStream::connect(ws.socket()).unwrap();
    s.set_read_timeout(Some(SHORT)).unwrap();
    let (status, body) = get(s, "/v1/metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of the sample `name` whose labels include `labels`, parsed by
/// `prometheus-parse`.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(k).is_some_and(|x| x == *v))
        })
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{name}: unexpected {other:?}"),
        })
}

/// Scraped over TCP and over the API: each service's up/health/restarts/last exit, the
/// save's count, duration and outcomes, the bytes pushed, the dashboard's lines and the
/// git token's age — the numbers of what really happened.
#[test]
fn metrics_over_tcp_and_the_api_count_services_saves_pushes_and_dashboard_lines() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let fake = rt.block_on(FakeCoderd::start());
    let ws = Workspace::new()
        .with_env("CODER_AGENT_URL", fake.url())
        .with_env("CODER_AGENT_TOKEN", fake.token())
        .with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = GitServer::start(ws.path().join("srv"), TOKEN).unwrap();
    dirty_repo(&server, &ws.home(), "a");
    dirty_repo(&server, &ws.home(), "b");
    cache_token(&ws.home(), TOKEN);
    fake.set_external_token("github", Some(TOKEN));
    let (port, web) = (free_port(), free_port());
    let mut d = Daemon::start(
        &ws,
        &config(&format!(
            "[daemon]\nmetrics = \"127.0.0.1:{port}\"\n\n\
             [services.web]\ncommand = {cmd}\n[services.web.health]\nkind = \"http\"\nurl = \"http://127.0.0.1:{web}/\"\ninterval = \"200ms\"\n\n\
             [services.crashy]\nshell = \"exit 3\"\nrestart = \"on-failure\"\n[services.crashy.backoff]\ninitial = \"50ms\"\nmax_failures = 2\n\n{p}",
            cmd = http_server(web),
            p = provider_for(&server)
        )),
    );
    // crashy fails during the start, so the start ends in `start_error`.
    d.wait_lifecycle(Lifecycle::StartError, SHORT);
    d.wait_service(
        "web",
        |s| s.health == agent_proto::local::Health::Healthy,
        SHORT,
    );
    d.wait_service(
        "crashy",
        |s| s.state == agent_proto::local::ServiceState::Failed,
        SHORT,
    );
    let out = d.cli(["save"]);
    assert!(out.status.success(), "{out:?}");
    wait_until(SHORT, "dashboard lines sent and the token fetched", || {
        let t = scrape_tcp(port);
        value(&t, "wsagent_dashboard_lines_sent_total", &[]).is_some_and(|v| v > 0.0)
            && value(
                &t,
                "wsagent_git_token_age_seconds",
                &[("provider", "github")],
            )
            .is_some()
    });

    for text in [scrape_tcp(port), scrape_api(&ws)] {
        let v = |name: &str, labels: &[(&str, &str)]| {
            value(&text, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
        };
        let web = [("service", "web")];
        let crashy = [("service", "crashy")];
        assert_eq!(v("wsagent_service_up", &web), 1.0);
        assert_eq!(v("wsagent_service_healthy", &web), 1.0);
        assert_eq!(v("wsagent_service_restarts_total", &web), 0.0);
        assert_eq!(v("wsagent_service_up", &crashy), 0.0);
        assert_eq!(v("wsagent_service_restarts_total", &crashy), 1.0);
        assert_eq!(v("wsagent_service_last_exit_code", &crashy), 3.0);
        assert_eq!(value(&text, "wsagent_service_healthy", &crashy), None);
        assert_eq!(v("wsagent_ready", &[]), 0.0);
        let manual = [("reason", "manual")];
        assert_eq!(v("wsagent_saves_total", &manual), 1.0);
        assert_eq!(v("wsagent_save_duration_seconds_count", &manual), 1.0);
        assert!(v("wsagent_save_duration_seconds_sum", &manual) > 0.0);
        assert_eq!(
            v(
                "wsagent_save_repositories_total",
                &[("reason", "manual"), ("result", "pushed")]
            ),
            2.0
        );
        // Two packs, each with at least a commit, a tree and a blob.
        assert!(v("wsagent_pushed_bytes_total", &[]) > 200.0, "{text}");
        assert!(v("wsagent_dashboard_lines_sent_total", &[]) > 0.0);
        assert_eq!(v("wsagent_dashboard_lines_dropped_total", &[]), 0.0);
        let age = v("wsagent_git_token_age_seconds", &[("provider", "github")]);
        assert!((0.0..60.0).contains(&age), "token age {age}");
    }
    assert!(!scrape_api(&ws).contains(TOKEN));
}

/// Off by default: no listener, and `/v1/metrics` still answers on the socket.
#[test]
fn metrics_listener_is_off_unless_configured() {
    let ws = Workspace::new();
    let mut d = Daemon::start(
        &ws,
        &config("[services.s]\ncommand = [\"sleep\", \"1000\"]\n"),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let show = ws.cli(["config", "show"]);
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(!show.contains("metrics ="), "{show}");
    let text = scrape_api(&ws);
    assert_eq!(
        value(&text, "wsagent_service_up", &[("service", "s")]),
        Some(1.0)
    );
}
