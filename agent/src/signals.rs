//! OS signals: the only module that listens to them.
//!
//! One thread owns a `signal_hook` iterator. SIGCHLD is handled right there by calling
//! the reaper ([`crate::procs::reap_all`]); every other signal is forwarded to the
//! daemon as a [`Signal`] on a channel. As PID 1 the kernel drops every signal without a
//! handler, so these handlers are what makes `docker stop` work at all; when not PID 1,
//! every signal whose default action ends a process has a handler, so that nothing but
//! SIGKILL ends wsagent without its stop sequence:
//!
//! | signal | action |
//! |---|---|
//! | SIGTERM, SIGINT, SIGQUIT | the stop sequence |
//! | SIGHUP | reload the configuration |
//! | SIGUSR1 | save git work now |
//! | SIGUSR2 | forwarded to every running service's process group (as tini does) |
//! | SIGALRM, SIGVTALRM, SIGPROF, SIGIO, SIGPWR, SIGSTKFLT, SIGXCPU, SIGXFSZ, SIGRTMIN..SIGRTMAX | logged and ignored |
//!
//! Faults raised by the process itself (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT,
//! SIGSYS, SIGTRAP) keep their default action: a crash stays a crash. SIGWINCH, SIGURG
//! and SIGCONT are ignored by default already; wsagent has no terminal to resize.
//!
//! [`reset_inherited`] runs before any thread exists: a parent's blocked signals
//! (sigprocmask survives exec) and ignored ones (SIG_IGN survives exec) are reset, so a
//! blocked SIGTERM or an ignored SIGCHLD cannot silently disable the stop or the reaper.

use libc::{SIGPWR, SIGSTKFLT};
use signal_hook::consts::{
    SIGALRM, SIGCHLD, SIGHUP, SIGINT, SIGIO, SIGPROF, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2,
    SIGVTALRM, SIGXCPU, SIGXFSZ,
};
use signal_hook::iterator::Signals;
use tokio::sync::mpsc;

/// A signal the daemon acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM, SIGINT or SIGQUIT: run the stop sequence.
    Terminate(&'static str),
    /// SIGHUP: reload the configuration.
    Reload,
    /// SIGUSR1: save git work now.
    SaveNow,
    /// SIGUSR2: pass on to the services.
    Forward(nix::sys::signal::Signal),
    /// A signal that would end the daemon by default and means nothing to it.
    Ignored(i32),
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

/// Signals that are logged and otherwise ignored (their default would end the daemon).
fn ignored() -> Vec<i32> {
    let mut v = vec![
        SIGALRM, SIGVTALRM, SIGPROF, SIGIO, SIGPWR, SIGSTKFLT, SIGXCPU, SIGXFSZ,
    ];
    v.extend(libc::SIGRTMIN()..=libc::SIGRTMAX());
    v
}

/// Undo the signal state inherited through exec: unblock every signal and turn every
/// SIG_IGN back to the default, except SIGPIPE (the Rust runtime ignores it on purpose)
/// and the job-control stops SIGTSTP, SIGTTIN, SIGTTOU (a shell's business; their
/// default would stop a background daemon that logs to a terminal). Call before any
/// thread is started: threads inherit the mask.
pub fn reset_inherited() {
    use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, pthread_sigmask};
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    for sig in 1..=libc::SIGRTMAX() {
        if matches!(
            sig,
            libc::SIGKILL
                | libc::SIGSTOP
                | libc::SIGPIPE
                | libc::SIGTSTP
                | libc::SIGTTIN
                | libc::SIGTTOU
        ) {
            continue;
        }
        let Ok(s) = nix::sys::signal::Signal::try_from(sig) else {
            // Real-time signals, glibc's reserved two (32, 33) included, which its
            // sigaction refuses: nix has no names for them.
            reset_if_ignored_raw(sig);
            continue;
        };
        // SAFETY: no thread exists yet and SIG_DFL installs no handler code; the old
        // disposition is put back unless it was SIG_IGN.
        unsafe {
            if let Ok(old) = nix::sys::signal::signal(s, SigHandler::SigDfl)
                && !matches!(old, SigHandler::SigIgn)
            {
                let _ = nix::sys::signal::signal(s, old);
            }
        }
    }
}

/// The kernel's `struct sigaction` (x86_64 and aarch64 layout).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// Reset `sig` from SIG_IGN to SIG_DFL by the system call itself (glibc's wrapper
/// refuses the signals it reserves, which a parent may still have ignored).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn reset_if_ignored_raw(sig: i32) {
    let mut old = KernelSigaction {
        handler: 0,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    let dfl = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    // SAFETY: rt_sigaction with valid pointers to structs of the kernel's layout and
    // size; SIG_DFL installs no handler code, so no restorer is needed.
    unsafe {
        if libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            std::ptr::null::<KernelSigaction>(),
            &mut old as *mut KernelSigaction,
            8usize,
        ) == 0
            && old.handler == libc::SIG_IGN
        {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &dfl as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                8usize,
            );
        }
    }
}

/// Other architectures: the real-time signals through glibc (its reserved two stay).
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn reset_if_ignored_raw(sig: i32) {
    // SAFETY: sigaction with a null new action only reads the disposition; SIG_DFL
    // installs no handler code.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
        {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
}

/// Install the handlers and start the thread. Reaps once at start, for children that
/// exited before the handler existed (e.g. inherited from a previous exec).
pub fn start() -> std::io::Result<(SignalThread, mpsc::UnboundedReceiver<Signal>)> {
    let mut wanted = vec![SIGCHLD, SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2];
    wanted.extend(ignored());
    let mut signals = Signals::new(wanted)?;
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
                    SIGQUIT => Signal::Terminate("SIGQUIT"),
                    SIGHUP => Signal::Reload,
                    SIGUSR1 => Signal::SaveNow,
                    SIGUSR2 => Signal::Forward(nix::sys::signal::Signal::SIGUSR2),
                    other => Signal::Ignored(other),
                };
                if tx.send(ev).is_err() {
                    // The daemon is gone; keep reaping until the process exits.
                }
            }
        })?;
    Ok((SignalThread { handle }, rx))
}

/// A signal's name (`SIGPWR`, `SIGRTMIN+3`).
pub fn name(sig: i32) -> String {
    match nix::sys::signal::Signal::try_from(sig) {
        Ok(s) => s.as_str().to_string(),
        Err(_) if sig >= libc::SIGRTMIN() => format!("SIGRTMIN+{}", sig - libc::SIGRTMIN()),
        Err(_) => format!("signal {sig}"),
    }
}
