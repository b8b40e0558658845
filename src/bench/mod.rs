//! Benchmarks of Switchyard against the broker it runs on.

pub mod ceiling;
