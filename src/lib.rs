//! Switchyard: a message-driven orchestrator for agent work. See `ARCHITECTURE.md`.

pub mod broker;
pub mod catalog;
pub mod domain;
pub mod effect;
pub mod ids;
pub mod policy;
pub mod routing;
pub mod runner;
pub mod stages;
pub mod store;
pub mod topology;
pub mod wire;
