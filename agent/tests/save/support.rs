//! Fixtures for the save tests: a temp HOME with repositories under `~/projects`, a real
//! git HTTP server holding their remotes, and helpers that read trees and worktrees as
//! byte maps so that saved content is compared exactly.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use agent::save::{Reason, SaveConfig, SaveEnv, SaveRequest, save_all};
use agent::tokens::{GitProvider, Tokens};
use agent_proto::save::RepoOutcome;
use integration::gitserver::GitServer;

pub const TOKEN: &str = "tok-right-6d1f0c9e";
pub const WORKSPACE: &str = "ws";

pub struct Fixture {
    pub tmp: tempfile::TempDir,
    pub home: PathBuf,
    pub state: PathBuf,
    pub server: GitServer,
    pub events: agent::events::Events,
    /// The private CA of an HTTPS server ([`Fixture::tls`]); not trusted by the process.
    pub ca: Option<PathBuf>,
}

impl Fixture {
    pub fn new() -> Fixture {
        Fixture::with_cached_token(TOKEN)
    }

    /// A fixture whose token cache holds `token` (the server wants [`TOKEN`]).
    pub fn with_cached_token(token: &str) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        let state = home.join(".local/state/wsagent");
        std::fs::create_dir_all(home.join("projects")).unwrap();
        std::fs::create_dir_all(home.join(".cache/coder")).unwrap();
        std::fs::write(home.join(".cache/coder/test_token"), format!("{token}\n")).unwrap();
        let server = GitServer::start(tmp.path().join("srv"), TOKEN).unwrap();
        Fixture {
            tmp,
            home,
            state,
            server,
            events: agent::events::Events::new(),
            ca: None,
        }
    }

    /// A fixture whose server speaks HTTPS with a certificate of a private CA (in
    /// [`Fixture::ca`]) that nothing trusts unless told.
    pub fn tls() -> Fixture {
        let mut fx = Fixture::new();
        let pki = fx.tmp.path().join("pki");
        std::fs::create_dir_all(&pki).unwrap();
        let (ca, cert, key) = integration::pki::private_ca(&pki);
        fx.server =
            GitServer::start_tls(fx.tmp.path().join("srv-tls"), TOKEN, &cert, &key).unwrap();
        fx.ca = Some(ca);
        fx
    }

    pub fn env(&self) -> SaveEnv {
        let mut providers = BTreeMap::new();
        providers.insert(
            "test".to_string(),
            GitProvider {
                host: self
                    .server
                    .base_url()
                    .trim_start_matches("http://")
                    .trim_start_matches("https://")
                    .trim_end_matches('/')
                    .to_string(),
                username: Some("x-access-token".into()),
                cache_file: Some("~/.cache/coder/test_token".into()),
                match_url: None,
                refresh_interval: Duration::from_secs(1800),
            },
        );
        SaveEnv {
            home: self.home.clone(),
            state_dir: self.state.clone(),
            workspace: WORKSPACE.into(),
            owner_name: Some("Owner".into()),
            owner_email: Some("owner@example.com".into()),
            ref_owner: None,
            tokens: Tokens::new(providers, self.home.clone()),
            events: self.events.clone(),
            quiet: None,
        }
    }

    pub fn config(&self) -> SaveConfig {
        SaveConfig {
            roots: vec!["~/projects".into()],
            ..Default::default()
        }
    }

    pub async fn save(&self, cfg: &SaveConfig, budget: Duration) -> Vec<RepoOutcome> {
        self.save_with(&self.env(), cfg, &stop(), budget).await
    }

    pub async fn save_with(
        &self,
        env: &SaveEnv,
        cfg: &SaveConfig,
        req: &SaveRequest,
        budget: Duration,
    ) -> Vec<RepoOutcome> {
        save_all(cfg, env, req, tokio::time::Instant::now() + budget).await
    }

    /// Path → (mode, bytes) of commit `rev` as a fresh clone of the server's `name`
    /// (over HTTP, with the git CLI) sees it.
    pub fn cloned_files(&self, name: &str, rev: &str) -> BTreeMap<Vec<u8>, (u32, Vec<u8>)> {
        let dest = self
            .tmp
            .path()
            .join(format!("clone-{}", uuid::Uuid::new_v4()));
        git(
            self.tmp.path(),
            &[
                "clone",
                "-q",
                "--mirror",
                &self.server.url(name),
                dest.to_str().unwrap(),
            ],
        );
        tree_files(&dest, rev)
    }

    /// `~/projects/<name>`: a repository with one pushed commit on `main`, whose `origin`
    /// is the server's `<name>.git` and whose `main` tracks `origin/main`.
    pub fn repo(&self, name: &str) -> PathBuf {
        let dir = self.home.join("projects").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        git(&dir, &["init", "-q", "-b", "main"]);
        git(&dir, &["config", "user.name", "Dev"]);
        git(&dir, &["config", "user.email", "dev@example.com"]);
        std::fs::write(dir.join("README.md"), "# project\n").unwrap();
        std::fs::write(dir.join("keep.txt"), "keep\n").unwrap();
        std::fs::write(dir.join("gone.txt"), "to be deleted\n").unwrap();
        std::fs::write(dir.join(".gitignore"), "*.log\nbuild/\n").unwrap();
        git(&dir, &["add", "-A"]);
        git(&dir, &["commit", "-qm", "initial"]);
        let bare = format!("{name}.git");
        self.server.create_bare(&bare).unwrap();
        git(&dir, &["remote", "add", "origin", &self.server.url(&bare)]);
        if self.ca.is_some() {
            // HTTPS: the base goes to the bare repository on disk (git would not trust
            // the server), and the remote-tracking ref is set by hand.
            let path = self.server.path(&bare);
            git(&dir, &["push", "-q", path.to_str().unwrap(), "main"]);
            git(&dir, &["update-ref", "refs/remotes/origin/main", "HEAD"]);
            git(&dir, &["branch", "-q", "-u", "origin/main"]);
            return dir;
        }
        // The token goes on the command line of this one push only, never into config.
        let auth = self
            .server
            .url(&bare)
            .replacen("http://", &format!("http://u:{TOKEN}@"), 1);
        git(&dir, &["push", "-q", &auth, "main"]);
        git(&dir, &["fetch", "-q", "origin"]);
        git(&dir, &["branch", "-q", "-u", "origin/main"]);
        dir
    }
}

/// A save for a workspace stop.
pub fn stop() -> SaveRequest {
    SaveRequest {
        act_as: None,
        reason: Reason::Stop,
        only: None,
        dry_run: false,
    }
}

/// Run git (CLI, for setup and checks only) and return its stdout; panics on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let o = git_output(dir, args);
    assert!(
        o.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

pub fn git_output(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_DATE", "2026-01-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "2026-01-01T00:00:00Z")
        .output()
        .unwrap()
}

/// Path → (executable or link marker, bytes) of every file under `dir`, `.git` and the
/// `skip`ped top-level names excluded.
pub fn worktree_files(dir: &Path, skip: &[&str]) -> BTreeMap<Vec<u8>, (u32, Vec<u8>)> {
    fn walk(base: &Path, dir: &Path, skip: &[&str], out: &mut BTreeMap<Vec<u8>, (u32, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap();
            let name = rel.as_os_str().as_bytes().to_vec();
            if rel == Path::new(".git") || skip.iter().any(|s| rel == Path::new(s)) {
                continue;
            }
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                out.insert(name, (0o120000, t.as_os_str().as_bytes().to_vec()));
            } else if md.is_dir() {
                walk(base, &p, skip, out);
            } else {
                let mode = if md.permissions().mode() & 0o111 != 0 {
                    0o100755
                } else {
                    0o100644
                };
                out.insert(name, (mode, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, skip, &mut out);
    out
}

/// Path → (mode, bytes) of every blob of the commit `rev` in the repository at `git_dir`.
pub fn tree_files(git_dir: &Path, rev: &str) -> BTreeMap<Vec<u8>, (u32, Vec<u8>)> {
    let repo = git2::Repository::open(git_dir).unwrap();
    let commit = repo.revparse_single(rev).unwrap().peel_to_commit().unwrap();
    let tree = commit.tree().unwrap();
    let mut out = BTreeMap::new();
    tree.walk(git2::TreeWalkMode::PreOrder, |root, entry| {
        if entry.kind() == Some(git2::ObjectType::Blob) {
            let mut path = root.as_bytes().to_vec();
            path.extend_from_slice(entry.name_bytes());
            let blob = repo.find_blob(entry.id()).unwrap();
            out.insert(path, (entry.filemode() as u32, blob.content().to_vec()));
        }
        git2::TreeWalkResult::Ok
    })
    .unwrap();
    out
}

/// Every file under `dir` (recursively) with its bytes.
pub fn all_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(md) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file() {
                out.push((p.clone(), std::fs::read(&p).unwrap_or_default()));
            }
        }
    }
    out
}

/// The bytes of the files a snapshot must not change.
pub fn untouchables(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = ["HEAD", "config", "index"]
        .iter()
        .map(|f| {
            let p = dir.join(".git").join(f);
            let b = std::fs::read(&p).unwrap_or_default();
            (p, b)
        })
        .collect();
    for (p, (_, b)) in worktree_files(dir, &[]) {
        v.push((dir.join(OsStr::from_bytes(&p)), b));
    }
    v
}

pub fn one<'a>(outcomes: &'a [RepoOutcome], dir: &Path) -> &'a RepoOutcome {
    let canon = std::fs::canonicalize(dir).unwrap();
    outcomes
        .iter()
        .find(|o| Path::new(&o.repo) == canon)
        .unwrap_or_else(|| panic!("no outcome for {}: {outcomes:#?}", dir.display()))
}

/// Loose objects in `dir`'s repository, and the names of its pack files.
pub fn object_files(dir: &Path) -> (usize, Vec<String>) {
    let objects = dir.join(".git/objects");
    let loose = std::fs::read_dir(&objects)
        .unwrap()
        .flatten()
        .filter(|d| d.file_name().len() == 2)
        .map(|d| std::fs::read_dir(d.path()).unwrap().count())
        .sum();
    let mut packs: Vec<String> = std::fs::read_dir(objects.join("pack"))
        .unwrap()
        .flatten()
        .map(|d| d.file_name().to_string_lossy().into_owned())
        .collect();
    packs.sort();
    (loose, packs)
}

/// `git fsck --strict` of `dir`'s repository passes (every object readable and valid,
/// every ref and the index pointing at objects that exist).
pub fn assert_fsck(dir: &Path) {
    let out = git_output(dir, &["fsck", "--strict", "--no-dangling"]);
    assert!(
        out.status.success(),
        "git fsck in {}: {}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
