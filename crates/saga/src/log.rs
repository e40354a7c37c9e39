//! The saga log: the seam between the executor and its database.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use crate::error::SagaError;

/// A saga's id: 128 random bits in hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SagaId(pub(crate) String);

impl SagaId {
    pub(crate) fn random() -> Self {
        Self(format!(
            "{:016x}{:016x}",
            fastrand::u64(..),
            fastrand::u64(..)
        ))
    }
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for SagaId {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl fmt::Display for SagaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a saga is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Going forward.
    Running,
    /// Undoing its completed steps.
    Compensating,
    /// Every step succeeded.
    Completed,
    /// Every completed step before the failure was compensated.
    Compensated,
    /// Waiting for an operator: a compensation kept failing, a step after the pivot failed
    /// permanently, or the log row could not be used (unknown definition, corrupt data).
    Parked,
    /// An operator closed it by hand.
    Resolved,
}

impl Status {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::Parked => "parked",
            Self::Resolved => "resolved",
        }
    }
    /// Parses the stored text.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => Self::Running,
            "compensating" => Self::Compensating,
            "completed" => Self::Completed,
            "compensated" => Self::Compensated,
            "parked" => Self::Parked,
            "resolved" => Self::Resolved,
            _ => return None,
        })
    }
    /// Whether the saga is over.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Compensated | Self::Resolved)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A saga as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SagaRecord {
    /// The id.
    pub id: SagaId,
    /// Definition name.
    pub name: String,
    /// Definition version it started under (it finishes under the same one).
    pub version: u32,
    /// Where it is.
    pub status: Status,
    /// Running: the next step to run. Compensating: the next step to compensate (-1: none left).
    pub position: i64,
    /// The input, JSON.
    pub input: String,
    /// Step outputs, a JSON object keyed by step name.
    pub outputs: String,
    /// Failed attempts of the current step.
    pub attempts: u32,
    /// Lease generation: every write is fenced by it.
    pub generation: i64,
    /// The last error.
    pub error: Option<String>,
    /// Whether the saga's deadline has passed (database clock).
    pub deadline_passed: bool,
    /// For a parked saga: whether it was going forward or compensating.
    pub parked_from: Option<Status>,
}

/// One line of a saga's history.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HistoryEntry {
    /// Order within the saga.
    pub seq: i64,
    /// What happened (`started`, `step_completed`, `step_failed`, `compensating`, `compensated`,
    /// `completed`, `parked`, `retried`, `resolved`).
    pub kind: String,
    /// The step, if any.
    pub step: Option<String>,
    /// Detail (an error, a note).
    pub detail: Option<String>,
}

/// A saga to create, already leased by the executor creating it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NewSaga {
    /// Its id.
    pub id: SagaId,
    /// Definition name.
    pub name: String,
    /// Definition version.
    pub version: u32,
    /// Input, JSON.
    pub input: String,
    /// The executor creating it.
    pub owner: String,
    /// Its lease.
    pub lease: Duration,
    /// Its deadline, from now.
    pub deadline: Option<Duration>,
}

/// A fenced write: applied only if the saga's generation is still `generation`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Transition {
    /// The saga.
    pub id: SagaId,
    /// The lease generation the writer holds.
    pub generation: i64,
    /// New status.
    pub status: Status,
    /// New position.
    pub position: i64,
    /// New outputs (JSON), or unchanged.
    pub outputs: Option<String>,
    /// Failed attempts of the current step.
    pub attempts: u32,
    /// The error to record, if any.
    pub error: Option<String>,
    /// For `Parked`: the phase it was in.
    pub parked_from: Option<Status>,
    /// Renew the lease for this long; `None` gives it up.
    pub lease: Option<Duration>,
    /// The history line.
    pub event: &'static str,
    /// The step of the history line.
    pub step: Option<String>,
}

/// What [`SagaLogStore::write_with_work`] did.
#[derive(Debug)]
#[non_exhaustive]
pub enum WorkWrite {
    /// The step's work and the transition committed together.
    Written,
    /// Fenced out (the lease was lost): nothing written, the work rolled back.
    Fenced,
    /// The work failed: rolled back, nothing written.
    WorkFailed(crate::StepError),
}

/// Storage of saga state and history. [`PgSagaLog`](crate::PgSagaLog) and
/// [`SqliteSagaLog`](crate::SqliteSagaLog) implement it.
pub trait SagaLogStore: Send + Sync + 'static {
    /// Inserts a saga (and its `started` line) in one commit.
    fn create(&self, saga: &NewSaga) -> impl Future<Output = Result<(), SagaError>> + Send;
    /// Leases up to `limit` unfinished sagas whose lease has expired (crashed or stopped
    /// executors' sagas among them), bumping each one's generation.
    fn claim(
        &self,
        owner: &str,
        lease: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<SagaRecord>, SagaError>> + Send;
    /// Applies a transition and its history line in one commit; `Ok(false)`: fenced out (the
    /// lease was lost), nothing written.
    fn write(&self, t: &Transition) -> impl Future<Output = Result<bool, SagaError>> + Send;
    /// Whether this log can run a step's log-transaction `work` (checked when an executor
    /// starts; a log that cannot refuses the definition).
    fn runs(&self, work: &crate::LogTxWork) -> bool {
        let _ = work;
        false
    }
    /// Runs a step's `work` (given the step's context and its action's output) and applies the
    /// transition, in one transaction of the log's database.
    fn write_with_work(
        &self,
        t: &Transition,
        work: &crate::LogTxWork,
        ctx: &crate::StepContext,
        output: &serde_json::Value,
    ) -> impl Future<Output = Result<WorkWrite, SagaError>> + Send {
        let _ = (t, ctx, output);
        let database = work.database();
        async move { Err(SagaError::Unsupported(database)) }
    }
    /// One saga.
    fn get(
        &self,
        id: &SagaId,
    ) -> impl Future<Output = Result<Option<SagaRecord>, SagaError>> + Send;
    /// A saga's history, oldest first.
    fn history(
        &self,
        id: &SagaId,
    ) -> impl Future<Output = Result<Vec<HistoryEntry>, SagaError>> + Send;
    /// Parked sagas, oldest first.
    fn parked(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<SagaRecord>, SagaError>> + Send;
    /// Operator: puts a parked saga back to where it was parked from (attempts reset), or
    /// closes it (`resolve`). `Ok(false)`: it is not parked.
    fn operate(
        &self,
        id: &SagaId,
        resolve: bool,
        note: &str,
    ) -> impl Future<Output = Result<bool, SagaError>> + Send;
}
