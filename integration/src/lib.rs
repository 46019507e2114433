//! Test support for wsagent's end-to-end tests: run the real `wsagent` binary against a
//! throwaway HOME (optionally as PID 1 of its own pid namespace), wait on conditions
//! instead of sleeping, inspect processes through `/proc`, and decide when a test that
//! needs a real tool (dockerd, code-server) skips or fails.
//!
//! The pieces: [`wait`] (polling with a deadline), [`daemon`] ([`Workspace`] and
//! [`Daemon`]), [`procfs`] (descendants, zombies, pid namespaces), [`real`] (real-tool
//! requirements and the `WSAGENT_TEST_*` variables set by `scripts/test`) and [`net`]
//! (free ports, a tiny HTTP probe).

pub mod daemon;
pub mod net;
pub mod procfs;
pub mod real;
pub mod wait;

pub use daemon::{Daemon, Workspace, wsagent_bin};
pub use wait::{try_wait_until, wait_until};
