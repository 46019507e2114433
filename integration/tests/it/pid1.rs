//! wsagent as init: orphans reaped, supervised exit codes exact, signals handled, as PID 1
//! of a fresh pid namespace and as a child subreaper.

use agent_proto::local::{Lifecycle, ServiceState};
use integration::daemon::{Daemon, Signal, Workspace};
use integration::real::require_root;
use integration::wait_until;

use crate::support::{LONG, SHORT, config};

/// As PID 1, a thousand double-forked orphans leave no zombie, and a supervised service
/// that exits 7, started 50 times meanwhile, is reported with exit code 7 every time.
#[test]
fn as_pid1_orphans_are_reaped_and_supervised_exit_codes_stay_exact() {
    if !require_root("unshare --pid needs root") {
        return;
    }
    let ws = Workspace::new();
    let done = ws.path().join("orphans-done");
    let mut d = Daemon::start_pid1(
        &ws,
        &config(&format!(
            r#"
[services.orphans]
shell = "i=0; while [ $i -lt 1000 ]; do (sh -c 'exit 0' &); i=$((i+1)); done; touch {done}; exec sleep 1000"

[services.seven]
shell = "exit 7"
restart = "never"
"#,
            done = done.display()
        )),
    );
    assert!(d.is_pid1());
    let st = d.wait_lifecycle(Lifecycle::Ready, LONG);
    assert!(st.pid1, "status must say PID 1");
    let mut last_at = d
        .wait_service("seven", |s| s.last_exit.is_some(), SHORT)
        .last_exit
        .unwrap()
        .at;
    for i in 0..50 {
        let out = d.cli(["start", "seven", "--no-wait"]);
        assert!(out.status.success(), "start #{i}: {out:?}");
        let s = d.wait_service(
            "seven",
            |s| {
                s.state == ServiceState::Stopped
                    && s.last_exit.as_ref().is_some_and(|e| e.at != last_at)
            },
            SHORT,
        );
        let exit = s.last_exit.unwrap();
        assert_eq!((exit.code, exit.signal), (Some(7), None), "run #{i}");
        last_at = exit.at;
    }
    wait_until(LONG, "the orphan storm to finish", || done.exists());
    wait_until(SHORT, "no zombie left in the namespace", || {
        d.zombies().is_empty()
    });
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(SHORT).success(), "{}", d.report());
}

/// Not PID 1: wsagent becomes a child subreaper, so an orphan of a service is
/// re-parented to wsagent and reaped by it.
#[test]
fn not_pid1_adopts_and_reaps_orphans_of_services_as_subreaper() {
    let ws = Workspace::new();
    let pidfile = ws.path().join("orphan.pid");
    let mut d = Daemon::start(
        &ws,
        &config(&format!(
            "[services.parent]\nshell = \"sh -c 'echo $$ > {p}; exec sleep 1000' & exit 0\"\nrestart = \"never\"\n",
            p = pidfile.display()
        )),
    );
    let orphan: u32 = wait_until(SHORT, "the orphan's pid", || {
        std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    });
    wait_until(SHORT, "the orphan to be adopted by wsagent", || {
        integration::procfs::stat(orphan).is_some_and(|p| p.ppid == d.pid())
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(orphan as i32), Signal::SIGKILL).unwrap();
    wait_until(SHORT, "the orphan to be reaped", || {
        integration::procfs::stat(orphan).is_none()
    });
    assert!(d.zombies().is_empty());
    let _ = d.wait_lifecycle(Lifecycle::Ready, SHORT);
}

/// A second SIGTERM during the stop sequence is logged and does not cut it short.
#[test]
fn second_sigterm_during_stop_is_logged_and_ignored() {
    let ws = Workspace::new();
    let mut d = Daemon::start(
        &ws,
        &config(
            "[services.slow]\nshell = \"trap 'sleep 0.8; exit 0' TERM; while :; do sleep 0.05; done\"\nstop_timeout = \"5s\"\n",
        ),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    d.signal(Signal::SIGTERM);
    wait_until(SHORT, "the stop sequence to start", || {
        d.stderr().contains("stop sequence started")
    });
    d.signal(Signal::SIGTERM);
    let st = d.wait_exit(SHORT);
    assert!(st.success(), "{}", d.report());
    assert!(
        d.stderr()
            .contains("SIGTERM received during the stop sequence: ignored"),
        "{}",
        d.stderr()
    );
    assert!(
        d.stderr().contains("service slow: stopped"),
        "{}",
        d.stderr()
    );
}

/// SIGUSR1 is handled (logged), never fatal, even as PID 1.
#[test]
fn sigusr1_is_handled_not_fatal() {
    let ws = Workspace::new();
    let mut d = Daemon::start(
        &ws,
        &config("[services.s]\ncommand = [\"sleep\", \"1000\"]\n"),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    d.signal(Signal::SIGUSR1);
    wait_until(SHORT, "SIGUSR1 to be logged", || {
        d.stderr().contains("SIGUSR1 received")
    });
    assert!(d.try_exit().is_none());
}

/// Started with SIGTERM, SIGCHLD and the other handled signals blocked and ignored (state
/// a parent passes on through exec), wsagent still reaps its children and still runs its
/// stop sequence on SIGTERM; its services start with a clean signal state.
#[test]
fn inherited_blocked_and_ignored_signals_do_not_stop_reaping_or_the_stop() {
    let ws = Workspace::new();
    let wrapper: Vec<String> = [
        "python3",
        "-c",
        "import os, signal, sys\n\
         sigs = [signal.SIGTERM, signal.SIGCHLD, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2]\n\
         signal.pthread_sigmask(signal.SIG_BLOCK, sigs)\n\
         for s in sigs: signal.signal(s, signal.SIG_IGN)\n\
         os.execv(sys.argv[1], sys.argv[1:])\n",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut d = Daemon::start_wrapped(
        &ws,
        &config(
            "[services.seven]\nshell = \"exit 7\"\nrestart = \"never\"\n\
             [services.s]\ncommand = [\"sleep\", \"1000\"]\n",
        ),
        &wrapper,
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let exit = d
        .wait_service("seven", |s| s.last_exit.is_some(), SHORT)
        .last_exit
        .unwrap();
    assert_eq!((exit.code, exit.signal), (Some(7), None));
    let s = d.wait_service("s", |s| s.state == ServiceState::Running, SHORT);
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.pid.unwrap())).unwrap();
    for field in ["SigBlk:", "SigIgn:"] {
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        assert!(
            line.trim_start_matches(field)
                .trim()
                .trim_start_matches('0')
                .is_empty(),
            "the service inherited {line}"
        );
    }
    assert!(d.zombies().is_empty(), "{:?}", d.zombies());

    d.signal(Signal::SIGTERM);

    assert!(d.wait_exit(SHORT).success(), "{}", d.report());
    assert!(
        d.stderr().contains("stop sequence started"),
        "{}",
        d.stderr()
    );
    assert!(d.stderr().contains("service s: stopped"), "{}", d.stderr());
}

/// SIGUSR2 is forwarded to every running service (its process group), as tini does, and
/// never ends wsagent; SIGQUIT runs the stop sequence like SIGTERM.
#[test]
fn sigusr2_is_forwarded_to_the_services_and_sigquit_stops() {
    usr2_forwarded_and_quit_stops(false);
}

/// The same as PID 1 of a pid namespace, where a signal without a handler is dropped.
#[test]
fn as_pid1_sigusr2_is_forwarded_to_the_services_and_sigquit_stops() {
    if !require_root("unshare --pid needs root") {
        return;
    }
    usr2_forwarded_and_quit_stops(true);
}

fn usr2_forwarded_and_quit_stops(pid1: bool) {
    let ws = Workspace::new();
    let got = ws.path().join("got-usr2");
    let cfg = config(&format!(
        "[services.s]\nshell = \"trap 'echo usr2 >> {got}' USR2; while :; do sleep 0.05; done\"\n",
        got = got.display()
    ));
    let mut d = if pid1 {
        Daemon::start_pid1(&ws, &cfg)
    } else {
        Daemon::start(&ws, &cfg)
    };
    assert_eq!(d.is_pid1(), pid1);
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    d.wait_service("s", |s| s.state == ServiceState::Running, SHORT);

    d.signal(Signal::SIGUSR2);

    wait_until(SHORT, "the service to get SIGUSR2", || {
        std::fs::read_to_string(&got).is_ok_and(|t| t.contains("usr2"))
    });
    assert!(d.try_exit().is_none(), "{}", d.report());
    assert!(
        d.stderr()
            .contains("SIGUSR2 received: forwarded to the services"),
        "{}",
        d.stderr()
    );

    d.signal(Signal::SIGQUIT);

    assert!(d.wait_exit(SHORT).success(), "{}", d.report());
    assert!(
        d.stderr().contains("SIGQUIT received: stopping"),
        "{}",
        d.stderr()
    );
    assert!(d.stderr().contains("service s: stopped"), "{}", d.stderr());
}

/// The OOM killer picks a child before the daemon, whose death would end the container.
/// Without `CAP_SYS_RESOURCE` (Docker's and Kubernetes' default set, and this machine's
/// root) the daemon cannot go below the value it was started with: every child goes
/// 500 above it instead. With the capability the daemon goes 500 below and every child
/// gets that value back; a service running as a user cannot go below it.
#[test]
fn the_oom_killer_picks_a_child_before_the_daemon() {
    if !require_root("services as another user need root") {
        return;
    }
    let adj = |pid: u32| -> i32 {
        std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    // The value the container was started with: 100, set by the wrapper before the exec.
    let start_at_100 = |drop_cap: bool| -> Vec<String> {
        let mut w: Vec<String> = Vec::new();
        if drop_cap {
            w.extend(["setpriv", "--bounding-set", "-sys_resource"].map(String::from));
        }
        w.extend(
            [
                "sh",
                "-c",
                "echo 100 > /proc/self/oom_score_adj && exec \"$@\"",
                "sh",
            ]
            .map(String::from),
        );
        w
    };

    let ws = Workspace::new();
    let mut d = Daemon::start_wrapped(
        &ws,
        &config("[services.root]\ncommand = [\"sleep\", \"1000\"]\n"),
        &start_at_100(true),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    assert_eq!(adj(d.pid()), 100, "{}", d.report());
    let root = d
        .wait_service("root", |s| s.pid.is_some(), SHORT)
        .pid
        .unwrap();
    assert_eq!(
        adj(root),
        600,
        "without the capability the children go above"
    );
    assert!(
        d.stderr()
            .contains("oom_score_adj: the OOM killer picks a child before the daemon"),
        "{}",
        d.stderr()
    );
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(SHORT).success(), "{}", d.report());

    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    // CAP_SYS_RESOURCE is capability 24.
    if eff & (1 << 24) == 0 {
        eprintln!(
            "SKIP the daemon lowering itself: this root has no CAP_SYS_RESOURCE (the decision is unit-tested in procs)"
        );
        return;
    }
    let ws = Workspace::new();
    let mut d = Daemon::start_wrapped(
        &ws,
        &config(
            r#"
[services.root]
command = ["sleep", "1000"]

[services.user]
user = "nobody"
shell = "if echo 99 > /proc/self/oom_score_adj 2>/dev/null; then r=lowered; else r=refused; fi; echo \"user: $(cat /proc/self/oom_score_adj) $r\"; exec sleep 1000"
"#,
        ),
        &start_at_100(false),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    assert_eq!(adj(d.pid()), -400, "{}", d.report());
    let root = d
        .wait_service("root", |s| s.pid.is_some(), SHORT)
        .pid
        .unwrap();
    assert_eq!(adj(root), 100, "a child gets the container's value back");
    wait_until(SHORT, "the user service's report", || {
        d.service_log("user").contains("user: ")
    });
    assert!(
        d.service_log("user").contains("user: 100 refused"),
        "a user's service cannot go below the container's value: {}",
        d.service_log("user")
    );
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(SHORT).success(), "{}", d.report());
}
