//! `wsagent demo`: the newcomer's first command. It builds a throwaway workspace in a
//! temp dir, runs the real daemon on it (as a child subreaper) with one small service
//! that has a health check and crashes once, prints the timeline from the daemon's own
//! event stream, stops it, and removes everything.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agent_proto::local::{Event, EventKind, Lifecycle, ServiceState};

use crate::api::Client;

/// The demo service: answers every HTTP request with 200; the first run (no marker yet)
/// crashes with exit code 3 after `crash_after_ms`.
pub fn service(port: u16, crash_after_ms: u64, marker: &Path) -> ExitCode {
    let listener = match TcpListener::bind(("127.0.0.1", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("demo-service: cannot listen on 127.0.0.1:{port}: {e}");
            return ExitCode::from(2);
        }
    };
    println!("demo-service listening on 127.0.0.1:{port}");
    if !marker.exists() {
        let marker = marker.to_path_buf();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(crash_after_ms));
            let _ = std::fs::write(&marker, b"crashed once\n");
            eprintln!("demo-service: crashing on purpose (exit 3)");
            std::process::exit(3);
        });
    }
    for stream in listener.incoming() {
        let Ok(mut s) = stream else { continue };
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        let _ =
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n");
    }
    ExitCode::SUCCESS
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(18080)
}

pub async fn run() -> ExitCode {
    let t0 = Instant::now();
    let dir = match tempfile::Builder::new().prefix("wsagent-demo-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("wsagent demo: cannot create a temp dir: {e}");
            return ExitCode::from(1);
        }
    };
    let code = run_in(dir.path(), t0).await;
    drop(dir);
    code
}

fn say(t0: Instant, msg: &str) {
    println!("{:>7.3}s  {msg}", t0.elapsed().as_secs_f64());
}

async fn run_in(dir: &Path, t0: Instant) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("wsagent demo: cannot find my own binary: {e}");
            return ExitCode::from(1);
        }
    };
    let home = dir.join("home");
    let state = dir.join("state");
    let socket = dir.join("wsagent.sock");
    let port = free_port();
    let _ = std::fs::create_dir_all(&home);
    let remote = dir.join("remote.git");
    let repo_dir = home.join("projects/hello");
    if let Err(e) = make_dirty_repo(&repo_dir, &remote) {
        eprintln!("wsagent demo: cannot create the demo repository: {e}");
        return ExitCode::from(1);
    }
    let config = format!(
        r#"# wsagent demo configuration
[daemon]
state_dir = "{state}"

[shutdown]
budget = "10s"

[save]
roots = ["{projects}"]

[services.dockerd]
enabled = false
[services.code-server]
enabled = false
[services.coder-agent]
enabled = false

[services.web]
command = ["{exe}", "demo-service", "--port", "{port}", "--crash-after-ms", "1500", "--marker", "{marker}"]
stop_timeout = "3s"
[services.web.backoff]
initial = "300ms"
[services.web.health]
kind = "http"
url = "http://127.0.0.1:{port}/healthz"
interval = "500ms"
"#,
        state = state.display(),
        projects = home.join("projects").display(),
        exe = exe.display(),
        marker = dir.join("crashed").display(),
    );
    let cfg_path = dir.join("config.toml");
    if let Err(e) = std::fs::write(&cfg_path, &config) {
        eprintln!("wsagent demo: cannot write {}: {e}", cfg_path.display());
        return ExitCode::from(1);
    }
    println!("wsagent demo: a throwaway workspace in {}", dir.display());
    println!("  config: one service `web` (HTTP health check on :{port}) that crashes once");
    println!("  git:    ~/projects/hello has uncommitted work; its remote is a local bare repo\n");
    let log = std::fs::File::create(dir.join("daemon.log")).ok();
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(["run", "--config"])
        .arg(&cfg_path)
        .arg("--socket")
        .arg(&socket)
        .env("HOME", &home)
        .env("WSAGENT_SYSTEM_CONFIG", dir.join("no-system-config"))
        .env("CODER_WORKSPACE_NAME", "demo")
        // The demo's snapshot ref is wip/demo/main, in a real workspace too.
        .env_remove("CODER_WORKSPACE_OWNER_NAME")
        .env_remove("WSAGENT_SOCKET")
        .env_remove("CODER_AGENT_TOKEN")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    if let Some(l) = log {
        cmd.stderr(l);
    }
    let mut daemon = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wsagent demo: cannot start the daemon: {e}");
            return ExitCode::from(1);
        }
    };
    let result = tour(&socket, t0).await;
    let status = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(12);
        loop {
            match daemon.try_wait() {
                Ok(Some(st)) => return Some(st),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = daemon.kill();
                    return daemon.wait().ok();
                }
            }
        }
    })
    .await
    .ok()
    .flatten();
    match (result, status) {
        (Ok(()), Some(st)) if st.success() => {
            say(t0, "daemon exited 0");
            match saved_files(&remote) {
                Some(files) => say(
                    t0,
                    &format!(
                        "the remote now holds refs/heads/wip/demo/main: {}",
                        files.join(", ")
                    ),
                ),
                None => {
                    eprintln!("wsagent demo: the work did not reach the remote");
                    return ExitCode::from(1);
                }
            }
            println!(
                "\nThat is wsagent: start, health check, restart, git work saved, ordered stop. Next: README.md (Configuration)."
            );
            ExitCode::SUCCESS
        }
        (Ok(()), st) => {
            eprintln!(
                "wsagent demo: the daemon ended with {st:?}; its log:\n{}",
                std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
            );
            ExitCode::from(1)
        }
        (Err(e), _) => {
            eprintln!(
                "wsagent demo: {e}; the daemon's log:\n{}",
                std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
            );
            ExitCode::from(1)
        }
    }
}

async fn tour(socket: &Path, t0: Instant) -> Result<(), String> {
    let client = Client::new(socket.to_path_buf());
    client
        .wait_reachable(Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())?;
    let mut events = client
        .request("GET", "/v1/events?replay=true", None)
        .await
        .map_err(|e| e.to_string())?;
    let mut ready = false;
    let mut crashed = false;
    let mut restarted = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
    while !(ready && restarted) {
        let line = tokio::time::timeout_at(deadline, events.next_line())
            .await
            .map_err(|_| "the demo did not reach its restart in time".to_string())?
            .ok_or("the event stream ended early")?;
        let Ok(ev) = serde_json::from_str::<Event>(&line) else {
            continue;
        };
        if matches!(ev.kind, EventKind::Step { ref outcome, .. } if outcome == "running") {
            continue;
        }
        say(t0, &ev.message);
        match ev.kind {
            EventKind::Lifecycle {
                state: Lifecycle::Ready,
            } => ready = true,
            EventKind::Lifecycle {
                state: Lifecycle::StartError | Lifecycle::StartTimeout,
            } => {
                return Err(format!("startup ended: {}", ev.message));
            }
            EventKind::Service {
                state: ServiceState::Backoff,
                ..
            } if ready => crashed = true,
            EventKind::Service {
                state: ServiceState::Running,
                ..
            } if crashed => restarted = true,
            _ => {}
        }
    }
    say(
        t0,
        "-- the service crashed and was restarted; now `wsagent shutdown --wait`:",
    );
    let body =
        serde_json::to_vec(&agent_proto::local::ShutdownRequest { wait: true }).unwrap_or_default();
    let mut stop = client
        .request("POST", "/v1/shutdown", Some(body))
        .await
        .map_err(|e| e.to_string())?;
    let mut off = false;
    while let Some(line) =
        tokio::time::timeout_at(deadline + Duration::from_secs(5), stop.next_line())
            .await
            .ok()
            .flatten()
    {
        let Ok(ev) = serde_json::from_str::<Event>(&line) else {
            continue;
        };
        if matches!(ev.kind, EventKind::Step { ref outcome, .. } if outcome == "running") {
            continue;
        }
        say(t0, &ev.message);
        if let EventKind::Lifecycle { state } = ev.kind {
            off = state == Lifecycle::Off;
        }
    }
    if off {
        Ok(())
    } else {
        Err("the stop sequence did not end `off`".into())
    }
}

/// A repository with one commit on `main` pushed to `remote` (a bare repo), then
/// uncommitted work: a modified file and a new one.
fn make_dirty_repo(dir: &Path, remote: &Path) -> Result<(), git2::Error> {
    git2::Repository::init_bare(remote)?;
    let repo =
        git2::Repository::init_opts(dir, git2::RepositoryInitOptions::new().initial_head("main"))?;
    std::fs::write(dir.join("README.md"), "# hello\n")
        .map_err(|e| git2::Error::from_str(&e.to_string()))?;
    let mut index = repo.index()?;
    index.add_path(Path::new("README.md"))?;
    index.write()?;
    let tree = repo.find_tree(index.write_tree()?)?;
    let sig = git2::Signature::now("Demo", "demo@localhost")?;
    repo.commit(Some("HEAD"), &sig, &sig, "first commit", &tree, &[])?;
    repo.remote("origin", &remote.display().to_string())?;
    repo.find_remote("origin")?
        .push(&["refs/heads/main:refs/heads/main"], None)?;
    let io = |e: std::io::Error| git2::Error::from_str(&e.to_string());
    std::fs::write(dir.join("README.md"), "# hello\n\nwork in progress\n").map_err(io)?;
    std::fs::write(dir.join("notes.txt"), "not committed yet\n").map_err(io)?;
    Ok(())
}

/// The files of the snapshot ref on the demo's remote.
fn saved_files(remote: &Path) -> Option<Vec<String>> {
    let repo = git2::Repository::open_bare(remote).ok()?;
    let tree = repo
        .find_reference("refs/heads/wip/demo/main")
        .ok()?
        .peel_to_tree()
        .ok()?;
    Some(
        tree.iter()
            .filter_map(|e| e.name().ok().map(String::from))
            .collect(),
    )
}
