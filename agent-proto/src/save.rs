//! The outcome of saving one repository's work, as written to the save journal,
//! returned by the local API and sent as an event.

use serde::{Deserialize, Serialize};

/// Defines a string-like enum: serialized in kebab-case (the journal and the wire keep
/// their bytes), shown as that text, and comparable with a `&str`.
macro_rules! text_enum {
    ($(#[$m:meta])* pub enum $name:ident { $($(#[$vm:meta])* $v:ident => $s:literal,)+ }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "kebab-case")]
        pub enum $name { $($(#[$vm])* $v,)+ }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $($name::$v => $s,)+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok($name::$v),)+
                    _ => Err(format!("{s:?} is not a {}", stringify!($name))),
                }
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

text_enum! {
    /// What became of one repository's work.
    pub enum SaveResult {
        /// Written before work begins; a journal whose last line for a repository is
        /// `started` marks an interrupted save.
        #[default]
        Started => "started",
        /// Nothing to save.
        Clean => "clean",
        /// Committed and pushed.
        Pushed => "pushed",
        /// Committed locally, not pushed.
        Committed => "committed",
        /// Already pushed, and the remote still has it.
        Unchanged => "unchanged",
        Failed => "failed",
        /// A dry run found unsaved work (never journaled).
        WouldSave => "would-save",
    }
}

text_enum! {
    /// How unsaved work is saved.
    pub enum SaveMode {
        /// One commit of the whole worktree on the snapshot ref; HEAD, index and worktree
        /// untouched.
        #[default]
        Snapshot => "snapshot",
        /// Stage all, commit on the current branch, push to its upstream; the snapshot ref
        /// when that cannot be done.
        Branch => "branch",
    }
}

text_enum! {
    /// Why a save runs.
    pub enum SaveReason {
        /// The workspace is stopping.
        Stop => "stop",
        /// `wsagent save` by hand.
        #[default]
        Manual => "manual",
        /// SIGUSR1.
        Signal => "signal",
        /// `save.checkpoint`: the periodic save while the workspace runs.
        Checkpoint => "checkpoint",
    }
}

/// One attempt to save one repository: one line of `save-journal.jsonl`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RepoOutcome {
    /// RFC 3339 time the attempt started.
    pub at: String,
    /// Worktree (or bare repo) path.
    pub repo: String,
    pub mode: SaveMode,
    /// Why the save ran.
    pub reason: SaveReason,
    pub result: SaveResult,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A journal written before these fields were enums (each field as the old code
    /// wrote it) reads, compares and writes back byte for byte.
    #[test]
    fn an_old_journal_reads_and_writes_back_the_same_bytes() {
        let old = [
            r#"{"at":"2026-11-20T10:00:00.000Z","repo":"/home/coder/projects/app","mode":"snapshot","reason":"stop","result":"started","commit":null,"ref":null,"remote":null,"pushed":false,"left_out":[],"error":null,"duration_ms":0}"#,
            r#"{"at":"2026-11-20T10:00:01.000Z","repo":"/home/coder/projects/app","mode":"branch","reason":"checkpoint","result":"pushed","commit":"0123456789abcdef0123456789abcdef01234567","ref":"refs/heads/wip/ws/main","remote":"https://git.example/app.git","pushed":true,"left_out":["big.bin (too large)"],"error":null,"duration_ms":812,"tree":"89abcdef0123456789abcdef0123456789abcdef"}"#,
            r#"{"at":"2026-11-20T10:00:02.000Z","repo":"/srv/x","mode":"snapshot","reason":"signal","result":"would-save","commit":null,"ref":null,"remote":null,"pushed":false,"left_out":[],"error":"no remote","duration_ms":3}"#,
        ];
        let read: Vec<RepoOutcome> = old
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(read[0].result, SaveResult::Started);
        assert_eq!(read[1].mode, SaveMode::Branch);
        assert_eq!(read[1].reason, SaveReason::Checkpoint);
        assert_eq!(read[2].result, SaveResult::WouldSave);
        assert!(read[1].result == "pushed" && read[2].reason == "signal");
        for (line, o) in old.iter().zip(&read) {
            assert_eq!(serde_json::to_string(o).unwrap(), *line);
        }
        // A value no version wrote is refused with its name.
        let bad = old[0].replace("\"started\"", "\"exploded\"");
        let e = serde_json::from_str::<RepoOutcome>(&bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("exploded"), "{e}");
        assert_eq!(
            "would-save".parse::<SaveResult>(),
            Ok(SaveResult::WouldSave)
        );
        assert!("nope".parse::<SaveReason>().is_err());
    }
}
