//! A root daemon in a user's HOME (issue 14 §1): root never follows the user's links.
//!
//! Each test runs the real daemon as root for a real unprivileged workspace user
//! (`nobody`), who plants links in their own HOME, as they can, towards files and
//! directories of root's. The daemon must neither write, chmod, chown nor read anything
//! behind them. The tests need root (to be root and to act as another user); they say
//! why and return otherwise.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use agent_proto::local::{Lifecycle, Status};
use integration::daemon::{Daemon, Signal, Workspace};
use integration::gitserver::GitServer;

use crate::repos::{dirty_repo, git, provider_for};
use crate::support::{LONG, SHORT, config};

/// A workspace whose HOME belongs to `nobody`, with the state dir in HOME (the default
/// place, `~/.local/state/wsagent`).
struct UserWs {
    ws: Workspace,
    uid: u32,
    gid: u32,
}

fn user_ws() -> Option<UserWs> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: a root daemon and an unprivileged user cannot be set up here");
        return None;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody");
    let mut ws = Workspace::new().with_env("CODER_WORKSPACE_NAME", "ws1");
    let state = ws.home().join(".local/state/wsagent");
    ws.set_env("WSAGENT_STATE_DIR", state.display().to_string());
    std::fs::set_permissions(ws.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
    std::os::unix::fs::chown(ws.home(), Some(uid), Some(gid)).unwrap();
    Some(UserWs { ws, uid, gid })
}

impl UserWs {
    fn home(&self) -> PathBuf {
        self.ws.home()
    }
    fn state(&self) -> PathBuf {
        self.home().join(".local/state/wsagent")
    }

    /// Run `script` with `sh -c` as the user, in HOME; panic when it fails.
    fn sh(&self, script: &str) {
        let out = Command::new("sh")
            .args(["-c", script])
            .current_dir(self.home())
            .env_clear()
            .env("HOME", self.home())
            .env("PATH", "/usr/bin:/bin")
            .uid(self.uid)
            .gid(self.gid)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "as the user: {script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A root-owned file outside HOME with `text` in it, mode 0644 (as /etc/passwd).
    fn root_file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.ws.path().join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        p
    }

    /// A root-owned directory outside HOME, mode 0755.
    fn root_dir(&self, name: &str) -> PathBuf {
        let p = self.ws.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// A bare repository outside HOME (readable by everyone) with `files`
    /// (`(path, text, executable)`), as a `file://` URL.
    fn dotfiles_repo(&self, name: &str, files: &[(&str, &str, bool)]) -> String {
        let work = self.ws.path().join(format!("{name}-work"));
        std::fs::create_dir_all(&work).unwrap();
        git(&work, &["init", "-q"]);
        for (p, text, exec) in files {
            let f = work.join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(&f, text).unwrap();
            let mode = if *exec { 0o755 } else { 0o644 };
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", "dotfiles"]);
        let bare = self.ws.path().join(format!("{name}.git"));
        let out = Command::new("git")
            .args(["clone", "-q", "--bare"])
            .arg(&work)
            .arg(&bare)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        format!("file://{}", bare.display())
    }

    fn start(&self, extra: &str) -> Daemon {
        let mut d = Daemon::start(
            &self.ws,
            &config(&format!("[startup]\nuser = \"nobody\"\n{extra}")),
        );
        wait_started(&mut d);
        d
    }
}

/// Wait until the startup pipeline has ended (ready or a start error).
fn wait_started(d: &mut Daemon) -> Status {
    d.wait_status(LONG, "the startup pipeline to end", |st| {
        matches!(st.lifecycle, Lifecycle::Ready | Lifecycle::StartError).then(|| st.clone())
    })
}

fn stop(mut d: Daemon) {
    d.signal(Signal::SIGTERM);
    d.wait_exit(LONG);
}

fn owner_and_mode(p: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.uid(), m.mode() & 0o7777)
}

/// Every entry under `dir` (itself included) owned by `uid`, links not followed.
fn owned_by(dir: &Path, uid: u32) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.uid() == uid {
            hits.push(p.clone());
        }
        if m.is_dir() {
            for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                stack.push(e.path());
            }
        }
    }
    hits
}

/// With `~/.local/state` linked to a root directory (the system config's, say), the
/// start-up neither gives that directory to the user nor writes anything into it.
#[test]
fn a_state_dir_behind_a_link_to_a_root_directory_is_never_adopted_nor_written() {
    let Some(u) = user_ws() else { return };
    let sys = u.root_dir("etc");
    let wsagent = u.root_dir("etc/wsagent");
    u.sh(&format!(
        "mkdir -p .local && ln -s {} .local/state",
        sys.display()
    ));
    let d = u.start("");
    assert_eq!(owner_and_mode(&wsagent), (0, 0o755), "{}", d.report());
    assert_eq!(owned_by(&sys, u.uid), Vec::<PathBuf>::new());
    let written: Vec<_> = std::fs::read_dir(&wsagent).unwrap().flatten().collect();
    assert!(
        written.is_empty(),
        "root wrote behind the user's link: {written:?}"
    );
    stop(d);
}

/// A service's log, and the dotfiles install log, linked to a root file: the output
/// goes to a regular file that replaces the link (named in a warning), never into the
/// file behind it.
#[test]
fn logs_linked_to_a_root_file_are_replaced_never_written_through() {
    let Some(u) = user_ws() else { return };
    let passwd = u.root_file("passwd", "root:x:0:0:root:/root:/bin/sh\n");
    let url = u.dotfiles_repo(
        "dots",
        &[("install.sh", "#!/bin/sh\necho INSTALL-OUTPUT\n", true)],
    );
    let logs = u.state().join("logs");
    u.sh(&format!(
        "mkdir -p {l} && ln -s {p} {l}/svc.log && ln -s {p} {l}/dotfiles-install.log",
        l = logs.display(),
        p = passwd.display()
    ));
    let mut d = u.start(&format!(
        "[dotfiles]\nrepo = \"{url}\"\n\n[services.svc]\nshell = \"echo SERVICE-OUTPUT; exec sleep 600\"\nuser = \"nobody\"\n"
    ));
    let svc_log = logs.join("svc.log");
    d.wait_status(SHORT, "the service's line in its log", |_| {
        std::fs::read_to_string(&svc_log)
            .ok()
            .filter(|t| t.contains("SERVICE-OUTPUT"))
    });
    assert_eq!(
        std::fs::read_to_string(&passwd).unwrap(),
        "root:x:0:0:root:/root:/bin/sh\n"
    );
    for (log, line) in [
        (svc_log.clone(), "SERVICE-OUTPUT"),
        (logs.join("dotfiles-install.log"), "INSTALL-OUTPUT"),
    ] {
        let m = std::fs::symlink_metadata(&log).unwrap();
        assert!(m.is_file(), "{} is still a link", log.display());
        assert_eq!(m.uid(), u.uid, "{} belongs to the user", log.display());
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains(line), "{}: {text}", log.display());
    }
    assert!(d.stderr().contains("symbolic link"), "{}", d.stderr());
    stop(d);
}

/// The dotfiles URL file, a once-marker, the save journal and the token cache's
/// directory: written (or chmodded) by the daemon, never through the user's links.
#[test]
fn files_the_daemon_writes_in_home_never_follow_the_users_links() {
    let Some(u) = user_ws() else { return };
    let precious = "precious root data\n";
    let v_url = u.root_file("v-url", precious);
    let v_marker = u.root_file("v-marker", precious);
    let v_journal = u.root_file("v-journal", precious);
    let rootdir = u.root_dir("rootdir");
    let url = u.dotfiles_repo("dots", &[(".vimrc", "set nu\n", false)]);
    let state = u.state();
    u.sh(&format!(
        "set -e
         mkdir -p .config/coderv2 {s}/once .cache projects/app
         ln -s {vu} .config/coderv2/dotfilesurl.tmp
         ln -s {vm} {s}/once/m.tmp
         ln -s {vj} {s}/save-journal.jsonl
         ln -s {rd} .cache/coder
         cd projects/app && git init -q && echo work > f.txt",
        s = state.display(),
        vu = v_url.display(),
        vm = v_marker.display(),
        vj = v_journal.display(),
        rd = rootdir.display(),
    ));
    let d = u.start(&format!(
        "[dotfiles]\nrepo = \"{url}\"\n\n[[once]]\nname = \"m\"\nshell = \"true\"\n"
    ));
    // A save appends to the journal.
    let _ = d.cli(["save"]);
    for v in [&v_url, &v_marker, &v_journal] {
        assert_eq!(
            std::fs::read_to_string(v).unwrap(),
            precious,
            "{} was written through a link",
            v.display()
        );
    }
    assert_eq!(owner_and_mode(&rootdir), (0, 0o755), "the token cache dir");
    // The work itself was done, as the user.
    let url_file = u.home().join(".config/coderv2/dotfilesurl");
    assert_eq!(std::fs::read_to_string(&url_file).unwrap(), url);
    assert_eq!(owner_and_mode(&url_file).0, u.uid);
    assert!(state.join("once/m.done").is_file());
    let journal = state.join("save-journal.jsonl");
    let m = std::fs::symlink_metadata(&journal).unwrap();
    assert!(m.is_file() && m.uid() == u.uid, "{m:?}");
    assert!(
        std::fs::read_to_string(&journal)
            .unwrap()
            .contains("projects/app")
    );
    stop(d);
}

/// The user swaps a directory of their dotfiles clone for a link to a root directory,
/// over and over, while the daemon updates the clone: no root file is ever given to the
/// user (the clone is made and updated as the user, nothing is chowned afterwards).
#[test]
fn a_directory_swapped_for_a_link_during_the_dotfiles_update_gives_no_root_file_away() {
    let Some(u) = user_ws() else { return };
    const PAIRS: usize = 16;
    const SUBDIRS: usize = 40;
    let mut files = Vec::new();
    for i in 0..PAIRS {
        for j in 0..SUBDIRS {
            files.push((format!("a{i}/d{j:02}/f"), "x\n".to_string(), false));
        }
    }
    let files: Vec<(&str, &str, bool)> = files
        .iter()
        .map(|(p, t, e)| (p.as_str(), t.as_str(), *e))
        .collect();
    let url = u.dotfiles_repo("dots", &files);
    let cfg = format!("[dotfiles]\nrepo = \"{url}\"\n");
    let d = u.start(&cfg);
    stop(d);

    // Root's files, laid out like the clone's directories.
    let target = u.root_dir("rootfiles");
    for j in 0..SUBDIRS {
        let dj = target.join(format!("d{j:02}"));
        std::fs::create_dir(&dj).unwrap();
        std::fs::write(dj.join("f"), "root\n").unwrap();
    }
    let clone = u.home().join(".config/coderv2/dotfiles");
    let mut links = String::new();
    for i in 0..PAIRS {
        links.push_str(&format!("ln -s {} a{i}.link\n", target.display()));
    }
    u.sh(&format!("cd {} && {links}", clone.display()));

    // The user's swapper: a{i} and a{i}.link exchange places atomically, in a loop.
    let stop_flag = Arc::new(AtomicBool::new(false));
    let swapper = {
        let stop_flag = stop_flag.clone();
        let (uid, gid, clone) = (u.uid, u.gid, clone.clone());
        std::thread::spawn(move || {
            // SAFETY: per-thread filesystem ids: this thread works as the user.
            unsafe {
                libc::setfsgid(gid);
                libc::setfsuid(uid);
            }
            let mut swaps = 0u64;
            while !stop_flag.load(Ordering::Relaxed) {
                for i in 0..PAIRS {
                    let a = clone.join(format!("a{i}"));
                    let b = clone.join(format!("a{i}.link"));
                    let r = nix::fcntl::renameat2(
                        nix::fcntl::AT_FDCWD,
                        &a,
                        nix::fcntl::AT_FDCWD,
                        &b,
                        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                    );
                    assert!(r.is_ok(), "the user cannot swap {}: {r:?}", a.display());
                    swaps += 1;
                }
            }
            swaps
        })
    };
    let d = u.start(&cfg);
    stop_flag.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps > 0);
    assert_eq!(
        owned_by(&target, u.uid),
        Vec::<PathBuf>::new(),
        "root files given to the user ({swaps} swaps)"
    );
    stop(d);
}

/// `DOTFILES_URI` naming a repository only root can read is not cloned for the user.
#[test]
fn a_dotfiles_repository_the_user_cannot_read_is_not_cloned_for_them() {
    let Some(mut u) = user_ws() else { return };
    let url = u.dotfiles_repo("secret", &[(".netrc", "machine x password root\n", false)]);
    let bare = u.ws.path().join("secret.git");
    std::fs::set_permissions(&bare, std::fs::Permissions::from_mode(0o700)).unwrap();
    u.ws.set_env("DOTFILES_URI", url);
    let mut d = u.start("");
    let st = wait_started(&mut d);
    let step = st
        .startup
        .iter()
        .find(|s| s.name == "dotfiles")
        .expect("dotfiles step");
    assert_eq!(step.outcome, "failed", "{step:?}");
    assert!(!u.home().join(".config/coderv2/dotfiles").exists());
    assert!(!u.home().join(".netrc").exists());
    stop(d);
}

/// The snapshot refs on the server for repository `name`.
fn wip_refs(server: &GitServer, name: &str) -> Vec<String> {
    let repo = git2::Repository::open_bare(server.path(&format!("{name}.git"))).unwrap();
    repo.references_glob("refs/heads/wip/*")
        .unwrap()
        .flatten()
        .filter_map(|r| r.name().ok().map(String::from))
        .collect()
}

/// A repository with unsaved work in the user's HOME, pushed to `server`.
fn user_repo(u: &UserWs, server: &GitServer) {
    dirty_repo(server, &u.home(), "app");
    let out = Command::new("chown")
        .args(["-R", &format!("{}:{}", u.uid, u.gid)])
        .arg(u.home())
        .output()
        .unwrap();
    assert!(out.status.success());
}

/// The token cache linked to a root-only file holding a secret: the daemon does not
/// read it, so the secret never goes out as the push password.
#[test]
fn a_token_cache_linked_to_a_root_file_is_never_sent() {
    let Some(u) = user_ws() else { return };
    let secret = "ghs_root_only_secret_1234";
    let server = GitServer::start(u.ws.path().join("srv"), secret).expect("git server");
    user_repo(&u, &server);
    server.clear_requests();
    let root_secret = u.root_file("root-secret", &format!("{secret}\n"));
    std::fs::set_permissions(&root_secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    u.sh(&format!(
        "mkdir -p .cache/coder && ln -s {} .cache/coder/github_token",
        root_secret.display()
    ));
    let d = u.start(&provider_for(&server));
    let _ = d.cli(["save"]);
    assert_eq!(wip_refs(&server, "app"), Vec::<String>::new());
    assert!(
        server.requests().iter().all(|r| r.user.is_none()),
        "a request carried root's secret"
    );
    stop(d);
}

/// Only the first line of the token cache is the token: more lines (a second token, a
/// note) never go out as part of the password.
#[test]
fn only_the_first_line_of_the_token_cache_is_sent() {
    let Some(u) = user_ws() else { return };
    let token = "ghs_first_line_5678";
    let server = GitServer::start(u.ws.path().join("srv"), token).expect("git server");
    user_repo(&u, &server);
    u.sh(&format!(
        "mkdir -p .cache/coder && printf '%s\\nsecond line\\n' {token} > .cache/coder/github_token && chmod 600 .cache/coder/github_token"
    ));
    let d = u.start(&provider_for(&server));
    let out = d.cli(["save"]);
    assert_eq!(
        wip_refs(&server, "app").len(),
        1,
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        d.report()
    );
    stop(d);
}
