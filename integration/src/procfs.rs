//! Reading processes from `/proc`: who descends from whom, who is a zombie, who shares a
//! pid namespace, and who carries the test's environment tag.
//!
//! Everything is a fresh scan (processes come and go between two calls); a process that
//! vanishes mid-scan is simply left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The fields of `/proc/<pid>/stat` the tests use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    /// The command name (`comm`, at most 15 bytes).
    pub comm: String,
    /// `R`, `S`, `D`, `Z`, `T`, ...
    pub state: char,
    pub ppid: u32,
    pub pgrp: u32,
}

impl Proc {
    pub fn is_zombie(&self) -> bool {
        self.state == 'Z'
    }
}

/// Parse one `/proc/<pid>/stat` line. `comm` may hold spaces and parentheses, so the
/// fields after it are found from the last `)`.
pub fn parse_stat(line: &str) -> Option<Proc> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let pid = line[..open].trim().parse().ok()?;
    let comm = line[open + 1..close].to_string();
    let mut rest = line[close + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    let pgrp = rest.next()?.parse().ok()?;
    Some(Proc {
        pid,
        comm,
        state,
        ppid,
        pgrp,
    })
}

/// One process, or `None` when it does not exist (any more).
pub fn stat(pid: u32) -> Option<Proc> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|p| !p.is_zombie())
}

/// Every process visible in `/proc`.
pub fn all() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<Proc> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(stat)
        .collect();
    out.sort_by_key(|p| p.pid);
    out
}

/// The direct children of `pid`.
pub fn children(pid: u32) -> Vec<Proc> {
    all().into_iter().filter(|p| p.ppid == pid).collect()
}

/// Every descendant of `pid` (children, their children, ...), not `pid` itself.
pub fn descendants(pid: u32) -> Vec<Proc> {
    let procs = all();
    let mut by_parent: BTreeMap<u32, Vec<&Proc>> = BTreeMap::new();
    for p in &procs {
        by_parent.entry(p.ppid).or_default().push(p);
    }
    let mut out = Vec::new();
    let mut todo = vec![pid];
    let mut seen = BTreeSet::from([pid]);
    while let Some(parent) = todo.pop() {
        for &child in by_parent.get(&parent).into_iter().flatten() {
            if seen.insert(child.pid) {
                out.push(child.clone());
                todo.push(child.pid);
            }
        }
    }
    out.sort_by_key(|p| p.pid);
    out
}

/// The zombies among the descendants of `pid`.
pub fn zombies_under(pid: u32) -> Vec<Proc> {
    descendants(pid)
        .into_iter()
        .filter(Proc::is_zombie)
        .collect()
}

/// The pid namespace of `pid`, as the kernel names it (`pid:[4026531836]`).
pub fn pid_namespace(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

/// Every process in the same pid namespace as `pid` (including `pid`). Use it with the
/// host pid of a namespace's PID 1.
pub fn in_namespace_of(pid: u32) -> Vec<Proc> {
    let Some(ns) = pid_namespace(pid) else {
        return Vec::new();
    };
    all()
        .into_iter()
        .filter(|p| pid_namespace(p.pid).as_ref() == Some(&ns))
        .collect()
}

/// The zombies in the pid namespace of `pid`.
pub fn zombies_in_namespace_of(pid: u32) -> Vec<Proc> {
    in_namespace_of(pid)
        .into_iter()
        .filter(Proc::is_zombie)
        .collect()
}

/// Processes whose environment holds exactly `var=value`: everything a test started
/// (directly or not) when it put a unique tag in the environment, even after the process
/// was reparented away from the test's tree. Zombies (no readable environment) are not
/// found.
pub fn with_env(var: &str, value: &str) -> Vec<Proc> {
    let needle = format!("{var}={value}");
    all()
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{}/environ", p.pid))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()))
        })
        .collect()
}

/// Mount points at or under `dir` in this process's mount namespace, deepest first (the
/// order to unmount them in). Kernel escapes (`\040` for a space) are decoded.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

fn unescape_mount_path(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(c) = u8::from_str_radix(&p[i + 1..i + 4], 8)
        {
            out.push(c);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line per process (`pid ppid state comm`), for failure messages.
pub fn describe(procs: &[Proc]) -> String {
    procs
        .iter()
        .map(|p| format!("{} ppid={} {} {}", p.pid, p.ppid, p.state, p.comm))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wait_until;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        let p = parse_stat("42 (a) b (c)) S 7 42 42 0 -1 4194560 0").unwrap();
        assert_eq!(p.pid, 42);
        assert_eq!(p.comm, "a) b (c)");
        assert_eq!((p.state, p.ppid, p.pgrp), ('S', 7, 42));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn a_child_that_nobody_reaps_is_counted_as_a_zombie_of_its_parent() {
        // `sh` forks `true`, then becomes `sleep`, which never waits: `true` stays a zombie.
        let mut parent = Command::new("sh")
            .args(["-c", "true & exec sleep 30"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let pid = parent.id();
        let zombies = wait_until(Duration::from_secs(10), "the zombie of `true`", || {
            let z = zombies_under(pid);
            (!z.is_empty()).then_some(z)
        });
        assert_eq!(zombies.len(), 1, "{}", describe(&zombies));
        assert_eq!(zombies[0].ppid, pid);
        assert!(descendants(pid).iter().any(|p| p.pid == zombies[0].pid));
        assert!(!alive(zombies[0].pid));
        assert!(alive(pid));
        let me = std::process::id();
        assert!(descendants(me).iter().any(|p| p.pid == pid));
        assert!(children(me).iter().any(|p| p.pid == pid));
        assert!(
            zombies_in_namespace_of(me)
                .iter()
                .any(|p| p.pid == zombies[0].pid)
        );
        parent.kill().unwrap();
        parent.wait().unwrap();
        assert!(stat(pid).is_none());
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/tmp/a\\040b"), "/tmp/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert!(mounts_under(Path::new("/proc")).contains(&PathBuf::from("/proc")));
    }

    #[test]
    fn processes_are_found_by_their_environment_tag() {
        let tag = uuid::Uuid::new_v4().to_string();
        let mut child = Command::new("sleep")
            .arg("30")
            .env("WSAGENT_TEST_TAG", &tag)
            .spawn()
            .unwrap();
        let found = with_env("WSAGENT_TEST_TAG", &tag);
        assert_eq!(
            found.iter().map(|p| p.pid).collect::<Vec<_>>(),
            [child.id()]
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(with_env("WSAGENT_TEST_TAG", &tag).is_empty());
    }
}
