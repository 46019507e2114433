//! `Dockerfile.base` as a real container: built on a locally imported Debian 12 rootfs,
//! run by a private dockerd, and checked from outside the way Docker and Kubernetes see
//! it: wsagent is PID 1 and reaps the orphans re-parented to it, the HEALTHCHECK turns
//! `healthy`, and `docker stop` pushes the dirty repository on the HOME volume to the
//! test git server and ends with exit code 0 inside the grace period.
//!
//! These need root, Debian's docker.io and the Debian rootfs tarball `scripts/test` makes
//! (`$WSAGENT_TEST_DEBIAN_TAR`); without them each test says why it skips (or fails, when
//! `WSAGENT_TEST_REQUIRE_REAL=1`). The engine's data-root lives in `$WSAGENT_TEST_CACHE`
//! (default `/var/cache/wsagent-test`), so the imported base and the image's apt layer
//! are reused across runs; a cold cache costs one build of a few minutes. Only one engine
//! may use that data-root at a time, so every test holds a lock file beside it while its
//! dockerd runs (nextest runs each test in its own process; `.config/nextest.toml` puts
//! them in one test group so they do not wait on each other's clock). Everything a test
//! starts (containers, dockerd, mounts) is stopped or removed by drop guards, also when
//! it fails.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use integration::daemon::output_within;
use integration::gitserver::GitServer;
use integration::real::{self, require_real, require_real_path, require_root};
use integration::{Workspace, procfs, try_wait_until, wait_until, wsagent_bin};

use crate::repos::{cache_token, dirty_repo, provider_for, server_files, worktree_files};

/// The image every test runs (rebuilt by each test; unchanged layers come from the cache).
const IMAGE: &str = "wsagent-test/base:latest";
/// The base image `Dockerfile.base` builds FROM, imported from the Debian rootfs tarball.
const BASE: &str = "debian:12-slim";
/// A label on the imported base naming the tarball it came from (size and mtime), so a
/// new tarball is imported again and an unchanged one keeps the build cache valid.
const BASE_LABEL: &str = "wsagent.test.rootfs";
/// On every container a test starts, to find those a killed test left behind.
const CONTAINER_LABEL: &str = "wsagent.test.container";
const TOKEN: &str = "ghs_container_7e6d5c4b3a29";
/// The grace period given to `docker stop -t`.
const GRACE: Duration = Duration::from_secs(30);
/// A docker CLI call other than `build`.
const DOCKER_CLI: Duration = Duration::from_secs(180);
/// `docker build`: a cold build (apt in the vfs storage driver) takes a few minutes.
const BUILD: Duration = Duration::from_secs(20 * 60);
/// From `docker run` to wsagent ready (vfs copies the whole image for each container).
const READY: Duration = Duration::from_secs(120);
/// How long a test waits for another test (or run) to free the engine's data-root.
const LOCK_WAIT: Duration = Duration::from_secs(40 * 60);

/// Root, dockerd, the docker CLI and the Debian rootfs tarball; `None` = skip.
fn prereqs() -> Option<PathBuf> {
    if !(require_root("dockerd runs as root")
        && require_real("dockerd", "the Docker engine from Debian's docker.io")
        && require_real("docker", "the Docker CLI from Debian's docker.io")
        && require_real("git", "the test git server runs git-http-backend"))
    {
        return None;
    }
    require_real_path(
        real::DEBIAN_TAR,
        "a Debian 12 rootfs tarball (debootstrap) to import as debian:12-slim",
    )
}

fn cache_dir() -> PathBuf {
    std::env::var_os("WSAGENT_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/wsagent-test"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// An exclusive `flock` on a file, released when dropped (or when the process dies).
struct Lock {
    _file: File,
}

impl Lock {
    fn take(path: &Path) -> Lock {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        wait_until(
            LOCK_WAIT,
            &format!(
                "the lock {} (another engine uses the cache)",
                path.display()
            ),
            || {
                // SAFETY: flock on a file descriptor this function owns.
                unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
            },
        );
        Lock { _file: file }
    }
}

/// A private dockerd on the cached data-root (its socket, exec-root and logs in a temp
/// dir); stopped, and its mounts detached, when dropped.
struct Engine {
    ws: Workspace,
    data_root: PathBuf,
    pidfile: PathBuf,
    child: Child,
    _lock: Lock,
}

impl Engine {
    fn start() -> Engine {
        let cache = cache_dir();
        std::fs::create_dir_all(&cache).expect("create the test cache");
        let lock = Lock::take(&cache.join("docker.lock"));
        let data_root = cache.join("docker");
        let pidfile = cache.join("docker.pid");
        stop_stale_dockerd(&pidfile);
        detach_mounts_under(&data_root);
        let ws = Workspace::new();
        let log = File::create(ws.path().join("dockerd.log")).expect("dockerd log");
        let child = Command::new("dockerd")
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--storage-driver=vfs",
            ])
            .arg("--data-root")
            .arg(&data_root)
            .arg("--exec-root")
            .arg(ws.path().join("exec"))
            .arg("--pidfile")
            .arg(&pidfile)
            .arg("-H")
            .arg(format!(
                "unix://{}",
                ws.path().join("docker.sock").display()
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn dockerd");
        let mut engine = Engine {
            ws,
            data_root,
            pidfile,
            child,
            _lock: lock,
        };
        let up = try_wait_until(Duration::from_secs(60), || {
            engine.run(&["version"]).status.success()
                || engine.child.try_wait().ok().flatten().is_some()
        });
        let up = up.is_some() && engine.run(&["version"]).status.success();
        assert!(up, "dockerd did not come up:\n{}", engine.log());
        // Containers of a test that was killed before its guards ran: each holds a full
        // copy of the image (vfs), and nobody else uses this data-root while we hold it.
        let stale = engine.ok(&["ps", "-aq", "--filter", &format!("label={CONTAINER_LABEL}")]);
        for id in stale.split_whitespace() {
            let _ = engine.run(&["rm", "-f", id]);
        }
        engine
    }

    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.ws.path().join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("docker");
        cmd.env("DOCKER_CONFIG", self.ws.path().join("client"))
            .env("DOCKER_BUILDKIT", "0")
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .arg("-H")
            .arg(format!(
                "unix://{}",
                self.ws.path().join("docker.sock").display()
            ))
            .stdin(Stdio::null());
        cmd
    }

    fn run_within(&self, args: &[&str], timeout: Duration) -> Output {
        let mut cmd = self.command();
        cmd.args(args);
        output_within(cmd, timeout)
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_within(args, DOCKER_CLI)
    }

    #[track_caller]
    fn ok_within(&self, args: &[&str], timeout: Duration) -> String {
        let out = self.run_within(args, timeout);
        assert!(
            out.status.success(),
            "docker {args:?} failed ({}):\n{}\n{}\ndockerd's log:\n{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr),
            self.log()
        );
        text(&out.stdout).trim().to_string()
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        self.ok_within(args, DOCKER_CLI)
    }

    /// Build `Dockerfile.base` as [`IMAGE`] with the `wsagent` under test, FROM the
    /// Debian rootfs imported as [`BASE`].
    fn build_image(&self, debian_tar: &Path) {
        // The tarball's name carries its recipe's hash (scripts/rootfs): an image imported
        // from another recipe's tarball is never reused.
        let meta = std::fs::metadata(debian_tar).expect("stat the Debian tarball");
        let name = debian_tar
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let key = format!("{name}-{}-{}", meta.len(), meta.mtime());
        let have = self.run(&[
            "image",
            "inspect",
            "-f",
            &format!("{{{{index .Config.Labels \"{BASE_LABEL}\"}}}}"),
            BASE,
        ]);
        if !have.status.success() || text(&have.stdout).trim() != key {
            self.ok(&[
                "import",
                "--change",
                &format!("LABEL {BASE_LABEL}={key}"),
                &debian_tar.display().to_string(),
                BASE,
            ]);
        }
        // A context of exactly what the Dockerfile copies: the repository's context is
        // the root with a .dockerignore made for the musl release binary.
        let ctx = self.ws.path().join("context");
        std::fs::create_dir_all(ctx.join("images/base")).expect("context dir");
        let root = crate::repo_root();
        std::fs::copy(root.join("Dockerfile.base"), ctx.join("Dockerfile.base"))
            .expect("copy Dockerfile.base");
        std::fs::copy(
            root.join("images/base/config.toml"),
            ctx.join("images/base/config.toml"),
        )
        .expect("copy images/base/config.toml");
        // Without its debug info the debug binary is a fifth of the size: less to send
        // and to copy into every vfs layer. Same code.
        let bin = wsagent_bin();
        let stripped = Command::new("strip")
            .arg("-o")
            .arg(ctx.join("wsagent"))
            .arg(&bin)
            .status()
            .is_ok_and(|s| s.success());
        if !stripped {
            std::fs::copy(&bin, ctx.join("wsagent")).expect("copy wsagent into the context");
        }
        let ctx = ctx.display().to_string();
        self.ok_within(
            &[
                "build",
                "-q",
                "--network",
                "host",
                "-f",
                &format!("{ctx}/Dockerfile.base"),
                "--build-arg",
                "WSAGENT_BIN=wsagent",
                "-t",
                IMAGE,
                &ctx,
            ],
            BUILD,
        );
        // The images the last builds left untagged (older binaries): the cache stays small.
        let _ = self.run(&["image", "prune", "-f"]);
    }

    /// `docker run -d <args>`; the container is removed when the guard drops.
    fn start_container(&self, args: &[&str]) -> Container<'_> {
        let mut all = vec!["run", "-d", "--label", CONTAINER_LABEL];
        all.extend_from_slice(args);
        let id = self.ok(&all);
        Container { engine: self, id }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let stopped = try_wait_until(Duration::from_secs(40), || {
            self.child.try_wait().ok().flatten().is_some()
        });
        if stopped.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.pidfile);
        detach_mounts_under(&self.data_root);
        // The exec-root's mounts go with the Workspace.
    }
}

/// A dockerd left running on the cached data-root by a test that was killed (its drop
/// guard never ran): stop it, since we hold the lock and need the data-root.
fn stop_stale_dockerd(pidfile: &Path) {
    let Some(pid) = std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return;
    };
    if procfs::stat(pid).is_none_or(|p| p.comm != "dockerd") {
        return;
    }
    let target = nix::unistd::Pid::from_raw(pid as i32);
    eprintln!("stopping dockerd {pid} left running on the test cache");
    let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGTERM);
    if try_wait_until(Duration::from_secs(40), || !procfs::alive(pid)).is_none() {
        let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL);
        wait_until(Duration::from_secs(10), "the stale dockerd to die", || {
            !procfs::alive(pid)
        });
    }
}

fn detach_mounts_under(dir: &Path) {
    for m in procfs::mounts_under(dir).into_iter().rev() {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A running container, removed (`docker rm -f`) when dropped.
struct Container<'a> {
    engine: &'a Engine,
    id: String,
}

impl Container<'_> {
    fn inspect(&self, format: &str) -> String {
        self.engine.ok(&["inspect", "-f", format, &self.id])
    }

    fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["exec", self.id.as_str()];
        all.extend_from_slice(args);
        self.engine.run(&all)
    }

    #[track_caller]
    fn exec_ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "docker exec {args:?} failed ({}):\n{}\n{}\nlogs:\n{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr),
            self.logs()
        );
        text(&out.stdout)
    }

    fn logs(&self) -> String {
        let out = self.engine.run(&["logs", "--tail", "60", &self.id]);
        format!("{}{}", text(&out.stdout), text(&out.stderr))
    }

    /// The host pid of the container's PID 1.
    fn init_pid(&self) -> u32 {
        self.inspect("{{.State.Pid}}")
            .parse()
            .expect("the container's pid")
    }

    /// Wait until the HEALTHCHECK says `healthy`; fail at once if the container exits.
    fn wait_healthy(&self) {
        let mut last = String::new();
        let healthy = try_wait_until(READY, || {
            let state = self.inspect("{{.State.Status}} {{.State.Health.Status}}");
            let done = state == "running healthy";
            if !state.starts_with("running") {
                panic!(
                    "the container is {state} before turning healthy:\n{}",
                    self.logs()
                );
            }
            last = state;
            done
        });
        assert!(
            healthy.is_some(),
            "not healthy after {READY:?} (last: {last}):\n{}",
            self.logs()
        );
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self.engine.run(&["rm", "-f", &self.id]);
    }
}

/// A prepared engine with the freshly built image; `None` = skip.
fn engine_with_image() -> Option<Engine> {
    let debian_tar = prereqs()?;
    let engine = Engine::start();
    let t = Instant::now();
    engine.build_image(&debian_tar);
    eprintln!("image {IMAGE} built in {:?}", t.elapsed());
    Some(engine)
}

/// `chown -R uid:gid` without following symlinks.
fn chown_tree(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).expect("chown");
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        for e in std::fs::read_dir(path).expect("read dir").flatten() {
            chown_tree(&e.path(), uid, gid);
        }
    }
}

#[test]
fn docker_stop_pushes_the_dirty_repo_on_the_home_volume_and_the_container_exits_0() {
    // The image's own config plus a provider pointing at the test server: `docker stop`
    // (SIGTERM to PID 1) saves the repository under ~/projects on the HOME volume as the
    // snapshot ref, byte for byte, leaves `.git/config` alone, and the container exits 0
    // well inside the grace period.
    let Some(engine) = engine_with_image() else {
        return;
    };
    let ws = Workspace::new();
    let server = GitServer::start(ws.path().join("srv"), TOKEN).expect("git server");
    let home = ws.path().join("coder-home");
    let repo = dirty_repo(&server, &home, "app");
    cache_token(&home, TOKEN);
    chown_tree(&home, 1000, 1000);
    let config_before = std::fs::read(repo.join(".git/config")).expect("read .git/config");
    let config = ws.path().join("test.toml");
    std::fs::write(&config, provider_for(&server)).expect("write the config");

    let home_volume = format!("{}:/home/coder", home.display());
    let config_mount = format!("{}:/etc/wsagent/test.toml:ro", config.display());
    let c = engine.start_container(&[
        "--network",
        "host",
        "--health-interval",
        "1s",
        "-v",
        &home_volume,
        "-v",
        &config_mount,
        "-e",
        "CODER_WORKSPACE_NAME=ws1",
        IMAGE,
        "--config",
        "/etc/wsagent/test.toml",
    ]);
    c.wait_healthy();

    let t = Instant::now();
    let grace = GRACE.as_secs().to_string();
    engine.ok_within(&["stop", "-t", &grace, &c.id], GRACE * 2);
    let took = t.elapsed();

    let code = c.inspect("{{.State.ExitCode}}");
    assert_eq!(code, "0", "exit code after docker stop:\n{}", c.logs());
    assert!(
        took < GRACE,
        "docker stop took {took:?} (grace {GRACE:?}): the container was killed"
    );
    assert!(
        server
            .ref_target("app.git", "refs/heads/wip/ws1/main")
            .is_some(),
        "nothing pushed to refs/heads/wip/ws1/main:\n{}",
        c.logs()
    );
    assert_eq!(
        server_files(&server, "app", "refs/heads/wip/ws1/main"),
        worktree_files(&repo)
    );
    assert_eq!(
        std::fs::read(repo.join(".git/config")).expect("read .git/config"),
        config_before,
        ".git/config changed"
    );
    eprintln!("docker stop took {took:?}");
}

#[test]
fn wsagent_is_pid_1_of_the_container_and_reaps_the_orphans_re_parented_to_it() {
    // `docker exec` leaves orphans behind (a shell that backgrounds work and exits): the
    // kernel re-parents them to the container's PID 1, wsagent, which must reap them when
    // they exit; otherwise they stay zombies for the container's life.
    let Some(engine) = engine_with_image() else {
        return;
    };
    let c = engine.start_container(&["--network", "none", "--health-interval", "1s", IMAGE]);
    c.wait_healthy();

    let cmdline = c.exec_ok(&["cat", "/proc/1/cmdline"]);
    assert!(
        cmdline.starts_with("/usr/local/bin/wsagent\0run\0"),
        "PID 1 is {cmdline:?}"
    );
    let init = c.init_pid();
    assert_eq!(
        procfs::stat(init).map(|p| p.comm),
        Some("wsagent".to_string())
    );

    // Five waiting shells whose parent exits at once; they go when /tmp/release exists.
    c.exec_ok(&[
        "sh",
        "-c",
        "for i in 1 2 3 4 5; do \
           sh -c 'until [ -e /tmp/release ]; do sleep 0.05; done; exit 0 # orphan' \
             </dev/null >/dev/null 2>&1 & \
         done",
    ]);
    let is_orphan = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| text(&c).contains("# orphan"))
    };
    let orphans = wait_until(
        Duration::from_secs(30),
        "five orphans re-parented to the container's PID 1",
        || {
            let found: Vec<u32> = procfs::children(init)
                .into_iter()
                .filter(|p| is_orphan(p.pid))
                .map(|p| p.pid)
                .collect();
            (found.len() == 5).then_some(found)
        },
    );

    c.exec_ok(&["touch", "/tmp/release"]);
    let gone = try_wait_until(Duration::from_secs(30), || {
        orphans.iter().all(|&p| procfs::stat(p).is_none())
    });
    let left: Vec<_> = orphans.iter().filter_map(|&p| procfs::stat(p)).collect();
    assert!(
        gone.is_some(),
        "the orphans were not reaped:\n{}",
        procfs::describe(&left)
    );
    wait_until(
        Duration::from_secs(15),
        "no zombie in the container",
        || procfs::zombies_in_namespace_of(init).is_empty(),
    );
    // And as the container sees itself: no zombie child of its PID 1. (A health probe
    // that just ended is a zombie of the shim, outside the container, for a moment:
    // children of PID 1 only, and polled, since a reaped zombie is gone a moment later
    // while an unreaped one stays.)
    let mut last = String::new();
    let clean = try_wait_until(Duration::from_secs(15), || {
        last = c.exec_ok(&[
            "sh",
            "-c",
            "for f in /proc/[0-9]*/status; do \
               grep -q '^State:.Z' \"$f\" 2>/dev/null && grep -q '^PPid:.1$' \"$f\" && echo \"$f\"; \
             done; true",
        ]);
        last.trim().is_empty()
    });
    assert!(
        clean.is_some(),
        "zombie children of PID 1 seen from inside the container: {last}"
    );
}

#[test]
fn the_healthcheck_turns_healthy_once_wsagent_is_ready() {
    // The image's HEALTHCHECK (`wsagent status --ready`) reports the startup pipeline's
    // end: with a 1 s interval Docker marks the container healthy, and the CLI inside
    // agrees that wsagent is ready.
    let Some(engine) = engine_with_image() else {
        return;
    };
    let c = engine.start_container(&["--network", "none", "--health-interval", "1s", IMAGE]);
    c.wait_healthy();
    assert_eq!(c.inspect("{{.State.Health.FailingStreak}}"), "0");
    let out = c.exec(&["/usr/local/bin/wsagent", "status", "--ready"]);
    assert!(
        out.status.success(),
        "wsagent status --ready: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}
