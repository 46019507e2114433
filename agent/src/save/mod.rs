//! Save on stop: commit and push every repository's unsaved work (issue 3).
//!
//! STUB: filled by the save work.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SaveConfig {}

/// Semantic checks of `[save]`: (dotted key, message) per problem.
pub fn validate(_cfg: &SaveConfig) -> Vec<(String, String)> {
    Vec::new()
}
