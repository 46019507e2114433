//! The CLI and the local API from the outside: config errors, the socket's protection,
//! secrets kept out of every output, what a client says without a daemon.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;

use agent_proto::local::Lifecycle;
use integration::daemon::{Daemon, Signal, Workspace, wsagent_bin};
use integration::wait_until;

use crate::support::{SHORT, config};

/// A malformed config exits 78 with file:line:column and key, and starts nothing.
#[test]
fn malformed_config_exits_78_with_places_and_starts_nothing() {
    let ws = Workspace::new();
    let marker = ws.path().join("started");
    let mut d = Daemon::start(
        &ws,
        &config(&format!(
            "[services.s]\nshell = \"touch {m}; sleep 100\"\nrestart = \"sometimes\"\n\n[shutdown]\nbudget = \"soon\"\n",
            m = marker.display()
        )),
    );
    let st = d.wait_exit(SHORT);
    assert_eq!(st.code(), Some(78), "{}", d.report());
    let err = d.stderr();
    assert!(err.contains("config.toml:10:11: services.s"), "{err}");
    assert!(err.contains("config.toml:13:10: shutdown"), "{err}");
    assert!(err.contains("nothing was started"), "{err}");
    assert!(
        !marker.exists(),
        "a child was started despite the invalid config"
    );
    let check = ws.cli([
        "config".as_ref(),
        "check".as_ref(),
        ws.config_path().as_os_str(),
    ]);
    assert_eq!(check.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&check.stderr).contains("2 problems"));
}

/// The socket is mode 0600, and even when its mode is opened up, a client of another
/// uid (nobody) is refused by the peer-credential check.
#[test]
fn socket_is_private_and_other_uids_are_refused() {
    let ws = Workspace::new();
    let mut d = Daemon::start(
        &ws,
        &config("[services.s]\ncommand = [\"sleep\", \"1000\"]\n"),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let mode = std::fs::metadata(ws.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping the other-uid half: needs root to run a client as nobody");
        return;
    }
    std::fs::set_permissions(ws.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(ws.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(bin_for_other_uids(&ws))
        .args([
            "--socket".as_ref(),
            ws.socket().as_os_str(),
            "status".as_ref(),
        ])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("WSAGENT_SYSTEM_CONFIG", "/nonexistent")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied: uid 65534"),
        "{out:?}"
    );
}

/// A client without a daemon says which socket it tried and exits 69.
#[test]
fn client_without_daemon_names_the_socket_and_exits_69() {
    let ws = Workspace::new();
    let out = ws.cli(["status"]);
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&ws.socket().display().to_string()), "{err}");
}

/// The agent token given in the environment never appears on stderr or in any file of
/// the state dir, even when a service (allowed to see it) prints it; other services do
/// not get it at all.
#[test]
fn agent_token_never_appears_in_logs_or_other_children() {
    let token = "5b7d8f2e-1c3a-4e6b-9d0f-a1b2c3d4e5f6";
    let ws = Workspace::new().with_env("CODER_AGENT_TOKEN", token);
    let env_dump = ws.path().join("plain-env");
    let mut d = Daemon::start(
        &ws,
        &config(&format!(
            r#"
[services.agentish]
shell = "echo token is $CODER_AGENT_TOKEN; exec sleep 1000"
secret_env = ["CODER_AGENT_TOKEN"]

[services.plain]
shell = "env > {dump}; exec sleep 1000"
"#,
            dump = env_dump.display()
        )),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    wait_until(SHORT, "the agentish line in its log", || {
        d.service_log("agentish").contains("token is")
    });
    wait_until(SHORT, "the plain env dump", || {
        std::fs::metadata(&env_dump).is_ok_and(|m| m.len() > 0)
    });
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(SHORT).success());
    assert!(d.service_log("agentish").contains("token is [REDACTED]"));
    assert!(
        !std::fs::read_to_string(&env_dump).unwrap().contains(token),
        "a child without secret_env got the token"
    );
    assert!(!d.stderr().contains(token), "token on stderr");
    let mut files = 0;
    for entry in walk(&ws.state_dir()) {
        files += 1;
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(token),
            "token in {}",
            entry.display()
        );
    }
    assert!(
        files >= 2,
        "expected the daemon log and service logs in the state dir"
    );
}

/// A startup task (in a terminal) and a one-time task (on a pipe) that print the agent
/// token: the ring replayed by `wsagent attach`, the task logs and every other file show
/// it masked.
#[test]
fn a_task_that_prints_a_secret_shows_it_masked_in_its_log_and_on_attach() {
    let token = "7c1e9a4b-2d3f-4a5b-8c6d-e7f8a9b0c1d2";
    let ws = Workspace::new().with_env("CODER_AGENT_TOKEN", token);
    let leak = ws.path().join("leak");
    std::fs::write(&leak, format!("the token is {token} (oops)\n")).unwrap();
    let mut d = Daemon::start(
        &ws,
        &config(&format!(
            "[[once]]\nname = \"once-leak\"\nshell = 'cat {leak}'\n\n[[task]]\nname = \"tty-leak\"\nblocks_ready = true\nshell = 'cat {leak}; echo done'\n",
            leak = leak.display()
        )),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let attach = d.cli(["attach", "tty-leak"]);
    let replay = String::from_utf8_lossy(&attach.stdout);
    assert!(
        replay.contains("the token is [REDACTED] (oops)") && replay.contains("done"),
        "{attach:?}"
    );
    assert!(!replay.contains(token));
    for name in ["task-tty-leak.log", "once-once-leak.log"] {
        let log = std::fs::read_to_string(ws.state_dir().join("logs").join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            log.contains("the token is [REDACTED] (oops)"),
            "{name}: {log:?}"
        );
    }
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(SHORT).success());
    for entry in walk(&ws.state_dir()) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(token),
            "token in {}",
            entry.display()
        );
    }
    assert!(!d.stderr().contains(token) && !d.stdout().contains(token));
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p))
        } else {
            out.push(p)
        }
    }
    out
}

/// `wsagent shutdown --wait` streams the phases and exits 0 once the daemon is off.
#[test]
fn shutdown_wait_streams_phases_until_off() {
    let ws = Workspace::new();
    let mut d = Daemon::start(
        &ws,
        &config("[services.s]\ncommand = [\"sleep\", \"1000\"]\n"),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let out = d.cli(["shutdown", "--wait"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let phases: Vec<&str> = [
        "lifecycle: shutting_down",
        "shutdown pre_stop: ok",
        "shutdown save:",
        "service s: stopped",
        "shutdown services: ok",
        "lifecycle: off",
    ]
    .into_iter()
    .filter(|p| !text.contains(p))
    .collect();
    assert!(phases.is_empty(), "missing {phases:?} in:\n{text}");
    assert!(d.wait_exit(SHORT).success());
}

/// `wsagent demo`: the newcomer's tour ends by itself within 20 s, exits 0, shows the
/// timeline (ready, crash and restart, save, off) and leaves nothing behind.
#[test]
fn demo_tours_start_crash_save_stop_and_leaves_nothing_behind() {
    let ws = Workspace::new();
    let tmp = ws.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut cmd = ws.command(wsagent_bin());
    cmd.arg("demo").env("TMPDIR", &tmp);
    let out = integration::daemon::output_within(cmd, std::time::Duration::from_secs(20));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let mut at = 0;
    for step in [
        "lifecycle: ready",
        "service web: backoff: exited with exit code 3",
        "service web: running (healthy)",
        "pushed refs/heads/wip/demo/main",
        "lifecycle: off",
        "daemon exited 0",
        "the remote now holds refs/heads/wip/demo/main: README.md, notes.txt",
    ] {
        let found = text[at..]
            .find(step)
            .unwrap_or_else(|| panic!("{step:?} missing (in order):\n{text}"));
        at += found + step.len();
    }
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "the demo left {left:?}");
    assert!(
        integration::procfs::with_env(integration::daemon::TAG_VAR, ws.tag()).is_empty(),
        "processes left behind"
    );
}

/// `wsagent logs NAME -n N` prints the last N lines; `-f` keeps following new ones.
#[test]
fn logs_tail_and_follow_a_service() {
    use std::io::BufRead;
    let ws = Workspace::new();
    let trigger = ws.path().join("more");
    let mut d = Daemon::start(
        &ws,
        &config(&format!(
            "[services.talker]\nshell = \"for i in 1 2 3 4 5; do echo line $i; done; while [ ! -f {t} ]; do sleep 0.05; done; echo later line; exec sleep 1000\"\n",
            t = trigger.display()
        )),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    wait_until(SHORT, "five lines logged", || {
        d.service_log("talker").contains("line 5")
    });
    let out = d.cli(["logs", "talker", "-n", "2"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "line 4\nline 5\n");

    let mut follow = ws.command(wsagent_bin());
    follow
        .args(["logs", "talker", "-f", "-n", "1"])
        .stdout(std::process::Stdio::piped());
    let mut child = follow.spawn().unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "line 5");
    std::fs::write(&trigger, "").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "later line");
    let _ = child.kill();
    let _ = child.wait();
}

/// The wsagent binary at a path any uid can reach: the build's own may sit under a
/// directory only root may search (a `mktemp -d` target dir), where another uid gets
/// "Permission denied" before the binary even runs. A hard link (or copy) in the
/// workspace, which the caller makes 0755.
pub(crate) fn bin_for_other_uids(ws: &Workspace) -> std::path::PathBuf {
    let dst = ws.path().join("wsagent-any-uid");
    if !dst.exists() && std::fs::hard_link(wsagent_bin(), &dst).is_err() {
        std::fs::copy(wsagent_bin(), &dst).expect("copy wsagent");
    }
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).unwrap();
    dst
}

/// `wsagent status --json` against `ws`'s socket, run as `uid` (gid the same).
fn status_as(ws: &Workspace, uid: u32) -> std::process::Output {
    std::process::Command::new(bin_for_other_uids(ws))
        .args([
            "--socket".as_ref(),
            ws.socket().as_os_str(),
            "status".as_ref(),
            "--json".as_ref(),
        ])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("WSAGENT_SYSTEM_CONFIG", "/nonexistent")
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap()
}

/// `daemon.api_user` added by a config reload takes effect at once (the socket is handed
/// over, the uid served), and removed gives the socket back; `[daemon]` keys read only
/// at start are named as such.
#[test]
fn api_user_follows_a_config_reload_and_start_only_keys_say_so() {
    use std::os::unix::fs::MetadataExt;
    if !integration::real::require_root("running clients as other users needs root") {
        return;
    }
    let ws = Workspace::new();
    std::fs::set_permissions(ws.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let services = "[services.s]\ncommand = [\"sleep\", \"1000\"]\n";
    let mut d = Daemon::start(&ws, &config(services));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let as_nobody = || status_as(&ws, 65534);
    assert!(!as_nobody().status.success(), "nobody is not served yet");

    // (The harness sets the log level and the state dir through the environment, which
    // wins over the file; the log dir is the file's.)
    let other_logs = ws.path().join("other-logs");
    ws.write_config(&config(&format!(
        "[daemon]\napi_user = \"nobody\"\nlog_dir = {:?}\n{services}",
        other_logs.display().to_string()
    )));
    wait_until(SHORT, "the reload to hand the socket to nobody", || {
        d.stderr().contains("configuration reloaded")
    });
    let meta = std::fs::metadata(ws.socket()).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (65534, 0o600));
    let ok = as_nobody();
    assert!(ok.status.success(), "{ok:?}");
    let err = d.stderr();
    assert!(err.contains("daemon.api_user now nobody"), "{err}");
    assert!(
        err.contains("daemon.log_dir changed: takes effect at the next start"),
        "{err}"
    );

    ws.write_config(&config(services));
    wait_until(SHORT, "the socket to be the daemon's again", || {
        std::fs::metadata(ws.socket()).is_ok_and(|m| m.uid() == 0)
    });
    assert!(!as_nobody().status.success(), "nobody is refused again");
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(SHORT).success());
}

/// `daemon.api_user` lets the workspace user (who runs Coder's `shutdown_script`) use the
/// socket, which it then owns (still 0600); any other uid is still refused.
#[test]
fn api_user_is_served_and_other_uids_still_refused() {
    use std::os::unix::fs::MetadataExt;
    if !integration::real::require_root("running clients as other users needs root") {
        return;
    }
    let ws = Workspace::new();
    std::fs::set_permissions(ws.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut d = Daemon::start(
        &ws,
        &config("[daemon]\napi_user = \"nobody\"\n[services.s]\ncommand = [\"sleep\", \"1000\"]\n"),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let meta = std::fs::metadata(ws.socket()).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (65534, 0o600));
    let as_uid = |uid: u32| status_as(&ws, uid);
    let ok = as_uid(65534);
    assert!(ok.status.success(), "{ok:?}");
    std::fs::set_permissions(ws.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let refused = as_uid(1);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("permission denied: uid 1 "),
        "{refused:?}"
    );
}

/// `wsagent status` exits 0 when every service is as configured and 3 (systemctl's code)
/// when one has failed; `--short` is one line that says how many are up and which are
/// down; `--json` still exits 0 (the daemon answered).
#[test]
fn status_exits_3_when_a_service_failed_and_short_is_one_line() {
    let ws = Workspace::new();
    let mut d = Daemon::start(&ws, &config("[services.ok]\nshell = \"exec sleep 1000\"\n"));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let out = d.cli(["status"]);
    let short = d.cli(["status", "--short"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(short.status.code(), Some(0), "{short:?}");
    assert_eq!(
        String::from_utf8_lossy(&short.stdout),
        "1/1 up · not saved yet\n"
    );
    d.signal(Signal::SIGTERM);
    d.wait_exit(SHORT);

    let ws = Workspace::new();
    let mut d = Daemon::start(
        &ws,
        &config(
            r#"
[services.ok]
shell = "exec sleep 1000"
[services.crashy]
shell = "exit 3"
[services.crashy.backoff]
initial = "50ms"
max = "100ms"
max_failures = 2
window = "1m"
"#,
        ),
    );
    wait_until(SHORT, "crashy to fail", || {
        d.try_status().is_ok_and(|s| {
            s.services
                .iter()
                .any(|v| v.name == "crashy" && v.state == agent_proto::local::ServiceState::Failed)
        })
    });

    let out = d.cli(["status"]);
    let short = d.cli(["status", "--short"]);
    let json = d.cli(["status", "--json"]);

    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(short.status.code(), Some(3), "{short:?}");
    let line = String::from_utf8_lossy(&short.stdout);
    assert!(
        line.starts_with("1/2 up · down: crashy · ") && line.ends_with("not saved yet\n"),
        "{line}"
    );
    assert_eq!(json.status.code(), Some(0), "{json:?}");
    d.signal(Signal::SIGTERM);
    d.wait_exit(SHORT);
}

/// A second `wsagent run` on the socket of a running daemon refuses (exit 75) naming the
/// running daemon's pid, starts nothing, and leaves the first one serving.
#[test]
fn a_second_daemon_on_the_same_socket_refuses_with_75_and_names_the_first() {
    let ws = Workspace::new();
    let mut d = Daemon::start(&ws, &config(""));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    ws.write_config(&config(""));
    let mut cmd = ws.command(wsagent_bin());
    cmd.args(["run", "--config"]).arg(ws.config_path());
    let out = integration::daemon::output_within(cmd, SHORT);
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "another wsagent daemon (pid {}) is already running on {}",
            d.pid(),
            ws.socket().display()
        )),
        "{err}"
    );
    assert_eq!(d.status().pid, d.pid());
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(SHORT).success(), "{}", d.report());
}

/// `config check` as an operator runs it: turning `dockerd` off alone is a valid config
/// (a dependency on a switched-off service is satisfied), and a service user this
/// machine does not know is reported by its key, exit 78.
#[test]
fn config_check_accepts_dockerd_off_and_names_an_unknown_service_user() {
    let ws = Workspace::new();
    let off = ws.path().join("off.toml");
    std::fs::write(&off, "[services.dockerd]\nenabled = false\n").unwrap();
    let out = ws.cli(["config", "check", off.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("configuration is valid"),
        "{out:?}"
    );

    let bad = ws.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[services.web]\ncommand = [\"true\"]\nuser = \"no-such-user-here\"\n",
    )
    .unwrap();
    let out = ws.cli(["config", "check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("services.web.user: unknown user \"no-such-user-here\""),
        "{out:?}"
    );
}

/// `~` in a service's `cwd` is its HOME, as everywhere a path is accepted.
#[test]
fn a_services_cwd_may_start_with_tilde() {
    let ws = Workspace::new();
    std::fs::create_dir_all(ws.home().join("work")).unwrap();
    let mut d = Daemon::start(
        &ws,
        &config("[services.here]\nshell = \"pwd; exec sleep 1000\"\ncwd = \"~/work\"\n"),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let want = ws.home().join("work").display().to_string();
    wait_until(SHORT, "the service to print its cwd", || {
        d.service_log("here").contains(&want)
    });
    d.signal(Signal::SIGTERM);
    d.wait_exit(SHORT);
}

/// `wsagent completion bash` is a script bash loads and binds to `wsagent`; zsh and fish
/// get theirs; `wsagent man` is a roff page naming the commands.
#[test]
fn completions_load_in_bash_and_the_man_page_names_the_commands() {
    let ws = Workspace::new();
    let script = ws.path().join("wsagent.bash");
    let out = ws.cli(["completion", "bash"]);
    assert!(out.status.success(), "{out:?}");
    std::fs::write(&script, &out.stdout).unwrap();
    let bound = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p wsagent",
            script.display()
        ))
        .output()
        .unwrap();
    assert!(bound.status.success(), "{bound:?}");
    assert!(
        String::from_utf8_lossy(&bound.stdout).contains("wsagent"),
        "{bound:?}"
    );
    for shell in ["zsh", "fish"] {
        let out = ws.cli(["completion", shell]);
        assert!(
            out.status.success() && !out.stdout.is_empty(),
            "{shell}: {out:?}"
        );
    }
    let man = ws.cli(["man"]);
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(man.status.success(), "{man:?}");
    assert!(
        page.contains(".TH wsagent 1") && page.contains(".SH NAME"),
        "{page}"
    );
    for cmd in ["save", "status", "shutdown", "restore-me-not"] {
        assert_eq!(
            page.contains(cmd),
            cmd != "restore-me-not",
            "{cmd} in the man page"
        );
    }
}

/// `restart` waits for the new process to be running and healthy and says so; `start`
/// of a service that cannot stay up exits 1 with the reason; `stop all` waits until
/// every service has stopped.
#[test]
fn start_stop_restart_wait_for_the_service_and_say_why_when_it_does_not_get_there() {
    let ws = Workspace::new();
    let port = integration::net::free_port();
    let mut d = Daemon::start(
        &ws,
        &config(&format!(
            r#"
[services.web]
command = {argv}
[services.web.health]
kind = "http"
url = "http://127.0.0.1:{port}/"
interval = "100ms"
[services.bad]
shell = "exit 3"
[services.bad.backoff]
initial = "50ms"
max = "50ms"
max_failures = 1
window = "1m"
"#,
            argv = crate::support::http_server(port)
        )),
    );
    wait_until(SHORT, "web to be healthy and bad to have failed", || {
        d.try_status().is_ok_and(|s| {
            s.services
                .iter()
                .any(|v| v.name == "web" && v.health == agent_proto::local::Health::Healthy)
                && s.services
                    .iter()
                    .any(|v| v.name == "bad" && v.state == agent_proto::local::ServiceState::Failed)
        })
    });
    let old = d.service("web").pid.unwrap();

    let restarted = d.cli(["restart", "web"]);
    let started = d.cli(["start", "bad", "--timeout", "5s"]);
    let stopped = d.cli(["stop", "all"]);

    assert!(restarted.status.success(), "{restarted:?}");
    let text = String::from_utf8_lossy(&restarted.stdout);
    assert!(text.starts_with("web: running and healthy, pid "), "{text}");
    assert!(
        !text.contains(&format!("pid {old} ")),
        "the old process: {text}"
    );
    assert_eq!(started.status.code(), Some(1), "{started:?}");
    let err = String::from_utf8_lossy(&started.stderr);
    assert!(
        err.contains("bad: failed") && err.contains("code 3"),
        "{err}"
    );
    assert!(stopped.status.success(), "{stopped:?}");
    for s in d.status().services {
        assert!(
            matches!(
                s.state,
                agent_proto::local::ServiceState::Stopped
                    | agent_proto::local::ServiceState::Failed
            ),
            "{s:?}"
        );
    }
    d.signal(Signal::SIGTERM);
    d.wait_exit(SHORT);
}

/// `wsagent events --since` replays what happened (the start, up to `ready`) in
/// readable lines, then follows live events (a restart) until the daemon exits; `--json`
/// gives one event object a line.
#[test]
fn events_replays_and_follows_in_readable_lines_until_the_daemon_exits() {
    use std::io::BufRead;
    let ws = Workspace::new();
    let mut d = Daemon::start(
        &ws,
        &config("[services.web]\nshell = \"exec sleep 1000\"\n"),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let follow = |args: &[&str]| {
        let mut child = ws
            .command(wsagent_bin())
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let sink = lines.clone();
        let out = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines() {
                sink.lock().unwrap().push(l.unwrap());
            }
        });
        (child, lines, reader)
    };
    let (mut human, hl, hr) = follow(&["events", "--since", "1h"]);
    let (mut json, jl, jr) = follow(&["events", "--json", "--since", "1h"]);
    let has = |l: &std::sync::Arc<std::sync::Mutex<Vec<String>>>, what: &str| {
        l.lock().unwrap().iter().any(|x| x.contains(what))
    };
    wait_until(SHORT, "the replayed start", || {
        has(&hl, "INFO   lifecycle: ready") && has(&jl, "\"lifecycle\"")
    });
    assert!(d.cli(["restart", "web", "--no-wait"]).status.success());
    wait_until(SHORT, "the live restart", || {
        has(&hl, "web") && has(&hl, "stopping")
    });
    d.signal(Signal::SIGTERM);
    d.wait_exit(SHORT);
    // The streams end with the daemon.
    assert!(human.wait().unwrap().success());
    assert!(json.wait().unwrap().success());
    hr.join().unwrap();
    jr.join().unwrap();
    for l in jl.lock().unwrap().iter() {
        serde_json::from_str::<agent_proto::local::Event>(l).unwrap_or_else(|e| panic!("{l}: {e}"));
    }
}

/// A service's output goes to its own log (and the daemon's stderr, which is what
/// `docker logs` shows), not a second time into the daemon's log file, which is one
/// size-capped `wsagent.log` in the state directory, owner-only.
#[test]
fn service_output_is_not_duplicated_in_the_daemons_log_file() {
    use std::os::unix::fs::PermissionsExt;
    let ws = Workspace::new();
    let mut d = Daemon::start(
        &ws,
        &config("[services.talker]\nshell = \"echo marker-4f2a; exec sleep 1000\"\n"),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    wait_until(SHORT, "the marker in the service log", || {
        d.service_log("talker").contains("marker-4f2a")
    });
    d.signal(Signal::SIGTERM);
    d.wait_exit(SHORT);
    let file = ws.state_dir().join("wsagent.log");
    let log = std::fs::read_to_string(&file).unwrap();
    assert!(log.contains("lifecycle ready"), "{log}");
    assert!(!log.contains("marker-4f2a"), "{log}");
    assert!(d.stderr().contains("marker-4f2a"), "{}", d.stderr());
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// `config check` of a file with seven mistakes in nested sections reports all seven in
/// one pass, in the file's order, each with file:line:column, the full key path and
/// words of TOML (no Rust type names); exit 78.
#[test]
fn config_check_reports_every_problem_with_its_full_key_path_in_one_pass() {
    let ws = Workspace::new();
    let file = ws.path().join("bad.toml");
    std::fs::write(
        &file,
        r#"[daemon]
log_level = 5

[services.web]
command = ["python3"]
restart = "sometimes"

[services.web.health]
kind = "http"
url = 42
interval = "soon"

[services.api]
command = "not-a-list"
stop_timeout = "10 parsecs"

[save]
depth = "deep"
"#,
    )
    .unwrap();
    let out = ws.cli(["config".as_ref(), "check".as_ref(), file.as_os_str()]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let f = file.display();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "wsagent: invalid configuration (7 problems)
  {f}:2:13: daemon.log_level: found the number `5`, expected text in quotes
  {f}:6:11: services.web.restart: unknown value `sometimes`, expected one of `always`, `on-failure`, `never`
  {f}:10:7: services.web.health.url: found the number `42`, expected text in quotes
  {f}:11:12: services.web.health.interval: the text \"soon\" is not a duration (`10s`, `5m`, `1h`)
  {f}:14:11: services.api.command: found the text \"not-a-list\", expected a list (`[...]`)
  {f}:15:16: services.api.stop_timeout: the text \"10 parsecs\" is not a duration (`10s`, `5m`, `1h`)
  {f}:18:9: save.depth: found the text \"deep\", expected a whole number of 0 or more
"
        )
    );
}
