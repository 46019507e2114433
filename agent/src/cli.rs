//! The command line: `wsagent run` starts the daemon; every other command is a client
//! of its local API (or, for `config`, `version`, `demo`, works alone).
//!
//! Exit codes (documented in README.md): 0 success; 1 the operation failed (e.g. the
//! stop sequence did not end `off`, a service action was refused); 2 usage error;
//! 69 the daemon cannot be reached; 78 invalid configuration.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agent_proto::local::{Event, EventKind, Health, Lifecycle, ServiceState, Status};
use clap::{Parser, Subcommand};

use crate::api::{Client, ClientError};
use crate::config::{self, Sources};

pub const EX_FAILED: u8 = 1;
/// `status`: something is not as configured (systemctl's "not running" code).
pub const EX_NOT_AS_CONFIGURED: u8 = 3;
pub const EX_UNAVAILABLE: u8 = 69;
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
    /// Start a service (also one that has `failed`).
    Start { name: String },
    /// Stop a service.
    Stop { name: String },
    /// Restart a service.
    Restart { name: String },
    /// Show a service's output.
    Logs {
        name: String,
        /// Keep following new lines.
        #[arg(short, long)]
        follow: bool,
        /// How many lines of history.
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: usize,
    },
    /// List the one-time and startup tasks with state, exit code and duration.
    Tasks {
        #[arg(long)]
        json: bool,
    },
    /// Show a startup task's output and type into its terminal; Ctrl-] detaches (the
    /// task keeps running).
    Attach { name: String },
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

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Validate a config file (merged over the defaults); exit 78 listing every problem.
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

fn client_socket(explicit: Option<PathBuf>) -> PathBuf {
    let cfg = config::load(&Sources::standard(None))
        .ok()
        .map(|l| l.config);
    crate::daemon::socket_path(explicit, cfg.as_ref())
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
    for var in crate::supervisor::SECRET_VARS {
        if let Ok(v) = std::env::var(var) {
            crate::secrets::register(&v);
        }
    }
    limit_malloc_arenas();
    let home = crate::daemon::home_dir();
    let _guard = crate::logging::init_daemon(
        &loaded.config.daemon.log_level,
        &loaded.config.state_dir(&home),
    );
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
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
        crate::daemon::Options { sources, socket },
    ));
    rt.shutdown_timeout(Duration::from_millis(200));
    code
}

/// glibc gives every thread that allocates an arena of its own (up to 8 per core), each
/// with pages of its own: for a daemon that mostly waits, two arenas are plenty and keep
/// the idle footprint small. Called before any thread is started.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; no thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
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
        Cmd::Start { name } => action(&client, &name, "start").await,
        Cmd::Stop { name } => action(&client, &name, "stop").await,
        Cmd::Restart { name } => action(&client, &name, "restart").await,
        Cmd::Logs {
            name,
            follow,
            lines,
        } => {
            let path = format!("/v1/services/{name}/logs?n={lines}&follow={follow}");
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
        Cmd::Tasks { json } => crate::startup::cli_tasks(&client, json).await,
        Cmd::Attach { name } => crate::startup::cli_attach(&client, &name).await,
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
                if joined {
                    println!("following the {reason} save already running: {repos} {what}");
                } else if dry_run {
                    println!("checking {repos} {what}...");
                } else {
                    println!("saving {repos} {what}...");
                }
            }
            SaveLine::Repo { outcome } if !json => println!("{}", outcome_line(&outcome)),
            SaveLine::Progress { event } => {
                if !json {
                    eprintln!("{}", event.message);
                }
                if event.level == agent_proto::local::Level::Error {
                    failed_to_run = Some(event.message);
                }
            }
            SaveLine::Done { outcomes: o } => outcomes = Some(o),
            _ => {}
        }
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
            .unwrap_or(fallback)
            .to_string()
    };
    let mut line = match o.result.as_str() {
        "pushed" => format!(
            "pushed      {} -> {} on {}",
            o.repo,
            o.r#ref.as_deref().unwrap_or("?"),
            o.remote.as_deref().unwrap_or("?")
        ),
        "committed" => format!(
            "not pushed  {}: committed locally on {}: {}",
            o.repo,
            o.r#ref.as_deref().unwrap_or("?"),
            why("no remote to push to")
        ),
        "failed" => format!("failed      {}: {}", o.repo, why("unknown error")),
        "clean" => format!("clean       {} (nothing to save)", o.repo),
        "unchanged" => format!("unchanged   {} (already saved)", o.repo),
        "would-save" => format!("would save  {}", o.repo),
        other => format!("{other:<11} {}", o.repo),
    };
    if o.result != "committed"
        && o.result != "failed"
        && let Some(n) = &o.note
    {
        line.push_str(&format!(" [{n}]"));
    }
    line
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
        .filter(|o| !order.iter().any(|(r, _)| *r == o.result))
        .count();
    if other > 0 {
        parts.push(format!("{other} other"));
    }
    parts.join(", ")
}

async fn action(client: &Client, name: &str, action: &str) -> ExitCode {
    match client
        .request("POST", &format!("/v1/services/{name}/{action}"), None)
        .await
    {
        Ok(r) => match r.json::<agent_proto::local::ActionReply>().await {
            Ok(r) => {
                println!("{}", r.message);
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Err(e) => fail(e),
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
        out.push_str(&format!(
            "\n{:<16} {:<10} {:>8} {:>8}  {:<10} {}\n",
            "SERVICE", "STATE", "PID", "RESTARTS", "HEALTH", "LAST EXIT / NOTE"
        ));
        for svc in &s.services {
            let health = match svc.health {
                Health::None => "-",
                Health::Unknown => "unknown",
                Health::Healthy => "healthy",
                Health::Unhealthy => "unhealthy",
            };
            let mut note = svc
                .last_exit
                .as_ref()
                .map(|e| e.to_string())
                .unwrap_or_default();
            if let Some(m) = &svc.message {
                if !note.is_empty() {
                    note.push_str("; ");
                }
                note.push_str(m);
            }
            let pid = svc.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
            let state = if svc.state == ServiceState::Failed {
                "FAILED".to_string()
            } else {
                svc.state.to_string()
            };
            out.push_str(&format!(
                "{:<16} {:<10} {:>8} {:>8}  {:<10} {}\n",
                svc.name, state, pid, svc.restarts, health, note
            ));
        }
    }
    for (title, steps) in [("startup", &s.startup), ("shutdown", &s.shutdown)] {
        if steps.is_empty() {
            continue;
        }
        out.push_str(&format!("\n{title}:\n"));
        for st in steps {
            let d = st
                .duration_ms
                .map(|d| format!("{d} ms"))
                .unwrap_or_default();
            let m = st
                .message
                .clone()
                .map(|m| format!("  {m}"))
                .unwrap_or_default();
            out.push_str(&format!(
                "  {:<14} {:<8} {:>8}{}\n",
                st.name, st.outcome, d, m
            ));
        }
    }
    if !s.last_save.is_empty() {
        out.push_str("\nlast save:\n");
        for o in &s.last_save {
            let r = o.r#ref.clone().unwrap_or_default();
            out.push_str(&format!(
                "  {:<40} {:<10} {} {}\n",
                o.repo,
                o.result,
                r,
                o.error.clone().unwrap_or_default()
            ));
        }
    }
    out
}
