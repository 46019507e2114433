//! The startup pipeline end to end (issue 5): the real `wsagent` binary with a temp
//! HOME and real git repositories (local bare repos over `file://`), driven through its
//! CLI. Attach is driven through a real pseudo-terminal pair, as a user's terminal would.
//!
//! The small daemon helper here is self-contained on purpose (the shared harness lives
//! in `integration/src/` on another branch); it needs `cargo build -p agent` first.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_proto::local::{Lifecycle, Status, StepStatus, TaskState, TaskStatus};
use integration::wsagent_bin;

/// Poll `cond` until it returns `Some`, or panic after `timeout` with `what`.
fn wait_for<T>(timeout: Duration, what: &str, cond: impl FnMut() -> Option<T>) -> T {
    integration::wait_until(timeout, what, cond)
}

/// A workspace: a temp dir with HOME, a skeleton dir, a config and a socket.
struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    fn new() -> Workspace {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("home")).unwrap();
        std::fs::create_dir_all(dir.path().join("skel")).unwrap();
        Workspace { dir }
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn skel(&self) -> PathBuf {
        self.dir.path().join("skel")
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("s.sock")
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Start the daemon with `extra` appended to a config that turns the default
    /// services off and points the skeleton at this workspace.
    fn start(&self, extra: &str) -> Daemon {
        self.start_with(None, extra, &[])
    }

    /// Start with `startup.user` set (the daemon still runs as the test's user).
    fn start_as(&self, user: &str, extra: &str) -> Daemon {
        self.start_with(Some(user), extra, &[])
    }

    fn start_with(&self, user: Option<&str>, extra: &str, env: &[(&str, &str)]) -> Daemon {
        let user = user.map(|u| format!("user = {u:?}\n")).unwrap_or_default();
        let config = format!(
            "[services.dockerd]\nenabled = false\n[services.code-server]\nenabled = false\n[services.coder-agent]\nenabled = false\n\n[startup]\nskel_dir = {:?}\n{user}\n{extra}",
            self.skel().display().to_string()
        );
        let cfg_path = self.path("config.toml");
        std::fs::write(&cfg_path, config).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("daemon.log"))
            .unwrap();
        let child = Command::new(wsagent_bin())
            .arg("--socket")
            .arg(self.socket())
            .arg("run")
            .arg("--config")
            .arg(&cfg_path)
            .env_clear()
            .env("HOME", self.home())
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("WSAGENT_SYSTEM_CONFIG", "/nonexistent")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn wsagent run");
        let mut d = Daemon {
            child,
            socket: self.socket(),
            log: self.path("daemon.log"),
        };
        d.wait_started();
        d
    }
}

struct Daemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(wsagent_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env("WSAGENT_SYSTEM_CONFIG", "/nonexistent")
            .output()
            .expect("run wsagent")
    }

    fn status(&self) -> Option<Status> {
        let out = self.cli(&["status", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Wait until the startup pipeline has settled (ready or a start error).
    fn wait_started(&mut self) -> Status {
        let log = self.log.clone();
        let child = &mut self.child;
        let socket = self.socket.clone();
        wait_for(
            Duration::from_secs(60),
            "the startup pipeline to settle",
            || {
                if let Ok(Some(st)) = child.try_wait() {
                    panic!(
                        "wsagent exited early with {st}:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                Daemon::status_of(&socket).filter(|s| {
                    matches!(
                        s.lifecycle,
                        Lifecycle::Ready | Lifecycle::StartError | Lifecycle::StartTimeout
                    )
                })
            },
        )
    }

    fn status_of(socket: &Path) -> Option<Status> {
        let out = Command::new(wsagent_bin())
            .arg("--socket")
            .arg(socket)
            .args(["status", "--json"])
            .env("WSAGENT_SYSTEM_CONFIG", "/nonexistent")
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    fn step(&self, name: &str) -> StepStatus {
        let st = self.status().expect("status");
        st.startup
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no startup step {name:?} in {:?}", st.startup))
    }

    fn tasks(&self) -> Vec<TaskStatus> {
        let out = self.cli(&["tasks", "--json"]);
        assert!(
            out.status.success(),
            "wsagent tasks failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("tasks json")
    }

    fn task(&self, name: &str) -> TaskStatus {
        self.tasks()
            .into_iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no task {name:?}"))
    }

    /// SIGTERM, then wait for the stop sequence to end.
    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let child = &mut self.child;
        wait_for(
            Duration::from_secs(40),
            "wsagent to exit after SIGTERM",
            || child.try_wait().ok().flatten(),
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A dotfiles repository: a work tree and its bare remote (the `file://` URL).
struct Repo {
    work: PathBuf,
    bare: PathBuf,
}

impl Repo {
    /// `files`: (path, content, executable).
    fn new(root: &Path, name: &str, files: &[(&str, &str, bool)]) -> Repo {
        let work = root.join(format!("{name}-work"));
        let bare = root.join(format!("{name}.git"));
        std::fs::create_dir_all(&work).unwrap();
        git(&work, &["init", "-q", "-b", "main"]);
        let r = Repo { work, bare };
        r.commit(files, "initial");
        git(
            root,
            &[
                "init",
                "-q",
                "--bare",
                "-b",
                "main",
                r.bare.to_str().unwrap(),
            ],
        );
        git(
            &r.work,
            &["remote", "add", "origin", r.bare.to_str().unwrap()],
        );
        git(&r.work, &["push", "-q", "origin", "main"]);
        r
    }

    fn commit(&self, files: &[(&str, &str, bool)], msg: &str) {
        for (p, content, exec) in files {
            let path = self.work.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, content).unwrap();
            let mode = if *exec { 0o755 } else { 0o644 };
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "-m", msg]);
    }

    fn push(&self) {
        git(&self.work, &["push", "-q", "origin", "main"]);
    }

    fn url(&self) -> String {
        format!("file://{}", self.bare.display())
    }
}

fn dotfiles_config(url: &str) -> String {
    format!("[dotfiles]\nrepo = {url:?}\n")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

#[test]
fn dotfiles_install_sh_runs_in_the_clone_and_the_url_is_remembered() {
    // The clone lands where `coder dotfiles` puts it, and install.sh runs from it.
    let ws = Workspace::new();
    let repo = Repo::new(
        ws.dir.path(),
        "dots",
        &[(
            "install.sh",
            "#!/bin/sh\npwd > \"$HOME/installed-from\"\n",
            true,
        )],
    );
    let d = ws.start(&dotfiles_config(&repo.url()));
    let clone = ws.home().join(".config/coderv2/dotfiles");
    assert!(clone.join(".git").is_dir());
    assert_eq!(
        read(&ws.home().join(".config/coderv2/dotfilesurl")),
        repo.url()
    );
    assert_eq!(
        read(&ws.home().join("installed-from")).trim(),
        clone.display().to_string()
    );
    let step = d.step("dotfiles");
    assert_eq!(step.outcome, "ok", "{step:?}");
    assert!(step.message.unwrap_or_default().contains("ran install.sh"));
    assert_eq!(d.status().unwrap().lifecycle, Lifecycle::Ready);
    d.stop();
}

#[test]
fn without_dotfiles_repo_the_dotfiles_uri_variable_is_used() {
    let ws = Workspace::new();
    let repo = Repo::new(
        ws.dir.path(),
        "dots",
        &[(".inputrc", "set bell-style none", false)],
    );
    let d = ws.start_with(None, "", &[("DOTFILES_URI", &repo.url())]);
    assert_eq!(read(&ws.home().join(".inputrc")), "set bell-style none");
    assert_eq!(
        read(&ws.home().join(".config/coderv2/dotfilesurl")),
        repo.url()
    );
    d.stop();
}

#[test]
fn dotfiles_script_setup_is_found_as_a_real_path() {
    // Unlike coder's directory-entry comparison, script/setup is looked up as a path.
    let ws = Workspace::new();
    let repo = Repo::new(
        ws.dir.path(),
        "dots",
        &[
            (
                "script/setup",
                "#!/bin/sh\necho setup > \"$HOME/ran\"\n",
                true,
            ),
            (".bashrc", "dots bashrc", false),
        ],
    );
    let d = ws.start(&dotfiles_config(&repo.url()));
    assert_eq!(read(&ws.home().join("ran")).trim(), "setup");
    // A script ran, so nothing is symlinked.
    assert!(!ws.home().join(".bashrc").exists());
    assert_eq!(d.status().unwrap().lifecycle, Lifecycle::Ready);
    d.stop();
}

#[test]
fn every_install_script_candidate_is_run_when_it_is_the_only_one() {
    for candidate in [
        "install.sh",
        "install",
        "bootstrap.sh",
        "bootstrap",
        "script/bootstrap",
        "setup.sh",
        "setup",
        "script/setup",
    ] {
        let ws = Workspace::new();
        let script = format!("#!/bin/sh\necho {candidate} > \"$HOME/ran\"\n");
        let repo = Repo::new(ws.dir.path(), "dots", &[(candidate, &script, true)]);
        let d = ws.start(&dotfiles_config(&repo.url()));
        assert_eq!(read(&ws.home().join("ran")).trim(), candidate);
        let msg = d.step("dotfiles").message.unwrap_or_default();
        assert!(msg.contains(&format!("ran {candidate}")), "{msg}");
        d.stop();
    }
}

#[test]
fn the_earliest_candidate_wins_over_later_ones() {
    let ws = Workspace::new();
    let repo = Repo::new(
        ws.dir.path(),
        "dots",
        &[
            (
                "setup.sh",
                "#!/bin/sh\necho setup.sh >> \"$HOME/ran\"\n",
                true,
            ),
            (
                "bootstrap",
                "#!/bin/sh\necho bootstrap >> \"$HOME/ran\"\n",
                true,
            ),
        ],
    );
    let d = ws.start(&dotfiles_config(&repo.url()));
    assert_eq!(read(&ws.home().join("ran")), "bootstrap\n");
    d.stop();
}

#[test]
fn an_install_script_that_outlives_its_timeout_is_killed_and_named() {
    let ws = Workspace::new();
    let repo = Repo::new(
        ws.dir.path(),
        "dots",
        &[("install.sh", "#!/bin/sh\nsleep 60\n", true)],
    );
    let cfg = format!("{}install_timeout = \"1s\"\n", dotfiles_config(&repo.url()));
    let d = ws.start(&cfg);
    assert_eq!(d.status().unwrap().lifecycle, Lifecycle::StartError);
    let msg = d.step("dotfiles").message.unwrap_or_default();
    assert!(msg.contains("install.sh timed out after 1s"), "{msg}");
    d.stop();
}

#[test]
fn a_failing_update_of_the_clone_is_only_a_warning() {
    let ws = Workspace::new();
    let repo = Repo::new(ws.dir.path(), "dots", &[(".vimrc", "v1", false)]);
    let cfg = dotfiles_config(&repo.url());
    ws.start(&cfg).stop();
    std::fs::remove_dir_all(&repo.bare).unwrap();
    let d = ws.start(&cfg);
    assert_eq!(d.status().unwrap().lifecycle, Lifecycle::Ready);
    let step = d.step("dotfiles");
    assert_eq!(step.outcome, "ok");
    let msg = step.message.unwrap_or_default();
    assert!(msg.contains("warning: update failed, continuing"), "{msg}");
    // The old clone still serves.
    assert_eq!(read(&ws.home().join(".vimrc")), "v1");
    d.stop();
}

#[test]
fn a_non_executable_install_script_is_a_start_error_naming_it() {
    let ws = Workspace::new();
    let repo = Repo::new(
        ws.dir.path(),
        "dots",
        &[
            ("install.sh", "#!/bin/sh\ntouch \"$HOME/ran\"\n", false),
            (".bashrc", "dots", false),
        ],
    );
    let d = ws.start(&dotfiles_config(&repo.url()));
    let st = d.status().unwrap();
    assert_eq!(st.lifecycle, Lifecycle::StartError);
    let step = d.step("dotfiles");
    assert_eq!(step.outcome, "failed");
    let msg = step.message.unwrap_or_default();
    assert!(msg.contains("install.sh is not executable"), "{msg}");
    assert!(!ws.home().join("ran").exists());
    d.stop();
}

#[test]
fn without_a_script_dotfiles_are_symlinked_backing_up_files_and_naming_a_directory_in_the_way() {
    let ws = Workspace::new();
    let repo = Repo::new(
        ws.dir.path(),
        "dots",
        &[
            (".bashrc", "dots bashrc", false),
            (".gitconfig", "[user]\n", false),
            (".gitignore", "x", false),
            (".config/tool.conf", "x", false),
            ("README.md", "readme", false),
        ],
    );
    std::fs::write(ws.home().join(".bashrc"), "my own bashrc").unwrap();
    let d = ws.start(&dotfiles_config(&repo.url()));
    let clone = ws.home().join(".config/coderv2/dotfiles");
    assert_eq!(
        std::fs::read_link(ws.home().join(".bashrc")).unwrap(),
        clone.join(".bashrc")
    );
    assert_eq!(read(&ws.home().join(".bashrc.bak")), "my own bashrc");
    assert_eq!(
        std::fs::read_link(ws.home().join(".gitconfig")).unwrap(),
        clone.join(".gitconfig")
    );
    assert!(!ws.home().join(".gitignore").exists());
    assert!(!ws.home().join("README.md").exists());
    // ~/.config is a directory (created by the directories step): skipped, and said so.
    let step = d.step("dotfiles");
    assert_eq!(step.outcome, "ok", "{step:?}");
    let msg = step.message.unwrap_or_default();
    assert!(
        msg.contains("skipped ~/.config: a directory is in the way"),
        "{msg}"
    );
    assert!(msg.contains("moved ~/.bashrc to ~/.bashrc.bak"), "{msg}");
    d.stop();
}

#[test]
fn a_second_start_pulls_the_existing_clone_instead_of_cloning_again() {
    let ws = Workspace::new();
    let repo = Repo::new(ws.dir.path(), "dots", &[(".vimrc", "v1", false)]);
    let cfg = dotfiles_config(&repo.url());
    let d = ws.start(&cfg);
    d.stop();
    let clone = ws.home().join(".config/coderv2/dotfiles");
    // An untracked file in the clone survives only if the clone is not redone.
    std::fs::write(clone.join("local-note"), "mine").unwrap();
    repo.commit(&[(".vimrc", "v2", false), (".inputrc", "new", false)], "v2");
    repo.push();

    let d = ws.start(&cfg);
    assert_eq!(read(&clone.join(".vimrc")), "v2");
    assert_eq!(read(&clone.join("local-note")), "mine");
    assert_eq!(read(&ws.home().join(".inputrc")), "new");
    let msg = d.step("dotfiles").message.unwrap_or_default();
    assert!(msg.contains("pulled: fast-forwarded main"), "{msg}");
    assert!(!msg.contains("cloned"), "{msg}");
    d.stop();
}

#[test]
fn a_newly_configured_branch_is_checked_out_in_the_existing_clone() {
    let ws = Workspace::new();
    let repo = Repo::new(ws.dir.path(), "dots", &[(".vimrc", "main", false)]);
    git(&repo.work, &["checkout", "-q", "-b", "work"]);
    repo.commit(&[(".vimrc", "work", false)], "work");
    git(&repo.work, &["push", "-q", "origin", "work"]);
    ws.start(&dotfiles_config(&repo.url())).stop();
    assert_eq!(read(&ws.home().join(".vimrc")), "main");
    let cfg = format!("{}branch = \"work\"\n", dotfiles_config(&repo.url()));
    let d = ws.start(&cfg);
    assert_eq!(read(&ws.home().join(".vimrc")), "work");
    let msg = d.step("dotfiles").message.unwrap_or_default();
    assert!(msg.contains("switched to work"), "{msg}");
    d.stop();
}

#[test]
fn a_changed_dotfiles_url_moves_the_old_clone_to_a_backup() {
    let ws = Workspace::new();
    let a = Repo::new(ws.dir.path(), "a", &[(".a-only", "a", false)]);
    let b = Repo::new(ws.dir.path(), "b", &[(".b-only", "b", false)]);
    ws.start(&dotfiles_config(&a.url())).stop();
    let d = ws.start(&dotfiles_config(&b.url()));
    let coder = ws.home().join(".config/coderv2");
    let backups: Vec<PathBuf> = std::fs::read_dir(&coder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("dotfiles_backup_")
        })
        .collect();
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert!(backups[0].join(".a-only").exists());
    assert!(coder.join("dotfiles/.b-only").exists());
    assert!(!coder.join("dotfiles/.a-only").exists());
    assert_eq!(read(&coder.join("dotfilesurl")), b.url());
    d.stop();
}

#[test]
fn a_dotfiles_clone_without_its_url_file_is_backed_up_and_the_configured_repo_cloned() {
    // A clone whose URL nobody recorded is foreign: like Coder, it is moved aside, not kept.
    let ws = Workspace::new();
    let a = Repo::new(ws.dir.path(), "a", &[(".a-only", "a", false)]);
    let b = Repo::new(ws.dir.path(), "b", &[(".b-only", "b", false)]);
    let coder = ws.home().join(".config/coderv2");
    std::fs::create_dir_all(&coder).unwrap();
    git(
        &coder,
        &[
            "clone",
            "-q",
            &a.url(),
            coder.join("dotfiles").to_str().unwrap(),
        ],
    );
    assert!(!coder.join("dotfilesurl").exists());

    let d = ws.start(&dotfiles_config(&b.url()));

    let backups: Vec<PathBuf> = std::fs::read_dir(&coder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("dotfiles_backup_")
        })
        .collect();
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert_eq!(read(&backups[0].join(".a-only")), "a");
    assert_eq!(read(&coder.join("dotfiles/.b-only")), "b");
    assert!(!coder.join("dotfiles/.a-only").exists());
    assert_eq!(read(&coder.join("dotfilesurl")), b.url());
    assert_eq!(read(&ws.home().join(".b-only")), "b");
    let step = d.step("dotfiles");
    assert_eq!(step.outcome, "ok", "{step:?}");
    let msg = step.message.unwrap_or_default();
    assert!(msg.contains("no URL file: old clone moved to"), "{msg}");
    d.stop();
}

#[test]
fn the_skeleton_is_copied_but_never_overwrites_an_existing_file() {
    let ws = Workspace::new();
    std::fs::write(ws.skel().join(".profile"), "skel profile").unwrap();
    std::fs::create_dir_all(ws.skel().join(".local/bin")).unwrap();
    std::fs::write(ws.skel().join(".local/bin/hello"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        ws.skel().join(".local/bin/hello"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(ws.skel().join(".bashrc"), "skel bashrc").unwrap();
    std::fs::write(ws.home().join(".bashrc"), "my bashrc").unwrap();
    let d = ws.start("");
    assert_eq!(read(&ws.home().join(".bashrc")), "my bashrc");
    assert_eq!(read(&ws.home().join(".profile")), "skel profile");
    let mode = std::fs::metadata(ws.home().join(".local/bin/hello"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    // The default directories exist too.
    for dir in ["projects", ".config", ".cache", ".local/state/wsagent"] {
        assert!(ws.home().join(dir).is_dir(), "{dir}");
    }
    assert_eq!(d.step("skeleton").outcome, "ok");
    // No dotfiles.repo and no DOTFILES_URI: skipped, and said why.
    let dots = d.step("dotfiles");
    assert_eq!(dots.outcome, "skipped");
    assert!(dots.message.unwrap_or_default().contains("DOTFILES_URI"));
    d.stop();
}

#[test]
fn a_once_task_runs_exactly_once_across_two_starts() {
    let ws = Workspace::new();
    let cfg = "[[once]]\nname = \"count\"\nshell = 'echo run >> \"$HOME/runs\"'\n";
    ws.start(cfg).stop();
    let d = ws.start(cfg);
    assert_eq!(read(&ws.home().join("runs")), "run\n");
    assert!(
        ws.home()
            .join(".local/state/wsagent/once/count.done")
            .exists()
    );
    assert_eq!(d.step("once:count").outcome, "skipped");
    assert_eq!(d.task("count").state, TaskState::Skipped);
    d.stop();
}

#[test]
fn a_failed_once_task_writes_no_marker_and_runs_again_at_the_next_start() {
    let ws = Workspace::new();
    let cfg =
        "[[once]]\nname = \"flaky\"\nshell = 'echo run >> \"$HOME/runs\"; test -e \"$HOME/ok\"'\n";
    let d = ws.start(cfg);
    assert_eq!(d.status().unwrap().lifecycle, Lifecycle::StartError);
    let step = d.step("once:flaky");
    assert_eq!(step.outcome, "failed");
    assert!(
        step.message
            .unwrap_or_default()
            .contains("retry at the next start"),
        "message says it will be retried"
    );
    let marker = ws.home().join(".local/state/wsagent/once/flaky.done");
    assert!(!marker.exists());
    d.stop();

    std::fs::write(ws.home().join("ok"), "").unwrap();
    let d = ws.start(cfg);
    assert_eq!(d.status().unwrap().lifecycle, Lifecycle::Ready);
    assert_eq!(read(&ws.home().join("runs")), "run\nrun\n");
    assert!(marker.exists());
    d.stop();
}

#[test]
fn a_once_task_with_its_own_marker_is_skipped_while_that_marker_exists() {
    let ws = Workspace::new();
    std::fs::create_dir_all(ws.home().join(".linuxbrew")).unwrap();
    std::fs::write(ws.home().join(".linuxbrew/installed"), "").unwrap();
    let d = ws.start(
        "[[once]]\nname = \"linuxbrew\"\nmarker = \".linuxbrew/installed\"\nshell = 'touch \"$HOME/ran\"'\n",
    );
    assert!(!ws.home().join("ran").exists());
    let step = d.step("once:linuxbrew");
    assert_eq!(step.outcome, "skipped");
    assert!(
        step.message
            .unwrap_or_default()
            .contains(".linuxbrew/installed exists")
    );
    d.stop();
}

#[test]
fn a_background_once_task_does_not_hold_up_ready() {
    let ws = Workspace::new();
    let cfg = "[[once]]\nname = \"slow\"\nshell = 'sleep 30'\nblocks_ready = false\n";
    let d = ws.start(cfg);
    assert_eq!(d.status().unwrap().lifecycle, Lifecycle::Ready);
    assert_eq!(d.task("slow").state, TaskState::Running);
    d.stop();
}

#[test]
fn a_startup_task_runs_in_a_terminal_and_keeps_its_colours() {
    let ws = Workspace::new();
    let cfg = "[[task]]\nname = \"colours\"\nblocks_ready = true\nshell = 'if test -t 1; then printf \"\\033[32mgreen tty\\033[0m\\n\"; else echo no tty; fi'\n";
    let d = ws.start(cfg);
    assert_eq!(d.status().unwrap().lifecycle, Lifecycle::Ready);
    let t = d.task("colours");
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(t.exit_code, Some(0));
    assert!(t.duration_ms.is_some() && t.tty);
    let log = read(&ws.home().join(".local/state/wsagent/logs/task-colours.log"));
    assert!(log.contains("\u{1b}[32mgreen tty\u{1b}[0m"), "{log:?}");
    let human = d.cli(&["tasks"]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.contains("colours") && human.contains("succeeded"),
        "{human}"
    );
    d.stop();
}

#[test]
fn a_blocking_task_that_fails_is_a_start_error_naming_it() {
    let ws = Workspace::new();
    let d = ws.start("[[task]]\nname = \"build\"\nblocks_ready = true\nshell = 'exit 3'\n");
    assert_eq!(d.status().unwrap().lifecycle, Lifecycle::StartError);
    let t = d.task("build");
    assert_eq!((t.state, t.exit_code), (TaskState::Failed, Some(3)));
    assert_eq!(d.step("task:build").outcome, "failed");
    d.stop();
}

/// A terminal the test types into: a pty pair whose slave is the attach client's
/// stdin/stdout/stderr; everything the client writes is collected from the master.
struct Terminal {
    master: std::fs::File,
    seen: Arc<Mutex<Vec<u8>>>,
    child: Child,
    /// Held so the master never reads EIO (which can drop unread output) before the
    /// test is done; dropping it ends the reader thread.
    _slave: OwnedFd,
}

impl Terminal {
    fn attach(d: &Daemon, task: &str) -> Terminal {
        Terminal::attach_sized(d, task, None)
    }

    /// With a size, the terminal is also the client's controlling terminal, so resizing
    /// it sends the client SIGWINCH, as a terminal emulator would.
    fn attach_sized(d: &Daemon, task: &str, size: Option<(u16, u16)>) -> Terminal {
        let ws = size.map(|(cols, rows)| nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        });
        let pty = nix::pty::openpty(ws.as_ref(), None).expect("openpty");
        let slave: OwnedFd = pty.slave;
        let keep = slave.try_clone().unwrap();
        let mut cmd = Command::new(wsagent_bin());
        cmd.arg("--socket")
            .arg(&d.socket)
            .args(["attach", task])
            .env("WSAGENT_SYSTEM_CONFIG", "/nonexistent")
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        if size.is_some() {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn wsagent attach");
        let master = std::fs::File::from(pty.master);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (mut r, s) = (master.try_clone().unwrap(), seen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once the slave's last holder (`_slave`) is gone.
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                s.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Terminal {
            master,
            seen,
            child,
            _slave: keep,
        }
    }

    fn seen(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }

    fn wait_for_text(&self, text: &str) {
        wait_for(
            Duration::from_secs(15),
            &format!("{text:?} on the terminal"),
            || self.seen().contains(text).then_some(()),
        );
    }

    fn type_bytes(&mut self, b: &[u8]) {
        self.master.write_all(b).unwrap();
        self.master.flush().unwrap();
    }

    fn resize(&self, cols: u16, rows: u16) {
        use std::os::fd::AsRawFd;
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a pointer valid for the call.
        let r = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(r, 0, "TIOCSWINSZ");
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let child = &mut self.child;
        wait_for(Duration::from_secs(15), "wsagent attach to exit", || {
            child.try_wait().ok().flatten()
        })
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn attach_replays_output_forwards_typing_and_the_detach_key_leaves_the_task_running() {
    let ws = Workspace::new();
    let cfg = "[[task]]\nname = \"ask\"\nshell = 'echo \"name?\"; read name; echo \"hello $name\"; read again; echo \"bye $again\"'\n";
    let d = ws.start(cfg);
    assert_eq!(d.status().unwrap().lifecycle, Lifecycle::Ready);

    // The question was asked before anyone attached: it comes from the replay.
    let mut term = Terminal::attach(&d, "ask");
    term.wait_for_text("name?");
    term.type_bytes(b"alice\r");
    term.wait_for_text("hello alice");
    term.type_bytes(&[0x1d]);
    assert!(term.wait_exit().success());
    // The reader thread may still be draining the terminal.
    term.wait_for_text("detached from task ask; it keeps running");
    assert_eq!(d.task("ask").state, TaskState::Running);

    // Attach again: the whole conversation is replayed; the task's end ends the client.
    let mut term = Terminal::attach(&d, "ask");
    term.wait_for_text("hello alice");
    term.type_bytes(b"bob\r");
    term.wait_for_text("bye bob");
    assert!(term.wait_exit().success());
    term.wait_for_text("task ask ended: succeeded (exit code 0)");
    let t = d.task("ask");
    assert_eq!((t.state, t.exit_code), (TaskState::Succeeded, Some(0)));
    d.stop();
}

#[test]
fn attaching_to_an_unknown_task_fails_naming_it() {
    let ws = Workspace::new();
    let d = ws.start("");
    let out = d.cli(&["attach", "nope"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no task named \"nope\""), "{err}");
    d.stop();
}

#[test]
fn the_task_terminal_takes_the_size_of_the_attached_terminal_and_follows_its_resizes() {
    let ws = Workspace::new();
    let d = ws.start(
        "[[task]]\nname = \"size\"\nshell = 'while read x; do echo \"size=$(stty size)\"; done'\n",
    );
    let mut term = Terminal::attach_sized(&d, "size", Some((100, 30)));
    term.wait_for_text("attached to task size");
    term.type_bytes(b"\r");
    term.wait_for_text("size=30 100");
    // SIGWINCH reaches the client asynchronously: ask again until the new size shows.
    term.resize(50, 20);
    wait_for(Duration::from_secs(15), "the resized terminal", || {
        // wait_for pauses between polls: one Enter per poll asks for the size again.
        term.type_bytes(b"\r");
        term.seen().contains("size=20 50").then_some(())
    });
    term.type_bytes(&[0x1d]);
    assert!(term.wait_exit().success());
    d.stop();
}

#[test]
fn as_root_the_workspace_user_owns_what_the_pipeline_creates_and_runs_its_scripts() {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: chown and run-as cannot be checked here");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody");
    let uid = nobody.uid.as_raw();
    let ws = Workspace::new();
    // The user's HOME, reachable by the user.
    std::fs::set_permissions(ws.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(ws.home(), Some(uid), Some(nobody.gid.as_raw())).unwrap();
    std::fs::write(ws.skel().join(".profile"), "skel").unwrap();
    let repo = Repo::new(ws.dir.path(), "dots", &[(".vimrc", "v1", false)]);
    let cfg = format!(
        "{}\n[[once]]\nname = \"who\"\nshell = 'id -u > \"$HOME/once-uid\"'\n\n[[task]]\nname = \"tw\"\nblocks_ready = true\nshell = 'id -u > \"$HOME/task-uid\"'\n",
        dotfiles_config(&repo.url())
    );
    let d = ws.start_as("nobody", &cfg);
    assert_eq!(
        d.status().unwrap().lifecycle,
        Lifecycle::Ready,
        "{:?}",
        d.status().unwrap().startup
    );
    let owner = |p: &str| std::fs::symlink_metadata(ws.home().join(p)).unwrap().uid();
    for p in [
        "projects",
        ".cache",
        ".local",
        ".local/state/wsagent",
        ".profile",
        ".config/coderv2/dotfiles",
        ".config/coderv2/dotfiles/.vimrc",
        ".vimrc",
    ] {
        assert_eq!(owner(p), uid, "owner of ~/{p}");
    }
    assert_eq!(read(&ws.home().join("once-uid")).trim(), uid.to_string());
    assert_eq!(read(&ws.home().join("task-uid")).trim(), uid.to_string());
    d.stop();
    // The clone now belongs to the user; the root daemon still updates it.
    repo.commit(&[(".vimrc", "v2", false)], "v2");
    repo.push();
    let d = ws.start_as("nobody", &cfg);
    let msg = d.step("dotfiles").message.unwrap_or_default();
    assert!(msg.contains("pulled: fast-forwarded"), "{msg}");
    assert_eq!(read(&ws.home().join(".vimrc")), "v2");
    d.stop();
}

#[test]
fn a_task_past_its_timeout_is_killed_and_marked_timed_out() {
    let ws = Workspace::new();
    let d = ws.start(
        "[[task]]\nname = \"hang\"\nblocks_ready = true\ntimeout = \"1s\"\nshell = 'sleep 60'\n",
    );
    assert_eq!(d.status().unwrap().lifecycle, Lifecycle::StartError);
    let t = d.task("hang");
    assert_eq!(t.state, TaskState::TimedOut, "{t:?}");
    let msg = d.step("task:hang").message.unwrap_or_default();
    assert!(msg.contains("timed out after 1s"), "{msg}");
    d.stop();
}

#[test]
fn the_stop_sequence_hangs_up_running_tasks() {
    let ws = Workspace::new();
    let d = ws
        .start("[[task]]\nname = \"server\"\nshell = 'echo $$ > \"$HOME/pid\"; exec sleep 300'\n");
    let pid_file = ws.home().join("pid");
    let pid: i32 = wait_for(Duration::from_secs(10), "the task's pid", || {
        std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
    });
    assert_eq!(d.task("server").state, TaskState::Running);
    d.stop();
    // Gone, or at most a zombie waiting for whoever inherited it.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .next();
    assert!(
        matches!(state, None | Some("Z")),
        "task still alive: {stat}"
    );
    let log = read(&ws.path("daemon.log"));
    assert!(log.contains("stopped by the stop sequence"), "{log}");
}
