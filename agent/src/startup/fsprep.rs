//! Startup steps 1 and 2: the required directories, and the skeleton copied into HOME.
//!
//! Both only ever add: a directory is created when missing, a skeleton file is copied
//! only where nothing (not even a dangling symlink) is at its target, so a user's own
//! files are never overwritten. When wsagent runs as root, everything under HOME is
//! created through [`crate::userfs`]: as the workspace user, never through the user's
//! links; outside HOME what is created is given to `startup.user`.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{StepResult, show};
use crate::procs::RunAs;
use crate::userfs::{self, Ids};

/// Why a filesystem step failed.
#[derive(Debug, thiserror::Error)]
pub enum PrepError {
    #[error("cannot create directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("{path} exists and is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("cannot read skeleton {path}: {source}")]
    ReadSkel { path: PathBuf, source: io::Error },
    #[error("cannot copy {from} to {to}: {source}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
}

/// The user's ids, when the pipeline creates for a workspace user.
pub fn ids(owner: Option<&RunAs>) -> Option<Ids> {
    owner.map(|o| Ids {
        uid: o.uid,
        gid: o.gid,
    })
}

/// Create `dir` and its missing parents through [`crate::userfs::ensure_dir`]: under
/// HOME as the user, never past a link as root (a directory of the daemon's on the way
/// is given to the user: the daemon creates its state and log dirs before this step);
/// outside HOME each directory made is given to `owner`.
pub fn create_dir(dir: &Path, owner: Option<&RunAs>) -> Result<(), PrepError> {
    userfs::ensure_dir(dir, ids(owner)).map_err(|source| {
        if source.raw_os_error() == Some(libc::ENOTDIR) {
            // Name the non-directory in the way.
            let blocker = dir
                .ancestors()
                .filter(|p| fs::metadata(p).is_ok_and(|m| !m.is_dir()))
                .last()
                .unwrap_or(dir);
            PrepError::NotADirectory {
                path: blocker.into(),
            }
        } else {
            PrepError::CreateDir {
                path: dir.into(),
                source,
            }
        }
    })
}

/// Step 1: create every directory; under HOME they belong to the workspace user.
pub fn directories(dirs: &[PathBuf], owner: Option<&RunAs>) -> StepResult {
    let mut errors = Vec::new();
    for d in dirs {
        if let Err(e) = create_dir(d, owner) {
            errors.push(e.to_string());
        }
    }
    if errors.is_empty() {
        StepResult::Ok(Some(format!(
            "{} director{} present",
            dirs.len(),
            if dirs.len() == 1 { "y" } else { "ies" }
        )))
    } else {
        StepResult::Failed(errors.join("; "))
    }
}

/// What a skeleton copy did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SkelReport {
    pub copied: Vec<PathBuf>,
    /// Targets that existed and were left alone.
    pub kept: Vec<PathBuf>,
    /// Targets of a different kind in the way (e.g. a file where the skeleton has a
    /// directory): left alone, with a warning.
    pub conflicts: Vec<PathBuf>,
}

/// Copy `skel` into `home` recursively where targets are absent, preserving modes.
pub fn copy_skeleton(
    skel: &Path,
    home: &Path,
    owner: Option<&RunAs>,
) -> Result<SkelReport, PrepError> {
    let mut report = SkelReport::default();
    copy_dir(skel, home, owner, &mut report)?;
    Ok(report)
}

fn copy_dir(
    from: &Path,
    to: &Path,
    owner: Option<&RunAs>,
    report: &mut SkelReport,
) -> Result<(), PrepError> {
    let read = |source| PrepError::ReadSkel {
        path: from.into(),
        source,
    };
    let mut entries: Vec<_> = fs::read_dir(from)
        .map_err(read)?
        .collect::<Result<_, _>>()
        .map_err(read)?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let src = e.path();
        let dst = to.join(e.file_name());
        let meta = fs::symlink_metadata(&src).map_err(|source| PrepError::ReadSkel {
            path: src.clone(),
            source,
        })?;
        let copy_err = |source| PrepError::Copy {
            from: src.clone(),
            to: dst.clone(),
            source,
        };
        let existing = fs::symlink_metadata(&dst).ok();
        if meta.is_dir() {
            match existing {
                None => {
                    create_dir(&dst, owner)?;
                    // The new directory's mode, set as the user (whose it is).
                    userfs::as_user(userfs::user_for(&dst).or(ids(owner)), || {
                        fs::File::open(&dst)?
                            .set_permissions(fs::Permissions::from_mode(meta.mode_bits()))
                    })
                    .map_err(copy_err)?;
                    report.copied.push(dst.clone());
                    copy_dir(&src, &dst, owner, report)?;
                }
                Some(m) if m.is_dir() => copy_dir(&src, &dst, owner, report)?,
                Some(_) => report.conflicts.push(dst),
            }
            continue;
        }
        if existing.is_some() {
            report.kept.push(dst);
            continue;
        }
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&src).map_err(copy_err)?;
            userfs::symlink(&target, &dst).map_err(copy_err)?;
        } else if meta.is_file() {
            // Open::New: never clobber a file (or follow a link) that appeared since the
            // check. The skeleton is read as the daemon, the copy written as the user.
            let mut input = fs::File::open(&src).map_err(copy_err)?;
            let mut output = userfs::create(&dst, userfs::Open::New, 0o600).map_err(copy_err)?;
            io::copy(&mut input, &mut output).map_err(copy_err)?;
            output
                .set_permissions(fs::Permissions::from_mode(meta.mode_bits()))
                .map_err(copy_err)?;
            if let (None, Some(o)) = (userfs::user_for(&dst), owner) {
                std::os::unix::fs::fchown(&output, Some(o.uid), Some(o.gid)).map_err(copy_err)?;
            }
        } else {
            // Sockets, fifos, devices: not skeleton material.
            continue;
        }
        report.copied.push(dst);
    }
    Ok(())
}

trait ModeBits {
    fn mode_bits(&self) -> u32;
}

impl ModeBits for fs::Metadata {
    fn mode_bits(&self) -> u32 {
        self.permissions().mode() & 0o7777
    }
}

/// Step 2: the skeleton.
pub fn skeleton(skel: &Path, home: &Path, owner: Option<&RunAs>) -> StepResult {
    if !skel.is_dir() {
        return StepResult::Skipped(format!("no skeleton directory {}", skel.display()));
    }
    match copy_skeleton(skel, home, owner) {
        Err(e) => StepResult::Failed(e.to_string()),
        Ok(r) => {
            let mut msg = format!(
                "{} copied, {} already present",
                r.copied.len(),
                r.kept.len()
            );
            for c in &r.conflicts {
                tracing::warn!(path = %c.display(), "skeleton: a non-directory is in the way of a skeleton directory; left alone");
                msg.push_str(&format!(
                    "; {} is not a directory, left alone",
                    show(c, home)
                ));
            }
            StepResult::Ok(Some(msg))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skeleton_copies_only_absent_targets_recursively_with_modes() {
        let skel = tempfile::tempdir().unwrap();
        let home = tempfile::tempdir().unwrap();
        fs::write(skel.path().join(".bashrc"), "skel bashrc").unwrap();
        fs::write(skel.path().join(".profile"), "skel profile").unwrap();
        fs::create_dir_all(skel.path().join(".config/app")).unwrap();
        fs::write(skel.path().join(".config/app/run.sh"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(
            skel.path().join(".config/app/run.sh"),
            fs::Permissions::from_mode(0o750),
        )
        .unwrap();
        std::os::unix::fs::symlink(".bashrc", skel.path().join(".bash_aliases")).unwrap();
        fs::write(home.path().join(".bashrc"), "mine").unwrap();

        let r = copy_skeleton(skel.path(), home.path(), None).unwrap();

        assert_eq!(
            fs::read_to_string(home.path().join(".bashrc")).unwrap(),
            "mine"
        );
        assert_eq!(
            fs::read_to_string(home.path().join(".profile")).unwrap(),
            "skel profile"
        );
        let m = fs::metadata(home.path().join(".config/app/run.sh")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o750);
        assert_eq!(
            fs::read_link(home.path().join(".bash_aliases")).unwrap(),
            Path::new(".bashrc")
        );
        assert_eq!(r.kept, [home.path().join(".bashrc")]);

        // A second run copies nothing and changes nothing.
        let again = copy_skeleton(skel.path(), home.path(), None).unwrap();
        assert!(again.copied.is_empty(), "{again:?}");
    }

    #[test]
    fn a_file_where_the_skeleton_has_a_directory_is_left_alone_and_reported() {
        let skel = tempfile::tempdir().unwrap();
        let home = tempfile::tempdir().unwrap();
        fs::create_dir(skel.path().join(".ssh")).unwrap();
        fs::write(skel.path().join(".ssh/config"), "x").unwrap();
        fs::write(home.path().join(".ssh"), "a file").unwrap();
        let r = copy_skeleton(skel.path(), home.path(), None).unwrap();
        assert_eq!(r.conflicts, [home.path().join(".ssh")]);
        assert_eq!(
            fs::read_to_string(home.path().join(".ssh")).unwrap(),
            "a file"
        );
    }

    #[test]
    fn directories_are_created_and_a_file_in_the_way_is_named() {
        let home = tempfile::tempdir().unwrap();
        fs::write(home.path().join("blocked"), "").unwrap();
        let ok = home.path().join("a/b/c");
        match directories(std::slice::from_ref(&ok), None) {
            StepResult::Ok(_) => {}
            other => panic!("{other:?}"),
        }
        assert!(ok.is_dir());
        match directories(&[home.path().join("blocked/x")], None) {
            StepResult::Failed(m) => {
                assert!(m.contains("blocked exists and is not a directory"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }
}
