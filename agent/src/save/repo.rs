//! One repository's save, in two blocking steps: [`prepare`] makes the local commit
//! (snapshot ref or branch commit) and makes it durable; [`push`] sends it through a
//! temporary anonymous remote with credentials from a callback.
//!
//! The split lets the caller commit every repository before it spends the network time
//! on any push, so a slow server costs pushes, never local commits. Neither step writes
//! `.git/config`; the snapshot path does not write HEAD, the index or the worktree.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use agent_proto::save::RepoOutcome;
use git2::{ErrorCode, Oid, PushOptions, RemoteCallbacks, Repository, RepositoryState, Signature};

use super::discover::Found;
use super::fsids::AsOwner;
use super::objects::Staged;
use super::quiet::Look;
use super::url::RemoteUrl;
use super::worktree::{
    WorktreeTree, pending_changes, restore_skip_worktree, skip_worktree_paths, worktree_tree,
};
use super::{Reason, SaveMode};
use crate::tokens::Credential;
use agent_proto::save::SaveResult;

const EMPTY_TREE: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";

/// What a repository's save needs besides the repository.
pub(crate) struct Ctx {
    pub mode: SaveMode,
    pub ref_template: String,
    /// The fixed start of the configured template (`refs/heads/wip/`): local branches
    /// under it are snapshot refs, never the user's branches.
    pub ref_prefix: String,
    pub max_file_size: u64,
    pub workspace: String,
    pub owner_name: Option<String>,
    pub owner_email: Option<String>,
    pub reason: Reason,
    /// Hosts (`host` or `host:port`, lowercase) with a provider: their SSH remotes are
    /// pushed over HTTPS.
    pub known_hosts: Vec<String>,
    /// The last finished outcome of each repository (idempotence).
    pub previous: BTreeMap<String, RepoOutcome>,
    pub dry_run: bool,
    /// Repositories whose snapshot ref would collide with another's on the same remote
    /// (two clones on one branch): a suffix that keeps them apart ([`ref_suffixes`]).
    pub ref_suffix: RefSuffixes,
    /// What each repository's saves pushed, per remote ref (the journal): the lease.
    pub last_pushed: BTreeMap<String, BTreeMap<String, Oid>>,
    /// The user who asked (through the local API) for this save of what they named:
    /// the work is done with that user's permissions ([`AsOwner::of_repo`]).
    pub act_as: Option<super::fsids::Ids>,
}

/// [`ref_suffixes`] of every repository found, worked out when a save first needs one:
/// a checkpoint that finds every repository known unchanged opens none of them.
pub(crate) struct RefSuffixes {
    everyone: Vec<Found>,
    template: String,
    workspace: String,
    map: std::sync::OnceLock<BTreeMap<PathBuf, String>>,
}

impl RefSuffixes {
    pub fn new(everyone: Vec<Found>, template: String, workspace: String) -> RefSuffixes {
        RefSuffixes {
            everyone,
            template,
            workspace,
            map: std::sync::OnceLock::new(),
        }
    }

    /// The suffix of the repository at `path` (blocking; called with the daemon's own
    /// ids: it opens every repository).
    pub fn of(&self, path: &Path) -> String {
        self.map
            .get_or_init(|| ref_suffixes(&self.everyone, &self.template, &self.workspace))
            .get(path)
            .cloned()
            .unwrap_or_default()
    }
}

/// A checkpoint's outcome for a repository the dirty set knows unchanged since its last
/// settled save (`settled`: how that save ended), without opening it. Nothing a look
/// depends on changed since (the worktree, HEAD, the index, local branches, config), so
/// it would find this same tree on the same HEAD, and a checkpoint sends nothing for
/// it. `None` when the journal does not say that save pushed this tree: the repository
/// is then prepared as usual.
pub(crate) fn known_outcome(
    ctx: &Ctx,
    path: &Path,
    tree: &WorktreeTree,
    settled: SaveResult,
) -> Option<RepoOutcome> {
    let mut o = super::outcome_base(path, ctx.mode, ctx.reason);
    o.tree = Some(tree.tree.to_string());
    o.left_out = tree.left_out.clone();
    match settled {
        SaveResult::Clean => {
            o.result = SaveResult::Clean;
            Some(o)
        }
        SaveResult::Pushed | SaveResult::Unchanged => {
            let prev = ctx.previous.get(&o.repo)?;
            if prev.tree != o.tree || !prev.pushed || prev.error.is_some() {
                return None;
            }
            o.result = SaveResult::Unchanged;
            o.commit = prev.commit.clone();
            o.r#ref = prev.r#ref.clone();
            o.remote = prev.remote.clone();
            o.head = prev.head.clone();
            o.pushed = true;
            Some(o)
        }
        _ => None,
    }
}

/// Errors of the local half of a save.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("cannot open repository {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: git2::Error,
    },
    #[error("cannot read the worktree of {path}: {source}")]
    Worktree {
        path: String,
        #[source]
        source: git2::Error,
    },
    #[error(transparent)]
    Unreachable(#[from] super::fsids::Unreachable),
    #[error("cannot commit in {path}: {source}")]
    Commit {
        path: String,
        #[source]
        source: git2::Error,
    },
}

/// What to push once the local commit exists.
#[derive(Debug, Clone)]
pub(crate) struct PushPlan {
    pub repo_path: PathBuf,
    /// What libgit2 connects to (may carry the user's own userinfo: never logged).
    pub url: String,
    /// The URL without userinfo.
    pub display: String,
    /// `host` or `host:port`, for the token lookup.
    pub authority: String,
    /// The main push in branch mode: the branch.
    pub refspec: Option<String>,
    /// The main push in snapshot mode: the snapshot, under the lease.
    pub lease: Option<Lease>,
    pub branch: Option<BranchPush>,
    /// Other local branches with commits the remote lacks, saved on their snapshot refs.
    pub extra: Vec<ExtraPush>,
    /// As [`Ctx::act_as`].
    pub act_as: Option<super::fsids::Ids>,
}

/// A local branch other than HEAD's, pushed as it is to its snapshot ref.
#[derive(Debug, Clone)]
pub(crate) struct ExtraPush {
    pub branch: String,
    pub tip: Oid,
    /// `refs/heads/wip/...` on the remote.
    pub remote_ref: String,
    /// The remote-tracking ref recording that the remote has it (so the next save
    /// sees the branch as pushed).
    pub tracking_ref: String,
}

/// A snapshot push under the lease ([`super::lease`]): to `want` unless the remote's
/// tip there is someone else's.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    pub commit: Oid,
    pub want: String,
    /// What this repository's saves pushed before, per remote ref.
    pub last_pushed: BTreeMap<String, Oid>,
    /// The snapshot was pushed before (the journal says so): check that the remote still
    /// has it, push it again only when it does not.
    pub verify_only: bool,
}

/// Branch mode: where the branch goes, and the snapshot ref to fall back to.
#[derive(Debug, Clone)]
pub(crate) struct BranchPush {
    pub tracking_ref: Option<String>,
    pub commit: Oid,
    pub fallback_ref: String,
    /// The lease of the fallback push.
    pub last_pushed: BTreeMap<String, Oid>,
}

pub(crate) struct Prepared {
    pub outcome: RepoOutcome,
    pub push: Option<PushPlan>,
    /// The worktree's tree this save used (for the dirty set to remember).
    pub worktree: Option<WorktreeTree>,
}

/// Make the local commit of one repository. Never panics on odd repository states:
/// every problem becomes a `failed` outcome naming the repository. `look`: how much of
/// the worktree to look at, from the dirty set ([`super::quiet`]).
pub(crate) fn prepare(ctx: &Ctx, found: &Found, mut outcome: RepoOutcome, look: Look) -> Prepared {
    let mut worktree = None;
    match prepare_inner(ctx, found, &mut outcome, look, &mut worktree) {
        Ok(push) => Prepared {
            outcome,
            push,
            worktree,
        },
        Err(e) => {
            outcome.result = agent_proto::save::SaveResult::Failed;
            outcome.error = Some(crate::secrets::redact(&e.to_string()).into_owned());
            Prepared {
                outcome,
                push: None,
                worktree: None,
            }
        }
    }
}

fn add_note(outcome: &mut RepoOutcome, note: impl Into<String>) {
    let note = note.into();
    outcome.note = Some(match outcome.note.take() {
        Some(n) => format!("{n}; {note}"),
        None => note,
    });
}

fn prepare_inner(
    ctx: &Ctx,
    found: &Found,
    outcome: &mut RepoOutcome,
    look: Look,
    worktree: &mut Option<WorktreeTree>,
) -> Result<Option<PushPlan>, SaveError> {
    let path = found.path.display().to_string();
    let repo = Repository::open(&found.path).map_err(|source| SaveError::Open {
        path: path.clone(),
        source,
    })?;
    if repo.is_bare() {
        outcome.result = agent_proto::save::SaveResult::Clean;
        add_note(outcome, "bare repository: no worktree to commit");
        return Ok(None);
    }

    // Read what comes from config before taking the owner's ids (the daemon's global
    // config may not be readable by the owner).
    let config = repo.config().ok();
    let get = |k: &str| config.as_ref().and_then(|c| c.get_string(k).ok());
    let (name, email) = match (get("user.name"), get("user.email")) {
        (Some(n), Some(e)) if !n.trim().is_empty() && !e.trim().is_empty() => (n, e),
        _ => match (&ctx.owner_name, &ctx.owner_email) {
            (Some(n), Some(e)) => (n.clone(), e.clone()),
            (Some(n), None) => (n.clone(), "wsagent@localhost".into()),
            _ => ("wsagent".into(), "wsagent@localhost".into()),
        },
    };

    let (branch, head) = head_info(&repo).map_err(|source| SaveError::Open {
        path: path.clone(),
        source,
    })?;
    // Mid-rebase HEAD is detached; the snapshot is still that branch's work.
    let rebased = rebase_head_name(&repo);
    let remote = pick_remote(&repo, branch.as_deref().or(rebased.as_deref()));
    let merge = branch
        .as_deref()
        .and_then(|b| get(&format!("branch.{b}.merge")));
    drop(config);
    // With the daemon's ids: the first to ask opens every repository found.
    let suffix = ctx.ref_suffix.of(&found.path);

    let _owner = AsOwner::of_repo(&repo, ctx.act_as.as_ref());
    _owner.check_reachable(repo.commondir())?;

    let unpushed = match (head, &remote) {
        (Some(h), Some(_)) => is_unpushed(&repo, h, branch.as_deref()),
        _ => false,
    };
    let state = repo.state();
    if state != RepositoryState::Clean {
        add_note(
            outcome,
            format!(
                "repository is mid-{}: saved as it is, conflict markers included",
                state_name(state)
            ),
        );
    }
    if head.is_some() && branch.is_none() {
        add_note(outcome, "detached HEAD");
    }
    let extra = match &remote {
        // The branch being rebased is HEAD's work: it is in the snapshot.
        Some((name, _)) => other_unpushed_branches(
            &repo,
            branch.as_deref().or(rebased.as_deref()),
            &ctx.ref_template,
            &ctx.ref_prefix,
            &ctx.workspace,
            &suffix,
            name,
        ),
        None => Vec::new(),
    };
    outcome.head = head.map(|h| h.to_string());
    if ctx.dry_run {
        // Read-only: the status alone, no blob written.
        let files = pending_changes(&repo).map_err(|source| SaveError::Worktree {
            path: path.clone(),
            source,
        })?;
        let changed = files.len();
        let mut pending = Vec::new();
        if changed > 0 {
            pending.push(format!("{changed} changed paths"));
        }
        // What would go, and where.
        const SHOWN: usize = 200;
        outcome.files = files.iter().take(SHOWN).cloned().collect();
        if changed > SHOWN {
            outcome
                .files
                .push(format!("... and {} more", changed - SHOWN));
        }
        if let Some((_, u)) = &remote {
            outcome.remote = Some(push_url(u, &ctx.known_hosts).1);
            let mut r = snapshot_ref(
                &ctx.ref_template,
                &ctx.workspace,
                branch.as_deref().or(rebased.as_deref()),
                head,
            );
            r.push_str(&suffix);
            outcome.r#ref = Some(r);
        }
        if unpushed {
            pending.push("unpushed commits".to_string());
        }
        if !extra.is_empty() {
            let names: Vec<&str> = extra.iter().map(|e| e.branch.as_str()).collect();
            pending.push(format!("unpushed branches {}", names.join(", ")));
        }
        outcome.result = if pending.is_empty() {
            agent_proto::save::SaveResult::Clean
        } else {
            agent_proto::save::SaveResult::WouldSave
        };
        if !pending.is_empty() {
            add_note(outcome, pending.join(" and "));
        }
        return Ok(None);
    }

    // New objects are written to memory and reach the disk as one pack (objects.rs),
    // before anything refers to them.
    let worktree_err = |source| SaveError::Worktree {
        path: path.clone(),
        source,
    };
    // libgit2 finds a pack directory only when it opens the repository; `git init` always
    // makes one, a repository assembled by hand may not.
    let pack_dir = repo.commondir().join("objects/pack");
    let io_err = |p: &Path, e: std::io::Error| {
        worktree_err(git2::Error::from_str(&format!("{}: {e}", p.display())))
    };
    let repo = match std::fs::metadata(&pack_dir) {
        Ok(m) if m.is_dir() => repo,
        Ok(_) => {
            return Err(io_err(&pack_dir, std::io::Error::other("not a directory")));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&pack_dir).map_err(|e| io_err(&pack_dir, e))?;
            Repository::open(&found.path).map_err(worktree_err)?
        }
        Err(e) => return Err(io_err(&pack_dir, e)),
    };
    let odb = repo.odb().map_err(worktree_err)?;
    let mut staged = Staged::attach(&repo, &odb).map_err(worktree_err)?;
    let wt = match look {
        Look::Known(known, _) => known,
        Look::Only(paths) => worktree_tree(&repo, &mut staged, ctx.max_file_size, Some(&paths))
            .map_err(worktree_err)?,
        Look::Full => {
            worktree_tree(&repo, &mut staged, ctx.max_file_size, None).map_err(worktree_err)?
        }
    };
    *worktree = Some(wt.clone());
    outcome.tree = Some(wt.tree.to_string());
    outcome.left_out = wt.left_out.clone();
    let head_tree = head.and_then(|h| repo.find_commit(h).ok().map(|c| c.tree_id()));
    let dirty = match head_tree {
        Some(t) => t != wt.tree,
        None => wt.tree.to_string() != EMPTY_TREE,
    };
    let remote_url = remote.as_ref().map(|(_, u)| push_url(u, &ctx.known_hosts));
    if !dirty && !unpushed {
        let Some((url, display, authority)) = remote_url.filter(|_| !extra.is_empty()) else {
            outcome.result = agent_proto::save::SaveResult::Clean;
            if remote.is_none() {
                add_note(outcome, "no remote");
            }
            return Ok(None);
        };
        // The worktree is saved; other branches are not.
        outcome.result = agent_proto::save::SaveResult::Committed;
        outcome.remote = Some(display.clone());
        outcome.r#ref = Some(extra[0].remote_ref.clone());
        outcome.commit = Some(extra[0].tip.to_string());
        return Ok(Some(PushPlan {
            act_as: ctx.act_as.clone(),
            repo_path: found.path.clone(),
            url,
            display,
            authority,
            refspec: None,
            lease: None,
            branch: None,
            extra,
        }));
    }

    outcome.remote = remote_url.as_ref().map(|u| u.1.clone());
    let mut snap_ref = snapshot_ref(
        &ctx.ref_template,
        &ctx.workspace,
        branch.as_deref().or(rebased.as_deref()),
        head,
    );
    snap_ref.push_str(&suffix);

    let last_pushed = ctx
        .last_pushed
        .get(&outcome.repo)
        .cloned()
        .unwrap_or_default();
    // Idempotence: the same worktree on the same HEAD was already saved (to the snapshot
    // ref, or to the `@N` ref the lease moved it to).
    if let Some(prev) = ctx.previous.get(&outcome.repo)
        && prev.tree == outcome.tree
        && prev.head == outcome.head
        && prev.mode == outcome.mode
        && prev.remote == outcome.remote
        && prev
            .r#ref
            .as_deref()
            .is_some_and(|r| super::lease::same_family(r, &snap_ref))
        && (prev.pushed || (remote.is_none() && prev.result == SaveResult::Committed))
        && extra.is_empty()
    {
        outcome.result = agent_proto::save::SaveResult::Unchanged;
        outcome.commit = prev.commit.clone();
        outcome.r#ref = prev.r#ref.clone();
        outcome.pushed = prev.pushed;
        // A checkpoint trusts the journal (an idle interval sends no request); any other
        // save says "unchanged" only once the remote is seen to still have the snapshot
        // (one advertisement request), and pushes it again when it does not.
        let commit = prev.commit.as_deref().and_then(|c| Oid::from_str(c).ok());
        if ctx.reason == Reason::Checkpoint || !prev.pushed {
            return Ok(None);
        }
        let (Some(commit), Some((url, display, authority))) = (commit, remote_url) else {
            return Ok(None);
        };
        return Ok(Some(PushPlan {
            repo_path: found.path.clone(),
            url,
            display,
            authority,
            refspec: None,
            lease: Some(Lease {
                commit,
                want: snap_ref,
                last_pushed,
                verify_only: true,
            }),
            act_as: ctx.act_as.clone(),
            branch: None,
            extra,
        }));
    }

    let sig = Signature::now(&name, &email).map_err(|source| SaveError::Commit {
        path: path.clone(),
        source,
    })?;
    let commit_err = |source| SaveError::Commit {
        path: path.clone(),
        source,
    };
    let branch_label = branch.clone().unwrap_or_else(|| "(detached HEAD)".into());
    let message = format!(
        "wsagent: save of workspace {ws} ({reason})\n\nSaved by wsagent on {reason} of workspace {ws} at {at}.\nBranch: {branch_label}\n",
        ws = ctx.workspace,
        reason = ctx.reason.as_str(),
        at = crate::events::now_rfc3339(),
    );
    let tree = repo.find_tree(wt.tree).map_err(commit_err)?;
    let parent = head
        .map(|h| repo.find_commit(h))
        .transpose()
        .map_err(commit_err)?;
    let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();

    if ctx.mode == SaveMode::Branch {
        let blocked = if branch.is_none() {
            Some("detached HEAD".to_string())
        } else if state != RepositoryState::Clean {
            Some(format!("mid-{}", state_name(state)))
        } else if repo.path().join("index.lock").exists() {
            Some("the index is locked (index.lock exists)".to_string())
        } else {
            None
        };
        match blocked {
            Some(why) => add_note(
                outcome,
                format!("cannot commit on the branch ({why}): saved the snapshot ref instead"),
            ),
            None => {
                let b = branch.clone().unwrap_or_default();
                let new_head = if dirty {
                    let c = repo
                        .commit(None, &sig, &sig, &message, &tree, &parents)
                        .map_err(commit_err)?;
                    staged.flush().map_err(commit_err)?;
                    let mut index = repo.index().map_err(commit_err)?;
                    let workdir = repo.workdir().unwrap_or(found.path.as_path());
                    let sparse = skip_worktree_paths(&index, workdir);
                    index.read_tree(&tree).map_err(commit_err)?;
                    restore_skip_worktree(&mut index, &sparse).map_err(commit_err)?;
                    index.write().map_err(commit_err)?;
                    // What `commit(Some("HEAD"))` does: move the branch only from the
                    // parent it was made on, with git's reflog message.
                    let subject = message.lines().next().unwrap_or_default();
                    let branch_ref = format!("refs/heads/{b}");
                    match head {
                        Some(h) => repo.reference_matching(
                            &branch_ref,
                            c,
                            true,
                            h,
                            &format!("commit: {subject}"),
                        ),
                        None => repo.reference(
                            &branch_ref,
                            c,
                            false,
                            &format!("commit (initial): {subject}"),
                        ),
                    }
                    .map_err(commit_err)?;
                    c
                } else {
                    head.expect("unpushed implies a HEAD")
                };
                outcome.result = agent_proto::save::SaveResult::Committed;
                outcome.commit = Some(new_head.to_string());
                // The repository's state is now (tree, new HEAD): what the next save
                // compares against.
                outcome.head = Some(new_head.to_string());
                outcome.r#ref = Some(format!("refs/heads/{b}"));
                let Some((remote_name, _)) = &remote else {
                    add_note(outcome, "no remote: committed locally, not pushed");
                    return Ok(None);
                };
                let dst = merge.unwrap_or_else(|| format!("refs/heads/{b}"));
                let (url, display, authority) = remote_url.expect("remote has a url");
                let tracking_ref = dst
                    .strip_prefix("refs/heads/")
                    .map(|s| format!("refs/remotes/{remote_name}/{s}"));
                return Ok(Some(PushPlan {
                    act_as: ctx.act_as.clone(),
                    repo_path: found.path.clone(),
                    url,
                    display,
                    authority,
                    refspec: Some(format!("refs/heads/{b}:{dst}")),
                    lease: None,
                    branch: Some(BranchPush {
                        tracking_ref,
                        commit: new_head,
                        fallback_ref: snap_ref,
                        last_pushed: last_pushed.clone(),
                    }),
                    extra,
                }));
            }
        }
    }

    // The snapshot has git stash's shape, so plain git can put it back (`git stash
    // apply --index`): its tree is the worktree (untracked files included), parent 1 is
    // HEAD, parent 2 a commit of the index (the staged state) on HEAD. That index
    // commit's second parent is the previous snapshot of this branch: the snapshot ref
    // only ever fast-forwards and every earlier snapshot stays reachable.
    let previous = repo
        .find_reference(&snap_ref)
        .ok()
        .and_then(|r| r.peel_to_commit().ok());
    // A snapshot of this very state made before (e.g. its push failed) is reused.
    let earlier = previous
        .as_ref()
        .filter(|c| {
            c.tree_id() == wt.tree
                && c.parent_id(0).ok() == head
                && (head.is_none()
                    || wt.index_tree.is_none()
                    || c.parent(1).ok().map(|i| i.tree_id()) == wt.index_tree)
        })
        .map(|c| c.id());
    let commit = if let Some(c) = earlier.filter(|_| dirty) {
        c
    } else if dirty {
        // An earlier snapshot that HEAD already contains adds nothing to the history.
        let previous = previous.filter(|p| {
            Some(p.id()) != head
                && !head.is_some_and(|h| repo.graph_descendant_of(h, p.id()).unwrap_or(false))
        });
        let index_commit = match (parent.as_ref(), wt.index_tree) {
            (Some(h), Some(it)) => {
                let itree = repo.find_tree(it).map_err(commit_err)?;
                let mut ips = vec![h];
                ips.extend(previous.as_ref());
                let subject =
                    String::from_utf8_lossy(h.summary_bytes().unwrap_or_default()).into_owned();
                let imsg = format!(
                    "index on {branch_label}: {} {subject}\n",
                    &h.id().to_string()[..7]
                );
                Some(
                    repo.commit(None, &sig, &sig, &imsg, &itree, &ips)
                        .and_then(|i| repo.find_commit(i))
                        .map_err(commit_err)?,
                )
            }
            _ => None,
        };
        let mut ps = parents.clone();
        match &index_commit {
            Some(i) => ps.push(i),
            // No HEAD or a conflicted index: no stash shape, the history all the same.
            None => ps.extend(previous.as_ref()),
        }
        repo.commit(None, &sig, &sig, &message, &tree, &ps)
            .map_err(commit_err)?
    } else {
        head.expect("unpushed implies a HEAD")
    };
    staged.flush().map_err(commit_err)?;
    repo.reference(&snap_ref, commit, true, "wsagent: save snapshot")
        .map_err(commit_err)?;
    outcome.result = agent_proto::save::SaveResult::Committed;
    outcome.commit = Some(commit.to_string());
    outcome.r#ref = Some(snap_ref.clone());
    let Some((url, display, authority)) = remote_url else {
        add_note(outcome, "no remote: committed locally, not pushed");
        return Ok(None);
    };
    Ok(Some(PushPlan {
        act_as: ctx.act_as.clone(),
        repo_path: found.path.clone(),
        url,
        display,
        authority,
        refspec: None,
        lease: Some(Lease {
            commit,
            want: snap_ref,
            last_pushed,
            verify_only: false,
        }),
        branch: None,
        extra,
    }))
}

/// Local branches other than `current` whose tips no remote-tracking ref contains,
/// as pushes to their snapshot refs. The snapshot refs themselves are skipped (they
/// are local branches too); so is everything when the template's fixed prefix cannot
/// tell them apart from the user's branches.
fn other_unpushed_branches(
    repo: &Repository,
    current: Option<&str>,
    template: &str,
    prefix: &str,
    workspace: &str,
    suffix: &str,
    remote_name: &str,
) -> Vec<ExtraPush> {
    if prefix.len() <= "refs/heads/".len() || !prefix.starts_with("refs/heads/") {
        return Vec::new();
    }
    let Ok(branches) = repo.branches(Some(git2::BranchType::Local)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (b, _) in branches.flatten() {
        let (Some(name), Some(tip)) = (b.get().name().ok().map(str::to_string), b.get().target())
        else {
            continue;
        };
        let Some(short) = name.strip_prefix("refs/heads/") else {
            continue;
        };
        if Some(short) == current || name.starts_with(prefix) {
            continue;
        }
        if !is_unpushed(repo, tip, Some(short)) {
            continue;
        }
        let mut remote_ref = snapshot_ref(template, workspace, Some(short), Some(tip));
        remote_ref.push_str(suffix);
        let tracking_ref = format!(
            "refs/remotes/{remote_name}/{}",
            remote_ref
                .strip_prefix("refs/heads/")
                .unwrap_or(&remote_ref)
        );
        out.push(ExtraPush {
            branch: short.to_string(),
            tip,
            remote_ref,
            tracking_ref,
        });
    }
    out
}

/// The current branch (also when unborn) and the HEAD commit.
fn head_info(repo: &Repository) -> Result<(Option<String>, Option<Oid>), git2::Error> {
    match repo.head() {
        Ok(r) => {
            let head = r.peel_to_commit().ok().map(|c| c.id());
            let branch = r
                .is_branch()
                .then(|| r.shorthand().ok().map(str::to_string))
                .flatten();
            Ok((branch, head))
        }
        Err(e) if e.code() == ErrorCode::UnbornBranch || e.code() == ErrorCode::NotFound => {
            let b = repo
                .find_reference("HEAD")
                .ok()
                .and_then(|h| h.symbolic_target().ok().flatten().map(str::to_string))
                .and_then(|t| t.strip_prefix("refs/heads/").map(str::to_string));
            Ok((b, None))
        }
        Err(e) => Err(e),
    }
}

/// Where the repository at `path` saves its current branch: (url to connect to, url to
/// show, authority for the token, snapshot ref, branch label); `None` without a remote.
pub(crate) fn snapshot_target(
    path: &Path,
    template: &str,
    workspace: &str,
    known_hosts: &[String],
) -> Option<(String, String, String, String, String)> {
    let repo = Repository::open(path).ok()?;
    let (branch, head) = head_info(&repo).ok()?;
    let branch = branch.or_else(|| rebase_head_name(&repo));
    let (_, url) = pick_remote(&repo, branch.as_deref())?;
    let (url, display, authority) = push_url(&url, known_hosts);
    let want = snapshot_ref(template, workspace, branch.as_deref(), head);
    let label = branch.unwrap_or_else(|| "(detached HEAD)".into());
    Some((url, display, authority, want, label))
}

/// Suffixes for repositories that would push the same snapshot ref to the same remote
/// (e.g. two clones of one project on `main`): the first by path keeps the plain ref,
/// the others get `-<hash of their path>`, the same on every save.
pub(crate) fn ref_suffixes(
    found: &[Found],
    template: &str,
    workspace: &str,
) -> BTreeMap<PathBuf, String> {
    let mut groups: BTreeMap<(String, String), Vec<PathBuf>> = BTreeMap::new();
    for f in found.iter().filter(|f| !f.bare) {
        let Ok(repo) = Repository::open(&f.path) else {
            continue;
        };
        // The commit of HEAD names only a detached HEAD's ref: on a branch, reading it
        // (a pack index mapped and unmapped per repository) is not needed.
        let on_branch = repo
            .head()
            .ok()
            .filter(|r| r.is_branch())
            .and_then(|r| r.shorthand().ok().map(str::to_string));
        let (branch, head) = match on_branch {
            Some(b) => (Some(b), None),
            None => match head_info(&repo) {
                Ok(h) => h,
                Err(_) => continue,
            },
        };
        let rebased = rebase_head_name(&repo);
        let branch = branch.or(rebased);
        let Some((_, url)) = pick_remote(&repo, branch.as_deref()) else {
            continue;
        };
        let r = snapshot_ref(template, workspace, branch.as_deref(), head);
        let url = super::url::redact_userinfo(&url)
            .trim_end_matches('/')
            .trim_end_matches(".git")
            .to_ascii_lowercase();
        groups.entry((url, r)).or_default().push(f.path.clone());
    }
    let mut out = BTreeMap::new();
    for (_, mut paths) in groups {
        paths.sort();
        for p in paths.into_iter().skip(1) {
            // FNV-1a: stable across runs and builds, unlike std's hasher.
            let mut h: u64 = 0xcbf29ce484222325;
            for b in p.as_os_str().as_encoded_bytes() {
                h ^= *b as u64;
                h = h.wrapping_mul(0x100000001b3);
            }
            out.insert(p, format!("-{:08x}", h as u32));
        }
    }
    out
}

/// The branch being rebased, from `rebase-merge/head-name` or `rebase-apply/head-name`.
fn rebase_head_name(repo: &Repository) -> Option<String> {
    ["rebase-merge/head-name", "rebase-apply/head-name"]
        .iter()
        .find_map(|f| std::fs::read_to_string(repo.path().join(f)).ok())
        .and_then(|t| t.trim().strip_prefix("refs/heads/").map(str::to_string))
}

fn state_name(s: RepositoryState) -> &'static str {
    match s {
        RepositoryState::Clean => "clean",
        RepositoryState::Merge => "merge",
        RepositoryState::Revert | RepositoryState::RevertSequence => "revert",
        RepositoryState::CherryPick | RepositoryState::CherryPickSequence => "cherry-pick",
        RepositoryState::Bisect => "bisect",
        RepositoryState::Rebase
        | RepositoryState::RebaseInteractive
        | RepositoryState::RebaseMerge => "rebase",
        RepositoryState::ApplyMailbox | RepositoryState::ApplyMailboxOrRebase => "am",
    }
}

/// The remote to push to: the branch's upstream remote, else `origin`, else the first.
fn pick_remote(repo: &Repository, branch: Option<&str>) -> Option<(String, String)> {
    let names = repo.remotes().ok()?;
    let names: Vec<String> = names
        .iter()
        .filter_map(|n| n.ok().flatten().map(str::to_string))
        .collect();
    let upstream = branch.and_then(|b| {
        repo.branch_upstream_remote(&format!("refs/heads/{b}"))
            .ok()
            .and_then(|buf| buf.as_str().ok().map(str::to_string))
    });
    let name = upstream
        .filter(|n| names.contains(n))
        .or_else(|| names.iter().find(|n| *n == "origin").cloned())
        .or_else(|| names.first().cloned())?;
    let r = repo.find_remote(&name).ok()?;
    let url = r
        .pushurl()
        .ok()
        .flatten()
        .or_else(|| r.url().ok())?
        .to_string();
    Some((name, url))
}

/// (url to push to, url to show, authority for the token lookup).
fn push_url(url: &str, known_hosts: &[String]) -> (String, String, String) {
    let Some(u) = RemoteUrl::parse(url) else {
        let d = super::url::redact_userinfo(url);
        return (url.to_string(), d, String::new());
    };
    if u.is_ssh() && known_hosts.iter().any(|h| h.eq_ignore_ascii_case(u.host())) {
        let twin = u.https_twin();
        return (twin.clone(), twin, u.host().to_string());
    }
    (url.to_string(), u.display(), u.authority.clone())
}

/// HEAD has commits the remote lacks: ahead of its upstream, or (no upstream) not
/// contained in any remote-tracking ref.
fn is_unpushed(repo: &Repository, head: Oid, branch: Option<&str>) -> bool {
    if let Some(b) = branch
        && let Ok(br) = repo.find_branch(b, git2::BranchType::Local)
        && let Ok(up) = br.upstream()
        && let Some(up) = up.get().target()
    {
        return repo
            .graph_ahead_behind(head, up)
            .map(|(ahead, _)| ahead > 0)
            .unwrap_or(true);
    }
    let Ok(refs) = repo.references_glob("refs/remotes/*") else {
        return true;
    };
    for r in refs.flatten() {
        if let Some(t) = r.target()
            && (t == head || repo.graph_descendant_of(t, head).unwrap_or(false))
        {
            return false;
        }
    }
    true
}

/// `refs/heads/wip/{workspace}/{branch}` with the placeholders filled; a detached HEAD
/// is `detached-<short sha>`.
pub(crate) fn snapshot_ref(
    template: &str,
    workspace: &str,
    branch: Option<&str>,
    head: Option<Oid>,
) -> String {
    let branch = match (branch, head) {
        (Some(b), _) => b.to_string(),
        (None, Some(h)) => format!("detached-{}", &h.to_string()[..7]),
        (None, None) => "detached".into(),
    };
    let ws = sanitize(workspace);
    let r = template
        .replace("{workspace}", &ws)
        .replace("{branch}", &branch);
    if git2::Reference::is_valid_name(&r) {
        r
    } else {
        format!("refs/heads/wip/{ws}/{}", sanitize(&branch))
    }
}

fn sanitize(s: &str) -> String {
    let out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let out = out.trim_matches('.').to_string();
    if out.is_empty() {
        "workspace".into()
    } else {
        out
    }
}

/// Make a repository's new objects and refs durable now: one `syncfs` of the filesystem
/// holding its git directory. Only for the rare write made after the save-wide sync (the
/// snapshot ref of a branch push that fell back); see [`sync_filesystems`].
fn sync_repo(repo: &Repository) {
    sync_dir(repo.commondir());
}

/// Once per process, before libgit2 writes anything: verify object hashes as they are
/// read (a corrupt object fails its repository's save, it is not pushed).
pub(crate) fn init_libgit2() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| git2::opts::strict_hash_verification(true));
}

/// Flush every filesystem holding one of `dirs`, once each (`syncfs`). The save calls it
/// once all local commits are made, beside the pushes: one flush per filesystem instead
/// of an fsync per object written (libgit2's option: one per loose object).
pub(crate) fn sync_filesystems(dirs: &[PathBuf]) {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::BTreeSet::new();
    for d in dirs {
        let dev = std::fs::metadata(d).map(|m| m.dev()).ok();
        if seen.insert(dev) {
            sync_dir(d);
        }
    }
}

/// One `syncfs` of the filesystem holding `dir`; a failure is said, naming the place
/// (the commits are then only as durable as the kernel's own writeback makes them).
fn sync_dir(dir: &Path) {
    use std::os::fd::AsRawFd;
    let f = match std::fs::File::open(dir) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot open to sync its filesystem: the new commits are not flushed");
            return;
        }
    };
    // SAFETY: the fd is valid for the lifetime of `f`.
    if unsafe { libc::syncfs(f.as_raw_fd()) } < 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(dir = %dir.display(), error = %e, "syncfs failed: the new commits may not be on disk yet");
    }
}

/// How a push ended.
#[derive(Debug, Default)]
pub(crate) struct PushResult {
    pub pushed: bool,
    /// The ref that landed on the remote (the snapshot ref after a branch fallback).
    pub pushed_ref: Option<String>,
    pub commit: Option<String>,
    pub note: Option<String>,
    pub error: Option<String>,
}

enum PushFail {
    Auth(String),
    Deadline(String),
    Rejected(String),
    Other(String),
}

impl PushFail {
    fn message(&self) -> &str {
        match self {
            PushFail::Auth(m)
            | PushFail::Deadline(m)
            | PushFail::Rejected(m)
            | PushFail::Other(m) => m,
        }
    }
}

/// Push a prepared commit. Blocking; gives up at `deadline` when libgit2 lets it.
pub(crate) fn push(plan: &PushPlan, creds: &[Credential], deadline: Instant) -> PushResult {
    let mut res = PushResult::default();
    let repo = match Repository::open(&plan.repo_path) {
        Ok(r) => r,
        Err(e) => {
            res.error = Some(format!(
                "cannot open repository {}: {}",
                plan.repo_path.display(),
                e.message()
            ));
            return res;
        }
    };
    let _owner = AsOwner::of_repo(&repo, plan.act_as.as_ref());
    if let Some(lease) = &plan.lease {
        push_snapshot(&repo, plan, lease, creds, deadline, &mut res);
    } else if let Some(spec) = &plan.refspec {
        push_main(&repo, plan, spec, creds, deadline, &mut res);
    }
    if !plan.extra.is_empty() {
        push_extra(&repo, plan, creds, deadline, &mut res);
    }
    res
}

fn add_res_note(res: &mut PushResult, note: String) {
    res.note = Some(match res.note.take() {
        Some(n) => format!("{n}; {note}"),
        None => note,
    });
}

/// Whether the local history of `new` contains `tip` (false for an object we lack).
fn contains(repo: &Repository, new: Oid, tip: Oid) -> bool {
    tip == new
        || (repo.find_commit(tip).is_ok() && repo.graph_descendant_of(new, tip).unwrap_or(false))
}

/// Where a leased push landed.
struct Landed {
    dst: String,
    /// The remote had the snapshot there already: nothing was sent.
    there: bool,
    taken: Vec<(String, Oid)>,
}

/// Push `lease.commit` to its snapshot ref under the lease ([`super::lease`]): the
/// destination is chosen from the advertisement of the same connection.
fn push_leased(
    repo: &Repository,
    plan: &PushPlan,
    lease: &Lease,
    creds: &[Credential],
    deadline: Instant,
) -> Result<Landed, PushFail> {
    let landed = RefCell::new(None);
    let mut decide = |adv: &Advertised| {
        let v = super::lease::decide(adv, &lease.want, lease.commit, &lease.last_pushed, &|t| {
            contains(repo, lease.commit, t)
        });
        match v {
            super::lease::Verdict::There { dst } => {
                *landed.borrow_mut() = Some(Landed {
                    dst,
                    there: true,
                    taken: Vec::new(),
                });
                Ok(Vec::new())
            }
            super::lease::Verdict::Push { dst, taken, .. } => {
                let spec = format!("+{}:{dst}", lease.commit);
                *landed.borrow_mut() = Some(Landed {
                    dst,
                    there: false,
                    taken,
                });
                Ok(vec![spec])
            }
            super::lease::Verdict::NoRoom { taken } => {
                let names: Vec<&str> = taken.iter().map(|(r, _)| r.as_str()).collect();
                Err(PushFail::Rejected(format!(
                    "every snapshot ref for this branch holds work that is not this \
                     workspace's ({}): nothing overwritten",
                    names.join(", ")
                )))
            }
        }
    };
    let candidates = [format!("{}:{}", lease.commit, lease.want)];
    push_once(repo, plan, &candidates, &mut decide, creds, deadline)?;
    landed
        .into_inner()
        .ok_or_else(|| PushFail::Other("the remote advertised no refs".into()))
}

/// The snapshot push (or, for a save that found nothing new, the check that the remote
/// still has the snapshot, pushing it again when it does not).
fn push_snapshot(
    repo: &Repository,
    plan: &PushPlan,
    lease: &Lease,
    creds: &[Credential],
    deadline: Instant,
    res: &mut PushResult,
) {
    let short = &lease.commit.to_string()[..12];
    match push_leased(repo, plan, lease, creds, deadline) {
        Ok(l) => {
            if !l.taken.is_empty() {
                add_res_note(res, super::lease::taken_note(&l.taken, &l.dst));
            }
            if l.there && lease.verify_only {
                // Still there: the outcome stays `unchanged`.
                return;
            }
            res.pushed = true;
            res.pushed_ref = Some(l.dst.clone());
            if lease.verify_only {
                add_res_note(
                    res,
                    format!(
                        "the remote no longer had snapshot {short} (ref deleted or \
                         overwritten): pushed it again to {}",
                        l.dst
                    ),
                );
            } else if l.there {
                add_res_note(res, format!("the remote already had it on {}", l.dst));
            }
        }
        Err(f) if lease.verify_only => {
            res.error = Some(format!(
                "cannot check that the remote still has snapshot {short}: {}",
                f.message()
            ));
        }
        Err(f) => res.error = Some(f.message().to_string()),
    }
}

/// Other local branches with unpushed commits, each to its snapshot ref under the
/// lease (their last push is their remote-tracking ref).
fn push_extra(
    repo: &Repository,
    plan: &PushPlan,
    creds: &[Credential],
    deadline: Instant,
    res: &mut PushResult,
) {
    let chosen: RefCell<Vec<String>> = RefCell::new(Vec::new());
    let taken: RefCell<Vec<(String, Oid)>> = RefCell::new(Vec::new());
    let mut decide = |adv: &Advertised| {
        let mut specs = Vec::new();
        let mut dsts = Vec::new();
        for e in &plan.extra {
            let last: BTreeMap<String, Oid> = repo
                .refname_to_id(&e.tracking_ref)
                .ok()
                .map(|t| (e.remote_ref.clone(), t))
                .into_iter()
                .collect();
            match super::lease::decide(adv, &e.remote_ref, e.tip, &last, &|t| {
                contains(repo, e.tip, t)
            }) {
                super::lease::Verdict::There { dst } => dsts.push(dst),
                super::lease::Verdict::Push { dst, taken: t, .. } => {
                    specs.push(format!("+{}:{dst}", e.tip));
                    taken.borrow_mut().extend(t);
                    dsts.push(dst);
                }
                super::lease::Verdict::NoRoom { .. } => {
                    return Err(PushFail::Rejected(format!(
                        "every snapshot ref for branch {} holds work that is not this \
                         workspace's: nothing overwritten",
                        e.branch
                    )));
                }
            }
        }
        *chosen.borrow_mut() = dsts;
        Ok(specs)
    };
    let names = |dsts: &[String]| -> Vec<String> {
        plan.extra
            .iter()
            .enumerate()
            .map(|(i, e)| format!("{} -> {}", e.branch, dsts.get(i).unwrap_or(&e.remote_ref)))
            .collect()
    };
    let candidates: Vec<String> = plan
        .extra
        .iter()
        .map(|e| format!("{}:{}", e.tip, e.remote_ref))
        .collect();
    match push_once(repo, plan, &candidates, &mut decide, creds, deadline) {
        Ok(()) => {
            let dsts = chosen.into_inner();
            for e in &plan.extra {
                let _ = repo.reference(&e.tracking_ref, e.tip, true, "wsagent: pushed");
            }
            add_res_note(
                res,
                format!("unpushed branches saved: {}", names(&dsts).join(", ")),
            );
            let taken = taken.into_inner();
            if !taken.is_empty() {
                let first = dsts.first().cloned().unwrap_or_default();
                add_res_note(res, super::lease::taken_note(&taken, &first));
            }
            if plan.refspec.is_none() && plan.lease.is_none() {
                res.pushed = true;
                res.pushed_ref = dsts
                    .first()
                    .cloned()
                    .or_else(|| Some(plan.extra[0].remote_ref.clone()));
            }
        }
        Err(f) => {
            let e = format!(
                "branches {} not pushed: {}",
                names(&[]).join(", "),
                f.message()
            );
            res.error = Some(match res.error.take() {
                Some(old) => format!("{old}; {e}"),
                None => e,
            });
        }
    }
}

/// The main push in branch mode, with its fallback to the snapshot ref.
fn push_main(
    repo: &Repository,
    plan: &PushPlan,
    spec: &str,
    creds: &[Credential],
    deadline: Instant,
    res: &mut PushResult,
) {
    let fixed = |_: &Advertised| Ok(vec![spec.to_string()]);
    match push_once(
        repo,
        plan,
        &[spec.to_string()],
        &mut { fixed },
        creds,
        deadline,
    ) {
        Ok(()) => {
            res.pushed = true;
            res.pushed_ref = spec.split(':').nth(1).map(str::to_string);
            if let Some(b) = &plan.branch
                && let Some(t) = &b.tracking_ref
            {
                // Keeps `git status` honest and the next save idempotent; not config.
                let _ = repo.reference(t, b.commit, true, "wsagent: pushed");
            }
        }
        Err(fail) => {
            let msg = fail.message().to_string();
            match (&plan.branch, &fail) {
                (Some(b), PushFail::Rejected(_) | PushFail::Other(_)) => {
                    let snap = &b.fallback_ref;
                    if let Err(e) = repo.reference(snap, b.commit, true, "wsagent: save snapshot") {
                        res.error = Some(format!(
                            "branch push failed: {msg}; cannot write {snap}: {}",
                            e.message()
                        ));
                        return;
                    }
                    sync_repo(repo);
                    res.commit = Some(b.commit.to_string());
                    let lease = Lease {
                        commit: b.commit,
                        want: snap.clone(),
                        last_pushed: b.last_pushed.clone(),
                        verify_only: false,
                    };
                    match push_leased(repo, plan, &lease, creds, deadline) {
                        Ok(l) => {
                            res.pushed = true;
                            res.pushed_ref = Some(l.dst.clone());
                            res.note = Some(format!(
                                "branch push failed ({msg}): pushed the snapshot ref {} instead",
                                l.dst
                            ));
                            if !l.taken.is_empty() {
                                add_res_note(res, super::lease::taken_note(&l.taken, &l.dst));
                            }
                        }
                        Err(f2) => {
                            res.error = Some(format!(
                                "branch push failed: {msg}; snapshot push failed: {}",
                                f2.message()
                            ));
                        }
                    }
                }
                _ => res.error = Some(msg),
            }
        }
    }
}

/// What the remote advertised: ref name → tip.
type Advertised = BTreeMap<String, Oid>;

/// One push on one connection: the refs the remote advertises (the request every push
/// starts with) go to `refspecs`, which says what to push (nothing: no second request).
fn push_once(
    repo: &Repository,
    plan: &PushPlan,
    candidates: &[String],
    refspecs: &mut dyn FnMut(&Advertised) -> Result<Vec<String>, PushFail>,
    creds: &[Credential],
    deadline: Instant,
) -> Result<(), PushFail> {
    let clean = |m: &str| {
        let m = super::url::scrub_userinfo(&m.replace(&plan.url, &plan.display));
        crate::secrets::redact(&m).into_owned()
    };
    if Instant::now() >= deadline {
        return Err(PushFail::Deadline("deadline passed before the push".into()));
    }
    // An in-memory remote: nothing about it (URL, credentials) reaches .git/config.
    let mut remote = repo
        .remote_anonymous(&plan.url)
        .map_err(|e| PushFail::Other(clean(e.message())))?;
    // The HTTP transport (crate::githttp) sends the first credential with the first
    // request and the next one after each 401; the list running out is an auth failure.
    let http = repo
        .config()
        .map(|c| crate::githttp::HttpConfig::from_git(&c, &plan.display, &crate::paths::home_dir()))
        .unwrap_or_default();
    let (filter, pack) = push_bases(repo, plan, candidates);
    let scope = crate::githttp::Scope::new(creds, Some(deadline))
        .with_http(http)
        .with_ref_filter(filter)
        .with_pack(pack);
    let rejected: RefCell<Vec<String>> = RefCell::new(Vec::new());
    // What the remote says on git's sideband (hook output: `remote: ...` in git's CLI).
    let said: RefCell<Vec<u8>> = RefCell::new(Vec::new());
    let mut decided: Option<PushFail> = None;
    let result = (|| {
        let not_a_token = |_: &str, _: Option<&str>, _: git2::CredentialType| {
            Err(git2::Error::from_str(
                "the remote asks for a credential other than a token over HTTPS",
            ))
        };
        let mut connect = RemoteCallbacks::new();
        connect.credentials(not_a_token);
        let mut conn = remote.connect_auth(git2::Direction::Push, Some(connect), None)?;
        let advertised: Advertised = conn
            .list()?
            .iter()
            .map(|h| (h.name().to_string(), h.oid()))
            .collect();
        let specs = match refspecs(&advertised) {
            Ok(s) if s.is_empty() => return Ok(()),
            Ok(s) => s,
            Err(f) => {
                decided = Some(f);
                return Ok(());
            }
        };
        let mut cbs = RemoteCallbacks::new();
        cbs.credentials(not_a_token);
        cbs.push_update_reference(|name, status| {
            if let Some(s) = status {
                rejected.borrow_mut().push(format!("{name}: {s}"));
            }
            Ok(())
        });
        cbs.push_negotiation(|_| {
            if Instant::now() >= deadline {
                Err(git2::Error::from_str("deadline passed"))
            } else {
                Ok(())
            }
        });
        cbs.sideband_progress(|data| {
            let mut said = said.borrow_mut();
            if said.len() < REMOTE_TEXT_MAX {
                said.extend_from_slice(&data[..data.len().min(REMOTE_TEXT_MAX)]);
            }
            Instant::now() < deadline
        });
        let mut opts = PushOptions::new();
        opts.remote_callbacks(cbs);
        conn.remote().push(&specs, Some(&mut opts))
    })();
    if let Some(f) = decided {
        return Err(f);
    }
    let said = remote_lines(&said.into_inner());
    let with_said = |m: String| {
        if said.is_empty() {
            m
        } else {
            format!("{m}; {said}")
        }
    };
    if let Err(e) = result {
        let m = clean(&with_said(e.message().to_string()));
        return Err(if Instant::now() >= deadline {
            PushFail::Deadline(format!("deadline passed while pushing ({m})"))
        } else if scope.auth_failed() || e.code() == ErrorCode::Auth {
            PushFail::Auth(m)
        } else if e.code() == ErrorCode::NotFastForward {
            PushFail::Rejected(m)
        } else {
            PushFail::Other(m)
        });
    }
    let rejected = rejected.into_inner();
    if !rejected.is_empty() {
        return Err(PushFail::Rejected(clean(&with_said(format!(
            "push rejected: {}",
            rejected.join(", ")
        )))));
    }
    Ok(())
}

/// What libgit2 is shown of the remote's refs for this push and the pack sent in place
/// of its own ([`super::bases`]), with the upstream tracking tips of HEAD's branch and
/// of the other branches pushed as what the remote is known to have.
fn push_bases(
    repo: &Repository,
    plan: &PushPlan,
    refspecs: &[String],
) -> (crate::githttp::RefFilter, crate::githttp::PackSource) {
    let head = repo
        .head()
        .ok()
        .filter(|h| h.is_branch())
        .and_then(|h| h.shorthand().ok().map(str::to_string));
    let branches = head
        .iter()
        .map(String::as_str)
        .chain(plan.extra.iter().map(|e| e.branch.as_str()));
    let known = super::bases::upstreams(repo, branches);
    super::bases::for_push(repo.path().to_path_buf(), refspecs, known)
}

/// Bytes of the remote's sideband text kept for an error message.
const REMOTE_TEXT_MAX: usize = 4096;
/// Lines of it shown.
const REMOTE_LINES_MAX: usize = 10;

/// The remote's sideband text as git's CLI shows it: one `remote: ` line each (progress
/// lines ended by `\r` included), control characters dropped, joined by `; `.
fn remote_lines(text: &[u8]) -> String {
    let text = String::from_utf8_lossy(text);
    let mut lines: Vec<String> = Vec::new();
    for l in text.split(['\n', '\r']) {
        let l: String = l.chars().filter(|c| !c.is_control()).collect();
        let l = l.trim();
        let l = l.strip_prefix("remote:").map(str::trim).unwrap_or(l);
        if l.is_empty() || lines.last().is_some_and(|p| p[8..] == *l) {
            continue;
        }
        lines.push(format!("remote: {l}"));
    }
    if lines.len() > REMOTE_LINES_MAX {
        let more = lines.len() - REMOTE_LINES_MAX;
        lines.truncate(REMOTE_LINES_MAX);
        lines.push(format!("({more} more lines)"));
    }
    lines.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_text_becomes_one_remote_line_each() {
        assert_eq!(
            remote_lines(b"policy says no\nremote: two\r\ntwo\n\nbe\x07ll\n"),
            "remote: policy says no; remote: two; remote: bell"
        );
        assert_eq!(remote_lines(b""), "");
    }

    #[test]
    fn snapshot_ref_fills_the_template_and_names_detached_heads() {
        let t = "refs/heads/wip/{workspace}/{branch}";
        assert_eq!(
            snapshot_ref(t, "my ws", Some("feat/x"), None),
            "refs/heads/wip/my-ws/feat/x"
        );
        let h = Oid::from_str("0123456789abcdef0123456789abcdef01234567").unwrap();
        assert_eq!(
            snapshot_ref(t, "ws", None, Some(h)),
            "refs/heads/wip/ws/detached-0123456"
        );
    }

    #[test]
    fn ssh_remote_of_a_known_host_is_pushed_over_https() {
        let hosts = vec!["github.com".to_string()];
        let (u, d, a) = push_url("git@github.com:o/r.git", &hosts);
        assert_eq!(u, "https://github.com/o/r.git");
        assert_eq!(d, u);
        assert_eq!(a, "github.com");
        let (u, d, _) = push_url("https://me:pw@example.com/o/r.git", &hosts);
        assert_eq!(u, "https://me:pw@example.com/o/r.git");
        assert_eq!(d, "https://example.com/o/r.git");
    }
}
