//! Where a snapshot may go on the remote: a snapshot push never overwrites a remote ref
//! whose tip is not one of ours (issue 14 §2).
//!
//! The push reads the refs the remote advertises (the `GET .../info/refs` every push
//! starts with, so the check costs no request), and [`decide`] picks the destination:
//! the snapshot ref when it is absent, already ours (the commit we last pushed there, as
//! the journal recorded it: git's `--force-with-lease`) or an ancestor of the new
//! snapshot (a fast-forward); otherwise the ref holds someone else's work (another
//! workspace of the same name, another owner with the same ref template) and is left
//! alone: the snapshot goes to the first `REF@2`, `REF@3`, ... that is free or ours,
//! and the outcome says so. The push then names the advertised tip as the ref's old
//! value, so a write that lands between the advertisement and the push is refused by the
//! server, not overwritten.

use std::collections::BTreeMap;

use git2::Oid;

/// How many `@N` refs are tried before giving up.
const MAX_SUFFIX: usize = 20;

/// The ref a collision moves a snapshot to.
pub(crate) fn suffixed(want: &str, n: usize) -> String {
    format!("{want}@{n}")
}

/// Whether `r` is `want` or one of its `@N` refs.
pub(crate) fn same_family(r: &str, want: &str) -> bool {
    r == want
        || r.strip_prefix(want)
            .and_then(|s| s.strip_prefix('@'))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Where the snapshot goes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The remote already has the snapshot there: nothing to push.
    There { dst: String },
    /// Push to `dst`, whose tip is `old` (`None`: the ref is new there). `taken`: the
    /// refs passed over because their tips are someone else's.
    Push {
        dst: String,
        old: Option<Oid>,
        taken: Vec<(String, Oid)>,
    },
    /// Every candidate holds someone else's work.
    NoRoom { taken: Vec<(String, Oid)> },
}

/// Pick the destination of snapshot `new` meant for `want`. `advertised`: the remote's
/// refs; `last_pushed`: what we pushed before, per ref (the journal); `contains(tip)`:
/// whether the local history of `new` contains `tip` (false for an unknown object).
/// The ref we last pushed this family to comes first, so a snapshot moved to `@2`
/// stays there while `want` is someone else's.
pub(crate) fn decide(
    advertised: &BTreeMap<String, Oid>,
    want: &str,
    new: Oid,
    last_pushed: &BTreeMap<String, Oid>,
    contains: &dyn Fn(Oid) -> bool,
) -> Verdict {
    let mut candidates: Vec<String> = last_pushed
        .keys()
        .filter(|r| same_family(r, want) && r.as_str() != want)
        .cloned()
        .collect();
    candidates.push(want.to_string());
    candidates.extend((2..=MAX_SUFFIX).map(|n| suffixed(want, n)));
    let mut seen = std::collections::BTreeSet::new();
    let mut taken = Vec::new();
    for c in candidates {
        if !seen.insert(c.clone()) {
            continue;
        }
        match advertised.get(&c) {
            None => {
                return Verdict::Push {
                    dst: c,
                    old: None,
                    taken,
                };
            }
            Some(tip) if *tip == new => return Verdict::There { dst: c },
            Some(tip) if last_pushed.get(&c) == Some(tip) || contains(*tip) => {
                return Verdict::Push {
                    dst: c,
                    old: Some(*tip),
                    taken,
                };
            }
            Some(tip) => taken.push((c, *tip)),
        }
    }
    Verdict::NoRoom { taken }
}

/// What a user reads about refs passed over.
pub(crate) fn taken_note(taken: &[(String, Oid)], dst: &str) -> String {
    let names: Vec<String> = taken
        .iter()
        .map(|(r, t)| format!("{r} (at {})", &t.to_string()[..12]))
        .collect();
    format!(
        "the remote's {} holds work that is not this workspace's (another workspace of the \
         same name?): left it alone and pushed to {dst} instead",
        names.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oid(n: u8) -> Oid {
        Oid::from_bytes(&[n; 20]).unwrap()
    }

    const W: &str = "refs/heads/wip/ws/main";

    fn adv(refs: &[(&str, u8)]) -> BTreeMap<String, Oid> {
        refs.iter().map(|(r, n)| (r.to_string(), oid(*n))).collect()
    }

    #[test]
    fn an_absent_ref_our_last_push_or_an_ancestor_is_pushed_over() {
        let none = BTreeMap::new();
        let no = |_: Oid| false;
        assert_eq!(
            decide(&adv(&[]), W, oid(9), &none, &no),
            Verdict::Push {
                dst: W.into(),
                old: None,
                taken: vec![]
            }
        );
        let last = adv(&[(W, 1)]);
        assert_eq!(
            decide(&adv(&[(W, 1)]), W, oid(9), &last, &no),
            Verdict::Push {
                dst: W.into(),
                old: Some(oid(1)),
                taken: vec![]
            }
        );
        let ancestor = |t: Oid| t == oid(2);
        assert!(matches!(
            decide(&adv(&[(W, 2)]), W, oid(9), &none, &ancestor),
            Verdict::Push { old: Some(o), .. } if o == oid(2)
        ));
        assert_eq!(
            decide(&adv(&[(W, 9)]), W, oid(9), &none, &no),
            Verdict::There { dst: W.into() }
        );
    }

    #[test]
    fn someone_elses_tip_is_left_alone_and_the_snapshot_moves_to_the_next_free_suffix() {
        let no = |_: Oid| false;
        let v = decide(
            &adv(&[(W, 7), (&suffixed(W, 2), 8)]),
            W,
            oid(9),
            &BTreeMap::new(),
            &no,
        );
        assert_eq!(
            v,
            Verdict::Push {
                dst: suffixed(W, 3),
                old: None,
                taken: vec![(W.into(), oid(7)), (suffixed(W, 2), oid(8))]
            }
        );
        // Once there, it stays there, even when the plain ref becomes free.
        let last = adv(&[(&suffixed(W, 3), 9)]);
        assert!(matches!(
            decide(&adv(&[(&suffixed(W, 3), 9)]), W, oid(10), &last, &no),
            Verdict::Push { dst, .. } if dst == suffixed(W, 3)
        ));
    }

    #[test]
    fn family_is_the_ref_and_its_numbered_suffixes_only() {
        assert!(same_family(W, W));
        assert!(same_family(&suffixed(W, 12), W));
        assert!(!same_family("refs/heads/wip/ws/main@x", W));
        assert!(!same_family("refs/heads/wip/ws/main-2", W));
        assert!(!same_family("refs/heads/wip/ws/main@", W));
    }
}
