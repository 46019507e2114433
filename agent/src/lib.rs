//! wsagent: PID 1 for cloud development workspaces.
//!
//! See ARCHITECTURE.md for the map. The binary (`main.rs`) is a thin shell over
//! [`cli::main`].

pub(crate) mod alloc;
pub mod api;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod events;
pub mod githttp;
pub mod health;
pub mod logging;
pub mod procs;
pub mod restore;
pub mod save;
pub mod saverun;
pub mod secrets;
pub mod signals;
pub mod startup;
pub mod supervisor;
pub mod tls;
pub mod tokens;
pub mod watch;
