//! Test support shared by the end-to-end tests and benchmarks: a real smart-HTTP git
//! server ([`gitserver`]).

pub mod gitserver;
