//! What `wsagent save` prints, as a user sees it: in a pipe, plain lines (a header, each
//! repository as it lands, a summary, the failures again with what to do); with
//! `--json`, one object a line; on a terminal, a live progress line besides.

use std::io::Read;

use agent_proto::local::Lifecycle;
use integration::daemon::{Daemon, Workspace, wsagent_bin};
use integration::gitserver::GitServer;

use crate::repos::{cache_token, dirty_repo, git, provider_for};
use crate::support::{SHORT, config};

const TOKEN: &str = "ghs_output_7h6g5f4e3d";

/// Two repositories with a remote and one without: a daemon ready to save them.
fn three_repos(ws: &Workspace) -> (GitServer, Daemon, std::path::PathBuf) {
    let server = GitServer::start(ws.path().join("srv"), TOKEN).unwrap();
    dirty_repo(&server, &ws.home(), "a");
    dirty_repo(&server, &ws.home(), "b");
    let lonely = ws.home().join("projects/lonely");
    std::fs::create_dir_all(&lonely).unwrap();
    git(&lonely, &["init", "-q"]);
    std::fs::write(lonely.join("notes.txt"), "mine\n").unwrap();
    git(&lonely, &["add", "."]);
    git(&lonely, &["commit", "-q", "-m", "first"]);
    std::fs::write(lonely.join("notes.txt"), "mine, unsaved\n").unwrap();
    cache_token(&ws.home(), TOKEN);
    let mut d = Daemon::start(ws, &config(&provider_for(&server)));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    (server, d, lonely)
}

/// In a pipe: the header, the three outcomes (in the order they land), the summary with
/// the time, and on stderr the repository not pushed again with the fix; exit 1.
#[test]
fn save_in_a_pipe_prints_header_outcomes_summary_and_the_fix() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let (server, d, lonely) = three_repos(&ws);
    let out = d.cli(["save"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert_eq!(lines[0], "saving 3 repositories…");
    let mut landed: Vec<&str> = lines[1..4].to_vec();
    landed.sort();
    let home = ws.home();
    let p = |n: &str| home.join("projects").join(n).display().to_string();
    let lonely_line = format!(
        "not pushed  {}: committed locally on refs/heads/wip/ws1/main: no remote",
        p("lonely")
    );
    assert_eq!(
        landed,
        [
            lonely_line.as_str(),
            &format!(
                "pushed      {} -> refs/heads/wip/ws1/main on {}",
                p("a"),
                server.url("a.git")
            ),
            &format!(
                "pushed      {} -> refs/heads/wip/ws1/main on {}",
                p("b"),
                server.url("b.git")
            ),
        ],
        "{text}"
    );
    let summary = lines[4];
    assert!(
        summary.starts_with("2 pushed, 1 not pushed in ") && summary.ends_with(" s"),
        "{summary}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "not saved to a remote:\n  {lonely_line}\n    fix: give it a remote: git -C {l} remote add origin URL, then wsagent save --repo {l}\nwsagent: 1 of 3 repositories not pushed\n",
            l = lonely.display()
        )
    );
}

/// `--json`: one JSON object a line, `started` (3 repositories), one `repo` each, `done`
/// with all three; nothing else on stdout.
#[test]
fn save_json_is_one_object_a_line() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let (_server, d, _) = three_repos(&ws);
    let out = d.cli(["save", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let objs: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let types: Vec<&str> = objs.iter().map(|o| o["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["started", "repo", "repo", "repo", "done"], "{text}");
    assert_eq!(objs[0]["repos"], 3);
    let mut results: Vec<&str> = objs[1..4]
        .iter()
        .map(|o| o["outcome"]["result"].as_str().unwrap())
        .collect();
    results.sort();
    assert_eq!(results, ["committed", "pushed", "pushed"]);
    assert_eq!(objs[4]["outcomes"].as_array().unwrap().len(), 3);
}

/// On a terminal: the same lines, and a live progress line drawn under them (a bar of
/// the repositories done out of those found) that is cleared before the summary.
#[test]
fn save_on_a_terminal_draws_a_live_progress_line() {
    let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let (_server, _daemon, _) = three_repos(&ws);
    let pty = nix::pty::openpty(
        Some(&nix::pty::Winsize {
            ws_row: 40,
            ws_col: 200,
            ws_xpixel: 0,
            ws_ypixel: 0,
        }),
        None,
    )
    .unwrap();
    let mut cmd = ws.command(wsagent_bin());
    cmd.arg("--socket")
        .arg(ws.socket())
        .arg("save")
        .env("TERM", "xterm")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(pty.slave.try_clone().unwrap()))
        .stderr(std::process::Stdio::from(pty.slave));
    let mut child = cmd.spawn().unwrap();
    // The command holds the slave's fds: only the child may, so the reader ends with it.
    drop(cmd);
    let mut master = std::fs::File::from(pty.master);
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        // Ends with EIO once the child (the slave's last holder) has exited.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
        }
        all
    });
    let st = integration::wait_until(SHORT, "wsagent save to end", || {
        child.try_wait().ok().flatten()
    });
    assert_eq!(st.code(), Some(1));
    let seen = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    assert!(seen.contains("saving 3 repositories…"), "{seen:?}");
    assert!(
        seen.contains("/3 repositories"),
        "no progress line in {seen:?}"
    );
    assert!(seen.contains("\u{1b}["), "no terminal control in {seen:?}");
    assert!(seen.contains("2 pushed, 1 not pushed in "), "{seen:?}");
}
