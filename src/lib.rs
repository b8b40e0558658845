//! Switchyard: a message-driven orchestrator for agent work. See `ARCHITECTURE.md`.

pub mod agent;
pub mod audit;
pub mod bench;
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
pub mod redact;
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

/// An error with its causes, joined by ": " ("a: b: c"). A reason must say what went wrong, and
/// some errors keep that in their source only (tokio-postgres says "db error", and the server's
/// message is its source); errors that show their source in their own message ("database: {0}")
/// are not repeated.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}
