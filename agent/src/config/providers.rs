//! `[git_providers.<id>]`: the git hosts whose tokens wsagent keeps (the behaviour is
//! in `tokens`).

use serde::{Deserialize, Serialize};

/// One git provider (`[git_providers.<id>]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitProvider {
    /// Git host served by this provider, e.g. `github.com`.
    pub host: String,
    /// Basic-auth user name sent with the token. Default by host: GitHub
    /// `x-access-token`, GitLab `oauth2`, Bitbucket `x-token-auth`, others
    /// `x-access-token`.
    #[serde(default)]
    pub username: Option<String>,
    /// Where the token is cached; default `~/.cache/coder/<id>_token`.
    #[serde(default)]
    pub cache_file: Option<String>,
    /// The `match` sent to Coder's external-auth route; default `https://<host>`.
    #[serde(default, rename = "match")]
    pub match_url: Option<String>,
    /// How often the cached token is refreshed from the control plane.
    #[serde(default = "default_refresh", with = "humantime_serde")]
    pub refresh_interval: std::time::Duration,
}

pub(crate) fn default_refresh() -> std::time::Duration {
    std::time::Duration::from_secs(30 * 60)
}
