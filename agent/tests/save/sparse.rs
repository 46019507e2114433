//! Sparse checkouts: the files outside the sparse cone are not on disk but are not
//! deleted either; a save keeps their index version, as `git add -A` does (one written
//! on disk anyway is saved from disk).

use std::path::PathBuf;
use std::time::Duration;

use agent::save::{Reason, SaveConfig, SaveMode, SaveRequest};

use crate::support::*;

/// `~/projects/app` with `src/` and `docs/` pushed, then `git sparse-checkout set src`:
/// `docs/` is skip-worktree and absent from the disk.
fn sparse_repo(fx: &Fixture) -> PathBuf {
    let dir = fx.repo("app");
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::create_dir_all(dir.join("docs/deep")).unwrap();
    std::fs::write(dir.join("src/a.rs"), "fn a() {}\n").unwrap();
    std::fs::write(dir.join("docs/guide.md"), "# guide\n").unwrap();
    std::fs::write(dir.join("docs/deep/x.md"), "deep\n").unwrap();
    git(&dir, &["add", "-A"]);
    git(&dir, &["commit", "-qm", "src and docs"]);
    let auth = fx
        .server
        .url("app.git")
        .replacen("http://", &format!("http://u:{TOKEN}@"), 1);
    git(&dir, &["push", "-q", &auth, "main"]);
    git(&dir, &["fetch", "-q", "origin"]);
    git(&dir, &["sparse-checkout", "set", "src"]);
    assert!(!dir.join("docs").exists(), "docs/ is outside the cone");
    assert_eq!(git(&dir, &["status", "--porcelain"]), "");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_a_sparse_checkout_keeps_the_files_outside_the_cone() {
    let fx = Fixture::new();
    let dir = sparse_repo(&fx);
    std::fs::write(dir.join("src/a.rs"), "fn a() { changed() }\n").unwrap();
    // A file outside the cone that is on disk anyway is work too: saved from disk.
    std::fs::create_dir_all(dir.join("docs/deep")).unwrap();
    std::fs::write(dir.join("docs/deep/x.md"), "written anyway\n").unwrap();
    let before = untouchables(&dir);
    let mut expected = tree_files(&dir, "HEAD");
    expected.insert(
        b"src/a.rs".to_vec(),
        (0o100644, b"fn a() { changed() }\n".to_vec()),
    );
    expected.insert(
        b"docs/deep/x.md".to_vec(),
        (0o100644, b"written anyway\n".to_vec()),
    );

    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "pushed", "{o:#?}");
    let c = fx
        .server
        .ref_target("app.git", &format!("refs/heads/wip/{WORKSPACE}/main"))
        .unwrap();
    let pushed = fx.cloned_files("app.git", &c);
    assert_eq!(
        pushed.get(&b"docs/guide.md"[..]),
        Some(&(0o100644, b"# guide\n".to_vec()))
    );
    assert_eq!(
        pushed, expected,
        "HEAD's tree with the two changes, docs/ kept"
    );
    assert_eq!(untouchables(&dir), before);
    assert!(!dir.join("docs/guide.md").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_sparse_checkout_is_clean() {
    let fx = Fixture::new();
    let dir = sparse_repo(&fx);
    let dry = SaveRequest {
        act_as: None,
        reason: Reason::Manual,
        only: None,
        dry_run: true,
    };

    let dry_run = fx
        .save_with(&fx.env(), &fx.config(), &dry, Duration::from_secs(30))
        .await;
    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;

    assert_eq!(one(&dry_run, &dir).result, "clean", "{dry_run:#?}");
    assert_eq!(one(&outcomes, &dir).result, "clean", "{outcomes:#?}");
    assert_eq!(
        fx.server
            .ref_target("app.git", &format!("refs/heads/wip/{WORKSPACE}/main")),
        None,
        "nothing pushed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branch_mode_in_a_sparse_checkout_commits_no_deletion() {
    let fx = Fixture::new();
    let dir = sparse_repo(&fx);
    std::fs::write(dir.join("src/a.rs"), "fn a() { changed() }\n").unwrap();
    let cfg = SaveConfig {
        mode: SaveMode::Branch,
        ..fx.config()
    };

    let outcomes = fx.save(&cfg, Duration::from_secs(30)).await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "pushed", "{o:#?}");
    let head = git(&dir, &["rev-parse", "HEAD"]);
    assert_eq!(
        fx.server.ref_target("app.git", "refs/heads/main"),
        Some(head.clone())
    );
    assert_eq!(
        git(&dir, &["diff", "--name-status", "HEAD~1", "HEAD"]),
        "M\tsrc/a.rs",
        "the commit changes src/a.rs and deletes nothing"
    );
    let pushed = fx.cloned_files("app.git", &head);
    assert_eq!(
        pushed.get(&b"docs/deep/x.md"[..]),
        Some(&(0o100644, b"deep\n".to_vec()))
    );
    // The index still marks docs/ skip-worktree: git sees no deletion either.
    assert_eq!(git(&dir, &["status", "--porcelain"]), "");
    assert!(
        git(&dir, &["ls-files", "-t", "docs"])
            .lines()
            .all(|l| l.starts_with("S ")),
        "{}",
        git(&dir, &["ls-files", "-t", "docs"])
    );
    assert!(!dir.join("docs").exists());
}
