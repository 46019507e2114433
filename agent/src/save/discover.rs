//! Finding the repositories to save: a bounded walk of the configured roots, the
//! explicit list, and the submodules of each repository found.
//!
//! Worktrees are found by their `.git` (a directory, or a file for linked worktrees and
//! submodules); bare repositories by their layout. The walk never follows symlinks and
//! never enters a `.git` directory; it does enter worktrees, so nested repositories are
//! found too, within the depth limit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One repository to save.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The worktree, or the git directory of a bare repository.
    pub path: PathBuf,
    pub bare: bool,
    /// Submodule nesting: 0 for a top-level repository. Deeper ones are saved first.
    pub level: usize,
}

/// Walk `roots` (to `depth` levels below each, never into a directory `exclude`
/// matches), add `explicit`, then the submodules.
pub fn discover(
    roots: &[PathBuf],
    depth: usize,
    explicit: &[PathBuf],
    exclude: &globset::GlobSet,
) -> Vec<Found> {
    discover_checked(roots, depth, explicit, exclude).0
}

/// [`discover`], with the directories that could not be searched and why. A missing
/// directory is not an error (a root may not exist), nor is one the daemon may not read;
/// anything else (out of file descriptors, an I/O error) is: "no repository there" must
/// never stand for "could not look".
pub fn discover_checked(
    roots: &[PathBuf],
    depth: usize,
    explicit: &[PathBuf],
    exclude: &globset::GlobSet,
) -> (Vec<Found>, Vec<(PathBuf, String)>) {
    discover_with(roots, depth, explicit, exclude, None)
}

/// What the walk may skip: the worktrees the dirty set knows unchanged since the walk
/// last went through them (their nested repositories are those found then), under a
/// fingerprint of the exclusions (a reload that changes them walks anew).
pub struct Skip<'a> {
    pub quiet: &'a super::quiet::Quiet,
    pub fingerprint: u64,
}

/// [`discover_checked`], not entering the worktrees `skip` knows unchanged.
pub fn discover_with(
    roots: &[PathBuf],
    depth: usize,
    explicit: &[PathBuf],
    exclude: &globset::GlobSet,
    skip: Option<&Skip<'_>>,
) -> (Vec<Found>, Vec<(PathBuf, String)>) {
    let mut found: BTreeMap<PathBuf, Found> = BTreeMap::new();
    let mut errors = Vec::new();
    let mut w = Walk {
        found: &mut found,
        exclude,
        errors: &mut errors,
        skip,
    };
    for root in roots {
        w.walk(root, depth);
    }
    for p in explicit {
        if let Some(f) = probe(p) {
            add(&mut found, f);
        } else if let Ok(repo) = git2::Repository::open(p) {
            let path = repo.workdir().unwrap_or(repo.path()).to_path_buf();
            add(
                &mut found,
                Found {
                    path,
                    bare: repo.is_bare(),
                    level: 0,
                },
            );
        }
    }
    let tops: Vec<Found> = found.values().filter(|f| !f.bare).cloned().collect();
    for f in tops {
        submodules(&f.path, f.level + 1, &mut found, 0);
    }
    (found.into_values().collect(), errors)
}

/// Whether an I/O error means "could not look" (reported) rather than "nothing there"
/// or "not ours to read" (skipped).
fn is_failure(e: &std::io::Error) -> bool {
    !matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
    ) && e.raw_os_error() != Some(libc::ENOTDIR)
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

fn add(found: &mut BTreeMap<PathBuf, Found>, f: Found) {
    let key = canonical(&f.path);
    match found.get_mut(&key) {
        Some(old) => old.level = old.level.max(f.level),
        None => {
            found.insert(
                key.clone(),
                Found {
                    path: key,
                    bare: f.bare,
                    level: f.level,
                },
            );
        }
    }
}

/// What `dir` is: a worktree, a bare repository, or neither.
fn probe(dir: &Path) -> Option<Found> {
    probe_checked(dir).ok().flatten()
}

/// [`probe`], failing when the question could not be answered.
fn probe_checked(dir: &Path) -> std::io::Result<Option<Found>> {
    match dir.join(".git").try_exists() {
        Ok(_) => {}
        Err(e) if is_failure(&e) => return Err(e),
        Err(_) => {}
    }
    Ok(probe_inner(dir))
}

fn probe_inner(dir: &Path) -> Option<Found> {
    if dir.join(".git").exists() {
        return Some(Found {
            path: dir.to_path_buf(),
            bare: false,
            level: 0,
        });
    }
    let bare =
        dir.join("HEAD").is_file() && dir.join("objects").is_dir() && dir.join("refs").is_dir();
    bare.then(|| Found {
        path: dir.to_path_buf(),
        bare: true,
        level: 0,
    })
}

struct Walk<'a, 'b> {
    found: &'a mut BTreeMap<PathBuf, Found>,
    exclude: &'a globset::GlobSet,
    errors: &'a mut Vec<(PathBuf, String)>,
    skip: Option<&'a Skip<'b>>,
}

impl Walk<'_, '_> {
    fn walk(&mut self, dir: &Path, depth_left: usize) {
        if self.exclude.is_match(dir) {
            return;
        }
        let worktree = match probe_checked(dir) {
            Ok(Some(f)) if f.bare => {
                add(self.found, f);
                return;
            }
            Ok(Some(f)) => {
                add(self.found, f);
                Some(canonical(dir))
            }
            Ok(None) => None,
            Err(e) => {
                self.errors.push((dir.to_path_buf(), e.to_string()));
                return;
            }
        };
        if depth_left == 0 {
            return;
        }
        // A worktree known unchanged since the last walk: what was inside it then.
        let fingerprint = self.skip.map(|s| s.fingerprint ^ depth_left as u64);
        let ticket = match (self.skip, &worktree, fingerprint) {
            (Some(s), Some(w), Some(fp)) => {
                if let Some(inside) = s.quiet.nested(w, fp) {
                    for f in inside {
                        add(self.found, f);
                    }
                    return;
                }
                s.quiet.walk_ticket(w)
            }
            _ => None,
        };
        let errors_before = self.errors.len();
        self.walk_children(dir, depth_left);
        if let (Some(s), Some(w), Some(t), Some(fp)) = (self.skip, &worktree, ticket, fingerprint)
            && self.errors.len() == errors_before
        {
            let inside: Vec<Found> = self
                .found
                .range(w.clone()..)
                .skip(1)
                .take_while(|(k, _)| k.starts_with(w))
                .map(|(_, f)| f.clone())
                .collect();
            s.quiet.walked(w, t, fp, inside);
        }
    }

    fn walk_children(&mut self, dir: &Path, depth_left: usize) {
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if is_failure(&e) => {
                self.errors.push((dir.to_path_buf(), e.to_string()));
                return;
            }
            Err(_) => return,
        };
        let mut children: Vec<PathBuf> = Vec::new();
        for e in rd {
            let e = match e {
                Ok(e) => e,
                Err(e) => {
                    self.errors.push((dir.to_path_buf(), e.to_string()));
                    return;
                }
            };
            match e.file_type() {
                Ok(t) if t.is_dir() && e.file_name() != ".git" => children.push(e.path()),
                Ok(_) => {}
                Err(err) if is_failure(&err) => {
                    self.errors.push((e.path(), err.to_string()));
                }
                Err(_) => {}
            }
        }
        children.sort();
        for c in children {
            self.walk(&c, depth_left - 1);
        }
    }
}

fn submodules(worktree: &Path, level: usize, found: &mut BTreeMap<PathBuf, Found>, depth: usize) {
    // No `.gitmodules`, no submodules: spare loading the whole index and HEAD tree.
    if depth > 8 || !worktree.join(".gitmodules").exists() {
        return;
    }
    let Ok(repo) = git2::Repository::open(worktree) else {
        return;
    };
    let Ok(subs) = repo.submodules() else {
        return;
    };
    for sm in subs {
        let p = worktree.join(sm.path());
        if p.join(".git").exists() {
            add(
                found,
                Found {
                    path: p.clone(),
                    bare: false,
                    level,
                },
            );
            submodules(&p, level + 1, found, depth + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_finds_worktrees_and_bare_repos_within_the_depth_limit() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        git2::Repository::init(root.join("a")).unwrap();
        git2::Repository::init(root.join("x/y/b")).unwrap();
        git2::Repository::init(root.join("x/y/z/too-deep")).unwrap();
        git2::Repository::init_bare(root.join("srv/c.git")).unwrap();
        let found = discover(&[root.to_path_buf()], 3, &[], &globset::GlobSet::empty());
        let names: Vec<String> = found
            .iter()
            .map(|f| {
                f.path
                    .strip_prefix(canonical(root))
                    .unwrap()
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(names, ["a", "srv/c.git", "x/y/b"]);
        assert!(found[1].bare);
    }

    #[test]
    fn excluded_directories_are_not_searched_but_explicit_repos_are_kept() {
        let t = tempfile::tempdir().unwrap();
        let home = canonical(t.path());
        for p in [
            "projects/app",
            "projects/web/node_modules/dep",
            ".cache/pre-commit/repo1",
            ".config/coderv2/dotfiles",
            ".local/share/x",
        ] {
            git2::Repository::init(home.join(p)).unwrap();
        }
        let defaults: Vec<String> = crate::save::DEFAULT_EXCLUDE
            .iter()
            .map(|s| s.to_string())
            .collect();
        let ex = crate::save::exclude_set(&defaults, &home).unwrap();
        let explicit = [home.join(".local/share/x")];
        let found = discover(std::slice::from_ref(&home), 4, &explicit, &ex);
        let names: Vec<String> = found
            .iter()
            .map(|f| f.path.strip_prefix(&home).unwrap().display().to_string())
            .collect();
        assert_eq!(names, [".local/share/x", "projects/app"]);
    }
}
