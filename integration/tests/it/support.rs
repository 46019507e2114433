//! Small helpers shared by the test modules of this binary.

use std::time::Duration;

/// Config lines that turn off the three default services, so a test runs only its own.
pub const NO_DEFAULTS: &str = "[services.dockerd]\nenabled = false\n[services.code-server]\nenabled = false\n[services.coder-agent]\nenabled = false\n";

/// A config made of [`NO_DEFAULTS`] and `rest`.
pub fn config(rest: &str) -> String {
    format!("{NO_DEFAULTS}\n{rest}")
}

pub const SHORT: Duration = Duration::from_secs(10);
pub const LONG: Duration = Duration::from_secs(60);

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// A python HTTP server answering 200 on every GET, on `port` (argv for a service).
pub fn http_server(port: u16) -> String {
    format!(r#"["python3", "-m", "http.server", "--bind", "127.0.0.1", "{port}"]"#)
}
