//! Every type problem of a section in one pass, each with its full key path, in words a
//! user knows.
//!
//! serde stops at a section's first error. So the section is checked again and again:
//! each error's place (its span) names the key it is about, that key is taken out of a
//! copy of the section, and the check runs once more, until the rest is valid. The
//! message is reworded from serde's (`expected usize`, `invalid type: sequence`) into
//! the TOML a user wrote.

use std::ops::Range;

use toml::Spanned;
use toml::de::DeValue;

/// One problem: where (the span in the file), the key path under the section, what.
pub struct Found {
    pub span: Option<Range<usize>>,
    pub path: Vec<Seg>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// `health.url`, `task[1].shell`.
pub fn dotted(prefix: &str, path: &[Seg]) -> String {
    let mut out = prefix.to_string();
    for s in path {
        match s {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Run `check` on `value` until it passes, taking out each key an error is about.
pub fn every_problem<'i>(
    value: &Spanned<DeValue<'i>>,
    check: impl Fn(Spanned<DeValue<'i>>) -> Result<(), toml::de::Error>,
) -> Vec<Found> {
    let mut v = value.clone();
    let mut out = Vec::new();
    // Bounded: each round takes a key out, and a section has only so many.
    for _ in 0..100 {
        let Err(e) = check(v.clone()) else { break };
        let message = humanize(e.message().trim());
        // A field missing because an earlier round took it out is not the user's.
        if !out.is_empty() && message.starts_with("missing ") {
            break;
        }
        let Some(span) = e.span() else {
            out.push(Found {
                span: None,
                path: Vec::new(),
                message,
            });
            break;
        };
        let mut path = Vec::new();
        let found = path_at(&v, span.start, &mut path);
        // Take out the innermost key (not an array element: arrays cannot shrink here).
        while matches!(path.last(), Some(Seg::Index(_))) {
            path.pop();
        }
        let removed = found && !path.is_empty() && remove(&mut v, &path);
        out.push(Found {
            span: Some(span),
            path,
            message,
        });
        if !removed {
            break;
        }
    }
    out
}

/// The path of the deepest key (or array element) whose key or value holds `pos`.
fn path_at(v: &Spanned<DeValue<'_>>, pos: usize, path: &mut Vec<Seg>) -> bool {
    let holds = |r: Range<usize>| r.start <= pos && pos < r.end.max(r.start + 1);
    match v.get_ref() {
        DeValue::Table(t) => {
            for (k, val) in t.iter() {
                path.push(Seg::Key(k.get_ref().to_string()));
                // A table from a `[header]` may have a span that holds none of its keys:
                // look inside tables whatever their span says.
                if path_at(val, pos, path) || holds(k.span()) || holds(val.span()) {
                    return true;
                }
                path.pop();
            }
            false
        }
        DeValue::Array(a) => {
            for (i, val) in a.iter().enumerate() {
                path.push(Seg::Index(i));
                if path_at(val, pos, path) || holds(val.span()) {
                    return true;
                }
                path.pop();
            }
            false
        }
        _ => false,
    }
}

/// Take the key at `path` out of `v`.
fn remove(v: &mut Spanned<DeValue<'_>>, path: &[Seg]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut at = v.get_mut();
    for seg in parents {
        at = match (at, seg) {
            (DeValue::Table(t), Seg::Key(k)) => match t.get_mut(k.as_str()) {
                Some(next) => next.get_mut(),
                None => return false,
            },
            (DeValue::Array(a), Seg::Index(i)) => match a.get_mut(*i) {
                Some(next) => next.get_mut(),
                None => return false,
            },
            _ => return false,
        };
    }
    match (at, last) {
        (DeValue::Table(t), Seg::Key(k)) => t.remove(k.as_str()).is_some(),
        _ => false,
    }
}

/// serde's words into the user's: TOML's types, no Rust ones.
pub fn humanize(msg: &str) -> String {
    const WORDS: &[(&str, &str)] = &[
        ("invalid type: integer", "found the number"),
        ("invalid type: floating point", "found the number"),
        ("invalid type: string", "found the text"),
        ("invalid type: boolean", "found"),
        ("invalid type: sequence", "found a list"),
        ("invalid type: map", "found a table"),
        ("invalid value: string", "the text"),
        ("invalid value: integer", "the number"),
        ("expected usize", "expected a whole number of 0 or more"),
        ("expected u64", "expected a whole number of 0 or more"),
        ("expected u32", "expected a whole number of 0 or more"),
        ("expected u16", "expected a whole number from 0 to 65535"),
        ("expected u8", "expected a whole number from 0 to 255"),
        ("expected i64", "expected a whole number"),
        ("expected i32", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected a sequence", "expected a list (`[...]`)"),
        ("expected a string", "expected text in quotes"),
        ("expected a map", "expected a table"),
        ("missing field", "missing key"),
        ("unknown field", "unknown key"),
        ("unknown variant", "unknown value"),
    ];
    let mut out = msg.to_string();
    for (from, to) in WORDS {
        out = out.replace(from, to);
    }
    // `expected struct HealthConfig` and the like.
    while let Some(i) = out.find("expected struct ") {
        let end = out[i + 16..]
            .find(|c: char| !c.is_alphanumeric())
            .map_or(out.len(), |e| i + 16 + e);
        out.replace_range(i..end, "expected a table");
    }
    out.replace(
        ", expected a duration",
        " is not a duration (`10s`, `5m`, `1h`)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serdes_words_become_tomls() {
        assert_eq!(
            humanize("invalid type: string \"deep\", expected usize"),
            "found the text \"deep\", expected a whole number of 0 or more"
        );
        assert_eq!(
            humanize("invalid type: integer `42`, expected struct HealthConfig"),
            "found the number `42`, expected a table"
        );
        assert_eq!(
            humanize("invalid value: string \"soon\", expected a duration"),
            "the text \"soon\" is not a duration (`10s`, `5m`, `1h`)"
        );
    }
}
