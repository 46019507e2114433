//! The repository's git config for HTTP is honoured as git honours it: `http.sslCAInfo`,
//! `http.sslVerify`, `http.proxy` and `http.extraHeader`, URL-specific ones first.

use std::time::Duration;

use crate::support::*;

fn wip() -> String {
    format!("refs/heads/wip/{WORKSPACE}/main")
}

/// A save pushes `dir`'s snapshot: the server's wip ref is the commit made.
async fn assert_saved_on_the_server(fx: &Fixture, dir: &std::path::Path) {
    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;
    let o = one(&outcomes, dir);
    assert_eq!(o.result, "pushed", "{o:#?}");
    assert_eq!(
        fx.server.ref_target("app.git", &wip()).as_deref(),
        o.commit.as_deref()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_named_by_http_sslcainfo_is_trusted_and_sslverify_false_skips_the_check() {
    let fx = Fixture::tls();
    let ca = fx.ca.clone().unwrap();
    let dir = fx.repo("app");
    std::fs::write(dir.join("wip.txt"), "over tls\n").unwrap();

    // Nothing says to trust the private CA: refused on the certificate, kept locally.
    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;
    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "committed", "{o:#?}");
    assert!(!o.pushed);
    let err = o.error.as_deref().unwrap_or_default().to_lowercase();
    assert!(err.contains("certificate"), "{o:#?}");
    assert_eq!(fx.server.ref_target("app.git", &wip()), None);

    // The repository names the CA, as it would for git.
    git(&dir, &["config", "http.sslCAInfo", ca.to_str().unwrap()]);
    let config_before = std::fs::read(dir.join(".git/config")).unwrap();
    assert_saved_on_the_server(&fx, &dir).await;
    assert_eq!(
        std::fs::read(dir.join(".git/config")).unwrap(),
        config_before
    );

    // Verification off for this server only (a URL-specific key).
    git(&dir, &["config", "--unset", "http.sslCAInfo"]);
    let key = format!("http.{}/.sslVerify", fx.server.base_url());
    git(&dir, &["config", &key, "false"]);
    std::fs::write(dir.join("wip.txt"), "over tls, unverified\n").unwrap();
    assert_saved_on_the_server(&fx, &dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_ca_file_or_a_dead_proxy_fails_the_push_naming_it_and_keeps_the_commit() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    std::fs::write(dir.join("wip.txt"), "wip\n").unwrap();
    git(
        &dir,
        &["config", "http.sslCAInfo", "/nonexistent/corp-ca.pem"],
    );

    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;
    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "committed", "{o:#?}");
    let err = o.error.as_deref().unwrap_or_default();
    assert!(
        err.contains("http.sslCAInfo /nonexistent/corp-ca.pem"),
        "{o:#?}"
    );
    assert_eq!(fx.server.ref_target("app.git", &wip()), None);

    // A proxy the repository names is where the push goes (here: nowhere).
    git(&dir, &["config", "--unset", "http.sslCAInfo"]);
    git(&dir, &["config", "http.proxy", "127.0.0.1:9"]);
    fx.server.clear_requests();
    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;
    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "committed", "{o:#?}");
    assert!(
        fx.server.requests().is_empty(),
        "nothing went around the proxy"
    );
    assert!(
        o.error
            .as_deref()
            .unwrap_or_default()
            .contains("cannot connect"),
        "{o:#?}"
    );
    // An empty proxy means none: the push goes straight to the server.
    git(&dir, &["config", "http.proxy", ""]);
    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;
    assert_eq!(one(&outcomes, &dir).result, "pushed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_headers_are_sent_and_an_authorization_among_them_replaces_the_token() {
    // The cached token is wrong: only the repository's own header can authenticate.
    let fx = Fixture::with_cached_token("tok-wrong-00000000");
    let dir = fx.repo("app");
    std::fs::write(dir.join("wip.txt"), "wip\n").unwrap();
    git(
        &dir,
        &["config", "--add", "http.extraHeader", "X-Team: blue"],
    );

    fx.server.clear_requests();
    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;
    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "committed", "the wrong token is refused: {o:#?}");
    let log = fx.server.requests();
    assert!(!log.is_empty());
    for r in &log {
        assert!(
            r.headers.iter().any(|(k, v)| k == "x-team" && v == "blue"),
            "{r:?}"
        );
    }

    // base64("u:" + TOKEN), as a CI system would configure it.
    let basic = {
        let raw = format!("u:{TOKEN}");
        let t = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in raw.as_bytes().chunks(3) {
            let n = (c[0] as u32) << 16
                | (*c.get(1).unwrap_or(&0) as u32) << 8
                | *c.get(2).unwrap_or(&0) as u32;
            for i in 0..4 {
                if i <= c.len() {
                    out.push(t[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    };
    git(
        &dir,
        &[
            "config",
            "--add",
            "http.extraHeader",
            &format!("Authorization: Basic {basic}"),
        ],
    );
    fx.server.clear_requests();
    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;
    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "pushed", "{o:#?}");
    let log = fx.server.requests();
    assert!(
        log.iter().all(|r| r.user.as_deref() == Some("u")),
        "every request authenticated by the header: {log:?}"
    );
}
