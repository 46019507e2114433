//! Startup steps 1 and 2: the required directories, and the skeleton copied into HOME.
//!
//! Both only ever add: a directory is created when missing, a skeleton file is copied
//! only where nothing (not even a dangling symlink) is at its target, so a user's own
//! files are never overwritten. When wsagent runs as root for a workspace user
//! (`startup.user`), everything created here is chowned to that user.

use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, lchown};
use std::path::{Path, PathBuf};

use super::{StepResult, show};
use crate::procs::RunAs;

/// Why a filesystem step failed.
#[derive(Debug, thiserror::Error)]
pub enum PrepError {
    #[error("cannot create directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("{path} exists and is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("cannot chown {path} to uid {uid}: {source}")]
    Chown {
        path: PathBuf,
        uid: u32,
        source: io::Error,
    },
    #[error("cannot read skeleton {path}: {source}")]
    ReadSkel { path: PathBuf, source: io::Error },
    #[error("cannot copy {from} to {to}: {source}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
}

/// Chown `path` (not following symlinks) to `owner`, when there is one.
pub fn chown(path: &Path, owner: Option<&RunAs>) -> Result<(), PrepError> {
    let Some(o) = owner else { return Ok(()) };
    lchown(path, Some(o.uid), Some(o.gid)).map_err(|source| PrepError::Chown {
        path: path.into(),
        uid: o.uid,
        source,
    })
}

/// Chown a whole tree (not following symlinks).
pub fn chown_tree(path: &Path, owner: Option<&RunAs>) -> Result<(), PrepError> {
    if owner.is_none() {
        return Ok(());
    }
    chown(path, owner)?;
    let meta = fs::symlink_metadata(path).map_err(|source| PrepError::ReadSkel {
        path: path.into(),
        source,
    })?;
    if meta.is_dir() {
        let entries = fs::read_dir(path).map_err(|source| PrepError::ReadSkel {
            path: path.into(),
            source,
        })?;
        for e in entries.flatten() {
            chown_tree(&e.path(), owner)?;
        }
    }
    Ok(())
}

/// Create `dir` and its missing parents; chown each directory this call created.
pub fn create_dir(dir: &Path, owner: Option<&RunAs>) -> Result<(), PrepError> {
    let mut missing = Vec::new();
    let mut p = dir;
    loop {
        match fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => break,
            // A symlink to a directory is fine.
            Ok(m) if m.file_type().is_symlink() && p.is_dir() => break,
            Ok(_) => return Err(PrepError::NotADirectory { path: p.into() }),
            Err(_) => missing.push(p.to_path_buf()),
        }
        match p.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => p = parent,
            _ => break,
        }
    }
    fs::create_dir_all(dir).map_err(|source| PrepError::CreateDir {
        path: dir.into(),
        source,
    })?;
    for m in missing.iter().rev() {
        chown(m, owner)?;
    }
    Ok(())
}

/// Give `owner` the directories between `home` (exclusive) and `dir` (inclusive) that
/// the daemon itself owns: the daemon creates its state and log dirs (e.g.
/// `~/.local/state/wsagent`) before this step, as root, and a root-owned `~/.local`
/// would lock the user out of their own HOME.
fn adopt_under_home(dir: &Path, home: &Path, owner: Option<&RunAs>) -> Result<(), PrepError> {
    use std::os::unix::fs::MetadataExt;
    let Some(o) = owner else { return Ok(()) };
    let Ok(rest) = dir.strip_prefix(home) else {
        return Ok(());
    };
    let me = nix::unistd::geteuid().as_raw();
    let mut p = home.to_path_buf();
    for part in rest.components() {
        p.push(part);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() && m.uid() == me && me != o.uid => chown(&p, owner)?,
            _ => {}
        }
    }
    Ok(())
}

/// Step 1: create every directory; under HOME they belong to the workspace user.
pub fn directories(dirs: &[PathBuf], home: &Path, owner: Option<&RunAs>) -> StepResult {
    let mut errors = Vec::new();
    for d in dirs {
        if let Err(e) = create_dir(d, owner).and_then(|()| adopt_under_home(d, home, owner)) {
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
                    fs::create_dir(&dst).map_err(copy_err)?;
                    fs::set_permissions(&dst, fs::Permissions::from_mode(meta.mode_bits()))
                        .map_err(copy_err)?;
                    chown(&dst, owner)?;
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
            std::os::unix::fs::symlink(&target, &dst).map_err(copy_err)?;
        } else if meta.is_file() {
            // create_new: never clobber a file that appeared since the check.
            let mut input = fs::File::open(&src).map_err(copy_err)?;
            let mut output = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&dst)
                .map_err(copy_err)?;
            io::copy(&mut input, &mut output).map_err(copy_err)?;
            fs::set_permissions(&dst, fs::Permissions::from_mode(meta.mode_bits()))
                .map_err(copy_err)?;
        } else {
            // Sockets, fifos, devices: not skeleton material.
            continue;
        }
        chown(&dst, owner)?;
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
        match directories(std::slice::from_ref(&ok), home.path(), None) {
            StepResult::Ok(_) => {}
            other => panic!("{other:?}"),
        }
        assert!(ok.is_dir());
        match directories(&[home.path().join("blocked/x")], home.path(), None) {
            StepResult::Failed(m) => {
                assert!(m.contains("blocked exists and is not a directory"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }
}
