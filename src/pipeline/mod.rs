//! The pipeline: the stages (each a pure `decide` over its input message), the one runner that
//! consumes, persists, publishes and acknowledges for every stage, the broker topology they
//! share (and its RabbitMQ definitions), the lease sweeper, and the worker process that runs a
//! chosen set of stages.

pub mod definitions;
pub mod runner;
pub mod stages;
pub mod sweeper;
pub mod topology;
pub mod worker;
