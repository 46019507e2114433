//! Supervision as a user sees it: restart policy and backoff, dependencies and health
//! checks, the stop order and its budget, reload.

use std::time::{Duration, Instant};

use agent_proto::local::{Health, Lifecycle, ServiceState};
use integration::daemon::{Daemon, Signal, Workspace};
use integration::net::free_port;
use integration::wait_until;

use crate::support::{LONG, SHORT, config, cpu_time, http_server};

/// A service that crashes at once is restarted with growing delays, ends `failed` after
/// `max_failures`, and the daemon does not busy-loop meanwhile.
#[test]
fn crash_loop_backs_off_then_fails_without_burning_cpu() {
    let ws = Workspace::new();
    let mut d = Daemon::start(
        &ws,
        &config(
            r#"
[services.crashy]
shell = "echo boom; exit 3"
[services.crashy.backoff]
initial = "100ms"
max = "800ms"
max_failures = 6
window = "1m"
"#,
        ),
    );
    let cpu_before = cpu_time(d.pid());
    let started = Instant::now();
    let failed = d.wait_service("crashy", |s| s.state == ServiceState::Failed, LONG);
    let took = started.elapsed();
    assert_eq!(failed.last_exit.as_ref().and_then(|e| e.code), Some(3));
    assert_eq!(failed.restarts, 5, "{failed:?}");
    assert!(
        failed
            .message
            .as_deref()
            .unwrap_or("")
            .contains("gave up after 6 failures"),
        "{failed:?}"
    );
    // 100 + 200 + 400 + 800 + 800 ms of backoff (±20 %): the delays really grew.
    assert!(
        took >= Duration::from_millis(1700),
        "restarted too fast: {took:?}"
    );
    let cpu = cpu_time(d.pid()).saturating_sub(cpu_before);
    assert!(
        cpu < Duration::from_millis(500),
        "daemon used {cpu:?} of CPU supervising a crash loop for {took:?}"
    );
    // A failed service stays failed until started by hand; then it runs again.
    let out = d.cli(["start", "crashy", "--no-wait"]);
    assert!(out.status.success(), "{out:?}");
    d.wait_service("crashy", |s| s.restarts > 5, SHORT);
    assert!(d.service_log("crashy").matches("boom").count() >= 7);
}

/// `depends_on` with an http health check: B starts only once A answers.
#[test]
fn dependent_starts_only_after_its_dependency_is_healthy() {
    let ws = Workspace::new();
    let port = free_port();
    let marker = ws.path().join("b-saw");
    let mut d = Daemon::start(
        &ws,
        &config(&format!(
            r#"
[services.a]
shell = "sleep 0.7; exec python3 -m http.server --bind 127.0.0.1 {port}"
[services.a.health]
kind = "http"
url = "http://127.0.0.1:{port}/"
interval = "200ms"

[services.b]
depends_on = ["a"]
shell = "python3 -c 'import urllib.request; urllib.request.urlopen(\"http://127.0.0.1:{port}/\")' && echo up > {marker}; exec sleep 1000"
"#,
            marker = marker.display()
        )),
    );
    let st = d.wait_lifecycle(Lifecycle::Ready, LONG);
    let b = st.services.iter().find(|s| s.name == "b").unwrap();
    assert_eq!(b.state, ServiceState::Running);
    wait_until(SHORT, "b to write its marker", || marker.exists());
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap().trim(),
        "up",
        "b started before a was healthy"
    );
}

/// `unix-http` checks GET a path over a unix socket (as for dockerd's `/_ping`); `tcp`
/// checks connect; `exec` checks exit 0.
#[test]
fn unix_http_tcp_and_exec_checks_decide_health() {
    let ws = Workspace::new();
    let sock = ws.path().join("api.sock");
    let port = free_port();
    let flag = ws.path().join("healthy-flag");
    let unix_server = format!(
        "import http.server, socketserver, os\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def do_GET(self):\n\
         \x20       code = 200 if self.path == '/_ping' else 404\n\
         \x20       self.send_response(code); self.end_headers(); self.wfile.write(b'OK')\n\
         \x20   def address_string(self): return 'unix'\n\
         class S(socketserver.UnixStreamServer):\n\
         \x20   def get_request(self):\n\
         \x20       r, _ = super().get_request(); return r, ('unix', 0)\n\
         S('{}', H).serve_forever()\n",
        sock.display()
    );
    let script = ws.path().join("unix_server.py");
    std::fs::write(&script, unix_server).unwrap();
    let mut d = Daemon::start(
        &ws,
        &config(&format!(
            r#"
[services.uds]
command = ["python3", "{script}"]
[services.uds.health]
kind = "unix-http"
socket = "{sock}"
path = "/_ping"
interval = "200ms"

[services.tcp]
command = {http}
[services.tcp.health]
kind = "tcp"
address = "127.0.0.1:{port}"
interval = "200ms"

[services.flagged]
command = ["sleep", "1000"]
[services.flagged.health]
kind = "exec"
command = ["test", "-f", "{flag}"]
interval = "200ms"
"#,
            script = script.display(),
            sock = sock.display(),
            http = http_server(port),
            flag = flag.display(),
        )),
    );
    d.wait_service(
        "uds",
        |s| s.health == Health::Healthy && s.state == ServiceState::Running,
        SHORT,
    );
    d.wait_service("tcp", |s| s.health == Health::Healthy, SHORT);
    // Without the flag file the exec check fails: still starting, not healthy.
    let f = d.service("flagged");
    assert_eq!(
        (f.state, f.health),
        (ServiceState::Starting, Health::Unknown),
        "{f:?}"
    );
    assert_eq!(d.status().lifecycle, Lifecycle::Starting);
    std::fs::write(&flag, "").unwrap();
    d.wait_service("flagged", |s| s.health == Health::Healthy, SHORT);
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
}

/// A running service whose check keeps failing is restarted.
#[test]
fn unhealthy_service_is_restarted_past_its_threshold() {
    let ws = Workspace::new();
    let flag = ws.path().join("ok");
    std::fs::write(&flag, "").unwrap();
    let mut d = Daemon::start(
        &ws,
        &config(&format!(
            r#"
[services.s]
command = ["sleep", "1000"]
[services.s.health]
kind = "exec"
command = ["test", "-f", "{flag}"]
interval = "100ms"
failure_threshold = 2
"#,
            flag = flag.display()
        )),
    );
    let first = d
        .wait_service("s", |s| s.health == Health::Healthy, SHORT)
        .pid;
    std::fs::remove_file(&flag).unwrap();
    let again = d.wait_service(
        "s",
        |s| s.restarts >= 1 && s.pid.is_some() && s.pid != first,
        SHORT,
    );
    assert!(again.last_exit.is_some());
}

/// Stop: dependents stop before their dependencies; a service that ignores SIGTERM is
/// killed at its stop_timeout with its grandchildren; the whole stop fits the budget.
#[test]
fn stop_runs_in_reverse_dependency_order_and_kills_stubborn_groups_within_budget() {
    let ws = Workspace::new();
    let order = ws.path().join("order");
    let grandchild_pid = ws.path().join("grandchild.pid");
    let mut d = Daemon::start(
        &ws,
        &config(&format!(
            r#"
[shutdown]
budget = "6s"

[services.base]
shell = "trap 'echo base >> {order}; exit 0' TERM; while :; do sleep 0.05; done"

[services.middle]
depends_on = ["base"]
shell = "trap 'echo middle >> {order}; exit 0' TERM; while :; do sleep 0.05; done"

[services.top]
depends_on = ["middle"]
shell = "trap 'echo top >> {order}; exit 0' TERM; while :; do sleep 0.05; done"

[services.stubborn]
shell = "trap '' TERM; sh -c 'trap \"\" TERM; echo $$ > {gc}; while :; do sleep 0.05; done' & while :; do sleep 0.05; done"
stop_timeout = "1s"
"#,
            order = order.display(),
            gc = grandchild_pid.display(),
        )),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let gc: u32 = wait_until(SHORT, "the grandchild pid", || {
        std::fs::read_to_string(&grandchild_pid)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    });
    let t = Instant::now();
    d.signal(Signal::SIGTERM);
    let st = d.wait_exit(SHORT);
    let took = t.elapsed();
    assert!(st.success(), "exit {st}\n{}", d.report());
    assert!(
        took < Duration::from_secs(6),
        "stop took {took:?}, budget 6s"
    );
    assert!(
        took >= Duration::from_millis(900),
        "stubborn was not given its stop_timeout: {took:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&order).unwrap(),
        "top\nmiddle\nbase\n"
    );
    assert!(
        !integration::procfs::alive(gc),
        "grandchild {gc} survived the stop"
    );
    assert!(
        d.leftovers().is_empty(),
        "left running: {:?}",
        d.leftovers()
    );
    assert!(
        d.stderr().contains("did not stop in time"),
        "{}",
        d.stderr()
    );
}

/// SIGHUP reloads: the changed service restarts, the unchanged one keeps its pid; an
/// invalid edit keeps the old config and logs each problem with its place.
#[test]
fn reload_restarts_only_what_changed_and_rejects_invalid_edits() {
    let ws = Workspace::new();
    let base = |arg: &str| {
        config(&format!(
            "[services.keep]\ncommand = [\"sleep\", \"1000\"]\n[services.change]\ncommand = [\"sleep\", \"{arg}\"]\n"
        ))
    };
    let mut d = Daemon::start(&ws, &base("1000"));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let keep = d.service("keep").pid.unwrap();
    let change = d.service("change").pid.unwrap();

    ws.write_config(&base("2000"));
    d.signal(Signal::SIGHUP);
    let new = d.wait_service(
        "change",
        |s| s.pid.is_some() && s.pid != Some(change),
        SHORT,
    );
    assert_eq!(d.service("keep").pid, Some(keep));
    assert_eq!(new.state, ServiceState::Running);

    ws.write_config(&base("3000").replace(
        "[services.keep]",
        "[services.keep]\nrestart = \"sometimes\"",
    ));
    d.signal(Signal::SIGHUP);
    wait_until(SHORT, "the rejection in the log", || {
        d.stderr().contains("config reload rejected")
    });
    let err = d.stderr();
    assert!(
        err.contains("config.toml:") && err.contains("services.keep"),
        "{err}"
    );
    assert_eq!(
        d.service("change").pid,
        new.pid,
        "an invalid config must change nothing"
    );
    assert_eq!(d.service("keep").pid, Some(keep));
}

/// `wsagent stop|start|restart NAME` act on one service.
#[test]
fn services_can_be_stopped_started_and_restarted_by_hand() {
    let ws = Workspace::new();
    let mut d = Daemon::start(
        &ws,
        &config("[services.s]\ncommand = [\"sleep\", \"1000\"]\n"),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let p1 = d.service("s").pid.unwrap();
    assert!(d.cli(["stop", "s"]).status.success());
    assert_eq!(d.service("s").state, ServiceState::Stopped);
    assert!(!integration::procfs::alive(p1));
    assert!(d.cli(["start", "s"]).status.success());
    let p2 = d
        .wait_service("s", |s| s.state == ServiceState::Running, SHORT)
        .pid
        .unwrap();
    assert!(d.cli(["restart", "s"]).status.success());
    d.wait_service(
        "s",
        |s| s.state == ServiceState::Running && s.pid != Some(p2),
        SHORT,
    );
    let out = d.cli(["restart", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no service named \"nope\""));
}

/// A service that takes its whole `stop_timeout` to stop blocks nobody else: while
/// `wsagent stop slow` waits, `logs`, `status` and the other service's controls answer.
#[test]
fn a_slow_stop_blocks_no_other_command() {
    let ws = Workspace::new();
    let mut d = Daemon::start(
        &ws,
        &config(
            "[services.slow]\ncommand = [\"sh\", \"-c\", \"trap '' TERM; echo up; while :; do sleep 0.1; done\"]\nstop_timeout = \"60s\"\n\
             [services.other]\ncommand = [\"sh\", \"-c\", \"echo other-line; exec sleep 1000\"]\n",
        ),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let mut stopping = ws
        .command(integration::daemon::wsagent_bin())
        .args(["stop", "slow", "--timeout", "90s"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn wsagent stop");
    d.wait_service("slow", |s| s.state == ServiceState::Stopping, SHORT);
    wait_until(SHORT, "the other service's line in its log", || {
        d.service_log("other").contains("other-line")
    });
    let logs = d.cli(["logs", "other", "-n", "5"]);
    assert!(logs.status.success(), "{logs:?}");
    assert!(String::from_utf8_lossy(&logs.stdout).contains("other-line"));
    assert!(d.cli(["restart", "other"]).status.success());
    assert_eq!(d.status().services.len(), 2);
    assert!(
        stopping.try_wait().expect("try_wait").is_none(),
        "`wsagent stop slow` ended before the others ran: the test proves nothing"
    );
    assert_eq!(d.service("slow").state, ServiceState::Stopping);
    let _ = stopping.kill();
    let _ = stopping.wait();
}

/// `user`/`group` drop privileges for that child only: the service runs as nobody, the
/// daemon stays root.
#[test]
fn user_and_group_drop_privileges_for_that_service_only() {
    if !integration::real::require_root("dropping privileges needs root") {
        return;
    }
    let ws = Workspace::new();
    let out = ws.path().join("ids");
    std::fs::set_permissions(
        ws.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let mut d = Daemon::start(
        &ws,
        &config(&format!(
            "[services.low]\nshell = \"echo $(id -u) $(id -g) $HOME > {out}; exec sleep 1000\"\nuser = \"nobody\"\ngroup = \"nogroup\"\ncwd = \"/\"\n",
            out = out.display()
        )),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let ids = wait_until(SHORT, "the ids file", || {
        std::fs::read_to_string(&out).ok().filter(|s| !s.is_empty())
    });
    let mut parts = ids.split_whitespace();
    assert_eq!(parts.next(), Some("65534"), "{ids}");
    assert_eq!(parts.next(), Some("65534"), "{ids}");
    assert_eq!(
        parts.next(),
        Some("/nonexistent"),
        "HOME follows the user: {ids}"
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    );
}

/// The default services whose program (or variable) is missing are skipped with one
/// warning each and shown as `absent`; the workspace still becomes ready.
#[test]
fn default_services_without_their_program_are_absent_not_failed() {
    let ws = Workspace::new().with_env("PATH", "/usr/bin:/bin");
    let mut d = Daemon::start(&ws, "[services.mine]\ncommand = [\"sleep\", \"1000\"]\n");
    let st = d.wait_lifecycle(Lifecycle::Ready, SHORT);
    for (name, why) in [
        ("dockerd", "dockerd is not installed"),
        ("code-server", "code-server is not installed"),
        ("coder-agent", "CODER_AGENT_INIT_SCRIPT is not set"),
    ] {
        let s = st.services.iter().find(|s| s.name == name).unwrap();
        assert_eq!(s.state, ServiceState::Absent, "{s:?}");
        assert_eq!(s.message.as_deref(), Some(why));
        let warnings = d
            .stderr()
            .lines()
            .filter(|l| l.contains("WARN") && l.contains(&format!("service={name} ")))
            .count();
        assert_eq!(warnings, 1, "one warning for {name}:\n{}", d.stderr());
    }
}

/// A service that never becomes healthy within `start_timeout` counts as failed to start:
/// it is stopped, and past its failure limit it is `failed` and the lifecycle
/// `start_error`.
#[test]
fn a_service_never_healthy_within_start_timeout_fails_to_start() {
    let ws = Workspace::new();
    let mut d = Daemon::start(
        &ws,
        &config(
            r#"
[services.mute]
command = ["sleep", "1000"]
start_timeout = "500ms"
stop_timeout = "1s"
[services.mute.backoff]
initial = "100ms"
max_failures = 2
[services.mute.health]
kind = "exec"
command = ["false"]
interval = "100ms"
"#,
        ),
    );
    let st = d.wait_lifecycle(Lifecycle::StartError, LONG);
    let mute = st.services.iter().find(|s| s.name == "mute").unwrap();
    assert_eq!(mute.state, ServiceState::Failed, "{mute:?}");
    assert!(
        mute.message
            .as_deref()
            .unwrap_or("")
            .contains("not healthy within start_timeout 500ms"),
        "{mute:?}"
    );
    assert_eq!(mute.pid, None);
    let step = st.startup.iter().find(|s| s.name == "services").unwrap();
    assert_eq!(step.outcome, "failed");
}

/// Editing the config file is enough (no SIGHUP): the watcher reloads it.
#[test]
fn editing_the_config_file_reloads_without_a_signal() {
    let ws = Workspace::new();
    let mut d = Daemon::start(
        &ws,
        &config("[services.a]\ncommand = [\"sleep\", \"1000\"]\n"),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let old = d.service("a").pid;
    ws.write_config(&config("[services.a]\ncommand = [\"sleep\", \"1001\"]\n[services.b]\ncommand = [\"sleep\", \"1000\"]\n"));
    d.wait_service(
        "a",
        |s| s.state == ServiceState::Running && s.pid != old,
        SHORT,
    );
    d.wait_service("b", |s| s.state == ServiceState::Running, SHORT);
}
