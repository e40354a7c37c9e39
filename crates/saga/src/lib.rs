//! Orchestrated sagas with a persisted log on the application's own database.
//!
//! A saga is a named, versioned list of steps ([`SagaDef`]): compensatable steps, at most one
//! pivot (the point of no return), then retriable steps. An [`Executor`] runs each saga step by
//! step and writes every transition to a log ([`PgSagaLog`], or [`SqliteSagaLog`] as the
//! embedded default) in one commit per step; a failure before the pivot compensates the
//! completed steps in reverse order, a failure after it is retried until it succeeds. An
//! executor that dies leaves its sagas leased; when the lease expires another executor resumes
//! them where the log says they are, and every write is fenced by a lease generation, so two
//! executors never both advance one saga. Steps get a stable idempotency key
//! ([`StepContext::idempotency_key`]), so a step re-run after a crash is applied once by the
//! services it calls.
//!
//! See the [`Executor`] example, and the crate README for the guarantees and the log schema.

mod def;
mod error;
mod executor;
mod log;
#[cfg(feature = "postgres")]
mod pg;
#[cfg(feature = "sqlite")]
mod sqlite;

pub use def::{
    LogTxWork, RetryPolicy, SagaDef, SagaDefBuilder, Step, StepContext, StepKind, Work, WorkFuture,
};
pub use error::{DefinitionError, SagaError, StepError};
pub use executor::{Executor, ExecutorBuilder, ExecutorStats};
pub use log::{
    HistoryEntry, NewSaga, SagaId, SagaLogStore, SagaRecord, Status, Transition, WorkWrite,
};
#[cfg(feature = "postgres")]
pub use pg::{PgSagaLog, postgres_schema};
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteSagaLog, sqlite_schema};

/// A namespace names tables: a plain lower-case identifier only.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) fn check_namespace(ns: &str) -> Result<(), DefinitionError> {
    let ok = !ns.is_empty()
        && ns.len() <= 40
        && ns
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(DefinitionError::Setting {
            field: "namespace",
            reason: "must match [a-z_][a-z0-9_]{0,39}".into(),
        })
    }
}

#[cfg(all(doctest, feature = "sqlite"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
