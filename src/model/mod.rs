//! The vocabulary every other module speaks: typed ids, the domain (requests, plans, tasks,
//! agents), the writes a stage decides (`effect`), and what travels on the broker (`wire`). No
//! I/O here. Ids and the domain depend on nothing else of the crate; writes and messages carry
//! what the decisions record (a route with its candidates, a fallback decision, a complexity).

pub mod domain;
pub mod effect;
pub mod ids;
pub mod wire;
