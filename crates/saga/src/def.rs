//! Saga definitions: named, versioned lists of steps.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::SagaId;
use crate::error::{DefinitionError, StepError};

type ActionFn = dyn Fn(StepContext) -> Pin<Box<dyn Future<Output = Result<Value, StepError>> + Send>>
    + Send
    + Sync;
type CompensationFn = dyn Fn(StepContext) -> Pin<Box<dyn Future<Output = Result<(), StepError>> + Send>>
    + Send
    + Sync;

/// A future borrowed from a connection, as the log-transaction work of a step returns it.
pub type WorkFuture<'c> = Pin<Box<dyn Future<Output = Result<(), StepError>> + Send + 'c>>;

/// Work on a connection of the log's database, with the step's context and its action's output.
pub type Work<C> =
    dyn for<'c> Fn(&'c mut C, &'c StepContext, &'c Value) -> WorkFuture<'c> + Send + Sync;

/// Work a step does in the saga log's own database, in the same transaction that records the
/// step as completed: both commit, or neither (see [`Step::in_postgres_log_transaction`] and
/// [`Step::in_sqlite_log_transaction`]).
#[derive(Clone)]
#[non_exhaustive]
pub enum LogTxWork {
    /// For a [`PgSagaLog`](crate::PgSagaLog).
    #[cfg(feature = "postgres")]
    Postgres(Arc<Work<sqlx::PgConnection>>),
    /// For a [`SqliteSagaLog`](crate::SqliteSagaLog).
    #[cfg(feature = "sqlite")]
    Sqlite(Arc<Work<sqlx::SqliteConnection>>),
}

impl fmt::Debug for LogTxWork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LogTxWork({})", self.database())
    }
}

impl LogTxWork {
    /// The log this work runs in (`"postgres"` or `"sqlite"`).
    pub fn database(&self) -> &'static str {
        match *self {
            #[cfg(feature = "postgres")]
            Self::Postgres(_) => "postgres",
            #[cfg(feature = "sqlite")]
            Self::Sqlite(_) => "sqlite",
        }
    }
}

/// What a step is in the saga literature (Garcia-Molina & Salem; Richardson's terms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// Can be undone: on a later failure before the pivot, its compensation runs.
    Compensatable,
    /// The point of no return: once it succeeds the saga goes forward only.
    Pivot,
    /// After the pivot: retried until it succeeds.
    Retriable,
}

/// What a step's action and compensation see.
#[derive(Debug, Clone)]
pub struct StepContext {
    pub(crate) saga_id: SagaId,
    pub(crate) step: Arc<str>,
    pub(crate) input: Arc<Value>,
    pub(crate) outputs: Arc<BTreeMap<String, Value>>,
    pub(crate) attempt: u32,
    pub(crate) compensating: bool,
}

impl StepContext {
    /// The saga's id.
    pub fn saga_id(&self) -> &SagaId {
        &self.saga_id
    }
    /// This step's name.
    pub fn step(&self) -> &str {
        &self.step
    }
    /// The same on every attempt and after every crash: `{saga id}:{step}` for the action,
    /// `{saga id}:{step}:compensation` for the compensation. Pass it to the services you call so
    /// they apply a retried request once.
    pub fn idempotency_key(&self) -> String {
        if self.compensating {
            format!("{}:{}:compensation", self.saga_id, self.step)
        } else {
            format!("{}:{}", self.saga_id, self.step)
        }
    }
    /// Attempt number, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    /// The saga's input.
    pub fn input<T: DeserializeOwned>(&self) -> Result<T, StepError> {
        T::deserialize(&*self.input).map_err(|e| StepError::permanent(format!("input: {e}")))
    }
    /// The output an earlier step returned (for a compensation: its own step's output).
    pub fn output<T: DeserializeOwned>(&self, step: &str) -> Result<T, StepError> {
        let v = self
            .outputs
            .get(step)
            .ok_or_else(|| StepError::permanent(format!("no output from step `{step}`")))?;
        T::deserialize(v).map_err(|e| StepError::permanent(format!("output of `{step}`: {e}")))
    }
}

/// Retries of one step: `max_attempts` tries, waiting `initial * 2^(n-1)` (at most `max`) with
/// jitter between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub(crate) max_attempts: u32,
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
}

impl RetryPolicy {
    /// A policy; checked when the saga is built (attempts at least 1, waits positive, at most a
    /// day).
    pub fn new(max_attempts: u32, initial: Duration, max: Duration) -> Self {
        Self {
            max_attempts,
            initial,
            max,
        }
    }
    /// No retries.
    pub fn none() -> Self {
        Self::new(1, Duration::from_millis(1), Duration::from_millis(1))
    }
    pub(crate) fn wait(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let d = self.initial.saturating_mul(1 << exp).min(self.max);
        d.mul_f64(0.5 + fastrand::f64() * 0.5)
    }
}

impl Default for RetryPolicy {
    /// 3 attempts, 100 ms then 200 ms (with jitter).
    fn default() -> Self {
        Self::new(3, Duration::from_millis(100), Duration::from_secs(10))
    }
}

/// One step of a saga.
#[derive(Clone)]
pub struct Step {
    pub(crate) name: Arc<str>,
    pub(crate) kind: StepKind,
    pub(crate) action: Arc<ActionFn>,
    pub(crate) compensation: Option<Arc<CompensationFn>>,
    pub(crate) retry: RetryPolicy,
    pub(crate) timeout: Duration,
    pub(crate) log_tx: Option<LogTxWork>,
    /// The branches of a parallel group (empty for a plain step).
    pub(crate) branches: Vec<Step>,
    /// Whether this step is a parallel group.
    pub(crate) group: bool,
}

impl fmt::Debug for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// The failures of a group's branches as one error: permanent if any is, naming each branch.
fn join_failures(failures: Vec<(&Arc<str>, StepError)>) -> Option<StepError> {
    if failures.is_empty() {
        return None;
    }
    let permanent = failures.iter().any(|(_, e)| e.is_permanent());
    let message = failures
        .iter()
        .map(|(name, e)| format!("branch `{name}`: {}", e.message()))
        .collect::<Vec<_>>()
        .join("; ");
    Some(if permanent {
        StepError::permanent(message)
    } else {
        StepError::transient(message)
    })
}

fn boxed_action<A, F>(action: A) -> Arc<ActionFn>
where
    A: Fn(StepContext) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Value, StepError>> + Send + 'static,
{
    Arc::new(move |ctx| Box::pin(action(ctx)))
}

impl Step {
    fn new(name: &str, kind: StepKind, action: Arc<ActionFn>) -> Self {
        Self {
            name: name.into(),
            kind,
            action,
            compensation: None,
            retry: RetryPolicy::default(),
            timeout: Duration::from_secs(10),
            log_tx: None,
            branches: Vec::new(),
            group: false,
        }
    }

    /// A parallel group: `branches` run at once (fork), and the group completes when every
    /// branch has (join). The branches are all compensatable (the group then comes before the
    /// pivot) or all retriable (after it); each keeps its own name, which is part of its
    /// idempotency key, and later steps read a branch's output by that name.
    ///
    /// The group is one step of the saga: the group's retry policy and timeout (set on the
    /// returned step) apply to the whole group, and a retry runs every branch again, so
    /// branches must be idempotent by their keys (a branch that already succeeded is called
    /// again with the same key). When a compensatable group fails for good, the saga
    /// compensates from the group itself: every branch's compensation runs, including those of
    /// branches that failed or never ran, so a compensation must accept a key whose action was
    /// never applied (and do nothing). The branches' own retry, timeout and log-transaction
    /// settings are not used.
    ///
    /// ```
    /// use stanchion_saga::{SagaDef, Step};
    /// let ok = |_| async { Ok(serde_json::Value::Null) };
    /// let undo = |_| async { Ok(()) };
    /// let def = SagaDef::builder("trip", 1)
    ///     .step(Step::parallel("book", vec![
    ///         Step::compensatable("flight", ok, undo),
    ///         Step::compensatable("hotel", ok, undo),
    ///     ]))
    ///     .step(Step::pivot("pay", ok))
    ///     .build()?;
    /// assert_eq!(def.steps().len(), 2);
    /// # Ok::<(), stanchion_saga::DefinitionError>(())
    /// ```
    pub fn parallel(name: &str, branches: Vec<Step>) -> Self {
        let kind = branches.first().map_or(StepKind::Compensatable, |b| b.kind);
        let actions: Vec<(Arc<str>, Arc<ActionFn>)> = branches
            .iter()
            .map(|b| (Arc::clone(&b.name), Arc::clone(&b.action)))
            .collect();
        let action: Arc<ActionFn> = Arc::new(move |ctx: StepContext| {
            let runs = actions.iter().map(|(name, action)| {
                let mut branch = ctx.clone();
                branch.step = Arc::clone(name);
                action(branch)
            });
            let joined = futures_util::future::join_all(runs);
            let names: Vec<Arc<str>> = actions.iter().map(|(n, _)| Arc::clone(n)).collect();
            Box::pin(async move {
                let mut outputs = serde_json::Map::new();
                let mut failures = Vec::new();
                for (name, result) in names.iter().zip(joined.await) {
                    match result {
                        Ok(v) => {
                            outputs.insert(name.to_string(), v);
                        }
                        Err(e) => failures.push((name, e)),
                    }
                }
                join_failures(failures).map_or(Ok(Value::Object(outputs)), Err)
            })
        });
        let mut step = Self::new(name, kind, action);
        let compensations: Option<Vec<(Arc<str>, Arc<CompensationFn>)>> = branches
            .iter()
            .map(|b| b.compensation.clone().map(|c| (Arc::clone(&b.name), c)))
            .collect();
        if let (StepKind::Compensatable, Some(compensations)) = (kind, compensations) {
            step.compensation = Some(Arc::new(move |ctx: StepContext| {
                let runs = compensations.iter().map(|(name, compensation)| {
                    let mut branch = ctx.clone();
                    branch.step = Arc::clone(name);
                    compensation(branch)
                });
                let joined = futures_util::future::join_all(runs);
                let names: Vec<Arc<str>> =
                    compensations.iter().map(|(n, _)| Arc::clone(n)).collect();
                Box::pin(async move {
                    let failures: Vec<(&Arc<str>, StepError)> = names
                        .iter()
                        .zip(joined.await)
                        .filter_map(|(name, r)| r.err().map(|e| (name, e)))
                        .collect();
                    join_failures(failures).map_or(Ok(()), Err)
                })
            }));
        }
        step.branches = branches;
        step.group = true;
        step
    }

    /// A step that can be undone by `compensation`.
    pub fn compensatable<A, F, C, G>(name: &str, action: A, compensation: C) -> Self
    where
        A: Fn(StepContext) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Value, StepError>> + Send + 'static,
        C: Fn(StepContext) -> G + Send + Sync + 'static,
        G: Future<Output = Result<(), StepError>> + Send + 'static,
    {
        let mut s = Self::new(name, StepKind::Compensatable, boxed_action(action));
        s.compensation = Some(Arc::new(move |ctx| Box::pin(compensation(ctx))));
        s
    }

    /// The point of no return.
    pub fn pivot<A, F>(name: &str, action: A) -> Self
    where
        A: Fn(StepContext) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Value, StepError>> + Send + 'static,
    {
        Self::new(name, StepKind::Pivot, boxed_action(action))
    }

    /// A step after the pivot, retried until it succeeds.
    pub fn retriable<A, F>(name: &str, action: A) -> Self
    where
        A: Fn(StepContext) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Value, StepError>> + Send + 'static,
    {
        Self::new(name, StepKind::Retriable, boxed_action(action))
    }

    /// This step's retry policy (compensations use it too, then park).
    #[must_use]
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The longest one attempt may take (default 10 s); must be under half the executor's
    /// lease.
    #[must_use]
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Work this step does in the saga log's own PostgreSQL database, in the transaction that
    /// records the step as completed, after its action succeeded (with the action's output): an
    /// outbox enqueue, a row of the step's own. The work and the log entry commit together or
    /// not at all: a crash before the commit leaves neither, and the step runs again. An error
    /// from the work counts as a failed attempt of the step. Only a [`PgSagaLog`](crate::PgSagaLog)
    /// can run it; an executor over another log refuses the definition.
    ///
    /// ```
    /// use stanchion_saga::Step;
    /// let step = Step::pivot("charge", |_| async { Ok(serde_json::json!({"receipt": "r-1"})) })
    ///     .in_postgres_log_transaction(|conn, ctx, receipt| {
    ///         let (key, receipt) = (ctx.idempotency_key(), receipt.to_string());
    ///         Box::pin(async move {
    ///             sqlx::query("INSERT INTO receipts (key, receipt) VALUES ($1, $2)")
    ///                 .bind(key)
    ///                 .bind(receipt)
    ///                 .execute(&mut *conn)
    ///                 .await
    ///                 .map_err(stanchion_saga::StepError::transient)?;
    ///             Ok(())
    ///         })
    ///     });
    /// # let _ = step;
    /// ```
    #[cfg(feature = "postgres")]
    #[must_use]
    pub fn in_postgres_log_transaction<W>(mut self, work: W) -> Self
    where
        W: for<'c> Fn(&'c mut sqlx::PgConnection, &'c StepContext, &'c Value) -> WorkFuture<'c>
            + Send
            + Sync
            + 'static,
    {
        self.log_tx = Some(LogTxWork::Postgres(Arc::new(work)));
        self
    }

    /// [`in_postgres_log_transaction`](Self::in_postgres_log_transaction) for a
    /// [`SqliteSagaLog`](crate::SqliteSagaLog).
    #[cfg(feature = "sqlite")]
    #[must_use]
    pub fn in_sqlite_log_transaction<W>(mut self, work: W) -> Self
    where
        W: for<'c> Fn(&'c mut sqlx::SqliteConnection, &'c StepContext, &'c Value) -> WorkFuture<'c>
            + Send
            + Sync
            + 'static,
    {
        self.log_tx = Some(LogTxWork::Sqlite(Arc::new(work)));
        self
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The kind.
    pub fn kind(&self) -> StepKind {
        self.kind
    }
}

/// Why a parallel group cannot be used, if it cannot.
fn group_problem(s: &Step) -> Option<&'static str> {
    if !s.group {
        return None;
    }
    let Some(first) = s.branches.first() else {
        return Some("is a parallel group without branches");
    };
    if s.branches.iter().any(|b| !b.branches.is_empty()) {
        return Some("is a parallel group inside a parallel group");
    }
    if s.log_tx.is_some() || s.branches.iter().any(|b| b.log_tx.is_some()) {
        return Some("is a parallel group with work in the log transaction (not supported)");
    }
    match first.kind {
        StepKind::Pivot => Some("is a parallel group with a pivot (a pivot runs alone)"),
        kind if s.branches.iter().any(|b| b.kind != kind) => {
            Some("is a parallel group mixing compensatable and retriable branches")
        }
        _ => None,
    }
}

/// A named, versioned saga: its steps in order.
///
/// ```
/// use stanchion_saga::{SagaDef, Step, StepError};
/// let def = SagaDef::builder("create-order", 1)
///     .step(Step::compensatable("reserve", |_| async { Ok(serde_json::json!({"hold": 7})) },
///                                          |_| async { Ok(()) }))
///     .step(Step::pivot("charge", |_| async { Ok(serde_json::Value::Null) }))
///     .step(Step::retriable("confirm", |_| async { Ok(serde_json::Value::Null) }))
///     .build()?;
/// assert_eq!(def.steps().len(), 3);
/// // A compensatable step after the pivot is refused.
/// assert!(SagaDef::builder("bad", 1)
///     .step(Step::pivot("charge", |_| async { Ok(serde_json::Value::Null) }))
///     .step(Step::compensatable("reserve", |_| async { Ok(serde_json::Value::Null) },
///                                          |_| async { Ok::<(), StepError>(()) }))
///     .build().is_err());
/// # Ok::<(), stanchion_saga::DefinitionError>(())
/// ```
#[derive(Debug, Clone)]
pub struct SagaDef {
    pub(crate) name: Arc<str>,
    pub(crate) version: u32,
    pub(crate) steps: Vec<Step>,
    pub(crate) deadline: Option<Duration>,
    pub(crate) pivot: Option<usize>,
}

impl SagaDef {
    /// Starts a definition.
    pub fn builder(name: &str, version: u32) -> SagaDefBuilder {
        SagaDefBuilder {
            name: name.to_owned(),
            version,
            steps: Vec::new(),
            deadline: None,
        }
    }
    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The version.
    pub fn version(&self) -> u32 {
        self.version
    }
    /// The steps.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }
    /// The pivot step, if the saga has one.
    pub fn pivot(&self) -> Option<&Step> {
        self.pivot.map(|i| &self.steps[i])
    }
}

/// Builder for [`SagaDef`].
#[must_use]
#[derive(Debug)]
pub struct SagaDefBuilder {
    name: String,
    version: u32,
    steps: Vec<Step>,
    deadline: Option<Duration>,
}

impl SagaDefBuilder {
    /// Appends a step.
    pub fn step(mut self, step: Step) -> Self {
        self.steps.push(step);
        self
    }
    /// A deadline from the start: past it, a saga that has not reached its pivot compensates.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = Some(d);
        self
    }
    /// Checks the definition.
    pub fn build(self) -> Result<SagaDef, DefinitionError> {
        let saga = self.name.clone();
        if self.name.is_empty() || self.name.len() > 200 {
            return Err(DefinitionError::Setting {
                field: "name",
                reason: "must be 1 to 200 bytes".into(),
            });
        }
        if self.steps.is_empty() {
            return Err(DefinitionError::Empty(saga));
        }
        let mut seen = HashSet::new();
        let mut pivot = None;
        let mut past = false;
        for (i, s) in self.steps.iter().enumerate() {
            if s.name.is_empty() || s.name.contains(':') {
                return Err(DefinitionError::Order {
                    saga,
                    step: s.name.to_string(),
                    reason: "needs a non-empty name without `:` (it is part of idempotency keys)",
                });
            }
            if !seen.insert(s.name.clone()) {
                return Err(DefinitionError::DuplicateStep {
                    saga,
                    step: s.name.to_string(),
                });
            }
            if let Some(reason) = group_problem(s) {
                return Err(DefinitionError::Order {
                    saga,
                    step: s.name.to_string(),
                    reason,
                });
            }
            for b in &s.branches {
                if b.name.is_empty() || b.name.contains(':') {
                    return Err(DefinitionError::Order {
                        saga,
                        step: b.name.to_string(),
                        reason: "needs a non-empty name without `:` (it is part of idempotency keys)",
                    });
                }
                if !seen.insert(b.name.clone()) {
                    return Err(DefinitionError::DuplicateStep {
                        saga,
                        step: b.name.to_string(),
                    });
                }
            }
            match s.kind {
                StepKind::Compensatable if past => {
                    return Err(DefinitionError::Order {
                        saga,
                        step: s.name.to_string(),
                        reason: "is compensatable but comes after the pivot",
                    });
                }
                StepKind::Pivot if pivot.is_some() => {
                    return Err(DefinitionError::Order {
                        saga,
                        step: s.name.to_string(),
                        reason: "is a second pivot",
                    });
                }
                StepKind::Pivot => {
                    pivot = Some(i);
                    past = true;
                }
                StepKind::Retriable if !past && i > 0 => {
                    return Err(DefinitionError::Order {
                        saga,
                        step: s.name.to_string(),
                        reason: "is retriable but follows compensatable steps without a pivot",
                    });
                }
                StepKind::Retriable => past = true,
                StepKind::Compensatable => {}
            }
            let p = s.retry;
            if p.max_attempts == 0
                || p.initial.is_zero()
                || p.max < p.initial
                || p.max > Duration::from_secs(86_400)
            {
                return Err(DefinitionError::Setting {
                    field: "retry",
                    reason: format!(
                        "step `{}`: attempts at least 1, 0 < initial <= max <= 1 day",
                        s.name
                    ),
                });
            }
            if s.timeout.is_zero() || s.timeout > Duration::from_secs(86_400) {
                return Err(DefinitionError::Setting {
                    field: "timeout",
                    reason: format!("step `{}`: between 0 and a day", s.name),
                });
            }
        }
        if self
            .deadline
            .is_some_and(|d| d.is_zero() || d > Duration::from_secs(365 * 86_400))
        {
            return Err(DefinitionError::Setting {
                field: "deadline",
                reason: "must be positive and at most a year".into(),
            });
        }
        Ok(SagaDef {
            name: self.name.into(),
            version: self.version,
            steps: self.steps,
            deadline: self.deadline,
            pivot,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(name: &str) -> Step {
        Step::retriable(name, |_| async { Ok(Value::Null) })
    }
    fn comp(name: &str) -> Step {
        Step::compensatable(name, |_| async { Ok(Value::Null) }, |_| async { Ok(()) })
    }
    fn pivot(name: &str) -> Step {
        Step::pivot(name, |_| async { Ok(Value::Null) })
    }

    #[test]
    fn bad_definitions_are_refused_with_the_reason() {
        let err = |b: SagaDefBuilder| b.build().unwrap_err().to_string();
        assert!(err(SagaDef::builder("s", 1)).contains("no steps"));
        assert!(
            err(SagaDef::builder("s", 1).step(comp("a")).step(comp("a")))
                .contains("two steps named `a`")
        );
        assert!(
            err(SagaDef::builder("s", 1).step(pivot("p")).step(comp("c")))
                .contains("after the pivot")
        );
        assert!(
            err(SagaDef::builder("s", 1).step(pivot("p")).step(pivot("q")))
                .contains("second pivot")
        );
        assert!(
            err(SagaDef::builder("s", 1).step(comp("c")).step(ok("r"))).contains("without a pivot")
        );
        assert!(err(SagaDef::builder("s", 1).step(comp("a:b"))).contains("without `:`"));
        assert!(
            err(
                SagaDef::builder("s", 1).step(comp("a").retry(RetryPolicy::new(
                    0,
                    Duration::from_millis(1),
                    Duration::from_millis(1)
                )))
            )
            .contains("retry")
        );
        assert!(
            err(SagaDef::builder("s", 1).step(comp("a").timeout(Duration::ZERO)))
                .contains("timeout")
        );
        assert!(
            err(SagaDef::builder("s", 1)
                .step(comp("a"))
                .deadline(Duration::ZERO))
            .contains("deadline")
        );
        assert!(err(SagaDef::builder("", 1).step(comp("a"))).contains("name"));
    }

    #[test]
    fn bad_parallel_groups_are_refused_with_the_reason() {
        let err = |b: SagaDefBuilder| b.build().unwrap_err().to_string();
        let group = Step::parallel;
        assert!(
            err(SagaDef::builder("s", 1).step(group("g", vec![]))).contains("without branches")
        );
        assert!(
            err(SagaDef::builder("s", 1).step(group("g", vec![comp("a"), pivot("p")])))
                .contains("mixing")
        );
        assert!(
            err(SagaDef::builder("s", 1).step(group("g", vec![pivot("p"), pivot("q")])))
                .contains("a pivot runs alone")
        );
        assert!(
            err(SagaDef::builder("s", 1).step(group("g", vec![comp("a"), ok("b")])))
                .contains("mixing")
        );
        assert!(
            err(SagaDef::builder("s", 1).step(group("g", vec![group("h", vec![comp("a")])])))
                .contains("inside a parallel group")
        );
        // Branch names are idempotency keys too: unique across the saga.
        assert!(
            err(SagaDef::builder("s", 1)
                .step(comp("a"))
                .step(group("g", vec![comp("a"), comp("b")])))
            .contains("two steps named `a`")
        );
        assert!(
            err(SagaDef::builder("s", 1).step(group("g", vec![comp("x:y")])))
                .contains("without `:`")
        );
        // A retriable group before the pivot, a compensatable one after it.
        assert!(
            err(SagaDef::builder("s", 1)
                .step(pivot("p"))
                .step(group("g", vec![comp("a"), comp("b")])))
            .contains("after the pivot")
        );
        assert!(
            SagaDef::builder("s", 1)
                .step(group("g", vec![comp("a"), comp("b")]))
                .step(pivot("p"))
                .step(group("h", vec![ok("c"), ok("d")]))
                .build()
                .is_ok()
        );
    }

    #[test]
    fn good_orders_are_accepted() {
        for b in [
            SagaDef::builder("s", 1).step(comp("a")).step(comp("b")),
            SagaDef::builder("s", 1)
                .step(comp("a"))
                .step(pivot("p"))
                .step(ok("r")),
            SagaDef::builder("s", 1).step(pivot("p")).step(ok("r")),
            SagaDef::builder("s", 1).step(ok("r")).step(ok("s")),
        ] {
            b.build().unwrap();
        }
        let d = SagaDef::builder("s", 1)
            .step(comp("a"))
            .step(pivot("p"))
            .build()
            .unwrap();
        assert_eq!(d.pivot().map(Step::name), Some("p"));
    }

    #[test]
    fn retry_waits_grow_and_stay_under_the_cap() {
        let p = RetryPolicy::new(10, Duration::from_millis(100), Duration::from_secs(1));
        assert!(p.wait(1) <= Duration::from_millis(100) && p.wait(1) >= Duration::from_millis(50));
        assert!(p.wait(30) <= Duration::from_secs(1));
        assert!(p.wait(u32::MAX) <= Duration::from_secs(1));
    }
}
