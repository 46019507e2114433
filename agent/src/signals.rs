//! signals (in progress)
