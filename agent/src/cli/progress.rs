//! `wsagent save` on a terminal: a live progress line (indicatif) under the outcome
//! lines as they land — a spinner, a bar of the repositories done out of those found,
//! and the time so far — cleared before the summary. In a pipe or with `--json`
//! nothing of this is drawn: the plain lines are the whole output.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Live {
    bar: ProgressBar,
}

impl Live {
    /// A live display on stdout when it is a terminal, else `None`.
    pub fn on_terminal() -> Option<Live> {
        use std::io::IsTerminal;
        if !std::io::stdout().is_terminal() {
            return None;
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message("finding repositories…");
        bar.enable_steady_tick(Duration::from_millis(100));
        Some(Live { bar })
    }

    /// Discovery is done: `repos` to save.
    pub fn found(&self, repos: usize, header: &str) {
        self.bar.println(header);
        self.bar.set_length(repos as u64);
        self.bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{bar:30}] {pos}/{len} repositories  {elapsed_precise}  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        self.bar.set_message("");
    }

    /// A repository's outcome landed: its line above the bar.
    pub fn landed(&self, line: &str, repo: &str) {
        self.bar.println(line);
        self.bar.inc(1);
        self.bar.set_message(format!("last: {repo}"));
    }

    /// A line that is not a repository's (a note from the daemon).
    pub fn note(&self, line: &str) {
        self.bar.println(line);
    }

    /// The save ended: the live line goes, the summary follows as plain lines.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
