//! Snapshot mode: the whole worktree on the wip ref, nothing local disturbed, the token
//! nowhere, and no second push of an unchanged state.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use agent_proto::local::EventKind;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_pushes_the_whole_worktree_and_leaves_head_index_worktree_and_config_untouched() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    // Every kind of change: modified, staged new, deleted, untracked (nested), ignored,
    // executable, symlink, and a file name that is not UTF-8.
    std::fs::write(dir.join("README.md"), "# project\nchanged\n").unwrap();
    std::fs::write(dir.join("staged.txt"), "staged\n").unwrap();
    git(&dir, &["add", "staged.txt"]);
    std::fs::remove_file(dir.join("gone.txt")).unwrap();
    std::fs::create_dir_all(dir.join("src/deep")).unwrap();
    std::fs::write(dir.join("src/deep/new.rs"), "fn main() {}\n").unwrap();
    std::fs::write(dir.join("debug.log"), "ignored\n").unwrap();
    std::fs::create_dir_all(dir.join("build")).unwrap();
    std::fs::write(dir.join("build/out.bin"), [0u8, 1, 2]).unwrap();
    std::fs::write(dir.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(dir.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("keep.txt", dir.join("link")).unwrap();
    let odd_name = std::ffi::OsStr::from_bytes(b"caf\xe9-\xff.txt");
    std::fs::write(dir.join(odd_name), b"latin-1 name\n").unwrap();
    let head = git(&dir, &["rev-parse", "HEAD"]);
    let before = untouchables(&dir);
    let (loose_before, packs_before) = object_files(&dir);
    let mut events = fx.events.subscribe();

    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "pushed", "{o:#?}");
    assert!(o.pushed);
    let wip = format!("refs/heads/wip/{WORKSPACE}/main");
    assert_eq!(o.r#ref.as_deref(), Some(wip.as_str()));
    assert_eq!(o.remote.as_deref(), Some(fx.server.url("app.git").as_str()));
    let remote_commit = fx
        .server
        .ref_target("app.git", &wip)
        .expect("wip ref on the server");
    assert_eq!(o.commit.as_deref(), Some(remote_commit.as_str()));
    let bare = fx.server.path("app.git");
    assert_eq!(
        fx.cloned_files("app.git", &remote_commit),
        worktree_files(&dir, &["debug.log", "build"]),
        "the pushed tree is the worktree, byte for byte, ignored files excluded"
    );
    let repo = git2::Repository::open(&bare).unwrap();
    let c = repo
        .find_commit(git2::Oid::from_str(&remote_commit).unwrap())
        .unwrap();
    assert_eq!(c.parent_id(0).unwrap().to_string(), head, "parent is HEAD");
    assert_eq!(
        c.author().name().ok(),
        Some("Dev"),
        "the repository's user.name"
    );
    assert!(c.message().unwrap().contains(WORKSPACE));
    assert!(c.message().unwrap().contains("stop"));
    assert_eq!(
        untouchables(&dir),
        before,
        "HEAD, index, config and worktree unchanged"
    );
    assert_eq!(git(&dir, &["rev-parse", "HEAD"]), head);
    // The few new objects (blobs, trees, the commits) were written loose, as git writes
    // a small commit (a pack each save would pile up; `git gc --auto` handles loose
    // ones), no pack was added, and git reads them.
    let (loose, packs) = object_files(&dir);
    assert!(
        loose > loose_before && loose - loose_before < 100,
        "a few loose objects: {loose_before} -> {loose}"
    );
    assert_eq!(packs.len(), packs_before.len(), "no pack added: {packs:?}");
    assert_fsck(&dir);
    assert_eq!(
        git(&dir, &["cat-file", "-p", &format!("{wip}:src/deep/new.rs")]),
        "fn main() {}"
    );

    // The journal has a started line, then the outcome; the event carries it too.
    let last = agent::save::last_outcomes(&fx.state);
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].result, "pushed");
    let journal = std::fs::read_to_string(fx.state.join("save-journal.jsonl")).unwrap();
    assert_eq!(journal.lines().count(), 2);
    assert!(journal.lines().next().unwrap().contains("\"started\""));
    let ev = events.try_recv().unwrap();
    assert!(matches!(ev.kind, EventKind::Save { ref outcome } if outcome.result == "pushed"));

    // Saving the same state again pushes nothing: a stop's save only asks the remote
    // (one ref advertisement) whether it still has the snapshot.
    fx.server.clear_requests();
    let again = fx.save(&fx.config(), Duration::from_secs(30)).await;
    assert_eq!(one(&again, &dir).result, "unchanged");
    let reqs = fx.server.requests();
    assert!(
        reqs.len() == 1 && reqs[0].method == "GET" && reqs[0].path.ends_with("/info/refs"),
        "{reqs:?}"
    );
    assert_eq!(untouchables(&dir), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_pushed_repo_is_left_alone_and_unpushed_commits_are_saved() {
    let fx = Fixture::new();
    let clean = fx.repo("clean");
    let ahead = fx.repo("ahead");
    std::fs::write(ahead.join("more.txt"), "more\n").unwrap();
    git(&ahead, &["add", "-A"]);
    git(&ahead, &["commit", "-qm", "local only"]);
    let ahead_head = git(&ahead, &["rev-parse", "HEAD"]);

    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;

    assert_eq!(one(&outcomes, &clean).result, "clean");
    let o = one(&outcomes, &ahead);
    assert_eq!(o.result, "pushed", "{o:#?}");
    // A clean worktree ahead of its upstream: HEAD itself goes to the wip ref.
    assert_eq!(o.commit.as_deref(), Some(ahead_head.as_str()));
    assert_eq!(
        fx.server
            .ref_target("ahead.git", &format!("refs/heads/wip/{WORKSPACE}/main"))
            .as_deref(),
        Some(ahead_head.as_str())
    );
    assert!(
        fx.server
            .ref_target("clean.git", &format!("refs/heads/wip/{WORKSPACE}/main"))
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_token_leaves_the_commit_local_and_the_token_nowhere() {
    let wrong = "tok-wrong-55aa77bb";
    let fx = Fixture::with_cached_token(wrong);
    let dir = fx.repo("app");
    std::fs::write(dir.join("wip.txt"), "unsaved\n").unwrap();
    let config_before = std::fs::read(dir.join(".git/config")).unwrap();

    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "committed", "{o:#?}");
    assert!(!o.pushed);
    let err = o.error.as_deref().unwrap();
    assert!(
        err.contains("not pushed") && err.contains("rejected"),
        "{err}"
    );
    let wip = format!("refs/heads/wip/{WORKSPACE}/main");
    assert_eq!(git(&dir, &["rev-parse", &wip]), o.commit.clone().unwrap());
    assert!(fx.server.ref_target("app.git", &wip).is_none());
    assert_eq!(agent::save::last_outcomes(&fx.state)[0].result, "committed");
    assert_eq!(
        std::fs::read(dir.join(".git/config")).unwrap(),
        config_before
    );
    // The credentials callback gave up: one 401 per token tried, no loop.
    let unauthorized = fx
        .server
        .requests()
        .iter()
        .filter(|r| r.status == 401)
        .count();
    assert!(unauthorized <= 3, "{:?}", fx.server.requests());
    let cache = fx.home.join(".cache/coder/test_token");
    for (path, bytes) in all_files(&fx.home) {
        if path == cache {
            continue;
        }
        for t in [wrong, TOKEN] {
            assert!(
                !bytes.windows(t.len()).any(|w| w == t.as_bytes()),
                "token in {}",
                path.display()
            );
        }
    }
    assert!(!format!("{outcomes:?}").contains(wrong));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dirty_submodule_is_saved_as_its_own_repository_first() {
    let fx = Fixture::new();
    let lib = fx.repo("lib");
    let app = fx.repo("app");
    let o = git_output(
        &app,
        &[
            "-c",
            "protocol.file.allow=always",
            "submodule",
            "add",
            "-q",
            lib.to_str().unwrap(),
            "vendor/lib",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    git(&app, &["commit", "-qm", "add submodule"]);
    let sub = app.join("vendor/lib");
    // The submodule's origin is the server too.
    git(
        &sub,
        &["remote", "set-url", "origin", &fx.server.url("lib.git")],
    );
    git(&sub, &["config", "user.name", "Dev"]);
    git(&sub, &["config", "user.email", "dev@example.com"]);
    std::fs::write(sub.join("patch.txt"), "submodule work\n").unwrap();

    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;

    let so = one(&outcomes, &sub);
    assert_eq!(so.result, "pushed", "{so:#?}");
    let wip = format!("refs/heads/wip/{WORKSPACE}/main");
    let c = fx.server.ref_target("lib.git", &wip).unwrap();
    assert_eq!(fx.cloned_files("lib.git", &c), worktree_files(&sub, &[]));
    assert_eq!(one(&outcomes, &app).result, "pushed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_git_identity_the_workspace_owner_then_wsagent_authors_the_snapshot() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // As root the save reads the user's HOME's git config (empty here); otherwise
        // the test runner's own ~/.gitconfig would provide an identity.
        eprintln!("not root: the identity fallback needs a HOME without .gitconfig");
        return;
    }
    let fx = Fixture::new();
    let dir = fx.repo("app");
    git(&dir, &["config", "--unset", "user.name"]);
    git(&dir, &["config", "--unset", "user.email"]);
    std::fs::write(dir.join("wip.txt"), "wip\n").unwrap();
    let author = |o: &agent_proto::save::RepoOutcome| {
        let repo = git2::Repository::open(&dir).unwrap();
        let c = repo
            .find_commit(git2::Oid::from_str(o.commit.as_deref().unwrap()).unwrap())
            .unwrap();
        let a = c.author();
        format!("{} <{}>", a.name().unwrap(), a.email().unwrap())
    };

    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;
    assert_eq!(author(one(&outcomes, &dir)), "Owner <owner@example.com>");

    std::fs::write(dir.join("wip.txt"), "more\n").unwrap();
    let mut env = fx.env();
    env.owner_name = None;
    env.owner_email = None;
    let outcomes = fx
        .save_with(&env, &fx.config(), &stop(), Duration::from_secs(30))
        .await;
    assert_eq!(author(one(&outcomes, &dir)), "wsagent <wsagent@localhost>");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_on_a_branch_that_is_not_checked_out_are_saved_too() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    git(&dir, &["checkout", "-q", "-b", "feature"]);
    std::fs::write(dir.join("feature.txt"), "feature\n").unwrap();
    git(&dir, &["add", "-A"]);
    git(&dir, &["commit", "-qm", "feature work"]);
    let feature = git(&dir, &["rev-parse", "HEAD"]);
    git(&dir, &["checkout", "-q", "main"]);
    let config_before = std::fs::read(dir.join(".git/config")).unwrap();

    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "pushed", "{o:#?}");
    assert!(o.note.as_deref().unwrap().contains("feature"), "{o:#?}");
    let r = format!("refs/heads/wip/{WORKSPACE}/feature");
    assert_eq!(fx.server.ref_target("app.git", &r), Some(feature));
    assert_eq!(
        std::fs::read(dir.join(".git/config")).unwrap(),
        config_before
    );
    // The main worktree was clean: no snapshot of it.
    assert!(
        fx.server
            .ref_target("app.git", &format!("refs/heads/wip/{WORKSPACE}/main"))
            .is_none()
    );

    fx.server.clear_requests();
    let again = fx.save(&fx.config(), Duration::from_secs(30)).await;
    assert_eq!(one(&again, &dir).result, "clean");
    assert!(fx.server.requests().is_empty());
}
