//! wsagent's end-to-end suite: one test binary, one module per area. Tests run the real
//! `wsagent` binary (build it first: `cargo build -p agent --bins`; `scripts/test` does)
//! through the harness in the `integration` library, and read like specs.
//!
//! - `pid1`: init duties (reaping, exact exit codes, signals) as PID 1 and as subreaper.
//! - `supervision`: restart and backoff, dependencies and health checks, stop order, reload.
//! - `cli`: config errors, the socket's protection, secrets, the client without a daemon.
//! - `faults`: the fault matrix (signals at bad moments, full disk, control-plane and git
//!   server faults, misbehaving children): nothing lost, no token anywhere.
//! - `save`: save on stop through the daemon (SIGTERM, `wsagent save`, SIGUSR1, SIGKILL).
//! - `control`: reporting to the fake coderd, fresh tokens for the stop-time push.
//! - `startup`: directories, skeleton, dotfiles, one-time tasks, tasks in terminals, attach.
//! - `gitserver`: the test smart-HTTP git server itself.
//! - `real_services`: real dockerd and code-server supervised by wsagent.
//! - `containers`: the image of `Dockerfile.base` run by a real Docker engine.
//! - `template`: the Coder templates' wiring (token, init script, stop hooks, probes,
//!   deadlines, labels) and their generated `codertemplate.yaml`.
//! - `images`: the workspace images' files (entrypoint, healthcheck, shipped config).

mod cli;
mod containers;
mod control;
mod faults;
mod gitserver;
mod images;
mod pid1;
mod real_services;
mod repos;
mod save;
mod save_scale;
mod startup;
mod supervision;
mod support;
mod template;

/// The repository root (the workspace's top directory).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ has a parent")
        .to_path_buf()
}
