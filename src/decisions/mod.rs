//! The decisions Switchyard takes and explains, each a pure function of what it is given:
//! which agent takes a task (`routing`), whether a plan goes to an external model and needs an
//! approval (`policy`), how long an attempt may run (`leases`), and whether a request's trail is
//! complete (`audit`). Each returns its reason with the figures it was based on.

pub mod audit;
pub mod leases;
pub mod policy;
pub mod routing;
