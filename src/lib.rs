//! Switchyard: a message-driven orchestrator for agent work. See `ARCHITECTURE.md`.

pub mod agent;
pub mod audit;
pub mod broker;
pub mod catalog;
pub mod config;
pub mod domain;
pub mod effect;
pub mod ids;
pub mod leases;
pub mod ops;
pub mod policy;
pub mod routing;
pub mod runner;
pub mod stages;
pub mod store;
pub mod topology;
pub mod wire;
pub mod worker;
