//! Saves at scale (issue 16), end to end: what a push sends when the remote's branch
//! has moved on, and what many saves leave in the user's repository.
//! (Speed is measured by `scripts/bench`'s `scale` section, never asserted here.)

use std::path::Path;
use std::process::{Command, Stdio};

use agent_proto::local::Lifecycle;
use integration::daemon::{Daemon, Signal, Workspace};
use integration::gitserver::GitServer;

use crate::repos::{cache_token, dirty_repo, git, provider_for, server_files, worktree_files};
use crate::support::{LONG, SHORT, config};

const TOKEN: &str = "ghs_scale_7d6c5b4a3f2e";

/// Files under `objects/pack` ending in `.pack`.
fn packs(git_dir: &Path) -> usize {
    std::fs::read_dir(git_dir.join("objects/pack"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".pack"))
                .count()
        })
        .unwrap_or(0)
}

/// `count:` (loose objects) of `git count-objects -v`.
fn loose(dir: &Path) -> usize {
    git(dir, &["count-objects", "-v"])
        .lines()
        .find_map(|l| l.strip_prefix("count:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// `commits` commits on main in `dir`, one file changed in each, by `git fast-import`.
fn history(dir: &Path, commits: usize) {
    let mut stream = String::new();
    for i in 1..=commits {
        let body = format!("version {i}\n");
        stream.push_str(&format!(
            "commit refs/heads/main\nmark :{i}\ncommitter T <t@example.com> {} +0000\ndata 2\nc\nM 100644 inline f{}.txt\ndata {}\n{body}\n",
            1_700_000_000 + i,
            i % 7,
            body.len()
        ));
    }
    let mut c = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["fast-import", "--quiet"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin
        .take()
        .unwrap()
        .write_all(stream.as_bytes())
        .unwrap();
    assert!(c.wait().unwrap().success());
}

/// The remote's branch moved on since the user's last fetch (its tip is unknown
/// locally): the push is based on the upstream tracking tip the repository knows, so it
/// sends the few new objects, not the branch's whole history (which the server would
/// keep as a pack of its own; a few objects it unpacks loose).
#[test]
fn a_push_after_the_remote_moved_on_sends_only_the_new_objects() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = GitServer::start(ws.path().join("srv"), TOKEN).unwrap();
    let bare = server.create_bare("app.git").unwrap();
    let repo = ws.home().join("projects/app");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    history(&repo, 150);
    git(&repo, &["checkout", "-q", "main"]);
    git(&repo, &["remote", "add", "origin", &server.url("app.git")]);
    // Pushed by git over the filesystem: origin/main is the upstream, as after `push -u`.
    git(&repo, &["push", "-q", &bare.display().to_string(), "main"]);
    git(&repo, &["update-ref", "refs/remotes/origin/main", "main"]);
    git(&repo, &["config", "branch.main.remote", "origin"]);
    git(&repo, &["config", "branch.main.merge", "refs/heads/main"]);
    // Someone else pushes to main.
    let other = ws.path().join("other");
    git(
        ws.path(),
        &["clone", "-q", &bare.display().to_string(), "other"],
    );
    std::fs::write(other.join("theirs.txt"), "theirs\n").unwrap();
    git(&other, &["add", "."]);
    git(&other, &["commit", "-q", "-m", "theirs"]);
    git(&other, &["push", "-q", "origin", "main"]);
    let packs_before = packs(&bare);

    std::fs::write(repo.join("f1.txt"), "unsaved\n").unwrap();
    std::fs::write(repo.join("mine.txt"), "new\n").unwrap();
    cache_token(&ws.home(), TOKEN);
    let mut d = Daemon::start(&ws, &config(&provider_for(&server)));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let out = d.cli(["save"]);
    assert!(out.status.success(), "{out:?}\n{}", d.report());
    assert_eq!(
        server_files(&server, "app", "refs/heads/wip/ws1/main"),
        worktree_files(&repo)
    );
    assert_eq!(
        packs(&bare),
        packs_before,
        "the push sent a pack of 100 objects or more (the branch's history)"
    );
    let fsck = Command::new("git")
        .arg("-C")
        .arg(&bare)
        .args(["fsck", "--strict", "--no-progress"])
        .output()
        .unwrap();
    assert!(fsck.status.success(), "{fsck:?}");
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(LONG).success(), "{}", d.report());
}

/// Many saves of a small change leave the user's repository as many commits would:
/// loose objects (which `git gc --auto` packs), not one pack per save; `git fsck` is
/// clean before and after git's own gc, and every save reached the remote.
#[test]
fn many_saves_leave_loose_objects_for_git_gc_not_a_pack_each() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = GitServer::start(ws.path().join("srv"), TOKEN).unwrap();
    let repo = dirty_repo(&server, &ws.home(), "app");
    cache_token(&ws.home(), TOKEN);
    let git_dir = repo.join(".git");
    let packs_before = packs(&git_dir);
    let mut d = Daemon::start(&ws, &config(&provider_for(&server)));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    const SAVES: usize = 30;
    for i in 0..SAVES {
        std::fs::write(repo.join("tracked.txt"), format!("edit {i}\n")).unwrap();
        let out = d.cli(["save"]);
        assert!(out.status.success(), "save {i}: {out:?}\n{}", d.report());
    }
    assert_eq!(
        server_files(&server, "app", "refs/heads/wip/ws1/main"),
        worktree_files(&repo)
    );
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(LONG).success(), "{}", d.report());

    assert_eq!(
        packs(&git_dir),
        packs_before,
        "{SAVES} saves added packs to the user's repository"
    );
    let fsck = |what: &str| {
        let out = Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(["fsck", "--strict", "--no-progress"])
            .output()
            .unwrap();
        assert!(out.status.success(), "git fsck {what}: {out:?}");
    };
    fsck("after the saves");
    let before_gc = loose(&repo);
    assert!(
        before_gc >= SAVES,
        "{before_gc} loose objects after {SAVES} saves"
    );
    // What `git gc --auto` does once there are enough of them (6 700 by default; its
    // estimate samples one fan-out directory, so the test runs the gc itself).
    git(&repo, &["gc", "--quiet"]);
    assert!(
        loose(&repo) < before_gc / 2,
        "git gc left {} of {before_gc} loose objects",
        loose(&repo)
    );
    fsck("after git gc");
    let tree = git(&repo, &["rev-parse", "refs/heads/wip/ws1/main^{tree}"]);
    assert!(!tree.is_empty());
}
