//! Odd repository states each end in a defined outcome: mid-merge, detached HEAD, a
//! stale index.lock, an empty repository, no remote, a file over the size limit, a bare
//! repository, a repository owned by another user.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use agent::save::{SaveConfig, SaveMode};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repo_mid_merge_is_saved_as_it_is_with_its_conflict_markers() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    git(&dir, &["checkout", "-q", "-b", "topic"]);
    std::fs::write(dir.join("keep.txt"), "topic\n").unwrap();
    git(&dir, &["commit", "-qam", "topic"]);
    git(&dir, &["checkout", "-q", "main"]);
    std::fs::write(dir.join("keep.txt"), "main\n").unwrap();
    git(&dir, &["commit", "-qam", "main"]);
    assert!(!git_output(&dir, &["merge", "-q", "topic"]).status.success());
    let before = untouchables(&dir);
    assert!(
        std::fs::read_to_string(dir.join("keep.txt"))
            .unwrap()
            .contains("<<<<<<<")
    );

    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "pushed", "{o:#?}");
    assert!(o.note.as_deref().unwrap().contains("mid-merge"), "{o:#?}");
    let c = fx
        .server
        .ref_target("app.git", &format!("refs/heads/wip/{WORKSPACE}/main"))
        .unwrap();
    assert_eq!(fx.cloned_files("app.git", &c), worktree_files(&dir, &[]));
    assert_eq!(untouchables(&dir), before);
    assert!(
        dir.join(".git/MERGE_HEAD").exists(),
        "the merge is still in progress"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_head_is_saved_on_a_detached_ref() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    let head = git(&dir, &["rev-parse", "HEAD"]);
    git(&dir, &["checkout", "-q", "--detach"]);
    std::fs::write(dir.join("x.txt"), "x\n").unwrap();

    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "pushed", "{o:#?}");
    let r = format!("refs/heads/wip/{WORKSPACE}/detached-{}", &head[..7]);
    assert_eq!(o.r#ref.as_deref(), Some(r.as_str()));
    assert!(fx.server.ref_target("app.git", &r).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_index_lock_does_not_stop_a_snapshot_and_sends_branch_mode_to_the_snapshot_ref() {
    let fx = Fixture::new();
    let a = fx.repo("a");
    std::fs::write(a.join("x.txt"), "x\n").unwrap();
    std::fs::write(a.join(".git/index.lock"), b"").unwrap();

    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;
    assert_eq!(one(&outcomes, &a).result, "pushed");

    std::fs::write(a.join("y.txt"), "y\n").unwrap();
    let head = git(&a, &["rev-parse", "HEAD"]);
    let cfg = SaveConfig {
        mode: SaveMode::Branch,
        ..fx.config()
    };
    let outcomes = fx.save(&cfg, Duration::from_secs(30)).await;
    let o = one(&outcomes, &a);
    assert_eq!(o.result, "pushed", "{o:#?}");
    assert!(
        o.note.as_deref().unwrap().contains("index is locked"),
        "{o:#?}"
    );
    assert_eq!(git(&a, &["rev-parse", "HEAD"]), head, "branch not moved");
    assert!(a.join(".git/index.lock").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_repo_without_remote_gets_a_local_root_commit_and_says_not_pushed() {
    let fx = Fixture::new();
    let dir = fx.home.join("projects/empty");
    std::fs::create_dir_all(&dir).unwrap();
    git(&dir, &["init", "-q", "-b", "main"]);
    std::fs::write(dir.join("first.txt"), "first\n").unwrap();
    let untouched = fx.home.join("projects/nothing");
    std::fs::create_dir_all(&untouched).unwrap();
    git(&untouched, &["init", "-q"]);

    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "committed", "{o:#?}");
    assert!(o.note.as_deref().unwrap().contains("no remote"), "{o:#?}");
    let r = format!("refs/heads/wip/{WORKSPACE}/main");
    assert_eq!(o.r#ref.as_deref(), Some(r.as_str()));
    assert_eq!(
        git(&dir, &["rev-list", "--count", &r]),
        "1",
        "a root commit"
    );
    assert_eq!(git(&dir, &["show", &format!("{r}:first.txt")]), "first");
    assert!(
        git_output(&dir, &["rev-parse", "--verify", "-q", "HEAD"])
            .stdout
            .is_empty()
    );
    assert_eq!(one(&outcomes, &untouched).result, "clean");
    // Nothing changed since: the second save does not commit again.
    let again = fx.save(&fx.config(), Duration::from_secs(30)).await;
    assert_eq!(one(&again, &dir).result, "unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_over_the_size_limit_is_left_out_and_named_and_the_rest_is_saved() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    std::fs::write(dir.join("huge.bin"), vec![7u8; 4096]).unwrap();
    std::fs::write(dir.join("small.txt"), "small\n").unwrap();
    let cfg = SaveConfig {
        max_file_size: 1024,
        ..fx.config()
    };

    let outcomes = fx.save(&cfg, Duration::from_secs(30)).await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "pushed", "{o:#?}");
    assert_eq!(o.left_out.len(), 1, "{o:#?}");
    assert!(o.left_out[0].contains("huge.bin"));
    let c = fx
        .server
        .ref_target("app.git", &format!("refs/heads/wip/{WORKSPACE}/main"))
        .unwrap();
    assert_eq!(
        fx.cloned_files("app.git", &c),
        worktree_files(&dir, &["huge.bin"])
    );
    let journal = std::fs::read_to_string(fx.state.join("save-journal.jsonl")).unwrap();
    assert!(journal.contains("huge.bin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_repo_under_a_root_is_reported_clean() {
    let fx = Fixture::new();
    let bare = fx.home.join("projects/mirror.git");
    git(
        fx.tmp.path(),
        &["init", "-q", "--bare", bare.to_str().unwrap()],
    );
    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;
    let o = one(&outcomes, &bare);
    assert_eq!(o.result, "clean", "{o:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_saving_a_users_repo_leaves_no_root_owned_file_in_its_git_dir() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: the ownership check needs root");
        return;
    }
    let fx = Fixture::new();
    // The user can reach their HOME (tempdirs are 0700 root).
    std::fs::set_permissions(
        fx.tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let dir = fx.repo("users");
    std::fs::write(dir.join("work.txt"), "user's work\n").unwrap();
    let st = std::process::Command::new("chown")
        .args(["-R", "1000:1000"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(st.success());

    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "pushed", "{o:#?}");
    let mut stack = vec![dir.join(".git")];
    let mut seen = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            assert_eq!(
                md.uid(),
                1000,
                "{} is owned by uid {}",
                p.display(),
                md.uid()
            );
            seen += 1;
            if md.is_dir() {
                stack.push(p);
            }
        }
    }
    assert!(seen > 10);
    assert!(
        dir.join(format!(".git/refs/heads/wip/{WORKSPACE}/main"))
            .exists()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_saving_a_users_repo_the_user_cannot_reach_names_the_directory_in_the_way() {
    // The root daemon works on a user's repository with the user's filesystem ids, so a
    // directory above it that the user may not search (a container whose `/` is 0700, as
    // a tarball of a `mktemp -d` gives) refuses every access: the save fails naming that
    // directory and its mode, not some file inside `.git`, and writes nothing there.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: the filesystem-id check needs root");
        return;
    }
    let fx = Fixture::new();
    let blocker = fx.tmp.path().to_path_buf();
    std::fs::set_permissions(
        &blocker,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let dir = fx.repo("users");
    std::fs::write(dir.join("work.txt"), "user's work\n").unwrap();
    let st = std::process::Command::new("chown")
        .args(["-R", "1000:1000"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(st.success());
    let before = object_files(&dir);

    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "failed", "{o:#?}");
    let err = o.error.as_deref().unwrap_or_default();
    assert!(
        err.contains(&format!(
            "uid 1000, the owner of {}, cannot reach {}",
            dir.display(),
            dir.join(".git").display()
        )) && err.contains(&format!(
            "{} is not searchable by that user (mode 0700, owner uid 0)",
            blocker.display()
        )),
        "{err}"
    );
    assert_eq!(object_files(&dir), before, "something was written");
    assert!(
        fx.server
            .ref_target("users.git", &format!("refs/heads/wip/{WORKSPACE}/main"))
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repo_mid_rebase_is_saved_on_the_rebased_branchs_ref() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    git(&dir, &["checkout", "-q", "-b", "feature"]);
    std::fs::write(dir.join("keep.txt"), "feature\n").unwrap();
    git(&dir, &["commit", "-qam", "feature"]);
    git(&dir, &["checkout", "-q", "main"]);
    std::fs::write(dir.join("keep.txt"), "main\n").unwrap();
    git(&dir, &["commit", "-qam", "main"]);
    git(&dir, &["checkout", "-q", "feature"]);
    assert!(!git_output(&dir, &["rebase", "-q", "main"]).status.success());
    let before = untouchables(&dir);

    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "pushed", "{o:#?}");
    assert!(o.note.as_deref().unwrap().contains("mid-rebase"), "{o:#?}");
    let r = format!("refs/heads/wip/{WORKSPACE}/feature");
    assert_eq!(o.r#ref.as_deref(), Some(r.as_str()));
    let c = fx.server.ref_target("app.git", &r).unwrap();
    assert_eq!(fx.cloned_files("app.git", &c), worktree_files(&dir, &[]));
    assert_eq!(untouchables(&dir), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repo_without_a_pack_directory_is_saved_and_stays_sound() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    std::fs::remove_dir(dir.join(".git/objects/pack")).expect("an empty pack dir");
    std::fs::write(dir.join("new.txt"), "new\n").unwrap();

    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "pushed", "{o:#?}");
    assert_fsck(&dir);
    let c = o.commit.clone().unwrap();
    assert_eq!(fx.cloned_files("app.git", &c), worktree_files(&dir, &[]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_that_cannot_be_searched_is_a_failure_naming_it_not_no_repository() {
    // "No repository there" must never stand for "could not look" (file descriptors
    // exhausted, an I/O error, here a symlink loop): the save reports the directory as a
    // failure, by name, and still saves what it could find.
    let fx = Fixture::new();
    let dir = fx.repo("app");
    std::fs::write(dir.join("wip.txt"), "unsaved\n").unwrap();
    let looped = fx.tmp.path().join("loop");
    std::os::unix::fs::symlink(&looped, &looped).unwrap();
    let mut cfg = fx.config();
    cfg.roots.push(looped.display().to_string());

    let outcomes = fx.save(&cfg, Duration::from_secs(30)).await;

    assert_eq!(outcomes.len(), 2, "{outcomes:#?}");
    assert_eq!(one(&outcomes, &dir).result, "pushed");
    let bad = outcomes
        .iter()
        .find(|o| o.repo == looped.display().to_string())
        .expect("the loop is reported");
    assert_eq!(bad.result, "failed");
    let err = bad.error.as_deref().unwrap_or_default();
    assert!(
        err.starts_with(&format!(
            "cannot search {} for repositories: ",
            looped.display()
        )),
        "{err}"
    );
}
