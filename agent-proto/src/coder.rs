//! Bodies of Coder's agent HTTP API (`/api/v2/workspaceagents/me/*`), with the JSON
//! field names of `shared/reference/coder-agent-api.md`.
