//! The control plane, end to end: the real daemon reporting to the fake coderd (a real
//! HTTP server that follows Coder's agent API reference).

use std::time::{Duration, Instant};

use agent_proto::local::Lifecycle;
use integration::daemon::{Daemon, Signal, Workspace};
use integration::fake_coderd::FakeCoderd;
use integration::gitserver::GitServer;
use integration::wait_until;

use crate::repos::{
    cache_token, dirty_repo, files_containing, provider_for, server_files, worktree_files,
};
use crate::support::{LONG, SHORT, config};

fn workspace(fake: &FakeCoderd) -> Workspace {
    Workspace::new()
        .with_env("CODER_AGENT_URL", fake.url())
        .with_env("CODER_AGENT_TOKEN", fake.token())
        .with_env("CODER_WORKSPACE_NAME", "ws1")
}

fn outputs(fake: &FakeCoderd) -> Vec<String> {
    fake.logs().into_iter().map(|l| l.output).collect()
}

/// Assert `wanted` appear in this order among `lines` (other lines may sit between).
fn assert_in_order(lines: &[String], wanted: &[&str]) {
    let mut at = 0;
    for w in wanted {
        match lines[at..].iter().position(|l| l.contains(w)) {
            Some(i) => at += i + 1,
            None => panic!(
                "{w:?} missing (in order) from the dashboard lines:\n{}",
                lines.join("\n")
            ),
        }
    }
}

/// Startup and stop lines reach the dashboard in order under wsagent's own log source,
/// ending with `off`; the agent token is in no log line and no file.
#[test]
fn startup_and_stop_lines_reach_the_dashboard_in_order() {
    let rt = integration::runtime();
    let fake = rt.block_on(FakeCoderd::start());
    let ws = workspace(&fake);
    let mut d = Daemon::start(
        &ws,
        &config("[services.s]\ncommand = [\"sleep\", \"1000\"]\n"),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(SHORT).success(), "{}", d.report());
    let sources = fake.log_sources();
    assert_eq!(sources.len(), 1, "{sources:?}");
    assert_eq!(sources[0].display_name, "wsagent");
    assert!(fake.logs().iter().all(|l| l.log_source_id == sources[0].id));
    assert_in_order(
        &outputs(&fake),
        &[
            "lifecycle: starting",
            "service s: running",
            "lifecycle: ready",
            "lifecycle: shutting_down",
            "shutdown save:",
            "shutdown services: ok",
            "lifecycle: off",
        ],
    );
    let token = fake.token();
    assert!(!d.stderr().contains(&token));
    assert!(files_containing(ws.path(), &token, &[]).is_empty());
}

/// Coder down at start: startup is not held up, and the lines arrive once it is up.
#[test]
fn control_plane_down_at_start_does_not_block_and_lines_arrive_later() {
    let rt = integration::runtime();
    let fake = rt.block_on(FakeCoderd::start_down());
    let ws = workspace(&fake);
    let t = Instant::now();
    let mut d = Daemon::start(
        &ws,
        &config("[services.s]\ncommand = [\"sleep\", \"1000\"]\n"),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "startup waited for coder: {:?}",
        t.elapsed()
    );
    rt.block_on(fake.set_down(false));
    wait_until(LONG, "the ready line in the dashboard", || {
        outputs(&fake)
            .iter()
            .any(|l| l.contains("lifecycle: ready"))
    });
    assert_in_order(
        &outputs(&fake),
        &["lifecycle: starting", "lifecycle: ready"],
    );
}

/// A control plane too slow to answer does not stretch the stop past its budget.
#[test]
fn slow_control_plane_does_not_stretch_the_stop() {
    let rt = integration::runtime();
    let fake = rt.block_on(FakeCoderd::start());
    let ws = workspace(&fake);
    let mut d = Daemon::start(
        &ws,
        &config("[shutdown]\nbudget = \"3s\"\n[services.s]\ncommand = [\"sleep\", \"1000\"]\n"),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    fake.set_delay(Duration::from_secs(60));
    let t = Instant::now();
    d.signal(Signal::SIGTERM);
    let st = d.wait_exit(SHORT);
    assert!(
        t.elapsed() < Duration::from_millis(3500),
        "stop took {:?}",
        t.elapsed()
    );
    assert!(st.success(), "{}", d.report());
}

/// A token rotated in Coder reaches the cache file (0600) and the stop-time push uses it,
/// although the cache held a stale one.
#[test]
fn rotated_token_reaches_the_cache_and_the_stop_push_uses_it() {
    use std::os::unix::fs::PermissionsExt;
    let rt = integration::runtime();
    let fake = rt.block_on(FakeCoderd::start());
    let fresh = "ghs_fresh_9z8y7x6w5v4u";
    let ws = workspace(&fake);
    let server = GitServer::start(ws.path().join("srv"), fresh).unwrap();
    let repo = dirty_repo(&server, &ws.home(), "app");
    cache_token(&ws.home(), "ghs_stale_0000000000");
    fake.set_external_token("github", Some(fresh));
    let mut d = Daemon::start(&ws, &config(&provider_for(&server)));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let cache = ws.home().join(".cache/coder/github_token");
    wait_until(SHORT, "the fresh token in the cache", || {
        std::fs::read_to_string(&cache).is_ok_and(|t| t.trim() == fresh)
    });
    assert_eq!(
        std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777,
        0o600
    );
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(LONG).success(), "{}", d.report());
    assert_eq!(
        server_files(&server, "app", "refs/heads/wip/ws1/main"),
        worktree_files(&repo)
    );
    assert!(!d.stderr().contains(fresh));
    let hits: Vec<_> = files_containing(ws.path(), fresh, std::slice::from_ref(&cache))
        .into_iter()
        .filter(|p| !p.starts_with(ws.path().join("srv")))
        .collect();
    assert!(hits.is_empty(), "token found in {hits:?}");
}

/// When coderd refuses the agent token during the stop (401 to everything, as in a
/// stop or delete build), the save still pushes with the cached git token at once, the
/// refusal is logged once, nothing retries, and the stop succeeds.
#[test]
fn a_stop_with_the_agent_token_refused_pushes_with_the_cached_token_quickly() {
    let rt = integration::runtime();
    let fake = rt.block_on(FakeCoderd::start());
    let cached = "ghs_cached_only_1a2b3c4d";
    let ws = workspace(&fake);
    let server = GitServer::start(ws.path().join("srv"), cached).unwrap();
    let repo = dirty_repo(&server, &ws.home(), "app");
    cache_token(&ws.home(), cached);
    let mut d = Daemon::start(
        &ws,
        &config(&format!(
            "{}\n[control_plane]\napp_status_slug = \"workspace\"\n",
            provider_for(&server)
        )),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    wait_until(SHORT, "the ready line in the dashboard", || {
        outputs(&fake)
            .iter()
            .any(|l| l.contains("lifecycle: ready"))
    });
    fake.revoke_agent_tokens();
    let before = fake.requests().len();
    let t = Instant::now();
    d.signal(Signal::SIGTERM);
    let st = d.wait_exit(LONG);
    let took = t.elapsed();
    assert!(st.success(), "{}", d.report());
    assert!(took < Duration::from_secs(5), "stop took {took:?}");
    assert_eq!(
        server_files(&server, "app", "refs/heads/wip/ws1/main"),
        worktree_files(&repo)
    );
    let err = d.stderr();
    assert_eq!(
        err.matches(agent::control::client::REFUSED_AT_STOP).count(),
        1,
        "{err}"
    );
    // One refused call per caller that was already under way at most (log shipping,
    // the save's token fetch): no retries after the refusal.
    let after = fake.requests()[before..].to_vec();
    assert!(
        !after.is_empty() && after.len() <= 2,
        "{:?}",
        after
            .iter()
            .map(|r| (&r.path, r.status))
            .collect::<Vec<_>>()
    );
    assert!(after.iter().all(|r| r.status == 401));
    assert!(!err.contains("git token not refreshed"), "{err}");
    assert!(!err.contains(cached));
}

/// Restarting the `coder-agent` service makes Coder run its stop and start scripts
/// again: a reload that leaves the service unchanged (while its dependency, another
/// service and other sections change) never restarts it; changing it does.
#[test]
fn a_reload_that_leaves_coder_agent_unchanged_never_restarts_it() {
    let rt = integration::runtime();
    let fake = rt.block_on(FakeCoderd::start());
    let starts = tempfile::NamedTempFile::new().unwrap();
    let starts_path = starts.path().to_path_buf();
    let ws = workspace(&fake).with_env(
        "CODER_AGENT_INIT_SCRIPT",
        format!("echo started >> {}; exec sleep 1000", starts_path.display()),
    );
    // The default coder-agent service, after a dependency of our own.
    let cfg = |dep: &str, other: &str, more: &str| {
        format!(
            "[services.dockerd]\nenabled = false\n[services.code-server]\nenabled = false\n\
             [services.coder-agent]\ndepends_on = [\"dep\"]\n{more}\
             [services.dep]\ncommand = [\"sleep\", \"{dep}\"]\n\
             [services.other]\ncommand = [\"sleep\", \"{other}\"]\n"
        )
    };
    let mut d = Daemon::start(&ws, &cfg("1000", "1000", ""));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let agent_pid = d.service("coder-agent").pid.expect("coder-agent runs");
    let start_count = || {
        std::fs::read_to_string(&starts_path)
            .unwrap_or_default()
            .lines()
            .count()
    };
    wait_until(SHORT, "the init script's first start", || {
        start_count() == 1
    });

    // Its dependency and another service change, a service is added, other sections
    // change: two reloads, by signal and by editing the file.
    let dep = d.service("dep").pid.unwrap();
    ws.write_config(&format!(
        "{}[services.new]\ncommand = [\"sleep\", \"1000\"]\n[save]\ndepth = 2\n[control_plane]\nlog_batch_interval = \"200ms\"\n",
        cfg("2000", "2000", "")
    ));
    d.signal(Signal::SIGHUP);
    d.wait_service("dep", |s| s.pid.is_some() && s.pid != Some(dep), SHORT);
    wait_until(SHORT, "the new service", || d.service("new").pid.is_some());
    let other = d.service("other").pid.unwrap();
    ws.write_config(&cfg("2000", "3000", ""));
    d.wait_service("other", |s| s.pid.is_some() && s.pid != Some(other), SHORT);
    wait_until(SHORT, "two reloads logged", || {
        d.stderr().matches("configuration reloaded").count() >= 2
    });
    assert_eq!(d.service("coder-agent").pid, Some(agent_pid));
    assert_eq!(start_count(), 1, "the init script ran again");
    assert!(
        !d.stderr().contains("restarted coder-agent"),
        "{}",
        d.stderr()
    );

    // Changing the service itself does restart it (the check above can see one).
    ws.write_config(&cfg("2000", "3000", "stop_timeout = \"5s\"\n"));
    d.signal(Signal::SIGHUP);
    d.wait_service(
        "coder-agent",
        |s| s.pid.is_some() && s.pid != Some(agent_pid),
        SHORT,
    );
    wait_until(SHORT, "the init script's second start", || {
        start_count() == 2
    });
}
