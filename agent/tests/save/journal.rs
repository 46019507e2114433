//! The save journal after a torn last line (power loss or SIGKILL mid-write): every
//! later record stands alone, and the torn one is skipped and counted.

use std::io::Write;
use std::time::Duration;

use agent::save::journal::{JOURNAL_FILE, read_journal};
use agent::save::{Journal, previous_save_summary};
use agent_proto::save::RepoOutcome;

use crate::support::*;

/// Half a journal line, cut inside a multi-byte character (no newline, not UTF-8).
const TORN: &[u8] = b"{\"repo\":\"/home/coder/projects/x\",\"note\":\"caf\xc3";

fn tear(state: &std::path::Path) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(state.join(JOURNAL_FILE))
        .unwrap();
    f.write_all(TORN).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_after_a_torn_line_journals_whole_lines_and_the_torn_one_is_counted() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    std::fs::write(dir.join("a.txt"), "one\n").unwrap();
    let first = fx.save(&fx.config(), Duration::from_secs(30)).await;
    assert_eq!(one(&first, &dir).result, "pushed", "{first:#?}");
    tear(&fx.state);
    std::fs::write(dir.join("a.txt"), "two\n").unwrap();

    let second = fx.save(&fx.config(), Duration::from_secs(30)).await;

    assert_eq!(one(&second, &dir).result, "pushed", "{second:#?}");
    let results: Vec<String> = read_journal(&fx.state)
        .into_iter()
        .map(|o| o.result.to_string())
        .collect();
    assert_eq!(results, ["started", "pushed", "started", "pushed"]);
    let summary = previous_save_summary(&fx.state).unwrap();
    assert!(summary.starts_with("last save: 1 pushed"), "{summary}");
    assert!(summary.contains("1 torn journal line skipped"), "{summary}");
}

#[test]
fn a_save_killed_after_a_torn_line_is_reported_interrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let j = Journal::new(tmp.path());
    let line = |result: &str| RepoOutcome {
        repo: "/home/coder/projects/app".into(),
        result: result.parse().unwrap(),
        ..Default::default()
    };
    j.append(&line("pushed")).unwrap();
    tear(tmp.path());

    // The next save dies (SIGKILL) right after its `started` line.
    j.append(&line("started")).unwrap();

    let summary = previous_save_summary(tmp.path()).unwrap();
    assert!(
        summary.contains("INTERRUPTED") && summary.contains("/home/coder/projects/app"),
        "{summary}"
    );
    assert!(summary.contains("1 torn journal line skipped"), "{summary}");
}
