//! Git fixtures for end-to-end tests: a repository cloned from the test git server with
//! unsaved work in it, and byte-exact reads of what reached the server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use integration::gitserver::GitServer;

/// Run git in `dir`; panic with its stderr on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=Test",
            "-c",
            "user.email=test@example.com",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A repository at `home/projects/<name>` whose `origin` is `<name>.git` on `server`
/// (with one pushed commit on `main`), then made dirty: a modified tracked file and an
/// untracked one. Returns its path.
pub fn dirty_repo(server: &GitServer, home: &Path, name: &str) -> PathBuf {
    let remote = format!("{name}.git");
    server.create_bare(&remote).expect("bare repo");
    let dir = home.join("projects").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    git(&dir, &["init", "-q"]);
    std::fs::write(dir.join("tracked.txt"), "v1\n").unwrap();
    git(&dir, &["add", "."]);
    git(&dir, &["commit", "-q", "-m", "first"]);
    git(&dir, &["remote", "add", "origin", &server.url(&remote)]);
    // Push the base commit with the CLI (token in the URL only for this setup step).
    let authed = server
        .url(&remote)
        .replace("http://", &format!("http://x:{}@", server.token()));
    git(&dir, &["push", "-q", &authed, "main"]);
    std::fs::write(dir.join("tracked.txt"), "v2, unsaved\n").unwrap();
    std::fs::write(dir.join("new file.txt"), "brand new\n").unwrap();
    dir
}

/// Every file of the tree at `refname` in the server's repository, with its bytes.
pub fn server_files(server: &GitServer, name: &str, refname: &str) -> BTreeMap<String, Vec<u8>> {
    let repo = git2::Repository::open_bare(server.path(&format!("{name}.git"))).expect("open bare");
    let commit = repo
        .find_reference(refname)
        .and_then(|r| r.peel_to_commit())
        .expect("ref on server");
    let tree = commit.tree().unwrap();
    let mut out = BTreeMap::new();
    tree.walk(git2::TreeWalkMode::PreOrder, |dir, e| {
        if let Some(git2::ObjectType::Blob) = e.kind() {
            let blob = repo.find_blob(e.id()).unwrap();
            out.insert(
                format!("{dir}{}", e.name().unwrap_or("?")),
                blob.content().to_vec(),
            );
        }
        git2::TreeWalkResult::Ok
    })
    .unwrap();
    out
}

/// Every file of a worktree (`.git` aside), with its bytes.
pub fn worktree_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.file_name().is_some_and(|n| n == ".git") {
                continue;
            }
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                let rel = p.strip_prefix(base).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A `[git_providers.github]` table pointing the GitHub provider at the test server, with
/// its token cache at the default place.
pub fn provider_for(server: &GitServer) -> String {
    format!(
        "[git_providers.github]\nhost = \"{}\"\nusername = \"x-access-token\"\ncache_file = \"~/.cache/coder/github_token\"\n",
        server
            .base_url()
            .trim_start_matches("http://")
            .trim_start_matches("https://")
    )
}

/// Write a token into the GitHub token cache of `home` (mode 0600).
pub fn cache_token(home: &Path, token: &str) {
    use std::os::unix::fs::PermissionsExt;
    let dir = home.join(".cache/coder");
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("github_token");
    std::fs::write(&f, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Files under `dir` (recursively) whose bytes contain `needle`, except `allowed`.
pub fn files_containing(dir: &Path, needle: &str, allowed: &[PathBuf]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file()
                && !allowed.contains(&p)
                && let Ok(bytes) = std::fs::read(&p)
                && bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
            {
                hits.push(p);
            }
        }
    }
    hits
}
