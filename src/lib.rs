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
//! - [`pipeline`]: the stages, their runner, the topology (and its RabbitMQ definitions), the
//!   lease sweeper and the worker process.
//! - The edges, the only modules that talk to the outside: [`broker`] (AMQP), [`store`]
//!   (PostgreSQL), [`llm`] (HTTP to models), [`telemetry`] (metrics, health, traces and logs
//!   for operators); with [`config`] and [`redact`].
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
pub mod telemetry;
pub mod understanding;

/// What the system's resolver says of a host name it does not know, in the errors of both the
/// broker's and the database's connections.
pub(crate) const UNKNOWN_HOST: &str = "failed to lookup address information";

/// The text of a caught panic: what `panic!` was given, when it was a string.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// An error with its causes, joined by ": " ("a: b: c"), each said once. A reason must say what
/// went wrong, and some errors keep that in their source only (tokio-postgres says "db error",
/// and the server's message is its source); others show their source in their own message
/// ("broker: IO error: …" over "IO error: …"), and a cause already said is not said again.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::fmt;

    /// An error that says `text`, caused by `source`.
    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn a_cause_is_said_once_whether_or_not_its_error_repeats_it() {
        let refused = Layer("Connection refused (os error 111)", None);
        let io = Layer("IO error: Connection refused (os error 111)", Some(Box::new(refused)));
        let broker = Layer("broker: IO error: Connection refused (os error 111)", Some(Box::new(io)));
        assert_eq!(super::error_chain(&broker), "broker: IO error: Connection refused (os error 111)");

        let server = Layer("password authentication failed for user \"x\"", None);
        let db = Layer("db error", Some(Box::new(server)));
        assert_eq!(super::error_chain(&db), "db error: password authentication failed for user \"x\"");
    }
}
