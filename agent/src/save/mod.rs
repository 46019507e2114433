//! Save on stop: commit and push every repository's unsaved work (issue 3).
//!
//! [`save_all`] finds the repositories ([`discover`]), makes each one's local commit on
//! a blocking thread (submodules before their parents), then pushes it; once every
//! commit is made, one `syncfs` per filesystem makes them durable beside the pushes.
//! Commits have `save.parallelism` slots and pushes four times as many (they wait on the
//! network), so slow pushes never hold back local commits. Everything runs under the caller's deadline: at the
//! deadline, whatever is still running is reported as `committed` (the commit is on
//! disk) or `failed`, and `save_all` returns. Each repository gets a `started` journal
//! line before it is touched and an outcome line after ([`journal`]), and an
//! [`EventKind::Save`] event.
//!
//! Invariants: `.git/config` is never written (pushes go through an anonymous remote
//! whose credentials come from a callback); in `snapshot` mode HEAD, the index and the
//! worktree are never written; a token appears nowhere but in the callback's answer.
//! Process-wide libgit2 settings made here: when running as root, no owner check and the
//! global config read from the user's HOME ([`fsids::prepare_for_root`]). (Pushes go
//! through our own HTTP transport, `githttp`, which takes the deadline itself.)

mod bases;
pub mod discover;
pub mod fsids;
pub mod journal;
mod lease;
mod objects;
mod pack;
mod packfile;
pub mod quiet;
mod refresh;
pub mod remote_check;
mod repo;
pub mod url;
pub mod worktree;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use agent_proto::local::{EventKind, Level};
use agent_proto::save::RepoOutcome;
use agent_proto::save::SaveResult;
use futures::FutureExt;

pub use crate::config::save::{
    Checkpoint, DEFAULT_EXCLUDE, SaveConfig, SaveMode, exclude_set, validate,
};
pub use journal::{Journal, last_outcomes, previous_save_summary};

/// Why a save runs.
pub use agent_proto::save::SaveReason as Reason;

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
    /// The owner's user name for `{owner}` in the snapshot ref (`CODER_WORKSPACE_OWNER_NAME`):
    /// workspace names are unique per owner only, so two owners' `dev` workspaces must not
    /// share a ref. `None`: `{owner}/` is left out.
    pub ref_owner: Option<String>,
    pub tokens: crate::tokens::Tokens,
    pub events: crate::events::Events,
    /// The daemon's dirty set: a checkpoint or a snapshot save skips the repositories it
    /// knows unchanged. `None` (a save outside the daemon): every repository is looked at.
    pub quiet: Option<quiet::Quiet>,
}

impl SaveEnv {
    /// Who and where, from this process's environment (`CODER_WORKSPACE_NAME`, else the
    /// host name; `CODER_WORKSPACE_OWNER_*`): the daemon's saves and the CLI's alike.
    pub fn from_env(
        home: PathBuf,
        state_dir: PathBuf,
        tokens: crate::tokens::Tokens,
        events: crate::events::Events,
    ) -> SaveEnv {
        let nonempty = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        SaveEnv {
            home,
            state_dir,
            workspace: nonempty("CODER_WORKSPACE_NAME").unwrap_or_else(|| {
                nix::unistd::gethostname()
                    .ok()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "workspace".into())
            }),
            owner_name: nonempty("CODER_WORKSPACE_OWNER_NAME"),
            owner_email: nonempty("CODER_WORKSPACE_OWNER_EMAIL"),
            ref_owner: nonempty("CODER_WORKSPACE_OWNER_NAME"),
            tokens,
            events,
            quiet: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SaveRequest {
    pub reason: Reason,
    /// Save only the repository containing this path.
    pub only: Option<PathBuf>,
    /// Report what would be saved; write nothing (no commit, no push, no journal).
    pub dry_run: bool,
    /// The user who asked through the local API, when the save must be done with that
    /// user's permissions (`--repo` or a dry run from a user other than root): the
    /// repository is found and saved with those ids, so what that user cannot read is
    /// never read for them. `None`: each repository as its owner.
    pub act_as: Option<fsids::Ids>,
}

/// The fixed start of a ref template, before its first placeholder (`refs/heads/wip/`):
/// every snapshot ref, whoever's, starts with it.
pub fn ref_prefix(template: &str) -> &str {
    template.split('{').next().unwrap_or(template)
}

/// `{owner}` of a ref template filled with the owner's name (made ref-safe), or left out
/// with its slash when there is none.
pub fn fill_owner(template: &str, owner: Option<&str>) -> String {
    match owner.map(str::trim).filter(|o| !o.is_empty()) {
        Some(o) => {
            let safe: String = o
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                        c
                    } else {
                        '-'
                    }
                })
                .collect();
            template.replace("{owner}", safe.trim_matches('.'))
        }
        None => template.replace("{owner}/", "").replace("{owner}", ""),
    }
}

/// Told of a save's progress as it happens: how many repositories it found, then each
/// repository's outcome the moment it is known (already redacted, as journaled).
pub trait Observer: Send + Sync {
    fn found(&self, repos: usize);
    fn saved(&self, outcome: &RepoOutcome);
}

fn outcome_base(path: &Path, mode: SaveMode, reason: Reason) -> RepoOutcome {
    RepoOutcome {
        at: crate::events::now_rfc3339(),
        repo: path.display().to_string(),
        mode,
        reason,
        result: agent_proto::save::SaveResult::Started,
        ..Default::default()
    }
}

/// Save every repository with unsaved work; returns one outcome per repository found.
/// Pushes in flight per unit of `save.parallelism` (commits in flight are `parallelism`).
const PUSHES_PER_SLOT: usize = 4;

/// Returns by `deadline` even when a push is stuck.
pub async fn save_all(
    cfg: &SaveConfig,
    env: &SaveEnv,
    req: &SaveRequest,
    deadline: tokio::time::Instant,
) -> Vec<RepoOutcome> {
    let Some(held) = lock(&env.state_dir, deadline).await else {
        tracing::error!("deadline passed while another save was running");
        return Vec::new();
    };
    save_all_observed(&held, cfg, env, req, deadline, None).await
}

/// The one save lock: one save at a time per state directory (a checkpoint, the stop,
/// `wsagent save`, SIGUSR1); a second one waits, then finds the work of the first
/// already saved.
pub struct SaveLock {
    _held: tokio::sync::OwnedMutexGuard<()>,
}

/// Take the save lock of `state_dir`, or `None` when `deadline` passes first.
pub async fn lock(state_dir: &Path, deadline: tokio::time::Instant) -> Option<SaveLock> {
    static LOCKS: std::sync::Mutex<BTreeMap<PathBuf, Arc<tokio::sync::Mutex<()>>>> =
        std::sync::Mutex::new(BTreeMap::new());
    let m = LOCKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(state_dir.to_path_buf())
        .or_default()
        .clone();
    tokio::time::timeout_at(deadline, m.lock_owned())
        .await
        .ok()
        .map(|g| SaveLock { _held: g })
}

/// [`save_all`], telling `observer` of each repository's outcome as it lands, under the
/// save lock the caller holds.
pub async fn save_all_observed(
    _held: &SaveLock,
    cfg: &SaveConfig,
    env: &SaveEnv,
    req: &SaveRequest,
    deadline: tokio::time::Instant,
    observer: Option<Arc<dyn Observer>>,
) -> Vec<RepoOutcome> {
    let t0 = std::time::Instant::now();
    let outcomes = save_all_counted(cfg, env, req, deadline, observer).await;
    if !req.dry_run {
        crate::metrics::save_done(
            req.reason.as_str(),
            t0.elapsed(),
            outcomes.iter().map(|o| o.result.as_str()),
        );
    }
    outcomes
}

async fn save_all_counted(
    cfg: &SaveConfig,
    env: &SaveEnv,
    req: &SaveRequest,
    deadline: tokio::time::Instant,
    observer: Option<Arc<dyn Observer>>,
) -> Vec<RepoOutcome> {
    fsids::prepare_for_root(&env.home);
    repo::init_libgit2();
    let journal = Arc::new(Journal::new(&env.state_dir));

    // Discovery.
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
    let exclude = match exclude_set(&cfg.exclude, &env.home) {
        Ok(x) => x,
        Err(e) => {
            // Validated with the config: only a HOME-dependent oddity gets here.
            tracing::warn!(error = %e, "save.exclude: ignored");
            globset::GlobSet::empty()
        }
    };
    let (depth, only, act_as) = (cfg.depth, req.only.clone(), req.act_as.clone());
    let state_dir = env.state_dir.clone();
    let ref_template = fill_owner(&cfg.ref_template, env.ref_owner.as_deref());
    let (template, workspace) = (ref_template.clone(), env.workspace.clone());
    // The walk does not enter a worktree the dirty set knows unchanged since it last
    // went through it (never for the stop, which always looks everywhere).
    let skip_quiet = env
        .quiet
        .clone()
        .filter(|_| req.reason != Reason::Stop && !req.dry_run && req.act_as.is_none());
    let fingerprint = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&cfg.exclude, &env.home).hash(&mut h);
        h.finish()
    };
    let found = tokio::task::spawn_blocking(move || {
        // The whole set is needed even for `only`: ref suffixes depend on it.
        // Only once every change made before now has been counted.
        let skip = skip_quiet
            .as_ref()
            .filter(|q| q.sync())
            .map(|quiet| discover::Skip { quiet, fingerprint });
        let (all, unsearched) =
            discover::discover_with(&roots, depth, &explicit, &exclude, skip.as_ref());
        let mut found = match &only {
            Some(p) => only_repo(p, act_as.as_ref()),
            None => all.clone(),
        };
        found.sort_by(|a, b| b.level.cmp(&a.level).then(a.path.cmp(&b.path)));
        if let Err(e) = journal::compact_if_large(&state_dir) {
            tracing::warn!(error = %e, "save journal");
        }
        let mut everyone = all;
        everyone.extend(
            found
                .iter()
                .filter(|f| !everyone.contains(f))
                .cloned()
                .collect::<Vec<_>>(),
        );
        let suffixes = repo::RefSuffixes::new(everyone, template, workspace);
        (
            found,
            (
                journal::last_finished(&state_dir),
                journal::last_pushed(&state_dir),
            ),
            suffixes,
            unsearched,
        )
    });
    let (found, (previous, last_pushed), ref_suffix, unsearched) =
        match tokio::time::timeout_at(deadline, found).await {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "repository discovery failed");
                if let Some(o) = &observer {
                    o.found(0);
                }
                return Vec::new();
            }
            Err(_) => {
                tracing::error!("deadline passed while looking for repositories");
                if let Some(o) = &observer {
                    o.found(0);
                }
                return Vec::new();
            }
        };
    // A directory that could not be searched may hold unsaved work: a failure, by name.
    let unsearched: Vec<RepoOutcome> = unsearched
        .into_iter()
        .map(|(path, e)| {
            let mut o = outcome_base(&path, cfg.mode, req.reason);
            o.result = agent_proto::save::SaveResult::Failed;
            o.error = Some(format!(
                "cannot search {} for repositories: {e}",
                path.display()
            ));
            o
        })
        .collect();
    if let Some(o) = &observer {
        o.found(found.len() + unsearched.len());
    }
    for o in &unsearched {
        report(env, o);
        if let Some(obs) = &observer {
            obs.saved(o);
        }
    }
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
        // A checkpoint never commits on the user's branch while they work: it saves the
        // snapshot ref, whatever the mode (branch mode commits at the stop).
        mode: if req.reason == Reason::Checkpoint {
            SaveMode::Snapshot
        } else {
            cfg.mode
        },
        ref_template,
        // Every snapshot ref, whoever's, starts here: never taken for a user's branch.
        ref_prefix: ref_prefix(&cfg.ref_template).to_string(),
        max_file_size: cfg.max_file_size,
        workspace: env.workspace.clone(),
        owner_name: env.owner_name.clone(),
        owner_email: env.owner_email.clone(),
        reason: req.reason,
        known_hosts,
        previous,
        dry_run: req.dry_run,
        ref_suffix,
        last_pushed,
        act_as: req.act_as.clone(),
    });
    let parallelism = cfg.parallelism.max(1);
    let started = std::time::Instant::now();
    // The dirty set spares a look only where a look would have found nothing to do: never
    // for the stop (it always looks), a branch-mode commit, a dry run, or another user.
    if let Some(q) = &env.quiet {
        q.set_own_refs(ref_prefix(&cfg.ref_template));
    }
    let dirty_set = env.quiet.clone().filter(|_| {
        req.reason != Reason::Stop
            && ctx.mode == SaveMode::Snapshot
            && !req.dry_run
            && req.act_as.is_none()
    });

    // A checkpoint's outcome is only worth a line when it changed something.
    let quiet = req.reason == Reason::Checkpoint;
    // One fsynced write of every `started` line before any repository is touched (a
    // checkpoint writes none: most find nothing to do, and the next one or the stop
    // covers an interrupted one).
    if !req.dry_run && !quiet {
        let lines: Vec<RepoOutcome> = found
            .iter()
            .map(|f| outcome_base(&f.path, ctx.mode, ctx.reason))
            .collect();
        if let Err(e) = journal.append_all(&lines) {
            tracing::warn!(error = %e, "save journal");
        }
    }

    // Commits and pushes have their own slots, so slow pushes never hold back a local
    // commit and one slow commit never holds back the pushes of the others. Each
    // repository pushes as soon as its commit is made. Submodules commit before their
    // parents: a level starts when every commit of the level below has ended.
    let commit_slots = Arc::new(tokio::sync::Semaphore::new(parallelism));
    // A push mostly waits on the network (two round trips and the server's work), so
    // pushes get more slots than commits, which use the CPU.
    let push_slots = Arc::new(tokio::sync::Semaphore::new(parallelism * PUSHES_PER_SLOT));
    let now = tokio::time::Instant::now();
    let fresh_by = now + (deadline.saturating_duration_since(now) / 3).min(FRESH_TOKEN_WAIT);
    let creds = Arc::new(CredCache {
        tokens: env.tokens.clone(),
        by: fresh_by,
        cells: std::sync::Mutex::new(BTreeMap::new()),
    });
    let mut tasks = Vec::new();
    // Repositories a checkpoint answered for from the dirty set, without opening them.
    let unopened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut below = futures::future::ready(()).boxed().shared();
    let levels: BTreeSet<usize> = found.iter().map(|f| f.level).collect();
    for level in levels.into_iter().rev() {
        let mut done = Vec::new();
        for f in found.iter().filter(|f| f.level == level).cloned() {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            done.push(rx);
            let wait = below.clone();
            let (ctx, commit_slots, push_slots, creds) = (
                ctx.clone(),
                commit_slots.clone(),
                push_slots.clone(),
                creds.clone(),
            );
            let (env, observer) = (env.clone(), observer.clone());
            let (journal, dry_run) = (journal.clone(), req.dry_run);
            let low = quiet;
            let dirty_set = dirty_set.clone().filter(|_| !f.bare);
            let unopened = unopened.clone();
            tasks.push(async move {
                let _ = tokio::time::timeout_at(deadline, wait).await;
                // How to look at the worktree: the dirty set may know its tree, or the
                // few paths that can differ from the index.
                let (look, ticket) = match &dirty_set {
                    Some(q) => {
                        let (q, p) = (q.clone(), f.path.clone());
                        blocking(low, move || q.look(&p))
                            .await
                            .unwrap_or((quiet::Look::Full, None))
                    }
                    None => (quiet::Look::Full, None),
                };
                let (path, was_known) = (f.path.clone(), matches!(look, quiet::Look::Known(..)));
                let known = match &look {
                    quiet::Look::Known(tree, settled) if low => {
                        repo::known_outcome(&ctx, &f.path, tree, *settled)
                    }
                    _ => None,
                };
                let (mut o, tree) = match known {
                    Some(o) => {
                        let _ = tx.send(());
                        unopened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        (o, None)
                    }
                    None => {
                        let mut prepared = commit_one(ctx, f, &commit_slots, deadline, look).await;
                        let _ = tx.send(());
                        let tree = prepared.worktree.take();
                        let o = push_one(prepared, &push_slots, &creds, deadline, low).await;
                        (o, tree)
                    }
                };
                if let Some(q) = &dirty_set {
                    match ticket {
                        Some(t) => q.settle(&path, t, &o, tree),
                        None if was_known && !quiet::is_settled(&o) => q.forget(&path),
                        None => {}
                    }
                }
                scrub(&mut o);
                if !(quiet && matches!(o.result, SaveResult::Unchanged | SaveResult::Clean)) {
                    // Journaled the moment it is known: a daemon killed while other
                    // repositories still push has recorded what this one did.
                    if !dry_run && let Err(e) = journal.append(&o) {
                        tracing::warn!(error = %e, "save journal");
                    }
                    report(&env, &o);
                }
                if let Some(obs) = &observer {
                    obs.saved(&o);
                }
                o
            });
        }
        below = futures::future::join_all(done).map(|_| ()).boxed().shared();
    }
    // Durability: once every local commit is made, one `syncfs` per filesystem flushes
    // the new objects and refs of all of them, while the pushes go on. The save waits for
    // it only when some work is not on a remote (a pushed commit is safe there).
    let durable = {
        let all_committed = below.clone();
        let dirs: Vec<PathBuf> = found.iter().map(|f| f.path.clone()).collect();
        let dry_run = req.dry_run;
        async move {
            all_committed.await;
            if !dry_run {
                let _ = tokio::task::spawn_blocking(move || repo::sync_filesystems(&dirs)).await;
            }
        }
    };
    let durable = tokio::spawn(durable);
    let outcomes = futures::future::join_all(tasks).await;
    if outcomes
        .iter()
        .any(|o| o.commit.is_some() && o.result != SaveResult::Pushed)
    {
        let _ = tokio::time::timeout_at(deadline, durable).await;
    }

    let mut outcomes = outcomes;
    let n_unsearched = unsearched.len();
    outcomes.extend(unsearched);
    tracing::info!(
        repos = outcomes.len(),
        unopened = unopened.load(std::sync::atomic::Ordering::Relaxed),
        took_ms = started.elapsed().as_millis() as u64,
        "git work saved"
    );
    // Each repository's line was journaled as its outcome landed; the directories that
    // could not be searched are journaled now.
    if !req.dry_run
        && let Err(e) = journal.append_all(&outcomes[outcomes.len() - n_unsearched..])
    {
        tracing::warn!(error = %e, "save journal");
    }
    outcomes.sort_by(|a, b| a.repo.cmp(&b.repo));
    outcomes
}

/// Last line of defence: no token, no URL userinfo in what is kept or shown.
fn scrub(o: &mut RepoOutcome) {
    if let Some(e) = &o.error {
        o.error = Some(crate::secrets::redact(&url::scrub_userinfo(e)).into_owned());
    }
    if let Some(n) = &o.note {
        o.note = Some(crate::secrets::redact(&url::scrub_userinfo(n)).into_owned());
    }
}

/// Make the local commit of one repository on a blocking thread, under the deadline.
async fn commit_one(
    ctx: Arc<repo::Ctx>,
    f: discover::Found,
    slots: &tokio::sync::Semaphore,
    deadline: tokio::time::Instant,
    look: quiet::Look,
) -> repo::Prepared {
    let base = outcome_base(&f.path, ctx.mode, ctx.reason);
    let mut fallback = base.clone();
    let t0 = std::time::Instant::now();
    let low = ctx.reason == Reason::Checkpoint;
    let work = async {
        let _slot = slots.acquire().await;
        blocking(low, move || repo::prepare(&ctx, &f, base, look)).await
    };
    let mut p = match tokio::time::timeout_at(deadline, work).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            fallback.result = agent_proto::save::SaveResult::Failed;
            fallback.error = Some(format!("internal error while committing: {e}"));
            repo::Prepared {
                outcome: fallback,
                push: None,
                worktree: None,
            }
        }
        Err(_) => {
            fallback.result = agent_proto::save::SaveResult::Failed;
            fallback.error = Some("deadline passed before the local commit was made".into());
            repo::Prepared {
                outcome: fallback,
                push: None,
                worktree: None,
            }
        }
    };
    p.outcome.duration_ms = t0.elapsed().as_millis() as u64;
    p
}

/// Run `f` on a thread of its own: for a checkpoint (`low`), one at the lowest CPU and
/// I/O priority (a thread's nice value and I/O class are its own on Linux; a fresh
/// thread, so no pooled thread keeps them), else tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    low: bool,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    if !low {
        return tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| e.to_string());
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("wsagent-checkpoint".into())
        .spawn(move || {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            LOW_THREADS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(tid);
            if !BOOSTED.load(std::sync::atomic::Ordering::SeqCst) {
                lower_this_threads_priority();
            }
            let r = f();
            LOW_THREADS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|t| *t != tid);
            let _ = tx.send(r);
        })
        .map_err(|e| format!("cannot start a checkpoint thread: {e}"))?;
    rx.await
        .map_err(|_| "the checkpoint thread ended without an answer".to_string())
}

/// The checkpoint threads at work (their thread ids), for [`boost_checkpoints`].
static LOW_THREADS: std::sync::Mutex<Vec<libc::pid_t>> = std::sync::Mutex::new(Vec::new());
/// Set once the stop begins: checkpoint threads started after it keep full priority.
static BOOSTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The stop has begun: a checkpoint in flight is now the stop's save (it joins it), so
/// its threads get back the normal CPU and I/O priority (as root; a daemon without
/// CAP_SYS_NICE cannot lower a nice value and leaves them as they are).
pub fn boost_checkpoints() {
    BOOSTED.store(true, std::sync::atomic::Ordering::SeqCst);
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_BE: libc::c_long = 2;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    for tid in LOW_THREADS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        // SAFETY: plain syscalls naming one of our own threads; a thread that has just
        // ended makes them fail with ESRCH, which changes nothing.
        unsafe {
            let _ = libc::setpriority(libc::PRIO_PROCESS, *tid as libc::id_t, 0);
            let _ = libc::syscall(
                libc::SYS_ioprio_set,
                IOPRIO_WHO_PROCESS,
                *tid as libc::c_long,
                (IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | 4,
            );
        }
    }
}

/// Nice 19 and the idle I/O class, for the calling thread only.
fn lower_this_threads_priority() {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    // SAFETY: plain syscalls on the calling thread (who 0); failures leave the priority
    // as it was, which only makes the checkpoint less polite.
    unsafe {
        let _ = libc::setpriority(libc::PRIO_PROCESS, 0, 19);
        let _ = libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as libc::c_long,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        );
    }
}

/// Push a prepared commit on a blocking thread; at the deadline the outcome says
/// committed, not pushed, whatever the thread is doing.
async fn push_one(
    p: repo::Prepared,
    slots: &tokio::sync::Semaphore,
    creds: &CredCache,
    deadline: tokio::time::Instant,
    low: bool,
) -> RepoOutcome {
    let repo::Prepared {
        mut outcome, push, ..
    } = p;
    let Some(plan) = push else {
        return outcome;
    };
    let t0 = std::time::Instant::now();
    let std_deadline = deadline.into_std();
    let work = async {
        let _slot = slots.acquire().await;
        let c = creds.get(&plan.authority).await;
        blocking(low, move || repo::push(&plan, &c, std_deadline)).await
    };
    match tokio::time::timeout_at(deadline, work).await {
        Ok(Ok(r)) => {
            if r.pushed {
                outcome.result = agent_proto::save::SaveResult::Pushed;
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
    if outcome.error.is_some() && outcome.result == SaveResult::Unchanged {
        // The remote could not be seen to still have it: only the local commit is sure.
        outcome.result = agent_proto::save::SaveResult::Committed;
        outcome.pushed = false;
    }
    outcome.duration_ms += t0.elapsed().as_millis() as u64;
    outcome
}

/// Credentials per host, fetched once, on first use.
struct CredCache {
    tokens: crate::tokens::Tokens,
    /// Fresh tokens not in by then are given up for the cached ones.
    by: tokio::time::Instant,
    cells: std::sync::Mutex<
        BTreeMap<String, Arc<tokio::sync::OnceCell<Vec<crate::tokens::Credential>>>>,
    >,
}

impl CredCache {
    async fn get(&self, authority: &str) -> Vec<crate::tokens::Credential> {
        let cell = self
            .cells
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(authority.to_string())
            .or_default()
            .clone();
        cell.get_or_init(|| credentials_for(&self.tokens, authority, self.by))
            .await
            .clone()
    }
}

/// The longest a save waits for fresh tokens before it pushes with cached ones.
const FRESH_TOKEN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Tokens for `authority` (`host:port` tried as is, then as `host`), freshest first;
/// past `by`, the cached ones alone.
async fn credentials_for(
    tokens: &crate::tokens::Tokens,
    authority: &str,
    by: tokio::time::Instant,
) -> Vec<crate::tokens::Credential> {
    let mut names = vec![authority];
    if let Some((h, _)) = authority.rsplit_once(':') {
        names.push(h);
    }
    for host in names {
        if tokens.provider_for_host(host).is_none() {
            continue;
        }
        if let Ok(c) = tokio::time::timeout_at(by, tokens.for_host(host)).await {
            return c;
        }
        tracing::warn!(host, "no fresh token in time: pushing with the cached one");
        let Some((id, p)) = tokens.provider_for_host(host) else {
            continue;
        };
        return tokens
            .cached(id)
            .map(|token| crate::tokens::Credential {
                username: p.username(),
                token,
                source: "cache",
            })
            .into_iter()
            .collect();
    }
    Vec::new()
}

/// The repository containing `path` (for `wsagent save --repo`), looked for with the
/// permissions of the user who asked, if any.
fn only_repo(path: &Path, act_as: Option<&fsids::Ids>) -> Vec<discover::Found> {
    let _ids = act_as.map(|ids| fsids::AsOwner::take(ids, fsids::Role::Caller));
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
    let (level, line) = match o.result {
        SaveResult::Pushed => (
            Level::Info,
            format!(
                "saved {}: pushed {} to {}",
                o.repo,
                o.r#ref.as_deref().unwrap_or("?"),
                o.remote.as_deref().unwrap_or("?")
            ),
        ),
        SaveResult::Committed => (
            Level::Warn,
            format!(
                "saved {} locally on {}, not pushed{}",
                o.repo,
                o.r#ref.as_deref().unwrap_or("?"),
                o.error
                    .as_deref()
                    .map(|e| e.strip_prefix("not pushed: ").unwrap_or(e))
                    .or(o.note.as_deref())
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
        ),
        SaveResult::Failed => (
            Level::Error,
            format!(
                "could not save {}: {}",
                o.repo,
                o.error.as_deref().unwrap_or("unknown error")
            ),
        ),
        other => (Level::Info, format!("{}: {other}", o.repo)),
    };
    let line = match (&o.note, o.result) {
        (Some(n), SaveResult::Pushed) => format!("{line} ({n})"),
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
