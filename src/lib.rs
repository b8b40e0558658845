//! Switchyard: a message-driven orchestrator for agent work. See `ARCHITECTURE.md`.

pub mod agent;
pub mod audit;
pub mod broker;
pub mod catalog;
pub mod complexity;
pub mod config;
pub mod decomposer;
pub mod domain;
pub mod effect;
pub mod fleet;
pub mod ids;
pub mod leases;
pub mod llm;
pub mod ops;
pub mod policy;
pub mod routing;
pub mod runner;
pub mod stages;
pub mod store;
pub mod topology;
pub mod wire;
pub mod worker;

/// The text of a caught panic: what `panic!` was given, when it was a string.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}
