//! Snapshots as a history the remote keeps for this workspace alone: the lease (a snapshot
//! push never overwrites someone else's work), "unchanged" only once the remote is seen
//! to still have the snapshot, the journal written as each repository's outcome lands,
//! the start's notice of a newer snapshot on the remote, and `restore --force` without a
//! daemon. Real binary, real smart-HTTP git server.

use std::path::Path;

use agent_proto::local::Lifecycle;
use integration::daemon::{Daemon, Signal, Workspace};
use integration::gitserver::GitServer;
use integration::wait_until;

use crate::repos::{cache_token, dirty_repo, git, provider_for, server_files, worktree_files};
use crate::support::{LONG, SHORT, config};

const TOKEN: &str = "ghs_right_4f9a8b7c6d5e";
const SNAP: &str = "refs/heads/wip/ws1/main";

fn setup(ws: &Workspace) -> GitServer {
    GitServer::start(ws.path().join("srv"), TOKEN).expect("git server")
}

/// A commit made in the server's own repository (someone else's work), put on `refname`.
fn foreign_commit(server: &GitServer, name: &str, refname: &str) -> String {
    let bare = server.path(name);
    let c = git(
        &bare,
        &[
            "commit-tree",
            "main^{tree}",
            "-p",
            "main",
            "-m",
            "another workspace's snapshot",
        ],
    );
    git(&bare, &["update-ref", refname, &c]);
    c
}

fn is_ancestor(bare: &Path, a: &str, b: &str) -> bool {
    std::process::Command::new("git")
        .arg("-C")
        .arg(bare)
        .args(["merge-base", "--is-ancestor", a, b])
        .status()
        .unwrap()
        .success()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The remote's snapshot ref holds a commit that is none of ours (another workspace of
/// the same name saved there): `wsagent save` leaves it alone, pushes to `REF@2` and
/// says so; the next save fast-forwards `REF@2`, and the other work is still untouched.
#[test]
fn a_snapshot_ref_holding_someone_elses_work_is_left_alone_and_the_save_goes_beside_it() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = setup(&ws);
    let repo = dirty_repo(&server, &ws.home(), "app");
    cache_token(&ws.home(), TOKEN);
    let theirs = foreign_commit(&server, "app.git", SNAP);
    let mut d = Daemon::start(&ws, &config(&provider_for(&server)));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);

    let first = d.cli(["save"]);

    assert!(first.status.success(), "{first:?}");
    let text = stdout(&first);
    let beside = format!("{SNAP}@2");
    assert!(
        text.contains(&beside) && text.contains("left it alone"),
        "{text}"
    );
    assert_eq!(server.ref_target("app.git", SNAP), Some(theirs.clone()));
    assert_eq!(server_files(&server, "app", &beside), worktree_files(&repo));
    let ours1 = server.ref_target("app.git", &beside).unwrap();

    std::fs::write(repo.join("tracked.txt"), "v3\n").unwrap();
    let second = d.cli(["save"]);

    assert!(second.status.success(), "{second:?}");
    let ours2 = server.ref_target("app.git", &beside).unwrap();
    assert_ne!(ours1, ours2);
    assert!(is_ancestor(&server.path("app.git"), &ours1, &ours2));
    assert_eq!(server.ref_target("app.git", SNAP), Some(theirs));
    assert_eq!(server.ref_target("app.git", &format!("{SNAP}@3")), None);
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(LONG).success(), "{}", d.report());
}

/// A save that finds nothing new says "unchanged" only once it has seen the snapshot on
/// the remote: when the remote's snapshot ref was deleted, the next `wsagent save`
/// pushes the same snapshot again and says so.
#[test]
fn a_snapshot_deleted_on_the_remote_is_pushed_again_not_called_unchanged() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = setup(&ws);
    let repo = dirty_repo(&server, &ws.home(), "app");
    cache_token(&ws.home(), TOKEN);
    let mut d = Daemon::start(&ws, &config(&provider_for(&server)));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    assert!(d.cli(["save"]).status.success());
    let pushed = server.ref_target("app.git", SNAP).unwrap();
    let still = d.cli(["save"]);
    assert!(stdout(&still).contains("unchanged"), "{still:?}");
    git(&server.path("app.git"), &["update-ref", "-d", SNAP]);

    let again = d.cli(["save"]);

    assert!(again.status.success(), "{again:?}");
    let text = stdout(&again);
    assert!(!text.contains("unchanged"), "{text}");
    assert!(text.contains("pushed it again"), "{text}");
    assert_eq!(server.ref_target("app.git", SNAP), Some(pushed));
    assert_eq!(server_files(&server, "app", SNAP), worktree_files(&repo));
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(LONG).success(), "{}", d.report());
}

/// The journal gets each repository's outcome the moment it is known: a daemon killed
/// during the stop while one repository's push still hangs has journaled the other's
/// push, and the next start reports one pushed and one interrupted.
#[test]
fn a_daemon_killed_mid_stop_has_journaled_the_pushes_already_made() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = setup(&ws);
    let _fast = dirty_repo(&server, &ws.home(), "fast");
    let _slow = dirty_repo(&server, &ws.home(), "slow");
    let hook = server.path("slow.git").join("hooks/pre-receive");
    std::fs::write(&hook, "#!/bin/sh\nsleep 20\nexit 0\n").unwrap();
    cache_token(&ws.home(), TOKEN);
    let cfg = config(&format!(
        "[shutdown]\nbudget = \"60s\"\n{}",
        provider_for(&server)
    ));
    let mut d = Daemon::start(&ws, &cfg);
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let journal = ws.state_dir().join("save-journal.jsonl");
    let fast_pushed = |j: &str| {
        j.lines()
            .any(|l| l.contains("projects/fast\"") && l.contains("\"pushed\":true"))
    };

    d.signal(Signal::SIGTERM);
    wait_until(SHORT, "the fast repository's push on the server", || {
        server.ref_target("fast.git", SNAP).is_some()
    });
    wait_until(SHORT, "the fast repository's push in the journal", || {
        std::fs::read_to_string(&journal).is_ok_and(|j| fast_pushed(&j))
    });
    assert_eq!(server.ref_target("slow.git", SNAP), None);
    d.signal(Signal::SIGKILL);
    d.wait_exit(SHORT);

    let mut next = Daemon::start(&ws, &config(""));
    next.wait_lifecycle(Lifecycle::Ready, SHORT);
    let err = next.stderr();
    assert!(
        err.contains("1 pushed") && err.contains("INTERRUPTED") && err.contains("projects/slow"),
        "{err}"
    );
    next.signal(Signal::SIGTERM);
    next.wait_exit(LONG);
}

/// An earlier workspace of the same name saved work this volume never saw: at start,
/// `wsagent status` says the remote has a newer snapshot and prints the command that
/// restores it (nothing is restored unasked); that command brings it back, status stops
/// saying so, and the next save continues that snapshot's history on the same ref.
#[test]
fn a_newer_snapshot_on_the_remote_is_announced_at_start_with_the_command_that_restores_it() {
    let old = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = setup(&old);
    let old_repo = dirty_repo(&server, &old.home(), "app");
    cache_token(&old.home(), TOKEN);
    let mut d = Daemon::start(&old, &config(&provider_for(&server)));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(LONG).success(), "{}", d.report());
    let theirs = server.ref_target("app.git", SNAP).unwrap();

    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let repo = ws.home().join("projects/app");
    std::fs::create_dir_all(repo.parent().unwrap()).unwrap();
    git(
        ws.path(),
        &[
            "clone",
            "-q",
            &server.url("app.git"),
            repo.to_str().unwrap(),
        ],
    );
    let clean = worktree_files(&repo);
    cache_token(&ws.home(), TOKEN);
    let mut d = Daemon::start(&ws, &config(&provider_for(&server)));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    wait_until(SHORT, "the start's check of the remotes", || {
        d.stderr().contains("checked the remotes")
    });

    let status = stdout(&d.cli(["status"]));

    let command = format!(
        "wsagent restore --repo {} --snapshot {}",
        repo.display(),
        &theirs[..12]
    );
    assert!(
        status.contains("newer on the remote") && status.contains(&command),
        "{status}"
    );
    assert_eq!(worktree_files(&repo), clean, "restored without being asked");

    let args: Vec<&str> = command.split(' ').skip(1).collect();
    let restored = d.cli(args);

    assert!(restored.status.success(), "{restored:?}");
    assert_eq!(worktree_files(&repo), worktree_files(&old_repo));
    let status = stdout(&d.cli(["status"]));
    assert!(!status.contains("newer on the remote"), "{status}");
    std::fs::write(repo.join("tracked.txt"), "continued here\n").unwrap();
    assert!(d.cli(["save"]).status.success());
    let ours = server.ref_target("app.git", SNAP).unwrap();
    assert!(is_ancestor(&server.path("app.git"), &theirs, &ours));
    assert_eq!(server.ref_target("app.git", &format!("{SNAP}@2")), None);
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(LONG).success(), "{}", d.report());
}

/// Two checkpoints with a change between them: the remote ref fast-forwards, `wsagent
/// saves` lists both, and `wsagent restore --force` of the older one (no daemon
/// running: the CLI saves the current state itself first) gives the older content.
#[test]
fn two_checkpoints_fast_forward_and_restore_force_without_a_daemon_brings_back_the_older() {
    let mut ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = setup(&ws);
    let repo = dirty_repo(&server, &ws.home(), "app");
    cache_token(&ws.home(), TOKEN);
    let cfg = config(&format!(
        "[save]\ncheckpoint = \"200ms\"\n{}",
        provider_for(&server)
    ));
    let mut d = Daemon::start(&ws, &cfg);
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let older_files = worktree_files(&repo);
    wait_until(SHORT, "the first checkpoint", || {
        server.ref_target("app.git", SNAP).is_some()
            && server_files(&server, "app", SNAP) == older_files
    });
    let older = server.ref_target("app.git", SNAP).unwrap();
    std::fs::write(repo.join("tracked.txt"), "v3, checkpointed later\n").unwrap();
    let newer_files = worktree_files(&repo);
    wait_until(SHORT, "the second checkpoint", || {
        server_files(&server, "app", SNAP) == newer_files
    });
    let newer = server.ref_target("app.git", SNAP).unwrap();
    assert!(is_ancestor(&server.path("app.git"), &older, &newer));
    d.signal(Signal::SIGKILL);
    d.wait_exit(SHORT);
    let r = repo.to_str().unwrap();
    let listed = stdout(&ws.cli(["saves", "--repo", r]));
    assert!(
        listed.contains(&older[..12]) && listed.contains(&newer[..12]),
        "{listed}"
    );
    std::fs::write(repo.join("tracked.txt"), "v4, never checkpointed\n").unwrap();
    // The CLI reads the system config, as in an image (`/etc/wsagent/config.toml`).
    let cfg_file = ws.config_path().display().to_string();
    ws.set_env("WSAGENT_SYSTEM_CONFIG", cfg_file);

    let out = ws.cli([
        "restore",
        "--repo",
        r,
        "--snapshot",
        &older[..12],
        "--force",
    ]);

    assert!(out.status.success(), "{out:?}");
    assert_eq!(worktree_files(&repo), older_files);
    let newest = server.ref_target("app.git", SNAP).unwrap();
    assert!(is_ancestor(&server.path("app.git"), &newer, &newest));
    assert_eq!(
        server_files(&server, "app", SNAP)["tracked.txt"],
        b"v4, never checkpointed\n"
    );
}
