//! The save journal: one JSON line per save attempt in `<state_dir>/save-journal.jsonl`,
//! fsynced when it records work done, so the outcome of a save survives the container
//! that made it.
//!
//! A `started` line is written before a repository is touched and its outcome line
//! after; a repository whose last line is `started` was being saved when wsagent died
//! (SIGKILL at the end of the grace period), which [`previous_save_summary`] reports.
//!
//! Every record stands alone: a line torn by a crash mid-write (no final newline) is
//! ended before the next record is appended, never glued to it, and the reader skips
//! and counts every line that is not a whole record.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use agent_proto::save::RepoOutcome;
use agent_proto::save::SaveResult;

/// File name of the journal inside the state directory.
pub const JOURNAL_FILE: &str = "save-journal.jsonl";

/// Appends outcomes to the journal; safe to share between threads.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    lock: Mutex<()>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot append to the save journal {path}: {source}")]
pub struct JournalError {
    pub path: String,
    #[source]
    pub source: std::io::Error,
}

impl Journal {
    pub fn new(state_dir: &Path) -> Journal {
        Journal {
            path: state_dir.join(JOURNAL_FILE),
            lock: Mutex::new(()),
        }
    }

    /// Append one line (see [`Journal::append_all`]).
    pub fn append(&self, outcome: &RepoOutcome) -> Result<(), JournalError> {
        self.append_all(std::slice::from_ref(outcome))
    }

    /// Append several lines with one write, fsynced when one of them records work done
    /// (committed, pushed, failed...). A `started` line, or one that found nothing to do,
    /// is in the page cache at once, so a killed daemon (the end of a grace period) leaves
    /// it; only a crash of the machine itself could lose it, and with it nothing but the
    /// trace of an attempt. (An idle `wsagent save` then costs no disk flush.)
    pub fn append_all(&self, outcomes: &[RepoOutcome]) -> Result<(), JournalError> {
        let err = |source| JournalError {
            path: self.path.display().to_string(),
            source,
        };
        if outcomes.is_empty() {
            return Ok(());
        }
        let mut line = String::new();
        for o in outcomes {
            line.push_str(&serde_json::to_string(o).map_err(|e| err(e.into()))?);
            line.push('\n');
        }
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // As the user under HOME, never through a link (see crate::userfs).
        if let Some(dir) = self.path.parent() {
            crate::userfs::ensure_dir(dir, None).map_err(err)?;
        }
        let mut f = crate::userfs::open_append(&self.path, 0o644).map_err(err)?;
        // A torn last line (a crash mid-write) is ended first, so the new records do not
        // become its tail.
        let len = f.metadata().map_err(err)?.len();
        let mut last = [b'\n'];
        if len > 0 {
            f.read_exact_at(&mut last, len - 1).map_err(err)?;
        }
        if last[0] != b'\n' {
            line.insert(0, '\n');
        }
        // One write call: a crash leaves at most one torn last line, which the reader
        // skips.
        f.write_all(line.as_bytes()).map_err(err)?;
        if outcomes.iter().any(|o| {
            !matches!(
                o.result,
                SaveResult::Started | SaveResult::Clean | SaveResult::Unchanged
            )
        }) {
            f.sync_data().map_err(err)?;
        }
        Ok(())
    }
}

/// Past this size the journal is compacted to the latest line of each repository.
pub const COMPACT_AT: u64 = 1 << 20;

/// Rewrite a journal grown past [`COMPACT_AT`] to its latest line per repository
/// (atomically: a new file renamed over the old one).
pub fn compact_if_large(state_dir: &Path) -> Result<bool, JournalError> {
    let path = state_dir.join(JOURNAL_FILE);
    let err = |source| JournalError {
        path: path.display().to_string(),
        source,
    };
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_file() && m.len() > COMPACT_AT => {}
        _ => return Ok(false),
    }
    let mut text = String::new();
    for o in last_outcomes(state_dir) {
        text.push_str(&serde_json::to_string(&o).map_err(|e| err(e.into()))?);
        text.push('\n');
    }
    crate::userfs::write_atomic(&path, text.as_bytes(), 0o644).map_err(err)?;
    Ok(true)
}

/// Every readable line of the journal, oldest first (torn or foreign lines skipped).
pub fn read_journal(state_dir: &Path) -> Vec<RepoOutcome> {
    read_journal_counted(state_dir).0
}

/// Every readable line of the journal, oldest first, and how many lines were skipped
/// because they are not a whole record (torn by a crash mid-write, or foreign). Bytes,
/// not text: a line torn inside a multi-byte character spoils only itself.
pub fn read_journal_counted(state_dir: &Path) -> (Vec<RepoOutcome>, usize) {
    let Ok(bytes) = crate::userfs::read(&state_dir.join(JOURNAL_FILE)) else {
        return (Vec::new(), 0);
    };
    let mut skipped = 0;
    let mut out = Vec::new();
    for l in bytes.split(|b| *b == b'\n') {
        if l.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<RepoOutcome>(l) {
            Ok(o) => out.push(o),
            Err(_) => skipped += 1,
        }
    }
    (out, skipped)
}

/// The latest journal line of each repository, sorted by repository path.
pub fn last_outcomes(state_dir: &Path) -> Vec<RepoOutcome> {
    let mut by_repo: BTreeMap<String, RepoOutcome> = BTreeMap::new();
    for o in read_journal(state_dir) {
        by_repo.insert(o.repo.clone(), o);
    }
    by_repo.into_values().collect()
}

/// The latest finished (not `started`) outcome of each repository.
pub(crate) fn last_finished(state_dir: &Path) -> BTreeMap<String, RepoOutcome> {
    let mut by_repo = BTreeMap::new();
    for o in read_journal(state_dir) {
        if o.result != SaveResult::Started {
            by_repo.insert(o.repo.clone(), o);
        }
    }
    by_repo
}

/// What the saves of each repository pushed, per remote ref: the latest commit the
/// journal says reached it (the lease of the next snapshot push, see `lease.rs`).
pub(crate) fn last_pushed(state_dir: &Path) -> BTreeMap<String, BTreeMap<String, git2::Oid>> {
    let mut out: BTreeMap<String, BTreeMap<String, git2::Oid>> = BTreeMap::new();
    for o in read_journal(state_dir) {
        if let (true, Some(r), Some(c)) = (o.pushed, &o.r#ref, &o.commit)
            && let Ok(c) = git2::Oid::from_str(c)
        {
            out.entry(o.repo.clone()).or_default().insert(r.clone(), c);
        }
    }
    out
}

/// One line on how the last save went, for the next start and `wsagent status`;
/// flags repositories whose save was interrupted. `None` without a journal.
pub fn previous_save_summary(state_dir: &Path) -> Option<String> {
    let (all, skipped) = read_journal_counted(state_dir);
    let mut by_repo: BTreeMap<String, RepoOutcome> = BTreeMap::new();
    for o in all {
        by_repo.insert(o.repo.clone(), o);
    }
    let last: Vec<RepoOutcome> = by_repo.into_values().collect();
    if last.is_empty() && skipped == 0 {
        return None;
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for o in &last {
        *counts.entry(o.result.as_str()).or_default() += 1;
    }
    let order = [
        ("pushed", "pushed"),
        ("unchanged", "unchanged"),
        ("clean", "clean"),
        ("committed", "committed but not pushed"),
        ("failed", "failed"),
    ];
    let mut parts: Vec<String> = order
        .iter()
        .filter_map(|(k, label)| counts.get(k).map(|n| format!("{n} {label}")))
        .collect();
    if parts.is_empty() {
        parts.push("nothing finished".into());
    }
    let mut s = format!("last save: {}", parts.join(", "));
    let interrupted: Vec<&str> = last
        .iter()
        .filter(|o| o.result == SaveResult::Started)
        .map(|o| o.repo.as_str())
        .collect();
    if !interrupted.is_empty() {
        s.push_str(&format!(
            "; INTERRUPTED: {} repositor{} still being saved when wsagent stopped: {}",
            interrupted.len(),
            if interrupted.len() == 1 {
                "y was"
            } else {
                "ies were"
            },
            interrupted.join(", ")
        ));
    }
    let failed: Vec<String> = last
        .iter()
        .filter(|o| o.result == SaveResult::Failed || o.result == SaveResult::Committed)
        .map(|o| {
            format!(
                "{} ({})",
                o.repo,
                o.error.as_deref().unwrap_or("not pushed")
            )
        })
        .collect();
    if !failed.is_empty() {
        s.push_str(&format!("; not on the remote: {}", failed.join(", ")));
    }
    if skipped > 0 {
        s.push_str(&format!(
            "; {skipped} torn journal line{} skipped",
            if skipped == 1 { "" } else { "s" }
        ));
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(repo: &str, result: &str) -> RepoOutcome {
        RepoOutcome {
            repo: repo.into(),
            result: result.parse().unwrap(),
            ..Default::default()
        }
    }

    #[test]
    fn a_repo_left_at_started_is_reported_as_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        j.append(&line("/a", "started")).unwrap();
        j.append(&line("/a", "pushed")).unwrap();
        j.append(&line("/b", "started")).unwrap();
        let last = last_outcomes(dir.path());
        assert_eq!(last.len(), 2);
        assert_eq!(last[0].result, "pushed");
        assert_eq!(last[1].result, "started");
        let s = previous_save_summary(dir.path()).unwrap();
        assert!(s.contains("1 pushed"), "{s}");
        assert!(s.contains("INTERRUPTED"), "{s}");
        assert!(s.contains("/b"), "{s}");
    }

    #[test]
    fn a_large_journal_is_compacted_to_the_latest_line_per_repo() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        let mut big = line("/a", "pushed");
        big.note = Some("x".repeat(4096));
        for _ in 0..300 {
            j.append_all(&[line("/a", "started"), big.clone()]).unwrap();
        }
        j.append(&line("/b", "committed")).unwrap();
        assert!(compact_if_large(dir.path()).unwrap());
        let all = read_journal(dir.path());
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].result, "pushed");
        assert!(!compact_if_large(dir.path()).unwrap());
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_no_journal_means_no_summary() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(previous_save_summary(dir.path()), None);
        let j = Journal::new(dir.path());
        j.append(&line("/a", "clean")).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(JOURNAL_FILE))
            .unwrap();
        f.write_all(b"{\"at\":\"x\",\"re").unwrap();
        assert_eq!(last_outcomes(dir.path()).len(), 1);
        // The next record is not glued to the torn line.
        j.append(&line("/b", "started")).unwrap();
        let (all, skipped) = read_journal_counted(dir.path());
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].result, "started");
        assert_eq!(skipped, 1);
    }
}
