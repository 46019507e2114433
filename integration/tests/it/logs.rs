//! `wsagent logs`: `--since` (a duration or a time), `--timestamps`, a task's output by
//! its name, and `daemon` for the daemon's own log — what a user types and reads.

use std::time::SystemTime;

use agent_proto::local::Lifecycle;
use integration::daemon::{Daemon, Workspace};
use integration::wait_until;

use crate::support::{SHORT, config};

fn is_stamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 24
        && b[10] == b'T'
        && b[19] == b'.'
        && b[23] == b'Z'
        && s.chars().filter(char::is_ascii_digit).count() == 17
}

/// `--since` keeps only the lines from then on (a duration or an RFC 3339 time),
/// `--timestamps` prefixes each with its UTC time, and a bad `--since` is a usage error
/// naming what it takes.
#[test]
fn logs_since_and_timestamps_filter_and_show_each_lines_time() {
    let ws = Workspace::new();
    let trigger = ws.path().join("more");
    let mut d = Daemon::start(
        &ws,
        &config(&format!(
            "[services.talker]\nshell = \"echo early 1; echo early 2; while [ ! -f {t} ]; do sleep 0.05; done; echo late 1; exec sleep 1000\"\n",
            t = trigger.display()
        )),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    wait_until(SHORT, "the early lines logged", || {
        d.service_log("talker").contains("early 2")
    });
    // A moment strictly after the early lines' (millisecond) stamps.
    let early = d.service_log("talker");
    let last_early = early.lines().last().unwrap()[..24].to_string();
    let mid = loop {
        let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        if now > last_early {
            break now;
        }
    };
    std::fs::write(&trigger, "").unwrap();
    wait_until(SHORT, "the late line logged", || {
        d.service_log("talker").contains("late 1")
    });

    let out = d.cli(["logs", "talker", "--since", &mid]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "late 1\n");

    let out = d.cli(["logs", "talker", "--since", "1h"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "early 1\nearly 2\nlate 1\n"
    );

    let out = d.cli(["logs", "talker", "--timestamps", "-n", "2"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    for (line, want) in lines.iter().zip(["early 2", "late 1"]) {
        let (at, rest) = line.split_once(' ').unwrap();
        assert!(is_stamp(at), "{line:?}");
        assert_eq!(rest, want);
    }
    assert!(lines[1][..24] >= *mid, "{text}");

    let out = d.cli(["logs", "talker", "--since", "yesterday"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("neither a duration"),
        "{out:?}"
    );
}

/// A startup task's output is shown by the task's name; `daemon` shows the daemon's own
/// log as `time LEVEL message key=value`; another name says what exists.
#[test]
fn logs_shows_a_tasks_output_and_the_daemons_own_log() {
    let ws = Workspace::new();
    let mut d = Daemon::start(
        &ws,
        &config(
            "[[task]]\nname = \"build\"\nblocks_ready = true\nshell = 'echo built the thing'\n\n\
             [services.s]\ncommand = [\"sleep\", \"1000\"]\n",
        ),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);

    let out = d.cli(["logs", "build"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("built the thing"),
        "{out:?}"
    );

    wait_until(SHORT, "the daemon's log written", || {
        std::fs::read_to_string(ws.state_dir().join("wsagent.log"))
            .is_ok_and(|l| l.contains("lifecycle ready"))
    });
    let out = d.cli(["logs", "daemon", "--timestamps", "--since", "10m"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let ready = text
        .lines()
        .find(|l| l.contains("lifecycle ready"))
        .unwrap_or_else(|| panic!("no lifecycle line in\n{text}"));
    assert!(is_stamp(&ready[..24]), "{ready}");
    assert_eq!(&ready[24..], " INFO  lifecycle ready lifecycle=ready");
    assert!(!text.contains('{'), "JSON shown raw:\n{text}");

    let out = d.cli(["logs", "nosuch"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no service or task named \"nosuch\""),
        "{out:?}"
    );
}
