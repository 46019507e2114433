//! `[control_plane]`: how wsagent reaches and reports to Coder.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[control_plane]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlPlaneConfig {
    /// coderd's base URL; overrides `CODER_AGENT_URL` (e.g. an in-cluster service name).
    pub url: Option<String>,
    /// A PEM bundle trusted in addition to the system roots (`SSL_CERT_FILE` is too).
    pub ca_file: Option<String>,
    /// When set, `PATCH /me/app-status` reports the workspace's progress on this app.
    pub app_status_slug: Option<String>,
    /// Bound of one HTTP call.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Bound of the fresh token fetch at stop and in `wsagent token`.
    #[serde(with = "humantime_serde")]
    pub fresh_token_timeout: Duration,
    /// How long log lines gather before a batch is sent (100 lines go at once).
    #[serde(with = "humantime_serde")]
    pub log_batch_interval: Duration,
    /// Log lines kept in memory while coderd is unreachable; the oldest go first.
    pub log_queue_lines: usize,
    /// `false` keeps wsagent's lines out of the dashboard.
    pub send_logs: bool,
    /// Output bytes wsagent may spend of the agent's 1 MiB dashboard log total (shared
    /// with the Coder agent's startup and shutdown script logs); one last line says
    /// when it is spent.
    pub log_budget: usize,
}

/// The default `control_plane.log_budget`: a quarter of Coder's per-agent total.
pub const DEFAULT_LOG_BUDGET: usize = 256 * 1024;
/// The smallest `control_plane.log_budget` accepted.
pub const MIN_LOG_BUDGET: usize = 4 * 1024;

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        ControlPlaneConfig {
            url: None,
            ca_file: None,
            app_status_slug: None,
            request_timeout: Duration::from_secs(10),
            fresh_token_timeout: Duration::from_secs(3),
            log_batch_interval: Duration::from_millis(500),
            log_queue_lines: 10_000,
            send_logs: true,
            log_budget: DEFAULT_LOG_BUDGET,
        }
    }
}

/// Semantic checks of `[control_plane]`: (dotted key, message) per problem.
pub fn validate(cfg: &ControlPlaneConfig) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut bad = |k: &str, m: String| out.push((format!("control_plane.{k}"), m));
    if let Some(u) = &cfg.url {
        match reqwest::Url::parse(u.trim()) {
            Ok(p) if (p.scheme() == "http" || p.scheme() == "https") && p.host().is_some() => {}
            _ => bad("url", format!("{u:?} is not an http(s) url")),
        }
    }
    if let Some(f) = &cfg.ca_file
        && f.trim().is_empty()
    {
        bad("ca_file", "must not be empty".into());
    }
    if let Some(s) = &cfg.app_status_slug
        && s.trim().is_empty()
    {
        bad("app_status_slug", "must not be empty".into());
    }
    for (k, d) in [
        ("request_timeout", cfg.request_timeout),
        ("fresh_token_timeout", cfg.fresh_token_timeout),
    ] {
        if d.is_zero() {
            bad(k, "must be more than 0s".into());
        }
    }
    if cfg.log_batch_interval < Duration::from_millis(50)
        || cfg.log_batch_interval > Duration::from_secs(10)
    {
        bad("log_batch_interval", "must be between 50ms and 10s".into());
    }
    if cfg.log_queue_lines == 0 {
        bad("log_queue_lines", "must be at least 1".into());
    }
    if !(MIN_LOG_BUDGET..=agent_proto::coder::MAX_LOGS_LENGTH).contains(&cfg.log_budget) {
        bad(
            "log_budget",
            format!(
                "must be between {MIN_LOG_BUDGET} and {} bytes (Coder's per-agent total)",
                agent_proto::coder::MAX_LOGS_LENGTH
            ),
        );
    }
    out
}
