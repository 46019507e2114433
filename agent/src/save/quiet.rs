//! Which repositories have not changed since their last save: a dirty set kept by
//! inotify (`notify`), so that an idle checkpoint of a 100 000-file repository stats
//! nothing and opens nothing (issue 15's "nothing changed" row).
//!
//! Each repository a checkpoint or a manual snapshot save looks at is watched: its
//! worktree recursively (symlinks never followed), and its git directory when that lies
//! outside the worktree (linked worktrees, submodules). Any change in the worktree, and
//! in a git directory any change of what a snapshot depends on (HEAD, the index, local
//! branches, config, an operation in progress; not objects, logs, remote-tracking refs
//! or lock files, which a save itself writes), bumps the repository's change count. A
//! save whose outcome is settled (clean, unchanged or pushed) records the count it
//! started from; the next save that finds the count the same answers from that record.
//!
//! An event reaches the daemon a moment after its change: before the set is trusted, a
//! look waits for the event of a marker file written in a private directory
//! ([`Quiet::sync`]), which comes after those of every change made before it.
//!
//! The set only ever spares a look that would find nothing; it never stands for one:
//! - the stop's save, a branch-mode save, a dry run and a save done for another user
//!   always look;
//! - a record is trusted for [`TRUST_FOR`] at most, then the repository is looked at
//!   again (which also catches what inotify cannot see: a write through another mount
//!   of the same files);
//! - a watch that could not be set up whole (more than [`MAX_DIRS`] directories, the
//!   inotify limit, an unreadable directory), a queue overflow or any error of the
//!   watcher makes every repository concerned be looked at, and watched anew.
//!
//! What it cannot see, both bounded by [`TRUST_FOR`] and the stop's full look: a file
//! written in a directory made an instant before, after a look and before notify has
//! added that directory's watch; and writes from another host to a network filesystem.
//!
//! Events tell the daemon which paths changed, nothing more: no file is read.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use agent_proto::save::{RepoOutcome, SaveResult};

use super::worktree::{MAX_TOUCHED, WorktreeTree};
use notify::event::{AccessKind, AccessMode, EventKind, EventKindMask};
use notify::{RecursiveMode, Watcher};

/// How long a "nothing changed" record is trusted before the repository is looked at.
pub const TRUST_FOR: Duration = Duration::from_secs(3600);
/// A worktree with more directories than this is not watched (each watch costs kernel
/// memory and a map entry): it is looked at every time.
pub const MAX_DIRS: usize = 20_000;
/// A repository that could not be watched is tried again after this long.
const RETRY_WATCH: Duration = Duration::from_secs(600);

/// The dirty set: cloneable, one per daemon.
#[derive(Clone)]
pub struct Quiet {
    state: Arc<Mutex<State>>,
    /// Told when a marker's event has been handled ([`Quiet::sync`]).
    synced: Arc<Condvar>,
    watcher: Arc<Mutex<Option<Watching>>>,
    max_dirs: usize,
}

/// The watcher, and a private directory (the daemon's own, 0700) whose marker files
/// tell when every event before them has been handled.
struct Watching {
    watcher: notify::RecommendedWatcher,
    marker: tempfile::TempDir,
    next: u64,
    /// The roots ever given to the watcher: only those are unwatched before a new
    /// watch (notify looks through every watch it has to unwatch a path, even one it
    /// never watched).
    given: std::collections::HashSet<PathBuf>,
}

/// How long [`Quiet::sync`] waits for its marker before it gives up (then: a full look).
const SYNC_WAIT: Duration = Duration::from_secs(2);

impl Default for Quiet {
    fn default() -> Quiet {
        Quiet {
            state: Arc::default(),
            synced: Arc::default(),
            watcher: Arc::default(),
            max_dirs: MAX_DIRS,
        }
    }
}

#[derive(Default)]
struct State {
    repos: BTreeMap<PathBuf, Entry>,
    /// Each watched root and the repositories (keys of `repos`) it belongs to: an
    /// event finds its repositories through its path's ancestors, not by a pass over
    /// every repository.
    by_root: HashMap<PathBuf, Vec<PathBuf>>,
    /// Where the saves' own local refs live (`refs/heads/wip/`): their writes are not
    /// the user's changes.
    own_refs: String,
    /// The marker directory ([`Watching::marker`]), and the last marker seen in it.
    marker: Option<PathBuf>,
    marker_seen: u64,
    /// Bumped when events were lost (a marker may never come).
    lost: u64,
}

struct Entry {
    /// The directories watched for this repository.
    roots: Vec<PathBuf>,
    /// Changes seen since the watch began.
    changes: u64,
    /// The paths (relative to the worktree) changed since the last look began; `None`
    /// when not known (too many, or a change in a git directory or an ignore file).
    paths: Option<BTreeSet<Vec<u8>>>,
    /// Every directory of `roots` is watched.
    watched: bool,
    /// When watching last failed.
    failed_at: Option<Instant>,
    settled: Option<Settled>,
    /// The repositories the discovery walk found inside this worktree, the change count
    /// it started from and what it walked with.
    nested: Option<(u64, u64, Vec<super::discover::Found>)>,
}

struct Settled {
    /// The change count the settled save started from.
    from: u64,
    /// When the last full look this record builds on began (a limited look carries its
    /// base's): what [`TRUST_FOR`] counts from.
    full_at: Instant,
    tree: WorktreeTree,
    /// What that save ended with (clean, unchanged or pushed).
    result: SaveResult,
}

/// How a save looks at a repository's worktree ([`Quiet::look`]).
#[derive(Debug)]
pub enum Look {
    /// Every path (libgit2's status of the whole worktree).
    Full,
    /// Not at all: its tree is this, as the last settled look found it, and that save
    /// ended so.
    Known(WorktreeTree, SaveResult),
    /// Only these paths (files or directories, relative to the worktree): no other path
    /// can differ from the index.
    Only(Vec<Vec<u8>>),
}

/// What [`Quiet::look`] hands to [`Quiet::settle`]: the count a save started from, and
/// when the full look it builds on began.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(u64, Instant);

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Quiet {
    pub fn new() -> Quiet {
        Quiet::default()
    }

    /// The worktree's tree as the last settled save of the repository at `repo` found
    /// it, when nothing it depends on changed since that save began, it is watched, and
    /// the record is recent.
    pub fn known(&self, repo: &Path) -> Option<(WorktreeTree, SaveResult)> {
        let st = lock(&self.state);
        let e = st.repos.get(repo)?;
        let s = e.settled.as_ref()?;
        (e.watched && s.from == e.changes && s.full_at.elapsed() < TRUST_FOR)
            .then(|| (s.tree.clone(), s.result))
    }

    /// For the discovery walk: the repositories found inside the worktree `repo` when
    /// it was last walked with the same `walk` fingerprint (depth left, exclusions), if
    /// nothing changed in it since; the walk then does not enter it.
    pub fn nested(&self, repo: &Path, walk: u64) -> Option<Vec<super::discover::Found>> {
        let st = lock(&self.state);
        let e = st.repos.get(repo)?;
        let (from, w, found) = e.nested.as_ref()?;
        let settled_recently = e
            .settled
            .as_ref()
            .is_some_and(|s| s.full_at.elapsed() < TRUST_FOR);
        (e.watched && settled_recently && *from == e.changes && *w == walk).then(|| found.clone())
    }

    /// Before the discovery walk enters the worktree `repo`: the change count it starts
    /// from, when the worktree is watched.
    pub fn walk_ticket(&self, repo: &Path) -> Option<Ticket> {
        let st = lock(&self.state);
        let e = st.repos.get(repo)?;
        e.watched.then_some(Ticket(e.changes, Instant::now()))
    }

    /// After the discovery walk went through the worktree `repo` from `ticket` with the
    /// `walk` fingerprint and found `found` inside it.
    pub fn walked(
        &self,
        repo: &Path,
        ticket: Ticket,
        walk: u64,
        found: Vec<super::discover::Found>,
    ) {
        if let Some(e) = lock(&self.state).repos.get_mut(repo) {
            e.nested = Some((ticket.0, walk, found));
        }
    }

    /// The start of the saves' own local refs (the snapshot ref template's fixed start).
    pub fn set_own_refs(&self, prefix: &str) {
        lock(&self.state).own_refs = prefix.to_string();
    }

    /// Forget what is known of `repo` (a save from a known tree did not end settled).
    pub fn forget(&self, repo: &Path) {
        if let Some(e) = lock(&self.state).repos.get_mut(repo) {
            e.settled = None;
        }
    }

    /// How a save is to look at the repository at `repo` (blocking: a first watch walks
    /// the worktree's directories), and the ticket to [`Quiet::settle`] with when it
    /// looks: known unchanged (no look), only at the paths that can differ from the
    /// index (those that did at the last settled look and those changed since), or all.
    pub fn look(&self, repo: &Path) -> (Look, Option<Ticket>) {
        // Every change made before this look must be counted first.
        let synced = self.sync();
        if synced && let Some((tree, result)) = self.known(repo) {
            return (Look::Known(tree, result), None);
        }
        let (ticket, changed, prev) = self.begin(repo);
        let only = match (prev, changed.filter(|_| synced)) {
            (Some(prev), Some(changed)) if prev.full_at.elapsed() < TRUST_FOR => {
                prev.tree.touched.map(|touched| {
                    let mut all: BTreeSet<Vec<u8>> = touched.into_iter().collect();
                    all.extend(changed);
                    (all, prev.full_at)
                })
            }
            _ => None,
        };
        match only {
            Some((all, full_at)) if !all.is_empty() && all.len() <= MAX_TOUCHED => (
                Look::Only(all.into_iter().collect()),
                Some(Ticket(ticket.0, full_at)),
            ),
            _ => (Look::Full, Some(ticket)),
        }
    }

    /// Wait until every event of a change made before this call has been handled (an
    /// event reaches the daemon a moment after the change): a marker file written in the
    /// private marker directory, whose event comes after all of those. False when that
    /// could not be made sure of (then nothing the set says is to be trusted now).
    pub fn sync(&self) -> bool {
        let (path, n) = {
            let mut w = self.watcher.lock().unwrap_or_else(|e| e.into_inner());
            let Some(w) = w.as_mut() else {
                // Nothing watched: nothing pending.
                return true;
            };
            w.next += 1;
            let path = w.marker.path().join(w.next.to_string());
            if std::fs::write(&path, b"").is_err() {
                return false;
            }
            (path, w.next)
        };
        let st = lock(&self.state);
        let lost = st.lost;
        let (st, timeout) = self
            .synced
            .wait_timeout_while(st, SYNC_WAIT, |st| st.marker_seen < n && st.lost == lost)
            .unwrap_or_else(|e| e.into_inner());
        let ok = !timeout.timed_out() && st.marker_seen >= n;
        drop(st);
        let _ = std::fs::remove_file(&path);
        ok
    }

    /// Before a save looks at `repo`: watch it if it is not; take the change count the
    /// look starts from, the paths changed since the last look began, and the last
    /// settled record (taken: a look that never settles leaves none behind).
    fn begin(&self, repo: &Path) -> (Ticket, Option<BTreeSet<Vec<u8>>>, Option<Settled>) {
        let need = {
            let mut st = lock(&self.state);
            let e = st.repos.entry(repo.to_path_buf()).or_insert_with(|| Entry {
                roots: Vec::new(),
                changes: 0,
                paths: None,
                watched: false,
                failed_at: None,
                settled: None,
                nested: None,
            });
            !e.watched && e.failed_at.is_none_or(|t| t.elapsed() >= RETRY_WATCH)
        };
        if need {
            let roots = roots_of(repo);
            let ok = roots.as_ref().is_ok_and(|r| self.watch(r));
            let mut st = lock(&self.state);
            let moved = st.repos.get_mut(repo).map(|e| {
                e.watched = ok;
                e.failed_at = (!ok).then(Instant::now);
                // What happened before the watch began is not known: look.
                e.changes += 1;
                e.paths = None;
                e.settled = None;
                e.nested = None;
                match roots {
                    Ok(r) => (std::mem::replace(&mut e.roots, r), e.roots.clone()),
                    Err(_) => (Vec::new(), e.roots.clone()),
                }
            });
            if let Some((old, new)) = moved {
                st.index_roots(repo, &old, &new);
            }
            if !ok {
                tracing::debug!(repo = %repo.display(), "not watched: every save looks at it");
            }
        }
        let mut st = lock(&self.state);
        match st.repos.get_mut(repo) {
            Some(e) => {
                let changed = e.paths.replace(BTreeSet::new());
                let prev = e.settled.take().filter(|_| e.watched);
                (Ticket(e.changes, Instant::now()), changed, prev)
            }
            None => (Ticket(0, Instant::now()), None, None),
        }
    }

    /// After a save of `repo` that started at `ticket` and found `tree`: remember the
    /// tree when the outcome is settled (nothing left to do until something changes),
    /// forget it otherwise.
    pub fn settle(
        &self,
        repo: &Path,
        ticket: Ticket,
        outcome: &RepoOutcome,
        tree: Option<WorktreeTree>,
    ) {
        let mut st = lock(&self.state);
        if let Some(e) = st.repos.get_mut(repo) {
            e.settled = tree.filter(|_| is_settled(outcome)).map(|tree| Settled {
                from: ticket.0,
                full_at: ticket.1,
                tree,
                result: outcome.result,
            });
        }
    }

    /// Watch `roots` recursively (making the watcher on first use); false when any of
    /// them could not be watched whole.
    fn watch(&self, roots: &[PathBuf]) -> bool {
        for r in roots {
            match count_dirs(r, self.max_dirs) {
                Some(n) if n <= self.max_dirs => {}
                _ => return false,
            }
        }
        let mut w = self.watcher.lock().unwrap_or_else(|e| e.into_inner());
        if w.is_none() {
            match self.make_watcher() {
                Ok(made) => *w = Some(made),
                Err(e) => {
                    tracing::debug!(error = %e, "no inotify watcher");
                    return false;
                }
            }
        }
        let Some(Watching { watcher, given, .. }) = w.as_mut() else {
            return false;
        };
        for r in roots {
            // A root watched before (then deleted, or lost to an overflow) is watched anew.
            if !given.insert(r.clone()) {
                let _ = watcher.unwatch(r);
            }
            if let Err(e) = watcher.watch(r, RecursiveMode::Recursive) {
                tracing::debug!(path = %r.display(), error = %e, "cannot watch");
                let _ = watcher.unwatch(r);
                return false;
            }
        }
        true
    }
}

/// Whether nothing is left to do for a repository after this outcome until something
/// changes: clean, unchanged, or pushed, without an error.
pub fn is_settled(outcome: &RepoOutcome) -> bool {
    outcome.error.is_none()
        && matches!(
            outcome.result,
            SaveResult::Clean | SaveResult::Unchanged | SaveResult::Pushed
        )
}

impl Quiet {
    fn make_watcher(&self) -> Result<Watching, String> {
        let (state, synced) = (self.state.clone(), self.synced.clone());
        // No access events but a write's close: a full look reads every file it cannot
        // trust, and an `IN_OPEN` for each would flood the queue (16 384 events by
        // default) with events that change nothing.
        let config = notify::Config::default()
            .with_follow_symlinks(false)
            .with_event_kinds(EventKindMask::CORE | EventKindMask::ACCESS_CLOSE);
        let mut watcher = notify::RecommendedWatcher::new(
            move |ev: notify::Result<notify::Event>| on_event(&state, &synced, ev),
            config,
        )
        .map_err(|e| e.to_string())?;
        let marker = tempfile::Builder::new()
            .prefix("wsagent-quiet-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        watcher
            .watch(marker.path(), RecursiveMode::NonRecursive)
            .map_err(|e| e.to_string())?;
        lock(&self.state).marker = Some(marker.path().to_path_buf());
        Ok(Watching {
            watcher,
            marker,
            next: 0,
            given: Default::default(),
        })
    }
}

/// The directories to watch for the repository whose worktree is `repo`: the worktree,
/// and its git and common directories when they lie outside it.
fn roots_of(repo: &Path) -> Result<Vec<PathBuf>, git2::Error> {
    let r = git2::Repository::open(repo)?;
    let mut roots = vec![repo.to_path_buf()];
    for d in [r.path(), r.commondir()] {
        let d = std::fs::canonicalize(d).unwrap_or_else(|_| d.to_path_buf());
        if !roots.iter().any(|x| d.starts_with(x)) {
            roots.push(d);
        }
    }
    Ok(roots)
}

/// Directories under `root` (itself included), counting stops past `cap`; `None` when
/// one could not be read. Symlinks are not followed; no file is stat'ed (`d_type`).
fn count_dirs(root: &Path, cap: usize) -> Option<usize> {
    let mut todo = vec![root.to_path_buf()];
    let mut n = 0;
    while let Some(d) = todo.pop() {
        n += 1;
        if n > cap {
            return Some(n);
        }
        for e in std::fs::read_dir(&d).ok()? {
            let e = e.ok()?;
            if e.file_type().ok()?.is_dir() {
                todo.push(e.path());
            }
        }
    }
    Some(n)
}

/// Whether an event of this kind can change what a save would find (reads, opens and
/// closes without writing cannot).
fn kind_matters(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Whether a change at `path` can change what a save would find. Inside a git
/// directory (below a `.git` component, or one of `gitdirs`), only what a snapshot
/// depends on counts: objects, logs, refs other than local branches, lock files and a
/// few scratch files are written by saves and fetches themselves.
fn path_matters(path: &Path, gitdirs: &[&Path], own_refs: &str) -> bool {
    let rest: Vec<&OsStr> = if let Some(g) = gitdirs.iter().find(|g| path.starts_with(g)) {
        path.strip_prefix(g)
            .map(|r| r.iter().collect())
            .unwrap_or_default()
    } else {
        let comps: Vec<Component<'_>> = path.components().collect();
        match comps.iter().position(|c| c.as_os_str() == ".git") {
            Some(i) => comps[i + 1..].iter().map(|c| c.as_os_str()).collect(),
            None => return true,
        }
    };
    if rest.iter().any(|c| *c == "objects" || *c == "logs") {
        return false;
    }
    if let Some(i) = rest.iter().position(|c| *c == "refs") {
        if rest.get(i + 1).is_some_and(|c| *c != "heads") {
            return false;
        }
        let mut r = rest[i..]
            .join(OsStr::new("/"))
            .to_string_lossy()
            .into_owned();
        r.push('/');
        if !own_refs.is_empty() && r.starts_with(own_refs) {
            return false;
        }
    }
    match rest.last() {
        Some(name) => {
            let n = name.to_string_lossy();
            !(n.ends_with(".lock")
                || matches!(
                    n.as_ref(),
                    "FETCH_HEAD" | "ORIG_HEAD" | "COMMIT_EDITMSG" | "gc.log" | "gc.pid"
                ))
        }
        // The git directory itself (deleted, moved).
        None => true,
    }
}

/// Add `path` to what changed in `e` since its last look, or make that unknown: a
/// change in a git directory (the index, HEAD: every path may now differ), in an ignore
/// or attributes file (other paths' fate changes), the worktree itself, or one too many.
fn note_path(e: &mut Entry, path: &Path, gitdirs: &[PathBuf]) {
    let Some(set) = e.paths.as_mut() else {
        return;
    };
    let rel = e.roots.first().and_then(|w| path.strip_prefix(w).ok());
    let known = rel.filter(|r| {
        !r.as_os_str().is_empty()
            && !gitdirs.iter().any(|g| path.starts_with(g))
            && !r.components().any(|c| c.as_os_str() == ".git")
            && !r
                .file_name()
                .is_some_and(|n| n == ".gitignore" || n == ".gitattributes" || n == ".gitmodules")
    });
    match known {
        Some(r) if set.len() < MAX_TOUCHED => {
            set.insert(r.as_os_str().as_bytes().to_vec());
        }
        _ => e.paths = None,
    }
}

impl State {
    /// Move `repo` from the roots `old` to the roots `new` in [`State::by_root`].
    fn index_roots(&mut self, repo: &Path, old: &[PathBuf], new: &[PathBuf]) {
        for r in old {
            if let Some(keys) = self.by_root.get_mut(r) {
                keys.retain(|k| k != repo);
                if keys.is_empty() {
                    self.by_root.remove(r);
                }
            }
        }
        for r in new {
            let keys = self.by_root.entry(r.clone()).or_default();
            if !keys.iter().any(|k| k == repo) {
                keys.push(repo.to_path_buf());
            }
        }
    }

    /// The repositories one of whose roots is `paths`' own or an ancestor's.
    fn repos_under(&self, paths: &[PathBuf]) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = Vec::new();
        for a in paths.iter().flat_map(|p| p.ancestors()) {
            for k in self.by_root.get(a).into_iter().flatten() {
                if !found.contains(k) {
                    found.push(k.clone());
                }
            }
        }
        found
    }
}

fn on_event(state: &Mutex<State>, synced: &Condvar, ev: notify::Result<notify::Event>) {
    let mut st = lock(state);
    let ev = match ev {
        Ok(ev) if !ev.need_rescan() => ev,
        // Events were lost (or the watcher failed): everything is to be looked at, and
        // watched anew (directories made meanwhile may not be).
        other => {
            tracing::debug!(event = ?other, "the dirty set lost track: every repository is looked at");
            for e in st.repos.values_mut() {
                e.changes += 1;
                e.paths = None;
                e.watched = false;
            }
            st.lost += 1;
            synced.notify_all();
            return;
        }
    };
    // A marker of [`Quiet::sync`]: every event before it has been handled.
    if let Some(m) = st.marker.clone()
        && let Some(p) = ev.paths.iter().find(|p| p.parent() == Some(m.as_path()))
    {
        if let Some(n) = p.file_name().and_then(|n| n.to_str()?.parse::<u64>().ok()) {
            st.marker_seen = st.marker_seen.max(n);
            synced.notify_all();
        }
        return;
    }
    if !kind_matters(&ev.kind) {
        return;
    }
    let own_refs = std::mem::take(&mut st.own_refs);
    for key in st.repos_under(&ev.paths) {
        let Some(e) = st.repos.get_mut(&key) else {
            continue;
        };
        let gitdirs: Vec<&Path> = e.roots.iter().skip(1).map(PathBuf::as_path).collect();
        let hit = ev.paths.iter().any(|p| {
            e.roots.iter().any(|r| p.starts_with(r)) && path_matters(p, &gitdirs, &own_refs)
        });
        if hit {
            if e.settled.as_ref().is_some_and(|s| s.from == e.changes) {
                tracing::debug!(paths = ?ev.paths, kind = ?ev.kind, "a quiet repository changed");
            }
            e.changes += 1;
            let gitdirs: Vec<PathBuf> = gitdirs.iter().map(|g| g.to_path_buf()).collect();
            for p in &ev.paths {
                note_path(e, p, &gitdirs);
            }
        }
        // A watched root itself removed or moved: its watch is gone.
        if ev.paths.iter().any(|p| e.roots.iter().any(|r| r == p))
            && matches!(ev.kind, EventKind::Remove(_) | EventKind::Modify(_))
        {
            e.changes += 1;
            e.paths = None;
            e.watched = false;
        }
    }
    st.own_refs = own_refs;
}

#[cfg(test)]
mod tests {
    use super::super::worktree::tests::git;
    use super::*;

    #[test]
    fn inside_a_git_directory_only_what_a_snapshot_depends_on_counts() {
        let p = |s: &str| path_matters(Path::new(s), &[], "refs/heads/wip/");
        // The worktree: everything.
        assert!(p("/r/src/main.rs"));
        assert!(p("/r/a.lock"));
        // What a save or a fetch writes itself.
        assert!(!p("/r/.git/objects/ab/cdef"));
        assert!(!p("/r/.git/objects/pack/pack-1.pack"));
        assert!(!p("/r/.git/logs/HEAD"));
        assert!(!p("/r/.git/refs/remotes/origin/main"));
        assert!(!p("/r/.git/refs/tags/v1"));
        assert!(!p("/r/.git/index.lock"));
        assert!(!p("/r/.git/FETCH_HEAD"));
        // What the user's git changes.
        assert!(p("/r/.git/HEAD"));
        assert!(p("/r/.git/index"));
        assert!(p("/r/.git/refs/heads/main"));
        assert!(p("/r/.git/refs/heads/feature/x"));
        // The saves' own snapshot refs.
        assert!(!p("/r/.git/refs/heads/wip"));
        assert!(!p("/r/.git/refs/heads/wip/ws/main"));
        assert!(p("/r/.git/refs/heads/wipe"));
        assert!(p("/r/.git/packed-refs"));
        assert!(p("/r/.git/config"));
        assert!(p("/r/.git/MERGE_HEAD"));
        assert!(p("/r/.git/rebase-merge/done"));
        assert!(p("/r/.git"));
        // A submodule's git directory inside its parent's, and one outside the worktree.
        assert!(p("/r/.git/modules/lib/index"));
        assert!(!p("/r/.git/modules/lib/objects/ab/cd"));
        let outside = [Path::new("/main/.git/worktrees/wt")];
        assert!(path_matters(
            Path::new("/main/.git/worktrees/wt/HEAD"),
            &outside,
            ""
        ));
        assert!(!path_matters(
            Path::new("/main/.git/worktrees/wt/index.lock"),
            &outside,
            ""
        ));
    }

    #[test]
    fn an_event_reaches_every_repository_whose_root_holds_it_and_no_other() {
        let mut st = State::default();
        let pb = |s: &str| PathBuf::from(s);
        let (outer, inner) = (Path::new("/w/a"), Path::new("/w/a/sub"));
        st.index_roots(outer, &[], &[pb("/w/a"), pb("/g/a")]);
        st.index_roots(inner, &[], &[pb("/w/a/sub")]);
        st.index_roots(Path::new("/w/ab"), &[], &[pb("/w/ab")]);
        let under = |st: &State, p: &str| st.repos_under(&[pb(p)]);
        assert_eq!(under(&st, "/w/a/sub/x/y"), [pb("/w/a/sub"), pb("/w/a")]);
        assert_eq!(under(&st, "/g/a/HEAD"), [pb("/w/a")]);
        assert_eq!(under(&st, "/w/a"), [pb("/w/a")], "the root itself");
        assert!(under(&st, "/w/b/x").is_empty());
        assert!(under(&st, "/g").is_empty(), "a root's parent is not in it");
        // Watched anew without its outside git directory.
        st.index_roots(outer, &[pb("/w/a"), pb("/g/a")], &[pb("/w/a")]);
        assert!(under(&st, "/g/a/HEAD").is_empty());
        assert!(!st.by_root.contains_key(Path::new("/g/a")));
        assert_eq!(
            st.repos_under(&[pb("/w/ab/f"), pb("/w/a/f")]),
            [pb("/w/ab"), pb("/w/a")],
            "a rename's two paths"
        );
    }

    #[test]
    fn reads_do_not_count_writes_do() {
        use notify::event::{CreateKind, ModifyKind};
        assert!(!kind_matters(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!kind_matters(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(kind_matters(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(kind_matters(&EventKind::Create(CreateKind::File)));
        assert!(kind_matters(&EventKind::Modify(ModifyKind::Any)));
    }

    fn settled(repo: &Path) -> RepoOutcome {
        RepoOutcome {
            repo: repo.display().to_string(),
            result: SaveResult::Pushed,
            ..Default::default()
        }
    }

    fn tree() -> WorktreeTree {
        WorktreeTree {
            tree: git2::Oid::from_str("4b825dc642cb6eb9a060e54bf8d69288fbee4904").unwrap(),
            left_out: Vec::new(),
            changed: 0,
            index_tree: None,
            touched: Some(Vec::new()),
        }
    }

    /// Wait (bounded) until `f` holds.
    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < end, "timed out waiting: {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_change_anywhere_in_the_worktree_ends_the_quiet() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = std::fs::canonicalize(tmp.path()).unwrap().join("r");
        std::fs::create_dir_all(repo.join("src/deep")).unwrap();
        std::fs::write(repo.join("src/deep/a.txt"), "a").unwrap();
        git(&repo, &["init", "-q"]);
        git(&repo, &["add", "-A"]);
        git(&repo, &["commit", "-qm", "base"]);
        let q = Quiet::new();
        // Never looked at: nothing known.
        assert!(q.known(&repo).is_none());
        let t = q.begin(&repo).0;
        q.settle(&repo, t, &settled(&repo), Some(tree()));
        assert_eq!(q.known(&repo).unwrap().0.tree, tree().tree);

        // A write deep in the worktree ends it.
        std::fs::write(repo.join("src/deep/a.txt"), "b").unwrap();
        wait_until("the write seen", || q.known(&repo).is_none());

        // Settled again, then a new directory and a file in it.
        let t = q.begin(&repo).0;
        q.settle(&repo, t, &settled(&repo), Some(tree()));
        assert!(q.known(&repo).is_some());
        std::fs::create_dir(repo.join("new")).unwrap();
        wait_until("the new directory seen", || q.known(&repo).is_none());
        // (A later event is handled after the watch of `new` is added: notify adds
        // the watches of a batch's new directories once the batch is handled.)
        let t = q.begin(&repo).0;
        q.settle(&repo, t, &settled(&repo), Some(tree()));
        std::fs::write(repo.join("marker"), "m").unwrap();
        wait_until("the marker seen", || q.known(&repo).is_none());
        let t = q.begin(&repo).0;
        q.settle(&repo, t, &settled(&repo), Some(tree()));
        std::fs::write(repo.join("new/f"), "f").unwrap();
        wait_until("a file in the new directory seen", || {
            q.known(&repo).is_none()
        });

        // The user's commit (HEAD's branch moves, the index is rewritten).
        let t = q.begin(&repo).0;
        q.settle(&repo, t, &settled(&repo), Some(tree()));
        git(&repo, &["commit", "-qm", "more", "--allow-empty"]);
        wait_until("the commit seen", || q.known(&repo).is_none());

        // A failed save is not a record.
        let t = q.begin(&repo).0;
        let mut failed = settled(&repo);
        failed.result = SaveResult::Committed;
        q.settle(&repo, t, &failed, Some(tree()));
        assert!(q.known(&repo).is_none());
    }

    #[test]
    fn after_a_change_the_look_is_limited_to_the_changed_paths_and_what_differed_before() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = std::fs::canonicalize(tmp.path()).unwrap().join("r");
        std::fs::create_dir_all(repo.join("a")).unwrap();
        git(&repo, &["init", "-q"]);
        let q = Quiet::new();
        // Never looked at: all of it.
        let (look, t) = q.look(&repo);
        assert!(matches!(look, Look::Full), "{look:?}");
        let mut before = tree();
        before.touched = Some(vec![b"was-dirty".to_vec()]);
        q.settle(&repo, t.unwrap(), &settled(&repo), Some(before.clone()));
        assert!(matches!(q.look(&repo).0, Look::Known(..)));

        std::fs::write(repo.join("a/new"), "n").unwrap();
        wait_until("the write seen", || q.known(&repo).is_none());
        let (look, t) = q.look(&repo);
        match look {
            Look::Only(p) => assert_eq!(p, vec![b"a/new".to_vec(), b"was-dirty".to_vec()]),
            other => panic!("expected a limited look, got {other:?}"),
        }
        q.settle(&repo, t.unwrap(), &settled(&repo), Some(before.clone()));

        // The index changed (a `git add`): any path may differ from it now.
        std::fs::write(repo.join("a/new"), "n2").unwrap();
        git(&repo, &["add", "a/new"]);
        wait_until("the index seen", || {
            lock(&q.state).repos[&repo].paths.is_none()
        });
        let (look, t) = q.look(&repo);
        assert!(matches!(look, Look::Full), "{look:?}");
        // A look that never settles leaves nothing to build on.
        let _ = t;
        std::fs::write(repo.join("a/other"), "o").unwrap();
        wait_until("the write seen", || {
            lock(&q.state).repos[&repo]
                .paths
                .as_ref()
                .is_some_and(|p| !p.is_empty())
        });
        assert!(matches!(q.look(&repo).0, Look::Full));
    }

    #[test]
    fn a_look_counts_every_change_made_before_it_however_late_its_event() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = std::fs::canonicalize(tmp.path()).unwrap().join("r");
        std::fs::create_dir_all(&repo).unwrap();
        git(&repo, &["init", "-q"]);
        let q = Quiet::new();
        let (_, t) = q.look(&repo);
        q.settle(&repo, t.unwrap(), &settled(&repo), Some(tree()));
        // Many changes while the event handler is held up (as on a loaded machine),
        // then a look at once: no waiting for their events.
        let names: Vec<Vec<u8>> = (0..300).map(|i| format!("f{i}").into_bytes()).collect();
        {
            let _held_up = lock(&q.state);
            for n in &names {
                std::fs::write(repo.join(std::str::from_utf8(n).unwrap()), "x").unwrap();
            }
        }
        match q.look(&repo).0 {
            Look::Only(p) => assert_eq!(p, {
                let mut all = names.clone();
                all.sort();
                all
            }),
            other => panic!("expected a limited look, got {other:?}"),
        }
    }

    /// A full look reads every file whose stat data it cannot trust (refresh.rs): those
    /// reads must not reach the watcher, or a large worktree's first look would fill the
    /// kernel's event queue and the dirty set would lose track of every repository.
    #[test]
    fn reads_of_more_files_than_the_event_queue_holds_lose_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = std::fs::canonicalize(tmp.path()).unwrap().join("r");
        std::fs::create_dir_all(&repo).unwrap();
        std::fs::write(repo.join("a.txt"), "a").unwrap();
        git(&repo, &["init", "-q"]);
        let q = Quiet::new();
        let (_, t) = q.look(&repo);
        q.settle(&repo, t.unwrap(), &settled(&repo), Some(tree()));
        let queue: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(16384);
        {
            // The handler held up (a busy machine): nothing drains the queue meanwhile.
            let _held_up = lock(&q.state);
            for _ in 0..queue + 1000 {
                std::io::Read::read(
                    &mut std::fs::File::open(repo.join("a.txt")).unwrap(),
                    &mut [0u8; 4],
                )
                .unwrap();
            }
        }
        assert!(q.sync(), "the marker's event never came");
        assert_eq!(lock(&q.state).lost, 0, "events were lost");
        assert!(q.known(&repo).is_some(), "reads ended the quiet");
    }

    #[test]
    fn a_worktree_past_the_directory_cap_is_never_trusted() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("r");
        std::fs::create_dir_all(&repo).unwrap();
        git(&repo, &["init", "-q"]);
        assert_eq!(count_dirs(&repo, 3), Some(4));
        let q = Quiet {
            max_dirs: 3,
            ..Quiet::default()
        };
        let t = q.begin(&repo).0;
        q.settle(&repo, t, &settled(&repo), Some(tree()));
        assert!(
            q.known(&repo).is_none(),
            "a worktree past the cap was trusted"
        );
        let q = Quiet::new();
        let t = q.begin(&repo).0;
        q.settle(&repo, t, &settled(&repo), Some(tree()));
        assert!(q.known(&repo).is_some());
        // A worktree whose directories cannot all be read is not watched either.
        let gone = tmp.path().join("gone");
        let t = q.begin(&gone).0;
        q.settle(&gone, t, &settled(&gone), Some(tree()));
        assert!(q.known(&gone).is_none());
    }
}
