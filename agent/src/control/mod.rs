//! Control plane: reports to Coder and keeps git tokens fresh (issue 4).
//!
//! STUB: filled by the control-plane work.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ControlPlaneConfig {}

/// Semantic checks of `[control_plane]`: (dotted key, message) per problem.
pub fn validate(_cfg: &ControlPlaneConfig) -> Vec<(String, String)> {
    Vec::new()
}
