//! Bodies of Coder's agent HTTP API (`/api/v2/workspaceagents/me/*`), with the JSON
//! field names of `shared/reference/coder-agent-api.md`.
//!
//! Only the routes wsagent uses are here: the log source and logs (§3.1, §3.3), external
//! auth (§3.4), app status (§3.1) and the error body every route answers with
//! (`codersdk.Response`, §1.2). Fields the server may omit default to empty, so a body
//! from an older or newer coderd still decodes.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The route prefix of every agent call.
pub const AGENT_ME: &str = "/api/v2/workspaceagents/me";

/// The header carrying the agent token (`codersdk.SessionTokenHeader`).
pub const SESSION_TOKEN_HEADER: &str = "Coder-Session-Token";

/// The cookie the server also accepts the token from.
pub const SESSION_TOKEN_COOKIE: &str = "coder_session_token";

/// Total log output per agent, in bytes (the `max_logs_length` DB constraint, §7).
pub const MAX_LOGS_LENGTH: usize = 1 << 20;

/// Bytes counted per log line on top of its output when sizing a batch (Go `LogSender`).
pub const OVERHEAD_PER_LOG: usize = 21;

/// The largest batch, counting [`OVERHEAD_PER_LOG`] per line.
pub const MAX_BYTES_PER_BATCH: usize = 1 << 20;

/// The legacy "External" log source, used for logs sent with a nil `log_source_id`.
pub const EXTERNAL_LOG_SOURCE_ID: Uuid = Uuid::from_u128(0x3b579bf4_1ed8_4b99_87a8_e9a1e3410410);

/// Log levels the server accepts; an empty level means `info`.
pub const LOG_LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error"];

/// App status states the server accepts.
pub const APP_STATES: &[&str] = &["complete", "failure", "working", "idle"];

/// `POST /me/log-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostLogSourceRequest {
    pub id: Uuid,
    pub display_name: String,
    pub icon: String,
}

/// The 201 answer of `POST /me/log-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceAgentLogSource {
    #[serde(default)]
    pub workspace_agent_id: Uuid,
    pub id: Uuid,
    /// RFC 3339.
    #[serde(default)]
    pub created_at: String,
    #[serde(default)]
    pub display_name: String,
    #[serde(default)]
    pub icon: String,
}

/// One line of `PATCH /me/logs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Log {
    /// RFC 3339; the server ignores it and stamps the batch itself.
    pub created_at: String,
    pub output: String,
    /// One of [`LOG_LEVELS`]; empty means `info`. A string, not an enum, so that a
    /// server (the fake coderd) can see and reject an unknown level as coderd does.
    #[serde(default)]
    pub level: String,
}

/// `PATCH /me/logs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchLogs {
    /// Nil means the "External" source ([`EXTERNAL_LOG_SOURCE_ID`]).
    #[serde(default)]
    pub log_source_id: Uuid,
    #[serde(default)]
    pub logs: Vec<Log>,
}

/// The answer of `GET /me/external-auth`: either a token, or only `url` (the page where
/// the user links the account).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ExternalAuthResponse {
    pub access_token: String,
    pub token_extra: Option<serde_json::Value>,
    pub url: String,
    /// The provider type (`github`, `gitlab`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// Legacy form: depends on the provider type (§3.4).
    pub username: String,
    pub password: String,
    /// When the token expires (RFC 3339), in newer Coder; the zero time
    /// ([`ZERO_TIME`]) means no expiry. Absent or null in older Coder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// Go's zero `time.Time` as JSON: an `expires_at` meaning "never".
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// `PATCH /me/app-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchAppStatus {
    pub app_slug: String,
    /// One of [`APP_STATES`].
    pub state: String,
    pub message: String,
    #[serde(default)]
    pub uri: String,
}

/// One invalid field of a request (`codersdk.ValidationError`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidationError {
    pub field: String,
    pub detail: String,
}

/// The body of every error answer (`codersdk.Response`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Response {
    pub message: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub validations: Vec<ValidationError>,
}

impl Response {
    pub fn new(message: impl Into<String>, detail: impl Into<String>) -> Response {
        Response {
            message: message.into(),
            detail: detail.into(),
            validations: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_follow_the_reference() {
        let r: ExternalAuthResponse = serde_json::from_str(
            r#"{"access_token":"t","token_extra":null,"url":"","type":"github","username":"t","password":""}"#,
        )
        .unwrap();
        assert_eq!(r.kind, "github");
        let v = serde_json::to_value(&r).unwrap();
        assert!(v.get("type").is_some() && v.get("kind").is_none());
        assert_eq!(r.expires_at, None);
        let r: ExternalAuthResponse =
            serde_json::from_str(r#"{"access_token":"t","expires_at":"2026-08-01T10:00:00Z"}"#)
                .unwrap();
        assert_eq!(r.expires_at.as_deref(), Some("2026-08-01T10:00:00Z"));
        let p = PatchLogs {
            log_source_id: Uuid::nil(),
            logs: vec![Log {
                created_at: "2026-01-01T00:00:00Z".into(),
                output: "x".into(),
                level: "info".into(),
            }],
        };
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"log_source_id":"00000000-0000-0000-0000-000000000000","logs":[{"created_at":"2026-01-01T00:00:00Z","output":"x","level":"info"}]}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::new("m", "")).unwrap(),
            r#"{"message":"m"}"#
        );
        assert_eq!(
            EXTERNAL_LOG_SOURCE_ID.to_string(),
            "3b579bf4-1ed8-4b99-87a8-e9a1e3410410"
        );
    }
}
