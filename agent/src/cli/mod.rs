//! The command line: `wsagent run` starts the daemon; every other command is a client
//! of its local API (or, for `config`, `version`, `demo`, works alone).
//!
//! Exit codes (documented in README.md): 0 success; 1 the operation failed (e.g. the
//! stop sequence did not end `off`, a service action was refused); 2 usage error;
//! 3 `status`: something is not as configured; 69 the daemon cannot be reached;
//! 75 `run`: another daemon already runs on that socket; 78 invalid configuration.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

pub mod attach;
mod progress;
pub(crate) mod table;

use agent_proto::local::{Event, EventKind, Health, Lifecycle, ServiceState, Status};
use clap::{Parser, Subcommand};

use crate::api::{Client, ClientError};
use crate::config::{self, Sources};
use agent_proto::save::SaveResult;

pub const EX_FAILED: u8 = 1;
/// `status`: something is not as configured (systemctl's "not running" code).
pub const EX_NOT_AS_CONFIGURED: u8 = 3;
pub const EX_UNAVAILABLE: u8 = 69;
/// `run`: another daemon already serves this socket (sysexits' EX_TEMPFAIL).
pub const EX_ALREADY_RUNNING: u8 = 75;
pub const EX_CONFIG: u8 = 78;

#[derive(Parser, Debug)]
#[command(
    name = "wsagent",
    version,
    about = "PID 1 for cloud development workspaces: prepares, supervises, saves git work on stop"
)]
struct Cli {
    /// The daemon's local API socket (default: WSAGENT_SOCKET, else /run/wsagent/wsagent.sock
    /// as root, $XDG_RUNTIME_DIR/wsagent.sock otherwise).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the daemon (the container's ENTRYPOINT).
    Run {
        /// A config file merged over /etc/wsagent/config.toml and the defaults.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Show the lifecycle and every service.
    /// The daemon's state. Exits 0 when everything is as configured, 3 when it is not (a
    /// service failed, unhealthy or restarting, or the start failed), as `systemctl
    /// status` does; `--json` exits 0 whenever the daemon answered.
    Status {
        /// The whole status as JSON (exit 0 whenever the daemon answered).
        #[arg(long)]
        json: bool,
        /// Print nothing; exit 0 only when the lifecycle is `ready` (for HEALTHCHECK and
        /// Kubernetes probes).
        #[arg(long)]
        ready: bool,
        /// One line for dashboards and prompts: `3/3 up · saved 12:04 · 1 repo unsaved`.
        #[arg(long, conflicts_with_all = ["json", "ready"])]
        short: bool,
    },
    /// Start a service (also one that has `failed`), or `all`; waits until it is running
    /// and healthy, exit 1 with the reason when it does not get there.
    Start {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Stop a service, or `all`; waits until it has stopped.
    Stop {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Restart a service, or `all`; waits until the new process is running and healthy.
    Restart {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Show a service's output, a one-time or startup task's (by its name), or the
    /// daemon's own log (`daemon`).
    Logs {
        /// A service, a task, or `daemon`.
        name: String,
        /// Keep following new lines.
        #[arg(short, long)]
        follow: bool,
        /// How many lines of history.
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: usize,
        /// Only lines from this long ago (`10m`, `2h`) or this time on (RFC 3339:
        /// `2026-12-03T16:00:00Z`). A task's output (a terminal's) has no per-line time
        /// and is shown whole.
        #[arg(long, value_parser = parse_since)]
        since: Option<std::time::SystemTime>,
        /// Show each line's time (UTC).
        #[arg(short, long)]
        timestamps: bool,
    },
    /// List the one-time and startup tasks with state, exit code and duration.
    Tasks {
        #[arg(long)]
        json: bool,
    },
    /// Show a startup task's output and type into its terminal; Ctrl-] detaches (the
    /// task keeps running).
    Attach { name: String },
    /// Follow the daemon's events (startup steps, service changes, saves, stop phases)
    /// until it exits or you press Ctrl-C, one line each.
    Events {
        /// One JSON object a line (the `agent-proto` `Event`).
        #[arg(long)]
        json: bool,
        /// First replay the recent events of this long ago (e.g. `10m`).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<Duration>,
    },
    /// Start the stop sequence.
    Shutdown {
        /// Follow the stop sequence until the daemon is off; exit non-zero unless it
        /// ended `off`.
        #[arg(long)]
        wait: bool,
    },
    /// Save git work now: commit and push every repository with unsaved work. A save
    /// already running (the stop sequence's, a checkpoint, another `wsagent save`) is
    /// joined and reported, not repeated: Coder's `shutdown_script` runs it after
    /// wsagent's own stop save. Prints each repository's outcome as it lands. Exits 0
    /// when every repository was pushed or had nothing to save, 1 otherwise.
    Save {
        /// Only the repository containing this path.
        #[arg(long)]
        repo: Option<PathBuf>,
        /// Show what would be saved; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the stream as JSON lines (`started`, one `repo` per repository, `done`).
        #[arg(long)]
        json: bool,
    },
    /// Print the current git token of a provider (default `github`) for scripts; exit 1
    /// and print the sign-in URL when there is none.
    Token { provider: Option<String> },
    /// Answer git's `Username for ...`/`Password for ...` prompt from the token cache.
    /// `GIT_ASKPASS=/usr/local/bin/wsagent` works too: a single prompt argument is
    /// recognised without the subcommand.
    GitAskpass { prompt: String },
    /// Check or show the configuration.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Print the version.
    Version,
    /// The snapshots of a repository, newest first: time, why, branch, commit, files
    /// changed, pushed or only local. Reads the repository as you (no daemon needed).
    Saves {
        /// The repository (default: the one containing the current directory).
        #[arg(long)]
        repo: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        /// Also what is on the remote (e.g. snapshots an earlier workspace pushed):
        /// fetched, so `restore --snapshot` can use them.
        #[arg(long)]
        remote: bool,
    },
    /// Put a repository back to a snapshot: same branch, same commit, same staged
    /// changes, same files. Refuses over unsaved changes unless --force (which saves
    /// them first). A path that does not exist is cloned from the remote the save
    /// recorded (or --url) first.
    Restore {
        /// The repository (default: the one containing the current directory).
        #[arg(long)]
        repo: Option<PathBuf>,
        /// The snapshot's commit (a prefix will do); default: the newest.
        #[arg(long, conflicts_with = "at")]
        snapshot: Option<String>,
        /// The newest snapshot made at or before this time (RFC 3339).
        #[arg(long)]
        at: Option<String>,
        /// Where to clone from when the repository is not there.
        #[arg(long)]
        url: Option<String>,
        /// Save the unsaved changes first, then restore over them.
        #[arg(long)]
        force: bool,
        /// Say what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print a shell completion script: `wsagent completion bash >
    /// /usr/share/bash-completion/completions/wsagent` (zsh: `_wsagent` in a $fpath dir;
    /// fish: `~/.config/fish/completions/wsagent.fish`).
    Completion { shell: clap_complete::Shell },
    /// Print the manual page (roff): `wsagent man > /usr/share/man/man1/wsagent.1`.
    Man,
    /// A guided tour: a throwaway workspace with a supervised service, in under 20 s.
    Demo,
    /// (internal) The demo's service: answers HTTP, crashes once.
    #[command(hide = true)]
    DemoService {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        crash_after_ms: u64,
        #[arg(long)]
        marker: PathBuf,
    },
}

/// `--since`: a duration before now (`10m`) or a time (RFC 3339, any offset).
fn parse_since(s: &str) -> Result<std::time::SystemTime, String> {
    if let Ok(d) = humantime::parse_duration(s) {
        return std::time::SystemTime::now()
            .checked_sub(d)
            .ok_or_else(|| format!("{s:?} is too long ago"));
    }
    crate::control::git::parse_expiry(s).ok_or_else(|| {
        format!("{s:?} is neither a duration (`10m`, `2h`) nor an RFC 3339 time (`2026-12-03T16:00:00Z`)")
    })
}

/// How `start`, `stop` and `restart` wait for the service to get there.
#[derive(clap::Args, Debug, Clone, Copy)]
struct WaitArgs {
    /// Return once the daemon has taken the request; do not wait.
    #[arg(long)]
    no_wait: bool,
    /// Give up (exit 1) after this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Validate a config file (merged over the defaults), and that the users it names
    /// exist on this machine (run it in the image); exit 78 listing every problem.
    Check { file: Option<PathBuf> },
    /// Print the effective configuration.
    Show {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// git runs `$GIT_ASKPASS "<prompt>"`: one argument that starts with `Username ` or
/// `Password `.
fn askpass_prompt() -> Option<String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [p] if p.starts_with("Username ") || p.starts_with("Password ") => Some(p.clone()),
        _ => None,
    }
}

fn load_or_exit() -> Result<config::Config, ExitCode> {
    config::load(&Sources::standard(None))
        .map(|l| l.config)
        .map_err(|e| {
            eprintln!("wsagent: {e}");
            ExitCode::from(EX_CONFIG)
        })
}

fn git_askpass(prompt: &str) -> ExitCode {
    let cfg = match load_or_exit() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let code = crate::control::cmd_git_askpass(&cfg, prompt, &mut std::io::stdout());
    ExitCode::from(code.clamp(0, 255) as u8)
}

pub fn main() -> ExitCode {
    if let Some(prompt) = askpass_prompt() {
        return git_askpass(&prompt);
    }
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::GitAskpass { prompt } => git_askpass(&prompt),
        Cmd::Run { config } => run_daemon(config, cli.socket),
        Cmd::Config { cmd } => config_cmd(cmd),
        Cmd::Version => {
            println!("wsagent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Cmd::Saves { repo, json, remote } => saves_cmd(repo, json, remote),
        Cmd::Restore {
            repo,
            snapshot,
            at,
            url,
            force,
            dry_run,
        } => {
            let cfg = match load_or_exit() {
                Ok(c) => c,
                Err(code) => return code,
            };
            let home = crate::paths::home_dir();
            let journal = crate::save::journal::read_journal(&cfg.state_dir(&home));
            let req = crate::restore::RestoreRequest {
                repo: repo.unwrap_or_else(|| PathBuf::from(".")),
                snapshot,
                at,
                url,
                force,
                dry_run,
            };
            // In this process, as the caller (no daemon needed), like the restore itself.
            let save_first = |p: &std::path::Path| save_here(&cfg, p);
            crate::restore::restore(&req, &cfg.save.ref_template, &journal, &save_first)
        }
        Cmd::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "wsagent", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Cmd::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            match clap_mangen::Man::new(cmd).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("wsagent: cannot write the manual page: {e}");
                    ExitCode::from(EX_FAILED)
                }
            }
        }
        Cmd::DemoService {
            port,
            crash_after_ms,
            marker,
        } => crate::demo::service(port, crash_after_ms, &marker),
        cmd => {
            crate::logging::init_cli();
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("wsagent: cannot start the runtime: {e}");
                    return ExitCode::from(EX_FAILED);
                }
            };
            let socket = client_socket(cli.socket);
            rt.block_on(client_cmd(cmd, socket))
        }
    }
}

/// Only one daemon per socket: an exclusive `flock` on `<socket>.lock` (holding the
/// daemon's pid), kept for the daemon's life and released by the kernel when it exits,
/// however it exits. A second `wsagent run` would otherwise take the socket over.
fn lock_socket(socket: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>, String> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let mut name = socket.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    let path = socket.with_file_name(name);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| format!("cannot open the lock file {}: {e}", path.display()))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            let _ = lock.set_len(0);
            let _ = writeln!(lock, "{}", std::process::id());
            Ok(lock)
        }
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            let pid = pid.trim();
            Err(format!(
                "another wsagent daemon{} is already running on {} (lock {})",
                if pid.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {pid})")
                },
                socket.display(),
                path.display()
            ))
        }
        Err((_, e)) => Err(format!("cannot lock {}: {e}", path.display())),
    }
}

fn client_socket(explicit: Option<PathBuf>) -> PathBuf {
    let cfg = config::load(&Sources::standard(None))
        .ok()
        .map(|l| l.config);
    crate::api::socket_path(explicit, cfg.as_ref())
}

fn run_daemon(config_file: Option<PathBuf>, socket: Option<PathBuf>) -> ExitCode {
    // Before any thread exists: threads inherit the signal mask.
    crate::signals::reset_inherited();
    let sources = Sources::standard(config_file);
    let loaded = match config::load(&sources) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wsagent: {e}");
            eprintln!("wsagent: nothing was started");
            return ExitCode::from(EX_CONFIG);
        }
    };
    // One daemon per socket, decided before anything is started or logged.
    let socket_file = crate::api::socket_path(socket.clone(), Some(&loaded.config));
    let _lock = match lock_socket(&socket_file) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wsagent: {e}");
            eprintln!("wsagent: nothing was started");
            return ExitCode::from(EX_ALREADY_RUNNING);
        }
    };
    for var in crate::supervisor::SECRET_VARS {
        if let Ok(v) = std::env::var(var) {
            crate::secrets::register(&v);
        }
    }
    tune_malloc();
    let home = crate::paths::home_dir();
    // Whose HOME it is: what a root daemon does there, it does as that user.
    crate::startup::set_realm(&home, &loaded.config);
    let _guard = crate::logging::init_daemon(
        &loaded.config.daemon.log_level,
        &loaded.config.state_dir(&home),
    );
    match crate::procs::shield_from_oom() {
        Ok(s) if s.daemon < s.children || s.inherited <= -1000 => tracing::info!(
            inherited = s.inherited,
            daemon = s.daemon,
            children = s.children,
            "oom_score_adj: the OOM killer picks a child before the daemon"
        ),
        Ok(s) => tracing::warn!(
            oom_score_adj = s.daemon,
            "cannot put the daemon below its children for the OOM killer (no CAP_SYS_RESOURCE and the value is already 1000)"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot read or set oom_score_adj"),
    }
    // Blocking threads (a save's commits, file reads) end 1 s after their last task
    // instead of tokio's 10 s: an idle daemon holds no thread, and a thread's stack goes
    // back to the kernel when it ends (issue 16, "memory").
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_keep_alive(Duration::from_secs(1))
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::from(EX_FAILED);
        }
    };
    let code = rt.block_on(crate::daemon::run(
        loaded,
        crate::daemon::Options {
            sources,
            socket,
            home: None,
        },
        std::future::pending(),
    ));
    rt.shutdown_timeout(Duration::from_millis(200));
    code
}

/// glibc gives every thread that allocates an arena of its own (up to 8 per core), each
/// with pages of its own: for a daemon that mostly waits, two arenas are plenty and keep
/// the idle footprint small. The mmap and trim thresholds are fixed at glibc's initial
/// 128 KiB: left dynamic, freeing one large block (a save's list of 100 000 index
/// entries) raises the trim threshold to twice its size, and the free top of a thread
/// arena's heap below that is never given back (`malloc_trim` does not trim a thread
/// arena's top). Measured by `scripts/bench`'s scale section ("RssAnon 10 s after that
/// save"; bench/results.md). Called before any thread is started.
fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; no thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
    }
}

/// Save the repository containing `path` in this process, as the caller (`restore
/// --force` takes a snapshot of what it is about to replace): Ok once it is on the remote.
fn save_here(cfg: &config::Config, path: &std::path::Path) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot save the current state first: {e}"))?;
    let home = crate::paths::home_dir();
    let env = crate::save::SaveEnv::from_env(
        home.clone(),
        cfg.state_dir(&home),
        crate::tokens::Tokens::new(cfg.git_providers.clone(), home),
        crate::events::Events::new(),
    );
    let req = crate::save::SaveRequest {
        reason: crate::save::Reason::Manual,
        only: Some(path.to_path_buf()),
        dry_run: false,
        // The CLI runs as the caller: no other user's ids to take.
        act_as: None,
    };
    let deadline = tokio::time::Instant::now() + cfg.shutdown.budget.max(Duration::from_secs(60));
    let outcomes = rt.block_on(crate::save::save_all(&cfg.save, &env, &req, deadline));
    let mine = crate::saverun::select(&outcomes, Some(path));
    let Some(o) = mine.first() else {
        return Err(format!(
            "could not save the current state of {} first: no repository found there; \
             nothing was restored",
            path.display()
        ));
    };
    println!("{}", outcome_line(o));
    if crate::daemon::save_ok(o) {
        Ok(())
    } else {
        Err("could not save the current state first: nothing was restored".into())
    }
}

fn saves_cmd(repo: Option<PathBuf>, json: bool, remote: bool) -> ExitCode {
    let cfg = match load_or_exit() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let home = crate::paths::home_dir();
    let journal = crate::save::journal::read_journal(&cfg.state_dir(&home));
    let repo = repo.unwrap_or_else(|| PathBuf::from("."));
    let mut snaps = match crate::restore::list(&repo, &cfg.save.ref_template, &journal) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wsagent: {e}");
            return ExitCode::from(EX_FAILED);
        }
    };
    if remote {
        match crate::restore::list_remote(&repo, &cfg.save.ref_template) {
            Ok(r) => snaps = crate::restore::merge(snaps, r),
            Err(e) => {
                eprintln!("wsagent: the remote's snapshots: {e}");
                return ExitCode::from(EX_FAILED);
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&snaps).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    if snaps.is_empty() {
        println!("no snapshot of {}", repo.display());
        return ExitCode::SUCCESS;
    }
    let rows = snaps
        .iter()
        .map(|s| {
            vec![
                s.at.clone(),
                s.reason.clone(),
                s.branch.clone(),
                s.commit.get(..12).unwrap_or(&s.commit).to_string(),
                s.files_changed.to_string(),
                if s.pushed { "pushed" } else { "local only" }.to_string(),
                s.r#ref.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(
            &[
                table::left("TIME"),
                table::left("WHY"),
                table::left("BRANCH"),
                table::left("COMMIT"),
                table::right("FILES"),
                table::left("WHERE"),
                table::left("REF"),
            ],
            rows,
            "",
        )
    );
    ExitCode::SUCCESS
}

async fn events_cmd(client: &Client, json: bool, since: Option<Duration>) -> ExitCode {
    let path = if since.is_some() {
        "/v1/events?replay=true"
    } else {
        "/v1/events"
    };
    let mut reply = match client.request("GET", path, None).await {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let from = since
        .map(|d| humantime::format_rfc3339_micros(std::time::SystemTime::now() - d).to_string());
    let mut out = std::io::stdout();
    while let Some(line) = reply.next_line().await {
        let Ok(ev) = serde_json::from_str::<Event>(&line) else {
            continue;
        };
        // RFC 3339 UTC times compare as text.
        if from.as_deref().is_some_and(|f| ev.at.as_str() < f) {
            continue;
        }
        let text = if json {
            line
        } else {
            format!(
                "{}  {:<5}  {}",
                ev.at.get(..19).unwrap_or(&ev.at).replace('T', " "),
                format!("{:?}", ev.level).to_uppercase(),
                ev.message
            )
        };
        if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    ExitCode::SUCCESS
}

/// Every user (and group) the config names that this machine does not know: key, error.
fn unknown_users(cfg: &config::Config) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (name, s) in &cfg.services {
        if let Some(user) = s.user.as_deref()
            && let Err(e) = crate::procs::resolve_user(user, s.group.as_deref())
        {
            out.push((format!("services.{name}.user"), e));
        }
    }
    let others = [
        ("startup.user", cfg.startup.user.as_deref()),
        ("daemon.api_user", cfg.daemon.api_user.as_deref()),
    ];
    for (key, user) in others {
        if let Some(u) = user
            && let Err(e) = crate::procs::resolve_user(u, None)
        {
            out.push((key.to_string(), e));
        }
    }
    out
}

fn config_cmd(cmd: ConfigCmd) -> ExitCode {
    match cmd {
        ConfigCmd::Check { file } => {
            let sources = Sources {
                explicit: file.clone(),
                ..Sources::standard(None)
            };
            match config::load(&sources) {
                Ok(l) => {
                    // Users exist only where the config runs (the image), so this check
                    // is `config check`'s, not every load's: run it there.
                    let unknown = unknown_users(&l.config);
                    if !unknown.is_empty() {
                        for (key, e) in &unknown {
                            eprintln!("wsagent: {key}: {e} (on this machine)");
                        }
                        return ExitCode::from(EX_CONFIG);
                    }
                    println!("configuration is valid ({})", l.files.join(", "));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("wsagent: {e}");
                    ExitCode::from(EX_CONFIG)
                }
            }
        }
        ConfigCmd::Show { config: file } => match config::load(&Sources::standard(file)) {
            Ok(l) => {
                println!("# effective configuration, from: {}", l.files.join(", "));
                print!("{}", l.config.to_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("wsagent: {e}");
                ExitCode::from(EX_CONFIG)
            }
        },
    }
}

fn fail(e: ClientError) -> ExitCode {
    eprintln!("wsagent: {e}");
    match e {
        ClientError::Unreachable { .. } => ExitCode::from(EX_UNAVAILABLE),
        _ => ExitCode::from(EX_FAILED),
    }
}

async fn client_cmd(cmd: Cmd, socket: PathBuf) -> ExitCode {
    let client = Client::new(socket);
    match cmd {
        Cmd::Status { json, ready, short } => match client.status().await {
            Ok(s) if ready => {
                if s.lifecycle == Lifecycle::Ready {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(EX_FAILED)
                }
            }
            Ok(s) if json => {
                println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Ok(s) => {
                if short {
                    println!("{}", status_line(&s));
                } else {
                    print!("{}", render_status(&s));
                }
                if as_configured(&s) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(EX_NOT_AS_CONFIGURED)
                }
            }
            Err(_) if ready => ExitCode::from(EX_UNAVAILABLE),
            Err(e) => fail(e),
        },
        Cmd::Start { name, wait } => action(&client, &name, "start", wait).await,
        Cmd::Stop { name, wait } => action(&client, &name, "stop", wait).await,
        Cmd::Restart { name, wait } => action(&client, &name, "restart", wait).await,
        Cmd::Logs {
            name,
            follow,
            lines,
            since,
            timestamps,
        } => {
            let mut path = format!(
                "/v1/services/{name}/logs?n={lines}&follow={follow}&timestamps={timestamps}"
            );
            if let Some(t) = since {
                path.push_str(&format!("&since={}", humantime::format_rfc3339_millis(t)));
            }
            let mut reply = match client.request("GET", &path, None).await {
                Ok(r) => r,
                Err(e) => return fail(e),
            };
            if reply.status != 200 {
                let e = reply.json::<serde_json::Value>().await.err();
                eprintln!("wsagent: {}", e.map(|e| e.to_string()).unwrap_or_default());
                return ExitCode::from(EX_FAILED);
            }
            let mut out = std::io::stdout();
            while let Some(line) = reply.next_line().await {
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
            ExitCode::SUCCESS
        }
        Cmd::Shutdown { wait } => {
            let body = serde_json::to_vec(&agent_proto::local::ShutdownRequest { wait })
                .unwrap_or_default();
            let mut reply = match client.request("POST", "/v1/shutdown", Some(body)).await {
                Ok(r) => r,
                Err(e) => return fail(e),
            };
            if !wait {
                return match reply.json::<agent_proto::local::ActionReply>().await {
                    Ok(r) => {
                        println!("{}", r.message);
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(e),
                };
            }
            let started = std::time::Instant::now();
            let mut last = None;
            while let Some(line) = reply.next_line().await {
                if let Ok(ev) = serde_json::from_str::<Event>(&line) {
                    println!("{:>7.3}s  {}", started.elapsed().as_secs_f64(), ev.message);
                    if let EventKind::Lifecycle { state } = ev.kind {
                        last = Some(state);
                    }
                }
            }
            match last {
                Some(Lifecycle::Off) => ExitCode::SUCCESS,
                Some(state) => {
                    eprintln!("wsagent: the stop sequence ended {state}");
                    ExitCode::from(EX_FAILED)
                }
                None => {
                    eprintln!(
                        "wsagent: the daemon went away before reporting the end of the stop sequence"
                    );
                    ExitCode::from(EX_FAILED)
                }
            }
        }
        Cmd::Events { json, since } => events_cmd(&client, json, since).await,
        Cmd::Tasks { json } => attach::cli_tasks(&client, json).await,
        Cmd::Attach { name } => attach::cli_attach(&client, &name).await,
        Cmd::Save {
            repo,
            dry_run,
            json,
        } => save(&client, repo, dry_run, json).await,
        Cmd::Token { provider } => {
            let cfg = match load_or_exit() {
                Ok(c) => c,
                Err(code) => return code,
            };
            let code =
                crate::control::cmd_token(&cfg, provider.as_deref(), &mut std::io::stdout()).await;
            ExitCode::from(code.clamp(0, 255) as u8)
        }
        Cmd::Demo => crate::demo::run().await,
        Cmd::Run { .. }
        | Cmd::Config { .. }
        | Cmd::Version
        | Cmd::Completion { .. }
        | Cmd::Saves { .. }
        | Cmd::Restore { .. }
        | Cmd::Man
        | Cmd::DemoService { .. }
        | Cmd::GitAskpass { .. } => ExitCode::SUCCESS,
    }
}

async fn save(client: &Client, repo: Option<PathBuf>, dry_run: bool, json: bool) -> ExitCode {
    use agent_proto::local::SaveLine;
    let t0 = std::time::Instant::now();
    let repo = repo.map(|p| std::path::absolute(&p).unwrap_or(p).display().to_string());
    let body = serde_json::to_vec(&agent_proto::local::SaveRequest {
        repo: repo.clone(),
        dry_run,
    })
    .unwrap_or_default();
    let mut reply = match client.request("POST", "/v1/save", Some(body)).await {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    if reply.status != 200 {
        return match reply.json::<serde_json::Value>().await {
            Err(e) => fail(e),
            Ok(_) => ExitCode::from(EX_FAILED),
        };
    }
    let mut outcomes = None;
    let mut failed_to_run = None;
    let live = if json {
        None
    } else {
        progress::Live::on_terminal()
    };
    while let Some(line) = reply.next_line().await {
        let Ok(parsed) = serde_json::from_str::<SaveLine>(&line) else {
            continue;
        };
        if json {
            println!("{line}");
        }
        match parsed {
            SaveLine::Started {
                repos,
                joined,
                reason,
            } if !json => {
                let what = if repos == 1 {
                    "repository"
                } else {
                    "repositories"
                };
                let header = if joined {
                    format!("following the {reason} save already running: {repos} {what}")
                } else if dry_run {
                    format!("checking {repos} {what}…")
                } else {
                    format!("saving {repos} {what}…")
                };
                match &live {
                    Some(l) => l.found(repos, &header),
                    None => println!("{header}"),
                }
            }
            SaveLine::Repo { outcome } if !json => match &live {
                Some(l) => l.landed(&outcome_line(&outcome), &outcome.repo),
                None => println!("{}", outcome_line(&outcome)),
            },
            SaveLine::Progress { event } => {
                if !json {
                    match &live {
                        Some(l) => l.note(&event.message),
                        None => eprintln!("{}", event.message),
                    }
                }
                if event.level == agent_proto::local::Level::Error {
                    failed_to_run = Some(event.message);
                }
            }
            SaveLine::Done { outcomes: o } => outcomes = Some(o),
            _ => {}
        }
    }
    if let Some(l) = &live {
        l.finish();
    }
    let Some(outcomes) = outcomes else {
        if failed_to_run.is_none() {
            eprintln!("wsagent: the daemon did not report the end of the save");
        }
        return ExitCode::from(EX_FAILED);
    };
    if outcomes.is_empty() {
        if let Some(r) = &repo {
            eprintln!("wsagent: no git repository at {r}");
            return ExitCode::from(EX_FAILED);
        }
        if !json {
            println!("no repository found");
        }
        return ExitCode::SUCCESS;
    }
    let bad: Vec<_> = outcomes
        .iter()
        .filter(|o| !dry_run && !crate::daemon::save_ok(o))
        .collect();
    if !json {
        println!(
            "{} in {:.1} s",
            save_summary(&outcomes),
            t0.elapsed().as_secs_f64()
        );
        if !bad.is_empty() {
            eprintln!("not saved to a remote:");
            for o in &bad {
                eprintln!("  {}", outcome_line(o));
                eprintln!("    fix: {}", fix_for(o));
            }
        }
    }
    if bad.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "wsagent: {} of {} repositories not pushed",
            bad.len(),
            outcomes.len()
        );
        ExitCode::from(EX_FAILED)
    }
}

/// Whether everything is as configured: no service failed, unhealthy or restarting, and
/// the start did not fail.
fn as_configured(s: &Status) -> bool {
    !matches!(s.lifecycle, Lifecycle::StartError | Lifecycle::StartTimeout)
        && s.services.iter().all(|v| {
            !matches!(
                v.state,
                ServiceState::Failed | ServiceState::Unhealthy | ServiceState::Backoff
            )
        })
}

/// `status --short`: services up out of those that should run, the lifecycle when it is
/// not `ready`, the last save's time (UTC) and the repositories it left unsaved.
fn status_line(s: &Status) -> String {
    let counted: Vec<_> = s
        .services
        .iter()
        .filter(|v| !matches!(v.state, ServiceState::Absent | ServiceState::Stopped))
        .collect();
    let up = counted
        .iter()
        .filter(|v| v.state == ServiceState::Running)
        .count();
    let mut parts = vec![format!("{up}/{} up", counted.len())];
    let bad: Vec<&str> = counted
        .iter()
        .filter(|v| {
            matches!(
                v.state,
                ServiceState::Failed | ServiceState::Unhealthy | ServiceState::Backoff
            )
        })
        .map(|v| v.name.as_str())
        .collect();
    if !bad.is_empty() {
        parts.push(format!("down: {}", bad.join(", ")));
    }
    if s.lifecycle != Lifecycle::Ready {
        parts.push(s.lifecycle.to_string());
    }
    if let Some(last) = s.last_save.iter().map(|o| o.at.as_str()).max() {
        // RFC 3339 UTC: "2026-12-03T12:04:05Z" -> "12:04".
        parts.push(format!("saved {}", last.get(11..16).unwrap_or(last)));
        let unsaved = s
            .last_save
            .iter()
            .filter(|o| !crate::daemon::save_ok(o))
            .count();
        if unsaved > 0 {
            parts.push(format!(
                "{unsaved} repo{} unsaved",
                if unsaved == 1 { "" } else { "s" }
            ));
        }
    } else {
        parts.push("not saved yet".into());
    }
    parts.join(" · ")
}

/// One repository's outcome, as a user reads it.
fn outcome_line(o: &agent_proto::save::RepoOutcome) -> String {
    let why = |fallback: &str| {
        o.error
            .as_deref()
            .map(|e| e.strip_prefix("not pushed: ").unwrap_or(e))
            .or(o.note.as_deref())
            // The line already says it was committed locally and not pushed.
            .map(|w| {
                w.strip_suffix(": committed locally, not pushed")
                    .unwrap_or(w)
            })
            .unwrap_or(fallback)
            .to_string()
    };
    let mut line = match o.result {
        SaveResult::Pushed => format!(
            "pushed      {} -> {} on {}",
            o.repo,
            o.r#ref.as_deref().unwrap_or("?"),
            o.remote.as_deref().unwrap_or("?")
        ),
        SaveResult::Committed => format!(
            "not pushed  {}: committed locally on {}: {}",
            o.repo,
            o.r#ref.as_deref().unwrap_or("?"),
            why("no remote to push to")
        ),
        SaveResult::Failed => format!("failed      {}: {}", o.repo, why("unknown error")),
        SaveResult::Clean => format!("clean       {} (nothing to save)", o.repo),
        SaveResult::Unchanged => format!("unchanged   {} (already saved)", o.repo),
        SaveResult::WouldSave => match (&o.r#ref, &o.remote) {
            (Some(r), Some(remote)) => format!("would save  {} -> {r} on {remote}", o.repo),
            _ => format!("would save  {} (no remote: locally only)", o.repo),
        },
        other => format!("{other:<11} {}", o.repo),
    };
    if o.result != SaveResult::Committed
        && o.result != SaveResult::Failed
        && let Some(n) = &o.note
    {
        line.push_str(&format!(" [{n}]"));
    }
    for f in &o.files {
        line.push_str(&format!("\n              {f}"));
    }
    line
}

/// What to do about a repository that was not pushed, from its reason.
fn fix_for(o: &agent_proto::save::RepoOutcome) -> String {
    let why = o
        .error
        .as_deref()
        .or(o.note.as_deref())
        .unwrap_or("")
        .to_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| why.contains(w));
    if has(&["no remote"]) || (o.remote.is_none() && o.error.is_none()) {
        format!(
            "give it a remote: git -C {} remote add origin URL, then wsagent save --repo {}",
            o.repo, o.repo
        )
    } else if has(&["401", "authentication", "no token", "403", "forbidden"]) {
        "sign in to the git provider in Coder (wsagent token prints the sign-in URL), then wsagent save".into()
    } else if has(&["non-fast-forward", "rejected", "fetch first"]) {
        format!(
            "the remote ref moved: fetch and look (git -C {} fetch), then wsagent save",
            o.repo
        )
    } else if has(&["permission denied", "read-only", "no space"]) {
        "free the disk or fix the permissions named above, then wsagent save".into()
    } else if has(&["timed out", "deadline", "connect", "resolve", "unreachable"]) {
        "check the network and the remote's URL, then wsagent save".into()
    } else {
        "see wsagent logs daemon, then wsagent save".into()
    }
}

/// "2 pushed, 1 unchanged, 1 failed".
fn save_summary(outcomes: &[agent_proto::save::RepoOutcome]) -> String {
    let order = [
        ("pushed", "pushed"),
        ("unchanged", "unchanged"),
        ("clean", "clean"),
        ("would-save", "would save"),
        ("committed", "not pushed"),
        ("failed", "failed"),
    ];
    let mut parts = Vec::new();
    for (result, word) in order {
        let n = outcomes.iter().filter(|o| o.result == result).count();
        if n > 0 {
            parts.push(format!("{n} {word}"));
        }
    }
    let other = outcomes
        .iter()
        .filter(|o| !order.iter().any(|(r, _)| o.result == *r))
        .count();
    if other > 0 {
        parts.push(format!("{other} other"));
    }
    parts.join(", ")
}

async fn action(client: &Client, name: &str, action: &str, wait: WaitArgs) -> ExitCode {
    let names: Vec<String> = if name == "all" {
        match client.status().await {
            Ok(s) => {
                let mut v: Vec<_> = s
                    .services
                    .into_iter()
                    .filter(|v| v.state != ServiceState::Absent)
                    .map(|v| v.name)
                    .collect();
                // Stop the dependents first: the reverse of the start order.
                if action == "stop" {
                    v.reverse();
                }
                v
            }
            Err(e) => return fail(e),
        }
    } else {
        vec![name.to_string()]
    };
    let mut code = ExitCode::SUCCESS;
    for n in &names {
        let before = match client.status().await {
            Ok(s) => s.services.into_iter().find(|v| &v.name == n),
            Err(e) => return fail(e),
        };
        match client
            .request("POST", &format!("/v1/services/{n}/{action}"), None)
            .await
        {
            Ok(r) => match r.json::<agent_proto::local::ActionReply>().await {
                Ok(r) if wait.no_wait => println!("{}", r.message),
                Ok(_) => {}
                Err(e) => return fail(e),
            },
            Err(e) => return fail(e),
        }
        if wait.no_wait {
            continue;
        }
        if let Err(why) = wait_for_service(client, n, action, before.as_ref(), wait.timeout).await {
            eprintln!("wsagent: {n}: {why}");
            code = ExitCode::from(EX_FAILED);
        }
    }
    code
}

/// Poll the service until the action has taken effect: stopped for `stop`; running and
/// healthy (a new process, for `restart`) otherwise. Says where it is when it does not.
async fn wait_for_service(
    client: &Client,
    name: &str,
    action: &str,
    before: Option<&agent_proto::local::ServiceStatus>,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let t0 = std::time::Instant::now();
    // A service without a health check counts as up once it has stayed running this
    // long (supervisord's `startsecs`): one that exits at once is not "started".
    const STAYS_UP: Duration = Duration::from_secs(1);
    let mut up_since: Option<(Option<u32>, std::time::Instant)> = None;
    loop {
        let s = client
            .status()
            .await
            .map_err(|e| e.to_string())?
            .services
            .into_iter()
            .find(|v| v.name == name)
            .ok_or_else(|| format!("no service named {name:?}"))?;
        let why = || {
            let mut w = s.state.as_str().to_string();
            if let Some(m) = &s.message {
                w.push_str(&format!(": {m}"));
            }
            if let Some(e) = &s.last_exit {
                w.push_str(&format!(
                    " (last exit: {})",
                    match (e.code, e.signal) {
                        (Some(c), _) => format!("code {c}"),
                        (_, Some(sig)) => format!("signal {sig}"),
                        _ => "?".into(),
                    }
                ));
            }
            w
        };
        let took = t0.elapsed().as_secs_f64();
        if action == "stop" {
            if matches!(
                s.state,
                ServiceState::Stopped | ServiceState::Failed | ServiceState::Absent
            ) {
                println!("{name}: {} ({took:.1} s)", s.state.as_str());
                return Ok(());
            }
        } else {
            let new_process = action != "restart"
                || before.is_none_or(|b| b.pid != s.pid || s.restarts > b.restarts);
            let running = s.state == ServiceState::Running && new_process;
            let healthy = match s.health {
                Health::Healthy => true,
                Health::None if running => {
                    let since = match up_since {
                        Some((pid, at)) if pid == s.pid => at,
                        _ => {
                            let now = std::time::Instant::now();
                            up_since = Some((s.pid, now));
                            now
                        }
                    };
                    since.elapsed() >= STAYS_UP
                }
                _ => false,
            };
            if running && healthy {
                println!(
                    "{name}: running{}, pid {} ({took:.1} s)",
                    if s.health == Health::Healthy {
                        " and healthy"
                    } else {
                        ""
                    },
                    s.pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
                );
                return Ok(());
            }
            // Ran and ended (`restart = "never"`, or a clean exit under `on-failure`).
            let ended_since = s.state == ServiceState::Stopped
                && s.last_exit.as_ref().map(|e| &e.at)
                    != before.and_then(|b| b.last_exit.as_ref().map(|e| &e.at));
            if matches!(s.state, ServiceState::Failed | ServiceState::Absent) || ended_since {
                return Err(why());
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "not {} after {}: {}",
                if action == "stop" {
                    "stopped"
                } else {
                    "running and healthy"
                },
                humantime::format_duration(timeout),
                why()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long a running service has been up (`3m 12s`), else since when (UTC) it has been
/// in its state (`since 16:02:11`).
fn since(svc: &agent_proto::local::ServiceStatus) -> String {
    let Some(at) = svc
        .since
        .as_deref()
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
    else {
        return "-".into();
    };
    if svc.state == ServiceState::Running {
        let up = std::time::SystemTime::now()
            .duration_since(at)
            .unwrap_or_default();
        humantime::format_duration(Duration::from_secs(up.as_secs())).to_string()
    } else {
        let t = humantime::format_rfc3339_seconds(at).to_string();
        format!("since {}", t.get(11..19).unwrap_or(&t))
    }
}

/// Human status: readable at a glance.
pub fn render_status(s: &Status) -> String {
    let mut out = String::new();
    let up = Duration::from_millis(s.uptime_ms);
    out.push_str(&format!(
        "wsagent {}  pid {}{}  up {}  lifecycle {}\n",
        s.version,
        s.pid,
        if s.pid1 { " (PID 1)" } else { "" },
        humantime::format_duration(Duration::from_secs(up.as_secs())),
        s.lifecycle
    ));
    if let Some(cp) = &s.control_plane {
        out.push_str(&format!("control plane: {cp}\n"));
    }
    if !s.services.is_empty() {
        use table::{left, right};
        let rows = s
            .services
            .iter()
            .map(|svc| {
                let health = match svc.health {
                    Health::None => "-",
                    Health::Unknown => "unknown",
                    Health::Healthy => "healthy",
                    Health::Unhealthy => "unhealthy",
                };
                let state = if svc.state == ServiceState::Failed {
                    "FAILED".to_string()
                } else {
                    svc.state.to_string()
                };
                vec![
                    svc.name.clone(),
                    state,
                    svc.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                    since(svc),
                    svc.restarts.to_string(),
                    health.to_string(),
                    svc.last_exit
                        .as_ref()
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "-".into()),
                    svc.message.clone().unwrap_or_default(),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table::render(
            &[
                left("SERVICE"),
                left("STATE"),
                right("PID"),
                left("UPTIME/SINCE"),
                right("RESTARTS"),
                left("HEALTH"),
                left("LAST EXIT"),
                left("NOTE"),
            ],
            rows,
            "",
        ));
    }
    for (title, steps) in [("startup", &s.startup), ("shutdown", &s.shutdown)] {
        if steps.is_empty() {
            continue;
        }
        out.push_str(&format!("\n{title}:\n"));
        let rows = steps
            .iter()
            .map(|st| {
                vec![
                    st.name.clone(),
                    st.outcome.clone(),
                    st.duration_ms
                        .map(|d| format!("{d} ms"))
                        .unwrap_or_default(),
                    st.message.clone().unwrap_or_default(),
                ]
            })
            .collect();
        out.push_str(&table::render(
            &[
                table::left(""),
                table::left(""),
                table::right(""),
                table::left(""),
            ],
            rows,
            "  ",
        ));
    }
    if !s.remote_snapshots.is_empty() {
        out.push_str("\nnewer on the remote:\n");
        for n in &s.remote_snapshots {
            out.push_str(&format!(
                "  {} (branch {}): {} at {}\n    restore it with: {}\n",
                n.repo,
                n.branch,
                n.r#ref,
                &n.commit[..12.min(n.commit.len())],
                n.command
            ));
        }
    }
    if !s.last_save.is_empty() {
        out.push_str("\nlast save:\n");
        let rows = s
            .last_save
            .iter()
            .map(|o| {
                vec![
                    o.repo.clone(),
                    o.result.to_string(),
                    o.r#ref.clone().unwrap_or_default(),
                    o.error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        out.push_str(&table::render(
            &[
                table::left(""),
                table::left(""),
                table::left(""),
                table::left(""),
            ],
            rows,
            "  ",
        ));
    }
    out
}
