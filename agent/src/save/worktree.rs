//! The tree of a worktree as it is on disk, built without touching the repository's
//! index, HEAD or files: what `git add -A && git write-tree` would give, minus the
//! files too large to save.
//!
//! The tree starts from the index entries (so unmodified tracked files cost nothing),
//! then every path the status reports as changed, untracked or conflicted is read from
//! disk into a blob; deleted ones are dropped. Only the changed paths are looked up in
//! the index, and the tree is written from the repository's index itself with those
//! entries changed in memory (its cached trees stand for every untouched directory),
//! then put back; it is never written to disk. With conflicts, every entry goes into a
//! fresh in-memory [`git2::Index`] instead. Paths are bytes end to end, so non-UTF-8
//! file names are saved exactly.
//!
//! Entries marked skip-worktree (a sparse checkout's files outside its cone, or
//! `git update-index --skip-worktree`) are not on disk on purpose: libgit2's status
//! reports them as deleted, but they keep their index version, as `git add -A` does.
//! One that is on disk anyway is saved from disk like any file (libgit2's status calls
//! it unmodified whatever its content; git since 2.37 clears the flag of such files):
//! no work is dropped for a flag.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::SystemTime;

use git2::{IndexEntry, IndexTime, Oid, Repository, Status, StatusOptions};

use super::objects::{Plain, Staged};

const MODE_FILE: u32 = 0o100644;
const MODE_EXEC: u32 = 0o100755;
const MODE_LINK: u32 = 0o120000;
const MODE_GITLINK: u32 = 0o160000;
/// `GIT_INDEX_ENTRY_SKIP_WORKTREE`, in an index entry's extended flags.
const SKIP_WORKTREE: u16 = 1 << 14;

/// The paths of the index's skip-worktree entries that are not on disk (under
/// `workdir`): those keep their index version.
pub(crate) fn skip_worktree_paths(index: &git2::Index, workdir: &Path) -> BTreeSet<Vec<u8>> {
    sparse_entries(index, workdir).0
}

/// In one pass over the index: (the skip-worktree paths not on disk, which keep their
/// index version; the stage-0 skip-worktree entries on disk anyway, with their index
/// (mode, id), which libgit2's status never looks at).
type Sparse = (BTreeSet<Vec<u8>>, Vec<(Vec<u8>, (u32, Oid))>);
fn sparse_entries(index: &git2::Index, workdir: &Path) -> Sparse {
    let (mut absent, mut present) = (BTreeSet::new(), Vec::new());
    for e in index.iter() {
        if e.flags_extended & SKIP_WORKTREE == 0 {
            continue;
        }
        if std::fs::symlink_metadata(workdir.join(OsStr::from_bytes(&e.path))).is_err() {
            absent.insert(e.path);
        } else if (e.flags >> 12) & 0x3 == 0 {
            present.push((e.path, (e.mode, e.id)));
        }
    }
    (absent, present)
}

/// The (mode, id) `index` has for `path`: its stage 0, else its first conflict stage.
fn tracked_in(index: &git2::Index, path: &[u8]) -> Option<(u32, Oid)> {
    let p = Path::new(OsStr::from_bytes(path));
    (0..=3)
        .find_map(|stage| index.get_path(p, stage))
        .map(|e| (e.mode, e.id))
}

/// Mark `paths` skip-worktree again in `index` (after `read_tree`, which drops the
/// flag), so a sparse checkout stays sparse.
pub(crate) fn restore_skip_worktree(
    index: &mut git2::Index,
    paths: &BTreeSet<Vec<u8>>,
) -> Result<(), git2::Error> {
    for p in paths {
        let Some(mut e) = index.get_path(Path::new(OsStr::from_bytes(p)), 0) else {
            continue;
        };
        if e.flags_extended & SKIP_WORKTREE == 0 {
            e.flags_extended |= SKIP_WORKTREE;
            index.add(&e)?;
        }
    }
    Ok(())
}

/// Worktree-side status bits: what a skip-worktree entry's status must not count.
fn worktree_bits() -> Status {
    Status::WT_NEW
        | Status::WT_MODIFIED
        | Status::WT_DELETED
        | Status::WT_TYPECHANGE
        | Status::WT_RENAMED
        | Status::WT_UNREADABLE
}

/// The worktree's tree, and the files left out of it (with why).
#[derive(Debug, Clone)]
pub struct WorktreeTree {
    pub tree: Oid,
    pub left_out: Vec<String>,
    /// Number of paths that differ from the index (changed, untracked, deleted).
    pub changed: usize,
    /// The tree of the index as it is (the staged state), when it has no conflict.
    pub index_tree: Option<Oid>,
    /// The paths that differ from the index (at most [`MAX_TOUCHED`]; `None` past it):
    /// with the paths changed since, all a later look needs to look at.
    pub touched: Option<Vec<Vec<u8>>>,
}

/// The most paths [`WorktreeTree::touched`] keeps.
pub const MAX_TOUCHED: usize = 1000;

fn kept(touched: &[Vec<u8>]) -> Option<Vec<Vec<u8>>> {
    (touched.len() <= MAX_TOUCHED).then(|| touched.to_vec())
}

/// Build the tree of `repo`'s worktree; blobs and trees are written through `staged`
/// (`repo`'s staged writes).
///
/// `only`: look at these paths only (each a file or a directory, relative to the
/// worktree): every other path is taken to be as in the index. The dirty set
/// ([`super::quiet`]) gives the paths that differed from the index at the last look and
/// those changed since; libgit2 then visits just them (its path list, no pattern
/// matching), instead of every file of the worktree.
pub(crate) fn worktree_tree(
    repo: &Repository,
    staged: &mut Staged<'_, '_>,
    max_file_size: u64,
    only: Option<&[Vec<u8>]>,
) -> Result<WorktreeTree, git2::Error> {
    let workdir = repo
        .workdir()
        .ok_or_else(|| git2::Error::from_str("bare repository has no worktree"))?
        .to_path_buf();
    // What differs from the index: each path's new (mode, id), `None` when it is gone.
    // Everything else is the index's; its entries are looked up one by one, never
    // copied out whole (a look at a few paths of a big repository costs those paths).
    let mut updates: BTreeMap<Vec<u8>, Option<(u32, Oid)>> = BTreeMap::new();
    // The repository's index, never written here (its tree goes to the object database
    // through `staged`, like every object of a save); changed in memory only below,
    // and put back.
    let mut index = repo.index()?;
    let (skipped, present) = sparse_entries(&index, &workdir);
    let index_tree = if index.has_conflicts() {
        None
    } else {
        index.write_tree_to(repo).ok()
    };

    let mut opts = StatusOptions::new();
    opts.include_untracked(true)
        .recurse_untracked_dirs(true)
        .include_ignored(false)
        .include_unmodified(false)
        .exclude_submodules(false)
        .renames_head_to_index(false)
        .renames_index_to_workdir(false)
        // The tree starts from the index: HEAD against the index is not needed.
        .show(git2::StatusShow::Workdir);
    if let Some(paths) = only {
        for p in paths {
            opts.pathspec(p.clone());
        }
        opts.disable_pathspec_match(true);
    }
    // A full look: files whose stat data is stale but whose bytes are the index's are
    // made to look unmodified first (refresh.rs), so libgit2 does not hash them again.
    let t0 = std::time::Instant::now();
    let mut fresh = match only {
        None => {
            let written = std::fs::metadata(repo.path().join("index"))
                .and_then(|m| m.modified())
                .ok();
            super::refresh::refreshed_index(&index, &workdir, written, SystemTime::now())?
        }
        Some(_) => None,
    };
    let t1 = std::time::Instant::now();
    let swapped = match &mut fresh {
        Some((mem, _)) => Some(super::refresh::Swapped::new(repo, mem)?),
        None => None,
    };
    let statuses = repo.statuses(Some(&mut opts))?;
    drop(swapped);
    tracing::debug!(
        refresh_ms = (t1 - t0).as_millis() as u64,
        status_ms = t1.elapsed().as_millis() as u64,
        refreshed = ?fresh.as_ref().map(|f| f.1),
        entries = index.len(),
        "looked at the worktree"
    );
    let mut plain = Plain::new(repo, &workdir, &index);
    let mut left_out = Vec::new();
    let mut changed = 0;
    // The paths whose entry differs from the index's.
    let mut touched: Vec<Vec<u8>> = Vec::new();
    let from_disk = Status::WT_NEW
        | Status::WT_MODIFIED
        | Status::WT_TYPECHANGE
        | Status::WT_RENAMED
        | Status::CONFLICTED;
    for s in statuses.iter() {
        let st = s.status();
        let path = s.path_bytes().to_vec();
        if st.is_ignored() || path.ends_with(b"/") {
            // A trailing slash is a nested repository: saved on its own.
            continue;
        }
        if skipped.contains(&path) {
            // Not checked out on purpose: its index version stands.
            continue;
        }
        if st.intersects(from_disk) {
            changed += 1;
            let full = workdir.join(OsStr::from_bytes(&path));
            let tracked = tracked_in(&index, &path);
            touched.push(path.clone());
            match blob_from_disk(repo, staged, &mut plain, &full, tracked, max_file_size) {
                Ok(entry) => {
                    updates.insert(path, entry);
                }
                // A tracked file keeps its last staged version; an untracked one is
                // left out.
                Err(why) => left_out.push(format!("{}: {why}", String::from_utf8_lossy(&path))),
            }
            // Bounded memory: big batches of new content reach the disk as they grow.
            staged.flush_if_full()?;
        } else if st.contains(Status::WT_DELETED) {
            changed += 1;
            updates.insert(path.clone(), None);
            touched.push(path);
        }
    }

    for (path, tracked) in present {
        let full = workdir.join(OsStr::from_bytes(&path));
        match blob_from_disk(
            repo,
            staged,
            &mut plain,
            &full,
            Some(tracked),
            max_file_size,
        ) {
            Ok(Some(entry)) if entry != tracked => {
                changed += 1;
                updates.insert(path.clone(), Some(entry));
                touched.push(path);
            }
            Ok(_) => {}
            Err(why) => left_out.push(format!("{}: {why}", String::from_utf8_lossy(&path))),
        }
        staged.flush_if_full()?;
    }

    // Nothing differs from the index (the common checkpoint): the worktree's tree is the
    // index's, already built from its cached trees; no need to rebuild it entry by entry.
    if changed == 0
        && left_out.is_empty()
        && let Some(tree) = index_tree
    {
        return Ok(WorktreeTree {
            tree,
            left_out,
            changed,
            index_tree,
            touched: kept(&touched),
        });
    }
    // Changes on an index without conflicts: the index itself with just those entries
    // changed keeps its cached trees for every untouched directory, so only the changed
    // directories' trees are written (as `git write-tree` after `git add` does); then
    // its entries are put back as they were. A new path that meets an entry as file
    // against directory makes libgit2 drop that entry: it is gone from the disk too, so
    // it is among the updates (removed anyway), and putting the old entries back drops
    // the new path in turn.
    let tree = if index_tree.is_some() {
        let before: Vec<(&Vec<u8>, Option<IndexEntry>)> = updates
            .keys()
            .map(|p| (p, index.get_path(Path::new(OsStr::from_bytes(p)), 0)))
            .collect();
        let tree = apply(&mut index, &updates).and_then(|()| index.write_tree_to(repo));
        for (path, old) in before {
            let p = Path::new(OsStr::from_bytes(path));
            match old {
                Some(e) => index.add(&e)?,
                None if index.get_path(p, 0).is_some() => index.remove_path(p)?,
                None => {}
            }
        }
        tree?
    } else {
        // Conflicts (or an index whose tree could not be written): every entry into a
        // fresh index.
        let mut entries: BTreeMap<Vec<u8>, (u32, Oid)> = BTreeMap::new();
        for e in index.iter() {
            let stage = (e.flags >> 12) & 0x3;
            if stage == 0 || !entries.contains_key(&e.path) {
                entries.insert(e.path, (e.mode, e.id));
            }
        }
        for (path, new) in updates {
            match new {
                Some(e) => entries.insert(path, e),
                None => entries.remove(&path),
            };
        }
        let mut mem = git2::Index::new()?;
        for (path, (mode, id)) in entries {
            mem.add(&entry(path, mode, id))?;
        }
        mem.write_tree_to(repo)?
    };
    Ok(WorktreeTree {
        tree,
        left_out,
        changed,
        index_tree,
        touched: kept(&touched),
    })
}

/// Put `updates` into `index`: each path's new entry, or none.
fn apply(
    index: &mut git2::Index,
    updates: &BTreeMap<Vec<u8>, Option<(u32, Oid)>>,
) -> Result<(), git2::Error> {
    for (path, new) in updates {
        let p = Path::new(OsStr::from_bytes(path));
        match new {
            Some((mode, id)) => index.add(&entry(path.clone(), *mode, *id))?,
            None if index.get_path(p, 0).is_some() => index.remove_path(p)?,
            None => {}
        }
    }
    Ok(())
}

/// An index entry for a tree only: no stat data.
fn entry(path: Vec<u8>, mode: u32, id: Oid) -> IndexEntry {
    let zero = IndexTime::new(0, 0);
    IndexEntry {
        ctime: zero,
        mtime: zero,
        dev: 0,
        ino: 0,
        mode,
        uid: 0,
        gid: 0,
        file_size: 0,
        id,
        flags: path.len().min(0xfff) as u16,
        flags_extended: 0,
        path,
    }
}

/// How many paths differ between the worktree and the index or HEAD (untracked
/// included, ignored not): a read-only look for dry runs.
pub fn pending_changes(repo: &Repository) -> Result<Vec<String>, git2::Error> {
    let mut opts = StatusOptions::new();
    opts.include_untracked(true)
        .recurse_untracked_dirs(true)
        .include_ignored(false)
        .exclude_submodules(false);
    let workdir = repo
        .workdir()
        .ok_or_else(|| git2::Error::from_str("bare repository has no worktree"))?;
    let index = repo.index()?;
    let (skipped, present) = sparse_entries(&index, workdir);
    // Skip-worktree files on disk anyway: changed when their bytes differ (not written).
    let mut out: Vec<String> = present
        .into_iter()
        .filter(|(path, (_, id))| {
            let full = workdir.join(OsStr::from_bytes(path));
            let is_file = std::fs::symlink_metadata(&full).is_ok_and(|m| m.is_file());
            !is_file || !Oid::hash_file(git2::ObjectType::Blob, &full).is_ok_and(|h| h == *id)
        })
        .map(|(path, _)| format!("M  {}", String::from_utf8_lossy(&path)))
        .collect();
    let statuses = repo.statuses(Some(&mut opts))?;
    for s in statuses.iter() {
        let st = s.status();
        if st.is_ignored() || s.path_bytes().ends_with(b"/") {
            continue;
        }
        // A skip-worktree entry counts only for what is staged.
        if skipped.contains(s.path_bytes()) && (st - worktree_bits()).is_empty() {
            continue;
        }
        out.push(format!(
            "{} {}",
            short_status(st),
            String::from_utf8_lossy(s.path_bytes())
        ));
    }
    Ok(out)
}

/// `git status --short`'s two letters for a status.
fn short_status(st: Status) -> String {
    if st.contains(Status::WT_NEW) && !st.intersects(Status::INDEX_NEW) {
        return "??".into();
    }
    let index = if st.contains(Status::INDEX_NEW) {
        'A'
    } else if st.contains(Status::INDEX_DELETED) {
        'D'
    } else if st.intersects(Status::INDEX_MODIFIED | Status::INDEX_TYPECHANGE) {
        'M'
    } else if st.contains(Status::INDEX_RENAMED) {
        'R'
    } else {
        ' '
    };
    let wt = if st.contains(Status::WT_DELETED) {
        'D'
    } else if st.intersects(Status::WT_MODIFIED | Status::WT_TYPECHANGE) {
        'M'
    } else if st.contains(Status::CONFLICTED) {
        'U'
    } else {
        ' '
    };
    format!("{index}{wt}")
}

/// The entry for one path as it is on disk: `Ok(None)` when it is gone, `Err(why)` when
/// it cannot be saved.
fn blob_from_disk(
    repo: &Repository,
    staged: &mut Staged<'_, '_>,
    plain: &mut Plain<'_>,
    full: &Path,
    tracked: Option<(u32, Oid)>,
    max_file_size: u64,
) -> Result<Option<(u32, Oid)>, String> {
    let md = match std::fs::symlink_metadata(full) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("unreadable: {e}")),
    };
    if let Some((MODE_GITLINK, old)) = tracked {
        // A submodule: record its current HEAD (its own work is saved in itself).
        let id = git2::Repository::open(full)
            .ok()
            .and_then(|r| r.head().ok().and_then(|h| h.target()))
            .unwrap_or(old);
        return Ok(Some((MODE_GITLINK, id)));
    }
    let ft = md.file_type();
    if ft.is_symlink() {
        let target = std::fs::read_link(full).map_err(|e| format!("unreadable link: {e}"))?;
        let id = repo
            .blob(target.as_os_str().as_bytes())
            .map_err(|e| e.message().to_string())?;
        return Ok(Some((MODE_LINK, id)));
    }
    if ft.is_dir() {
        // An untracked directory the status could not enter (e.g. an empty submodule
        // checkout): nothing to save as a file.
        return Ok(tracked);
    }
    if !ft.is_file() {
        return Err("not a regular file".into());
    }
    if md.len() > max_file_size {
        return Err(format!(
            "{} bytes, over save.max_file_size ({max_file_size})",
            md.len()
        ));
    }
    let id = staged
        .blob_from_file(full, md.len(), plain.is_plain(full))
        .map_err(|e| format!("unreadable: {}", e.message()))?;
    let mode = if md.permissions().mode() & 0o111 != 0 {
        MODE_EXEC
    } else {
        MODE_FILE
    };
    Ok(Some((mode, id)))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// `git -C dir ARGS` with a committer, asserting success (the save module's unit tests).
    pub(in crate::save) fn git(dir: &Path, args: &[&str]) {
        let out = std::process::Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@t", "-C"])
            .arg(dir)
            .args(args)
            .output()
            .expect("git");
        assert!(out.status.success(), "git {args:?}: {out:?}");
    }

    fn look(dir: &Path, only: Option<&[Vec<u8>]>) -> WorktreeTree {
        let repo = Repository::open(dir).unwrap();
        let odb = repo.odb().unwrap();
        let mut staged = Staged::attach(&repo, &odb).unwrap();
        let wt = worktree_tree(&repo, &mut staged, u64::MAX, only).unwrap();
        staged.flush().unwrap();
        wt
    }

    /// The limited look (the paths that differed from the index last time, and those
    /// changed since) gives exactly the tree of the full look, whatever changed: files
    /// in place, new directories, a deleted directory of tracked files, a renamed one,
    /// a symlink, an exec bit, a file that came back to its index version.
    #[test]
    fn looking_only_at_the_changed_paths_gives_the_full_looks_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        for d in ["a", "b/c", "gone/deep", "moved"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        for f in [
            "a/1",
            "a/2",
            "b/c/3",
            "gone/4",
            "gone/deep/5",
            "moved/6",
            "top",
        ] {
            std::fs::write(dir.join(f), f).unwrap();
        }
        std::fs::write(dir.join(".gitignore"), "*.log\n").unwrap();
        git(dir, &["init", "-q"]);
        git(dir, &["add", "-A"]);
        git(dir, &["commit", "-qm", "base"]);

        // A first round of changes, seen by a full look.
        std::fs::write(dir.join("a/1"), "changed").unwrap();
        std::fs::write(dir.join("new-untracked"), "n").unwrap();
        let first = look(dir, None);
        let touched = first.touched.clone().unwrap();
        assert_eq!(touched.len(), 2, "{touched:?}");

        // What changes after it, each named as the dirty set would name it.
        let mut changed: Vec<&str> = Vec::new();
        std::fs::write(dir.join("a/2"), "changed too").unwrap();
        changed.push("a/2");
        std::fs::write(dir.join("a/1"), "a/1").unwrap(); // back to its index version
        changed.push("a/1");
        std::fs::create_dir_all(dir.join("fresh/sub")).unwrap();
        std::fs::write(dir.join("fresh/sub/x"), "x").unwrap();
        changed.push("fresh");
        std::fs::remove_dir_all(dir.join("gone")).unwrap();
        changed.push("gone");
        std::fs::rename(dir.join("moved"), dir.join("renamed")).unwrap();
        changed.extend(["moved", "renamed"]);
        symlink("top", dir.join("link")).unwrap();
        changed.push("link");
        std::fs::set_permissions(dir.join("b/c/3"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        changed.push("b/c/3");
        std::fs::write(dir.join("noise.log"), "ignored").unwrap();
        changed.push("noise.log");

        let mut only: Vec<Vec<u8>> = touched;
        only.extend(changed.iter().map(|c| c.as_bytes().to_vec()));
        let limited = look(dir, Some(&only));
        let full = look(dir, None);
        assert_eq!(limited.tree, full.tree, "the limited look missed a change");
        assert_ne!(full.tree, first.tree);
        assert_eq!(limited.touched, full.touched);

        // And with nothing named, a change is not seen: the look really is limited.
        std::fs::write(dir.join("b/c/3"), "unseen").unwrap();
        let blind = look(dir, Some(&[b"top".to_vec()]));
        assert_ne!(blind.tree, look(dir, None).tree);
    }

    /// Files under a `.gitattributes` or with `core.autocrlf` set get git's filters; the
    /// others keep their bytes: the look's tree is the one `git add -A` gives.
    #[test]
    fn the_tree_is_gits_with_and_without_attributes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        for d in ["sub/deep", "other"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let files = ["top.txt", "sub/a.txt", "sub/deep/b.txt", "other/c.txt"];
        for f in files {
            std::fs::write(dir.join(f), "base\n").unwrap();
        }
        std::fs::write(dir.join("sub/.gitattributes"), "*.txt text eol=lf\n").unwrap();
        git(dir, &["init", "-q"]);
        git(dir, &["add", "-A"]);
        git(dir, &["commit", "-qm", "base"]);
        let crlf = "changed\r\nwith crlf\r\n";
        for f in files.iter().chain(&["new.txt", "sub/deep/new.txt"]) {
            std::fs::write(dir.join(f), crlf).unwrap();
        }
        let gits_tree = |dir: &Path| {
            git(dir, &["add", "-A"]);
            let out = std::process::Command::new("git")
                .arg("-C")
                .arg(dir)
                .arg("write-tree")
                .output()
                .unwrap();
            git(dir, &["reset", "-q"]);
            Oid::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
        };
        let ours = look(dir, None).tree;
        assert_eq!(ours, gits_tree(dir));
        let repo = Repository::open(dir).unwrap();
        let blob = |path: &str| {
            let t = repo.find_tree(ours).unwrap();
            let id = t.get_path(Path::new(path)).unwrap().id();
            repo.find_blob(id).unwrap().content().to_vec()
        };
        assert_eq!(blob("sub/deep/b.txt"), b"changed\nwith crlf\n", "filtered");
        assert_eq!(blob("other/c.txt"), crlf.as_bytes(), "kept as it is");

        // core.autocrlf applies everywhere.
        git(dir, &["config", "core.autocrlf", "input"]);
        let ours = look(dir, None).tree;
        assert_eq!(ours, gits_tree(dir));
        let t = repo.find_tree(ours).unwrap();
        let id = t.get_path(Path::new("other/c.txt")).unwrap().id();
        assert_eq!(
            repo.find_blob(id).unwrap().content(),
            b"changed\nwith crlf\n"
        );
    }

    /// The tree is written from the repository's own index with the changed entries
    /// changed in memory: whatever changed (a file edited, deleted or new, a file that
    /// became a directory, a directory that became a file), the tree is `git add -A`'s,
    /// and afterwards the handle's index holds exactly the entries of the index file.
    #[test]
    fn the_index_changed_for_the_tree_is_put_back_even_across_a_file_and_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("repo");
        for d in ["d", "keep", "other"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        for f in ["f", "d/x", "d/y", "keep/k", "keep/gone", "other/o"] {
            std::fs::write(dir.join(f), f).unwrap();
        }
        git(&dir, &["init", "-q"]);
        git(&dir, &["add", "-A"]);
        git(&dir, &["commit", "-qm", "base"]);
        // libgit2 marks every entry it adds up to date (`GIT_INDEX_ENTRY_UPTODATE`, in
        // memory only: it spares the entry the racy-clean check when the index is
        // written, and is never written itself).
        const UPTODATE: u16 = 1 << 2;
        type Entry = (Vec<u8>, u32, Oid, u16, u16, u32, (i32, u32));
        let entries = |index: &git2::Index| -> Vec<Entry> {
            index
                .iter()
                .map(|e| {
                    let mtime = (e.mtime.seconds(), e.mtime.nanoseconds());
                    let flags = e.flags_extended & !UPTODATE;
                    (e.path, e.mode, e.id, e.flags, flags, e.file_size, mtime)
                })
                .collect()
        };
        let gits_tree = |name: &str| {
            let copy = tmp.path().join(name);
            let out = std::process::Command::new("cp")
                .arg("-a")
                .arg(&dir)
                .arg(&copy)
                .output()
                .unwrap();
            assert!(out.status.success());
            git(&copy, &["add", "-A"]);
            let out = std::process::Command::new("git")
                .arg("-C")
                .arg(&copy)
                .arg("write-tree")
                .output()
                .unwrap();
            Oid::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
        };
        let check = |round: &str, only: &[&str]| {
            let want = gits_tree(round);
            let only: Vec<Vec<u8>> = only.iter().map(|p| p.as_bytes().to_vec()).collect();
            for only in [None, Some(&only[..])] {
                let repo = Repository::open(&dir).unwrap();
                let odb = repo.odb().unwrap();
                let mut staged = Staged::attach(&repo, &odb).unwrap();
                let wt = worktree_tree(&repo, &mut staged, u64::MAX, only).unwrap();
                staged.flush().unwrap();
                assert_eq!(wt.tree, want, "{round}, only {only:?}: not git's tree");
                let on_disk = git2::Index::open(&dir.join(".git/index")).unwrap();
                assert_eq!(
                    entries(&repo.index().unwrap()),
                    entries(&on_disk),
                    "{round}, only {only:?}: the index in memory was not put back"
                );
                assert_ne!(wt.index_tree, Some(wt.tree), "{round}: the index's tree");
            }
        };

        // Edited, deleted and new files under kept directories.
        std::fs::write(dir.join("keep/k"), "edited").unwrap();
        std::fs::remove_file(dir.join("keep/gone")).unwrap();
        std::fs::write(dir.join("keep/new"), "new").unwrap();
        check("in place", &["keep/k", "keep/gone", "keep/new"]);

        // A file turned into a directory and a directory into a file.
        std::fs::remove_file(dir.join("f")).unwrap();
        std::fs::create_dir(dir.join("f")).unwrap();
        std::fs::write(dir.join("f/inner"), "inner").unwrap();
        std::fs::remove_dir_all(dir.join("d")).unwrap();
        std::fs::write(dir.join("d"), "now a file").unwrap();
        check(
            "file and directory",
            &["keep/k", "keep/gone", "keep/new", "f", "d"],
        );
    }
}
