//! Save on stop: commit and push every repository's unsaved work (issue 3).
//!
//! [`save_all`] finds the repositories ([`discover`]), makes each one's local commit on
//! a blocking thread (submodules before their parents), makes it durable, then pushes
//! every commit, all bounded by `save.parallelism` and by the caller's deadline. At the
//! deadline it returns whatever is still running as `committed` (the commit is already
//! on disk) or `failed`. Each repository gets a `started` journal line before it is
//! touched and an outcome line after ([`journal`]), and an [`EventKind::Save`] event.
//!
//! Invariants: `.git/config` is never written (pushes go through an anonymous remote
//! whose credentials come from a callback); in `snapshot` mode HEAD, the index and the
//! worktree are never written; a token appears nowhere but in the callback's answer.

pub mod discover;
pub mod fsids;
pub mod journal;
pub mod repo;
pub mod url;
pub mod worktree;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use agent_proto::local::{EventKind, Level};
use agent_proto::save::RepoOutcome;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

pub use journal::{Journal, last_outcomes, previous_save_summary};

/// How unsaved work is saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SaveMode {
    /// One commit of the whole worktree on the snapshot ref; HEAD, index and worktree
    /// untouched.
    #[default]
    Snapshot,
    /// Stage all, commit on the current branch, push to its upstream; the snapshot ref
    /// when that cannot be done.
    Branch,
}

impl SaveMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SaveMode::Snapshot => "snapshot",
            SaveMode::Branch => "branch",
        }
    }
}

/// `[save]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SaveConfig {
    pub mode: SaveMode,
    /// Directories searched for repositories (`~` is the user's HOME).
    pub roots: Vec<String>,
    /// How many directory levels below each root are searched.
    pub depth: usize,
    /// Repositories saved wherever they are (worktree or bare repository paths).
    pub repos: Vec<String>,
    /// The snapshot ref; `{workspace}` and `{branch}` are filled in.
    pub ref_template: String,
    /// Files larger than this (bytes) are left out of the commit and named in the
    /// journal (GitHub refuses files over 100 MiB).
    pub max_file_size: u64,
    /// Repositories saved at the same time.
    pub parallelism: usize,
}

impl Default for SaveConfig {
    fn default() -> Self {
        SaveConfig {
            mode: SaveMode::Snapshot,
            roots: vec!["~/projects".into(), "/workspaces".into()],
            depth: 3,
            repos: Vec::new(),
            ref_template: "refs/heads/wip/{workspace}/{branch}".into(),
            max_file_size: 95 * 1024 * 1024,
            parallelism: 8,
        }
    }
}

/// Semantic checks of `[save]`: (dotted key, message) per problem.
pub fn validate(cfg: &SaveConfig) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if cfg.parallelism == 0 {
        out.push(("save.parallelism".into(), "must be at least 1".into()));
    }
    if cfg.max_file_size == 0 {
        out.push((
            "save.max_file_size".into(),
            "must be greater than zero".into(),
        ));
    }
    if cfg.depth > 32 {
        out.push((
            "save.depth".into(),
            format!("{} is too deep (at most 32)", cfg.depth),
        ));
    }
    for (key, list) in [("save.roots", &cfg.roots), ("save.repos", &cfg.repos)] {
        for p in list.iter() {
            if p.trim().is_empty() {
                out.push((key.into(), "paths must not be empty".into()));
            } else if !p.starts_with('/') && !p.starts_with('~') {
                out.push((key.into(), format!("{p:?} is not an absolute path")));
            }
        }
    }
    let t = &cfg.ref_template;
    let rest = t.replace("{workspace}", "").replace("{branch}", "");
    if !t.starts_with("refs/") {
        out.push((
            "save.ref_template".into(),
            format!("{t:?} must start with \"refs/\""),
        ));
    } else if !t.contains("{branch}") {
        out.push((
            "save.ref_template".into(),
            format!("{t:?} must contain {{branch}} (one ref per branch)"),
        ));
    } else if rest.contains('{') || rest.contains('}') {
        out.push((
            "save.ref_template".into(),
            format!("{t:?} has an unknown placeholder (known: {{workspace}}, {{branch}})"),
        ));
    } else if !git2::Reference::is_valid_name(
        &t.replace("{workspace}", "ws").replace("{branch}", "main"),
    ) {
        out.push((
            "save.ref_template".into(),
            format!("{t:?} does not make a valid ref name"),
        ));
    }
    out
}

/// Why a save runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The workspace is stopping.
    Stop,
    /// `wsagent save` by hand.
    Manual,
    /// SIGUSR1.
    Signal,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Stop => "stop",
            Reason::Manual => "manual",
            Reason::Signal => "signal",
        }
    }
}

/// Who and where: what the daemon knows that the save needs.
#[derive(Clone)]
pub struct SaveEnv {
    pub home: PathBuf,
    pub state_dir: PathBuf,
    /// `CODER_WORKSPACE_NAME`, else the host name.
    pub workspace: String,
    /// `CODER_WORKSPACE_OWNER_NAME`: the author when a repository has no user.name.
    pub owner_name: Option<String>,
    /// `CODER_WORKSPACE_OWNER_EMAIL`.
    pub owner_email: Option<String>,
    pub tokens: crate::tokens::Tokens,
    pub events: crate::events::Events,
}

#[derive(Debug, Clone)]
pub struct SaveRequest {
    pub reason: Reason,
    /// Save only the repository containing this path.
    pub only: Option<PathBuf>,
    /// Report what would be saved; write nothing (no commit, no push, no journal).
    pub dry_run: bool,
}

fn outcome_base(path: &Path, mode: SaveMode, reason: Reason) -> RepoOutcome {
    RepoOutcome {
        at: crate::events::now_rfc3339(),
        repo: path.display().to_string(),
        mode: mode.as_str().into(),
        reason: reason.as_str().into(),
        result: "started".into(),
        ..Default::default()
    }
}

/// Save every repository with unsaved work; returns one outcome per repository found.
/// Returns by `deadline` even when a push is stuck.
pub async fn save_all(
    cfg: &SaveConfig,
    env: &SaveEnv,
    req: &SaveRequest,
    deadline: tokio::time::Instant,
) -> Vec<RepoOutcome> {
    fsids::allow_foreign_owners();
    let journal = Arc::new(Journal::new(&env.state_dir));

    // Discovery.
    let roots: Vec<PathBuf> = cfg
        .roots
        .iter()
        .map(|r| crate::config::expand_home(r, &env.home))
        .collect();
    let explicit: Vec<PathBuf> = cfg
        .repos
        .iter()
        .map(|r| crate::config::expand_home(r, &env.home))
        .collect();
    let (depth, only) = (cfg.depth, req.only.clone());
    let state_dir = env.state_dir.clone();
    let found = tokio::task::spawn_blocking(move || {
        let mut found = match &only {
            Some(p) => only_repo(p),
            None => discover::discover(&roots, depth, &explicit),
        };
        found.sort_by(|a, b| b.level.cmp(&a.level).then(a.path.cmp(&b.path)));
        (found, journal::last_finished(&state_dir))
    });
    let (found, previous) = match tokio::time::timeout_at(deadline, found).await {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "repository discovery failed");
            return Vec::new();
        }
        Err(_) => {
            tracing::error!("deadline passed while looking for repositories");
            return Vec::new();
        }
    };
    tracing::info!(
        repos = found.len(),
        mode = cfg.mode.as_str(),
        "saving git work"
    );

    let known_hosts: Vec<String> = env
        .tokens
        .providers
        .values()
        .map(|p| p.host.to_ascii_lowercase())
        .collect();
    let ctx = Arc::new(repo::Ctx {
        mode: cfg.mode,
        ref_template: cfg.ref_template.clone(),
        max_file_size: cfg.max_file_size,
        workspace: env.workspace.clone(),
        owner_name: env.owner_name.clone(),
        owner_email: env.owner_email.clone(),
        reason: req.reason,
        known_hosts,
        previous,
        dry_run: req.dry_run,
    });
    let parallelism = cfg.parallelism.max(1);
    let started = std::time::Instant::now();

    // Local commits, deepest submodules first, one level at a time.
    let mut prepared: Vec<repo::Prepared> = Vec::new();
    let levels: BTreeSet<usize> = found.iter().map(|f| f.level).collect();
    for level in levels.into_iter().rev() {
        let batch: Vec<discover::Found> =
            found.iter().filter(|f| f.level == level).cloned().collect();
        let results: Vec<repo::Prepared> = futures::stream::iter(batch.into_iter().map(|f| {
            let ctx = ctx.clone();
            let journal = journal.clone();
            async move {
                let base = outcome_base(&f.path, ctx.mode, ctx.reason);
                if !ctx.dry_run
                    && let Err(e) = journal.append(&base)
                {
                    tracing::warn!(error = %e, "save journal");
                }
                let mut fallback = base.clone();
                let task = tokio::task::spawn_blocking(move || repo::prepare(&ctx, &f, base));
                match tokio::time::timeout_at(deadline, task).await {
                    Ok(Ok(p)) => p,
                    Ok(Err(e)) => {
                        fallback.result = "failed".into();
                        fallback.error = Some(format!("internal error while committing: {e}"));
                        repo::Prepared {
                            outcome: fallback,
                            push: None,
                        }
                    }
                    Err(_) => {
                        fallback.result = "failed".into();
                        fallback.error =
                            Some("deadline passed before the local commit was made".into());
                        repo::Prepared {
                            outcome: fallback,
                            push: None,
                        }
                    }
                }
            }
        }))
        .buffer_unordered(parallelism)
        .collect()
        .await;
        prepared.extend(results);
    }

    // Credentials, once per host, before any push (a fresh fetch is async).
    let mut creds: BTreeMap<String, Vec<crate::tokens::Credential>> = BTreeMap::new();
    for p in prepared.iter().filter_map(|p| p.push.as_ref()) {
        if creds.contains_key(&p.authority) {
            continue;
        }
        let host = p.authority.clone();
        let mut c = tokio::time::timeout_at(deadline, env.tokens.for_host(&host))
            .await
            .unwrap_or_default();
        if c.is_empty()
            && let Some((h, _)) = host.rsplit_once(':')
        {
            c = tokio::time::timeout_at(deadline, env.tokens.for_host(h))
                .await
                .unwrap_or_default();
        }
        creds.insert(host, c);
    }
    let creds = Arc::new(creds);

    // A push blocked on a silent server must not outlive the deadline by much: libgit2
    // gives up on a socket after this long (a process-wide setting).
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    let timeout_ms = remaining.as_millis().clamp(1000, i32::MAX as u128) as i32;
    // SAFETY: plain integer settings of libgit2, set before this save's pushes start.
    unsafe {
        let _ = git2::opts::set_server_timeout_in_milliseconds(timeout_ms);
        let _ = git2::opts::set_server_connect_timeout_in_milliseconds(timeout_ms);
    }
    let std_deadline = deadline.into_std();

    // Pushes.
    let outcomes: Vec<RepoOutcome> = futures::stream::iter(prepared.into_iter().map(|p| {
        let creds = creds.clone();
        async move {
            let repo::Prepared { mut outcome, push } = p;
            let Some(plan) = push else {
                return outcome;
            };
            let c = creds.get(&plan.authority).cloned().unwrap_or_default();
            let task = tokio::task::spawn_blocking(move || repo::push(&plan, &c, std_deadline));
            match tokio::time::timeout_at(deadline, task).await {
                Ok(Ok(r)) => {
                    if r.pushed {
                        outcome.result = "pushed".into();
                        outcome.pushed = true;
                        if let Some(rf) = r.pushed_ref {
                            outcome.r#ref = Some(rf);
                        }
                    }
                    if let Some(c) = r.commit {
                        outcome.commit = Some(c);
                    }
                    if let Some(n) = r.note {
                        outcome.note = Some(match outcome.note.take() {
                            Some(o) => format!("{o}; {n}"),
                            None => n,
                        });
                    }
                    if let Some(e) = r.error {
                        outcome.error = Some(format!("not pushed: {e}"));
                    }
                }
                Ok(Err(e)) => {
                    outcome.error = Some(format!("not pushed: internal error: {e}"));
                }
                Err(_) => {
                    outcome.error =
                        Some("not pushed: deadline passed while pushing; committed locally".into());
                }
            }
            outcome
        }
    }))
    .buffer_unordered(parallelism)
    .collect()
    .await;

    let mut outcomes = outcomes;
    let total = started.elapsed();
    for o in &mut outcomes {
        o.duration_ms = total.as_millis() as u64;
        if let Some(e) = &o.error {
            o.error = Some(crate::secrets::redact(e).into_owned());
        }
        if !req.dry_run
            && let Err(e) = journal.append(o)
        {
            tracing::warn!(error = %e, "save journal");
        }
        report(env, o);
    }
    outcomes.sort_by(|a, b| a.repo.cmp(&b.repo));
    outcomes
}

/// The repository containing `path` (for `wsagent save --only`).
fn only_repo(path: &Path) -> Vec<discover::Found> {
    match git2::Repository::discover(path) {
        Ok(r) => {
            let p = r.workdir().unwrap_or(r.path()).to_path_buf();
            let p = std::fs::canonicalize(&p).unwrap_or(p);
            vec![discover::Found {
                path: p,
                bare: r.is_bare(),
                level: 0,
            }]
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no repository to save there");
            Vec::new()
        }
    }
}

fn report(env: &SaveEnv, o: &RepoOutcome) {
    let (level, line) = match o.result.as_str() {
        "pushed" => (
            Level::Info,
            format!(
                "saved {}: pushed {} to {}",
                o.repo,
                o.r#ref.as_deref().unwrap_or("?"),
                o.remote.as_deref().unwrap_or("?")
            ),
        ),
        "committed" => (
            Level::Warn,
            format!(
                "saved {} locally on {}, not pushed{}",
                o.repo,
                o.r#ref.as_deref().unwrap_or("?"),
                o.error
                    .as_deref()
                    .or(o.note.as_deref())
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
        ),
        "failed" => (
            Level::Error,
            format!(
                "could not save {}: {}",
                o.repo,
                o.error.as_deref().unwrap_or("unknown error")
            ),
        ),
        other => (Level::Info, format!("{}: {other}", o.repo)),
    };
    let line = match (&o.note, o.result.as_str()) {
        (Some(n), "pushed") => format!("{line} ({n})"),
        _ => line,
    };
    if !o.left_out.is_empty() {
        tracing::warn!(repo = %o.repo, left_out = ?o.left_out, "files left out of the save");
    }
    match level {
        Level::Error => tracing::error!(repo = %o.repo, result = %o.result, "{line}"),
        Level::Warn => tracing::warn!(repo = %o.repo, result = %o.result, "{line}"),
        _ => tracing::info!(repo = %o.repo, result = %o.result, "{line}"),
    }
    env.events
        .emit(level, EventKind::Save { outcome: o.clone() }, line);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named_by_key() {
        assert!(validate(&SaveConfig::default()).is_empty());
        let bad = SaveConfig {
            parallelism: 0,
            ref_template: "wip/{branch}".into(),
            roots: vec!["relative/dir".into()],
            ..Default::default()
        };
        let keys: Vec<String> = validate(&bad).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            ["save.parallelism", "save.roots", "save.ref_template"]
        );
        let unknown = SaveConfig {
            ref_template: "refs/heads/{user}/{branch}".into(),
            ..Default::default()
        };
        assert!(validate(&unknown)[0].1.contains("unknown placeholder"));
    }

    #[test]
    fn save_mode_and_roots_come_from_the_environment() {
        let l = crate::config::load(&crate::config::Sources {
            system_file: None,
            explicit: None,
            env: vec![
                ("WSAGENT_SAVE_MODE".into(), "branch".into()),
                ("WSAGENT_SAVE_ROOTS".into(), "/a:~/b".into()),
            ],
        })
        .unwrap();
        assert_eq!(l.config.save.mode, SaveMode::Branch);
        assert_eq!(l.config.save.roots, ["/a", "~/b"]);
        assert_eq!(l.config.save.max_file_size, 95 * 1024 * 1024);
        let err = crate::config::load(&crate::config::Sources {
            system_file: None,
            explicit: None,
            env: vec![("WSAGENT_SAVE_MODE".into(), "yolo".into())],
        })
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("environment WSAGENT_SAVE_MODE: save.mode"),
            "{err}"
        );
    }
}
