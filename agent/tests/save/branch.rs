//! Branch mode: commit on the branch and push it to its upstream; when the remote
//! refuses, the snapshot ref carries the work instead.

use std::time::Duration;

use agent::save::{SaveConfig, SaveMode};

use crate::support::*;

fn branch_mode(fx: &Fixture) -> SaveConfig {
    SaveConfig {
        mode: SaveMode::Branch,
        ..fx.config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branch_mode_commits_everything_on_the_branch_and_pushes_it_upstream() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    std::fs::write(dir.join("README.md"), "# changed\n").unwrap();
    std::fs::write(dir.join("new.txt"), "new\n").unwrap();
    std::fs::remove_file(dir.join("gone.txt")).unwrap();
    let old_head = git(&dir, &["rev-parse", "HEAD"]);
    let config_before = std::fs::read(dir.join(".git/config")).unwrap();

    let outcomes = fx.save(&branch_mode(&fx), Duration::from_secs(30)).await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "pushed", "{o:#?}");
    assert_eq!(o.r#ref.as_deref(), Some("refs/heads/main"));
    let head = git(&dir, &["rev-parse", "HEAD"]);
    assert_ne!(head, old_head);
    assert_eq!(git(&dir, &["rev-parse", "HEAD~1"]), old_head);
    assert_eq!(
        fx.server.ref_target("app.git", "refs/heads/main"),
        Some(head.clone())
    );
    assert_eq!(fx.cloned_files("app.git", &head), worktree_files(&dir, &[]));
    assert_eq!(
        git(&dir, &["status", "--porcelain"]),
        "",
        "nothing left unstaged"
    );
    assert_eq!(
        git(&dir, &["rev-parse", "origin/main"]),
        head,
        "tracking ref updated"
    );
    assert_eq!(
        std::fs::read(dir.join(".git/config")).unwrap(),
        config_before
    );

    // The branch moved like `git commit` moves it: reflogs of the branch and of HEAD,
    // and the index and the ref point at objects that are on disk.
    for r in ["main", "HEAD"] {
        let log = git(&dir, &["reflog", "-1", "--format=%gs", r]);
        assert!(
            log.starts_with("commit: wsagent: save of workspace"),
            "{r}: {log}"
        );
    }
    assert_fsck(&dir);

    let again = fx.save(&branch_mode(&fx), Duration::from_secs(30)).await;
    assert_eq!(one(&again, &dir).result, "clean");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branch_mode_against_a_remote_that_moved_on_pushes_the_snapshot_ref_instead() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    // Someone else pushes to main.
    let other = fx.tmp.path().join("other");
    git(
        fx.tmp.path(),
        &[
            "clone",
            "-q",
            &fx.server.url("app.git"),
            other.to_str().unwrap(),
        ],
    );
    git(&other, &["config", "user.name", "Other"]);
    git(&other, &["config", "user.email", "o@example.com"]);
    std::fs::write(other.join("theirs.txt"), "theirs\n").unwrap();
    git(&other, &["add", "-A"]);
    git(&other, &["commit", "-qm", "theirs"]);
    let auth = fx
        .server
        .url("app.git")
        .replacen("http://", &format!("http://u:{TOKEN}@"), 1);
    git(&other, &["push", "-q", &auth, "main"]);
    let theirs = git(&other, &["rev-parse", "HEAD"]);
    std::fs::write(dir.join("mine.txt"), "mine\n").unwrap();

    let outcomes = fx.save(&branch_mode(&fx), Duration::from_secs(30)).await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "pushed", "{o:#?}");
    let wip = format!("refs/heads/wip/{WORKSPACE}/main");
    assert_eq!(o.r#ref.as_deref(), Some(wip.as_str()));
    assert!(
        o.note.as_deref().unwrap_or("").contains("snapshot ref"),
        "{o:#?}"
    );
    assert_eq!(
        fx.server.ref_target("app.git", "refs/heads/main"),
        Some(theirs)
    );
    let saved = fx.server.ref_target("app.git", &wip).unwrap();
    assert_eq!(
        fx.cloned_files("app.git", &saved),
        worktree_files(&dir, &[])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branch_mode_on_a_rejecting_server_ends_committed_not_lost() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    std::fs::write(dir.join("mine.txt"), "mine\n").unwrap();
    fx.server.set_reject(true);

    let outcomes = fx.save(&branch_mode(&fx), Duration::from_secs(30)).await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "committed", "{o:#?}");
    assert!(!o.pushed);
    assert!(
        o.error.as_deref().unwrap().contains("pre-receive"),
        "{o:#?}"
    );
    // Both the branch commit and the snapshot ref are there locally.
    let head = git(&dir, &["rev-parse", "HEAD"]);
    assert_eq!(
        git(
            &dir,
            &["rev-parse", &format!("refs/heads/wip/{WORKSPACE}/main")]
        ),
        head
    );
    assert_eq!(git(&dir, &["show", "HEAD:mine.txt"]), "mine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branch_mode_creates_a_branch_without_upstream_on_the_remote() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    git(&dir, &["checkout", "-q", "-b", "topic"]);
    std::fs::write(dir.join("topic.txt"), "topic\n").unwrap();
    let config_before = std::fs::read(dir.join(".git/config")).unwrap();

    let outcomes = fx.save(&branch_mode(&fx), Duration::from_secs(30)).await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "pushed", "{o:#?}");
    assert_eq!(o.r#ref.as_deref(), Some("refs/heads/topic"));
    let head = git(&dir, &["rev-parse", "HEAD"]);
    assert_eq!(
        fx.server.ref_target("app.git", "refs/heads/topic"),
        Some(head)
    );
    // No upstream is configured (that would write .git/config).
    assert_eq!(
        std::fs::read(dir.join(".git/config")).unwrap(),
        config_before
    );
    let again = fx.save(&branch_mode(&fx), Duration::from_secs(30)).await;
    assert_eq!(one(&again, &dir).result, "clean");
}
