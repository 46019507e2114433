//! Saves at scale beside plain git, in the same run (issue 16): a remote with deep
//! history and thousands of tags, a 100 000-file repository (time, peak memory, and the
//! daemon's anonymous memory 10 s after the save), a 500 MiB new file, and the health of
//! the user's repository after many saves. `BENCH_ONLY=scale` runs this section alone,
//! `BENCH_SCALE=refs,memory,large,packs` picks its parts, `BENCH_FILES=10000,100000` the
//! sizes of the many-files part.
//!
//! wsagent: a fresh release daemon per run, `wsagent save` timed, its `VmHWM` after the
//! save as the peak. git: the same change in an identical clone, `git add -A && git
//! commit && git push` of it to the same kind of remote (the harness's smart-HTTP server,
//! restored before every run), timed, its peak the largest `ru_maxrss` of the processes
//! it ran (measured by this binary's `peak` helper). Each run checks that the remote
//! holds the worktree's tree under wsagent's snapshot ref and git's branch alike.

use super::*;

const SNAP_REF: &str = "refs/heads/wip/bench/main";
const GIT_REF: &str = "refs/heads/bench";

pub(super) fn scale(s: &Settings, rows: &mut Vec<Row>) {
    let only = std::env::var("BENCH_SCALE").unwrap_or_default();
    let on = |name: &str| only.is_empty() || only.split(',').any(|x| x == name);
    if on("refs") {
        refs(s, rows);
    }
    if on("memory") {
        memory(s, rows);
    }
    if on("large") {
        large(s, rows);
    }
    if on("packs") {
        packs(s, rows);
    }
}

/// `bench peak CMD ARGS...`: run CMD, then print the largest resident set (KiB) of it
/// and of every descendant it waited for, and exit with its status.
pub(super) fn peak_child(args: &[String]) {
    let st = Command::new(&args[0])
        .args(&args[1..])
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", args[0]));
    // SAFETY: rusage is plain data; getrusage fills it in.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    println!("PEAK_KIB {}", ru.ru_maxrss);
    std::process::exit(st.code().unwrap_or(1));
}

/// A `/proc/<pid>/status` field in MiB.
fn mib(pid: u32, field: &str) -> f64 {
    vm_kib(pid, field).unwrap_or(0) as f64 / 1024.0
}

/// One workspace: the user's clone under `~/projects/<name>`, git's identical clone
/// beside it, the server's repository, each kept as a template restored before a run.
struct Fixture {
    ws: Workspace,
    server: GitServer,
    name: String,
    tpl: PathBuf,
    extra_config: String,
}

impl Fixture {
    /// The server's `<name>.git` filled by `fill` (a bare repository path), cloned into
    /// the workspace; `change` then edits the clone (both clones get the same edit).
    fn build(name: &str, fill: impl FnOnce(&Path), change: impl Fn(&Path)) -> Fixture {
        let ws = workspace();
        let server = GitServer::start(ws.path().join("srv"), TOKEN).expect("git server");
        let bare = server.create_bare(&format!("{name}.git")).expect("bare");
        fill(&bare);
        let user = ws.home().join("projects").join(name);
        std::fs::create_dir_all(user.parent().unwrap()).unwrap();
        clone_from(&server, &bare, &user, name);
        change(&user);
        // The index's stat data fresh, as in a workspace in use.
        git(&user, &["status", "--porcelain"]);
        let gitclone = ws.path().join("gitclone");
        std::fs::create_dir_all(&gitclone).unwrap();
        sh(Command::new("cp")
            .arg("-a")
            .arg(&user)
            .arg(gitclone.join(name)));
        let tpl = ws.path().join("tpl");
        std::fs::create_dir_all(&tpl).unwrap();
        for (from, to) in [
            (ws.home().join("projects"), "projects"),
            (gitclone.clone(), "gitclone"),
            (ws.path().join("srv"), "srv"),
        ] {
            sh(Command::new("cp").arg("-a").arg(&from).arg(tpl.join(to)));
        }
        cache_token(&ws.home());
        Fixture {
            ws,
            server,
            name: name.to_string(),
            tpl,
            extra_config: String::new(),
        }
    }

    fn user(&self) -> PathBuf {
        self.ws.home().join("projects").join(&self.name)
    }

    fn gitclone(&self) -> PathBuf {
        self.ws.path().join("gitclone").join(&self.name)
    }

    fn reset(&self) {
        restore(&self.tpl.join("projects"), &self.ws.home().join("projects"));
        restore(&self.tpl.join("gitclone"), &self.ws.path().join("gitclone"));
        self.reset_server();
    }

    /// The server's repositories and the daemon's state as the template has them; the
    /// two clones are left for [`Fixture::restore_again`].
    fn reset_server(&self) {
        restore(&self.tpl.join("srv"), &self.ws.path().join("srv"));
        let state = self.ws.state_dir();
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&state).unwrap();
        // The copies on disk before anything is timed: whoever syncs next (the save's
        // syncfs) must not pay for writing the harness's templates back.
        sh(&mut Command::new("sync"));
    }

    /// Restore the user's copy (`"projects"`) or git's (`"gitclone"`) again, just
    /// before its timed run. This machine's page cache drops clean pages within
    /// seconds, so of two copies restored a minute apart (300 000 files take that
    /// long to copy here) the older would be read from the disk far more: each side
    /// is timed with a copy of the same age.
    fn restore_again(&self, which: &str) {
        let to = match which {
            "projects" => self.ws.home().join("projects"),
            _ => self.ws.path().join("gitclone"),
        };
        restore(&self.tpl.join(which), &to);
        sh(&mut Command::new("sync"));
    }

    fn start(&self) -> Daemon {
        let cfg = format!(
            "{NO_DEFAULTS}\n{}\n[save]\ncheckpoint = \"off\"\n{}",
            provider_for(&self.server),
            self.extra_config
        );
        let mut d = Daemon::start(&self.ws, &cfg);
        d.wait_lifecycle(Lifecycle::Ready, T_LONG);
        d
    }

    /// `wsagent save` on a running daemon: seconds.
    fn save(&self, d: &Daemon) -> f64 {
        // BENCH_PERF=FILE: a `perf record` of the daemon during the save (for profiling).
        // BENCH_PERF_CG=dwarf: unwind with DWARF (a release build with debug info).
        let perf = std::env::var_os("BENCH_PERF").map(|out| {
            let cg = std::env::var("BENCH_PERF_CG").unwrap_or_else(|_| "fp".into());
            let c = Command::new("perf")
                .args(["record", "-q", "-F", "1000", "--call-graph", &cg, "-o"])
                .arg(out)
                .args(["-p", &d.pid().to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("perf");
            std::thread::sleep(Duration::from_millis(300));
            c
        });
        let t = Instant::now();
        let out = self
            .ws
            .command(integration::wsagent_bin())
            .arg("save")
            .output()
            .expect("wsagent save");
        let took = t.elapsed().as_secs_f64();
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            note(format!(
                "save took {took:.3} s; daemon log:\n{}\njournal:\n{}",
                d.stderr(),
                std::fs::read_to_string(self.ws.state_dir().join("save-journal.jsonl"))
                    .unwrap_or_default()
            ));
        }
        if let Some(mut c) = perf {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGINT);
            let _ = c.wait();
        }
        assert!(
            out.status.success(),
            "wsagent save failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            d.report()
        );
        took
    }

    /// git's `add -A && commit && push` of the same change: (seconds, peak MiB).
    fn git_save(&self, s: &Settings) -> (f64, f64) {
        let url = self
            .server
            .url(&format!("{}.git", self.name))
            .replace("http://", &format!("http://x:{TOKEN}@"));
        let script =
            format!("git add -A && git commit -q -m wip && git push -q '{url}' HEAD:{GIT_REF}");
        let t = Instant::now();
        let out = sh(Command::new(&s.bench_exe)
            .args(["peak", "bash", "-c", &script])
            .current_dir(self.gitclone())
            .env("GIT_AUTHOR_NAME", "Bench")
            .env("GIT_AUTHOR_EMAIL", "bench@example.com")
            .env("GIT_COMMITTER_NAME", "Bench")
            .env("GIT_COMMITTER_EMAIL", "bench@example.com")
            .env("GIT_TERMINAL_PROMPT", "0"));
        let took = t.elapsed().as_secs_f64();
        let peak = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("PEAK_KIB "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .expect("peak helper output");
        (took, peak / 1024.0)
    }

    /// Both pushes landed, with the same tree: the worktree's.
    fn check_same_tree(&self) {
        let bare = self.server.path(&format!("{}.git", self.name));
        let tree = |r: &str| git(&bare, &["rev-parse", &format!("{r}^{{tree}}")]);
        assert_eq!(
            tree(SNAP_REF),
            tree(GIT_REF),
            "wsagent's snapshot and git's commit differ"
        );
    }
}

/// The user's clone of the server's `<name>.git` (`bare`) at `user`, its origin the
/// server's URL.
fn clone_from(server: &GitServer, bare: &Path, user: &Path, name: &str) {
    sh(Command::new("git")
        .args(["clone", "-q"])
        .arg(bare)
        .arg(user));
    git(
        user,
        &[
            "remote",
            "set-url",
            "origin",
            &server.url(&format!("{name}.git")),
        ],
    );
}

/// A file of `mib` MiB of random bytes.
fn random_file(path: &Path, mib: u64) {
    sh(Command::new("dd")
        .arg("if=/dev/urandom")
        .arg(format!("of={}", path.display()))
        .args(["bs=1M", &format!("count={mib}"), "status=none"]));
}

/// Commits made by `git fast-import` into `bare`: `commits` commits on main over
/// `files` files (one changed per commit), a lightweight tag every `tag_every`.
fn history(bare: &Path, commits: usize, files: usize, tag_every: usize) {
    let mut stream = String::new();
    for i in 1..=commits {
        let _ = write!(
            stream,
            "commit refs/heads/main\nmark :{i}\ncommitter Bench <bench@example.com> {} +0000\ndata 10\ncommit {:03}\n",
            1_700_000_000 + i,
            i % 1000
        );
        let changed: Vec<usize> = if i == 1 {
            (0..files).collect()
        } else {
            vec![i % files]
        };
        for f in changed {
            let body = format!(
                "file {f}, version {i}\n{}",
                "some text of the file\n".repeat(20)
            );
            let _ = write!(
                stream,
                "M 100644 inline d{:02}/f{:04}.txt\ndata {}\n{body}\n",
                f % 50,
                f,
                body.len()
            );
        }
        if i % tag_every == 0 {
            let _ = write!(stream, "reset refs/tags/v{i}\nfrom :{i}\n\n");
        }
    }
    let mut child = Command::new("git")
        .arg("-C")
        .arg(bare)
        .args(["fast-import", "--quiet"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("git fast-import");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stream.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "git fast-import failed");
    git(bare, &["gc", "-q"]);
}

/// Modify five existing files and add one (the same edit wherever it is called).
fn five_changes(dir: &Path, tag: &str) {
    for i in 0..5 {
        let d = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir() && !p.ends_with(".git"))
            .min()
            .unwrap();
        let f = std::fs::read_dir(&d)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .nth(i)
            .unwrap();
        let mut body = std::fs::read_to_string(&f).unwrap();
        body.push_str(&format!("unsaved edit {tag}\n"));
        std::fs::write(f, body).unwrap();
    }
    std::fs::write(dir.join(format!("new-{tag}.txt")), format!("new {tag}\n")).unwrap();
}

/// A remote with 20 000 commits and 2 000 tags (all fetched by the clone, as `git clone`
/// does), five files changed.
fn refs(s: &Settings, rows: &mut Vec<Row>) {
    note("scale: a remote with 20 000 commits and 2 000 tags");
    let fx = Fixture::build(
        "deep",
        |bare| history(bare, 20_000, 500, 10),
        |dir| five_changes(dir, "deep"),
    );
    let (mut w, mut wp, mut g, mut gp) = Default::default();
    for r in 0..s.runs.min(3) {
        note(format!("refs run {}", r + 1));
        fx.reset();
        let d = fx.start();
        Stats::push(&mut w, fx.save(&d));
        Stats::push(&mut wp, mib(d.pid(), "VmHWM"));
        stop(d);
        // As old as wsagent's copy was at its save (restored, then the daemon's start
        // and 2 s).
        fx.restore_again("gitclone");
        std::thread::sleep(Duration::from_secs(2));
        let (t, p) = fx.git_save(s);
        Stats::push(&mut g, t);
        Stats::push(&mut gp, p);
        fx.check_same_tree();
    }
    let ratio = w.median() / g.median();
    rows.push(
        Row::new(
            "save, remote with 20 000 commits and 2 000 tags, 6 files changed: time",
            "s",
            w,
        )
        .baseline("`git add -A && commit && push`", g)
        .target("≤ 1.5× git", format!("{}×", num(ratio)), ratio <= 1.5),
    );
    let pm = wp.median();
    rows.push(
        Row::new("… the same save: peak RSS", "MiB", wp)
            .baseline("git (largest process)", gp.clone())
            .target(
                "≤ 2× git's",
                format!("{} MiB", num(pm)),
                pm <= 2.0 * gp.median(),
            ),
    );
}

fn stop(mut d: Daemon) {
    d.signal(Signal::SIGTERM);
    d.wait_exit(T_LONG);
}

/// `RssAnon` of a process, MiB.
fn rss_anon(pid: u32) -> f64 {
    mib(pid, "RssAnon")
}

/// Repositories of 10 000, 100 000 and 300 000 files (`BENCH_FILES=100000,…` picks; a
/// quick run does 100 000 only), five changed and one new: time and peak beside git's,
/// and the daemon's anonymous memory before the save and 10 s after it.
fn memory(s: &Settings, rows: &mut Vec<Row>) {
    let sizes: Vec<usize> = match std::env::var("BENCH_FILES") {
        Ok(v) => v
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .expect("BENCH_FILES: numbers, comma-separated")
            })
            .collect(),
        Err(_) if s.quick => vec![100_000],
        Err(_) => vec![10_000, 100_000, 300_000],
    };
    for files in sizes {
        memory_at(s, rows, files);
    }
}

fn memory_at(s: &Settings, rows: &mut Vec<Row>, files: usize) {
    note(format!("scale: a {files}-file repository"));
    let fx = Fixture::build(
        "big",
        |bare| {
            let src = bare.with_extension("src");
            std::fs::create_dir_all(&src).unwrap();
            git(&src, &["init", "-q"]);
            for i in 0..files {
                let d = src.join(format!("d{:04}", i / 100));
                if i % 100 == 0 {
                    std::fs::create_dir_all(&d).unwrap();
                }
                std::fs::write(
                    d.join(format!("f{:02}.txt", i % 100)),
                    format!("file {i}\n"),
                )
                .unwrap();
            }
            git(&src, &["add", "-A"]);
            git(&src, &["commit", "-q", "-m", "base"]);
            git(&src, &["push", "-q", &bare.display().to_string(), "main"]);
            // Only a scratch copy: a git process still writing into it (auto maintenance
            // after the commit) must not end the run.
            remove_dir_eventually(&src);
        },
        |dir| five_changes(dir, "big"),
    );
    let (mut w, mut wp, mut g, mut gp) = Default::default();
    let (mut idle, mut after) = (Stats::default(), Stats::default());
    for r in 0..s.runs.min(3) {
        note(format!("memory run {}", r + 1));
        fx.reset_server();
        fx.restore_again("projects");
        let d = fx.start();
        std::thread::sleep(Duration::from_secs(2));
        let before = rss_anon(d.pid());
        Stats::push(&mut w, fx.save(&d));
        Stats::push(&mut wp, mib(d.pid(), "VmHWM"));
        std::thread::sleep(Duration::from_secs(10));
        idle.push(before);
        after.push(rss_anon(d.pid()) - before);
        stop(d);
        // As old as wsagent's copy was at its save (restored, then the daemon's start
        // and 2 s).
        fx.restore_again("gitclone");
        std::thread::sleep(Duration::from_secs(2));
        let (t, p) = fx.git_save(s);
        Stats::push(&mut g, t);
        Stats::push(&mut gp, p);
        fx.check_same_tree();
    }
    let ratio = w.median() / g.median();
    rows.push(
        Row::new(
            format!("save, {files} files, 6 changed: time (HTTP remote)"),
            "s",
            w,
        )
        .baseline("`git add -A && commit && push`", g)
        .target("≤ 1.0× git", format!("{}×", num(ratio)), ratio <= 1.0),
    );
    let pm = wp.median();
    rows.push(
        Row::new("… the same save: peak RSS", "MiB", wp)
            .baseline("git (largest process)", gp.clone())
            .target(
                "≤ 2× git's",
                format!("{} MiB", num(pm)),
                pm <= 2.0 * gp.median(),
            ),
    );
    let am = after.median();
    rows.push(
        Row::new(
            "… the daemon's `RssAnon` 10 s after that save, above its idle figure",
            "MiB",
            after,
        )
        .target(
            "≤ 2 MiB",
            format!("+{} MiB (idle before: {} MiB)", num(am), num(idle.median())),
            am <= 2.0,
        ),
    );
}

/// A new 500 MiB file of random bytes (`max_file_size` raised), in a small repository.
fn large(s: &Settings, rows: &mut Vec<Row>) {
    let mb: u64 = std::env::var("BENCH_LARGE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    note(format!("scale: a new {mb} MiB file"));
    let mut fx = Fixture::build(
        "large",
        |bare| history(bare, 10, 20, 100),
        |dir| {
            random_file(&dir.join("big.bin"), mb);
        },
    );
    // git takes about a minute for 500 MiB here: more than the default stop budget
    // (25 s), which would cut either tool's push.
    fx.extra_config = format!(
        "max_file_size = {}\n[shutdown]\nbudget = \"10m\"\n",
        (mb + 100) << 20
    );
    let (mut w, mut wp, mut g, mut gp) = Default::default();
    for r in 0..s.runs.min(2) {
        note(format!("large run {}", r + 1));
        fx.reset();
        let d = fx.start();
        Stats::push(&mut w, fx.save(&d));
        Stats::push(&mut wp, mib(d.pid(), "VmHWM"));
        stop(d);
        let (t, p) = fx.git_save(s);
        Stats::push(&mut g, t);
        Stats::push(&mut gp, p);
        fx.check_same_tree();
    }
    let ratio = w.median() / g.median();
    rows.push(
        Row::new(format!("save, a new {mb} MiB random file: time"), "s", w)
            .baseline("`git add -A && commit && push`", g)
            .target("≤ 1.2× git", format!("{}×", num(ratio)), ratio <= 1.2),
    );
    let pm = wp.median();
    rows.push(
        Row::new("… the same save: peak RSS", "MiB", wp)
            .baseline("git (largest process)", gp)
            .target("≤ 64 MiB", format!("{} MiB", num(pm)), pm <= 64.0),
    );
    large_at_once(rows, mb);
}

/// Four repositories, each with a new random file of a quarter of `mb`, saved at once
/// (`save.parallelism` 8, the default, so all four at the same time): the daemon's peak.
fn large_at_once(rows: &mut Vec<Row>, mb: u64) {
    const N: usize = 4;
    let each = (mb / N as u64).max(1);
    note(format!(
        "scale: {N} new {each} MiB files in {N} repositories at once"
    ));
    let ws = workspace();
    let server = GitServer::start(ws.path().join("srv"), TOKEN).expect("git server");
    let mut users = Vec::new();
    for i in 0..N {
        let name = format!("large{i}");
        let bare = server.create_bare(&format!("{name}.git")).expect("bare");
        history(&bare, 10, 20, 100);
        let user = ws.home().join("projects").join(&name);
        clone_from(&server, &bare, &user, &name);
        random_file(&user.join("big.bin"), each);
        git(&user, &["status", "--porcelain"]);
        users.push((bare, user));
    }
    cache_token(&ws.home());
    sh(&mut Command::new("sync"));
    let cfg = format!(
        "{NO_DEFAULTS}\n{}\n[save]\ncheckpoint = \"off\"\nparallelism = 8\nmax_file_size = {}\n[shutdown]\nbudget = \"10m\"\n",
        provider_for(&server),
        (each + 100) << 20
    );
    let mut d = Daemon::start(&ws, &cfg);
    d.wait_lifecycle(Lifecycle::Ready, T_LONG);
    let out = ws
        .command(integration::wsagent_bin())
        .arg("save")
        .output()
        .expect("wsagent save");
    assert!(
        out.status.success(),
        "wsagent save failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.report()
    );
    let mut peak = Stats::default();
    peak.push(mib(d.pid(), "VmHWM"));
    stop(d);
    for (bare, user) in &users {
        assert_eq!(
            git(bare, &["rev-parse", &format!("{SNAP_REF}:big.bin")]),
            git(user, &["hash-object", "big.bin"]),
            "{} was not saved whole",
            user.display()
        );
    }
    let pm = peak.median();
    rows.push(
        Row::new(
            format!(
                "save, {N} repositories with a new {each} MiB random file each, at once: peak RSS"
            ),
            "MiB",
            peak,
        )
        .target("≤ 64 MiB", format!("{} MiB", num(pm)), pm <= 64.0),
    );
}

/// (packs, loose objects) of a repository, from `git count-objects -v`.
fn object_counts(dir: &Path) -> (u64, u64) {
    let out = git(dir, &["count-objects", "-v"]);
    let field = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (field("packs:"), field("count:"))
}

/// Many saves of one small change each: what they leave in the user's repository,
/// beside as many `git commit`s.
fn packs(s: &Settings, rows: &mut Vec<Row>) {
    let n: usize = std::env::var("BENCH_PACKS_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if s.quick { 100 } else { 1000 });
    note(format!("scale: {n} saves of one change each"));
    let fx = Fixture::build("health", |bare| history(bare, 10, 20, 100), |_| {});
    fx.reset();
    let (status_before, log_before) = (
        timed_runs(&fx.user(), &["status", "--porcelain"]),
        timed_runs(&fx.user(), &["log", "--oneline"]),
    );
    let d = fx.start();
    let t = Instant::now();
    for i in 0..n {
        std::fs::write(fx.user().join("d00/f0000.txt"), format!("edit {i}\n")).unwrap();
        fx.save(&d);
    }
    let each = t.elapsed().as_secs_f64() / n as f64;
    stop(d);
    let t = Instant::now();
    for i in 0..n {
        std::fs::write(fx.gitclone().join("d00/f0000.txt"), format!("edit {i}\n")).unwrap();
        git(&fx.gitclone(), &["commit", "-q", "-a", "-m", "edit"]);
    }
    let git_each = t.elapsed().as_secs_f64() / n as f64;
    let (status_after, log_after) = (
        timed_runs(&fx.user(), &["status", "--porcelain"]),
        timed_runs(&fx.user(), &["log", "--oneline"]),
    );
    let (wp, wl) = object_counts(&fx.user());
    let (gp, gl) = object_counts(&fx.gitclone());
    let fsck = Command::new("git")
        .arg("-C")
        .arg(fx.user())
        .args(["fsck", "--no-progress"])
        .output()
        .expect("git fsck");
    let mut ws = Stats::default();
    ws.push(wp as f64);
    let mut gs = Stats::default();
    gs.push(gp as f64);
    rows.push(
        Row::new(
            format!("{n} saves of one change each: packs left in the user's repository"),
            "packs",
            ws,
        )
        .baseline(&format!("{n} × `git commit -a`"), gs)
        .target(
            "packs ≤ git's + 1, `git fsck` clean",
            format!(
                "{wp} packs and {wl} loose objects (git: {gp} and {gl}); {} ms per save (git commit: {} ms); fsck {}",
                num(each * 1000.0),
                num(git_each * 1000.0),
                if fsck.status.success() { "clean" } else { "FAILED" }
            ),
            wp <= gp + 1 && fsck.status.success(),
        ),
    );
    for (what, before, after) in [
        ("git status", status_before, status_after),
        ("git log", log_before, log_after),
    ] {
        let ratio = after.median() / before.median();
        rows.push(
            Row::new(
                format!("… the user's `{what}` after those saves"),
                "ms",
                after,
            )
            .baseline("the same before them", before)
            .target(
                "≤ 1.2× before",
                format!("{}× before", num(ratio)),
                ratio <= 1.2,
            ),
        );
    }
}

/// Thirty-one runs of a git command in `dir`: milliseconds each (commands of a few
/// milliseconds: the median of many).
fn timed_runs(dir: &Path, args: &[&str]) -> Stats {
    let mut st = Stats::default();
    for _ in 0..31 {
        let t = Instant::now();
        git(dir, args);
        st.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    st
}

/// Remove a scratch directory, trying again while something still writes into it;
/// whatever is left is left (it is under the run's temporary directory).
fn remove_dir_eventually(dir: &Path) {
    for _ in 0..50 {
        if std::fs::remove_dir_all(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("bench: could not remove {} (left)", dir.display());
}
