//! Test support for wsagent's end-to-end tests and benchmarks: run the real `wsagent`
//! binary against a throwaway HOME (optionally as PID 1 of its own pid namespace), wait
//! on conditions instead of sleeping, inspect processes through `/proc`, decide when a
//! test that needs a real tool (dockerd, code-server) skips or fails, and serve git over
//! smart HTTP with token auth.
//!
//! The pieces: [`wait`] (polling with a deadline), [`daemon`] ([`Workspace`] and
//! [`Daemon`]), [`procfs`] (descendants, zombies, pid namespaces), [`real`] (real-tool
//! requirements and the `WSAGENT_TEST_*` variables set by `scripts/test`), [`net`]
//! (free ports, a tiny HTTP probe), [`gitserver`] (a real smart-HTTP git server) and
//! [`fake_coderd`] (a real HTTP server following Coder's agent API reference).

pub mod daemon;
pub mod fake_coderd;
pub mod gitserver;
pub mod net;
pub mod pki;
pub mod procfs;
pub mod real;
pub mod wait;

pub use daemon::{Daemon, Workspace, wsagent_bin};
pub use wait::{try_wait_until, wait_until};

/// A two-thread tokio runtime for the tests that drive async fakes (coderd, slow
/// servers) beside the blocking harness.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}
