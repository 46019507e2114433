//! The test git server behaves like a real one: the git CLI clones and pushes through it,
//! pushes need the token, and its switches (reject, latency) do what they say.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use integration::gitserver::GitServer;

const TOKEN: &str = "tok-right-123456";

fn git(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .unwrap()
}

fn ok(dir: &Path, args: &[&str]) {
    let o = git(dir, args);
    assert!(
        o.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn repo_with_commit(dir: &Path) {
    ok(dir, &["init", "-q", "-b", "main"]);
    ok(dir, &["config", "user.name", "T"]);
    ok(dir, &["config", "user.email", "t@example.com"]);
    std::fs::write(dir.join("a.txt"), "hello\n").unwrap();
    ok(dir, &["add", "-A"]);
    ok(dir, &["commit", "-qm", "first"]);
}

fn auth_url(server: &GitServer, name: &str, token: &str) -> String {
    server
        .url(name)
        .replacen("http://", &format!("http://user:{token}@"), 1)
}

#[test]
fn push_with_the_token_lands_and_clone_reads_it_back() {
    let tmp = tempfile::tempdir().unwrap();
    let server = GitServer::start(tmp.path().join("srv"), TOKEN).unwrap();
    server.create_bare("alice/p.git").unwrap();
    let work = tmp.path().join("w");
    std::fs::create_dir(&work).unwrap();
    repo_with_commit(&work);
    ok(
        &work,
        &[
            "push",
            "-q",
            &auth_url(&server, "alice/p.git", TOKEN),
            "main",
        ],
    );
    let head = String::from_utf8(git(&work, &["rev-parse", "HEAD"]).stdout).unwrap();
    assert_eq!(
        server
            .ref_target("alice/p.git", "refs/heads/main")
            .as_deref(),
        Some(head.trim())
    );
    let clone = tmp.path().join("c");
    ok(
        tmp.path(),
        &[
            "clone",
            "-q",
            &server.url("alice/p.git"),
            clone.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read(clone.join("a.txt")).unwrap(), b"hello\n");
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.push && r.user.as_deref() == Some("user"))
    );
}

#[test]
fn push_without_the_right_token_gets_401_and_leaves_the_ref_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let server = GitServer::start(tmp.path().join("srv"), TOKEN).unwrap();
    server.create_bare("p.git").unwrap();
    let work = tmp.path().join("w");
    std::fs::create_dir(&work).unwrap();
    repo_with_commit(&work);
    let o = git(
        &work,
        &[
            "push",
            "-q",
            &auth_url(&server, "p.git", "wrong-token"),
            "main",
        ],
    );
    assert!(!o.status.success());
    assert_eq!(server.ref_target("p.git", "refs/heads/main"), None);
    assert!(server.requests().iter().any(|r| r.push && r.status == 401));
}

#[test]
fn reject_switch_makes_pushes_fail_in_pre_receive() {
    let tmp = tempfile::tempdir().unwrap();
    let server = GitServer::start(tmp.path().join("srv"), TOKEN).unwrap();
    server.create_bare("p.git").unwrap();
    let work = tmp.path().join("w");
    std::fs::create_dir(&work).unwrap();
    repo_with_commit(&work);
    server.set_reject(true);
    let o = git(
        &work,
        &["push", "-q", &auth_url(&server, "p.git", TOKEN), "main"],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("pre-receive"));
    assert_eq!(server.ref_target("p.git", "refs/heads/main"), None);
    server.set_reject(false);
    ok(
        &work,
        &["push", "-q", &auth_url(&server, "p.git", TOKEN), "main"],
    );
    assert!(server.ref_target("p.git", "refs/heads/main").is_some());
}

#[test]
fn latency_switch_delays_every_request() {
    let tmp = tempfile::tempdir().unwrap();
    let server = GitServer::start(tmp.path().join("srv"), TOKEN).unwrap();
    server.create_bare("p.git").unwrap();
    server.set_latency(Duration::from_millis(300));
    let t = Instant::now();
    let o = git(tmp.path(), &["ls-remote", &server.url("p.git")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(t.elapsed() >= Duration::from_millis(300));
}

#[test]
fn trickle_switch_slows_answers_without_stalling_them() {
    let tmp = tempfile::tempdir().unwrap();
    let server = GitServer::start(tmp.path().join("srv"), TOKEN).unwrap();
    server.create_bare("p.git").unwrap();
    let work = tmp.path().join("w");
    std::fs::create_dir(&work).unwrap();
    repo_with_commit(&work);
    ok(
        &work,
        &["push", "-q", &auth_url(&server, "p.git", TOKEN), "main"],
    );
    server.set_trickle(Duration::from_millis(2));
    let t = Instant::now();
    let o = git(tmp.path(), &["ls-remote", &server.url("p.git")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("refs/heads/main"));
    // Every byte of the answers came with a pause.
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
}
