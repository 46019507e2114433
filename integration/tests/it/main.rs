//! wsagent's end-to-end suite: one test binary, one module per area. Tests run the real
//! `wsagent` binary (build it first: `cargo build -p agent --bins`; `scripts/test` does)
//! through the harness in the `integration` library, and read like specs.
//!
//! - `pid1`: init duties (reaping, exact exit codes, signals) as PID 1 and as subreaper.
//! - `supervision`: restart and backoff, dependencies and health checks, stop order, reload.
//! - `api`: the local API acts for the calling user (a real unprivileged uid against a
//!   root daemon) and caps and times its connections.
//! - `cli`: config errors, the socket's protection, secrets, the client without a daemon.
//! - `faults`: the fault matrix (signals at bad moments, full disk, control-plane and git
//!   server faults, misbehaving children): nothing lost, no token anywhere.
//! - `save`: save on stop through the daemon (SIGTERM, `wsagent save`, SIGUSR1, SIGKILL).
//! - `snapshots`: the snapshot history on the remote: whose work a push may replace, what
//!   the journal and `status` say about it, getting it back.
//! - `control`: reporting to the fake coderd, fresh tokens for the stop-time push.
//! - `startup`: directories, skeleton, dotfiles, one-time tasks, tasks in terminals, attach.
//! - `root_boundary`: a root daemon never follows the links of the HOME's unprivileged user.
//! - `save_output`: what `wsagent save` prints in a pipe, as JSON, on a terminal.
//! - `tables`: the CLI's tables (`status`, `tasks`) line up and say what they should.
//! - `gitserver`: the test smart-HTTP git server itself.
//! - `real_services`: real dockerd and code-server supervised by wsagent.
//! - `containers`: the image of `Dockerfile.base` run by a real Docker engine.
//! - `template`: the Coder templates' wiring (token, init script, stop hooks, probes,
//!   deadlines, labels) and their generated `codertemplate.yaml`.
//! - `logs`: `wsagent logs` of services, tasks and the daemon, by time.
//! - `metrics`: Prometheus metrics scraped over TCP and the local API.
//! - `images`: the workspace images' files (entrypoint, healthcheck, shipped config).

mod api;
mod cli;
mod containers;
mod control;
mod faults;
mod gitserver;
mod images;
mod logs;
mod metrics;
mod pid1;
mod real_services;
mod repos;
mod root_boundary;
mod save;
mod save_output;
mod save_scale;
mod snapshots;
mod startup;
mod supervision;
mod support;
mod tables;
mod template;

/// The repository root (the workspace's top directory).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ has a parent")
        .to_path_buf()
}
