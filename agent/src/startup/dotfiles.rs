//! Startup step 3: dotfiles, compatible with `coder dotfiles` (reference §4.4).
//!
//! The repository is cloned with git2 into `~/.config/coderv2/dotfiles` and its URL kept
//! in `~/.config/coderv2/dotfilesurl`, the paths `coder dotfiles` uses, so either tool
//! can take over from the other. On later starts the clone is fast-forwarded (a failure
//! is a warning: the old dotfiles still work); a changed URL moves the old clone aside to
//! `dotfiles_backup_<RFC 3339 time>` first, and so does a missing URL file (as in Coder:
//! a clone nobody recorded the URL of is not the configured repository). Then the first
//! existing install script of [`CANDIDATES`] runs with the repository as its working
//! directory; unlike Coder (which compares directory entry names, so `script/bootstrap`
//! can never match), the `script/...` candidates are looked up as real paths. Without a
//! script, the top-level dotfiles are symlinked into HOME: a regular file in the way is
//! renamed to `.bak`; a directory in the way is skipped with a warning naming it (Coder
//! fails there).
//!
//! The clone goes to a temporary directory renamed into place, so an interrupted clone
//! never leaves a half repository that a later start would try to pull.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::fsprep::create_dir;
use super::{Ctx, DotfilesConfig, StepResult, show};
use crate::userfs;

/// Install scripts, in the order `coder dotfiles` tries them.
pub const CANDIDATES: &[&str] = &[
    "install.sh",
    "install",
    "bootstrap.sh",
    "bootstrap",
    "script/bootstrap",
    "setup.sh",
    "setup",
    "script/setup",
];

/// Why the dotfiles step failed.
#[derive(Debug, thiserror::Error)]
pub enum DotfilesError {
    #[error("cannot clone {url}: {message}")]
    Clone { url: String, message: String },
    #[error("cloning {url} timed out after {after}")]
    CloneTimeout { url: String, after: String },
    #[error("cannot move the old clone {from} aside to {to}: {source}")]
    Backup {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("install script {path} is not executable (chmod +x it)")]
    NotExecutable { path: PathBuf },
    #[error("cannot start install script {path}: {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("install script {path} failed: {status}{tail}")]
    ScriptFailed {
        path: PathBuf,
        status: String,
        tail: String,
    },
    #[error("install script {path} timed out after {after} and was killed")]
    ScriptTimeout { path: PathBuf, after: String },
    #[error("{0}")]
    Io(String),
}

/// The repository URL without credentials, for messages.
pub fn display_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if let Some((_, host)) = authority.rsplit_once('@') {
            return format!("{scheme}://{host}{path}");
        }
    }
    url.to_string()
}

/// The URL to fetch from: wsagent's libgit2 speaks file, http and https but not ssh, so
/// an `ssh://` or scp-like (`git@host:path`) URL is fetched over its HTTPS twin (the
/// same host and path), as the save does for pushes. Other URLs are used as they are.
pub fn fetch_url(url: &str) -> String {
    if let Some(rest) = url.strip_prefix("ssh://") {
        let rest = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        // A port is the ssh daemon's, not the web server's.
        let host = host.split(':').next().unwrap_or(host);
        return format!("https://{host}/{path}");
    }
    if !url.contains("://")
        && let Some((userhost, path)) = url.split_once(':')
        && !userhost.contains('/')
        && !path.starts_with('/')
        && !userhost.is_empty()
    {
        let host = userhost
            .rsplit_once('@')
            .map(|(_, h)| h)
            .unwrap_or(userhost);
        return format!("https://{host}/{path}");
    }
    url.to_string()
}

/// Run the step.
pub async fn run(ctx: &Arc<Ctx>, cfg: &DotfilesConfig, url: &str) -> StepResult {
    match run_inner(ctx, cfg, url).await {
        Ok(msg) => StepResult::Ok(Some(msg)),
        Err(e) => StepResult::Failed(e.to_string()),
    }
}

async fn run_inner(
    ctx: &Arc<Ctx>,
    cfg: &DotfilesConfig,
    url: &str,
) -> Result<String, DotfilesError> {
    let shown = display_url(url);
    let config_dir = ctx.home.join(".config/coderv2");
    let repo_dir = config_dir.join("dotfiles");
    let url_file = config_dir.join("dotfilesurl");
    create_dir(&config_dir, ctx.owner.as_ref()).map_err(|e| DotfilesError::Io(e.to_string()))?;
    let mut notes = Vec::new();

    // Everything below is done as the user (see crate::userfs): the clone and the pull
    // with the user's filesystem ids, so a `file://` URL the user cannot read is not
    // cloned for them, and nothing in HOME needs chowning afterwards.
    let user = userfs::user_for(&repo_dir);
    if user.is_some() {
        allow_foreign_owners();
    }
    let exists = repo_dir.exists();
    let mut moved = false;
    // The URL the clone was made from; unknown (no URL file) counts as another one.
    let recorded = userfs::read(&url_file).map(|b| String::from_utf8_lossy(&b).into_owned());
    if exists && recorded.as_deref().map(str::trim).ok() != Some(url) {
        let backup = backup_path(&config_dir);
        userfs::rename(&repo_dir, &backup).map_err(|source| DotfilesError::Backup {
            from: repo_dir.clone(),
            to: backup.clone(),
            source,
        })?;
        let why = match &recorded {
            Ok(_) => "URL changed".to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "no URL file".to_string(),
            Err(e) => format!("URL file unreadable ({e})"),
        };
        tracing::info!(from = %repo_dir.display(), to = %backup.display(), "dotfiles {why}: old clone moved aside");
        notes.push(format!(
            "{why}: old clone moved to {}",
            show(&backup, &ctx.home)
        ));
        moved = true;
    }

    if exists && !moved {
        let dir = repo_dir.clone();
        let limit = cfg.clone_timeout;
        let branch = cfg.branch.clone();
        let r = blocking_with_deadline(limit, move |deadline| {
            userfs::as_user(user, || Ok(pull_ff_only(&dir, branch.as_deref(), deadline)))
                .unwrap_or_else(|e| Err(e.to_string()))
        })
        .await;
        match r {
            Ok(Ok(m)) => notes.push(m),
            Ok(Err(m)) => {
                tracing::warn!(repo = %repo_dir.display(), error = %m, "failed to update the dotfiles repository, continuing");
                notes.push(format!("warning: update failed, continuing: {m}"));
            }
            Err(()) => {
                tracing::warn!(repo = %repo_dir.display(), "updating the dotfiles repository timed out, continuing");
                notes.push(format!(
                    "warning: update timed out after {}, continuing",
                    humantime::format_duration(limit)
                ));
            }
        }
    } else {
        let tmp = config_dir.join(format!(".dotfiles.tmp-{}", std::process::id()));
        let _ = userfs::remove_dir_all(&tmp);
        let fetch = fetch_url(url);
        if fetch != url {
            notes.push(format!(
                "ssh is not available: fetched over {}",
                display_url(&fetch)
            ));
        }
        let (u, t, b) = (fetch, tmp.clone(), cfg.branch.clone());
        let limit = cfg.clone_timeout;
        let r = blocking_with_deadline(limit, move |deadline| {
            userfs::as_user(user, || Ok(clone(&u, &t, b.as_deref(), deadline)))
                .unwrap_or_else(|e| Err(e.to_string()))
        })
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(message)) => {
                let _ = userfs::remove_dir_all(&tmp);
                return Err(DotfilesError::Clone {
                    url: shown,
                    message,
                });
            }
            Err(()) => {
                let _ = userfs::remove_dir_all(&tmp);
                return Err(DotfilesError::CloneTimeout {
                    url: shown,
                    after: humantime::format_duration(limit).to_string(),
                });
            }
        }
        userfs::rename(&tmp, &repo_dir).map_err(|e| {
            DotfilesError::Io(format!(
                "cannot move the clone into {}: {e}",
                repo_dir.display()
            ))
        })?;
        notes.insert(0, format!("cloned {shown}"));
    }
    userfs::write_atomic(&url_file, url.as_bytes(), 0o644)
        .map_err(|e| DotfilesError::Io(format!("cannot write {}: {e}", url_file.display())))?;

    match find_install_script(&repo_dir)? {
        Some(script) => {
            run_script(ctx, &repo_dir, &script, cfg.install_timeout).await?;
            notes.push(format!(
                "ran {}",
                script.strip_prefix(&repo_dir).unwrap_or(&script).display()
            ));
        }
        None => {
            let r = link_dotfiles(&repo_dir, &ctx.home)?;
            notes.push(r.summary());
        }
    }
    Ok(notes.join("; "))
}

fn backup_path(config_dir: &Path) -> PathBuf {
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let mut p = config_dir.join(format!("dotfiles_backup_{stamp}"));
    let mut i = 1;
    while p.exists() {
        p = config_dir.join(format!("dotfiles_backup_{stamp}.{i}"));
        i += 1;
    }
    p
}

/// Run blocking git work on the blocking pool with a deadline it can check (git2's
/// progress callbacks abort the transfer when they return false), and a backstop
/// timeout a little later. `Err(())` means it timed out.
async fn blocking_with_deadline<T, F>(limit: Duration, f: F) -> Result<T, ()>
where
    T: Send + 'static,
    F: FnOnce(Instant) -> T + Send + 'static,
{
    let deadline = Instant::now() + limit;
    let job = tokio::task::spawn_blocking(move || {
        let r = f(deadline);
        (r, Instant::now() >= deadline)
    });
    match tokio::time::timeout(limit + Duration::from_secs(2), job).await {
        Ok(Ok((_, true))) => Err(()),
        Ok(Ok((r, false))) => Ok(r),
        Ok(Err(_)) | Err(_) => Err(()),
    }
}

/// libgit2 refuses a repository owned by another user; a root daemon updates the
/// workspace user's clone, so the check is relaxed (once, and only as root).
fn allow_foreign_owners() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if nix::unistd::geteuid().is_root() {
            // SAFETY: sets a libgit2 global option; called once, before the repository
            // is opened, with no other libgit2 call racing it in this step.
            let _ = unsafe { git2::opts::set_verify_owner_validation(false) };
        }
    });
}

fn fetch_options(deadline: Instant) -> git2::FetchOptions<'static> {
    let mut cb = git2::RemoteCallbacks::new();
    cb.transfer_progress(move |_| Instant::now() < deadline);
    cb.sideband_progress(move |_| Instant::now() < deadline);
    let mut fo = git2::FetchOptions::new();
    fo.remote_callbacks(cb);
    fo
}

fn clone(url: &str, dir: &Path, branch: Option<&str>, deadline: Instant) -> Result<(), String> {
    // HTTP(S) goes through crate::githttp: anonymous, under the deadline.
    let _net = crate::githttp::Scope::new(&[], Some(deadline));
    let mut b = git2::build::RepoBuilder::new();
    b.fetch_options(fetch_options(deadline));
    if let Some(br) = branch {
        b.branch(br);
    }
    b.clone(url, dir)
        .map(|_| ())
        .map_err(|e| e.message().to_string())
}

/// Check out `branch` (from `origin/<branch>` when there is no local one yet), like
/// `coder dotfiles --branch` does on an existing clone.
fn switch_branch(repo: &git2::Repository, branch: &str, deadline: Instant) -> Result<(), String> {
    let m = |e: git2::Error| e.message().to_string();
    let mut remote = repo.find_remote("origin").map_err(m)?;
    let spec = format!("+refs/heads/{branch}:refs/remotes/origin/{branch}");
    let _net = crate::githttp::Scope::new(&[], Some(deadline));
    remote
        .fetch(&[&spec], Some(&mut fetch_options(deadline)), None)
        .map_err(m)?;
    let local = match repo.find_branch(branch, git2::BranchType::Local) {
        Ok(b) => b,
        Err(_) => {
            let theirs = repo
                .find_reference(&format!("refs/remotes/origin/{branch}"))
                .and_then(|r| r.peel_to_commit())
                .map_err(|e| format!("no branch {branch:?} on origin: {}", e.message()))?;
            let mut b = repo.branch(branch, &theirs, false).map_err(m)?;
            b.set_upstream(Some(&format!("origin/{branch}")))
                .map_err(m)?;
            b
        }
    };
    let target = local.get().peel_to_commit().map_err(m)?;
    repo.checkout_tree(
        target.as_object(),
        Some(git2::build::CheckoutBuilder::new().safe()),
    )
    .map_err(m)?;
    repo.set_head(&format!("refs/heads/{branch}")).map_err(m)
}

/// `git pull --ff-only` of the current branch from `origin`, after switching to
/// `branch` when it is given and differs.
fn pull_ff_only(dir: &Path, branch: Option<&str>, deadline: Instant) -> Result<String, String> {
    let m = |e: git2::Error| e.message().to_string();
    let repo = git2::Repository::open(dir).map_err(m)?;
    let mut switched = String::new();
    if let Some(b) = branch {
        let current = repo
            .head()
            .ok()
            .and_then(|h| h.shorthand().ok().map(String::from));
        if current.as_deref() != Some(b) {
            switch_branch(&repo, b, deadline)?;
            switched = format!("switched to {b}; ");
        }
    }
    let pulled = pull_current(&repo, deadline)?;
    Ok(format!("{switched}{pulled}"))
}

fn pull_current(repo: &git2::Repository, deadline: Instant) -> Result<String, String> {
    let m = |e: git2::Error| e.message().to_string();
    let head = repo.head().map_err(m)?;
    if !head.is_branch() {
        return Err("HEAD is detached; not updating".into());
    }
    let refname = head.name().map_err(m)?.to_string();
    let branch = head.shorthand().map_err(m)?.to_string();
    let mut remote = repo.find_remote("origin").map_err(m)?;
    let _net = crate::githttp::Scope::new(&[], Some(deadline));
    remote
        .fetch(&[&branch], Some(&mut fetch_options(deadline)), None)
        .map_err(m)?;
    let fetch_head = repo.find_reference("FETCH_HEAD").map_err(m)?;
    let theirs = repo.reference_to_annotated_commit(&fetch_head).map_err(m)?;
    let (analysis, _) = repo.merge_analysis(&[&theirs]).map_err(m)?;
    if analysis.is_up_to_date() {
        return Ok("pulled: already up to date".into());
    }
    if !analysis.is_fast_forward() {
        return Err(format!(
            "{branch} has diverged from origin/{branch}; not a fast-forward"
        ));
    }
    let target = repo.find_object(theirs.id(), None).map_err(m)?;
    // Safe checkout first: refuses to overwrite local modifications, like git pull.
    repo.checkout_tree(&target, Some(git2::build::CheckoutBuilder::new().safe()))
        .map_err(m)?;
    repo.find_reference(&refname)
        .and_then(|mut r| r.set_target(theirs.id(), "wsagent: dotfiles fast-forward"))
        .map_err(m)?;
    Ok(format!(
        "pulled: fast-forwarded {branch} to {}",
        &theirs.id().to_string()[..12]
    ))
}

/// The first existing install script, or an error when it is not executable.
pub fn find_install_script(repo: &Path) -> Result<Option<PathBuf>, DotfilesError> {
    use std::os::unix::fs::PermissionsExt;
    for c in CANDIDATES {
        let p = repo.join(c);
        let Ok(meta) = std::fs::metadata(&p) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        if meta.permissions().mode() & 0o111 == 0 {
            return Err(DotfilesError::NotExecutable { path: p });
        }
        return Ok(Some(p));
    }
    Ok(None)
}

async fn run_script(
    ctx: &Arc<Ctx>,
    repo: &Path,
    script: &Path,
    limit: Duration,
) -> Result<(), DotfilesError> {
    use crate::supervisor::output::{RotatingFile, Sink, pump};
    let log = ctx.log_dir.join("dotfiles-install.log");
    let sink = Sink::new(
        "dotfiles-install",
        RotatingFile::new(log.clone(), ctx.logs.max_bytes, ctx.logs.keep),
    );
    sink.line("stdout", &format!("--- running {}", script.display()));
    let mut spec = crate::procs::Spec::new(vec![script.display().to_string()]);
    spec.kill_on_drop = true;
    spec.cwd = Some(repo.to_path_buf());
    spec.env = ctx.child_env(&Default::default());
    spec.run_as = ctx.owner.clone();
    spec.stdout = crate::procs::Io::Piped;
    spec.stderr = crate::procs::Io::Piped;
    let mut child = crate::procs::spawn(spec).map_err(|source| DotfilesError::Spawn {
        path: script.into(),
        source,
    })?;
    let out = child
        .stdout
        .take()
        .map(|fd| pump(fd, "stdout", sink.clone()));
    let err = child
        .stderr
        .take()
        .map(|fd| pump(fd, "stderr", sink.clone()));
    let mut pumps = Box::pin(async move {
        if let Some(o) = out {
            o.await;
        }
    });
    let mut pumps_err = Box::pin(async move {
        if let Some(e) = err {
            e.await;
        }
    });
    let mut waiting = Box::pin(tokio::time::timeout(limit, child.wait()));
    let (mut a, mut b) = (false, false);
    let status = loop {
        tokio::select! {
            st = &mut waiting => break st,
            _ = &mut pumps, if !a => a = true,
            _ = &mut pumps_err, if !b => b = true,
        }
    };
    // Drain what is left, unless a grandchild holds the pipes open.
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        futures::future::join(
            async {
                if !a {
                    pumps.await
                }
            },
            async {
                if !b {
                    pumps_err.await
                }
            },
        ),
    )
    .await;
    match status {
        Err(_) => {
            // The script timed out: dropping `child` below kills its group.
            Err(DotfilesError::ScriptTimeout {
                path: script.into(),
                after: humantime::format_duration(limit).to_string(),
            })
        }
        Ok(st) => {
            if st.success() {
                Ok(())
            } else {
                let last = crate::supervisor::output::tail(&log, 1);
                let last: Vec<&str> = last.iter().map(|l| crate::logline::split(l).1).collect();
                let tail = match last.first() {
                    Some(l) if !l.starts_with("--- running") => format!(" (last output: {l})"),
                    _ => String::new(),
                };
                Err(DotfilesError::ScriptFailed {
                    path: script.into(),
                    status: st.to_string(),
                    tail,
                })
            }
        }
    }
}

/// What the symlink fallback did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LinkReport {
    pub linked: Vec<String>,
    /// Regular files renamed to `<name>.bak` first.
    pub backed_up: Vec<String>,
    /// Names skipped because a directory is in the way.
    pub skipped_dirs: Vec<String>,
    pub already: Vec<String>,
}

impl LinkReport {
    pub fn summary(&self) -> String {
        if self.linked.is_empty()
            && self.skipped_dirs.is_empty()
            && self.already.is_empty()
            && self.backed_up.is_empty()
        {
            return "no install script and no dotfiles found, nothing to do".into();
        }
        let mut parts = Vec::new();
        if !self.linked.is_empty() {
            parts.push(format!("linked {}", self.linked.join(", ")));
        }
        if !self.already.is_empty() {
            parts.push(format!("already linked {}", self.already.join(", ")));
        }
        for b in &self.backed_up {
            parts.push(format!("moved ~/{b} to ~/{b}.bak"));
        }
        for d in &self.skipped_dirs {
            parts.push(format!(
                "warning: skipped ~/{d}: a directory is in the way (link it by hand)"
            ));
        }
        parts.join("; ")
    }
}

/// Whether a top-level entry is a dotfile to link (`coder dotfiles`' rule).
pub fn is_linkable(name: &str) -> bool {
    name.starts_with('.') && (!name.starts_with(".git") || name == ".gitconfig")
}

/// The symlink fallback.
pub fn link_dotfiles(repo: &Path, home: &Path) -> Result<LinkReport, DotfilesError> {
    let io = |what: String, e: std::io::Error| DotfilesError::Io(format!("{what}: {e}"));
    let mut names: Vec<String> = std::fs::read_dir(repo)
        .map_err(|e| io(format!("cannot read {}", repo.display()), e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_linkable(n))
        .collect();
    names.sort();
    let mut r = LinkReport::default();
    for name in names {
        let from = repo.join(&name);
        let to = home.join(&name);
        match std::fs::symlink_metadata(&to) {
            Err(_) => {}
            Ok(m) if m.file_type().is_symlink() => {
                if std::fs::read_link(&to).ok().as_deref() == Some(from.as_path()) {
                    r.already.push(name);
                    continue;
                }
                userfs::remove_file(&to)
                    .map_err(|e| io(format!("cannot replace symlink {}", to.display()), e))?;
            }
            Ok(m) if m.is_dir() => {
                tracing::warn!(path = %to.display(), "dotfiles: a directory is in the way of {name}; skipped");
                r.skipped_dirs.push(name);
                continue;
            }
            Ok(_) => {
                let bak = home.join(format!("{name}.bak"));
                userfs::rename(&to, &bak).map_err(|e| {
                    io(
                        format!("cannot move {} to {}", to.display(), bak.display()),
                        e,
                    )
                })?;
                r.backed_up.push(name.clone());
            }
        }
        userfs::symlink(&from, &to).map_err(|e| {
            io(
                format!("cannot link {} to {}", to.display(), from.display()),
                e,
            )
        })?;
        r.linked.push(name);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn credentials_never_appear_in_the_displayed_url() {
        assert_eq!(
            display_url("https://user:tok@github.com/me/dots.git"),
            "https://github.com/me/dots.git"
        );
        assert_eq!(display_url("file:///tmp/x"), "file:///tmp/x");
        assert_eq!(display_url("git@github.com:me/d"), "git@github.com:me/d");
    }

    #[test]
    fn ssh_urls_are_fetched_over_their_https_twin() {
        assert_eq!(
            fetch_url("git@github.com:me/dots.git"),
            "https://github.com/me/dots.git"
        );
        assert_eq!(
            fetch_url("ssh://git@gitlab.example.com:2222/team/dots"),
            "https://gitlab.example.com/team/dots"
        );
        for same in [
            "https://github.com/me/dots",
            "file:///tmp/dots.git",
            "/srv/git/dots.git",
        ] {
            assert_eq!(fetch_url(same), same);
        }
    }

    #[test]
    fn linkable_names_follow_coder_rules() {
        assert!(is_linkable(".bashrc"));
        assert!(is_linkable(".gitconfig"));
        assert!(!is_linkable(".git"));
        assert!(!is_linkable(".github"));
        assert!(!is_linkable(".gitignore"));
        assert!(!is_linkable("README.md"));
    }

    #[test]
    fn the_first_candidate_wins_and_script_paths_are_real_paths() {
        let d = tempfile::tempdir().unwrap();
        assert!(find_install_script(d.path()).unwrap().is_none());
        std::fs::create_dir(d.path().join("script")).unwrap();
        let setup = d.path().join("script/setup");
        std::fs::write(&setup, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&setup, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find_install_script(d.path()).unwrap(), Some(setup));
        let boot = d.path().join("bootstrap");
        std::fs::write(&boot, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&boot, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = find_install_script(d.path()).unwrap_err().to_string();
        assert!(e.contains("bootstrap is not executable"), "{e}");
    }

    #[test]
    fn fallback_backs_up_files_skips_directories_and_is_idempotent() {
        let repo = tempfile::tempdir().unwrap();
        let home = tempfile::tempdir().unwrap();
        for n in [".bashrc", ".vimrc", ".gitconfig", ".gitignore", "README"] {
            std::fs::write(repo.path().join(n), n).unwrap();
        }
        std::fs::create_dir(repo.path().join(".config")).unwrap();
        std::fs::write(home.path().join(".bashrc"), "mine").unwrap();
        std::fs::create_dir(home.path().join(".config")).unwrap();
        let r = link_dotfiles(repo.path(), home.path()).unwrap();
        assert_eq!(r.linked, [".bashrc", ".gitconfig", ".vimrc"]);
        assert_eq!(r.backed_up, [".bashrc"]);
        assert_eq!(r.skipped_dirs, [".config"]);
        assert_eq!(
            std::fs::read_to_string(home.path().join(".bashrc.bak")).unwrap(),
            "mine"
        );
        assert_eq!(
            std::fs::read_to_string(home.path().join(".bashrc")).unwrap(),
            ".bashrc"
        );
        assert!(!home.path().join(".gitignore").exists());
        assert!(r.summary().contains("skipped ~/.config"));
        let again = link_dotfiles(repo.path(), home.path()).unwrap();
        assert!(again.linked.is_empty() && again.backed_up.is_empty());
        assert_eq!(again.already.len(), 3);
    }
}
