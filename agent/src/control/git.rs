//! Git tokens from Coder's external auth: fetching them, the 0600 cache file each one
//! lives in, the watcher that notices a token written there by hand, and the two CLI
//! commands built on them (`wsagent token`, `wsagent git-askpass`).
//!
//! The cache file is the only place on disk a token may be. It is replaced atomically
//! (temp file in the same 0700 directory, fsync, rename, fsync of the directory), so a
//! reader (git, the save phase) sees the old token or the new one, never half of one.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use agent_proto::coder::ExternalAuthResponse;
use reqwest::Method;
use tokio::time::Instant;

use super::client::{ApiError, Client};
use crate::config::Config;
use crate::secrets::Secret;
use crate::tokens::{GitProvider, Tokens};

/// What coderd said about a provider.
#[derive(Debug)]
pub enum Fetched {
    /// A token, and when it expires (`None`: no expiry given, or the zero time).
    Token(Secret, Option<SystemTime>),
    /// The account is not linked: the page where the user signs in.
    SignIn(String),
}

/// The soonest a token is refreshed again, however close its expiry.
pub const MIN_REFRESH: Duration = Duration::from_secs(5);

/// When to refresh a token next: at 80 % of its remaining lifetime, at least
/// [`MIN_REFRESH`] (or `every`, when smaller) and at most `every`; `every` when it has
/// no expiry.
pub fn next_refresh(expires: Option<SystemTime>, now: SystemTime, every: Duration) -> Duration {
    match expires {
        None => every,
        Some(at) => {
            let left = at.duration_since(now).unwrap_or_default();
            (left * 4 / 5).clamp(MIN_REFRESH.min(every), every)
        }
    }
}

/// Parse coderd's `expires_at` (RFC 3339, `Z` or a `±hh:mm` offset, optional
/// fraction). The zero time (`0001-01-01T00:00:00Z`), an empty string and anything
/// unparseable mean no expiry.
pub fn parse_expiry(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    if s.is_empty() || s.starts_with("0001-01-01") {
        return None;
    }
    let (base, east_secs) = if let Some(b) = s.strip_suffix(['Z', 'z']) {
        (b, 0i64)
    } else {
        let cut = s.len().checked_sub(6)?;
        let (b, off) = (s.get(..cut)?, s.get(cut..)?);
        let sign = match off.as_bytes().first()? {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let (h, m) = off[1..].split_once(':')?;
        let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
        (b, sign * (h * 3600 + m * 60))
    };
    let local = humantime::parse_rfc3339_weak(&format!("{base}Z")).ok()?;
    let shift = Duration::from_secs(east_secs.unsigned_abs());
    if east_secs >= 0 {
        local.checked_sub(shift)
    } else {
        local.checked_add(shift)
    }
}

/// `GET /me/external-auth?id=<id>&match=` (both keys sent, as the Go client does),
/// retried until `deadline`.
///
/// The optional `git_remote_origin` and `git_branch` parameters are not sent: every
/// fetch here is per provider, never per repository (the refresh loop keeps one token
/// per provider; the save fetches one per git host and shares it among all the
/// repositories on that host; `wsagent git-askpass` answers from the cache without
/// calling coderd), so there is no one repository whose origin and branch would be true.
pub async fn fetch(client: &Client, id: &str, deadline: Instant) -> Result<Fetched, ApiError> {
    let (status, r): (u16, ExternalAuthResponse) = client
        .call_until::<(), _>(
            Method::GET,
            "/external-auth",
            &[("id", id), ("match", "")],
            None,
            deadline,
        )
        .await?;
    if !r.access_token.is_empty() {
        let expires = r.expires_at.as_deref().and_then(parse_expiry);
        return Ok(Fetched::Token(Secret::new(r.access_token), expires));
    }
    if !r.url.is_empty() {
        return Ok(Fetched::SignIn(r.url));
    }
    Err(ApiError::Decode {
        path: format!("{}/external-auth", agent_proto::coder::AGENT_ME),
        status,
        detail: "neither access_token nor url in the answer".into(),
    })
}

/// Why a cache file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write token cache {path}: {source}")]
pub struct CacheError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Create `dir` (and missing parents) and make `dir` itself mode 0700: under HOME as
/// the user, never through a link (see [`crate::userfs::private_dir`]).
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    crate::userfs::private_dir(dir)
}

/// Replace `path` with `token` atomically, mode 0600, in a 0700 directory. Returns
/// false (and writes nothing) when the file already holds that token.
pub fn write_cache(path: &Path, token: &Secret) -> Result<bool, CacheError> {
    let err = |source| CacheError {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(Some(old)) = crate::tokens::read_cache(path)
        && old == token.expose()
    {
        return Ok(false);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    private_dir(dir).map_err(err)?;
    crate::userfs::write_atomic(path, token.expose().as_bytes(), 0o600).map_err(err)?;
    Ok(true)
}

/// The providers in effect: the configured ones, or GitHub when none is configured.
pub fn providers_of(cfg: &Config) -> BTreeMap<String, GitProvider> {
    if cfg.git_providers.is_empty() {
        crate::tokens::default_providers()
    } else {
        cfg.git_providers.clone()
    }
}

/// What the CLI commands need from the process: its environment and HOME.
#[derive(Debug, Clone)]
pub struct CliContext {
    pub env: HashMap<String, String>,
    pub home: PathBuf,
}

impl CliContext {
    pub fn from_process() -> CliContext {
        let env: HashMap<String, String> = std::env::vars().collect();
        let home = env
            .get("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/root"));
        CliContext { env, home }
    }
}

/// `wsagent token [PROVIDER]`: print the provider's token (no trailing newline, like
/// `coder external-auth access-token`). With a control plane the token is fetched
/// fresh (and cached), falling back to the cache; when the account is not linked the
/// sign-in URL is printed instead and the exit code is 1.
pub async fn cmd_token(cfg: &Config, provider: Option<&str>, out: &mut impl Write) -> i32 {
    cmd_token_with(
        cfg,
        &CliContext::from_process(),
        provider,
        out,
        &mut std::io::stderr(),
    )
    .await
}

/// [`cmd_token`] with an explicit environment and error stream.
pub async fn cmd_token_with(
    cfg: &Config,
    ctx: &CliContext,
    provider: Option<&str>,
    out: &mut impl Write,
    err: &mut impl Write,
) -> i32 {
    let providers = providers_of(cfg);
    let id = match provider {
        Some(p) => p.to_string(),
        None if providers.contains_key("github") => "github".into(),
        None => match providers.keys().next() {
            Some(k) => k.clone(),
            None => {
                let _ = writeln!(err, "wsagent token: no git provider is configured");
                return 1;
            }
        },
    };
    let Some(p) = providers.get(&id) else {
        let known: Vec<_> = providers.keys().cloned().collect();
        let _ = writeln!(
            err,
            "wsagent token: unknown provider {id:?} (configured: {})",
            known.join(", ")
        );
        return 1;
    };
    let cache = p.cache_path(&id, &ctx.home);
    if let Ok(client) = super::connect(&cfg.control_plane, &ctx.env) {
        let deadline = Instant::now() + cfg.control_plane.fresh_token_timeout;
        match fetch(&client, &id, deadline).await {
            Ok(Fetched::Token(t, _)) => {
                if let Err(e) = write_cache(&cache, &t) {
                    let _ = writeln!(err, "wsagent token: {e}");
                }
                let _ = out.write_all(t.expose().as_bytes());
                return 0;
            }
            Ok(Fetched::SignIn(url)) => {
                let _ = out.write_all(url.as_bytes());
                return 1;
            }
            Err(e) => {
                let _ = writeln!(err, "wsagent token: {e}; using the cached token");
            }
        }
    }
    let tokens = Tokens::new(providers.clone(), ctx.home.clone());
    match tokens.cached(&id) {
        Some(t) => {
            let _ = out.write_all(t.expose().as_bytes());
            0
        }
        None => {
            let _ = writeln!(
                err,
                "wsagent token: no token for {id} (cache {} is empty or missing)",
                cache.display()
            );
            1
        }
    }
}

/// A parsed git credential prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Askpass {
    /// `Username` or `Password`.
    pub username_prompt: bool,
    /// The user in the prompt's URL (`https://bob@host`), if any.
    pub user: Option<String>,
    pub host: String,
}

/// Parse `Username for 'https://host': ` / `Password for 'https://user@host': ` the way
/// Coder's `ParseAskpass` does: at least 3 words, the first `Username` or `Password`, the
/// third a quoted http(s) URL with a host.
pub fn parse_askpass(prompt: &str) -> Option<Askpass> {
    let words: Vec<&str> = prompt.split_whitespace().collect();
    if words.len() < 3 {
        return None;
    }
    let username_prompt = match words[0] {
        "Username" => true,
        "Password" => false,
        _ => return None,
    };
    let raw = words[2]
        .trim_start_matches(['\'', '"'])
        .trim_end_matches(['\'', '"', ':']);
    let url = reqwest::Url::parse(raw).ok()?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return None;
    }
    let host = url.host_str()?.to_string();
    let user = (!url.username().is_empty()).then(|| url.username().to_string());
    Some(Askpass {
        username_prompt,
        user,
        host,
    })
}

/// `wsagent git-askpass PROMPT`: answer git's prompt from the token cache (user name of
/// the provider serving the host; password = its token), with a trailing newline. Exit
/// 1 (git then falls back to its own prompting) when the prompt or host is unknown or
/// no token is cached.
pub fn cmd_git_askpass(cfg: &Config, prompt: &str, out: &mut impl Write) -> i32 {
    cmd_git_askpass_with(
        cfg,
        &CliContext::from_process(),
        prompt,
        out,
        &mut std::io::stderr(),
    )
}

/// [`cmd_git_askpass`] with an explicit environment and error stream.
pub fn cmd_git_askpass_with(
    cfg: &Config,
    ctx: &CliContext,
    prompt: &str,
    out: &mut impl Write,
    err: &mut impl Write,
) -> i32 {
    let Some(ask) = parse_askpass(prompt) else {
        let _ = writeln!(err, "wsagent git-askpass: not a git credential prompt");
        return 1;
    };
    let tokens = Tokens::new(providers_of(cfg), ctx.home.clone());
    let Some((id, p)) = tokens.provider_for_host(&ask.host) else {
        let _ = writeln!(
            err,
            "wsagent git-askpass: no git provider for {}; git's default behaviour is used",
            ask.host
        );
        return 1;
    };
    let answer = if ask.username_prompt {
        p.username()
    } else {
        match tokens.cached(id) {
            Some(t) => t.expose().to_string(),
            None => {
                let _ = writeln!(
                    err,
                    "wsagent git-askpass: no cached token for {id}; run `wsagent token {id}`"
                );
                return 1;
            }
        }
    };
    let _ = writeln!(out, "{answer}");
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn as_root_the_cache_belongs_to_the_owner_of_home() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            return; // chown needs root; the mode checks run in the test below
        }
        let _realm = crate::userfs::TEST_REALM
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let home = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(home.path(), Some(4321), Some(4322)).unwrap();
        crate::userfs::set_realm(home.path(), None);
        let path = home.path().join(".cache/coder/github_token");
        let written = write_cache(&path, &Secret::new("ghp_owned_by_user_77"));
        crate::userfs::set_realm(home.path(), Some(crate::userfs::Ids { uid: 0, gid: 0 }));
        written.unwrap();
        for p in [
            &path,
            &home.path().join(".cache/coder"),
            &home.path().join(".cache"),
        ] {
            let m = std::fs::metadata(p).unwrap();
            assert_eq!((m.uid(), m.gid()), (4321, 4322), "{}", p.display());
        }
    }

    #[test]
    fn expiry_parses_rfc3339_and_the_zero_time_means_none() {
        let at = |s| parse_expiry(s).map(|t| humantime::format_rfc3339(t).to_string());
        assert_eq!(
            at("2026-08-01T10:00:00Z").as_deref(),
            Some("2026-08-01T10:00:00Z")
        );
        assert_eq!(
            at("2026-08-01T12:30:00.123456789+02:30").as_deref(),
            Some("2026-08-01T10:00:00.123456789Z")
        );
        assert_eq!(
            at("2026-08-01T05:00:00-05:00").as_deref(),
            Some("2026-08-01T10:00:00Z")
        );
        assert_eq!(at(agent_proto::coder::ZERO_TIME), None);
        assert_eq!(at(""), None);
        assert_eq!(at("tomorrow"), None);
    }

    #[test]
    fn refresh_comes_at_80_percent_of_the_lifetime_within_bounds() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let every = Duration::from_secs(1800);
        let in_ = |s| Some(now + Duration::from_secs(s));
        assert_eq!(next_refresh(None, now, every), every);
        assert_eq!(
            next_refresh(in_(1000), now, every),
            Duration::from_secs(800)
        );
        assert_eq!(next_refresh(in_(8 * 3600), now, every), every);
        assert_eq!(next_refresh(in_(2), now, every), MIN_REFRESH);
        assert_eq!(
            next_refresh(Some(now - Duration::from_secs(60)), now, every),
            MIN_REFRESH
        );
        // A refresh interval under the minimum stays the bound.
        let fast = Duration::from_secs(1);
        assert_eq!(next_refresh(in_(2), now, fast), fast);
    }

    #[test]
    fn git_prompts_parse_like_coders_askpass() {
        assert_eq!(
            parse_askpass("Username for 'https://github.com': "),
            Some(Askpass {
                username_prompt: true,
                user: None,
                host: "github.com".into()
            })
        );
        assert_eq!(
            parse_askpass("Password for 'https://bob@github.com': "),
            Some(Askpass {
                username_prompt: false,
                user: Some("bob".into()),
                host: "github.com".into()
            })
        );
        assert_eq!(parse_askpass("Password: "), None);
        assert_eq!(parse_askpass("Passphrase for 'x': "), None);
        assert_eq!(parse_askpass("Username for 'ssh://github.com': "), None);
    }

    #[test]
    fn the_cache_is_0600_in_a_0700_dir_and_rewritten_only_on_change() {
        let home = tempfile::tempdir().unwrap();
        let path = home.path().join(".cache/coder/github_token");
        let t = Secret::new("ghp_first_token_1234");
        assert!(write_cache(&path, &t).unwrap());
        assert!(!write_cache(&path, &t).unwrap());
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert!(write_cache(&path, &Secret::new("ghp_second_token_5678")).unwrap());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "ghp_second_token_5678"
        );
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }
}
