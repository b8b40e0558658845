//! The vocabulary every other module speaks: typed ids, the domain (requests, plans, tasks,
//! agents), the writes a stage decides (`effect`), and what travels on the broker (`wire`). No
//! I/O here, and nothing here depends on the rest of the crate.

pub mod domain;
pub mod effect;
pub mod ids;
pub mod wire;
