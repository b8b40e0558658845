//! Switchyard: a message-driven orchestrator for agent work. See `ARCHITECTURE.md`.
//!
//! # Layout
//!
//! The folders follow the roles; `ARCHITECTURE.md`'s code map follows the folders.
//!
//! - [`model`]: ids, the domain, the writes stages decide, the wire format. Ids and the domain
//!   depend on nothing; writes and messages carry what the decisions record (a route, a fallback
//!   decision, a complexity).
//! - [`understanding`]: from a request's text to a plan (catalog, decomposers, planner, fleet,
//!   complexity).
//! - [`decisions`]: routing, providers, fallback and approval, leases, audit: pure, each with its
//!   reasons.
//! - [`pipeline`]: the stages, their runner, the topology, the lease sweeper and the worker
//!   process.
//! - The edges, the only modules that talk to the outside: [`broker`] (AMQP), [`store`]
//!   (PostgreSQL), [`llm`] (HTTP to models); with [`config`] and [`redact`].
//! - [`agent`]: the agent process and its executors; [`ops`]: what the command line does;
//!   [`bench`](mod@bench): the benchmark; [`backoff`]: how everything waits before trying again.

pub mod agent;
pub mod backoff;
pub mod bench;
pub mod broker;
pub mod config;
pub mod decisions;
pub mod llm;
pub mod model;
pub mod ops;
pub mod pipeline;
pub mod redact;
pub mod store;
pub mod understanding;

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
