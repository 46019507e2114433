//! Noticing that a few files changed, by polling their metadata.
//!
//! Not inotify: closing an inotify instance makes the kernel wait for an RCU grace
//! period, and the exit of the process waited for it (see SIGTERM → exit in
//! `scripts/bench`). A `stat` of two or three files a second costs little,
//! needs no thread, and sees a file replaced by a rename (what editors and wsagent's own
//! atomic writes do) as well as one written in place, and one that appears later.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often watched files are looked at.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// What a change of the file at a path changes: its identity, size or times.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn stamp(p: &Path) -> Option<Stamp> {
    std::fs::metadata(p).ok().map(|m| Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// Look at `paths` every `interval` until `cancel`; `changed(i)` is called for each path
/// whose file appeared, disappeared, was replaced or written since the call (the first
/// look is made by the call itself, not when the future first runs).
pub fn poll(
    paths: Vec<PathBuf>,
    interval: Duration,
    cancel: CancellationToken,
    changed: impl FnMut(usize),
) -> impl std::future::Future<Output = ()> {
    let last: Vec<Option<Stamp>> = paths.iter().map(|p| stamp(p)).collect();
    poll_from(paths, last, interval, cancel, changed)
}

async fn poll_from(
    paths: Vec<PathBuf>,
    mut last: Vec<Option<Stamp>>,
    interval: Duration,
    cancel: CancellationToken,
    mut changed: impl FnMut(usize),
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (i, p) in paths.iter().enumerate() {
            let now = stamp(p);
            if now != last[i] {
                last[i] = now;
                changed(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test(start_paused = true)]
    async fn a_write_a_replace_a_removal_and_a_creation_are_each_seen_once() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.toml"), dir.path().join("b"));
        std::fs::write(&a, "one").unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let (seen, cancel) = (seen.clone(), cancel.clone());
            poll(vec![a.clone(), b.clone()], INTERVAL, cancel, move |i| {
                seen.lock().unwrap().push(i)
            })
        });
        let step = || tokio::time::sleep(INTERVAL + Duration::from_millis(10));
        step().await;
        assert!(seen.lock().unwrap().is_empty(), "nothing changed yet");
        std::fs::write(&a, "second").unwrap(); // written in place
        step().await;
        let tmp = dir.path().join("a.tmp");
        std::fs::write(&tmp, "two").unwrap();
        std::fs::rename(&tmp, &a).unwrap(); // replaced by rename, same content
        step().await;
        std::fs::write(&b, "new").unwrap();
        std::fs::remove_file(&a).unwrap();
        step().await;
        step().await;
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![0, 0, 0, 1]);
    }
}
