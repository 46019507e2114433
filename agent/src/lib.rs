//! wsagent: PID 1 for cloud development workspaces.
//!
//! See ARCHITECTURE.md for the map. The binary (`main.rs`) is a thin shell over
//! [`cli::main`].

mod alloc;
mod api;
mod backoff;
pub mod cli;
pub mod config;
pub mod control;
mod daemon;
mod demo;
pub mod events;
mod githttp;
mod health;
mod logging;
mod logline;
mod metrics;
mod paths;
mod procs;
mod restore;
pub mod save;
mod saverun;
pub mod secrets;
mod signals;
mod startup;
mod state;
mod supervisor;
pub mod tls;
pub mod tokens;
mod userfs;
mod watch;
