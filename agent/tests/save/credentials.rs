//! Credentials: tokens are tried freshest first and a rejected one gives way to the
//! next; a remote URL's own userinfo is used by nobody's logs.

use std::sync::Arc;
use std::time::Duration;

use agent::secrets::Secret;
use agent::tokens::FreshFetch;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_fresh_token_gives_way_to_the_cached_one() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    std::fs::write(dir.join("wip.txt"), "wip\n").unwrap();
    let mut env = fx.env();
    let fresh: FreshFetch =
        Arc::new(|_id| Box::pin(async { Some(Secret::new("tok-stale-0f0f0f0f")) }));
    env.tokens.fresh = Some(fresh);
    fx.server.clear_requests();

    let outcomes = fx
        .save_with(&env, &fx.config(), &stop(), Duration::from_secs(30))
        .await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "pushed", "{o:#?}");
    let log = fx.server.requests();
    assert!(
        log.iter().any(|r| r.sent_credentials && r.status == 401),
        "the stale token was tried first: {log:?}"
    );
    assert!(
        log.iter()
            .any(|r| r.push && r.user.as_deref() == Some("x-access-token"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userinfo_in_a_remote_url_stays_out_of_outcomes_journal_and_events() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    let secret_url =
        fx.server
            .url("app.git")
            .replacen("http://", "http://alice:pw-in-url-4242@", 1);
    git(&dir, &["remote", "set-url", "origin", &secret_url]);
    std::fs::write(dir.join("wip.txt"), "wip\n").unwrap();
    let config_before = std::fs::read(dir.join(".git/config")).unwrap();
    let mut events = fx.events.subscribe();

    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "pushed", "{o:#?}");
    assert_eq!(o.remote.as_deref(), Some(fx.server.url("app.git").as_str()));
    assert!(!format!("{outcomes:?}").contains("pw-in-url"));
    let journal = std::fs::read_to_string(fx.state.join("save-journal.jsonl")).unwrap();
    assert!(!journal.contains("pw-in-url"));
    while let Ok(ev) = events.try_recv() {
        assert!(!format!("{ev:?}").contains("pw-in-url"), "{ev:?}");
    }
    assert_eq!(
        std::fs::read(dir.join(".git/config")).unwrap(),
        config_before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_fresh_token_fetch_does_not_stop_the_push_with_the_cached_token() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    std::fs::write(dir.join("wip.txt"), "wip\n").unwrap();
    let mut env = fx.env();
    let fresh: FreshFetch = Arc::new(|_id| Box::pin(std::future::pending()));
    env.tokens.fresh = Some(fresh);
    let budget = Duration::from_secs(6);

    let t = std::time::Instant::now();
    let outcomes = fx.save_with(&env, &fx.config(), &stop(), budget).await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "pushed", "{o:#?}");
    assert!(t.elapsed() < budget, "took {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ssh_remote_of_a_known_host_is_pushed_over_its_https_twin() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    git(
        &dir,
        &["remote", "set-url", "origin", "git@127.0.0.1:team/app.git"],
    );
    std::fs::write(dir.join("wip.txt"), "wip\n").unwrap();
    let config_before = std::fs::read(dir.join(".git/config")).unwrap();
    let mut env = fx.env();
    let mut p = env.tokens.providers["test"].clone();
    p.host = "127.0.0.1".into();
    env.tokens.providers.insert("local".into(), p);

    let outcomes = fx
        .save_with(&env, &fx.config(), &stop(), Duration::from_secs(30))
        .await;

    // Nothing listens on 127.0.0.1:443: the point is where the push went.
    let o = one(&outcomes, &dir);
    assert_eq!(
        o.remote.as_deref(),
        Some("https://127.0.0.1/team/app.git"),
        "{o:#?}"
    );
    assert_eq!(o.result, "committed", "{o:#?}");
    assert_eq!(
        std::fs::read(dir.join(".git/config")).unwrap(),
        config_before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_goes_with_the_first_request_so_a_push_is_two_requests_without_a_401() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    std::fs::write(dir.join("wip.txt"), "wip\n").unwrap();
    fx.server.clear_requests();

    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "pushed", "{o:#?}");
    let log = fx.server.requests();
    let summary: Vec<(String, String, u16, Option<String>)> = log
        .iter()
        .map(|r| (r.method.clone(), r.path.clone(), r.status, r.user.clone()))
        .collect();
    let user = Some("x-access-token".to_string());
    assert_eq!(
        summary,
        vec![
            ("GET".into(), "/app.git/info/refs".into(), 200, user.clone()),
            ("POST".into(), "/app.git/git-receive-pack".into(), 200, user),
        ],
        "{log:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_a_moved_repository_follows_the_redirect_of_its_ref_advertisement() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    // The repository is renamed on the server, which now redirects its old name.
    std::fs::rename(fx.server.path("app.git"), fx.server.path("renamed.git")).unwrap();
    fx.server.set_moved("app.git", "renamed.git");
    std::fs::write(dir.join("wip.txt"), "wip\n").unwrap();
    let config_before = std::fs::read(dir.join(".git/config")).unwrap();
    fx.server.clear_requests();

    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "pushed", "{o:#?}");
    let wip = format!("refs/heads/wip/{WORKSPACE}/main");
    assert_eq!(
        fx.server.ref_target("renamed.git", &wip).as_deref(),
        o.commit.as_deref()
    );
    let log: Vec<(String, String, u16, bool)> = fx
        .server
        .requests()
        .into_iter()
        .map(|r| (r.method, r.path, r.status, r.user.is_some()))
        .collect();
    let req = |m: &str, p: &str, s: u16| (m.to_string(), p.to_string(), s, true);
    assert_eq!(
        log,
        [
            req("GET", "/app.git/info/refs", 301),
            req("GET", "/renamed.git/info/refs", 200),
            req("POST", "/renamed.git/git-receive-pack", 200),
        ],
        "the token goes along (same host) and the pack follows the advertisement"
    );
    assert_eq!(
        std::fs::read(dir.join(".git/config")).unwrap(),
        config_before,
        "the repository's remote is not rewritten"
    );
}
