//! Real services under wsagent: Debian's `dockerd` and a real `code-server`, supervised
//! with their health checks, restarted when killed and stopped by the stop sequence, and
//! dockerd's daemonized shims reaped by wsagent as PID 1.
//!
//! These need root and the tools `scripts/test` installs; without them each test says why
//! it skips (or fails, when `WSAGENT_TEST_REQUIRE_REAL=1`). Every dockerd runs with its
//! own data-root, exec-root, pidfile and socket in the test's temp dir, and without
//! iptables or a bridge, so tests can run side by side and leave nothing behind.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use agent_proto::local::{Health, ServiceState, ServiceStatus};
use integration::daemon::{Signal, output_within};
use integration::net::{free_port, http_status};
use integration::procfs;
use integration::real::{self, require_real, require_real_path, require_root};
use integration::{Daemon, Workspace, wait_until};

const START: Duration = Duration::from_secs(90);
const DOCKER_CLI: Duration = Duration::from_secs(120);

/// A TOML basic string (JSON's escapes are valid TOML).
fn q(s: impl AsRef<Path>) -> String {
    serde_json::to_string(&s.as_ref().display().to_string()).expect("string")
}

fn healthy(s: &ServiceStatus) -> bool {
    s.state == ServiceState::Running && s.health == Health::Healthy
}

// ---- dockerd ------------------------------------------------------------------------------

/// Root, dockerd, the docker CLI and the busybox rootfs tarball; `None` = skip.
fn docker_prereqs() -> Option<PathBuf> {
    if !(require_root("dockerd runs as root")
        && require_real("dockerd", "the Docker engine from Debian's docker.io")
        && require_real("docker", "the Docker CLI from Debian's docker.io"))
    {
        return None;
    }
    require_real_path(
        real::ROOTFS_TAR,
        "a busybox rootfs tarball for `docker import`",
    )
}

struct Docker {
    dir: PathBuf,
}

impl Docker {
    fn new(ws: &Workspace) -> Docker {
        let dir = ws.path().join("docker");
        std::fs::create_dir_all(&dir).expect("docker dir");
        Docker { dir }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    fn pidfile(&self) -> PathBuf {
        self.dir.join("dockerd.pid")
    }

    /// wsagent's config: dockerd alone, with the test flags and its `/_ping` check.
    fn config(&self) -> String {
        let d = &self.dir;
        format!(
            r#"[shutdown]
budget = "60s"

[services.code-server]
enabled = false

[services.coder-agent]
enabled = false

[services.dockerd]
command = ["dockerd", "--iptables=false", "--ip6tables=false", "--bridge=none",
  "--storage-driver=vfs", "--data-root", {root}, "--exec-root", {exec},
  "--pidfile", {pidfile}, "-H", {host}]
restart = "always"
start_timeout = "60s"
stop_timeout = "30s"

[services.dockerd.health]
kind = "unix-http"
socket = {socket}
path = "/_ping"
interval = "250ms"
timeout = "2s"
"#,
            root = q(d.join("root")),
            exec = q(d.join("exec")),
            pidfile = q(self.pidfile()),
            host = q(format!("unix://{}", self.socket().display())),
            socket = q(self.socket()),
        )
    }

    /// `docker -H unix://<socket> <args>`, with its client config in the temp dir.
    fn run(&self, ws: &Workspace, args: &[&str]) -> Output {
        let mut cmd = ws.command("docker");
        cmd.env("DOCKER_CONFIG", self.dir.join("client"))
            .arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            .args(args);
        output_within(cmd, DOCKER_CLI)
    }

    #[track_caller]
    fn ok(&self, ws: &Workspace, args: &[&str]) -> String {
        let out = self.run(ws, args);
        assert!(
            out.status.success(),
            "docker {args:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

#[test]
fn dockerd_becomes_healthy_and_runs_an_imported_busybox_image() {
    // A dockerd supervised by wsagent passes its unix-socket `/_ping` check, and is a
    // working engine: a locally imported image runs a container.
    let Some(rootfs) = docker_prereqs() else {
        return;
    };
    let ws = Workspace::new();
    let docker = Docker::new(&ws);
    let mut daemon = Daemon::start(&ws, &docker.config());

    let svc = daemon.wait_service("dockerd", healthy, START);
    assert!(svc.pid.is_some(), "{svc:?}");

    let rootfs = rootfs.display().to_string();
    docker.ok(&ws, &["import", &rootfs, "wsagent-test/busybox:latest"]);
    let out = docker.ok(
        &ws,
        &[
            "run",
            "--rm",
            "--network",
            "none",
            "wsagent-test/busybox:latest",
            "/bin/echo",
            "hi",
        ],
    );
    assert_eq!(out, "hi\n");
}

#[test]
fn sigterm_to_wsagent_stops_dockerd_and_its_containers_cleanly() {
    // The stop sequence stops dockerd by its stop signal (dockerd stops its own
    // containers); dockerd finishes its clean shutdown, nothing is left running and
    // wsagent exits 0.
    let Some(rootfs) = docker_prereqs() else {
        return;
    };
    let ws = Workspace::new();
    let docker = Docker::new(&ws);
    let mut daemon = Daemon::start(&ws, &docker.config());
    let dockerd = daemon
        .wait_service("dockerd", healthy, START)
        .pid
        .expect("pid");

    let rootfs = rootfs.display().to_string();
    docker.ok(&ws, &["import", &rootfs, "wsagent-test/busybox:latest"]);
    let id = docker.ok(
        &ws,
        &[
            "run",
            "-d",
            "--network",
            "none",
            "wsagent-test/busybox:latest",
            "/bin/sh",
            "-c",
            "trap 'exit 0' TERM; while :; do sleep 0.1; done",
        ],
    );
    let container_pid: u32 = docker
        .ok(&ws, &["inspect", "--format", "{{.State.Pid}}", id.trim()])
        .trim()
        .parse()
        .expect("container pid");
    assert!(procfs::alive(container_pid));

    daemon.signal(Signal::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(60));

    assert!(
        status.success(),
        "wsagent exited {status}\n{}",
        daemon.report()
    );
    assert!(
        !procfs::alive(dockerd),
        "dockerd (pid {dockerd}) still runs"
    );
    assert!(
        !procfs::alive(container_pid),
        "the container's process (pid {container_pid}) still runs"
    );
    let left = daemon.leftovers();
    assert!(
        left.is_empty(),
        "left running:\n{}",
        procfs::describe(&left)
    );
    assert!(
        !docker.pidfile().exists(),
        "dockerd removes its pidfile only on a clean shutdown"
    );
    let log = daemon.service_log("dockerd");
    assert!(
        log.contains("Daemon shutdown complete"),
        "dockerd's log (in the per-service log file) does not end with a clean \
         shutdown:\n{log}"
    );
}

#[test]
fn as_pid1_wsagent_reaps_the_container_shims_dockerd_leaves_behind() {
    // containerd's shims daemonize (double fork), so as PID 1 wsagent adopts one per
    // container and must reap it when the container ends; otherwise every `docker run`
    // leaves a zombie. The stop sequence still ends with exit 0.
    let Some(rootfs) = docker_prereqs() else {
        return;
    };
    let ws = Workspace::new();
    let docker = Docker::new(&ws);
    let mut daemon = Daemon::start_pid1(&ws, &docker.config());
    daemon.wait_service("dockerd", healthy, START);

    let rootfs = rootfs.display().to_string();
    docker.ok(&ws, &["import", &rootfs, "wsagent-test/busybox:latest"]);
    for _ in 0..3 {
        docker.ok(
            &ws,
            &[
                "run",
                "--rm",
                "--network",
                "none",
                "wsagent-test/busybox:latest",
                "/bin/true",
            ],
        );
    }
    // A running container's shim, adopted by wsagent, then its container removed.
    let id = docker.ok(
        &ws,
        &[
            "run",
            "-d",
            "--network",
            "none",
            "wsagent-test/busybox:latest",
            "/bin/sh",
            "-c",
            "trap 'exit 0' TERM; while :; do sleep 0.1; done",
        ],
    );
    let shim = wait_until(
        Duration::from_secs(15),
        "the container's shim to be adopted by wsagent",
        || {
            procfs::children(daemon.pid())
                .into_iter()
                .find(|p| p.comm.starts_with("containerd-shim"))
        },
    );
    docker.ok(&ws, &["rm", "-f", id.trim()]);
    wait_until(
        Duration::from_secs(30),
        "the shim to exit and be reaped",
        || procfs::stat(shim.pid).is_none(),
    );
    wait_until(
        Duration::from_secs(15),
        "no zombie in wsagent's pid namespace",
        || daemon.zombies().is_empty(),
    );

    daemon.signal(Signal::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(60));
    assert!(
        status.success(),
        "wsagent exited {status}\n{}",
        daemon.report()
    );
}

// ---- code-server --------------------------------------------------------------------------

struct CodeServer {
    port: u16,
    config: String,
}

impl CodeServer {
    /// `None` = skip. Otherwise a config supervising only code-server on a free port,
    /// with its user data, extensions and HOME inside the workspace.
    fn prepare(ws: &Workspace, stop_timeout: Duration) -> Option<CodeServer> {
        let bin = require_real_path(real::CODE_SERVER, "code-server 4.100.3 from npm")?;
        let port = free_port();
        let config = format!(
            r#"[services.dockerd]
enabled = false

[services.coder-agent]
enabled = false

[services.code-server]
command = [{bin}, "--bind-addr", "127.0.0.1:{port}", "--auth", "none",
  "--disable-telemetry", "--disable-update-check",
  "--user-data-dir", {data}, "--extensions-dir", {ext}]
depends_on = []
restart = "always"
start_timeout = "60s"
stop_timeout = "{stop}ms"
env = {{ HOME = {home} }}

[services.code-server.backoff]
initial = "100ms"
max = "1s"

[services.code-server.health]
kind = "http"
url = "http://127.0.0.1:{port}/healthz"
interval = "250ms"
timeout = "2s"
"#,
            bin = q(bin),
            data = q(ws.path().join("cs-data")),
            ext = q(ws.path().join("cs-extensions")),
            home = q(ws.home()),
            stop = stop_timeout.as_millis(),
        );
        Some(CodeServer { port, config })
    }

    fn healthz(&self) -> Option<u16> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        http_status(addr, "/healthz", Duration::from_secs(5))
    }
}

#[test]
fn code_server_becomes_healthy_and_is_restarted_after_kill_9() {
    // code-server passes its `/healthz` check; SIGKILLed, it is restarted as a new
    // process that becomes healthy again, its restart is counted, its old worker process
    // does not linger on the port, and no zombie is left.
    let ws = Workspace::new();
    let Some(cs) = CodeServer::prepare(&ws, Duration::from_secs(5)) else {
        return;
    };
    let mut daemon = Daemon::start(&ws, &cs.config);

    let before = daemon.wait_service("code-server", healthy, START);
    assert_eq!(cs.healthz(), Some(200));
    let old = before.pid.expect("pid of a running service");
    let old_family: Vec<u32> = std::iter::once(old)
        .chain(procfs::descendants(old).into_iter().map(|p| p.pid))
        .collect();

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old as i32), Signal::SIGKILL)
        .expect("kill -9 code-server");

    let after = daemon.wait_service(
        "code-server",
        |s| healthy(s) && s.pid.is_some_and(|p| p != old) && s.restarts > before.restarts,
        START,
    );
    assert_eq!(
        after.last_exit.as_ref().and_then(|e| e.signal),
        Some(9),
        "the last exit should be the SIGKILL: {after:?}"
    );
    assert_eq!(cs.healthz(), Some(200));
    wait_until(
        Duration::from_secs(15),
        "the killed code-server's other processes to be gone (a worker left behind keeps \
         serving the old instance on the port)",
        || old_family.iter().all(|&p| !procfs::alive(p)),
    );
    wait_until(Duration::from_secs(15), "no zombie under wsagent", || {
        daemon.zombies().is_empty()
    });
}

#[test]
fn sigterm_to_wsagent_stops_code_server_within_its_stop_timeout() {
    // The stop sequence sends code-server its stop signal, and code-server (which stops
    // in well under 2 s on SIGTERM) is gone before its stop_timeout; wsagent exits 0.
    let stop_timeout = Duration::from_secs(5);
    let ws = Workspace::new();
    let Some(cs) = CodeServer::prepare(&ws, stop_timeout) else {
        return;
    };
    let mut daemon = Daemon::start(&ws, &cs.config);
    let pid = daemon
        .wait_service("code-server", healthy, START)
        .pid
        .expect("pid");

    let sent = Instant::now();
    daemon.signal(Signal::SIGTERM);
    wait_until(
        stop_timeout + Duration::from_secs(10),
        "code-server to be stopped",
        || !procfs::alive(pid),
    );
    let took = sent.elapsed();
    let status = daemon.wait_exit(Duration::from_secs(30));

    assert!(
        took < stop_timeout,
        "code-server took {took:?} to stop (stop_timeout {stop_timeout:?})"
    );
    assert!(
        status.success(),
        "wsagent exited {status}\n{}",
        daemon.report()
    );
    let left = daemon.leftovers();
    assert!(
        left.is_empty(),
        "left running:\n{}",
        procfs::describe(&left)
    );
    assert_eq!(cs.healthz(), None, "something still answers on the port");
}
