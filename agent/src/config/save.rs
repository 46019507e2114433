//! `[save]`: what is saved, how, where to and how often.

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use agent_proto::save::SaveMode;

/// `[save]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SaveConfig {
    pub mode: SaveMode,
    /// Directories searched for repositories (`~` is the user's HOME).
    pub roots: Vec<String>,
    /// How many directory levels below each root are searched.
    pub depth: usize,
    /// Repositories saved wherever they are (worktree or bare repository paths).
    pub repos: Vec<String>,
    /// The snapshot ref; `{workspace}` and `{branch}` are filled in.
    pub ref_template: String,
    /// Files larger than this (bytes) are left out of the commit and named in the
    /// journal (GitHub refuses files over 100 MiB).
    pub max_file_size: u64,
    /// Repositories saved at the same time.
    pub parallelism: usize,
    /// Directories never searched for repositories (glob patterns on absolute paths,
    /// `~` is the user's HOME; a pattern also covers everything below what it matches).
    /// `repos` are saved even when they match.
    pub exclude: Vec<String>,
    /// How often the repositories are saved while the workspace runs (`"off"`: never):
    /// a workspace that dies without a stop loses at most this much work.
    pub checkpoint: Checkpoint,
}

/// `save.checkpoint`: an interval (`"10m"`), or `"off"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint(pub Option<std::time::Duration>);

impl Default for Checkpoint {
    fn default() -> Self {
        Checkpoint(Some(std::time::Duration::from_secs(600)))
    }
}

impl Serialize for Checkpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            None => s.serialize_str("off"),
            Some(d) => s.serialize_str(&humantime::format_duration(d).to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Checkpoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.trim().eq_ignore_ascii_case("off") {
            return Ok(Checkpoint(None));
        }
        humantime::parse_duration(text.trim())
            .map(|d| Checkpoint(Some(d)))
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "{text:?} is neither an interval (like \"10m\") nor \"off\": {e}"
                ))
            })
    }
}

/// What discovery skips unless told otherwise: the dotfiles clone (its remote is the
/// user's dotfiles repository, not a project), caches and tool state (pre-commit's
/// clones of third-party hooks live under ~/.cache), and dependency trees.
pub const DEFAULT_EXCLUDE: [&str; 4] = [
    "~/.config/coderv2/dotfiles",
    "~/.cache",
    "~/.local",
    "**/node_modules",
];

/// `save.exclude`, `~` expanded, as one matcher; the error names the bad pattern.
pub fn exclude_set(patterns: &[String], home: &Path) -> Result<globset::GlobSet, String> {
    let mut b = globset::GlobSetBuilder::new();
    for p in patterns {
        let expanded = crate::paths::expand_home(p, home);
        let text = expanded.to_string_lossy();
        let text = text.trim_end_matches('/');
        for pat in [text.to_string(), format!("{text}/**")] {
            let g = globset::GlobBuilder::new(&pat)
                .literal_separator(true)
                .build()
                .map_err(|e| format!("{p:?}: {e}"))?;
            b.add(g);
        }
    }
    b.build().map_err(|e| e.to_string())
}

impl Default for SaveConfig {
    fn default() -> Self {
        SaveConfig {
            mode: SaveMode::Snapshot,
            roots: vec!["~/projects".into(), "/workspaces".into()],
            depth: 3,
            repos: Vec::new(),
            ref_template: "refs/heads/wip/{owner}/{workspace}/{branch}".into(),
            max_file_size: 95 * 1024 * 1024,
            parallelism: 8,
            exclude: DEFAULT_EXCLUDE.iter().map(|s| s.to_string()).collect(),
            checkpoint: Checkpoint::default(),
        }
    }
}

/// Semantic checks of `[save]`: (dotted key, message) per problem.
pub fn validate(cfg: &SaveConfig) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if cfg.parallelism == 0 {
        out.push(("save.parallelism".into(), "must be at least 1".into()));
    }
    if cfg.max_file_size == 0 {
        out.push((
            "save.max_file_size".into(),
            "must be greater than zero".into(),
        ));
    }
    if cfg.depth > 32 {
        out.push((
            "save.depth".into(),
            format!("{} is too deep (at most 32)", cfg.depth),
        ));
    }
    if let Some(d) = cfg.checkpoint.0
        && d < std::time::Duration::from_millis(100)
    {
        out.push((
            "save.checkpoint".into(),
            format!(
                "{} is too short (at least 100ms; \"off\" disables)",
                humantime::format_duration(d)
            ),
        ));
    }
    for p in &cfg.exclude {
        if p.trim().is_empty() {
            out.push(("save.exclude".into(), "patterns must not be empty".into()));
        } else if !p.starts_with('/') && !p.starts_with('~') && !p.starts_with("**") {
            out.push((
                "save.exclude".into(),
                format!("{p:?} is not an absolute path pattern (start with /, ~ or **)"),
            ));
        } else if let Err(e) = exclude_set(std::slice::from_ref(p), Path::new("/home")) {
            out.push(("save.exclude".into(), format!("not a valid glob: {e}")));
        }
    }
    for (key, list) in [("save.roots", &cfg.roots), ("save.repos", &cfg.repos)] {
        for p in list.iter() {
            if p.trim().is_empty() {
                out.push((key.into(), "paths must not be empty".into()));
            } else if !p.starts_with('/') && !p.starts_with('~') {
                out.push((key.into(), format!("{p:?} is not an absolute path")));
            }
        }
    }
    let t = &cfg.ref_template;
    let rest = t
        .replace("{owner}", "")
        .replace("{workspace}", "")
        .replace("{branch}", "");
    if !t.starts_with("refs/") {
        out.push((
            "save.ref_template".into(),
            format!("{t:?} must start with \"refs/\""),
        ));
    } else if !t.contains("{branch}") {
        out.push((
            "save.ref_template".into(),
            format!("{t:?} must contain {{branch}} (one ref per branch)"),
        ));
    } else if rest.contains('{') || rest.contains('}') {
        out.push((
            "save.ref_template".into(),
            format!(
                "{t:?} has an unknown placeholder (known: {{owner}}, {{workspace}}, {{branch}})"
            ),
        ));
    } else if !git2::Reference::is_valid_name(
        &t.replace("{owner}", "me")
            .replace("{workspace}", "ws")
            .replace("{branch}", "main"),
    ) {
        out.push((
            "save.ref_template".into(),
            format!("{t:?} does not make a valid ref name"),
        ));
    }
    out
}
