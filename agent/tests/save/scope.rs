//! Which repositories a save covers: roots, the explicit list, `only`, linked
//! worktrees; and a dry run that writes nothing.

use std::time::Duration;

use agent::save::{Reason, SaveConfig, SaveRequest};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_repos_outside_the_roots_are_saved_and_only_narrows_to_one_repo() {
    let fx = Fixture::new();
    let inside = fx.repo("inside");
    std::fs::write(inside.join("a.txt"), "a\n").unwrap();
    // A repository outside every root, listed explicitly.
    let moved = fx.home.join("elsewhere/outside");
    std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
    let tmp_repo = fx.repo("outside");
    std::fs::rename(&tmp_repo, &moved).unwrap();
    std::fs::write(moved.join("b.txt"), "b\n").unwrap();
    let cfg = SaveConfig {
        repos: vec!["~/elsewhere/outside".into()],
        ..fx.config()
    };

    let req = SaveRequest {
        act_as: None,
        reason: Reason::Manual,
        only: Some(moved.join("b.txt")),
        dry_run: false,
    };
    let only = fx
        .save_with(&fx.env(), &cfg, &req, Duration::from_secs(30))
        .await;
    assert_eq!(only.len(), 1, "{only:#?}");
    assert_eq!(one(&only, &moved).result, "pushed");
    assert_eq!(one(&only, &moved).reason, "manual");

    let all = fx.save(&cfg, Duration::from_secs(30)).await;
    assert_eq!(all.len(), 2, "{all:#?}");
    assert_eq!(one(&all, &inside).result, "pushed");
    assert_eq!(one(&all, &moved).result, "unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_reports_unsaved_work_and_writes_nothing() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    std::fs::write(dir.join("wip.txt"), "wip\n").unwrap();
    let before = all_files(&dir.join(".git"));
    fx.server.clear_requests();
    let req = SaveRequest {
        act_as: None,
        reason: Reason::Manual,
        only: None,
        dry_run: true,
    };

    let outcomes = fx
        .save_with(&fx.env(), &fx.config(), &req, Duration::from_secs(30))
        .await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "would-save", "{o:#?}");
    assert!(o.note.as_deref().unwrap().contains("1 changed path"));
    assert_eq!(
        all_files(&dir.join(".git")),
        before,
        "nothing written in .git"
    );
    assert!(!fx.state.join("save-journal.jsonl").exists());
    assert!(
        fx.server
            .requests()
            .iter()
            .all(|r| !r.push || r.status != 200)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_worktree_is_saved_on_its_own_branch_ref() {
    let fx = Fixture::new();
    let main = fx.repo("app");
    let wt = fx.home.join("projects/app-feature");
    git(
        &main,
        &[
            "worktree",
            "add",
            "-q",
            "-b",
            "feature",
            wt.to_str().unwrap(),
        ],
    );
    std::fs::write(wt.join("feature.txt"), "feature work\n").unwrap();
    // Large enough to be streamed as a loose object, into the main repository's store.
    let big: Vec<u8> = (0..1_500_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(wt.join("big.bin"), &big).unwrap();
    let dotgit = std::fs::read(wt.join(".git")).unwrap();

    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;

    let o = one(&outcomes, &wt);
    assert_eq!(o.result, "pushed", "{o:#?}");
    let r = format!("refs/heads/wip/{WORKSPACE}/feature");
    assert_eq!(o.r#ref.as_deref(), Some(r.as_str()));
    let c = fx.server.ref_target("app.git", &r).unwrap();
    assert_eq!(fx.cloned_files("app.git", &c), worktree_files(&wt, &[]));
    assert_eq!(std::fs::read(wt.join(".git")).unwrap(), dotgit);
    assert_eq!(git(&wt, &["rev-parse", "--abbrev-ref", "HEAD"]), "feature");
    assert_fsck(&main);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clones_on_the_same_branch_push_to_distinct_refs() {
    let fx = Fixture::new();
    let first = fx.repo("app");
    let second = fx.home.join("projects/app-copy");
    git(
        fx.tmp.path(),
        &[
            "clone",
            "-q",
            &fx.server.url("app.git"),
            second.to_str().unwrap(),
        ],
    );
    std::fs::write(first.join("mine.txt"), "first clone\n").unwrap();
    std::fs::write(second.join("mine.txt"), "second clone\n").unwrap();

    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;

    let (a, b) = (one(&outcomes, &first), one(&outcomes, &second));
    assert_eq!((a.result.as_str(), b.result.as_str()), ("pushed", "pushed"));
    let plain = format!("refs/heads/wip/{WORKSPACE}/main");
    assert_eq!(a.r#ref.as_deref(), Some(plain.as_str()));
    let other = b.r#ref.clone().unwrap();
    assert!(other.starts_with(&format!("{plain}-")), "{other}");
    for (o, dir) in [(a, &first), (b, &second)] {
        let c = fx
            .server
            .ref_target("app.git", o.r#ref.as_deref().unwrap())
            .unwrap();
        assert_eq!(fx.cloned_files("app.git", &c), worktree_files(dir, &[]));
    }
    // The same names on the next save.
    std::fs::write(second.join("mine.txt"), "second clone, later\n").unwrap();
    let again = fx.save(&fx.config(), Duration::from_secs(30)).await;
    assert_eq!(one(&again, &second).r#ref.as_deref(), Some(other.as_str()));
    assert_eq!(one(&again, &first).result, "unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_saves_at_once_run_one_after_the_other_and_the_second_finds_nothing_new() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    std::fs::write(dir.join("wip.txt"), "wip\n").unwrap();
    let cfg = fx.config();

    let (a, b) = tokio::join!(
        fx.save(&cfg, Duration::from_secs(30)),
        fx.save(&cfg, Duration::from_secs(30))
    );

    let mut results = [one(&a, &dir).result, one(&b, &dir).result];
    results.sort();
    assert_eq!(results, ["pushed", "unchanged"]);
}
