//! Errors, each `#[non_exhaustive]`.

use std::fmt;

/// A saga definition or executor setting refused when it is built.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DefinitionError {
    /// A saga needs at least one step.
    #[error("saga `{0}` has no steps")]
    Empty(String),
    /// Two steps share a name (names key the stored outputs and idempotency keys).
    #[error("saga `{saga}` has two steps named `{step}`")]
    DuplicateStep {
        /// The saga.
        saga: String,
        /// The repeated name.
        step: String,
    },
    /// Steps must come in the order compensatable*, pivot?, retriable*.
    #[error("saga `{saga}`: step `{step}` {reason}")]
    Order {
        /// The saga.
        saga: String,
        /// The misplaced step.
        step: String,
        /// Why.
        reason: &'static str,
    },
    /// A setting out of range.
    #[error("`{field}` {reason}")]
    Setting {
        /// The setting.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

/// How a step failed. `Transient` failures are retried by the step's policy; `Permanent` ones
/// are not (a declined card): before the pivot the saga compensates at once, after it the saga
/// is parked for an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError {
    permanent: bool,
    message: String,
}

impl StepError {
    /// A failure worth retrying (a timeout, a 503).
    pub fn transient(message: impl fmt::Display) -> Self {
        Self {
            permanent: false,
            message: message.to_string(),
        }
    }
    /// A failure retrying cannot fix.
    pub fn permanent(message: impl fmt::Display) -> Self {
        Self {
            permanent: true,
            message: message.to_string(),
        }
    }
    /// Whether retrying is pointless.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }
    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.permanent {
            "permanent"
        } else {
            "transient"
        };
        write!(f, "{kind}: {}", self.message)
    }
}

impl std::error::Error for StepError {}

/// A failure of the saga log or of the executor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SagaError {
    /// The database failed.
    #[error("saga log database error: {0}")]
    Database(#[source] sqlx::Error),
    /// No definition with this name is registered.
    #[error("no saga definition named `{0}` is registered")]
    UnknownSaga(String),
    /// The input does not serialize.
    #[error("the saga input does not serialize: {0}")]
    Input(#[source] serde_json::Error),
    /// No saga with this id.
    #[error("no saga with id {0}")]
    NotFound(String),
    /// The saga is not in a state that allows this operation.
    #[error("saga {id} is {status}, not {expected}")]
    WrongStatus {
        /// The saga.
        id: String,
        /// Its status.
        status: String,
        /// What the operation needs.
        expected: &'static str,
    },
    /// Waiting for a saga timed out.
    #[error("saga {0} did not finish in time")]
    Timeout(String),
    /// A step's log-transaction work is for another database than this log's.
    #[error("this saga log cannot run a step's {0} log-transaction work")]
    Unsupported(&'static str),
}
