//! Wire types of wsagent, and nothing else: no I/O lives here.
//!
//! Every byte wsagent puts on a wire is one of these types:
//! - [`local`]: the local control API (CLI <-> daemon over the unix socket);
//! - [`coder`]: bodies of Coder's agent HTTP API, spelled exactly as
//!   `shared/reference/coder-agent-api.md` gives them;
//! - [`save`]: the outcome of saving one repository (journal lines, API, events).
//!
//! Internal types of the daemon convert into these at the boundary, so a change of an
//! internal type can never silently change a wire format.

pub mod coder;
pub mod local;
pub mod save;
