//! One save, shared by everyone who asked for it.
//!
//! A save already running is joined, never queued behind nor refused: a `wsagent save`
//! during the stop sequence (the Coder agent's `shutdown_script` runs only after wsagent
//! has saved and SIGTERMed it), a second `wsagent save` during a first, `shutdown
//! --wait` during a stop. Each of them follows the same [`SaveRun`]: the repositories it
//! found, each outcome as it lands, then the end. A run that has ended keeps its result,
//! so the stop sequence's save is reported to whoever asks after it, not repeated.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use agent_proto::save::RepoOutcome;
use tokio::sync::watch;

/// What a run has done so far.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Repositories found, once discovery is done.
    pub total: Option<usize>,
    /// Outcomes in the order they landed.
    pub outcomes: Vec<RepoOutcome>,
    /// Set once, when the run has ended: every outcome (sorted by path), or why the save
    /// could not run at all.
    pub done: Option<Result<Vec<RepoOutcome>, String>>,
}

/// A save in progress (or ended), observed through a watch channel.
pub struct SaveRun {
    pub reason: crate::save::Reason,
    /// Only the repository containing this path; `None`: every repository.
    pub only: Option<PathBuf>,
    pub dry_run: bool,
    /// Done with the permissions of the user who asked ([`crate::save::SaveRequest::act_as`]).
    pub act_as: Option<crate::save::fsids::Ids>,
    tx: watch::Sender<Progress>,
}

impl SaveRun {
    /// A run, done with the permissions of `act_as` when given.
    pub fn new(
        reason: crate::save::Reason,
        only: Option<PathBuf>,
        dry_run: bool,
        act_as: Option<crate::save::fsids::Ids>,
    ) -> Arc<SaveRun> {
        Arc::new(SaveRun {
            reason,
            only,
            dry_run,
            act_as,
            tx: watch::Sender::new(Progress::default()),
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.tx.subscribe()
    }

    pub fn is_done(&self) -> bool {
        self.tx.borrow().done.is_some()
    }

    /// Whether this run saves what a request for `only` asks (a dry run saves nothing).
    pub fn covers(&self, only: Option<&Path>) -> bool {
        !self.dry_run
            && match (&self.only, only) {
                (None, _) => true,
                (Some(a), Some(b)) => a == b,
                (Some(_), None) => false,
            }
    }

    /// End the run (once; later calls are ignored).
    pub fn finish(&self, result: Result<Vec<RepoOutcome>, String>) {
        self.tx.send_if_modified(|p| {
            if p.done.is_some() {
                return false;
            }
            if p.total.is_none() {
                p.total = Some(result.as_ref().map(|o| o.len()).unwrap_or(0));
            }
            p.done = Some(result);
            true
        });
    }

    /// Wait for the end of the run.
    pub async fn wait(&self) -> Result<Vec<RepoOutcome>, String> {
        let mut rx = self.subscribe();
        match rx.wait_for(|p| p.done.is_some()).await {
            Ok(p) => p
                .done
                .clone()
                .unwrap_or_else(|| Err("the save ended".into())),
            // The sender lives in `self`: it cannot be dropped while we borrow it.
            Err(_) => Err("the save was abandoned".into()),
        }
    }
}

impl crate::save::Observer for SaveRun {
    fn found(&self, repos: usize) {
        self.tx.send_modify(|p| p.total = Some(repos));
    }

    fn saved(&self, outcome: &RepoOutcome) {
        self.tx.send_modify(|p| p.outcomes.push(outcome.clone()));
    }
}

/// Whether `outcome` is the save of the repository containing `path` (for a request
/// about one repository that joined a save of all of them).
pub fn is_of(outcome: &RepoOutcome, path: &Path) -> bool {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    path.starts_with(Path::new(&outcome.repo))
}

/// Of `outcomes`, those of the repository containing `only` (the deepest match: a
/// submodule's path is inside its parent's), or all of them.
pub fn select<'a>(outcomes: &'a [RepoOutcome], only: Option<&Path>) -> Vec<&'a RepoOutcome> {
    let Some(only) = only else {
        return outcomes.iter().collect();
    };
    let deepest = outcomes
        .iter()
        .filter(|o| is_of(o, only))
        .max_by_key(|o| o.repo.len());
    deepest.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::save::{Observer, Reason};

    fn outcome(repo: &str, result: &str) -> RepoOutcome {
        RepoOutcome {
            repo: repo.into(),
            result: result.parse().unwrap(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_joiner_sees_the_outcomes_that_landed_before_it_and_the_end() {
        let run = SaveRun::new(Reason::Stop, None, false, None);
        run.found(2);
        run.saved(&outcome("/p/a", "pushed"));
        let mut rx = run.subscribe();
        assert_eq!(rx.borrow_and_update().outcomes.len(), 1);
        run.saved(&outcome("/p/b", "clean"));
        run.finish(Ok(vec![
            outcome("/p/a", "pushed"),
            outcome("/p/b", "clean"),
        ]));
        let end = run.wait().await.unwrap();
        assert_eq!(end.len(), 2);
        // A second end changes nothing.
        run.finish(Err("late".into()));
        assert_eq!(run.wait().await.unwrap().len(), 2);
    }

    #[test]
    fn a_run_of_everything_covers_any_repository_a_run_of_one_only_that_one() {
        let all = SaveRun::new(Reason::Manual, None, false, None);
        assert!(all.covers(None) && all.covers(Some(Path::new("/p/a"))));
        let one = SaveRun::new(Reason::Manual, Some("/p/a".into()), false, None);
        assert!(one.covers(Some(Path::new("/p/a"))));
        assert!(!one.covers(None) && !one.covers(Some(Path::new("/p/b"))));
        let dry = SaveRun::new(Reason::Manual, None, true, None);
        assert!(!dry.covers(None));
    }

    #[test]
    fn select_picks_the_deepest_repository_containing_the_path() {
        let all = [
            outcome("/p/app", "pushed"),
            outcome("/p/app/vendor/lib", "clean"),
            outcome("/p/other", "failed"),
        ];
        let got = select(&all, Some(Path::new("/p/app/vendor/lib/src")));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].repo, "/p/app/vendor/lib");
        assert_eq!(
            select(&all, Some(Path::new("/p/app/src")))[0].repo,
            "/p/app"
        );
        assert!(select(&all, Some(Path::new("/elsewhere"))).is_empty());
        assert_eq!(select(&all, None).len(), 3);
    }
}
