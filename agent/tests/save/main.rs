//! The save path against real repositories and a real git HTTP server: what lands on the
//! remote is the worktree byte for byte, what must not change does not, and every odd
//! state ends in a defined outcome inside the deadline.

mod branch;
mod credentials;
mod deadline;
mod dirtyset;
mod httpconfig;
mod journal;
mod odd;
mod reasons;
mod scope;
mod snapshot;
mod sparse;
mod support;
