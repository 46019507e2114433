//! End-to-end tests of wsagent's test support and binary (one test binary, one module
//! per area).

mod gitserver;
