//! Tests that need a real tool (dockerd, code-server, root for pid namespaces) skip when
//! it is missing on a developer's machine, and fail when `scripts/test` promised it.
//!
//! `scripts/test` installs the tools and sets [`REQUIRE_REAL`]`=1` when every install
//! worked; then a missing tool is a broken test machine, and hiding it behind a skip
//! would let the real-service tests silently stop testing anything.

use std::path::{Path, PathBuf};

/// `1`: a missing real tool fails the test instead of skipping it.
pub const REQUIRE_REAL: &str = "WSAGENT_TEST_REQUIRE_REAL";
/// Path of the `code-server` launcher installed by `scripts/test`.
pub const CODE_SERVER: &str = "WSAGENT_TEST_CODE_SERVER";
/// A busybox root filesystem as a tarball, for `docker import`.
pub const ROOTFS_TAR: &str = "WSAGENT_TEST_ROOTFS_TAR";
/// A Debian 12 root filesystem (debootstrap, minbase) as a tarball, imported as
/// `debian:12-slim` to build `Dockerfile.base` on.
pub const DEBIAN_TAR: &str = "WSAGENT_TEST_DEBIAN_TAR";

/// Whether the run is strict (`WSAGENT_TEST_REQUIRE_REAL=1`).
pub fn strict() -> bool {
    std::env::var(REQUIRE_REAL).is_ok_and(|v| v == "1")
}

/// The name of the running test, for skip messages (libtest names the thread after it).
pub fn test_name() -> String {
    std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .unwrap_or("this test")
        .to_string()
}

/// Find `tool`: a path (anything with a `/`) that exists, or a program on `PATH`.
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    if tool.contains('/') {
        return is_executable(Path::new(tool)).then(|| PathBuf::from(tool));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The decision behind [`require_real`], without side effects: `Ok(true)` run,
/// `Ok(false)` skip (the message says why), `Err` fail (the message says why).
pub fn verdict(
    test: &str,
    what: &str,
    reason: &str,
    available: bool,
    strict: bool,
) -> Result<(bool, String), String> {
    if available {
        return Ok((true, String::new()));
    }
    let why = format!("{what} is not available ({reason})");
    if strict {
        Err(format!(
            "{test}: {why}, and {REQUIRE_REAL}=1 says it must be: \
             run scripts/test (it installs it) or unset {REQUIRE_REAL}"
        ))
    } else {
        Ok((false, format!("skipping {test}: {why}")))
    }
}

fn decide(what: &str, reason: &str, available: bool) -> bool {
    match verdict(&test_name(), what, reason, available, strict()) {
        Ok((run, msg)) => {
            if !run {
                eprintln!("{msg}");
            }
            run
        }
        Err(msg) => panic!("{msg}"),
    }
}

/// `true` when `tool` (a program on `PATH` or a path) is there. Otherwise prints
/// "skipping <test>: ..." and returns `false`, or panics in a strict run.
///
/// ```
/// if !integration::real::require_real("sh", "runs the service's shell") {
///     return;
/// }
/// ```
pub fn require_real(tool: &str, reason: &str) -> bool {
    decide(tool, reason, find_tool(tool).is_some())
}

/// The path in the environment variable `var` (set by `scripts/test`), when it is set and
/// exists; otherwise skip or fail as [`require_real`] does.
pub fn require_real_path(var: &str, reason: &str) -> Option<PathBuf> {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .filter(|p| p.exists());
    decide(&format!("${var}"), reason, path.is_some()).then(|| path.expect("checked"))
}

/// `true` when the test runs as root (pid namespaces, dockerd); else skip or fail.
pub fn require_root(reason: &str) -> bool {
    decide("root", reason, nix::unistd::Uid::effective().is_root())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_present_tool_runs_the_test() {
        assert!(find_tool("sh").is_some());
        assert!(find_tool("/bin/sh").is_some());
        assert!(require_real("sh", "a shell"));
    }

    #[test]
    fn a_missing_tool_skips_with_its_reason_unless_strict() {
        assert!(find_tool("wsagent-no-such-tool").is_none());
        assert!(find_tool("/nonexistent/tool").is_none());
        let (run, msg) = verdict("t1", "frob", "frobs things", false, false).unwrap();
        assert!(!run);
        assert_eq!(msg, "skipping t1: frob is not available (frobs things)");
    }

    #[test]
    fn a_missing_tool_fails_a_strict_run() {
        let err = verdict("t1", "frob", "frobs things", false, true).unwrap_err();
        assert!(err.starts_with("t1: frob is not available"), "{err}");
        assert!(err.contains("WSAGENT_TEST_REQUIRE_REAL=1"), "{err}");
        assert_eq!(
            verdict("t1", "frob", "x", true, true),
            Ok((true, String::new()))
        );
    }

    #[test]
    fn skip_messages_name_the_running_test() {
        assert!(
            test_name().contains("skip_messages_name_the_running_test")
                || test_name() == "this test",
            "{}",
            test_name()
        );
    }
}
