//! Logging: human lines on stderr, JSON lines in a size-capped, rotated file in the state
//! directory (without the services' output, which has its own logs), both passed
//! through the redaction of [`crate::secrets`].

use std::io::{self, Write};
use std::path::Path;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// A writer that masks every registered secret in what passes through it. The fmt
/// layer writes each event with one `write` call, so a secret is never split.
pub struct Redacting<W>(pub W);

impl<W: Write> Write for Redacting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let red = crate::secrets::redact(&text);
        self.0.write_all(red.as_bytes())?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[derive(Clone)]
pub struct RedactingMake<M>(pub M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for RedactingMake<M> {
    type Writer = Redacting<M::Writer>;
    fn make_writer(&'a self) -> Self::Writer {
        Redacting(self.0.make_writer())
    }
}

/// Writes (and rotations) of the daemon's log file with the user's filesystem ids.
struct AsUser<W> {
    inner: W,
    user: Option<crate::userfs::Ids>,
}

impl<W: Write> Write for AsUser<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let inner = &mut self.inner;
        crate::userfs::as_user(self.user, || inner.write(buf))
    }
    fn flush(&mut self) -> io::Result<()> {
        let inner = &mut self.inner;
        crate::userfs::as_user(self.user, || inner.flush())
    }
}

/// The daemon's log file is rotated past this size...
const LOG_FILE_BYTES: usize = 10 * 1024 * 1024;
/// ...and this many rotated files are kept: at most ~50 MiB in all.
const LOG_FILES_KEPT: usize = 4;

/// Lines the log file writer may queue before new lines are dropped (and counted).
const LOG_LINES_IN_FLIGHT: usize = 4096;

/// Keeps the file writer alive; dropping it flushes the file.
pub struct Guard(#[allow(dead_code)] Option<tracing_appender::non_blocking::WorkerGuard>);

fn filter(level: &str) -> EnvFilter {
    let base = match crate::config::parse_level(level) {
        Some(l) => l.to_string().to_ascii_lowercase(),
        None => level.to_string(),
    };
    EnvFilter::try_new(format!(
        "{base},hyper=warn,reqwest=warn,h2=warn,rustls=warn"
    ))
    .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Logging for the daemon: stderr and `<state_dir>/wsagent.log` (JSON, rotated by size).
pub fn init_daemon(level: &str, state_dir: &Path) -> Guard {
    let stderr_layer = tracing_subscriber::fmt::layer()
        .with_writer(RedactingMake(io::stderr))
        .with_ansi(std::io::IsTerminal::is_terminal(&io::stderr()))
        .with_target(false)
        .with_filter(filter(level));
    let mut guard = None;
    // Under HOME the file is the user's: made, written and rotated with the user's
    // filesystem ids (see crate::userfs), so a state dir behind a link to a root
    // directory gets nothing from the daemon.
    let user = crate::userfs::user_for(state_dir);
    let log_path = state_dir.join("wsagent.log");
    let file_layer = match crate::userfs::ensure_dir(state_dir, None).and_then(|_| {
        if std::fs::symlink_metadata(&log_path).is_ok_and(|m| m.file_type().is_symlink()) {
            eprintln!(
                "wsagent: {} is a symbolic link; wsagent never writes through a link: replaced by a regular file",
                log_path.display()
            );
            crate::userfs::remove_file(&log_path)?;
        }
        // Capped by size, not by day: LOG_FILE_BYTES a file, LOG_FILES_KEPT older ones
        // (`wsagent.log.1` newest). Opened without following a link (and without
        // blocking on a fifo), owner-only.
        use std::os::unix::fs::OpenOptionsExt;
        let mut opts = std::fs::OpenOptions::new();
        opts.append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK);
        crate::userfs::as_user(user, || {
            let f = file_rotate::FileRotate::new(
                &log_path,
                file_rotate::suffix::AppendCount::new(LOG_FILES_KEPT),
                file_rotate::ContentLimit::BytesSurpassed(LOG_FILE_BYTES),
                file_rotate::compression::Compression::None,
                Some(opts),
            );
            // Opened, or refused (a link put back, a root directory behind a link).
            crate::userfs::open_read(&log_path)?;
            Ok(AsUser { inner: f, user })
        })
    }) {
        Ok(appender) => {
            // 4096 lines in flight, not the default 128 000: that default's channel
            // is allocated whole at start and would be much of the idle RSS.
            let (nb, g) = tracing_appender::non_blocking::NonBlockingBuilder::default()
                .buffered_lines_limit(LOG_LINES_IN_FLIGHT)
                .thread_name("wsagent-logfile")
                .finish(appender);
            guard = Some(g);
            // Service output is in the service logs (and on stderr, for `docker logs`),
            // not a second time in this file.
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(RedactingMake(nb))
                    .with_filter(filter(&format!("{level},wsagent::service=off"))),
            )
        }
        Err(e) => {
            eprintln!(
                "wsagent: cannot open the log file in {}: {e}",
                state_dir.display()
            );
            None
        }
    };
    let _ = tracing_subscriber::registry()
        .with(stderr_layer)
        .with(file_layer)
        .try_init();
    Guard(guard)
}

/// Logging for CLI commands: warnings and errors on stderr.
pub fn init_cli() {
    let _ = tracing_subscriber::fmt()
        .with_writer(RedactingMake(io::stderr))
        .with_target(false)
        .with_env_filter(filter("warn"))
        .try_init();
}
