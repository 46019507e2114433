//! `wsagent saves` and `wsagent restore`: find a repository's snapshots and put one back.
//!
//! Both run in the CLI process, as the user who calls them (never in the root daemon):
//! what they read and write is what that user may. A snapshot is plain git (git stash's
//! shape, see `save/repo.rs`): its first parent is the commit HEAD was on, its second a
//! commit of the index whose own second parent is the previous snapshot of the branch.
//! Listing walks that chain from each local snapshot ref; restoring is `git checkout`
//! of the branch at the snapshot's HEAD, then `git stash apply --index` of the snapshot,
//! with the git CLI (so hooks, filters and the user's config apply as for any git
//! command). Into a path that does not exist, the repository is first cloned from the
//! remote the save journal recorded (or `--url`), with `wsagent` as `GIT_ASKPASS`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use agent_proto::save::RepoOutcome;

/// One snapshot of one repository.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Snapshot {
    pub commit: String,
    /// The snapshot ref it was found on (the newest snapshot is its tip).
    pub r#ref: String,
    /// RFC 3339, from the commit.
    pub at: String,
    /// `stop`, `checkpoint`, `manual`, `signal` (from the commit message).
    pub reason: String,
    /// The branch the work was on (`detached HEAD` when none).
    pub branch: String,
    /// The commit HEAD was on.
    pub head: Option<String>,
    /// Paths that differ from `head` (changed, added, deleted).
    pub files_changed: usize,
    /// Whether a save pushed it (or a later snapshot that contains it), per the journal.
    pub pushed: bool,
}

/// Snapshots of the repository at `repo`, newest first.
pub fn list(
    repo: &Path,
    ref_template: &str,
    journal: &[RepoOutcome],
) -> Result<Vec<Snapshot>, String> {
    let r = git2::Repository::discover(repo)
        .map_err(|e| format!("{}: not a git repository: {}", repo.display(), e.message()))?;
    let pushed = pushed_commits(&r, journal);
    let prefix = crate::save::ref_prefix(ref_template);
    let refs = r
        .references_glob(&format!("{prefix}*"))
        .map_err(|e| format!("{}: {}", repo.display(), e.message()))?;
    let tips: Vec<(String, git2::Oid)> = refs
        .flatten()
        .filter_map(|rf| Some((rf.name().ok()?.to_string(), rf.peel_to_commit().ok()?.id())))
        .collect();
    let mut out = Vec::new();
    for (name, tip) in tips {
        walk(&r, tip, &name, &pushed, &mut out);
    }
    out.sort_by(|a, b| b.at.cmp(&a.at).then(a.commit.cmp(&b.commit)));
    out.dedup_by(|a, b| a.commit == b.commit);
    Ok(out)
}

/// The commits the journal says a save of this repository pushed.
fn pushed_commits(r: &git2::Repository, journal: &[RepoOutcome]) -> Vec<git2::Oid> {
    let workdir = r.workdir().unwrap_or(r.path()).to_path_buf();
    let workdir = std::fs::canonicalize(&workdir).unwrap_or(workdir);
    journal
        .iter()
        .filter(|o| o.pushed && Path::new(&o.repo) == workdir)
        .filter_map(|o| {
            o.commit
                .as_deref()
                .and_then(|c| git2::Oid::from_str(c).ok())
        })
        .collect()
}

/// The snapshot chain from `tip` back (bounded), described, onto `out`.
fn walk(
    r: &git2::Repository,
    tip: git2::Oid,
    label: &str,
    pushed: &[git2::Oid],
    out: &mut Vec<Snapshot>,
) {
    let mut next = r.find_commit(tip).ok();
    let mut seen = 0;
    while let Some(c) = next.filter(|c| is_snapshot(c) && seen < 10_000) {
        seen += 1;
        out.push(describe(r, &c, label, pushed));
        next = previous(&c);
    }
}

/// The snapshots on the repository's remote (`origin`, else its only remote): its
/// snapshot refs are listed (`git ls-remote`) and fetched without naming them locally
/// (only their objects arrive, so `restore --snapshot ID` works), then walked as the
/// local ones are. Snapshots an earlier workspace of the same user pushed show up here.
pub fn list_remote(repo: &Path, ref_template: &str) -> Result<Vec<Snapshot>, String> {
    let prefix = crate::save::ref_prefix(ref_template);
    let remotes = git(Some(repo), &["remote"])?;
    let remote = if remotes.lines().any(|r| r == "origin") {
        "origin".to_string()
    } else {
        remotes
            .lines()
            .next()
            .map(str::to_string)
            .ok_or_else(|| format!("{}: no remote", repo.display()))?
    };
    let pattern = format!("{prefix}*");
    let listed = git(Some(repo), &["ls-remote", &remote, &pattern])?;
    let refs: Vec<(String, String)> = listed
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(sha, name)| (sha.to_string(), name.to_string()))
        .collect();
    if refs.is_empty() {
        return Ok(Vec::new());
    }
    let mut args = vec!["fetch", "-q", "--no-write-fetch-head", remote.as_str()];
    args.extend(refs.iter().map(|(_, n)| n.as_str()));
    git(Some(repo), &args)?;
    let r = git2::Repository::discover(repo).map_err(|e| e.message().to_string())?;
    let mut out = Vec::new();
    for (sha, name) in refs {
        if let Ok(tip) = git2::Oid::from_str(&sha) {
            walk(&r, tip, &format!("{remote}:{name}"), &[], &mut out);
        }
    }
    // On the remote: pushed, whoever pushed it.
    for s in &mut out {
        s.pushed = true;
    }
    Ok(out)
}

/// Local and remote snapshots together, newest first, each once (a local one that is
/// also on the remote keeps its local ref name and counts as pushed).
pub fn merge(mut local: Vec<Snapshot>, remote: Vec<Snapshot>) -> Vec<Snapshot> {
    for r in remote {
        match local.iter_mut().find(|l| l.commit == r.commit) {
            Some(l) => l.pushed = true,
            None => local.push(r),
        }
    }
    local.sort_by(|a, b| b.at.cmp(&a.at).then(a.commit.cmp(&b.commit)));
    local
}

fn is_snapshot(c: &git2::Commit<'_>) -> bool {
    c.message_bytes()
        .starts_with(b"wsagent: save of workspace ")
}

/// The snapshot before `c`: the index commit's second parent (stash shape), or `c`'s
/// own second parent when it has no index commit.
fn previous<'r>(c: &git2::Commit<'r>) -> Option<git2::Commit<'r>> {
    let second = c.parent(1).ok()?;
    if second.message_bytes().starts_with(b"index on ") {
        second.parent(1).ok()
    } else {
        Some(second)
    }
}

fn describe(
    r: &git2::Repository,
    c: &git2::Commit<'_>,
    refname: &str,
    pushed: &[git2::Oid],
) -> Snapshot {
    let msg = String::from_utf8_lossy(c.message_bytes()).into_owned();
    let subject = msg.lines().next().unwrap_or_default();
    let reason = subject
        .rsplit_once('(')
        .and_then(|(_, r)| r.strip_suffix(')'))
        .unwrap_or("?")
        .to_string();
    let branch = msg
        .lines()
        .find_map(|l| l.strip_prefix("Branch: "))
        .unwrap_or("?")
        .to_string();
    let head = c.parent(0).ok();
    let files_changed = r
        .diff_tree_to_tree(
            head.as_ref().and_then(|h| h.tree().ok()).as_ref(),
            c.tree().ok().as_ref(),
            None,
        )
        .map(|d| d.deltas().len())
        .unwrap_or(0);
    let id = c.id();
    let is_pushed = pushed
        .iter()
        .any(|p| *p == id || r.graph_descendant_of(*p, id).unwrap_or(false));
    Snapshot {
        commit: id.to_string(),
        r#ref: refname.to_string(),
        at: rfc3339(c.time().seconds()),
        reason,
        branch,
        head: head.map(|h| h.id().to_string()),
        files_changed,
        pushed: is_pushed,
    }
}

fn rfc3339(secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Run git in `dir` (or nowhere for a clone); its stderr goes to the user.
fn git(dir: Option<&Path>, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("git");
    if let Some(d) = dir {
        cmd.arg("-C").arg(d);
    }
    cmd.args(args).env("GIT_TERMINAL_PROMPT", "0");
    if let Ok(me) = std::env::current_exe() {
        // Fetches from a provider's host get the cached token (wsagent answers git's
        // prompt: `git-askpass`); the token never reaches argv, a URL or a file.
        cmd.env("GIT_ASKPASS", me);
    }
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "git {}: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// What `restore` was asked.
pub struct RestoreRequest {
    pub repo: PathBuf,
    pub snapshot: Option<String>,
    /// The newest snapshot made at or before this RFC 3339 time.
    pub at: Option<String>,
    pub url: Option<String>,
    pub force: bool,
    pub dry_run: bool,
}

/// `wsagent restore`: returns the exit code after printing what it did.
pub fn restore(
    req: &RestoreRequest,
    ref_template: &str,
    journal: &[RepoOutcome],
    save_first: &dyn Fn(&Path) -> Result<(), String>,
) -> ExitCode {
    match restore_inner(req, ref_template, journal, save_first) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsagent: {e}");
            ExitCode::from(1)
        }
    }
}

fn restore_inner(
    req: &RestoreRequest,
    ref_template: &str,
    journal: &[RepoOutcome],
    save_first: &dyn Fn(&Path) -> Result<(), String>,
) -> Result<(), String> {
    let path = std::path::absolute(&req.repo).unwrap_or_else(|_| req.repo.clone());
    if !path.exists() {
        clone_for_restore(req, &path, ref_template, journal)?;
    }
    let mut snaps = list(&path, ref_template, journal)?;
    // Not here (a fresh clone, an earlier workspace's snapshot): look on the remote.
    let wanted_missing = req
        .snapshot
        .as_ref()
        .is_some_and(|id| !snaps.iter().any(|s| s.commit.starts_with(id.as_str())));
    if snaps.is_empty() || wanted_missing {
        snaps = merge(snaps, list_remote(&path, ref_template)?);
    }
    let pick = choose(&snaps, req, &path)?;
    let short = &pick.commit[..12.min(pick.commit.len())];
    println!(
        "snapshot {short} of {} ({}, {}, branch {}, {} files changed)",
        path.display(),
        pick.at,
        pick.reason,
        pick.branch,
        pick.files_changed
    );
    let head = pick
        .head
        .clone()
        .ok_or_else(|| format!("snapshot {short} has no HEAD commit to restore onto"))?;
    let dirty = git(
        Some(&path),
        &["status", "--porcelain", "--untracked-files=all"],
    )?;
    if req.dry_run {
        let diff = git(Some(&path), &["diff", "--name-status", &pick.commit])?;
        println!("would check out {} at {}", pick.branch, &head[..12]);
        if diff.trim().is_empty() {
            println!("tracked files already as in the snapshot");
        } else {
            print!("tracked files that would change:\n{diff}");
        }
        if !dirty.trim().is_empty() {
            println!(
                "unsaved changes here ({} paths): restore refuses without --force",
                dirty.lines().count()
            );
        }
        return Ok(());
    }
    if !dirty.trim().is_empty() {
        if !req.force {
            let mut names: Vec<&str> = dirty.lines().take(20).collect();
            if dirty.lines().count() > 20 {
                names.push("...");
            }
            return Err(format!(
                "{} has unsaved changes; restoring would overwrite them:\n  {}\n\
                 save them first, or pass --force (which saves them first)",
                path.display(),
                names.join("\n  ")
            ));
        }
        save_first(&path)?;
        println!("saved the current state first");
        git(Some(&path), &["reset", "-q", "--hard", "HEAD"])?;
        git(Some(&path), &["clean", "-q", "-fd"])?;
    }
    // The branch at the snapshot's HEAD: made when missing; an existing branch that has
    // moved on is left alone (HEAD is detached at the snapshot's commit, and we say so).
    let branch = pick.branch.as_str();
    let on_branch = branch != "(detached HEAD)" && branch != "?";
    let tip = on_branch
        .then(|| {
            git(
                Some(&path),
                &[
                    "rev-parse",
                    "-q",
                    "--verify",
                    &format!("refs/heads/{branch}"),
                ],
            )
            .ok()
        })
        .flatten()
        .map(|s| s.trim().to_string());
    // A branch behind the snapshot's HEAD (a fresh clone of a remote that never got
    // the last local commits) is moved forward to it: nothing of it is lost.
    let behind = |t: &str| git(Some(&path), &["merge-base", "--is-ancestor", t, &head]).is_ok();
    match (on_branch, tip) {
        (true, Some(t)) if t == head => git(Some(&path), &["checkout", "-q", branch])?,
        (true, Some(t)) if behind(&t) => {
            git(Some(&path), &["checkout", "-q", "-B", branch, &head])?
        }
        (true, None) => git(Some(&path), &["checkout", "-q", "-b", branch, &head])?,
        (true, Some(_)) => {
            git(Some(&path), &["checkout", "-q", "--detach", &head])?;
            println!(
                "branch {branch} has moved on since the snapshot: HEAD is detached at {}",
                &head[..12]
            );
            String::new()
        }
        (false, _) => git(Some(&path), &["checkout", "-q", "--detach", &head])?,
    };
    git(
        Some(&path),
        &["stash", "apply", "-q", "--index", &pick.commit],
    )?;
    record_restored(&path, pick);
    println!("restored {} to snapshot {short}", path.display());
    Ok(())
}

/// After a restore: the snapshot is recorded as seen (`save::remote_check::RESTORED_REF`), and the local
/// snapshot ref of its branch moves to it when that loses nothing (the ref is absent or
/// behind it), so the next save continues its history and fast-forwards the remote ref.
fn record_restored(path: &Path, pick: &Snapshot) {
    let _ = git(
        Some(path),
        &[
            "update-ref",
            "-m",
            "wsagent: restored",
            crate::save::remote_check::RESTORED_REF,
            &pick.commit,
        ],
    );
    let name = pick
        .r#ref
        .split_once(':')
        .map_or(pick.r#ref.as_str(), |(_, r)| r);
    let name = match name.rsplit_once('@') {
        Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => name,
    };
    let local = git(Some(path), &["rev-parse", "-q", "--verify", name])
        .ok()
        .map(|s| s.trim().to_string());
    let behind = match &local {
        None => true,
        Some(l) => git(
            Some(path),
            &["merge-base", "--is-ancestor", l, &pick.commit],
        )
        .is_ok(),
    };
    if behind {
        let _ = git(
            Some(path),
            &["update-ref", "-m", "wsagent: restored", name, &pick.commit],
        );
    }
}

fn choose<'a>(
    snaps: &'a [Snapshot],
    req: &RestoreRequest,
    path: &Path,
) -> Result<&'a Snapshot, String> {
    if snaps.is_empty() {
        return Err(format!("{}: no snapshot found", path.display()));
    }
    if let Some(id) = &req.snapshot {
        return snaps
            .iter()
            .find(|s| s.commit.starts_with(id.as_str()))
            .ok_or_else(|| format!("{}: no snapshot {id} (see `wsagent saves`)", path.display()));
    }
    if let Some(at) = &req.at {
        let t = humantime::parse_rfc3339_weak(at)
            .map_err(|e| format!("--at {at:?}: {e} (use RFC 3339, e.g. 2026-12-03T12:04:00Z)"))?;
        let at = humantime::format_rfc3339_seconds(t).to_string();
        return snaps
            .iter()
            .find(|s| s.at <= at)
            .ok_or_else(|| format!("{}: no snapshot at or before {at}", path.display()));
    }
    Ok(&snaps[0])
}

/// A repository that is not there (a new volume, a new workspace): clone it from the
/// remote the journal recorded for that path, or `--url`, with its snapshot refs.
fn clone_for_restore(
    req: &RestoreRequest,
    path: &Path,
    ref_template: &str,
    journal: &[RepoOutcome],
) -> Result<(), String> {
    let recorded = journal
        .iter()
        .rev()
        .find(|o| Path::new(&o.repo) == path && o.remote.is_some())
        .and_then(|o| o.remote.clone());
    let url = req.url.clone().or(recorded).ok_or_else(|| {
        format!(
            "{} does not exist and no remote is known for it: pass --url",
            path.display()
        )
    })?;
    let p = path.display().to_string();
    println!("cloning {url} into {p}");
    git(None, &["clone", "-q", &url, &p])?;
    let prefix = crate::save::ref_prefix(ref_template);
    let spec = format!("+{prefix}*:{prefix}*");
    git(Some(path), &["fetch", "-q", "origin", &spec])?;
    Ok(())
}
