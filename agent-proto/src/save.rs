//! The outcome of saving one repository's work, as written to the save journal,
//! returned by the local API and sent as an event.

use serde::{Deserialize, Serialize};

/// One attempt to save one repository: one line of `save-journal.jsonl`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RepoOutcome {
    /// RFC 3339 time the attempt started.
    pub at: String,
    /// Worktree (or bare repo) path.
    pub repo: String,
    /// `snapshot` or `branch`.
    pub mode: String,
    /// Why the save ran: `stop`, `manual`, `signal`.
    pub reason: String,
    /// `started` (written before work begins; a journal whose last line for a repo is
    /// `started` marks an interrupted save), `clean` (nothing to save), `pushed`,
    /// `committed` (local commit, not pushed), `unchanged` (already pushed), `failed`,
    /// or `would-save` (a dry run found unsaved work; never journaled).
    pub result: String,
    pub commit: Option<String>,
    pub r#ref: Option<String>,
    /// Remote URL pushed to (never carries credentials).
    pub remote: Option<String>,
    pub pushed: bool,
    /// Files left out of the commit (too large, unreadable), with the reason.
    #[serde(default)]
    pub left_out: Vec<String>,
    /// A dry run: the paths that would be saved, each after `git status --short`'s two
    /// letters (at most 200, then a count). Never journaled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    pub error: Option<String>,
    pub duration_ms: u64,
    /// Tree of the saved worktree (what the idempotence check compares).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree: Option<String>,
    /// HEAD when the save ran (the parent of a snapshot commit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    /// What happened beyond the result, for a human: a fallback taken, an odd repo
    /// state met (mid-merge, detached HEAD, no remote).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}
