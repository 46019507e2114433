//! A stored log line and its time: service output is written to its log file as
//! `<RFC 3339 UTC, milliseconds> <line>`, so `wsagent logs --since/--timestamps` can
//! filter and show the time later; the daemon's own log (JSON lines from `tracing`) is
//! rendered to the same shape. A line without a stamp (a file written before stamps
//! existed, a terminal's output) is kept and shown as it is.
//!
//! A leaf: imports nothing of the crate.

use std::time::SystemTime;

/// `2026-12-03T16:15:31.123Z`: fixed width, so times of this form compare as text.
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// The line as stored: its time, a space, the line.
pub fn stamp(line: &str) -> String {
    format!("{} {line}", now())
}

/// A stored line's time (when it has one) and text.
pub fn split(stored: &str) -> (Option<&str>, &str) {
    const LEN: usize = "2026-12-03T16:15:31.123Z".len();
    let b = stored.as_bytes();
    if b.len() > LEN
        && b[LEN] == b' '
        && b[LEN - 1] == b'Z'
        && b[10] == b'T'
        && b[..4].iter().all(u8::is_ascii_digit)
    {
        (Some(&stored[..LEN]), &stored[LEN + 1..])
    } else {
        (None, stored)
    }
}

/// What `wsagent logs` wants of the lines.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Only lines at or after this time (RFC 3339 UTC, as [`now`] writes it).
    pub since: Option<String>,
    /// Show each line's time.
    pub timestamps: bool,
}

impl View {
    /// The line to show for `stored`, or `None` when it is before `since`. An unstamped
    /// line is shown (its time is unknown, so it is not filtered out).
    pub fn render(&self, stored: &str) -> Option<String> {
        let (at, text) = split(stored);
        if let (Some(since), Some(at)) = (&self.since, at)
            && at < since.as_str()
        {
            return None;
        }
        Some(match (self.timestamps, at) {
            (true, Some(at)) => format!("{at} {text}"),
            _ => text.to_string(),
        })
    }
}

/// One JSON line of the daemon's log as a stored line: `<time> <LEVEL> <message>
/// key=value ...` (its time kept, at millisecond precision), or the line itself when it
/// is not such JSON.
pub fn from_daemon_json(line: &str) -> String {
    let Ok(serde_json::Value::Object(v)) = serde_json::from_str::<serde_json::Value>(line) else {
        return line.to_string();
    };
    let at = v
        .get("timestamp")
        .and_then(|t| t.as_str())
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        .map(|t| humantime::format_rfc3339_millis(t).to_string());
    let level = v.get("level").and_then(|l| l.as_str()).unwrap_or("");
    let mut text = format!("{level:<5}");
    if let Some(serde_json::Value::Object(fields)) = v.get("fields") {
        if let Some(m) = fields.get("message") {
            text.push(' ');
            match m.as_str() {
                Some(m) => text.push_str(m),
                None => text.push_str(&m.to_string()),
            }
        }
        for (k, val) in fields.iter().filter(|(k, _)| *k != "message") {
            let val = match val {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            text.push_str(&format!(" {k}={val}"));
        }
    }
    match at {
        Some(at) => format!("{at} {text}"),
        None => text,
    }
}

/// The daemon's log from its current end on, rendered, as it grows: polled four times a
/// second (a follower is rare and short-lived; see `watch.rs` on why not inotify), from
/// the start again when the file was rotated (it got shorter). Opened without following
/// a link, as the daemon writes it.
pub fn follow_daemon(
    path: std::path::PathBuf,
    view: View,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::convert::Infallible>> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let open = move || {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
    };
    let start = open()
        .and_then(|f| f.metadata())
        .map(|m| m.len())
        .unwrap_or(0);
    futures::stream::unfold((start, String::new()), move |(mut offset, mut partial)| {
        let (open, view) = (open.clone(), view.clone());
        async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                let Ok(mut f) = open() else { continue };
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                if len < offset {
                    offset = 0;
                    partial.clear();
                }
                if len == offset || f.seek(SeekFrom::Start(offset)).is_err() {
                    continue;
                }
                let mut buf = Vec::new();
                if f.take(len - offset).read_to_end(&mut buf).is_err() {
                    continue;
                }
                offset += buf.len() as u64;
                partial.push_str(&String::from_utf8_lossy(&buf));
                let Some(end) = partial.rfind('\n') else {
                    continue;
                };
                let done: String = partial.drain(..=end).collect();
                let mut out = String::new();
                for l in done.lines() {
                    if let Some(r) = view.render(&from_daemon_json(l)) {
                        out.push_str(&r);
                        out.push('\n');
                    }
                }
                if !out.is_empty() {
                    return Some((Ok(bytes::Bytes::from(out)), (offset, partial)));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamped_line_splits_and_filters_by_time() {
        let v = View {
            since: Some("2026-12-03T16:00:00.000Z".into()),
            timestamps: false,
        };
        assert_eq!(v.render("2026-12-03T15:59:59.999Z old"), None);
        assert_eq!(
            v.render("2026-12-03T16:00:00.000Z new line").as_deref(),
            Some("new line")
        );
        assert_eq!(v.render("no stamp here").as_deref(), Some("no stamp here"));
        let t = View {
            timestamps: true,
            ..View::default()
        };
        assert_eq!(
            t.render("2026-12-03T16:00:00.000Z x").as_deref(),
            Some("2026-12-03T16:00:00.000Z x")
        );
        assert_eq!(split(&stamp("hello")).1, "hello");
    }

    #[test]
    fn a_daemon_json_line_reads_as_time_level_message_and_fields() {
        let l = r#"{"timestamp":"2026-12-03T16:00:00.123456Z","level":"INFO","fields":{"message":"service started","service":"web","pid":42},"target":"wsagent"}"#;
        assert_eq!(
            from_daemon_json(l),
            "2026-12-03T16:00:00.123Z INFO  service started pid=42 service=web"
        );
    }
}
