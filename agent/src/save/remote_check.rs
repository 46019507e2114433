//! At start: does a repository's remote hold a snapshot of this workspace and branch
//! that this worktree has not seen (issue 15 §3)? An earlier workspace of the same name
//! that died, or another workspace saving to the same ref, left work there; the user is
//! told, with the command that restores it. Nothing is restored without being asked.
//!
//! One request per repository (the refs the remote advertises), run off the start's
//! critical path. A remote snapshot is *seen* when it is the local snapshot ref's tip or
//! in its history, in HEAD's history, or what the journal says a save of this
//! repository pushed; [`still_unseen`] asks again, locally, so `wsagent status` stops
//! saying so once `wsagent restore` has brought it back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use agent_proto::local::RemoteSnapshot;
use git2::{Oid, Repository};

use super::{SaveConfig, SaveEnv};

/// The ref `wsagent restore` records the snapshot it restored in, so this check knows
/// the worktree has seen it.
pub const RESTORED_REF: &str = "refs/wsagent/restored";

/// What one repository's check needs, read locally before the request.
struct Target {
    path: PathBuf,
    url: String,
    display: String,
    authority: String,
    /// The snapshot ref this worktree saves to.
    want: String,
    branch: String,
}

/// The snapshots of this workspace's branches that the remotes hold and the worktrees
/// have not seen. Returns by `deadline`; a repository whose remote cannot be asked is
/// logged and skipped.
pub async fn newer_on_remote(
    cfg: &SaveConfig,
    env: &SaveEnv,
    deadline: tokio::time::Instant,
) -> Vec<RemoteSnapshot> {
    super::fsids::prepare_for_root(&env.home);
    super::repo::init_libgit2();
    let roots: Vec<PathBuf> = cfg
        .roots
        .iter()
        .map(|r| crate::paths::expand_home(r, &env.home))
        .collect();
    let explicit: Vec<PathBuf> = cfg
        .repos
        .iter()
        .map(|r| crate::paths::expand_home(r, &env.home))
        .collect();
    let exclude = super::exclude_set(&cfg.exclude, &env.home).unwrap_or_default();
    let template = super::fill_owner(&cfg.ref_template, env.ref_owner.as_deref());
    let (workspace, depth) = (env.workspace.clone(), cfg.depth);
    let known_hosts: Vec<String> = env
        .tokens
        .providers
        .values()
        .map(|p| p.host.to_ascii_lowercase())
        .collect();
    let state_dir = env.state_dir.clone();
    let targets = tokio::task::spawn_blocking(move || {
        let (found, _) = super::discover::discover_checked(&roots, depth, &explicit, &exclude);
        let suffixes = super::repo::ref_suffixes(&found, &template, &workspace);
        let targets: Vec<Target> = found
            .iter()
            .filter(|f| !f.bare)
            .filter_map(|f| {
                let (url, display, authority, want, branch) =
                    super::repo::snapshot_target(&f.path, &template, &workspace, &known_hosts)?;
                let want = want + suffixes.get(&f.path).map(String::as_str).unwrap_or("");
                Some(Target {
                    path: f.path.clone(),
                    url,
                    display,
                    authority,
                    want,
                    branch,
                })
            })
            .collect();
        (targets, super::journal::last_pushed(&state_dir))
    });
    let Ok(Ok((targets, pushed))) = tokio::time::timeout_at(deadline, targets).await else {
        return Vec::new();
    };
    let pushed = Arc::new(pushed);
    let checks = targets.into_iter().map(|t| {
        let (tokens, pushed, home) = (env.tokens.clone(), pushed.clone(), env.home.clone());
        async move {
            let creds = super::credentials_for(&tokens, &t.authority, deadline).await;
            let std_deadline = deadline.into_std();
            let work = tokio::task::spawn_blocking(move || {
                let adv = advertised(&t, &home, &creds, std_deadline);
                (t, adv)
            });
            let Ok(Ok((t, adv))) = tokio::time::timeout_at(deadline, work).await else {
                return Vec::new();
            };
            let adv = match adv {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(repo = %t.path.display(), remote = %t.display, error = %e, "cannot ask the remote for its snapshots");
                    return Vec::new();
                }
            };
            let repo_key = t.path.display().to_string();
            let ours = pushed.get(&repo_key).cloned().unwrap_or_default();
            unseen(&t, &adv, &ours)
        }
    });
    futures::future::join_all(checks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// The remote's refs (one request: the upload-pack advertisement).
fn advertised(
    t: &Target,
    home: &Path,
    creds: &[crate::tokens::Credential],
    deadline: std::time::Instant,
) -> Result<BTreeMap<String, Oid>, String> {
    let repo = Repository::open(&t.path).map_err(|e| e.message().to_string())?;
    let _owner = super::fsids::AsOwner::of(repo.commondir());
    let http = repo
        .config()
        .map(|c| crate::githttp::HttpConfig::from_git(&c, &t.display, home))
        .unwrap_or_default();
    let _scope = crate::githttp::Scope::new(creds, Some(deadline)).with_http(http);
    let mut remote = repo
        .remote_anonymous(&t.url)
        .map_err(|e| e.message().to_string())?;
    let mut cbs = git2::RemoteCallbacks::new();
    cbs.credentials(|_, _, _| {
        Err(git2::Error::from_str(
            "the remote asks for a credential other than a token over HTTPS",
        ))
    });
    let conn = remote
        .connect_auth(git2::Direction::Fetch, Some(cbs), None)
        .map_err(|e| {
            crate::secrets::redact(&super::url::scrub_userinfo(e.message())).into_owned()
        })?;
    let list = conn.list().map_err(|e| e.message().to_string())?;
    Ok(list
        .iter()
        .map(|h| (h.name().to_string(), h.oid()))
        .collect())
}

/// The snapshots of `t`'s family the remote has and the worktree has not seen.
fn unseen(
    t: &Target,
    adv: &BTreeMap<String, Oid>,
    pushed: &BTreeMap<String, Oid>,
) -> Vec<RemoteSnapshot> {
    let Ok(repo) = Repository::open(&t.path) else {
        return Vec::new();
    };
    let _owner = super::fsids::AsOwner::of(repo.commondir());
    adv.iter()
        .filter(|(r, _)| super::lease::same_family(r, &t.want))
        .filter(|(r, tip)| pushed.get(*r) != Some(tip) && !seen(&repo, &t.want, **tip))
        .map(|(r, tip)| notice(&t.path, r, *tip, &t.branch, &t.want))
        .collect()
}

/// Whether this repository knows `tip`: its snapshot ref `want`, HEAD or the snapshot
/// `wsagent restore` last brought back contains it.
fn seen(repo: &Repository, want: &str, tip: Oid) -> bool {
    if repo.find_commit(tip).is_err() {
        return false;
    }
    [want, "HEAD", RESTORED_REF].iter().any(|r| {
        repo.refname_to_id(r)
            .is_ok_and(|l| l == tip || repo.graph_descendant_of(l, tip).unwrap_or(false))
    })
}

fn notice(path: &Path, r: &str, tip: Oid, branch: &str, want: &str) -> RemoteSnapshot {
    let short = tip.to_string()[..12].to_string();
    let quoted = shell_quote(&path.display().to_string());
    RemoteSnapshot {
        repo: path.display().to_string(),
        branch: branch.to_string(),
        r#ref: r.to_string(),
        commit: tip.to_string(),
        local_ref: want.to_string(),
        command: format!("wsagent restore --repo {quoted} --snapshot {short}"),
    }
}

/// Whether `n` is still unseen by its repository (after a restore it is not).
pub fn still_unseen(n: &RemoteSnapshot) -> bool {
    let Ok(repo) = Repository::open(&n.repo) else {
        return true;
    };
    let Ok(tip) = Oid::from_str(&n.commit) else {
        return true;
    };
    !seen(&repo, &n.local_ref, tip)
}

/// What the dashboard and the log say about one.
pub fn message(n: &RemoteSnapshot) -> String {
    format!(
        "the remote has a snapshot of {} (branch {}) that this worktree has not seen: {} at {}; \
         restore it with `{}` (nothing is restored unless you ask)",
        n.repo,
        n.branch,
        n.r#ref,
        &n.commit[..12.min(n.commit.len())],
        n.command
    )
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@%,=".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_quoted_for_the_shell_only_when_needed() {
        assert_eq!(
            shell_quote("/home/me/projects/app"),
            "/home/me/projects/app"
        );
        assert_eq!(shell_quote("/home/me/my app"), "'/home/me/my app'");
        assert_eq!(shell_quote("/x/it's"), "'/x/it'\\''s'");
    }
}
