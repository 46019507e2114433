//! The registry of known secrets, and redaction.
//!
//! Every secret wsagent learns (the agent token, git tokens) is registered here the
//! moment it is read; the logging layer passes every line through [`redact`], so a
//! secret cannot reach stderr or a log file even when an error message quotes it.

use std::borrow::Cow;
use std::sync::RwLock;

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// What replaces a secret in output.
pub const MASK: &str = "[REDACTED]";

/// Remember a secret so that it is masked in all output from now on. Values shorter
/// than 6 bytes are not registered (masking them would garble ordinary text).
pub fn register(secret: &str) {
    let s = secret.trim();
    if s.len() < 6 {
        return;
    }
    let mut v = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    if !v.iter().any(|x| x == s) {
        v.push(s.to_string());
        // Longest first, so a secret containing another is masked whole.
        v.sort_by_key(|x| std::cmp::Reverse(x.len()));
    }
}

/// Mask every registered secret in `text`.
pub fn redact(text: &str) -> Cow<'_, str> {
    let v = SECRETS.read().unwrap_or_else(|e| e.into_inner());
    if v.is_empty() || !v.iter().any(|s| text.contains(s.as_str())) {
        return Cow::Borrowed(text);
    }
    let mut out = text.to_string();
    for s in v.iter() {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), MASK);
        }
    }
    Cow::Owned(out)
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

#[cfg(test)]
mod tests {
    use super::*;

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
