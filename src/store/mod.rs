//! PostgreSQL: the only module that holds SQL. It applies the [`Write`]s that stages decide, each
//! message's writes in one transaction with its idempotency marker and audit rows, and answers
//! the queries that stages (their context), the command line and the audit need.
//!
//! Its files: `apply/` turns a message's writes into SQL, one function a kind of write; `read`
//! answers the stages, `report` the command line and the audit, `listing` the list of
//! requests, `line` the scheduler, `stats` a benchmark; `quota` keeps the providers' quotas;
//! `agents`, `approvals` and `dead_letters` write what comes from outside a stage's message; `connect`, `tls` and `migrate` set the database
//! up, and `admin` serves test harnesses and tooling. This file is the [`Store`] and its
//! [`Error`].
//!
//! [`Write`]: crate::model::effect::Write

pub mod admin;
mod agents;
mod apply;
mod approvals;
mod cached;
mod connect;
mod dead_letters;
mod line;
mod listing;
mod migrate;
mod quota;
mod read;
mod report;
mod stats;
mod tls;

use deadpool_postgres::Pool;
use tokio_postgres::error::SqlState;

pub use agents::ListedAgent;
pub use apply::{Applied, Delivery, Marker};
pub use approvals::ApprovalOutcome;
pub use connect::{database_name, ensure_database, with_database};
pub use line::{Cancelled, Stopped, WaitingTask};
pub use listing::{RequestFilter, RequestSummary};
pub use quota::{QuotaReport, StoredReservation};
pub use read::*;
pub use report::*;
pub use stats::RequestTiming;

/// What went wrong talking to PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("database migration: {0}")]
    Migration(#[from] refinery::Error),
    #[error("invalid database configuration: {0}")]
    Config(String),
    #[error("{0}")]
    NotFound(String),
    /// The operation is not allowed in the current state (approving a rejected plan, say).
    #[error("{0}")]
    Refused(String),
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
}

impl Error {
    /// Whether the database's host name does not resolve (see
    /// [`crate::broker::Error::is_unknown_host`]).
    pub fn is_unknown_host(&self) -> bool {
        crate::error_chain(self).contains(crate::UNKNOWN_HOST)
    }

    /// Whether retrying later can succeed: the database is unreachable, restarting, overloaded,
    /// or the transaction lost a race. Everything else (bad data, a refused operation) is
    /// permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            // A connection the server refused (a wrong password, a missing database) is refused
            // again; one that did not come (timeout, I/O) may come later.
            Error::Pool(deadpool_postgres::PoolError::Backend(e)) => db_error_is_transient(e),
            Error::Pool(_) => true,
            Error::Db(e) => db_error_is_transient(e),
            // A migration that lost its connection (the server restarting) can run again; one
            // that the server refused, or that is invalid, cannot.
            Error::Migration(e) => match e.kind() {
                refinery::error::Kind::Connection(_, source) => {
                    source.downcast_ref::<tokio_postgres::Error>().is_some_and(db_error_is_transient)
                }
                _ => false,
            },
            Error::Config(_) | Error::NotFound(_) | Error::Refused(_) => false,
            Error::Corrupt(_) => false,
        }
    }
}

impl Error {
    /// Whether the statement failed only because an earlier one of its transaction had failed
    /// (the transaction is aborted): the earlier one's error is the one that says why.
    pub(crate) fn follows_another(&self) -> bool {
        matches!(self, Error::Db(e) if e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION))
    }
}

fn db_error_is_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => true, // connection closed, I/O: not an answer from the server
        Some(code) => {
            let class = &code.code()[..2];
            matches!(class, "08" | "53" | "57" | "58" | "40") || *code == SqlState::LOCK_NOT_AVAILABLE
        }
    }
}

/// A handle on the database: a connection pool. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("status", &self.pool.status()).finish()
    }
}

/// How the connections of a [`Store`]'s pool are used, now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUse {
    pub in_use: usize,
    pub idle: usize,
}

impl Store {
    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, Error> {
        Ok(self.pool.get().await?)
    }

    /// Asks the database whether it answers (a readiness probe).
    pub async fn ping(&self) -> Result<(), Error> {
        self.client().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    pub fn pool_use(&self) -> PoolUse {
        let status = self.pool.status();
        PoolUse { in_use: status.size.saturating_sub(status.available), idle: status.available }
    }
}
