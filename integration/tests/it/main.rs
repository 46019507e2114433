//! it

mod startup;
