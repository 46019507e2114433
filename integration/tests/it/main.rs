//! wsagent's end-to-end suite: one test binary, one module per area. Tests run the real
//! `wsagent` binary (build it first: `cargo build -p agent --bins`; `scripts/test` does)
//! through the harness in the `integration` library, and read like specs.
//!
//! - `real_services`: real dockerd and code-server supervised by wsagent.
//! - `template`: the Coder template's wiring (token, init script, stop hooks, deadlines).
//! - `images`: the workspace images' files (entrypoint, healthcheck, shipped config).

mod images;
mod real_services;
mod template;

/// The repository root (the workspace's top directory).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ has a parent")
        .to_path_buf()
}
