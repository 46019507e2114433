//! Prometheus metrics: one process-wide registry that the subsystems count into (saves,
//! checkpoints, bytes pushed, dashboard lines, git tokens) and that the daemon renders,
//! with the services' state read at scrape time, for `/v1/metrics` on the local API and
//! for the optional `[daemon] metrics` TCP listener.
//!
//! A leaf: it imports nothing of the crate, so everyone below `state` may count into it.
//! Metric names and labels are documented in README.md ("Metrics").

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use agent_proto::local::{Health, ServiceState, ServiceStatus};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    reason: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabel {
    provider: String,
}

/// What the daemon counts while it runs.
struct Counters {
    registry: Registry,
    saves: Family<ReasonLabel, Counter>,
    save_seconds: Family<ReasonLabel, Histogram>,
    save_repos: Family<OutcomeLabels, Counter>,
    pushed_bytes: Counter,
    dashboard_sent: Counter,
    dashboard_dropped: Counter,
    /// When each provider's token was last fetched.
    tokens: Mutex<BTreeMap<String, Instant>>,
}

fn save_histogram() -> Histogram {
    // 50 ms .. ~100 s.
    Histogram::new(exponential_buckets(0.05, 2.0, 12))
}

fn counters() -> &'static Counters {
    static C: OnceLock<Counters> = OnceLock::new();
    C.get_or_init(|| {
        let mut registry = Registry::default();
        let saves = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "wsagent_saves",
            "Saves that ran, by reason (stop, signal, request, checkpoint)",
            saves.clone(),
        );
        let save_seconds =
            Family::<ReasonLabel, Histogram>::new_with_constructor(save_histogram as fn() -> _);
        registry.register(
            "wsagent_save_duration_seconds",
            "How long each save took, by reason",
            save_seconds.clone(),
        );
        let save_repos = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "wsagent_save_repositories",
            "Repository outcomes of the saves, by reason and result (pushed, unchanged, clean, committed, failed)",
            save_repos.clone(),
        );
        let pushed_bytes = Counter::default();
        registry.register(
            "wsagent_pushed_bytes",
            "Bytes of packs pushed to git remotes and accepted",
            pushed_bytes.clone(),
        );
        let dashboard_sent = Counter::default();
        registry.register(
            "wsagent_dashboard_lines_sent",
            "Log lines the Coder dashboard accepted",
            dashboard_sent.clone(),
        );
        let dashboard_dropped = Counter::default();
        registry.register(
            "wsagent_dashboard_lines_dropped",
            "Log lines for the Coder dashboard dropped (queue full, refused, too large)",
            dashboard_dropped.clone(),
        );
        Counters {
            registry,
            saves,
            save_seconds,
            save_repos,
            pushed_bytes,
            dashboard_sent,
            dashboard_dropped,
            tokens: Mutex::new(BTreeMap::new()),
        }
    })
}

/// A save ended: its reason (`stop`, `checkpoint`, ...), how long it took and each
/// repository's result.
pub fn save_done<'a>(reason: &str, took: Duration, results: impl IntoIterator<Item = &'a str>) {
    let c = counters();
    let r = ReasonLabel {
        reason: reason.to_string(),
    };
    c.saves.get_or_create(&r).inc();
    c.save_seconds.get_or_create(&r).observe(took.as_secs_f64());
    for result in results {
        c.save_repos
            .get_or_create(&OutcomeLabels {
                reason: reason.to_string(),
                result: result.to_string(),
            })
            .inc();
    }
}

/// A push's pack of `n` bytes was accepted by the remote.
pub fn pushed_bytes(n: u64) {
    counters().pushed_bytes.inc_by(n);
}

/// The dashboard accepted `n` lines.
pub fn dashboard_sent(n: u64) {
    counters().dashboard_sent.inc_by(n);
}

/// `n` lines for the dashboard were dropped.
pub fn dashboard_dropped(n: u64) {
    counters().dashboard_dropped.inc_by(n);
}

/// A fresh git token of `provider` was fetched just now.
pub fn token_fetched(provider: &str) {
    counters()
        .tokens
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(provider.to_string(), Instant::now());
}

/// The metrics in Prometheus' text format: the counters, with the services' state and
/// the tokens' age as of now.
pub fn render(services: &[ServiceStatus], ready: bool) -> String {
    let c = counters();
    let mut now = Registry::default();
    let g = |reg: &mut Registry, name: &str, help: &str| {
        let f = Family::<ServiceLabel, Gauge>::default();
        reg.register(name, help, f.clone());
        f
    };
    let up = g(
        &mut now,
        "wsagent_service_up",
        "1 when the service's process is running",
    );
    let healthy = g(
        &mut now,
        "wsagent_service_healthy",
        "1 when the last health check passed, 0 when it failed (absent while unknown, or without a check)",
    );
    let last_exit = g(
        &mut now,
        "wsagent_service_last_exit_code",
        "The exit code of the service's last process (128 + signal when killed)",
    );
    let restarts = Family::<ServiceLabel, Counter>::default();
    now.register(
        "wsagent_service_restarts",
        "Times the service was restarted",
        restarts.clone(),
    );
    for s in services {
        let l = ServiceLabel {
            service: s.name.clone(),
        };
        up.get_or_create(&l)
            .set(i64::from(s.state == ServiceState::Running));
        // Absent while unknown (not checked yet) and for services without a check.
        if matches!(s.health, Health::Healthy | Health::Unhealthy) {
            healthy
                .get_or_create(&l)
                .set(i64::from(s.health == Health::Healthy));
        }
        restarts.get_or_create(&l).inc_by(u64::from(s.restarts));
        if let Some(e) = &s.last_exit {
            let code = match (e.code, e.signal) {
                (Some(c), _) => i64::from(c),
                (None, Some(sig)) => 128 + i64::from(sig),
                (None, None) => -1,
            };
            last_exit.get_or_create(&l).set(code);
        }
    }
    let ready_g = Gauge::<i64>::default();
    now.register(
        "wsagent_ready",
        "1 when the lifecycle is ready",
        ready_g.clone(),
    );
    ready_g.set(i64::from(ready));
    let age = Family::<ProviderLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    now.register(
        "wsagent_git_token_age_seconds",
        "Seconds since the provider's git token was last fetched from Coder",
        age.clone(),
    );
    for (p, at) in c.tokens.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        age.get_or_create(&ProviderLabel {
            provider: p.clone(),
        })
        .set(at.elapsed().as_secs_f64());
    }
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode_registry(&mut out, &now);
    let _ = prometheus_client::encoding::text::encode_registry(&mut out, &c.registry);
    let _ = prometheus_client::encoding::text::encode_eof(&mut out);
    out
}

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
