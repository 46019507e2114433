//! The CLI's tables as a user reads them: every column starts (left-aligned) or ends
//! (right-aligned) where its header does, whatever the width of the values; `status`
//! shows per service the state, pid, uptime or since when, restarts, health and the
//! last exit.

use agent_proto::local::{Lifecycle, ServiceState};
use integration::daemon::{Daemon, Signal, Workspace};
use integration::wait_until;

use crate::support::{SHORT, config};

/// The cells of a table line: text separated by two or more spaces, with the column
/// where each starts and ends.
fn cells(line: &str) -> Vec<(usize, usize, String)> {
    let mut out = Vec::new();
    let b = line.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b' ' {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !(b[i] == b' ' && (i + 1 >= b.len() || b[i + 1] == b' ')) {
            i += 1;
        }
        out.push((start, i, line[start..i].to_string()));
    }
    out
}

/// Each row's cells lie under the header's: left-aligned columns start with it,
/// right-aligned ones end with it. Returns the rows' cells by header name.
fn check_columns(
    table: &[&str],
    right: &[&str],
) -> Vec<std::collections::BTreeMap<String, String>> {
    let header = cells(table[0]);
    let mut rows = Vec::new();
    for line in &table[1..] {
        let mut row = std::collections::BTreeMap::new();
        for (start, end, text) in cells(line) {
            let col = header
                .iter()
                .find(|(hs, he, name)| {
                    if right.contains(&name.as_str()) {
                        *he == end
                    } else {
                        *hs == start
                    }
                })
                .unwrap_or_else(|| {
                    panic!(
                        "{text:?} at {start}..{end} is under no header in\n{}",
                        table.join("\n")
                    )
                });
            row.insert(col.2.clone(), text);
        }
        rows.push(row);
    }
    rows
}

/// `status` with a long service name and a failed one: one table whose columns line up,
/// with uptime, restarts and last exit; the failed service's row says since when.
#[test]
fn status_table_lines_up_and_shows_uptime_restarts_and_last_exit() {
    let ws = Workspace::new();
    let long = "a-service-with-a-rather-long-name";
    let mut d = Daemon::start(
        &ws,
        &config(&format!(
            "[services.{long}]\nshell = \"exec sleep 1000\"\n\
             [services.crashy]\nshell = \"exit 3\"\n[services.crashy.backoff]\ninitial = \"50ms\"\nmax_failures = 2\n"
        )),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    wait_until(SHORT, "crashy to fail", || {
        d.try_status().is_ok_and(|s| {
            s.services
                .iter()
                .any(|v| v.name == "crashy" && v.state == ServiceState::Failed)
        })
    });
    let pid = d.service(long).pid.unwrap();
    let out = d.cli(["status"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("SERVICE"))
        .unwrap_or_else(|| panic!("no service table in\n{text}"));
    let table: Vec<&str> = lines[at..]
        .iter()
        .take_while(|l| !l.is_empty())
        .copied()
        .collect();
    assert_eq!(
        cells(table[0]).into_iter().map(|c| c.2).collect::<Vec<_>>(),
        [
            "SERVICE",
            "STATE",
            "PID",
            "UPTIME/SINCE",
            "RESTARTS",
            "HEALTH",
            "LAST EXIT",
            "NOTE"
        ]
    );
    let rows = check_columns(&table, &["PID", "RESTARTS"]);
    assert_eq!(rows.len(), 2, "{text}");
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["SERVICE"] == name)
            .unwrap_or_else(|| panic!("no row {name} in\n{text}"))
    };
    let crashy = row("crashy");
    assert_eq!(crashy["STATE"], "FAILED");
    assert_eq!(crashy["PID"], "-");
    assert!(crashy["UPTIME/SINCE"].starts_with("since "), "{text}");
    assert_eq!(crashy["RESTARTS"], "1");
    assert_eq!(crashy["LAST EXIT"], "exit 3");
    let up = row(long);
    assert_eq!(up["STATE"], "running");
    assert_eq!(up["PID"], pid.to_string());
    assert!(up["UPTIME/SINCE"].ends_with('s'), "{text}");
    assert_eq!(up["RESTARTS"], "0");
    assert_eq!(up["HEALTH"], "-");
    assert_eq!(up["LAST EXIT"], "-");
    assert!(
        !text.lines().any(|l| l.ends_with(' ')),
        "trailing blanks:\n{text}"
    );
    d.signal(Signal::SIGTERM);
    d.wait_exit(SHORT);
}

/// `tasks`: one table, columns under their headers.
#[test]
fn tasks_table_lines_up() {
    let ws = Workspace::new();
    let mut d = Daemon::start(
        &ws,
        &config(
            "[[task]]\nname = \"a-task-with-a-rather-long-name\"\nblocks_ready = true\nshell = 'true'\n\
             [[task]]\nname = \"bad\"\nblocks_ready = false\nshell = 'exit 7'\n",
        ),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    wait_until(SHORT, "bad to end", || {
        String::from_utf8_lossy(&d.cli(["tasks"]).stdout).contains("failed")
    });
    let out = d.cli(["tasks"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    let rows = check_columns(&lines, &["EXIT", "DURATION"]);
    let bad = rows.iter().find(|r| r["TASK"] == "bad").expect("bad");
    assert_eq!(bad["STATE"], "failed", "{text}");
    assert_eq!(bad["EXIT"], "7", "{text}");
    let long = rows
        .iter()
        .find(|r| r["TASK"] == "a-task-with-a-rather-long-name")
        .expect("long");
    assert_eq!(long["STATE"], "succeeded", "{text}");
    assert_eq!(long["EXIT"], "0", "{text}");
}
