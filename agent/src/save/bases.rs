//! What a push tells libgit2 the remote already has, and the pack it sends instead of
//! libgit2's.
//!
//! libgit2's push hides every ref the server advertises that exists locally and then
//! walks the whole tree of each one to mark its objects as not to be sent
//! (`mark_edges_uninteresting`). Against a remote with thousands of tags and branches
//! that walk is the whole cost of a save: every tag's tree, each object looked up and
//! kept in memory (issue 16: 3.3 s and 609 MiB where git takes 0.17 s). Its packbuilder
//! then reads every object it sends whole, a large file twice over (a 500 MiB file made
//! a save peak at a gigabyte). The transport (`githttp`) lets the push rewrite the
//! advertisement libgit2 reads and replace the pack it writes; [`for_push`] keeps the
//! refs being pushed (libgit2 needs their old ids), shows the pushed tips themselves as
//! `.have` lines (the protocol's own way of saying "the server has this object"), so
//! libgit2's pack is empty, and hands the transport a [`PackSource`] that streams the
//! real one (`save::pack`).
//!
//! What the remote has is judged from the *boundary* of the push: the commits the
//! remote has that a new commit has as a parent (git's "edges"). They are found by a
//! walk over commits only (no tree is read): from the pushed tips, hiding the remote's
//! tips of the refs pushed and of the branches they track, and the local
//! remote-tracking tip of each pushed branch's upstream (what the remote is known to
//! have; when none of those is known, the remote's branches). Unrelated refs (tags,
//! other branches) are not looked at. What is sent is what the remote lacks of the
//! pushed history, judged from what it is known to have.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::rc::Rc;

use git2::{Oid, Repository};

use crate::githttp::{AdvertisedRef, PackSource, RefFilter};

/// The filter and the pack source for a push of `refspecs` from the repository at
/// `repo_dir`, given what the remote is known to have: `known.tips` (local upstream
/// tracking tips) and the remote refs `known.refs` the pushed branches track.
pub(crate) fn for_push(
    repo_dir: PathBuf,
    refspecs: &[String],
    known: Upstreams,
) -> (RefFilter, PackSource) {
    let mut srcs = Vec::new();
    let mut dsts = Vec::new();
    for spec in refspecs {
        let spec = spec.trim_start_matches('+');
        let (src, dst) = spec.split_once(':').unwrap_or((spec, spec));
        srcs.push(src.to_string());
        dsts.push(dst.to_string());
    }
    // The commits the remote has, once the filter has read the advertisement: the
    // pack is what the pushed tips add to them.
    let have: Rc<RefCell<Option<Vec<Oid>>>> = Rc::new(RefCell::new(None));
    let filter_have = have.clone();
    let dir = repo_dir.clone();
    let filter: RefFilter = Box::new(move |adv: &[AdvertisedRef]| {
        let t = std::time::Instant::now();
        match shown_refs(&dir, &srcs, &dsts, &known, adv) {
            Ok((shown, had)) => {
                tracing::debug!(
                    advertised = adv.len(),
                    shown = shown.len(),
                    took_ms = t.elapsed().as_millis() as u64,
                    "push bases"
                );
                *filter_have.borrow_mut() = Some(had);
                shown
            }
            Err(e) => {
                // libgit2's own choice: slower, never wrong.
                tracing::debug!(error = %e, "push bases: showing libgit2 every advertised ref");
                *filter_have.borrow_mut() = None;
                adv.to_vec()
            }
        }
    });
    let source: PackSource = Box::new(move |tips: &[Oid]| {
        let Some(had) = have.borrow().clone() else {
            // The filter failed: libgit2 made the pack.
            return Ok(None);
        };
        let t = std::time::Instant::now();
        let fail =
            |e: super::pack::PackError| std::io::Error::other(format!("making the pack: {e}"));
        let repo = Repository::open(&repo_dir).map_err(|e| fail(e.into()))?;
        let objects = super::pack::objects(&repo, tips, &had).map_err(|e| fail(e.into()))?;
        tracing::debug!(
            objects = objects.len(),
            took_ms = t.elapsed().as_millis() as u64,
            "push pack: objects found"
        );
        let pack = super::pack::PackReader::new(repo, objects).map_err(fail)?;
        Ok(Some(Box::new(pack) as crate::githttp::PackBody))
    });
    (filter, source)
}

/// Whether the push may write `name`: one of `dsts`, or one of its `@N` neighbours (the
/// snapshot lease picks `REF@2`, `REF@3`… when `REF` holds someone else's work, after
/// reading the advertisement, so the whole family is kept).
fn pushed_to(dsts: &[String], name: &str) -> bool {
    dsts.iter().any(|d| {
        name == d
            || name
                .strip_prefix(d.as_str())
                .and_then(|rest| rest.strip_prefix('@'))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

fn shown_refs(
    repo_dir: &std::path::Path,
    srcs: &[String],
    dsts: &[String],
    known: &Upstreams,
    adv: &[AdvertisedRef],
) -> Result<(Vec<AdvertisedRef>, Vec<Oid>), git2::Error> {
    let repo = Repository::open(repo_dir)?;
    let mut walk = repo.revwalk()?;
    let mut tips = Vec::new();
    for src in srcs {
        let tip = repo.revparse_single(src)?.peel_to_commit()?.id();
        walk.push(tip)?;
        tips.push(tip);
    }
    // What the push is based on: the remote's tips of the refs pushed and of the
    // branches tracked, and the local tracking tips. Every hidden commit costs a
    // lookup (thousands of tags cost a second), so unrelated refs are left out; only
    // when none of these is known locally (a branch never pushed, no upstream) are the
    // remote's branches (not its tags) taken, as git would.
    let odb = repo.odb()?;
    let local = |r: &&AdvertisedRef| {
        Oid::from_str(&r.oid)
            .ok()
            .filter(|id| !id.is_zero() && odb.exists(*id))
    };
    let mut hide: Vec<Oid> = adv
        .iter()
        .filter(|r| pushed_to(dsts, &r.name) || known.refs.contains(&r.name))
        .filter_map(|r| local(&r))
        .chain(known.tips.iter().copied().filter(|id| odb.exists(*id)))
        .collect();
    if hide.is_empty() {
        hide = adv
            .iter()
            .filter(|r| r.name.starts_with("refs/heads/"))
            .filter_map(|r| local(&r))
            .collect();
    }
    for id in &hide {
        // Not a commit (a tag of a tree, a blob): nothing to hide.
        let _ = walk.hide(*id);
    }
    let mut new: HashSet<Oid> = HashSet::new();
    for id in walk {
        new.insert(id?);
    }
    let mut bases: BTreeSet<Oid> = BTreeSet::new();
    for id in &new {
        for p in repo.find_commit(*id)?.parent_ids() {
            if !new.contains(&p) {
                bases.insert(p);
            }
        }
    }
    // A tip the remote already has (e.g. a branch it holds under another name).
    bases.extend(tips.iter().filter(|t| !new.contains(t)));
    // libgit2 sees the refs it writes (their old ids) and the tips as had, so its own
    // pack is empty; the transport sends the one `save::pack` streams.
    let mut shown: Vec<AdvertisedRef> = adv
        .iter()
        .filter(|r| pushed_to(dsts, &r.name))
        .cloned()
        .collect();
    for t in &tips {
        let oid = t.to_string();
        if !shown.iter().any(|r| r.oid == oid) {
            shown.push(AdvertisedRef {
                oid,
                name: ".have".into(),
            });
        }
    }
    hide.extend(bases);
    Ok((shown, hide))
}

/// What the remote is known to have, from the pushed branches' upstreams.
#[derive(Debug, Default)]
pub(crate) struct Upstreams {
    /// The local remote-tracking tips (`refs/remotes/origin/main`).
    pub tips: Vec<Oid>,
    /// The remote's names of those branches (`refs/heads/main`).
    pub refs: Vec<String>,
}

/// The upstreams of the local branches `branches` (short names).
pub(crate) fn upstreams<'a>(
    repo: &Repository,
    branches: impl IntoIterator<Item = &'a str>,
) -> Upstreams {
    let mut out = Upstreams::default();
    let config = repo.config().ok();
    for b in branches {
        if let Some(merge) = config
            .as_ref()
            .and_then(|c| c.get_string(&format!("branch.{b}.merge")).ok())
        {
            out.refs.push(merge);
        }
        if let Some(tip) = repo
            .find_branch(b, git2::BranchType::Local)
            .ok()
            .and_then(|br| br.upstream().ok())
            .and_then(|up| up.get().target())
        {
            out.tips.push(tip);
        }
    }
    out
}
