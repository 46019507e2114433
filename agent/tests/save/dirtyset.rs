//! Checkpoints with the daemon's dirty set (`save::quiet`): an idle checkpoint looks at
//! nothing and asks nothing of the server; after changes of every kind it looks only at
//! the changed paths, and what reaches the remote is still the whole worktree, byte for
//! byte.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use agent::save::quiet::Quiet;
use agent::save::{Reason, SaveRequest};
use agent_proto::save::SaveResult;

use crate::support::*;

fn checkpoint() -> SaveRequest {
    SaveRequest {
        reason: Reason::Checkpoint,
        only: None,
        dry_run: false,
        act_as: None,
    }
}

/// Wait (bounded) until `f` holds.
fn wait_until(what: &str, f: impl Fn() -> bool) {
    integration::wait::wait_until(Duration::from_secs(10), what, f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_with_the_dirty_set_push_every_change_and_nothing_when_idle() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    std::fs::create_dir_all(dir.join("src/deep")).unwrap();
    std::fs::write(dir.join("src/deep/lib.rs"), "fn a() {}\n").unwrap();
    git(&dir, &["add", "-A"]);
    git(&dir, &["commit", "-qm", "src"]);
    std::fs::write(
        dir.join("keep.txt"),
        "changed before the first checkpoint\n",
    )
    .unwrap();

    let quiet = Quiet::new();
    let mut env = fx.env();
    env.quiet = Some(quiet.clone());
    let cfg = fx.config();
    let budget = Duration::from_secs(30);
    let snap_ref = "refs/heads/wip/ws/main";
    // A checkpoint that pushes, after which the remote's snapshot is the worktree.
    let pushed_as_the_worktree = || async {
        let out = fx.save_with(&env, &cfg, &checkpoint(), budget).await;
        assert_eq!(one(&out, &dir).result, SaveResult::Pushed, "{out:#?}");
        assert_eq!(
            fx.cloned_files("app.git", snap_ref),
            worktree_files(&dir, &[".git", "debug.log"])
        );
    };

    // First checkpoint: a full look, pushed.
    let out = fx.save_with(&env, &cfg, &checkpoint(), budget).await;
    assert_eq!(one(&out, &dir).result, SaveResult::Pushed, "{out:#?}");
    let dir = std::fs::canonicalize(&dir).unwrap();
    assert!(
        quiet.known(&dir).is_some(),
        "a pushed checkpoint left no record"
    );

    // Idle: no request at all, and the same snapshot.
    fx.server.clear_requests();
    let out = fx.save_with(&env, &cfg, &checkpoint(), budget).await;
    assert_eq!(one(&out, &dir).result, SaveResult::Unchanged, "{out:#?}");
    assert!(
        fx.server.requests().is_empty(),
        "{:#?}",
        fx.server.requests()
    );

    // Changes of every kind since: a file in place, one in a new directory, a deletion,
    // a rename, an exec bit, a symlink, an ignored file (not saved).
    std::fs::write(dir.join("src/deep/lib.rs"), "fn b() {}\n").unwrap();
    std::fs::create_dir_all(dir.join("new/dir")).unwrap();
    std::fs::write(dir.join("new/dir/file.txt"), "new\n").unwrap();
    std::fs::remove_file(dir.join("gone.txt")).unwrap();
    std::fs::rename(dir.join("README.md"), dir.join("README.txt")).unwrap();
    std::fs::set_permissions(
        dir.join("src/deep/lib.rs"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("README.txt", dir.join("link")).unwrap();
    std::fs::write(dir.join("debug.log"), "ignored\n").unwrap();
    wait_until("the changes seen", || quiet.known(&dir).is_none());

    // What the remote has is the worktree, exactly (the ignored file left out).
    pushed_as_the_worktree().await;

    // One more change, in a file that differed from the index before (keep.txt): still
    // the whole worktree.
    std::fs::write(dir.join("keep.txt"), "changed again\n").unwrap();
    wait_until("the change seen", || quiet.known(&dir).is_none());
    pushed_as_the_worktree().await;

    // The user stages something (the index changes): a full look, same guarantee.
    std::fs::write(dir.join("new/dir/file.txt"), "staged\n").unwrap();
    git(&dir, &["add", "new"]);
    wait_until("the index seen", || quiet.known(&dir).is_none());
    pushed_as_the_worktree().await;
    assert_fsck(&dir);

    // The stop never trusts the set: it looks, and finds the snapshot on the remote.
    fx.server.clear_requests();
    let out = fx.save_with(&env, &cfg, &stop(), budget).await;
    assert_eq!(one(&out, &dir).result, SaveResult::Unchanged, "{out:#?}");
}
