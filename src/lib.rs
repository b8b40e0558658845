//! Switchyard: a message-driven orchestrator for agent work. See `ARCHITECTURE.md`.

pub mod domain;
pub mod ids;
