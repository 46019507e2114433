//! Save on stop, end to end: the real daemon, real repositories, the real smart-HTTP git
//! server with token auth.

use std::time::{Duration, Instant};

use agent_proto::local::Lifecycle;
use integration::daemon::{Daemon, Signal, Workspace};
use integration::gitserver::GitServer;
use integration::wait_until;

use crate::repos::{
    cache_token, dirty_repo, files_containing, git, provider_for, server_files, worktree_files,
};
use crate::support::{LONG, SHORT, config};

const TOKEN: &str = "ghs_right_4f9a8b7c6d5e";

fn setup(ws: &Workspace) -> GitServer {
    GitServer::start(ws.path().join("srv"), TOKEN).expect("git server")
}

/// SIGTERM pushes the dirty worktree as the snapshot ref: the server holds exactly the
/// worktree's bytes, while HEAD, the index and `.git/config` stay byte-identical.
#[test]
fn sigterm_pushes_dirty_worktree_as_snapshot_ref() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = setup(&ws);
    let repo = dirty_repo(&server, &ws.home(), "app");
    cache_token(&ws.home(), TOKEN);
    let config_before = std::fs::read(repo.join(".git/config")).unwrap();
    let index_before = std::fs::read(repo.join(".git/index")).unwrap();
    let head_before = git(&repo, &["rev-parse", "HEAD"]);
    let mut d = Daemon::start(&ws, &config(&provider_for(&server)));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    d.signal(Signal::SIGTERM);
    let st = d.wait_exit(LONG);
    assert!(st.success(), "{}", d.report());
    assert_eq!(
        server_files(&server, "app", "refs/heads/wip/ws1/main"),
        worktree_files(&repo)
    );
    assert_eq!(
        std::fs::read(repo.join(".git/config")).unwrap(),
        config_before
    );
    assert_eq!(
        std::fs::read(repo.join(".git/index")).unwrap(),
        index_before
    );
    assert_eq!(git(&repo, &["rev-parse", "HEAD"]), head_before);
    assert_eq!(
        git(&repo, &["status", "--porcelain"]),
        "M tracked.txt\n?? \"new file.txt\"".trim()
    );
    assert!(
        d.stderr().contains("pushed refs/heads/wip/ws1/main"),
        "{}",
        d.stderr()
    );
    let hits = files_containing(
        ws.path(),
        TOKEN,
        &[ws.home().join(".cache/coder/github_token")],
    );
    let hits: Vec<_> = hits
        .into_iter()
        .filter(|p| !p.starts_with(ws.path().join("srv")))
        .collect();
    assert!(hits.is_empty(), "token found in {hits:?}");
    assert!(!d.stderr().contains(TOKEN));
}

/// With a wrong token nothing is pushed, the commit stays local, `wsagent save` exits 1,
/// the journal says so, and the token appears in no log.
#[test]
fn wrong_token_is_not_pushed_but_committed_and_save_exits_1() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = setup(&ws);
    let repo = dirty_repo(&server, &ws.home(), "app");
    let wrong = "ghs_wrong_0a1b2c3d4e5f";
    cache_token(&ws.home(), wrong);
    let mut d = Daemon::start(&ws, &config(&provider_for(&server)));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let out = d.cli(["save"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not pushed"),
        "{out:?}"
    );
    assert_eq!(
        server.ref_target("app.git", "refs/heads/wip/ws1/main"),
        None
    );
    let local = git(
        &repo,
        &["for-each-ref", "--format=%(refname)", "refs/heads/wip"],
    );
    assert_eq!(
        local, "refs/heads/wip/ws1/main",
        "the local commit must exist"
    );
    let journal = std::fs::read_to_string(ws.state_dir().join("save-journal.jsonl")).unwrap();
    let last: agent_proto::save::RepoOutcome =
        serde_json::from_str(journal.lines().last().unwrap()).unwrap();
    assert_eq!(
        (last.result.as_str(), last.pushed),
        ("committed", false),
        "{journal}"
    );
    d.signal(Signal::SIGTERM);
    d.wait_exit(LONG);
    assert!(!d.stderr().contains(wrong));
    let hits = files_containing(&ws.state_dir(), wrong, &[]);
    assert!(hits.is_empty(), "token found in {hits:?}");
    assert_eq!(
        files_containing(&repo, wrong, &[]),
        Vec::<std::path::PathBuf>::new()
    );
}

/// SIGKILL in the middle of a push to a slow server: `.git/config` is byte-identical,
/// the token is nowhere on disk but its cache, and the next start reports the
/// interrupted save.
#[test]
fn sigkill_mid_push_keeps_config_and_next_start_reports_interrupted_save() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = setup(&ws);
    let repo = dirty_repo(&server, &ws.home(), "app");
    cache_token(&ws.home(), TOKEN);
    let config_before = std::fs::read(repo.join(".git/config")).unwrap();
    let cfg = config(&provider_for(&server));
    let mut d = Daemon::start(&ws, &cfg);
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    server.clear_requests();
    server.set_latency(Duration::from_secs(5));
    d.signal(Signal::SIGUSR1);
    wait_until(SHORT, "the journal's started line", || {
        std::fs::read_to_string(ws.state_dir().join("save-journal.jsonl"))
            .is_ok_and(|j| j.contains("\"started\""))
    });
    // The local commit comes first; with 5 s of latency the push is then in flight.
    wait_until(SHORT, "the local snapshot commit", || {
        !git(
            &repo,
            &["for-each-ref", "--format=%(refname)", "refs/heads/wip"],
        )
        .is_empty()
    });
    d.signal(Signal::SIGKILL);
    d.wait_exit(SHORT);
    assert_eq!(
        std::fs::read(repo.join(".git/config")).unwrap(),
        config_before
    );
    let hits = files_containing(
        ws.path(),
        TOKEN,
        &[ws.home().join(".cache/coder/github_token")],
    );
    let hits: Vec<_> = hits
        .into_iter()
        .filter(|p| !p.starts_with(ws.path().join("srv")))
        .collect();
    assert!(hits.is_empty(), "token found in {hits:?}");
    server.set_latency(Duration::ZERO);
    let mut d2 = Daemon::start(&ws, &cfg);
    d2.wait_lifecycle(Lifecycle::Ready, SHORT);
    assert!(
        d2.stderr().to_lowercase().contains("interrupted"),
        "{}",
        d2.stderr()
    );
}

/// Twenty repositories against a server far too slow for the budget: every one is at
/// least committed locally, and the stop still ends inside its budget.
#[test]
fn twenty_repos_against_a_too_slow_server_are_committed_and_the_stop_keeps_its_budget() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = setup(&ws);
    let repos: Vec<_> = (0..20)
        .map(|i| dirty_repo(&server, &ws.home(), &format!("r{i:02}")))
        .collect();
    cache_token(&ws.home(), TOKEN);
    let mut d = Daemon::start(
        &ws,
        &config(&format!(
            "[shutdown]\nbudget = \"4s\"\n{}",
            provider_for(&server)
        )),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    server.set_latency(Duration::from_secs(20));
    let t = Instant::now();
    d.signal(Signal::SIGTERM);
    let st = d.wait_exit(LONG);
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(4500),
        "stop took {took:?} with a 4s budget"
    );
    assert_eq!(
        st.code(),
        Some(1),
        "a save that could not push must make the stop fail"
    );
    for r in &repos {
        let local = git(
            r,
            &["for-each-ref", "--format=%(refname)", "refs/heads/wip"],
        );
        assert_eq!(
            local,
            "refs/heads/wip/ws1/main",
            "{} not committed",
            r.display()
        );
    }
}

/// `wsagent save` (Coder's shutdown_script) then SIGTERM: the stop pushes nothing again
/// when nothing changed in between, and pushes what did.
#[test]
fn manual_save_then_sigterm_saves_only_what_changed() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = setup(&ws);
    let a = dirty_repo(&server, &ws.home(), "a");
    let _b = dirty_repo(&server, &ws.home(), "b");
    cache_token(&ws.home(), TOKEN);
    let mut d = Daemon::start(&ws, &config(&provider_for(&server)));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let out = d.cli(["save"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().filter(|l| l.starts_with("pushed ")).count(),
        2,
        "{text}"
    );
    assert!(text.contains("2 pushed in"), "{text}");
    let last: Vec<_> = d
        .status()
        .last_save
        .into_iter()
        .map(|o| (o.repo, o.result.to_string()))
        .collect();
    assert_eq!(
        last,
        vec![
            (
                ws.home().join("projects/a").display().to_string(),
                "pushed".to_string()
            ),
            (
                ws.home().join("projects/b").display().to_string(),
                "pushed".to_string()
            ),
        ],
        "status must show the last save"
    );
    let b_ref = server
        .ref_target("b.git", "refs/heads/wip/ws1/main")
        .unwrap();
    std::fs::write(a.join("later.txt"), "after the manual save\n").unwrap();
    server.clear_requests();
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(LONG).success(), "{}", d.report());
    // (b is only asked whether it still has its snapshot: a GET, no push.)
    let pushes: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.push && r.method == "POST")
        .collect();
    assert!(
        pushes.iter().all(|r| r.path.starts_with("/a.git")),
        "only a changed: {pushes:?}"
    );
    assert!(server_files(&server, "a", "refs/heads/wip/ws1/main").contains_key("later.txt"));
    assert_eq!(
        server
            .ref_target("b.git", "refs/heads/wip/ws1/main")
            .unwrap(),
        b_ref
    );
}

/// Over HTTPS (rustls in wsagent's own git transport): a server whose certificate comes
/// from a private CA is trusted through `SSL_CERT_FILE`, and the push lands byte-exact;
/// without the CA the push is refused on the certificate, the work stays committed, and
/// neither case puts the token anywhere.
#[test]
fn an_https_push_trusts_a_private_ca_through_ssl_cert_file_and_refuses_an_unknown_one() {
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = integration::pki::private_ca(pki.path());
    for trusted in [true, false] {
        let mut ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
        if trusted {
            ws = ws.with_env("SSL_CERT_FILE", ca.to_str().unwrap());
        }
        let server =
            GitServer::start_tls(ws.path().join("srv"), TOKEN, &cert, &key).expect("git server");
        assert!(server.url("app.git").starts_with("https://127.0.0.1:"));
        // The base commit goes to the bare repository on disk; origin is the HTTPS URL.
        server.create_bare("app.git").unwrap();
        let repo = ws.home().join("projects/app");
        std::fs::create_dir_all(&repo).unwrap();
        git(&repo, &["init", "-q"]);
        std::fs::write(repo.join("tracked.txt"), "v1\n").unwrap();
        git(&repo, &["add", "."]);
        git(&repo, &["commit", "-q", "-m", "first"]);
        let bare = server.path("app.git");
        git(&repo, &["push", "-q", bare.to_str().unwrap(), "main"]);
        git(&repo, &["remote", "add", "origin", &server.url("app.git")]);
        std::fs::write(repo.join("tracked.txt"), "v2 over tls\n").unwrap();
        cache_token(&ws.home(), TOKEN);
        let config_before = std::fs::read(repo.join(".git/config")).unwrap();

        let mut d = Daemon::start(&ws, &config(&provider_for(&server)));
        d.wait_lifecycle(Lifecycle::Ready, SHORT);
        d.signal(Signal::SIGTERM);
        let st = d.wait_exit(LONG);
        // A stop that could not push everything ends `shutdown_error`, exit 1.
        assert_eq!(
            st.code(),
            Some(if trusted { 0 } else { 1 }),
            "{}",
            d.report()
        );
        assert_eq!(
            std::fs::read(repo.join(".git/config")).unwrap(),
            config_before
        );
        let landed = server.ref_target("app.git", "refs/heads/wip/ws1/main");
        if trusted {
            assert_eq!(
                server_files(&server, "app", "refs/heads/wip/ws1/main"),
                worktree_files(&repo),
                "{}",
                d.stderr()
            );
        } else {
            assert_eq!(landed, None, "{}", d.stderr());
            let err = d.stderr();
            assert!(
                err.contains("committed") && err.to_lowercase().contains("certificate"),
                "the outcome names the certificate problem: {err}"
            );
            let requests = server.requests();
            assert!(requests.is_empty(), "no request got past TLS: {requests:?}");
        }
        assert!(!d.stderr().contains(TOKEN));
        let hits: Vec<_> = files_containing(
            ws.path(),
            TOKEN,
            &[ws.home().join(".cache/coder/github_token")],
        )
        .into_iter()
        .filter(|p| !p.starts_with(ws.path().join("srv")))
        .collect();
        assert!(hits.is_empty(), "token found in {hits:?}");
    }
}

/// As Coder stops a workspace: the Coder agent runs its `shutdown_script`
/// (`wsagent save`) only when wsagent SIGTERMs it, last in the stop sequence, after
/// wsagent's own save. That `wsagent save` reports the save already made, names the
/// pushed repository and exits 0; nothing is pushed twice.
#[test]
fn wsagent_save_in_a_shutdown_script_run_on_sigterm_reports_the_stop_save_and_exits_0() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = setup(&ws);
    let repo = dirty_repo(&server, &ws.home(), "app");
    cache_token(&ws.home(), TOKEN);
    let out = ws.path().join("shutdown-script.out");
    let code = ws.path().join("shutdown-script.code");
    server.clear_requests();
    // The stand-in for the Coder agent: on SIGTERM it runs its shutdown script, then exits.
    let agent = format!(
        r#"
[services.agent]
command = ["/bin/sh", "-c", "trap '\"$0\" --socket \"$1\" save >\"$2\" 2>&1; echo $? >\"$3\"; exit 0' TERM; echo up; while :; do sleep 0.05 & wait $!; done", "{bin}", "{socket}", "{out}", "{code}"]
stop_timeout = "20s"
"#,
        bin = integration::daemon::wsagent_bin().display(),
        socket = ws.socket().display(),
        out = out.display(),
        code = code.display(),
    );
    let mut d = Daemon::start(&ws, &config(&format!("{}{agent}", provider_for(&server))));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    wait_until(SHORT, "the agent stand-in to start", || {
        d.service_log("agent").contains("up")
    });

    d.signal(Signal::SIGTERM);
    let st = d.wait_exit(LONG);

    assert!(st.success(), "{}", d.report());
    let code = std::fs::read_to_string(&code).unwrap_or_default();
    let out = std::fs::read_to_string(&out).unwrap_or_default();
    assert_eq!(
        code.trim(),
        "0",
        "shutdown script output:\n{out}\n{}",
        d.report()
    );
    let app = std::fs::canonicalize(&repo).unwrap();
    assert!(
        out.contains("following the stop save already running: 1 repository")
            && out.contains(&format!(
                "pushed      {} -> refs/heads/wip/ws1/main",
                app.display()
            ))
            && out.contains("1 pushed in"),
        "{out}"
    );
    assert_eq!(
        server_files(&server, "app", "refs/heads/wip/ws1/main"),
        worktree_files(&repo)
    );
    assert_eq!(server.pushes(), 1, "pushed more than once");
}

/// A second `wsagent save` while a first one is pushing follows the first: both print the
/// same outcome as it lands and exit 0, and the work is pushed once.
#[test]
fn a_second_wsagent_save_during_a_running_one_joins_it() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = setup(&ws);
    let repo = dirty_repo(&server, &ws.home(), "app");
    cache_token(&ws.home(), TOKEN);
    let mut d = Daemon::start(&ws, &config(&provider_for(&server)));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    server.clear_requests();
    // Slow enough that the second request arrives while the first is pushing.
    server.set_latency(Duration::from_millis(700));

    let (first, second) = std::thread::scope(|s| {
        let first = s.spawn(|| ws.cli(["save"]));
        wait_until(SHORT, "the first save to begin pushing", || {
            !server.requests().is_empty()
        });
        let second = ws.cli(["save"]);
        (first.join().unwrap(), second)
    });

    let app = std::fs::canonicalize(&repo).unwrap();
    let pushed = format!("pushed      {} -> refs/heads/wip/ws1/main", app.display());
    let (t1, t2) = (
        String::from_utf8_lossy(&first.stdout),
        String::from_utf8_lossy(&second.stdout),
    );
    assert!(first.status.success(), "{first:?}");
    assert!(second.status.success(), "{second:?}");
    assert!(
        t1.starts_with("saving 1 repository…") && t1.contains(&pushed),
        "{t1}"
    );
    assert!(
        t2.starts_with("following the manual save already running: 1 repository")
            && t2.contains(&pushed),
        "{t2}"
    );
    server.set_latency(Duration::ZERO);
    assert_eq!(server.pushes(), 1, "pushed more than once");
    assert_eq!(
        server_files(&server, "app", "refs/heads/wip/ws1/main"),
        worktree_files(&repo)
    );
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(LONG).success(), "{}", d.report());
}

/// `wsagent save --repo` on a path with no repository fails and says so.
#[test]
fn wsagent_save_of_a_path_without_a_repository_exits_1() {
    let ws = Workspace::new();
    let mut d = Daemon::start(&ws, &config(""));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let nowhere = ws.path().join("nowhere");
    let out = d.cli(["save", "--repo", nowhere.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(&format!("no git repository at {}", nowhere.display())),
        "{out:?}"
    );
    d.signal(Signal::SIGTERM);
    d.wait_exit(LONG);
}

/// `wsagent shutdown --wait` after the stop sequence has already saved (its services are
/// still stopping) reports that save, then the end of the stop, and exits 0.
#[test]
fn shutdown_wait_joining_a_stop_that_already_saved_reports_the_save() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = setup(&ws);
    let repo = dirty_repo(&server, &ws.home(), "app");
    cache_token(&ws.home(), TOKEN);
    let release = ws.path().join("release");
    // A service that takes its time to stop: until the test lets it go.
    let slow = format!(
        r#"
[services.slow]
command = ["/bin/sh", "-c", "trap 'while [ ! -e \"$0\" ]; do sleep 0.05; done; exit 0' TERM; echo up; while :; do sleep 0.05 & wait $!; done", "{release}"]
stop_timeout = "20s"
"#,
        release = release.display()
    );
    let mut d = Daemon::start(&ws, &config(&format!("{}{slow}", provider_for(&server))));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    wait_until(SHORT, "the slow service to start", || {
        d.service_log("slow").contains("up")
    });
    d.signal(Signal::SIGTERM);
    wait_until(SHORT, "the stop's save to end", || {
        d.try_status().is_ok_and(|s| {
            s.shutdown
                .iter()
                .any(|st| st.name == "save" && st.outcome == "ok")
        })
    });

    // The client's first line (what the stop has done so far) shows it is following
    // the stop: only then may the stop go on to its end.
    let mut client = ws
        .command(integration::daemon::wsagent_bin())
        .args(["shutdown", "--wait"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(client.stdout.take().unwrap()));
    let mut text = lines.next().expect("a first line").unwrap();
    std::fs::write(&release, "").unwrap();
    for l in lines {
        text.push('\n');
        text.push_str(&l.unwrap());
    }
    let st = client.wait().unwrap();

    let app = std::fs::canonicalize(&repo).unwrap();
    assert!(st.success(), "{st:?}\n{text}");
    assert!(
        text.contains(&format!(
            "saved {}: pushed refs/heads/wip/ws1/main",
            app.display()
        )),
        "{text}"
    );
    assert!(d.wait_exit(LONG).success(), "{}", d.report());
}

/// With the whole HOME as a root, `wsagent save` saves the user's project but not the
/// dotfiles clone nor a tool's clone under `~/.cache` (save.exclude's defaults), and
/// `config show` lists those defaults.
#[test]
fn the_dotfiles_clone_and_caches_under_home_are_not_saved() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = setup(&ws);
    let _app = dirty_repo(&server, &ws.home(), "app");
    for dir in [".config/coderv2/dotfiles", ".cache/pre-commit/repo1"] {
        let d = ws.home().join(dir);
        std::fs::create_dir_all(&d).unwrap();
        git(&d, &["init", "-q"]);
        std::fs::write(d.join("f"), "unsaved\n").unwrap();
    }
    cache_token(&ws.home(), TOKEN);
    let cfg = config(&format!(
        "[save]\nroots = [\"~\"]\ndepth = 4\n{}",
        provider_for(&server)
    ));
    let mut d = Daemon::start(&ws, &cfg);
    d.wait_lifecycle(Lifecycle::Ready, SHORT);

    let out = d.cli(["save"]);

    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.starts_with("saving 1 repository…"), "{text}");
    assert!(
        !text.contains("dotfiles") && !text.contains(".cache"),
        "{text}"
    );
    let shown = d.cli([
        "config",
        "show",
        "--config",
        ws.config_path().to_str().unwrap(),
    ]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("\"~/.config/coderv2/dotfiles\"") && shown.contains("\"**/node_modules\""),
        "{shown}"
    );
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(LONG).success(), "{}", d.report());
}

/// Checkpoints while the workspace runs: unsaved work reaches the remote without any
/// stop, an interval with no change sends no request to the git server, a later change
/// is pushed at the next interval, and a daemon killed outright (SIGKILL: no stop
/// sequence) has lost nothing that was there an interval before.
#[test]
fn checkpoints_push_changes_while_running_and_an_idle_interval_sends_nothing() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = setup(&ws);
    let repo = dirty_repo(&server, &ws.home(), "app");
    cache_token(&ws.home(), TOKEN);
    let cfg = config(&format!(
        "[save]\ncheckpoint = \"300ms\"\n{}",
        provider_for(&server)
    ));
    let mut d = Daemon::start(&ws, &cfg);
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let on_server = |want: &std::collections::BTreeMap<String, Vec<u8>>| {
        server
            .ref_target("app.git", "refs/heads/wip/ws1/main")
            .is_some()
            && server_files(&server, "app", "refs/heads/wip/ws1/main") == *want
    };
    let now = worktree_files(&repo);
    wait_until(SHORT, "a checkpoint to push the work", || on_server(&now));

    // Idle: three more checkpoints find nothing to do and send nothing, and answer
    // from the dirty set without even opening the repository.
    wait_until(SHORT, "the start's check of the remotes", || {
        d.stderr().contains("checked the remotes")
    });
    server.clear_requests();
    let done = |d: &Daemon| d.stderr().matches("checkpoint done").count();
    let unopened = |d: &Daemon| d.stderr().matches("unopened=1 ").count();
    let (before, unopened_before) = (done(&d), unopened(&d));
    wait_until(SHORT, "three idle checkpoints", || done(&d) >= before + 3);
    assert_eq!(server.requests().len(), 0, "{:?}", server.requests());
    assert!(
        unopened(&d) >= unopened_before + 2,
        "idle checkpoints open the repository: {}",
        d.stderr()
    );

    std::fs::write(
        repo.join("later.txt"),
        "written after the first checkpoint\n",
    )
    .unwrap();
    let now = worktree_files(&repo);
    wait_until(SHORT, "the next checkpoint to push the change", || {
        on_server(&now)
    });

    d.signal(Signal::SIGKILL);
    d.wait_exit(SHORT);
    assert_eq!(server_files(&server, "app", "refs/heads/wip/ws1/main"), now);
    let journal = std::fs::read_to_string(ws.state_dir().join("save-journal.jsonl")).unwrap();
    assert!(journal.contains("\"reason\":\"checkpoint\""), "{journal}");
}

/// Snapshots form a history plain git can read: a second save of a branch
/// fast-forwards its snapshot ref on the remote (the first stays reachable), and each
/// snapshot put back with git alone (`git checkout SNAP^1 && git stash apply --index
/// SNAP`) gives that moment's files, staged changes and untracked files.
#[test]
fn snapshots_fast_forward_and_plain_git_puts_either_back() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = setup(&ws);
    let repo = dirty_repo(&server, &ws.home(), "app");
    std::fs::write(repo.join("staged.txt"), "staged, not committed\n").unwrap();
    git(&repo, &["add", "staged.txt"]);
    cache_token(&ws.home(), TOKEN);
    let mut d = Daemon::start(&ws, &config(&provider_for(&server)));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let snap = "refs/heads/wip/ws1/main";

    assert!(d.cli(["save"]).status.success());
    let first = server.ref_target("app.git", snap).expect("first snapshot");
    let state1 = (
        git(&repo, &["status", "--porcelain"]),
        worktree_files(&repo),
    );
    std::fs::write(repo.join("tracked.txt"), "v3, later\n").unwrap();
    std::fs::remove_file(repo.join("new file.txt")).unwrap();
    assert!(d.cli(["save"]).status.success());
    let second = server.ref_target("app.git", snap).expect("second snapshot");
    let state2 = (
        git(&repo, &["status", "--porcelain"]),
        worktree_files(&repo),
    );
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(LONG).success(), "{}", d.report());

    assert_ne!(first, second);
    let bare = server.path("app.git");
    let ancestor = std::process::Command::new("git")
        .arg("-C")
        .arg(&bare)
        .args(["merge-base", "--is-ancestor", &first, &second])
        .status()
        .unwrap();
    assert!(ancestor.success(), "the snapshot ref did not fast-forward");

    for (commit, (status, files)) in [(&first, state1), (&second, state2)] {
        let dst = ws.path().join(format!("restore-{}", &commit[..7]));
        git(
            ws.path(),
            &["clone", "-q", bare.to_str().unwrap(), dst.to_str().unwrap()],
        );
        git(&dst, &["fetch", "-q", "origin", snap]);
        git(
            &dst,
            &["checkout", "-q", "--detach", &format!("{commit}^1")],
        );
        git(&dst, &["stash", "apply", "-q", "--index", commit]);
        assert_eq!(git(&dst, &["status", "--porcelain"]), status, "{commit}");
        assert_eq!(worktree_files(&dst), files, "{commit}");
    }
}

/// Every file under `dir` (`.git` aside): its kind and mode bits, and its bytes (a
/// symlink's target), keyed by the raw path bytes.
fn tree_state(dir: &std::path::Path) -> std::collections::BTreeMap<Vec<u8>, (u32, Vec<u8>)> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.file_name().is_some_and(|n| n == ".git") {
                continue;
            }
            let md = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(dir).unwrap().as_os_str().as_bytes().to_vec();
            if md.is_dir() {
                stack.push(p);
            } else if md.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                out.insert(rel, (md.mode(), t.as_os_str().as_bytes().to_vec()));
            } else {
                out.insert(rel, (md.mode(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

/// The round trip a dying workspace needs: a repository with modified, staged, deleted,
/// untracked, executable, symlinked and non-UTF-8-named files is checkpointed, the
/// daemon is SIGKILLed, the directory deleted; `wsagent restore` (no daemon running)
/// clones it back from the remote the journal recorded and puts the snapshot back:
/// the same branch, HEAD, index, `git status --porcelain=v2`, and every file's bytes
/// and mode. `wsagent saves` lists the snapshot as pushed.
#[test]
fn a_deleted_repository_comes_back_from_its_checkpoint_byte_for_byte() {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = setup(&ws);
    let repo = dirty_repo(&server, &ws.home(), "app");
    std::fs::write(repo.join("doomed.txt"), "to be deleted\n").unwrap();
    git(&repo, &["add", "doomed.txt"]);
    git(&repo, &["commit", "-qm", "doomed"]);
    std::fs::remove_file(repo.join("doomed.txt")).unwrap();
    std::fs::write(repo.join("staged.txt"), "staged\n").unwrap();
    git(&repo, &["add", "staged.txt"]);
    std::fs::write(repo.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(repo.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("tracked.txt", repo.join("link")).unwrap();
    let odd = std::ffi::OsStr::from_bytes(b"caf\xe9 latin-1.txt");
    std::fs::write(repo.join(odd), b"bytes\xff\n").unwrap();
    let before = (
        git(&repo, &["status", "--porcelain=v2"]),
        git(&repo, &["rev-parse", "--abbrev-ref", "HEAD"]),
        git(&repo, &["rev-parse", "HEAD"]),
        git(&repo, &["ls-files", "-s"]),
        tree_state(&repo),
    );
    cache_token(&ws.home(), TOKEN);
    let cfg = config(&format!(
        "[save]\ncheckpoint = \"200ms\"\n{}",
        provider_for(&server)
    ));
    let mut d = Daemon::start(&ws, &cfg);
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    // Pushed, and journaled as pushed (the journal line follows the push).
    wait_until(SHORT, "a checkpoint to push and be journaled", || {
        server
            .ref_target("app.git", "refs/heads/wip/ws1/main")
            .is_some()
            && std::fs::read_to_string(ws.state_dir().join("save-journal.jsonl"))
                .is_ok_and(|j| j.contains("\"pushed\":true"))
    });
    d.signal(Signal::SIGKILL);
    d.wait_exit(SHORT);
    let listed = ws.cli(["saves", "--repo", repo.to_str().unwrap()]);
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        listed.contains("checkpoint")
            && listed.contains("pushed ")
            && listed.contains("refs/heads/wip/ws1/main"),
        "{listed}"
    );
    std::fs::remove_dir_all(&repo).unwrap();

    let out = ws.cli(["restore", "--repo", repo.to_str().unwrap()]);

    assert!(out.status.success(), "{out:?}");
    let after = (
        git(&repo, &["status", "--porcelain=v2"]),
        git(&repo, &["rev-parse", "--abbrev-ref", "HEAD"]),
        git(&repo, &["rev-parse", "HEAD"]),
        git(&repo, &["ls-files", "-s"]),
        tree_state(&repo),
    );
    assert_eq!(after.0, before.0, "git status --porcelain=v2");
    assert_eq!(after.1, before.1, "branch");
    assert_eq!(after.2, before.2, "HEAD");
    assert_eq!(after.3, before.3, "index");
    assert_eq!(after.4, before.4, "files");
}

/// `wsagent restore` over unsaved changes refuses and names them; `--dry-run` changes
/// nothing; an older snapshot chosen by id brings back the older content.
#[test]
fn restore_refuses_over_unsaved_work_and_brings_back_an_older_snapshot() {
    let mut ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    // The CLI's own save (`--force`) reads the system config, as in an image.
    let cfg_file = ws.config_path().display().to_string();
    ws.set_env("WSAGENT_SYSTEM_CONFIG", cfg_file);
    let server = setup(&ws);
    let repo = dirty_repo(&server, &ws.home(), "app");
    cache_token(&ws.home(), TOKEN);
    let mut d = Daemon::start(&ws, &config(&provider_for(&server)));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    assert!(d.cli(["save"]).status.success());
    let older = server
        .ref_target("app.git", "refs/heads/wip/ws1/main")
        .unwrap();
    let older_files = worktree_files(&repo);
    std::fs::write(repo.join("tracked.txt"), "v3\n").unwrap();
    assert!(d.cli(["save"]).status.success());
    std::fs::write(repo.join("tracked.txt"), "v4, not saved\n").unwrap();
    let r = repo.to_str().unwrap();

    let refused = d.cli(["restore", "--repo", r, "--snapshot", &older[..10]]);
    let dry = d.cli([
        "restore",
        "--repo",
        r,
        "--snapshot",
        &older[..10],
        "--dry-run",
    ]);

    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("unsaved changes") && err.contains("tracked.txt"),
        "{err}"
    );
    assert!(dry.status.success(), "{dry:?}");
    assert!(
        String::from_utf8_lossy(&dry.stdout).contains("tracked.txt"),
        "{dry:?}"
    );
    assert_eq!(
        std::fs::read_to_string(repo.join("tracked.txt")).unwrap(),
        "v4, not saved\n"
    );

    let forced = d.cli([
        "restore",
        "--repo",
        r,
        "--snapshot",
        &older[..10],
        "--force",
    ]);

    assert!(forced.status.success(), "{forced:?}");
    assert_eq!(worktree_files(&repo), older_files);
    // The state it replaced was saved first: on the server, the newest snapshot.
    let newest = server
        .ref_target("app.git", "refs/heads/wip/ws1/main")
        .unwrap();
    let files = server_files(&server, "app", "refs/heads/wip/ws1/main");
    assert_ne!(newest, older);
    assert_eq!(files["tracked.txt"], b"v4, not saved\n");
    d.signal(Signal::SIGTERM);
    d.wait_exit(LONG);
}

/// The user's own git commands race checkpoints every 100 ms: every `git commit`
/// succeeds, no checkpoint fails, and the repository stays sound (`git fsck --strict`).
#[test]
fn user_commits_racing_checkpoints_all_succeed_and_fsck_is_clean() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = setup(&ws);
    let repo = dirty_repo(&server, &ws.home(), "app");
    cache_token(&ws.home(), TOKEN);
    let cfg = config(&format!(
        "[save]\ncheckpoint = \"100ms\"\n{}",
        provider_for(&server)
    ));
    let mut d = Daemon::start(&ws, &cfg);
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    wait_until(SHORT, "the first checkpoint", || {
        server
            .ref_target("app.git", "refs/heads/wip/ws1/main")
            .is_some()
    });

    for i in 0..25 {
        std::fs::write(repo.join("tracked.txt"), format!("change {i}\n")).unwrap();
        std::fs::write(repo.join(format!("f{i}.txt")), "new\n").unwrap();
        git(&repo, &["add", "-A"]);
        git(&repo, &["commit", "-q", "-m", &format!("commit {i}")]);
    }
    let done = |d: &Daemon| d.stderr().matches("checkpoint done").count();
    let n = done(&d);
    wait_until(SHORT, "a checkpoint after the commits", || done(&d) > n + 1);
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(LONG).success(), "{}", d.report());

    assert_eq!(git(&repo, &["rev-list", "--count", "HEAD"]), "26");
    git(&repo, &["fsck", "--strict", "--no-progress"]);
    assert!(!d.stderr().contains("could not save"), "{}", d.stderr());
}

/// `wsagent saves --remote` in a fresh clone (a new workspace, a new volume) lists the
/// snapshots an earlier workspace pushed, and `restore --snapshot` brings one back.
#[test]
fn saves_remote_lists_an_earlier_workspaces_snapshots_and_restore_brings_one_back() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws-old");
    let server = setup(&ws);
    let repo = dirty_repo(&server, &ws.home(), "app");
    cache_token(&ws.home(), TOKEN);
    let mut d = Daemon::start(&ws, &config(&provider_for(&server)));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    assert!(d.cli(["save"]).status.success());
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(LONG).success(), "{}", d.report());
    let snap = server
        .ref_target("app.git", "refs/heads/wip/ws-old/main")
        .unwrap();
    let fresh = ws.home().join("projects/app-new");
    git(
        ws.path(),
        &[
            "clone",
            "-q",
            &server.url("app.git"),
            fresh.to_str().unwrap(),
        ],
    );

    let listed = ws.cli(["saves", "--remote", "--repo", fresh.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{listed:?}");
    assert!(
        text.contains(&snap[..12]) && text.contains("origin:refs/heads/wip/ws-old/main"),
        "{text}"
    );
    let restored = ws.cli([
        "restore",
        "--repo",
        fresh.to_str().unwrap(),
        "--snapshot",
        &snap[..12],
    ]);
    assert!(restored.status.success(), "{restored:?}");
    assert_eq!(worktree_files(&fresh), worktree_files(&repo));
}

/// In `branch` mode a checkpoint still never commits on the user's branch while they
/// work (it pushes the snapshot ref); the stop then commits on the branch.
#[test]
fn in_branch_mode_checkpoints_leave_the_branch_alone_and_the_stop_commits_on_it() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = setup(&ws);
    let repo = dirty_repo(&server, &ws.home(), "app");
    git(&repo, &["fetch", "-q", "origin"]);
    git(&repo, &["branch", "-q", "--set-upstream-to=origin/main"]);
    let head = git(&repo, &["rev-parse", "HEAD"]);
    cache_token(&ws.home(), TOKEN);
    let cfg = config(&format!(
        "[save]\nmode = \"branch\"\ncheckpoint = \"200ms\"\n{}",
        provider_for(&server)
    ));
    let mut d = Daemon::start(&ws, &cfg);
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    wait_until(SHORT, "a checkpoint to push the snapshot ref", || {
        server
            .ref_target("app.git", "refs/heads/wip/ws1/main")
            .is_some()
    });
    assert_eq!(
        git(&repo, &["rev-parse", "HEAD"]),
        head,
        "a checkpoint committed"
    );
    assert_eq!(
        server.ref_target("app.git", "refs/heads/main"),
        Some(head.clone())
    );

    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(LONG).success(), "{}", d.report());
    let after = git(&repo, &["rev-parse", "HEAD"]);
    assert_ne!(after, head, "the stop did not commit on the branch");
    assert_eq!(server.ref_target("app.git", "refs/heads/main"), Some(after));
}

/// Nice value of each thread of `pid` named `name` (from `/proc/PID/task/*/stat`).
fn thread_nices(pid: u32, name: &str) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(name) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        if let Some(n) = fields.get(16).and_then(|n| n.parse().ok()) {
            out.push((e.file_name().to_string_lossy().into_owned(), n));
        }
    }
    out
}

/// A checkpoint works at the lowest priority (nice 19) while the workspace runs; when
/// the stop arrives during it, its threads get full priority back (the stop's save is
/// that checkpoint), and the work reaches the remote.
#[test]
fn a_stop_during_a_checkpoint_takes_it_over_at_full_priority() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = setup(&ws);
    let repo = dirty_repo(&server, &ws.home(), "app");
    cache_token(&ws.home(), TOKEN);
    let cfg = config(&format!(
        "[save]\ncheckpoint = \"200ms\"\n{}",
        provider_for(&server)
    ));
    let mut d = Daemon::start(&ws, &cfg);
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    server.set_latency(Duration::from_secs(3));
    wait_until(SHORT, "a checkpoint thread at nice 19", || {
        thread_nices(d.pid(), "wsagent-checkpo")
            .iter()
            .any(|(_, n)| *n == 19)
    });

    d.signal(Signal::SIGTERM);

    wait_until(SHORT, "the checkpoint threads back at nice 0", || {
        let t = thread_nices(d.pid(), "wsagent-checkpo");
        !t.is_empty() && t.iter().all(|(_, n)| *n == 0)
    });
    assert!(d.wait_exit(LONG).success(), "{}", d.report());
    assert_eq!(
        server_files(&server, "app", "refs/heads/wip/ws1/main"),
        worktree_files(&repo)
    );
}

/// Coder workspace names are unique per owner only: alice's `dev` and bob's `dev`, both
/// working on one repository, save to their own snapshot refs; neither overwrites the
/// other's work.
#[test]
fn two_owners_workspaces_of_the_same_name_keep_their_own_snapshots() {
    let alice = Workspace::new()
        .with_env("CODER_WORKSPACE_NAME", "dev")
        .with_env("CODER_WORKSPACE_OWNER_NAME", "alice");
    let server = setup(&alice);
    let a_repo = dirty_repo(&server, &alice.home(), "app");
    cache_token(&alice.home(), TOKEN);
    let bob = Workspace::new()
        .with_env("CODER_WORKSPACE_NAME", "dev")
        .with_env("CODER_WORKSPACE_OWNER_NAME", "bob");
    let b_repo = bob.home().join("projects/app");
    std::fs::create_dir_all(b_repo.parent().unwrap()).unwrap();
    git(
        bob.path(),
        &[
            "clone",
            "-q",
            &server.url("app.git"),
            b_repo.to_str().unwrap(),
        ],
    );
    std::fs::write(b_repo.join("bob.txt"), "bob's work\n").unwrap();
    cache_token(&bob.home(), TOKEN);

    for ws in [&alice, &bob] {
        let mut d = Daemon::start(ws, &config(&provider_for(&server)));
        d.wait_lifecycle(Lifecycle::Ready, SHORT);
        d.signal(Signal::SIGTERM);
        assert!(d.wait_exit(LONG).success(), "{}", d.report());
    }

    assert_eq!(
        server_files(&server, "app", "refs/heads/wip/alice/dev/main"),
        worktree_files(&a_repo)
    );
    assert_eq!(
        server_files(&server, "app", "refs/heads/wip/bob/dev/main"),
        worktree_files(&b_repo)
    );
}

/// `wsagent save --dry-run` shows, per repository, the files that would go (as `git
/// status --short` names them), the remote and the ref, and changes nothing.
#[test]
fn save_dry_run_lists_the_files_the_remote_and_the_ref() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let server = setup(&ws);
    let repo = dirty_repo(&server, &ws.home(), "app");
    std::fs::write(repo.join("staged.txt"), "staged\n").unwrap();
    git(&repo, &["add", "staged.txt"]);
    cache_token(&ws.home(), TOKEN);
    let mut d = Daemon::start(&ws, &config(&provider_for(&server)));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    wait_until(SHORT, "the start's check of the remotes", || {
        d.stderr().contains("checked the remotes")
    });
    server.clear_requests();

    let out = d.cli(["save", "--dry-run"]);

    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let app = std::fs::canonicalize(&repo).unwrap();
    assert!(
        text.contains(&format!(
            "would save  {} -> refs/heads/wip/ws1/main on {}",
            app.display(),
            server.url("app.git")
        )),
        "{text}"
    );
    for f in [" M tracked.txt", "?? new file.txt", "A  staged.txt"] {
        assert!(
            text.contains(&format!("              {f}\n")),
            "{f:?} in {text}"
        );
    }
    assert!(
        server.requests().is_empty(),
        "a dry run sent {:?}",
        server.requests()
    );
    assert_eq!(
        server.ref_target("app.git", "refs/heads/wip/ws1/main"),
        None
    );
    d.signal(Signal::SIGTERM);
    d.wait_exit(LONG);
}
