//! The deadline is real: a server too slow for the budget costs the pushes, never the
//! local commits, and `save_all` returns on time.

use std::time::{Duration, Instant};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_repos_against_a_too_slow_server_are_all_committed_within_the_budget() {
    let fx = Fixture::new();
    let dirs: Vec<_> = (0..20)
        .map(|i| {
            let d = fx.repo(&format!("r{i:02}"));
            std::fs::write(d.join("wip.txt"), format!("work {i}\n")).unwrap();
            (i, d)
        })
        .collect();
    fx.server.set_latency(Duration::from_secs(20));
    let budget = Duration::from_secs(3);

    let t = Instant::now();
    let outcomes = fx.save(&fx.config(), budget).await;
    let took = t.elapsed();

    assert!(took < budget + Duration::from_millis(750), "took {took:?}");
    assert_eq!(outcomes.len(), 20);
    for (i, d) in &dirs {
        let o = one(&outcomes, d);
        assert_eq!(o.result, "committed", "{o:#?}");
        assert!(!o.pushed);
        assert!(o.error.as_deref().unwrap().contains("deadline"), "{o:#?}");
        let wip = format!("refs/heads/wip/{WORKSPACE}/main");
        assert_eq!(git(d, &["rev-parse", &wip]), o.commit.clone().unwrap());
        assert_eq!(
            git(d, &["show", &format!("{wip}:wip.txt")]),
            format!("work {i}")
        );
    }
    let summary = agent::save::previous_save_summary(&fx.state).unwrap();
    assert!(summary.contains("20 committed but not pushed"), "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_stuck_reading_a_trickling_answer_does_not_hold_the_save_past_the_deadline() {
    let fx = Fixture::new();
    let dirs: Vec<_> = (0..3)
        .map(|i| {
            let d = fx.repo(&format!("t{i}"));
            std::fs::write(d.join("wip.txt"), "work\n").unwrap();
            d
        })
        .collect();
    // Bytes keep coming, so no socket timeout fires inside libgit2.
    fx.server.set_trickle(Duration::from_millis(300));
    let budget = Duration::from_secs(2);

    let t = Instant::now();
    let outcomes = fx.save(&fx.config(), budget).await;
    let took = t.elapsed();

    assert!(took < budget + Duration::from_millis(750), "took {took:?}");
    for d in &dirs {
        let o = one(&outcomes, d);
        assert_eq!(o.result, "committed", "{o:#?}");
        assert!(o.error.as_deref().unwrap().contains("deadline"), "{o:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_cut_off_mid_push_is_reported_as_interrupted_by_the_next_start() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    std::fs::write(dir.join("wip.txt"), "work\n").unwrap();
    fx.server.set_latency(Duration::from_secs(20));

    // The daemon dies (here: the save's future is dropped) once the local commit is
    // made, while the push waits on the server.
    let wip = format!("refs/heads/wip/{WORKSPACE}/main");
    let committed = async {
        let t = Instant::now();
        while !git_output(&dir, &["rev-parse", "--verify", "-q", &wip])
            .status
            .success()
        {
            assert!(t.elapsed() < Duration::from_secs(20), "no local commit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let cfg = fx.config();
    tokio::select! {
        _ = fx.save(&cfg, Duration::from_secs(30)) => panic!("the save should still be pushing"),
        _ = committed => {}
    }

    let last = agent::save::last_outcomes(&fx.state);
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].result, "started");
    let summary = agent::save::previous_save_summary(&fx.state).unwrap();
    assert!(summary.contains("INTERRUPTED"), "{summary}");
    assert!(summary.contains(&last[0].repo), "{summary}");
}
