//! OS signals: the only module that listens to them.
//!
//! One thread owns a `signal_hook` iterator for SIGCHLD, SIGTERM, SIGINT, SIGHUP and
//! SIGUSR1. SIGCHLD is handled right there by calling the reaper
//! ([`crate::procs::reap_all`]); every other signal is forwarded to the daemon as a
//! [`Signal`] on a channel. As PID 1 the kernel drops every signal without a handler,
//! so these handlers are what makes `docker stop` work at all.

use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;
use tokio::sync::mpsc;

/// A signal the daemon acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT: run the stop sequence.
    Terminate(&'static str),
    /// SIGHUP: reload the configuration.
    Reload,
    /// SIGUSR1: save git work now.
    SaveNow,
}

/// Handle of the signal thread; closing it stops the thread.
pub struct SignalThread {
    handle: signal_hook::iterator::Handle,
}

impl SignalThread {
    pub fn close(&self) {
        self.handle.close();
    }
}

/// Install the handlers and start the thread. Reaps once at start, for children that
/// exited before the handler existed (e.g. inherited from a previous exec).
pub fn start() -> std::io::Result<(SignalThread, mpsc::UnboundedReceiver<Signal>)> {
    let mut signals = Signals::new([SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGUSR1])?;
    let handle = signals.handle();
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("wsagent-signals".into())
        .spawn(move || {
            crate::procs::reap_all();
            for sig in signals.forever() {
                let ev = match sig {
                    SIGCHLD => {
                        crate::procs::reap_all();
                        continue;
                    }
                    SIGTERM => Signal::Terminate("SIGTERM"),
                    SIGINT => Signal::Terminate("SIGINT"),
                    SIGHUP => Signal::Reload,
                    SIGUSR1 => Signal::SaveNow,
                    _ => continue,
                };
                if tx.send(ev).is_err() {
                    // The daemon is gone; keep reaping until the process exits.
                }
            }
        })?;
    Ok((SignalThread { handle }, rx))
}
