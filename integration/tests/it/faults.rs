//! The fault matrix: the stop and the save under signals at bad moments, a full disk,
//! a failing control plane, a failing git server and misbehaving children. Every test
//! asserts that nothing is lost (the work reached the server, or at least a local commit
//! exists) and that the token is nowhere (HOME, state, stdout, stderr) but its 0600
//! cache. Faults already pinned elsewhere are not repeated here: a 10× too slow server
//! (`save`), a control plane slower than the budget for the stop itself (`control`), a
//! service that ignores SIGTERM (`supervision`), SIGKILL mid-push (`save`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent_proto::local::Lifecycle;
use integration::daemon::{Daemon, Signal, Workspace};
use integration::fake_coderd::{FakeCoderd, Fault};
use integration::gitserver::GitServer;
use integration::real::require_root;
use integration::wait_until;

use crate::repos::{
    cache_token, dirty_repo, files_containing, git, provider_for, server_files, worktree_files,
};
use crate::support::{LONG, SHORT, config};

const TOKEN: &str = "ghs_fault_7c6b5a4f3e2d1a";
const WIP: &str = "refs/heads/wip/ws1/main";

fn workspace() -> Workspace {
    Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1")
}

/// A workspace with one dirty repository `app` on a fresh server and the token cached.
fn setup() -> (Workspace, GitServer, PathBuf) {
    let ws = workspace();
    let server = GitServer::start(ws.path().join("srv"), TOKEN).expect("git server");
    let repo = dirty_repo(&server, &ws.home(), "app");
    cache_token(&ws.home(), TOKEN);
    (ws, server, repo)
}

/// The server holds exactly the worktree's bytes under the snapshot ref.
#[track_caller]
fn assert_pushed(server: &GitServer, repo: &Path) {
    assert_eq!(server_files(server, "app", WIP), worktree_files(repo));
}

/// The snapshot commit exists locally, holding the worktree's bytes.
#[track_caller]
fn assert_committed_locally(repo: &Path) {
    let refs = git(
        repo,
        &["for-each-ref", "--format=%(refname)", "refs/heads/wip"],
    );
    assert_eq!(refs, WIP, "no local snapshot commit in {}", repo.display());
    let files = git(repo, &["ls-tree", "-r", "--name-only", WIP]);
    assert!(files.contains("new file.txt"), "{files}");
}

/// `token` is in no file of the workspace (the server's own files and the 0600 cache
/// aside) and in none of the daemon's output.
#[track_caller]
fn assert_no_token(ws: &Workspace, d: &Daemon, token: &str) {
    assert!(!d.stderr().contains(token), "token in stderr");
    assert!(!d.stdout().contains(token), "token in stdout");
    let cache = ws.home().join(".cache/coder/github_token");
    let hits: Vec<_> = files_containing(ws.path(), token, &[cache])
        .into_iter()
        .filter(|p| !p.starts_with(ws.path().join("srv")))
        .collect();
    assert!(hits.is_empty(), "token found in {hits:?}");
}

/// The journal's lines, each parsed (a truncated or corrupt line fails the test).
fn journal(state_dir: &Path) -> Vec<agent_proto::save::RepoOutcome> {
    let Ok(text) = std::fs::read_to_string(state_dir.join("save-journal.jsonl")) else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| !l.contains("\"started\""))
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("corrupt journal line {l:?}: {e}"))
        })
        .collect()
}

fn wait_save_started(ws: &Workspace) {
    wait_until(SHORT, "the journal's started line", || {
        std::fs::read_to_string(ws.state_dir().join("save-journal.jsonl"))
            .is_ok_and(|j| j.contains("\"started\""))
    });
}

// --- signals at bad moments ------------------------------------------------------------

/// SIGTERM while a service's health check still fails (lifecycle `starting`): the stop
/// sequence runs anyway, saves, and ends inside its budget.
#[test]
fn sigterm_before_ready_still_saves_and_exits_within_the_budget() {
    let (ws, server, repo) = setup();
    let mut d = Daemon::start(
        &ws,
        &config(&format!(
            "[shutdown]\nbudget = \"5s\"\n{}\n[services.slow]\ncommand = [\"sleep\", \"1000\"]\nstop_timeout = \"1s\"\n[services.slow.health]\nkind = \"exec\"\ncommand = [\"false\"]\ninterval = \"100ms\"\n",
            provider_for(&server)
        )),
    );
    d.wait_lifecycle(Lifecycle::Starting, SHORT);
    let t = Instant::now();
    d.signal(Signal::SIGTERM);
    let st = d.wait_exit(LONG);
    let took = t.elapsed();
    assert!(took < Duration::from_millis(5500), "stop took {took:?}");
    assert!(st.success(), "{}", d.report());
    assert_pushed(&server, &repo);
    assert_no_token(&ws, &d, TOKEN);
}

/// A second SIGTERM in the middle of the save neither cuts it nor starts another: one
/// push, and a clean exit.
#[test]
fn a_second_sigterm_during_the_save_neither_cuts_nor_repeats_it() {
    let (ws, server, repo) = setup();
    let mut d = Daemon::start(&ws, &config(&provider_for(&server)));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    server.clear_requests();
    server.set_latency(Duration::from_millis(300));
    d.signal(Signal::SIGTERM);
    wait_save_started(&ws);
    d.signal(Signal::SIGTERM);
    let st = d.wait_exit(LONG);
    assert!(st.success(), "{}", d.report());
    assert_pushed(&server, &repo);
    assert_eq!(server.pushes(), 1, "{:?}", server.requests());
    assert_no_token(&ws, &d, TOKEN);
}

/// `wsagent shutdown --wait` (the preStop hook) racing SIGTERM: one stop sequence, one
/// save, the daemon exits cleanly and the client ends with a clear answer.
#[test]
fn shutdown_wait_racing_sigterm_runs_one_stop_and_saves_once() {
    let (ws, server, repo) = setup();
    let mut d = Daemon::start(&ws, &config(&provider_for(&server)));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    server.clear_requests();
    server.set_latency(Duration::from_millis(100));
    let out = std::thread::scope(|s| {
        let client = s.spawn(|| ws.cli(["shutdown", "--wait"]));
        d.signal(Signal::SIGTERM);
        client.join().unwrap()
    });
    let st = d.wait_exit(LONG);
    assert!(st.success(), "{}", d.report());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || !err.trim().is_empty(),
        "a failing client must say why: {out:?}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        d.stderr().matches("stop sequence started").count(),
        1,
        "{}",
        d.stderr()
    );
    assert_pushed(&server, &repo);
    assert_eq!(server.pushes(), 1, "{:?}", server.requests());
    assert_no_token(&ws, &d, TOKEN);
}

/// SIGUSR1 while `wsagent save` is pushing: the saves run one at a time, the daemon keeps
/// running, the work is on the server.
#[test]
fn sigusr1_during_a_manual_save_waits_its_turn_and_the_daemon_keeps_running() {
    let (ws, server, repo) = setup();
    let mut d = Daemon::start(&ws, &config(&provider_for(&server)));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    server.set_latency(Duration::from_millis(300));
    let out = std::thread::scope(|s| {
        let client = s.spawn(|| ws.cli(["save"]));
        wait_save_started(&ws);
        d.signal(Signal::SIGUSR1);
        client.join().unwrap()
    });
    assert!(out.status.success(), "{out:?}");
    wait_until(SHORT, "SIGUSR1 to be logged", || {
        d.stderr().contains("SIGUSR1 received")
    });
    // The second save finds nothing new (or saves it again): either way it ends, and the
    // daemon is still up.
    wait_until(SHORT, "the SIGUSR1 save to end", || {
        !journal(&ws.state_dir()).is_empty()
            && d.try_status()
                .is_ok_and(|s| s.lifecycle == Lifecycle::Ready)
    });
    assert!(d.try_exit().is_none(), "{}", d.report());
    assert!(!d.stderr().contains("panicked"), "{}", d.stderr());
    assert_pushed(&server, &repo);
    server.set_latency(Duration::ZERO);
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(LONG).success(), "{}", d.report());
    assert_no_token(&ws, &d, TOKEN);
}

// --- a full disk ---------------------------------------------------------------------

/// The state directory and the token cache on full 64 KiB tmpfs mounts (a private mount
/// namespace), while coderd hands out a rotated token: the cache write fails with an error
/// naming the file, the cache keeps its old token whole, no temp file is left behind, the
/// journal has no truncated line, and the save still pushes with the fresh token.
#[test]
fn a_full_disk_for_state_and_token_cache_gives_clear_errors_and_the_save_still_pushes() {
    if !require_root("mounting a tmpfs in a private mount namespace needs root") {
        return;
    }
    let rt = integration::runtime();
    let fake = rt.block_on(FakeCoderd::start());
    let ws = workspace()
        .with_env("CODER_AGENT_URL", fake.url())
        .with_env("CODER_AGENT_TOKEN", fake.token());
    let server = GitServer::start(ws.path().join("srv"), TOKEN).expect("git server");
    let repo = dirty_repo(&server, &ws.home(), "app");
    let stale = "ghs_stale_000000000000";
    fake.set_external_token("github", Some(TOKEN));
    let cache_dir = ws.home().join(".cache/coder");
    std::fs::create_dir_all(&cache_dir).unwrap();
    let stale_file = ws.path().join("stale-token");
    std::fs::write(&stale_file, format!("{stale}\n")).unwrap();
    let script = r#"set -e
S=$1 C=$2 T=$3; shift 3
mount -t tmpfs -o size=64k tmpfs "$S"
mount -t tmpfs -o size=64k tmpfs "$C"
cp "$T" "$C/github_token"; chmod 600 "$C/github_token"
dd if=/dev/zero of="$S/.fill" bs=1k 2>/dev/null || true
dd if=/dev/zero of="$C/.fill" bs=1k 2>/dev/null || true
exec "$@""#;
    let wrapper: Vec<String> = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(
        [ws.state_dir(), cache_dir.clone(), stale_file]
            .iter()
            .map(|p| p.display().to_string()),
    )
    .collect();
    let mut d = Daemon::start_wrapped(&ws, &config(&provider_for(&server)), &wrapper);
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    // What the daemon sees, through its own root.
    let inside = |p: &Path| PathBuf::from(format!("/proc/{}/root{}", d.pid(), p.display()));
    wait_until(SHORT, "the failed cache write to be logged", || {
        let e = d.stderr().to_lowercase();
        e.contains("no space") && e.contains("github_token")
    });
    let out = d.cli(["save"]);
    assert!(out.status.success(), "{out:?}\n{}", d.report());
    assert_pushed(&server, &repo);
    let cached = std::fs::read_to_string(inside(&cache_dir.join("github_token"))).unwrap();
    assert!(
        cached.trim() == stale || cached.trim() == TOKEN,
        "truncated cache: {cached:?}"
    );
    let mut names: Vec<String> = std::fs::read_dir(inside(&cache_dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [".fill", "github_token"],
        "left behind in the cache dir"
    );
    journal(&inside(&ws.state_dir()));
    d.signal(Signal::SIGTERM);
    d.wait_exit(LONG);
    assert_no_token(&ws, &d, TOKEN);
    assert!(!d.stderr().contains(&fake.token()));
}

// --- control-plane faults during the stop ------------------------------------------------

/// coderd down, answering 503, an HTML 502, 413, or slower than the whole budget while
/// the workspace stops: the save pushes and the daemon exits 0 inside its budget.
#[test]
fn control_plane_faults_during_the_stop_leave_the_save_and_the_exit_alone() {
    let rt = integration::runtime();
    let cases: [(&str, Option<Fault>); 5] = [
        ("down", None),
        ("503", Some(Fault::Status(503))),
        ("html 502", Some(Fault::Html502)),
        ("413", Some(Fault::Status(413))),
        ("slow", None),
    ];
    for (name, fault) in cases {
        let fake = rt.block_on(FakeCoderd::start());
        let ws = workspace()
            .with_env("CODER_AGENT_URL", fake.url())
            .with_env("CODER_AGENT_TOKEN", fake.token());
        let server = GitServer::start(ws.path().join("srv"), TOKEN).expect("git server");
        let repo = dirty_repo(&server, &ws.home(), "app");
        cache_token(&ws.home(), TOKEN);
        let mut d = Daemon::start(
            &ws,
            &config(&format!(
                "[shutdown]\nbudget = \"8s\"\n{}",
                provider_for(&server)
            )),
        );
        d.wait_lifecycle(Lifecycle::Ready, SHORT);
        match name {
            "down" => rt.block_on(fake.set_down(true)),
            "slow" => fake.set_delay(Duration::from_secs(60)),
            _ => fake.set_fault(fault),
        }
        let t = Instant::now();
        d.signal(Signal::SIGTERM);
        let st = d.wait_exit(LONG);
        let took = t.elapsed();
        assert!(
            took < Duration::from_millis(8500),
            "{name}: stop took {took:?}"
        );
        assert!(st.success(), "{name}: {}", d.report());
        assert_pushed(&server, &repo);
        assert_no_token(&ws, &d, TOKEN);
        assert_no_token(&ws, &d, &fake.token());
    }
}

// --- git server faults -------------------------------------------------------------------

/// The git server refusing connections, dropping the connection in the middle of the
/// pack, or rejecting the push: the work is committed locally, the journal says it was
/// not pushed, the stop fails (exit 1) inside its budget, and `.git/config` is untouched.
#[test]
fn git_server_faults_leave_a_local_commit_and_a_failed_stop_within_budget() {
    for case in ["refused", "reset mid-pack", "rejected"] {
        let (ws, server, repo) = setup();
        let config_before = std::fs::read(repo.join(".git/config")).unwrap();
        let cfg = config(&format!(
            "[shutdown]\nbudget = \"5s\"\n{}",
            provider_for(&server)
        ));
        let bare = server.path("app.git");
        let mut d = Daemon::start(&ws, &cfg);
        d.wait_lifecycle(Lifecycle::Ready, SHORT);
        let server = match case {
            "refused" => {
                drop(server);
                None
            }
            "reset mid-pack" => {
                server.set_drop_push_after(Some(1));
                Some(server)
            }
            _ => {
                server.set_reject(true);
                Some(server)
            }
        };
        let t = Instant::now();
        d.signal(Signal::SIGTERM);
        let st = d.wait_exit(LONG);
        let took = t.elapsed();
        assert!(
            took < Duration::from_millis(5500),
            "{case}: stop took {took:?}"
        );
        assert_eq!(st.code(), Some(1), "{case}: {}", d.report());
        assert_committed_locally(&repo);
        let on_server = git2::Repository::open_bare(&bare)
            .unwrap()
            .find_reference(WIP)
            .is_ok();
        assert!(!on_server, "{case}: the ref reached the server");
        let last = journal(&ws.state_dir());
        assert!(
            last.last().is_some_and(|o| !o.pushed),
            "{case}: journal {last:?}"
        );
        assert_eq!(
            std::fs::read(repo.join(".git/config")).unwrap(),
            config_before,
            "{case}"
        );
        assert_no_token(&ws, &d, TOKEN);
        drop(server);
    }
}

// --- misbehaving children ----------------------------------------------------------------

/// A service that ignores SIGTERM, one that forks a small herd of children, and one that
/// closes its stdout and stderr at once: the daemon runs them, the stop still saves and
/// ends inside its budget, and nothing they started survives.
#[test]
fn misbehaving_children_do_not_hold_up_the_save_or_the_stop() {
    let (ws, server, repo) = setup();
    let mut d = Daemon::start(
        &ws,
        &config(&format!(
            r#"[shutdown]
budget = "6s"
{}
[services.stubborn]
shell = "trap '' TERM; while :; do sleep 0.1; done"
stop_timeout = "1s"
[services.herd]
shell = "i=0; while [ $i -lt 40 ]; do sleep 1000 & i=$((i+1)); done; wait"
[services.mute]
shell = "exec >&- 2>&-; exec sleep 1000"
"#,
            provider_for(&server)
        )),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    wait_until(SHORT, "the herd of 40 sleeps", || {
        d.descendants().iter().filter(|p| p.comm == "sleep").count() >= 41
    });
    assert_eq!(
        d.service("mute").state,
        agent_proto::local::ServiceState::Running
    );
    let t = Instant::now();
    d.signal(Signal::SIGTERM);
    let st = d.wait_exit(LONG);
    let took = t.elapsed();
    assert!(took < Duration::from_millis(6500), "stop took {took:?}");
    assert!(st.success(), "{}", d.report());
    assert_pushed(&server, &repo);
    wait_until(SHORT, "every child gone", || d.leftovers().is_empty());
    assert_no_token(&ws, &d, TOKEN);
}

/// A service printing 64 MB without a newline: the daemon's RSS stays bounded and the
/// service's log files stay within their rotation bound.
#[test]
fn megabytes_without_newlines_keep_the_daemon_small_and_the_log_bounded() {
    let ws = workspace();
    let done = ws.path().join("printed");
    let max_bytes = 262_144u64;
    let mut d = Daemon::start(
        &ws,
        &config(&format!(
            "[logs]\nmax_bytes = {max_bytes}\nkeep = 2\n[services.noisy]\nshell = \"head -c 64000000 /dev/zero | tr '\\\\000' x; touch {}; exec sleep 1000\"\n",
            done.display()
        )),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let rss_kib = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    };
    let mut peak = 0;
    wait_until(LONG, "the 64 MB to be printed", || {
        peak = peak.max(rss_kib(d.pid()));
        done.exists()
    });
    peak = peak.max(rss_kib(d.pid()));
    assert!(peak < 64 * 1024, "daemon RSS peaked at {peak} KiB");
    let logs = ws.state_dir().join("logs");
    let total: u64 = std::fs::read_dir(&logs)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("noisy.log"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    // The current file and `keep` old ones, each at most max_bytes plus one cut line.
    let bound = 3 * (max_bytes + 17 * 1024);
    assert!(
        total <= bound,
        "service logs hold {total} bytes (bound {bound})"
    );
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(LONG).success(), "{}", d.report());
}
