//! The local API's boundary, tried as an attacker would: the unprivileged workspace
//! user (`daemon.api_user`, a real uid: nobody) against a root daemon must get nothing
//! it could not read itself; a client that connects and stalls must not exhaust the
//! daemon nor hold its exit.

use std::io::{BufRead, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use agent_proto::local::{Event, EventKind, Lifecycle, ServiceState};
use integration::daemon::{CLI_TIMEOUT, Daemon, Signal, Workspace, output_within, wsagent_bin};
use integration::gitserver::GitServer;
use integration::{try_wait_until, wait_until};

use crate::cli::bin_for_other_uids;
use crate::repos::{cache_token, git, provider_for};
use crate::support::{LONG, SHORT, config};

const NOBODY: u32 = 65534;
const TOKEN: &str = "ghs_api_boundary_7c1d0e";

/// A root daemon serving nobody (who owns HOME, with a `pushurl` to a repository of its
/// own in `~/.gitconfig`), and a repository only root may read (`<ws>/vault`, 0700),
/// dirty, whose origin is `root.git`.
struct Attack {
    ws: Workspace,
    server: GitServer,
    secret: PathBuf,
    d: Daemon,
}

impl Attack {
    fn start() -> Option<Attack> {
        if !integration::real::require_root("a real unprivileged user against a root daemon") {
            return None;
        }
        let ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
        std::fs::set_permissions(ws.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let server = GitServer::start(ws.path().join("srv"), TOKEN).expect("git server");
        server.create_bare("root.git").unwrap();
        server.create_bare("user.git").unwrap();

        let vault = ws.path().join("vault");
        std::fs::create_dir(&vault).unwrap();
        std::fs::set_permissions(&vault, std::fs::Permissions::from_mode(0o700)).unwrap();
        let secret = vault.join("secret");
        std::fs::create_dir(&secret).unwrap();
        git(&secret, &["init", "-q"]);
        std::fs::write(secret.join("secret.txt"), "root's secret\n").unwrap();
        git(&secret, &["add", "."]);
        git(&secret, &["commit", "-q", "-m", "root only"]);
        std::fs::write(secret.join("more.txt"), "more of root's secret\n").unwrap();
        git(
            &secret,
            &["remote", "add", "origin", &server.url("root.git")],
        );

        let home = ws.home();
        std::fs::write(
            home.join(".gitconfig"),
            format!(
                "[remote \"origin\"]\n\tpushurl = {}\n",
                server.url("user.git")
            ),
        )
        .unwrap();
        cache_token(&home, TOKEN);
        std::fs::create_dir_all(home.join("projects")).unwrap();
        chown_tree(&home, NOBODY);

        let mut d = Daemon::start(
            &ws,
            &config(&format!(
                "[daemon]\napi_user = \"nobody\"\n{}[services.s]\nshell = \"echo service says hello; exec sleep 1000\"\n",
                provider_for(&server)
            )),
        );
        d.wait_lifecycle(Lifecycle::Ready, SHORT);
        Some(Attack {
            ws,
            server,
            secret,
            d,
        })
    }

    /// `wsagent ARGS` as nobody, HOME the workspace's.
    fn as_user(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin_for_other_uids(&self.ws));
        cmd.arg("--socket")
            .arg(self.ws.socket())
            .args(args)
            .current_dir("/")
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", self.ws.home())
            .env("WSAGENT_SYSTEM_CONFIG", "/nonexistent")
            .uid(NOBODY)
            .gid(NOBODY);
        output_within(cmd, CLI_TIMEOUT)
    }

    /// Every ref of the server's repositories and every snapshot ref of the root-only
    /// repository: what a save of it would have left.
    fn traces(&self) -> Vec<String> {
        let mut refs = Vec::new();
        for name in ["root.git", "user.git"] {
            let repo = git2::Repository::open_bare(self.server.path(name)).unwrap();
            for r in repo.references().unwrap().flatten() {
                refs.push(format!("{name}: {}", r.name().unwrap_or("?")));
            }
        }
        let local = git(
            &self.secret,
            &["for-each-ref", "--format=%(refname)", "refs/heads/wip"],
        );
        refs.extend(local.lines().map(|l| format!("secret: {l}")));
        refs
    }
}

/// `chown -R uid:uid` without following links.
fn chown_tree(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).expect("chown");
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        for e in std::fs::read_dir(path).unwrap().flatten() {
            chown_tree(&e.path(), uid);
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `wsagent save --repo` naming a repository the API user cannot read is refused (exit
/// 1, "permission denied"): the daemon does not save it as root to the push URL the
/// user's own `~/.gitconfig` gives, and writes nothing in it.
#[test]
fn the_api_user_cannot_save_a_repository_it_cannot_read() {
    let Some(a) = Attack::start() else { return };
    let secret = a.secret.display().to_string();
    let out = a.as_user(&["save", "--repo", &secret]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "permission denied: uid {NOBODY} may not save {secret}"
        )),
        "{err}"
    );
    assert_eq!(a.traces(), Vec::<String>::new(), "{}", a.d.stderr());
    // A dry run shows no file of it either.
    let dry = a.as_user(&["save", "--repo", &secret, "--dry-run"]);
    assert_eq!(dry.status.code(), Some(1), "{dry:?}");
    assert!(!text(&dry.stdout).contains("more.txt"), "{dry:?}");

    // The user's own repository is saved, with the user's permissions.
    let own = a.ws.home().join("projects/own");
    std::fs::create_dir(&own).unwrap();
    git(&own, &["init", "-q"]);
    std::fs::write(own.join("mine.txt"), "the user's work\n").unwrap();
    git(&own, &["add", "."]);
    git(&own, &["commit", "-q", "-m", "mine"]);
    std::fs::write(own.join("unsaved.txt"), "the user's unsaved work\n").unwrap();
    git(
        &own,
        &["remote", "add", "origin", &a.server.url("user.git")],
    );
    chown_tree(&own, NOBODY);
    let saved = a.as_user(&["save", "--repo", own.to_str().unwrap()]);
    assert!(saved.status.success(), "{saved:?}");
    assert_eq!(
        a.traces(),
        ["user.git: refs/heads/wip/ws1/main"],
        "{}",
        a.d.stderr()
    );
    assert!(
        walk_owners(&own.join(".git")).iter().all(|&u| u == NOBODY),
        "a file in the user's .git is not the user's"
    );
}

/// The owners of everything under `dir`.
fn walk_owners(dir: &Path) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let mut owners = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = e.metadata().unwrap();
            owners.push(m.uid());
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    owners
}

/// A `.git` *file* in the user's own worktree naming root's git directory: the save
/// works on it with the worktree owner's permissions, so it fails naming the directory
/// in the way, and nothing of root's repository is pushed or written.
#[test]
fn a_git_file_pointing_at_a_root_only_repository_is_not_saved_as_root() {
    let Some(a) = Attack::start() else { return };
    let evil = a.ws.home().join("projects/evil");
    std::fs::create_dir(&evil).unwrap();
    std::fs::write(
        evil.join(".git"),
        format!("gitdir: {}\n", a.secret.join(".git").display()),
    )
    .unwrap();
    std::fs::write(evil.join("bait.txt"), "the user's file\n").unwrap();
    chown_tree(&evil, NOBODY);

    let out = a.as_user(&["save"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        all.contains(&format!("uid {NOBODY}, the owner of {}", evil.display()))
            && all.contains("cannot reach"),
        "{all}"
    );
    assert_eq!(a.traces(), Vec::<String>::new(), "{}", a.d.stderr());
}

/// `wsagent logs NAME` reads the service's log for the user: once the user (who owns
/// the state directory, under HOME in a workspace) puts a link to a root-only file at
/// the log's path, or at its rotated one, the read is refused and the file not shown.
#[test]
fn the_api_user_cannot_read_a_root_file_through_a_linked_log() {
    let Some(a) = Attack::start() else { return };
    let log = a.ws.service_log_path("s");
    wait_until(SHORT, "the service's line in its log", || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("service says hello"))
    });
    let shown = a.as_user(&["logs", "s"]);
    assert!(shown.status.success(), "{shown:?}");
    assert_eq!(text(&shown.stdout), "service says hello\n");

    chown_tree(&a.ws.state_dir().join("logs"), NOBODY);
    let target = a.secret.join("secret.txt");
    for linked in [log.clone(), PathBuf::from(format!("{}.1", log.display()))] {
        // As the user: move the real log away, put a link in its place.
        let moved = PathBuf::from(format!("{}.away", linked.display()));
        let swap = Command::new("sh")
            .arg("-c")
            .arg(r#"{ [ ! -e "$1" ] || mv "$1" "$2"; } && ln -s "$3" "$1""#)
            .args(["swap", linked.to_str().unwrap()])
            .arg(&moved)
            .arg(&target)
            .uid(NOBODY)
            .gid(NOBODY)
            .status()
            .unwrap();
        assert!(swap.success());
        let out = a.as_user(&["logs", "s"]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(!text(&out.stdout).contains("root's secret"), "{out:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!(
                "permission denied: uid {NOBODY} may not read the log {}: it is a symbolic link",
                linked.display()
            )),
            "{err}"
        );
        std::fs::remove_file(&linked).unwrap();
        if moved.exists() {
            std::fs::rename(&moved, &linked).unwrap();
        }
    }
}

/// A raw connection to the daemon's socket.
fn connect(ws: &Workspace) -> UnixStream {
    UnixStream::connect(ws.socket()).expect("connect to the socket")
}

/// What arrived before the daemon closed `s`, if it closed it within `timeout`.
fn closed_within(s: &mut UnixStream, timeout: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(got),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

const HALF_HEAD: &[u8] = b"GET /v1/status HTTP/1.1\r\nhost: wsagent\r\n";
const HALF_BODY: &[u8] = b"POST /v1/save HTTP/1.1\r\nhost: wsagent\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"repo\":";

/// Clients that connect and stall (idle, half a request head, half a body) take at most
/// 64 connections: one more is answered 503 and closed at once; the stalled ones are
/// closed after a few seconds (a half body with 408); then `wsagent status` is answered
/// again, and an event stream opened before them still streams.
#[test]
fn stalled_connections_are_capped_and_closed_and_streams_live_on() {
    let ws = Workspace::new();
    let mut d = Daemon::start(
        &ws,
        &config("[services.s]\ncommand = [\"sleep\", \"1000\"]\n"),
    );
    d.wait_lifecycle(Lifecycle::Ready, SHORT);

    let mut events = ws.command(wsagent_bin());
    events
        .args(["events", "--json", "--since", "10m"])
        .stdout(std::process::Stdio::piped());
    let mut events = events.spawn().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = events.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx.recv_timeout(SHORT)
        .expect("the event stream replays the start");

    let payloads: [&[u8]; 3] = [b"", HALF_HEAD, HALF_BODY];
    let mut conns: Vec<(usize, UnixStream)> = (0..70)
        .map(|i| {
            let mut s = connect(&ws);
            // A refused connection may already be closed: writing then fails, fine.
            let _ = s.write_all(payloads[i % 3]);
            (i, s)
        })
        .collect();
    // Those over the limit are answered and closed at once.
    let mut refused = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) && refused.len() < 6 {
        for (i, s) in conns.iter_mut() {
            if refused.iter().any(|(j, _)| j == i) {
                continue;
            }
            if let Some(reply) = closed_within(s, Duration::from_millis(5)) {
                refused.push((*i, reply));
            }
        }
    }
    assert!(
        refused.len() >= 6,
        "70 connections with 64 allowed: {} closed at once",
        refused.len()
    );
    for (i, reply) in &refused {
        assert!(
            reply.is_empty() || text(reply).starts_with("HTTP/1.1 503"),
            "connection {i}: {}",
            text(reply)
        );
    }
    conns.retain(|(i, _)| !refused.iter().any(|(j, _)| j == i));

    // The stalled ones are closed by the daemon within a few seconds.
    for (i, s) in conns.iter_mut() {
        let reply = closed_within(s, SHORT)
            .unwrap_or_else(|| panic!("stalled connection {i} still open after {SHORT:?}"));
        if *i % 3 == 2 {
            assert!(
                text(&reply).starts_with("HTTP/1.1 408"),
                "half a body: {}",
                text(&reply)
            );
        }
    }
    let status = d.cli(["status"]);
    assert!(status.status.success(), "{status:?}");

    // The event stream opened before all this still streams.
    while rx.try_recv().is_ok() {}
    let stop = d.cli(["stop", "s"]);
    assert!(stop.status.success(), "{stop:?}");
    let stopped = try_wait_until(SHORT, || {
        let line = rx.recv_timeout(Duration::from_millis(100)).ok()?;
        let ev: Event = serde_json::from_str(&line).ok()?;
        matches!(ev.kind, EventKind::Service { ref name, state: ServiceState::Stopped, .. } if name == "s")
            .then_some(())
    });
    assert!(stopped.is_some(), "no `s stopped` event on the open stream");
    let _ = events.kill();
    let _ = events.wait();
}

/// A client connection that is idle, or stalled in the middle of a request, does not
/// hold the daemon's exit: SIGTERM stops it promptly, long before the stop budget.
#[test]
fn a_stalled_client_does_not_hold_the_stop() {
    let ws = Workspace::new();
    let mut d = Daemon::start(&ws, &config("[shutdown]\nbudget = \"30s\"\n"));
    d.wait_lifecycle(Lifecycle::Ready, SHORT);
    let _idle = connect(&ws);
    let mut half_head = connect(&ws);
    half_head.write_all(HALF_HEAD).unwrap();
    let mut half_body = connect(&ws);
    half_body.write_all(HALF_BODY).unwrap();
    // Accepted in order: once a later client is answered, these are being served.
    d.status();
    let t0 = Instant::now();
    d.signal(Signal::SIGTERM);
    let st = d.wait_exit(LONG);
    let took = t0.elapsed();
    assert!(st.success(), "{}", d.report());
    assert!(
        took < Duration::from_secs(3),
        "the stop took {took:?} with stalled clients (budget 30 s)"
    );
}
