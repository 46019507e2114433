//! Where things are: the home directory and `~` expansion. A leaf: imports nothing of
//! the crate.

use std::path::{Path, PathBuf};

/// The daemon's home directory: `$HOME`, else `/root`.
pub fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// Expand a leading `~` or `~/` to `home`; any other path is returned as it is.
///
/// Kept by hand rather than shellexpand: only this one form is meant (`~user` and
/// `$VARS` must stay as written in a config path), and the home is the workspace
/// user's, passed in, not the process's — shellexpand's `tilde_with_context` would be
/// these same six lines behind a closure.
pub fn expand_home(path: &str, home: &Path) -> PathBuf {
    if path == "~" {
        home.to_path_buf()
    } else if let Some(rest) = path.strip_prefix("~/") {
        home.join(rest)
    } else {
        PathBuf::from(path)
    }
}
