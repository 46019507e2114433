//! The benchmark driver behind `scripts/bench`: runs the release `wsagent` and its
//! baselines (the classic shutdown-script loop in `bench/`, a bare `git push`, Debian's
//! tini and supervisord) side by side in the same run, against the harness's real
//! smart-HTTP git server and fake coderd, and writes one markdown table (median, spread,
//! ratio to each baseline, target PASS/MISS) and an SVG plot of stop-save time against
//! the number of repositories.
//!
//! Usage: `bench --out bench/results.md --svg bench/stop-save.svg` (the binary to measure
//! is `$WSAGENT_BIN`, default `target/release/wsagent`). `BENCH_QUICK=1` runs fewer
//! iterations and a 10 s crash-loop window; `BENCH_RUNS` and `BENCH_CRASH_SECS` override;
//! `BENCH_ONLY=stop-save,footprint,latency,reaping,logs,crash,scale` picks sections, and
//! `BENCH_SAVE_N=50` one stop-save size. `BENCH_CPU=1` also prints, for every stop-save
//! run, the CPU time of the wsagent daemon and of the git server's processes.
//! Two hidden sub-commands are helpers it runs as child processes: `orphans N DONE`
//! (creates N orphans as fast as it can) and `logship URL TOKEN N` (ships N lines through
//! wsagent's own log shipper, to measure it in a process of its own).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_proto::local::Lifecycle;
use integration::daemon::{Daemon, Signal, Workspace};
use integration::fake_coderd::FakeCoderd;
use integration::gitserver::GitServer;
use integration::{procfs, try_wait_until};
use nix::sys::signal::kill;
use nix::unistd::Pid;

#[path = "bench/scale.rs"]
mod scale;

const TOKEN: &str = "ghs_bench_token_0123456789";
const NO_DEFAULTS: &str = "[services.dockerd]\nenabled = false\n[services.code-server]\nenabled = false\n[services.coder-agent]\nenabled = false\n";
const T_LONG: Duration = Duration::from_secs(120);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("orphans") => orphans(args[2].parse().expect("N"), Path::new(&args[3])),
        Some("peak") => scale::peak_child(&args[2..]),
        Some("logship") => logship_child(&args[2], &args[3], args[4].parse().expect("N")),
        _ => {
            let mut out = PathBuf::from("bench/results.md");
            let mut svg = PathBuf::from("bench/stop-save.svg");
            let mut i = 1;
            while i < args.len() {
                match args[i].as_str() {
                    "--out" => out = PathBuf::from(&args[i + 1]),
                    "--svg" => svg = PathBuf::from(&args[i + 1]),
                    a => panic!("unknown argument {a:?}"),
                }
                i += 2;
            }
            run_all(&out, &svg);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Settings, statistics, the table.

struct Settings {
    quick: bool,
    runs: usize,
    crash_window: Duration,
    bench_exe: PathBuf,
}

impl Settings {
    fn from_env() -> Settings {
        let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1");
        let runs = std::env::var("BENCH_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if quick { 2 } else { 5 });
        let crash = std::env::var("BENCH_CRASH_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if quick { 10 } else { 60 });
        Settings {
            quick,
            runs,
            crash_window: Duration::from_secs(crash),
            bench_exe: std::env::current_exe().expect("current_exe"),
        }
    }
}

/// Samples of one quantity.
#[derive(Clone, Debug, Default)]
struct Stats(Vec<f64>);

impl Stats {
    fn push(&mut self, v: f64) {
        self.0.push(v);
    }
    fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        if n == 0 {
            return f64::NAN;
        }
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }
    fn min(&self) -> f64 {
        self.0.iter().copied().fold(f64::INFINITY, f64::min)
    }
    fn max(&self) -> f64 {
        self.0.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }
    fn show(&self, unit: &str) -> String {
        if self.0.len() == 1 {
            format!("{} {unit}", num(self.median()))
        } else {
            format!(
                "{} {unit} ({}–{}, n={})",
                num(self.median()),
                num(self.min()),
                num(self.max()),
                self.0.len()
            )
        }
    }
}

fn num(v: f64) -> String {
    if v.is_nan() {
        "n/a".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if v.abs() >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

struct Target {
    text: String,
    measured: String,
    pass: bool,
}

struct Row {
    bench: String,
    unit: &'static str,
    ws: Stats,
    /// Lower is better (times, memory, CPU); false for rates.
    lower_better: bool,
    baselines: Vec<(String, Stats)>,
    target: Option<Target>,
}

impl Row {
    fn new(bench: impl Into<String>, unit: &'static str, ws: Stats) -> Row {
        Row {
            bench: bench.into(),
            unit,
            ws,
            lower_better: true,
            baselines: Vec::new(),
            target: None,
        }
    }
    fn baseline(mut self, name: &str, s: Stats) -> Row {
        self.baselines.push((name.to_string(), s));
        self
    }
    fn target(mut self, text: &str, measured: String, pass: bool) -> Row {
        self.target = Some(Target {
            text: text.into(),
            measured,
            pass,
        });
        self
    }
    /// How many times better wsagent is than baseline `i` (> 1: wsagent better).
    fn ratio(&self, i: usize) -> f64 {
        let b = self.baselines[i].1.median();
        let w = self.ws.median();
        if self.lower_better { b / w } else { w / b }
    }
}

fn render_table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str("| benchmark | wsagent: median (min–max) | baseline: median (min–max) | ratio (baseline ÷ wsagent) | target | measured | result |\n");
    s.push_str("|---|---|---|---|---|---|---|\n");
    for r in rows {
        let bases = if r.baselines.is_empty() {
            "—".to_string()
        } else {
            r.baselines
                .iter()
                .map(|(n, st)| format!("{n}: {}", st.show(r.unit)))
                .collect::<Vec<_>>()
                .join("<br>")
        };
        let ratios = if r.baselines.is_empty() {
            "—".to_string()
        } else {
            (0..r.baselines.len())
                .map(|i| format!("{}: ×{}", r.baselines[i].0, num(r.ratio(i))))
                .collect::<Vec<_>>()
                .join("<br>")
        };
        let (t, m, p) = match &r.target {
            Some(t) => (
                t.text.clone(),
                t.measured.clone(),
                if t.pass { "PASS" } else { "**MISS**" }.to_string(),
            ),
            None => ("—".into(), "—".into(), "—".into()),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.bench,
            r.ws.show(r.unit),
            bases,
            ratios,
            t,
            m,
            p
        );
    }
    s
}

fn note(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

// ---------------------------------------------------------------------------------------
// Small process and file helpers.

fn sh(cmd: &mut Command) -> std::process::Output {
    let what = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = sh(Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=Bench",
            "-c",
            "user.email=bench@example.com",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0"));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Replace `dst` with a copy of `src` (`cp -a`).
fn restore(src: &Path, dst: &Path) {
    if dst.exists() {
        std::fs::remove_dir_all(dst).expect("remove");
    }
    sh(Command::new("cp").arg("-a").arg(src).arg(dst));
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
fn vm_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU time (user + system) of a process so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(close) = stat.rfind(')') else {
        return Duration::ZERO;
    };
    let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// CPU time (user + system) of this process's reaped children so far (the git server's
/// CGI processes, the shell loop's git commands).
fn children_cpu() -> Duration {
    // SAFETY: rusage is plain data (all zeroes is valid); getrusage fills it in.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv =
        |t: libc::timeval| Duration::from_micros(t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn workspace() -> Workspace {
    Workspace::new()
        .with_env("WSAGENT_LOG_LEVEL", "info")
        .with_env("CODER_WORKSPACE_NAME", "bench")
}

fn cache_token(home: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let dir = home.join(".cache/coder");
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("github_token");
    std::fs::write(&f, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn provider_for(server: &GitServer) -> String {
    format!(
        "[git_providers.github]\nhost = \"{}\"\nusername = \"x-access-token\"\ncache_file = \"~/.cache/coder/github_token\"\n",
        server.base_url().trim_start_matches("http://")
    )
}

fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> bool {
    try_wait_until(timeout, || child.try_wait().ok().flatten()).is_some()
}

// ---------------------------------------------------------------------------------------
// 1. Stop-save.

/// N repositories with unsaved work (50 modified and 50 new files each), kept as a
/// template and restored before every run, with the server's repositories likewise.
struct SaveFixture {
    ws: Workspace,
    server: GitServer,
    n: usize,
    tpl_projects: PathBuf,
    tpl_srv: PathBuf,
    base_main: String,
}

impl SaveFixture {
    fn build(n: usize) -> SaveFixture {
        let ws = workspace();
        let server = GitServer::start(ws.path().join("srv"), TOKEN).expect("git server");
        let projects = ws.home().join("projects");
        for i in 0..n {
            let name = format!("r{i:02}");
            let remote = format!("{name}.git");
            server.create_bare(&remote).expect("bare repo");
            let dir = projects.join(&name);
            std::fs::create_dir_all(&dir).unwrap();
            git(&dir, &["init", "-q"]);
            for j in 0..50 {
                let body: String = (0..20)
                    .map(|k| format!("repo {i} file {j} line {k}: the quick brown fox\n"))
                    .collect();
                std::fs::write(dir.join(format!("f{j:03}.txt")), body).unwrap();
            }
            git(&dir, &["add", "."]);
            git(&dir, &["commit", "-q", "-m", "base"]);
            git(&dir, &["remote", "add", "origin", &server.url(&remote)]);
            let authed = server
                .url(&remote)
                .replace("http://", &format!("http://x:{TOKEN}@"));
            git(&dir, &["push", "-q", &authed, "main"]);
            for j in 0..50 {
                let f = dir.join(format!("f{j:03}.txt"));
                let mut body = std::fs::read_to_string(&f).unwrap();
                body.push_str(&format!("unsaved edit in repo {i} file {j}\n"));
                std::fs::write(f, body).unwrap();
                let body: String = (0..20)
                    .map(|k| format!("new file {j} of repo {i}, line {k}\n"))
                    .collect();
                std::fs::write(dir.join(format!("new{j:03}.txt")), body).unwrap();
            }
        }
        let base_main = server.ref_target("r00.git", "refs/heads/main").unwrap();
        let tpl_projects = ws.path().join("tpl-projects");
        let tpl_srv = ws.path().join("tpl-srv");
        sh(Command::new("cp")
            .arg("-a")
            .arg(&projects)
            .arg(&tpl_projects));
        sh(Command::new("cp")
            .arg("-a")
            .arg(ws.path().join("srv"))
            .arg(&tpl_srv));
        cache_token(&ws.home());
        SaveFixture {
            ws,
            server,
            n,
            tpl_projects,
            tpl_srv,
            base_main,
        }
    }

    fn reset(&self) {
        restore(&self.tpl_projects, &self.ws.home().join("projects"));
        restore(&self.tpl_srv, &self.ws.path().join("srv"));
        let state = self.ws.state_dir();
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&state).unwrap();
    }

    /// A fresh daemon's `wsagent save` of every repository: (wall seconds, the daemon's
    /// CPU seconds, how many repositories' snapshot refs reached the server).
    fn wsagent_save(&self) -> (f64, f64, usize) {
        self.reset();
        let cfg = format!("{NO_DEFAULTS}\n{}", provider_for(&self.server));
        let mut d = Daemon::start(&self.ws, &cfg);
        d.wait_lifecycle(Lifecycle::Ready, T_LONG);
        // A blocking wait, like the baselines' (the harness's `cli` polls the child at
        // up to 100 ms intervals, which would round this figure up).
        let mut cmd = self.ws.command(integration::wsagent_bin());
        cmd.arg("save");
        let ch0 = children_cpu();
        let d0 = cpu_time(d.pid());
        let t = Instant::now();
        let out = cmd.output().expect("wsagent save");
        let took = t.elapsed().as_secs_f64();
        let cpu = cpu_time(d.pid()) - d0;
        if std::env::var("BENCH_CPU").is_ok() {
            note(format!(
                "PROBE wall {took:.3} daemon cpu {cpu:?} server cpu {:?}",
                children_cpu() - ch0
            ));
        }
        // Past the stop budget a save says what it could not push and fails: counted
        // below, not fatal here.
        assert!(
            out.status.success() || self.n > 50,
            "wsagent save failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            d.report()
        );
        d.signal(Signal::SIGTERM);
        d.wait_exit(T_LONG);
        let pushed = (0..self.n)
            .filter(|i| {
                self.server
                    .ref_target(&format!("r{i:02}.git"), "refs/heads/wip/bench/main")
                    .is_some()
            })
            .count();
        if self.n <= 50 {
            assert_eq!(pushed, self.n, "wsagent did not push every repository");
        }
        (took, cpu.as_secs_f64(), pushed)
    }

    /// The daemon's CPU over `window` while it checkpoints every `every` (or, `"off"`,
    /// not at all) a workspace whose repositories are all saved and untouched: (% of one
    /// core, its `RssAnon` MiB and `Pss` MiB at the end, checkpoints that ran, its
    /// `RssAnon` MiB before the save).
    fn idle_checkpoints(&self, every: &str, window: Duration) -> (f64, f64, f64, usize, f64) {
        self.reset();
        let cfg = format!(
            "{NO_DEFAULTS}\n{}\n[save]\ncheckpoint = \"{every}\"\n",
            provider_for(&self.server)
        );
        // Log level debug (the environment's level wins over the config's): each
        // checkpoint's line ("checkpoint done") is counted.
        let debug = ["env".to_string(), "WSAGENT_LOG_LEVEL=debug".to_string()];
        let mut d = Daemon::start_wrapped(&self.ws, &cfg, &debug);
        d.wait_lifecycle(Lifecycle::Ready, T_LONG);
        std::thread::sleep(Duration::from_secs(2));
        let before = vm_kib(d.pid(), "RssAnon").unwrap_or(0) as f64 / 1024.0;
        let out = self
            .ws
            .command(integration::wsagent_bin())
            .arg("save")
            .output()
            .expect("wsagent save");
        assert!(out.status.success(), "wsagent save failed: {}", d.report());
        // One checkpoint after the save (it watches what the save pushed), then the window.
        let checkpoints = || d.stderr().matches("checkpoint done").count();
        let first = checkpoints();
        if every != "off" {
            integration::wait::wait_until(T_LONG, "a checkpoint after the save", || {
                checkpoints() > first
            });
        } else {
            // As long as the first checkpoint takes to come: the save's own tail (its
            // threads ending, the events of what it wrote) is not the idle daemon's.
            std::thread::sleep(Duration::from_secs(10));
        }
        let c0 = cpu_time(d.pid());
        let n0 = checkpoints();
        std::thread::sleep(window);
        let cpu = cpu_time(d.pid()) - c0;
        let ran = checkpoints() - n0;
        let (anon, pss) = (
            vm_kib(d.pid(), "RssAnon").unwrap_or(0) as f64 / 1024.0,
            pss_kib(d.pid()).unwrap_or(0) as f64 / 1024.0,
        );
        d.signal(Signal::SIGTERM);
        d.wait_exit(T_LONG);
        (
            100.0 * cpu.as_secs_f64() / window.as_secs_f64(),
            anon,
            pss,
            ran,
            before,
        )
    }

    fn shell_loop(&self) -> f64 {
        self.reset();
        let script = repo_root().join("bench/shutdown-loop.sh");
        let mut cmd = Command::new("bash");
        cmd.arg(&script)
            .arg(self.ws.home().join("projects"))
            .arg(TOKEN)
            .env("HOME", self.ws.home())
            .env("GIT_AUTHOR_NAME", "Bench")
            .env("GIT_AUTHOR_EMAIL", "bench@example.com")
            .env("GIT_COMMITTER_NAME", "Bench")
            .env("GIT_COMMITTER_EMAIL", "bench@example.com")
            .env("GIT_TERMINAL_PROMPT", "0");
        let ch0 = children_cpu();
        let t = Instant::now();
        let out = sh(&mut cmd);
        let took = t.elapsed().as_secs_f64();
        if std::env::var("BENCH_CPU").is_ok() {
            note(format!(
                "PROBE shell wall {took:.3} all cpu {:?}",
                children_cpu() - ch0
            ));
        }
        assert!(
            out.stderr.is_empty(),
            "shell loop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let now = self
            .server
            .ref_target("r00.git", "refs/heads/main")
            .unwrap();
        assert_ne!(now, self.base_main, "the shell loop did not push");
        took
    }

    fn bare_push(&self) -> f64 {
        self.reset();
        let dir = self.ws.home().join("projects/r00");
        git(&dir, &["add", "-A"]);
        git(&dir, &["commit", "-q", "-m", "wip"]);
        let authed = self
            .server
            .url("r00.git")
            .replace("http://", &format!("http://x:{TOKEN}@"));
        let t = Instant::now();
        git(&dir, &["push", "-q", &authed, "HEAD:refs/heads/main"]);
        t.elapsed().as_secs_f64()
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// (n, latency ms) → (wsagent, shell loop) medians, for the plot.
type Curve = Vec<(usize, u64, f64, f64)>;

fn stop_save(s: &Settings, rows: &mut Vec<Row>) -> Curve {
    let mut curve = Vec::new();
    // BENCH_SAVE_N=50 measures one size only (for work on the save).
    let only_n: Option<usize> = std::env::var("BENCH_SAVE_N")
        .ok()
        .and_then(|v| v.parse().ok());
    for n in [1usize, 10, 50, 200] {
        if only_n.is_some_and(|o| o != n) {
            continue;
        }
        note(format!("stop-save: building {n} dirty repositories"));
        let fx = SaveFixture::build(n);
        let latencies: &[u64] = match n {
            50 => &[0, 50, 100],
            200 => &[100],
            _ => &[0, 50],
        };
        for &lat in latencies {
            fx.server.set_latency(Duration::from_millis(lat));
            // The 50-repo shell loop with latency is the slowest thing here; fewer runs.
            let runs = if n >= 50 && lat > 0 {
                s.runs.min(3)
            } else {
                s.runs
            };
            // 200 repositories: no shell loop (about 200 × 0.6 s per run); the target is
            // the stop budget.
            let loop_too = n <= 50;
            let (mut w, mut sl, mut bp) = (Stats::default(), Stats::default(), Stats::default());
            let (mut cpu, mut short) = (Stats::default(), 0usize);
            for r in 0..runs {
                note(format!(
                    "stop-save n={n} latency={lat}ms run {}/{runs}",
                    r + 1
                ));
                let (t, c, pushed) = fx.wsagent_save();
                w.push(t);
                cpu.push(1000.0 * c / n as f64);
                short = short.max(n - pushed);
                if loop_too {
                    sl.push(fx.shell_loop());
                }
                if n == 1 {
                    bp.push(fx.bare_push());
                }
            }
            if n <= 50 && lat <= 50 {
                curve.push((n, lat, w.median(), sl.median()));
            }
            let cpu_row = (n >= 50 && lat == latencies[0]).then(|| {
                let per = cpu.median();
                Row::new(
                    format!("… its CPU per repository (the daemon's, {n} repos, +{lat} ms)"),
                    "ms",
                    cpu.clone(),
                )
                .target("≤ 20 ms", format!("{} ms", num(per)), per <= 20.0)
            });
            let mut row = Row::new(
                format!("stop-save, {n} repo(s) × 100 files, +{lat} ms/request"),
                "s",
                w,
            );
            if loop_too {
                row = row.baseline("shell loop", sl);
            }
            if n == 1 {
                row = row.baseline("bare git push", bp);
            }
            if n == 50 {
                let want = match lat {
                    0 => 1.5,
                    50 => 5.0,
                    _ => 10.0,
                };
                let got = row.ratio(0);
                row = row.target(
                    &format!("≥ {want}× faster than the shell loop"),
                    format!("{}×", num(got)),
                    got >= want,
                );
            }
            if n == 200 {
                let t = row.ws.median();
                row = row.target(
                    "inside the 25 s stop budget, every repository pushed",
                    format!("{} s; {short} not pushed", num(t)),
                    t <= 25.0 && short == 0,
                );
            }
            if n == 1 {
                let got = 1.0 / row.ratio(1);
                row = row.target("≤ 1.2× the bare push", format!("{}×", num(got)), got <= 1.2);
            }
            rows.push(row);
            rows.extend(cpu_row);
        }
        if n == 50 {
            // An idle workspace: every repository saved, nothing changing, checkpoints on
            // (every 10 s here, 60 times the default rate), the daemon's CPU over the window.
            fx.server.set_latency(Duration::ZERO);
            let window = Duration::from_secs(if s.quick { 20 } else { 60 });
            note(format!("idle checkpoints: {n} repositories, {window:?}"));
            let (pct, anon, pss, ran, before) = fx.idle_checkpoints("10s", window);
            // The same workspace with checkpoints off: what the daemon costs between them.
            let (off, _, _, _, _) = fx.idle_checkpoints("off", window);
            // One checkpoint's CPU, and the hour at the default interval (10 min): the
            // background plus six checkpoints.
            let each = (pct - off).max(0.0) / 100.0 * window.as_secs_f64() / ran.max(1) as f64;
            let hourly = off + 100.0 * each * 6.0 / 3600.0;
            rows.push(
                Row::new(
                    format!(
                        "idle with checkpoints every 10 s, {n} saved repositories: CPU over {} s ({ran} checkpoints)",
                        window.as_secs()
                    ),
                    "% of a core",
                    Stats(vec![pct]),
                )
                .target(
                    "≤ 0.1 % of a core at the default 10 min",
                    format!(
                        "{}% ({} ms a checkpoint, {}% with checkpoints off); RssAnon {} MiB ({} MiB before the save), Pss {} MiB",
                        num(hourly),
                        num(each * 1000.0),
                        num(off),
                        num(anon),
                        num(before),
                        num(pss)
                    ),
                    hourly <= 0.1,
                ),
            );
        }
    }
    curve
}

fn svg_plot(curve: &Curve) -> String {
    let (w, h) = (640.0, 400.0);
    let (l, r, t, b) = (70.0, 20.0, 40.0, 50.0);
    let ymax = curve
        .iter()
        .flat_map(|c| [c.2, c.3])
        .fold(0.0f64, f64::max)
        .max(0.1)
        * 1.1;
    let x = |n: f64| l + (w - l - r) * n / 50.0;
    let y = |v: f64| h - b - (h - t - b) * v / ymax;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="14">stop-save time vs number of dirty repositories (median)</text>"#,
        w / 2.0
    );
    // Axes, ticks, grid.
    let _ = writeln!(
        s,
        r#"<line x1="{l}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{l}" y1="{t}" x2="{l}" y2="{}" stroke="black"/>"#,
        h - b,
        w - r,
        h - b,
        h - b
    );
    for n in [1.0, 10.0, 20.0, 30.0, 40.0, 50.0] {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{n}</text>"#,
            x(n),
            h - b + 16.0
        );
    }
    for i in 0..=5 {
        let v = ymax * i as f64 / 5.0;
        let _ = writeln!(
            s,
            r##"<line x1="{l}" y1="{0}" x2="{1}" y2="{0}" stroke="#ddd"/><text x="{2}" y="{3}" text-anchor="end">{4}</text>"##,
            y(v),
            w - r,
            l - 6.0,
            y(v) + 4.0,
            num(v)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">repositories (each ~100 changed or new files)</text>"#,
        (l + w - r) / 2.0,
        h - 12.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">seconds</text>"#,
        (t + h - b) / 2.0,
        (t + h - b) / 2.0
    );
    let series: [(&str, u64, bool, &str, &str); 4] = [
        ("wsagent, +0 ms", 0, true, "#1f77b4", ""),
        ("wsagent, +50 ms/request", 50, true, "#1f77b4", "6,4"),
        ("shell loop, +0 ms", 0, false, "#d62728", ""),
        ("shell loop, +50 ms/request", 50, false, "#d62728", "6,4"),
    ];
    for (k, (label, lat, is_ws, color, dash)) in series.iter().enumerate() {
        let pts: Vec<(f64, f64)> = curve
            .iter()
            .filter(|c| c.1 == *lat)
            .map(|c| (x(c.0 as f64), y(if *is_ws { c.2 } else { c.3 })))
            .collect();
        let path = pts
            .iter()
            .map(|(px, py)| format!("{px:.1},{py:.1}"))
            .collect::<Vec<_>>()
            .join(" ");
        let _ = writeln!(
            s,
            r#"<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>"#
        );
        for (px, py) in &pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{px:.1}" cy="{py:.1}" r="3" fill="{color}"/>"#
            );
        }
        let ly = t + 10.0 + 18.0 * k as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{0}" y1="{ly}" x2="{1}" y2="{ly}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/><text x="{2}" y="{3}">{label}</text>"#,
            l + 15.0,
            l + 45.0,
            l + 52.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

// ---------------------------------------------------------------------------------------
// 2. Footprint.

const THREE_SLEEPS: &str = "[services.s1]\ncommand = [\"sleep\", \"infinity\"]\n[services.s2]\ncommand = [\"sleep\", \"infinity\"]\n[services.s3]\ncommand = [\"sleep\", \"infinity\"]\n";

fn footprint(s: &Settings, rows: &mut Vec<Row>) {
    let (mut w, mut t, mut sv) = (Stats::default(), Stats::default(), Stats::default());
    // wsagent's proportional set size (its share of every page it maps, file pages
    // included) and the growth of its own memory cgroup, where one can be made.
    let (mut pss, mut cg) = (Stats::default(), Stats::default());
    // Every supervisor is sampled this long after its services are up: idle, not
    // starting.
    let settle = Duration::from_secs(3);
    for r in 0..s.runs.min(3) {
        note(format!("footprint run {}", r + 1));
        // wsagent, in a memory cgroup of its own when the machine lets us make one.
        let ws = workspace();
        let group = MemCgroup::make(&format!("wsagent-bench-{}", std::process::id()));
        let cfg = format!("{NO_DEFAULTS}\n{THREE_SLEEPS}");
        let mut d = match &group {
            Some(g) => Daemon::start_wrapped(&ws, &cfg, &g.wrapper()),
            None => Daemon::start(&ws, &cfg),
        };
        d.wait_lifecycle(Lifecycle::Ready, T_LONG);
        std::thread::sleep(settle);
        // Nothing trims the daemon's pages: the larger of two samples, 5 s apart.
        let first = vm_kib(d.pid(), "RssAnon").unwrap();
        std::thread::sleep(Duration::from_secs(5));
        let second = vm_kib(d.pid(), "RssAnon").unwrap();
        w.push(first.max(second) as f64 / 1024.0);
        if let Some(p) = pss_kib(d.pid()) {
            pss.push(p as f64 / 1024.0);
        }
        if let Some(g) = &group {
            cg.push(g.usage() as f64 / 1048576.0);
        }
        d.signal(Signal::SIGTERM);
        d.wait_exit(T_LONG);
        drop(group);
        // tini
        let mut c = Command::new("tini")
            .args([
                "-g",
                "--",
                "sh",
                "-c",
                "sleep infinity & sleep infinity & sleep infinity & wait",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tini");
        std::thread::sleep(settle);
        t.push(vm_kib(c.id(), "RssAnon").unwrap() as f64 / 1024.0);
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        if !wait_exit(&mut c, Duration::from_secs(10)) {
            let _ = c.kill();
            let _ = c.wait();
        }
        // supervisord
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("supervisord.conf");
        let mut text = format!(
            "[supervisord]\nnodaemon=true\nlogfile={0}/sd.log\npidfile={0}/sd.pid\nchildlogdir={0}\n[unix_http_server]\nfile={0}/sd.sock\n",
            dir.path().display()
        );
        for i in 1..=3 {
            let _ = write!(
                text,
                "[program:s{i}]\ncommand=sleep infinity\nautorestart=true\nstopsignal=TERM\n"
            );
        }
        std::fs::write(&conf, text).unwrap();
        let mut c = Command::new("supervisord")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("supervisord");
        try_wait_until(Duration::from_secs(20), || {
            procfs::children(c.id())
                .iter()
                .filter(|p| p.comm == "sleep")
                .count()
                == 3
        });
        std::thread::sleep(settle);
        sv.push(vm_kib(c.id(), "RssAnon").unwrap_or(0) as f64 / 1024.0);
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        if !wait_exit(&mut c, Duration::from_secs(20)) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    let med = w.median();
    let cgroup = if cg.0.is_empty() {
        "no memory cgroup could be made here".to_string()
    } else {
        format!("its cgroup's memory use: {} MiB", num(cg.median()))
    };
    rows.push(
        Row::new(
            "idle memory (`RssAnon`), three `sleep infinity` services",
            "MiB",
            w,
        )
        .baseline("tini", t)
        .baseline("supervisord", sv)
        .target(
            "≤ 4 MiB",
            format!(
                "{} MiB anonymous; Pss {} MiB; {cgroup}",
                num(med),
                num(pss.median()),
            ),
            med <= 4.0,
        ),
    );

    let bin = integration::wsagent_bin();
    let size = std::fs::metadata(&bin).unwrap().len() as f64 / 1048576.0;
    let mut ws = Stats::default();
    ws.push(size);
    let mut tini = Stats::default();
    tini.push(std::fs::metadata("/usr/bin/tini").map_or(f64::NAN, |m| m.len() as f64 / 1048576.0));
    let static_note = match (is_static(&bin), musl_installed()) {
        (true, true) => "stripped static binary (musl)",
        (true, false) => "stripped static binary (glibc crt-static; musl target not installed)",
        (false, _) => "stripped release binary, dynamically linked to glibc (not the static one)",
    };
    rows.push(
        Row::new(format!("binary size: {static_note}"), "MiB", ws)
            .baseline("tini (Debian, dynamic)", tini)
            .target("≤ 12 MiB", format!("{} MiB", num(size)), size <= 12.0),
    );
}

/// `Pss` of a process in KiB, from `/proc/<pid>/smaps_rollup`.
fn pss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    s.lines()
        .find(|l| l.starts_with("Pss:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A memory cgroup (v2, else v1) of our own under this process's, removed on drop.
struct MemCgroup {
    dir: PathBuf,
    /// `memory.current` (v2) or `memory.usage_in_bytes` (v1).
    usage_file: &'static str,
}

impl MemCgroup {
    fn make(name: &str) -> Option<MemCgroup> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        for line in own.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
            let (base, usage_file) = match ctrl {
                "" => ("/sys/fs/cgroup", "memory.current"),
                c if c.split(',').any(|x| x == "memory") => {
                    ("/sys/fs/cgroup/memory", "memory.usage_in_bytes")
                }
                _ => continue,
            };
            let dir = Path::new(base)
                .join(path.trim_start_matches('/'))
                .join(name);
            if std::fs::create_dir(&dir).is_ok() && dir.join(usage_file).exists() {
                return Some(MemCgroup { dir, usage_file });
            }
            let _ = std::fs::remove_dir(&dir);
        }
        None
    }

    /// A command prefix that moves itself into the cgroup, then execs the rest.
    fn wrapper(&self) -> Vec<String> {
        vec![
            "sh".into(),
            "-c".into(),
            format!(
                "echo $$ > '{}/cgroup.procs' && exec \"$@\"",
                self.dir.display()
            ),
            "sh".into(),
        ]
    }

    fn usage(&self) -> u64 {
        std::fs::read_to_string(self.dir.join(self.usage_file))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// True when `ldd` finds no shared library to load for `bin`.
fn is_static(bin: &Path) -> bool {
    Command::new("ldd")
        .arg(bin)
        .output()
        .is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).contains("=>"))
}

fn musl_installed() -> bool {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("musl"))
}

// ---------------------------------------------------------------------------------------
// 3. Latency: exec → ready, SIGTERM → exit.

/// Spawn `cmd` with its `stream` (stdout or stderr) piped; returns the child and the
/// time from spawn until a line containing `marker` appeared.
fn spawn_until_line(
    mut cmd: Command,
    marker: &'static str,
    on_stderr: bool,
) -> (std::process::Child, Duration) {
    if on_stderr {
        cmd.stderr(Stdio::piped()).stdout(Stdio::null());
    } else {
        cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    }
    let t0 = Instant::now();
    let mut child = cmd.spawn().expect("spawn");
    let pipe: Box<dyn std::io::Read + Send> = if on_stderr {
        Box::new(child.stderr.take().unwrap())
    } else {
        Box::new(child.stdout.take().unwrap())
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if !sent && line.contains(marker) {
                let _ = tx.send(Instant::now());
                sent = true;
            }
        }
    });
    let at = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("no line {marker:?}"));
    (child, at - t0)
}

fn term_and_time(child: &mut std::process::Child) -> Duration {
    let t = Instant::now();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let _ = child.wait();
    t.elapsed()
}

fn latency(s: &Settings, rows: &mut Vec<Row>) {
    let (mut wr, mut wt, mut tr, mut tt) = (
        Stats::default(),
        Stats::default(),
        Stats::default(),
        Stats::default(),
    );
    let bin = integration::wsagent_bin();
    for r in 0..s.runs.max(5) {
        note(format!("latency run {}", r + 1));
        let ws = workspace();
        ws.write_config(&format!("{NO_DEFAULTS}\n{THREE_SLEEPS}"));
        let mut cmd = ws.command(&bin);
        cmd.arg("run").arg("--config").arg(ws.config_path());
        let (mut child, ready) = spawn_until_line(cmd, "lifecycle ready", true);
        wr.push(ready.as_secs_f64() * 1000.0);
        wt.push(term_and_time(&mut child).as_secs_f64() * 1000.0);

        let mut cmd = Command::new("tini");
        cmd.args([
            "-g",
            "--",
            "sh",
            "-c",
            "sleep infinity & sleep infinity & sleep infinity & echo ready; wait",
        ]);
        let (mut child, ready) = spawn_until_line(cmd, "ready", false);
        tr.push(ready.as_secs_f64() * 1000.0);
        tt.push(term_and_time(&mut child).as_secs_f64() * 1000.0);
    }
    let (r, t) = (wr.median(), wt.median());
    let tini_ready = tr.median();
    rows.push(
        Row::new(
            "exec → ready, three services healthy at once (tini: sh started them)",
            "ms",
            wr,
        )
        .baseline("tini", tr)
        .target(
            "≤ 20 ms overhead beyond the services' own start",
            format!(
                "{} ms (− tini's {} ms = {} ms)",
                num(r),
                num(tini_ready),
                num(r - tini_ready)
            ),
            r - tini_ready <= 20.0,
        ),
    );
    rows.push(
        Row::new("SIGTERM → exit, no git work, three services", "ms", wt)
            .baseline("tini", tt)
            .target("≤ 10 ms", format!("{} ms", num(t)), t <= 10.0),
    );
}

// ---------------------------------------------------------------------------------------
// 4. Reaping.

/// Create `n` orphans as fast as possible: each a grandchild whose parent exits at once,
/// so it is re-parented to the namespace's init and must be reaped there.
fn orphans(n: usize, done: &Path) {
    use nix::unistd::{ForkResult, fork};
    let mut made = 0;
    while made < n {
        // SAFETY: single-threaded here; the children only call _exit.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                // SAFETY: as above.
                unsafe {
                    let _ = fork();
                    libc::_exit(0);
                }
            }
            Ok(ForkResult::Parent { child }) => {
                let _ = nix::sys::wait::waitpid(child, None);
                made += 1;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    std::fs::write(done, "").expect("write done file");
}

fn reaping(s: &Settings, rows: &mut Vec<Row>) {
    if !nix::unistd::Uid::effective().is_root() {
        note("reaping skipped: a pid namespace needs root");
        return;
    }
    const N: usize = 10_000;
    let (mut w, mut t) = (Stats::default(), Stats::default());
    let (mut zombies_left, mut wrong_codes, mut exits_seen) = (0usize, 0usize, 0usize);
    for r in 0..s.runs.min(3) {
        note(format!("reaping run {}", r + 1));
        let ws = workspace();
        let go = ws.path().join("go");
        let done = ws.path().join("done");
        let cfg = format!(
            "{NO_DEFAULTS}\n[services.orphans]\nshell = \"while [ ! -e {go} ]; do sleep 0.005; done; exec {exe} orphans {N} {done}\"\nrestart = \"never\"\n\n[services.seven]\nshell = \"exit 7\"\nrestart = \"always\"\n[services.seven.backoff]\ninitial = \"10ms\"\nmax = \"20ms\"\nmax_failures = 4000000000\nwindow = \"1s\"\n",
            go = go.display(),
            done = done.display(),
            exe = s.bench_exe.display()
        );
        let mut d = Daemon::start_pid1(&ws, &cfg);
        d.wait_lifecycle(Lifecycle::Ready, T_LONG);
        let mut seen = std::collections::BTreeSet::new();
        let t0 = Instant::now();
        std::fs::write(&go, "").unwrap();
        let mut finished = None;
        while t0.elapsed() < T_LONG {
            if let Ok(st) = d.try_status()
                && let Some(e) = st
                    .services
                    .iter()
                    .find(|x| x.name == "seven")
                    .and_then(|x| x.last_exit.clone())
                && seen.insert(e.at.clone())
                && (e.code, e.signal) != (Some(7), None)
            {
                wrong_codes += 1;
            }
            if done.exists() && procfs::zombies_in_namespace_of(d.pid()).is_empty() {
                finished = Some(t0.elapsed());
                break;
            }
        }
        let took = finished.expect("orphans not all reaped within 120 s");
        w.push(took.as_secs_f64());
        exits_seen += seen.len();
        // Zombies left once the storm is over (a settled look, not the racing one).
        std::thread::sleep(Duration::from_millis(200));
        zombies_left += procfs::zombies_in_namespace_of(d.pid())
            .iter()
            .filter(|p| p.comm != "sh")
            .count();
        d.signal(Signal::SIGTERM);
        d.wait_exit(T_LONG);

        let done2 = ws.path().join("done-tini");
        let t0 = Instant::now();
        let st = Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL"])
            .arg("tini")
            .arg("--")
            .arg(&s.bench_exe)
            .arg("orphans")
            .arg(N.to_string())
            .arg(&done2)
            .status()
            .expect("unshare tini");
        assert!(st.success() && done2.exists(), "tini run failed: {st}");
        t.push(t0.elapsed().as_secs_f64());
    }
    let med = w.median();
    rows.push(
        Row::new(
            format!("reaping {N} orphans as PID 1: time until none is left"),
            "s",
            w,
        )
        .baseline("tini (until its child exits)", t)
        .target(
            "0 zombies left, 0 wrong exit codes",
            format!(
                "{} s; {zombies_left} zombies left; {wrong_codes} wrong of {exits_seen} exit codes seen",
                num(med)
            ),
            zombies_left == 0 && wrong_codes == 0,
        ),
    );
}

// ---------------------------------------------------------------------------------------
// 5. Log shipping.

/// Child side: ship `n` lines through wsagent's own shipper to `url`, then print
/// `lines secs rss_before_kib hwm_kib`.
fn logship_child(url: &str, token: &str, n: usize) {
    use agent::control::Board;
    use agent::control::client::Client;
    use agent::control::logs::Shipper;
    use agent::secrets::Secret;
    use agent_proto::local::{Event, EventKind, Level};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = Client::new(url, Secret::new(token), Duration::from_secs(10), &[]).unwrap();
        let shipper = Arc::new(Shipper::new(
            client,
            Arc::new(Mutex::new(Board::default())),
            n + 1000,
            Duration::from_millis(500),
            // The whole per-agent total, as before the budget existed.
            agent_proto::coder::MAX_LOGS_LENGTH,
        ));
        let cancel = tokio_util::sync::CancellationToken::new();
        let before = vm_kib(std::process::id(), "VmRSS").unwrap();
        let t0 = Instant::now();
        let task = tokio::spawn(shipper.clone().run(cancel.clone()));
        for i in 0..n {
            shipper.push(&Event {
                at: "2026-11-22T00:00:00Z".into(),
                level: Level::Info,
                message: format!("line {i:06}"),
                kind: EventKind::Note,
            });
            if i % 1000 == 0 {
                tokio::task::yield_now().await;
            }
        }
        shipper
            .flush(tokio::time::Instant::now() + Duration::from_secs(120))
            .await;
        let secs = t0.elapsed().as_secs_f64();
        cancel.cancel();
        let _ = task.await;
        let hwm = vm_kib(std::process::id(), "VmHWM").unwrap();
        println!("{n} {secs} {before} {hwm}");
    });
}

fn log_shipping(s: &Settings, rows: &mut Vec<Row>) {
    const N: usize = 50_000;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (mut rate, mut rss) = (Stats::default(), Stats::default());
    for r in 0..s.runs.min(3) {
        note(format!("log shipping run {}", r + 1));
        let fake = rt.block_on(FakeCoderd::start());
        let out = sh(Command::new(&s.bench_exe)
            .arg("logship")
            .arg(fake.url())
            .arg(fake.token())
            .arg(N.to_string()));
        let text = String::from_utf8_lossy(&out.stdout);
        let f: Vec<f64> = text
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        let got = fake.logs().len();
        assert!(got >= N, "the fake coderd holds {got} of {N} lines");
        rate.push(f[0] / f[1]);
        rss.push((f[3] - f[2]) / 1024.0);
    }
    let (lr, lm) = (rate.median(), rss.median());
    let mut row = Row::new(
        "log shipping to the fake coderd: throughput",
        "lines/s",
        rate,
    )
    .target(
        "≥ 50 000 lines/s",
        format!("{} lines/s", num(lr)),
        lr >= 50_000.0,
    );
    row.lower_better = false;
    rows.push(row);
    rows.push(
        Row::new(
            format!("log shipping: peak extra RSS while shipping {N} lines"),
            "MiB",
            rss,
        )
        .target("≤ 8 MiB", format!("{} MiB", num(lm)), lm <= 8.0),
    );
}

// ---------------------------------------------------------------------------------------
// 6. Crash loop.

fn crash_loop(s: &Settings, rows: &mut Vec<Row>) {
    note(format!(
        "crash loop: {} s window (BENCH_CRASH_SECS)",
        s.crash_window.as_secs()
    ));
    let forever = "max_failures = 4000000000\n";
    let ws_default = workspace();
    let mut d_default = Daemon::start(
        &ws_default,
        &format!(
            "{NO_DEFAULTS}\n[services.crash]\ncommand = [\"false\"]\n[services.crash.backoff]\n{forever}"
        ),
    );
    let ws_fast = workspace();
    let mut d_fast = Daemon::start(
        &ws_fast,
        &format!(
            "{NO_DEFAULTS}\n[services.crash]\ncommand = [\"false\"]\n[services.crash.backoff]\ninitial = \"10ms\"\nmax = \"100ms\"\n{forever}"
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("supervisord.conf");
    std::fs::write(
        &conf,
        format!(
            "[supervisord]\nnodaemon=true\nlogfile={0}/sd.log\npidfile={0}/sd.pid\nchildlogdir={0}\n[program:crash]\ncommand=false\nautorestart=true\nstartretries=1000000\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let mut sd = Command::new("supervisord")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("supervisord");
    d_default.wait_lifecycle(Lifecycle::Ready, T_LONG);
    d_fast.wait_lifecycle(Lifecycle::Ready, T_LONG);
    let pids = [d_default.pid(), d_fast.pid(), sd.id()];
    let before: Vec<Duration> = pids.iter().map(|p| cpu_time(*p)).collect();
    std::thread::sleep(s.crash_window);
    let after: Vec<Duration> = pids.iter().map(|p| cpu_time(*p)).collect();
    let pct =
        |i: usize| (after[i] - before[i]).as_secs_f64() / s.crash_window.as_secs_f64() * 100.0;
    let restarts = |d: &Daemon| {
        d.try_status()
            .ok()
            .and_then(|st| {
                st.services
                    .iter()
                    .find(|x| x.name == "crash")
                    .map(|x| x.restarts)
            })
            .unwrap_or(0)
    };
    let (r_default, r_fast) = (restarts(&d_default), restarts(&d_fast));
    let one = |v: f64| {
        let mut st = Stats::default();
        st.push(v);
        st
    };
    let p0 = pct(0);
    rows.push(
        Row::new(
            format!(
                "crash loop, default backoff: CPU over {} s ({r_default} restarts)",
                s.crash_window.as_secs()
            ),
            "% of a core",
            one(p0),
        )
        .baseline("supervisord", one(pct(2)))
        .target("< 1% of one core", format!("{}%", num(p0)), p0 < 1.0),
    );
    rows.push(
        Row::new(
            format!(
                "crash loop, backoff 10–100 ms: CPU over {} s ({r_fast} restarts)",
                s.crash_window.as_secs()
            ),
            "% of a core",
            one(pct(1)),
        )
        .baseline("supervisord (its own backoff)", one(pct(2))),
    );
    d_default.signal(Signal::SIGTERM);
    d_fast.signal(Signal::SIGTERM);
    d_default.wait_exit(T_LONG);
    d_fast.wait_exit(T_LONG);
    let _ = kill(Pid::from_raw(sd.id() as i32), Signal::SIGTERM);
    if !wait_exit(&mut sd, Duration::from_secs(20)) {
        let _ = sd.kill();
        let _ = sd.wait();
    }
}

// ---------------------------------------------------------------------------------------

fn run_all(out: &Path, svg: &Path) {
    let s = Settings::from_env();
    if std::env::var_os("WSAGENT_BIN").is_none() {
        // SAFETY: single-threaded at this point.
        unsafe {
            std::env::set_var("WSAGENT_BIN", repo_root().join("target/release/wsagent"));
        }
    }
    // The daemons measured log at `info`, wsagent's default (the test harness's default
    // is `debug`).
    if std::env::var_os("WSAGENT_TEST_LOG_LEVEL").is_none() {
        // SAFETY: single-threaded at this point.
        unsafe {
            std::env::set_var("WSAGENT_TEST_LOG_LEVEL", "info");
        }
    }
    let started = Instant::now();
    let mut rows = Vec::new();
    // BENCH_ONLY=latency,reaping runs only those sections (for work on the driver).
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let on = |name: &str| only.is_empty() || only.split(',').any(|x| x == name);
    let mut curve = Vec::new();
    if on("stop-save") {
        curve = stop_save(&s, &mut rows);
    }
    if on("footprint") {
        footprint(&s, &mut rows);
    }
    if on("latency") {
        latency(&s, &mut rows);
    }
    if on("reaping") {
        reaping(&s, &mut rows);
    }
    if on("logs") {
        log_shipping(&s, &mut rows);
    }
    if on("crash") {
        crash_loop(&s, &mut rows);
    }
    if on("scale") {
        scale::scale(&s, &mut rows);
    }

    let mut md = String::new();
    md.push_str("# wsagent benchmarks\n\n");
    md.push_str("Produced by `scripts/bench` (do not edit by hand). Every baseline ran in the same run as wsagent, interleaved; medians with (min–max, number of runs). The ratio is baseline ÷ wsagent for lower-is-better quantities, so above 1 means wsagent is better.\n\n");
    let _ = writeln!(
        md,
        "- binary: `{}`\n- machine: {} CPU(s), {}\n- mode: {}, {} runs per point (3 at most for the slow ones), crash-loop window {} s\n- total time: {:.0} s\n",
        integration::wsagent_bin().display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        String::from_utf8_lossy(
            &Command::new("uname")
                .arg("-sr")
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default()
        )
        .trim(),
        if s.quick { "BENCH_QUICK=1" } else { "full" },
        s.runs,
        s.crash_window.as_secs(),
        started.elapsed().as_secs_f64()
    );
    md.push_str(&render_table(&rows));
    md.push_str("\n![stop-save time against the number of repositories](stop-save.svg)\n\n");
    md.push_str(NOTES);
    std::fs::write(out, &md).expect("write results");
    std::fs::write(svg, svg_plot(&curve)).expect("write svg");
    println!("{md}");
}

const NOTES: &str = "## How each figure is measured\n\n\
- **stop-save**: N repositories under `~/projects`, each with 50 modified and 50 new files, restored from a template before every run, pushed to the harness's smart-HTTP git server (token auth; the latency switch delays every HTTP request). wsagent: a fresh release daemon, then the wall time of `wsagent save` (what Coder's shutdown_script runs; the snapshot refs are checked on the server). Shell loop: `bench/shutdown-loop.sh` (serial `git add -A; git commit; set-url with token; git push; set-url back`). Bare push: `git push` of the same work already committed (N = 1). 200 repositories: wsagent only (the shell loop would take minutes a run), against the default 25 s stop budget. *CPU per repository*: the daemon's CPU time (user + system, `/proc/PID/stat`) during the save, divided by N.\n\
- **idle with checkpoints**: the 50-repository workspace after one `wsagent save` (all pushed, the dirty set watching them), nothing changing, `save.checkpoint = \"10s\"`; after the first checkpoint, the daemon's CPU time over the window (each checkpoint counted from its `checkpoint done` line: this daemon logs at level debug), and its `RssAnon` and `Pss` at the end (beside its `RssAnon` 2 s after it was ready, before the save). Then the same with `save.checkpoint = \"off\"` (the daemon between checkpoints). The target is judged at the default interval (10 min): the CPU with checkpoints off plus six checkpoints an hour, each costing the difference over the window divided by the checkpoints that ran.\n\
- **idle memory**: `RssAnon` (anonymous resident memory: heap, stacks; what no other process shares) of the supervisor process itself (log level `info`, the default), the larger of two samples 3 s and 8 s after its three `sleep infinity` services are up, idle (tini: `tini -g -- sh -c 'sleep infinity & … wait'`; supervisord: three `[program:]`s; both sampled 3 s after start). Beside it, wsagent's `Pss` (`/proc/PID/smaps_rollup`: its share of every page it maps, the binary's pages included) and, where the bench can make a memory cgroup for it, that cgroup's usage (`memory.current`, or v1's `memory.usage_in_bytes`), which also counts page cache it caused. Nothing is trimmed or unmapped to lower these figures.\n\
- **binary size**: the binary measured everywhere in this table: what `scripts/build-static` builds (the one the images ship), stripped.\n\
- **exec → ready**: from spawning `wsagent run` to its `lifecycle ready` log line, three `sleep infinity` services without health checks (healthy once running). tini: from spawn to the `ready` line of the shell that started the same three sleeps; the target is wsagent's time minus tini's.\n\
- **SIGTERM → exit**: from `kill -TERM` to `waitpid` returning, no repository to save.\n\
- **reaping**: wsagent as PID 1 of a fresh pid namespace; a service double-forks 10 000 orphans as fast as it can while a service that exits 7 restarts every 10–20 ms; the time runs from the go signal until the generator is done and no zombie is left in the namespace; every exit code of the `seven` service seen through `wsagent status` meanwhile is checked. tini: `unshare … tini -- <generator>`, until it exits.\n\
- **log shipping**: wsagent's own shipper (`agent::control::logs::Shipper`, Coder's batching: 100 lines per `PATCH /logs`) in a process of its own, 50 000 lines queued then flushed to the fake coderd; lines/s from the first push to the end of the flush, peak extra RSS = `VmHWM` − `VmRSS` before the first line.\n\
- **saves at scale** (`integration/src/bin/bench/scale.rs`): the user's clone under `~/projects` and git's identical clone beside it, both pushing to the harness's smart-HTTP server, restored from templates before every run; wsagent: a fresh daemon, `wsagent save` timed, its `VmHWM` after the save as the peak; git: `git add -A && git commit && git push` of the same change, its peak the largest `ru_maxrss` of the processes it ran; every run checks that the server holds the same tree under wsagent's snapshot ref and git's branch. Each side's clone is copied again just before its own timed run (this machine's page cache drops clean pages within seconds, so an older copy is read from the disk more). *Deep remote*: 20 000 commits and 2 000 tags, all fetched by the clone, 5 files changed and 1 new. *N files*: a repository of N small files in directories of 100, the same 6 changes; the daemon's `RssAnon` 2 s after its start and 10 s after the save. *Large*: a new random file (`max_file_size` raised, a 10 min stop budget); then four repositories with a quarter of that size each, saved at once (`save.parallelism` 8), wsagent only. *Many saves*: one small change saved again and again by one daemon, beside as many `git commit -a` in git's clone: packs and loose objects left (`git count-objects -v`), `git fsck`, and the user's `git status --porcelain` and `git log --oneline` (median of 31 runs each) before and after the saves.\n\
- **crash loop**: a service that is `false`, restarted forever (`max_failures` raised so it never ends `failed`); CPU time of the wsagent process over the window, with the default backoff (500 ms doubling to 30 s) and with 10–100 ms; supervisord with `autorestart=true` beside it in the same window.\n";
