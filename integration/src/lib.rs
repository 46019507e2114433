//! Test support shared by the end-to-end tests and by other crates' tests: a fake
//! coderd ([`fake_coderd`]) that is a real HTTP server following the reference.

pub mod fake_coderd;
