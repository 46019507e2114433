//! The registry of known secrets, and redaction.
//!
//! Every secret wsagent learns (the agent token, git tokens) is registered here the
//! moment it is read; the logging layer passes every line through [`redact`], so a
//! secret cannot reach stderr or a log file even when an error message quotes it. All of
//! them are found in one pass over a line (aho-corasick), however many there are.

use std::borrow::Cow;
use std::sync::RwLock;

use aho_corasick::{AhoCorasick, MatchKind};

/// The secrets, longest first, and one automaton that finds all of them in one pass
/// over a line (rebuilt when a secret is added, which is rare).
struct Known {
    list: Vec<String>,
    finder: Option<AhoCorasick>,
}

static SECRETS: RwLock<Known> = RwLock::new(Known {
    list: Vec::new(),
    finder: None,
});

/// What replaces a secret in output.
pub const MASK: &str = "[REDACTED]";

/// Remember a secret so that it is masked in all output from now on. Values shorter
/// than 6 bytes are not registered (masking them would garble ordinary text).
pub fn register(secret: &str) {
    let s = secret.trim();
    if s.len() < 6 {
        return;
    }
    let mut k = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    if !k.list.iter().any(|x| x == s) {
        k.list.push(s.to_string());
        k.list.sort_by_key(|x| std::cmp::Reverse(x.len()));
        // Leftmost-longest: a secret containing another is masked whole.
        k.finder = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&k.list)
            .ok();
    }
}

/// Mask every registered secret in `text`.
pub fn redact(text: &str) -> Cow<'_, str> {
    let k = SECRETS.read().unwrap_or_else(|e| e.into_inner());
    let Some(finder) = &k.finder else {
        return Cow::Borrowed(text);
    };
    if !finder.is_match(text) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(finder.replace_all(text, &vec![MASK; k.list.len()]))
}

/// A secret value whose `Debug`/`Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap and register a secret.
    pub fn new(value: impl Into<String>) -> Secret {
        let v: String = value.into();
        register(&v);
        Secret(v)
    }
    /// The secret itself: only for the place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(MASK)
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(MASK)
    }
}

/// Masks registered secrets in a byte stream that arrives in arbitrary pieces (a task's
/// terminal output): a secret cut across two pieces is still masked whole.
///
/// [`push`](StreamRedactor::push) returns what is safe to pass on now and holds back
/// only a tail that is the beginning of some secret (nothing, in ordinary output);
/// [`release`](StreamRedactor::release) gives that tail up when no more bytes come soon
/// (a prompt must not wait), [`finish`](StreamRedactor::finish) at the end of the stream.
#[derive(Debug, Default)]
pub struct StreamRedactor {
    held: Vec<u8>,
}

impl StreamRedactor {
    /// Redact `chunk` (after what was held back) and return the bytes to pass on.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let k = SECRETS.read().unwrap_or_else(|e| e.into_inner());
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(chunk);
        let Some(finder) = &k.finder else {
            return buf;
        };
        if finder.is_match(&buf) {
            buf = finder.replace_all_bytes(&buf, &vec![MASK.as_bytes(); k.list.len()]);
        }
        // The longest tail of `buf` that a secret starts with. By hand: the automaton
        // answers "where is a whole secret", not "which tail begins one", and this is a
        // few comparisons per registered secret.
        let hold = k
            .list
            .iter()
            .filter_map(|s| {
                let s = s.as_bytes();
                (1..s.len().min(buf.len() + 1))
                    .rev()
                    .find(|&k| buf.ends_with(&s[..k]))
            })
            .max()
            .unwrap_or(0);
        self.held = buf.split_off(buf.len() - hold);
        buf
    }

    /// Whether a tail is held back, waiting for the bytes after it.
    pub fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// Give up the held tail (it is not a whole secret).
    pub fn release(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }

    /// The end of the stream: whatever is held.
    pub fn finish(&mut self) -> Vec<u8> {
        self.release()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_cut_anywhere_in_a_stream_is_masked_whole() {
        let secret = "ghs_streamsecret0123";
        register(secret);
        let text = format!("token: {secret}\r\nagain {secret} done\r\n$ ");
        let bytes = text.as_bytes();
        let want = format!("token: {MASK}\r\nagain {MASK} done\r\n$ ");
        // Every way of cutting the stream in two, and byte by byte.
        for cut in 0..=bytes.len() {
            let mut r = StreamRedactor::default();
            let mut out = r.push(&bytes[..cut]);
            out.extend(r.push(&bytes[cut..]));
            out.extend(r.finish());
            assert_eq!(String::from_utf8_lossy(&out), want, "cut at {cut}");
        }
        let mut r = StreamRedactor::default();
        let mut out = Vec::new();
        for b in bytes {
            out.extend(r.push(std::slice::from_ref(b)));
        }
        out.extend(r.finish());
        assert_eq!(String::from_utf8_lossy(&out), want);
    }

    #[test]
    fn ordinary_output_is_passed_on_at_once_and_a_held_prefix_can_be_released() {
        register("ghs_heldback98765");
        let mut r = StreamRedactor::default();
        assert_eq!(r.push(b"Password: "), b"Password: ");
        assert!(!r.holding());
        // A tail that begins a secret waits for what follows...
        assert_eq!(r.push(b"value ghs_he"), b"value ");
        assert!(r.holding());
        // ...and is given up when nothing follows soon; it was not the secret.
        assert_eq!(r.release(), b"ghs_he");
        assert_eq!(r.push(b"ld\n"), b"ld\n");
        assert!(r.finish().is_empty());
    }

    #[test]
    fn registered_secrets_are_masked_everywhere_in_a_line() {
        register("ghp_abcdefghijkl");
        let line = "push to https://x:ghp_abcdefghijkl@github.com failed: ghp_abcdefghijkl";
        assert_eq!(
            redact(line),
            format!("push to https://x:{MASK}@github.com failed: {MASK}")
        );
        assert!(matches!(redact("nothing here"), Cow::Borrowed(_)));
        assert_eq!(format!("{:?}", Secret::new("tok-123456")), MASK);
    }
}
