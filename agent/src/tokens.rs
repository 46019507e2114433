//! Git hosting tokens: which providers exist, where their tokens are cached, and the
//! credentials the save phase pushes with.
//!
//! A provider is a Coder external-auth provider (`id`, e.g. `github`) tied to a git host
//! (`github.com`). Its token is cached in one file (mode 0600, e.g.
//! `~/.cache/coder/github_token`); that file is the only place on disk a token may be.
//! The control-plane module keeps the cache fresh; [`Tokens::for_host`] gives the save
//! phase the candidates to try, freshest first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use crate::config::providers::GitProvider;
use crate::secrets::Secret;

impl GitProvider {
    pub fn username(&self) -> String {
        if let Some(u) = &self.username {
            return u.clone();
        }
        let h = self.host.to_ascii_lowercase();
        if h.contains("gitlab") {
            "oauth2".into()
        } else if h.contains("bitbucket") {
            "x-token-auth".into()
        } else {
            "x-access-token".into()
        }
    }

    pub fn cache_path(&self, id: &str, home: &Path) -> PathBuf {
        match &self.cache_file {
            Some(p) => crate::paths::expand_home(p, home),
            None => home.join(".cache/coder").join(format!("{id}_token")),
        }
    }

    pub fn match_url(&self) -> String {
        self.match_url
            .clone()
            .unwrap_or_else(|| format!("https://{}", self.host))
    }
}

/// A user name and token to push with.
#[derive(Debug, Clone)]
pub struct Credential {
    pub username: String,
    pub token: Secret,
    /// Where it came from (`fresh`, `cache`), for logs.
    pub source: &'static str,
}

/// Fetches a fresh token for a provider id (the control plane plugs in here).
pub type FreshFetch = Arc<
    dyn Fn(String) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<Secret>> + Send>>
        + Send
        + Sync,
>;

/// The token source the save phase uses.
#[derive(Clone)]
pub struct Tokens {
    pub providers: BTreeMap<String, GitProvider>,
    pub home: PathBuf,
    /// Optional fresh fetch, tried before the cache file (bounded by the caller).
    pub fresh: Option<FreshFetch>,
}

impl Tokens {
    pub fn new(providers: BTreeMap<String, GitProvider>, home: PathBuf) -> Tokens {
        Tokens {
            providers,
            home,
            fresh: None,
        }
    }

    /// The provider id serving `host`, if any.
    pub fn provider_for_host(&self, host: &str) -> Option<(&String, &GitProvider)> {
        self.providers
            .iter()
            .find(|(_, p)| p.host.eq_ignore_ascii_case(host))
    }

    /// Read a provider's cached token (see [`read_cache`]); `None` when absent, empty or
    /// refused (the refusal is logged, naming the file).
    pub fn cached(&self, id: &str) -> Option<Secret> {
        let p = self.providers.get(id)?;
        let path = p.cache_path(id, &self.home);
        match read_cache(&path) {
            Ok(t) => t.map(Secret::new),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "git token cache not used");
                None
            }
        }
    }

    /// Credentials to try for `host`, freshest first, without duplicates.
    pub async fn for_host(&self, host: &str) -> Vec<Credential> {
        let Some((id, p)) = self.provider_for_host(host) else {
            return Vec::new();
        };
        let mut out: Vec<Credential> = Vec::new();
        if let Some(fetch) = &self.fresh
            && let Some(t) = fetch(id.clone()).await
        {
            out.push(Credential {
                username: p.username(),
                token: t,
                source: "fresh",
            });
        }
        if let Some(t) = self.cached(id)
            && !out.iter().any(|c| c.token == t)
        {
            out.push(Credential {
                username: p.username(),
                token: t,
                source: "cache",
            });
        }
        out
    }
}

/// A token cache file is never larger than this.
pub const CACHE_MAX: u64 = 64 * 1024;

/// The token in a cache file: its first line, trimmed; `None` when that is empty.
///
/// The file is read as the user under HOME and never through a link (see
/// [`crate::userfs`]); it must be a regular file owned by the daemon's user or the
/// workspace user, at most [`CACHE_MAX`] bytes. Whatever else is in it never goes out as
/// a password.
pub fn read_cache(path: &Path) -> std::io::Result<Option<String>> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let f = crate::userfs::open_read(path)?;
    let md = f.metadata()?;
    let me = nix::unistd::geteuid().as_raw();
    let user = crate::userfs::user_for(path).map(|u| u.uid);
    if md.uid() != me && Some(md.uid()) != user {
        return Err(std::io::Error::other(format!(
            "{} belongs to uid {}, neither wsagent's user nor the workspace user",
            path.display(),
            md.uid()
        )));
    }
    if md.len() > CACHE_MAX {
        return Err(std::io::Error::other(format!(
            "{} is larger than {CACHE_MAX} bytes: not a token",
            path.display()
        )));
    }
    let mut bytes = Vec::new();
    f.take(CACHE_MAX).read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let t = text.lines().next().unwrap_or("").trim();
    Ok((!t.is_empty()).then(|| t.to_string()))
}

/// The default providers: GitHub.
pub fn default_providers() -> BTreeMap<String, GitProvider> {
    let mut m = BTreeMap::new();
    m.insert(
        "github".into(),
        GitProvider {
            host: "github.com".into(),
            username: None,
            cache_file: Some("~/.cache/coder/github_token".into()),
            match_url: Some("https://github.com".into()),
            refresh_interval: crate::config::providers::default_refresh(),
        },
    );
    m
}
