//! The startup pipeline's preparation steps and startup tasks (issue 5).
//!
//! STUB: filled by the startup-pipeline work. The daemon calls
//! [`before_services`] (directories, skeleton, dotfiles, git token, one-time tasks) and
//! [`after_services`] (startup tasks in pseudo-terminals), and merges [`routes`] into
//! the local API.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::daemon::Shared;

/// `[startup]`: directories and the skeleton.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StartupConfig {}

/// `[dotfiles]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DotfilesConfig {}

/// One `[[once]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct OnceConfig {}

/// One `[[task]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TaskConfig {}

/// Semantic checks of `[startup]`, `[dotfiles]`, `[[once]]`, `[[task]]`.
pub fn validate(_config: &crate::config::Config) -> Vec<(String, String)> {
    Vec::new()
}

/// Steps before the services start. Each step records itself with
/// `shared.record("startup", name, outcome, duration, message)`. An `Err` names the
/// failing step and makes the lifecycle `start_error` (services still start).
pub async fn before_services(_shared: &Arc<Shared>) -> Result<(), String> {
    Ok(())
}

/// Steps after the services started (startup tasks). Returns once every task with
/// `blocks_ready` has finished; `Err` names the failing task.
pub async fn after_services(_shared: &Arc<Shared>) -> Result<(), String> {
    Ok(())
}

/// Extra local API routes (tasks, attach).
pub fn routes() -> axum::Router<Arc<Shared>> {
    axum::Router::new()
}
