//! Service output: split into lines, logged with the service name, appended with its
//! time (`crate::logline`) to a size-bounded rotated file, and broadcast to `wsagent logs -f` followers.
//!
//! Lines longer than [`MAX_LINE`] are cut into pieces, so a child printing megabytes
//! without a newline cannot grow memory.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;
use tokio::sync::broadcast;

pub const MAX_LINE: usize = 16 * 1024;

/// A per-service log file rotated at `max_bytes`, keeping `keep` old files
/// (`name.log.1` is the newest old one).
pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: Option<File>,
    size: u64,
    /// An open failure was logged (once, until an open succeeds again).
    open_failed: bool,
    /// Device and inode of the file last rotated to `name.log.1`.
    rotated: Option<(u64, u64)>,
}

impl RotatingFile {
    pub fn new(path: PathBuf, max_bytes: u64, keep: u32) -> RotatingFile {
        RotatingFile {
            path,
            max_bytes: max_bytes.max(1024),
            keep,
            file: None,
            size: 0,
            open_failed: false,
            rotated: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Device and inode of the files this process wrote: the one open, the one it last
    /// rotated to `name.log.1`. The local API shows a log file only when it is one of
    /// them (or the caller could read it anyway): a link or another file put at the
    /// path is not.
    pub fn own_files(&self) -> Vec<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let open = self
            .file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| (m.dev(), m.ino()));
        open.into_iter().chain(self.rotated).collect()
    }

    pub fn write_line(&mut self, line: &str) {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.write_bytes(&buf);
    }

    /// Append raw bytes (a terminal's output, say); rotates first when they would not fit.
    /// A piece larger than the limit goes whole into a fresh file.
    pub fn write_bytes(&mut self, data: &[u8]) {
        if self.file.is_some() && self.size > 0 && self.size + data.len() as u64 > self.max_bytes {
            self.rotate();
        }
        if self.file.is_none() {
            if let Some(dir) = self.path.parent() {
                let _ = crate::userfs::ensure_dir(dir, None);
            }
            // As the user under HOME and never through a link: a link in the log's place
            // is replaced (with a warning naming it), so a service's output cannot be
            // made to land in a file the link points at.
            match crate::userfs::open_append(&self.path, 0o640) {
                Ok(f) => {
                    self.size = f.metadata().map(|m| m.len()).unwrap_or(0);
                    self.file = Some(f);
                }
                Err(e) => {
                    if !self.open_failed {
                        tracing::error!(path = %self.path.display(), error = %e, "cannot open the log file; its lines are dropped");
                        self.open_failed = true;
                    }
                    return;
                }
            }
            self.open_failed = false;
            if self.size > 0 && self.size + data.len() as u64 > self.max_bytes {
                self.rotate();
                return self.write_bytes(data);
            }
        }
        if let Some(f) = &mut self.file
            && f.write_all(data).is_ok()
        {
            self.size += data.len() as u64;
        }
    }

    fn rotate(&mut self) {
        use std::os::unix::fs::MetadataExt;
        self.rotated = self
            .file
            .take()
            .and_then(|f| f.metadata().ok())
            .map(|m| (m.dev(), m.ino()))
            .filter(|_| self.keep > 0);
        self.size = 0;
        let name = |i: u32| PathBuf::from(format!("{}.{i}", self.path.display()));
        // Names in the log directory: links are moved or removed, never followed.
        if self.keep == 0 {
            let _ = crate::userfs::remove_file(&self.path);
            return;
        }
        let _ = crate::userfs::remove_file(&name(self.keep));
        for i in (1..self.keep).rev() {
            let _ = crate::userfs::rename(&name(i), &name(i + 1));
        }
        let _ = crate::userfs::rename(&self.path, &name(1));
    }
}

/// Where one service's lines go.
#[derive(Clone)]
pub struct Sink {
    pub service: String,
    pub file: Arc<Mutex<RotatingFile>>,
    pub follow: broadcast::Sender<String>,
}

impl Sink {
    pub fn new(service: &str, file: RotatingFile) -> Sink {
        // Followers (`wsagent logs -f`) that fall 256 lines behind skip ahead.
        let (follow, _) = broadcast::channel(256);
        Sink {
            service: service.into(),
            file: Arc::new(Mutex::new(file)),
            follow,
        }
    }

    pub fn line(&self, stream: &'static str, line: &str) {
        let line = crate::secrets::redact(line);
        tracing::info!(target: "wsagent::service", service = %self.service, stream, "{line}");
        // Stored with its time, for `wsagent logs --since/--timestamps`.
        let stored = crate::logline::stamp(&line);
        if let Ok(mut f) = self.file.lock() {
            f.write_line(&stored);
        }
        let _ = self.follow.send(stored);
    }
}

/// Read `fd` to its end, line by line, into `sink`.
pub async fn pump(fd: OwnedFd, stream: &'static str, sink: Sink) {
    let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut buf = vec![0u8; 8192];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match rx.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = pending.drain(..=pos).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            sink.line(stream, &String::from_utf8_lossy(&line));
        }
        while pending.len() >= MAX_LINE {
            let piece: Vec<u8> = pending.drain(..MAX_LINE).collect();
            sink.line(stream, &String::from_utf8_lossy(&piece));
        }
    }
    if !pending.is_empty() {
        sink.line(stream, &String::from_utf8_lossy(&pending));
    }
}

/// The last `n` lines of a service's log (current file, plus the newest rotated one
/// when the current one is short).
pub fn tail(path: &Path, n: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let rotated = PathBuf::from(format!("{}.1", path.display()));
    for p in [rotated.as_path(), path] {
        if let Ok(bytes) = crate::userfs::read(p) {
            lines.extend(String::from_utf8_lossy(&bytes).lines().map(String::from));
        }
    }
    let skip = lines.len().saturating_sub(n);
    lines.split_off(skip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_files_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("svc.log");
        let mut f = RotatingFile::new(p.clone(), 1024, 2);
        for i in 0..200 {
            f.write_line(&format!("line {i:04} ........................"));
        }
        let total: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(total <= 3 * 1024, "{total}");
        assert!(!dir.path().join("svc.log.3").exists());
        let t = tail(&p, 2);
        assert_eq!(
            t,
            [
                "line 0198 ........................",
                "line 0199 ........................"
            ]
        );
    }

    #[test]
    fn a_line_longer_than_the_limit_is_written_whole_not_looped_on() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("svc.log");
        let mut f = RotatingFile::new(p.clone(), 1024, 2);
        f.write_line("short");
        f.write_line(&"x".repeat(5000));
        f.write_line("after");
        assert_eq!(tail(&p, 1), ["after"]);
        let big = std::fs::read_to_string(format!("{}.1", p.display())).unwrap();
        assert_eq!(big.len(), 5001);
    }
}
