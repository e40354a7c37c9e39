//! The executor: runs sagas step by step, writing each transition to the log, and resumes the
//! unfinished ones of crashed executors once their lease expires.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::{Mutex, Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::def::{LogTxWork, SagaDef, StepContext, StepKind};
use crate::error::{DefinitionError, SagaError, StepError};
use crate::log::{
    HistoryEntry, NewSaga, SagaId, SagaLogStore, SagaRecord, Status, Transition, WorkWrite,
};

/// Counters of what an executor has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExecutorStats {
    /// Sagas begun here.
    pub started: u64,
    /// Sagas this executor took over from the log (crashed or stopped executors' sagas).
    pub resumed: u64,
    /// Sagas finished with every step done.
    pub completed: u64,
    /// Sagas finished compensated.
    pub compensated: u64,
    /// Sagas parked for an operator.
    pub parked: u64,
    /// Step actions and compensations run (attempts).
    pub step_runs: u64,
    /// Writes refused because another executor took the saga over (lease lost).
    pub lease_lost: u64,
}

#[derive(Default)]
struct Counters {
    started: AtomicU64,
    resumed: AtomicU64,
    completed: AtomicU64,
    compensated: AtomicU64,
    parked: AtomicU64,
    step_runs: AtomicU64,
    lease_lost: AtomicU64,
}

/// Builder for [`Executor`].
#[must_use]
pub struct ExecutorBuilder<L> {
    log: L,
    defs: Vec<SagaDef>,
    name: String,
    lease: Duration,
    poll_interval: Duration,
    max_in_flight: usize,
}

impl<L> std::fmt::Debug for ExecutorBuilder<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutorBuilder")
            .field("name", &self.name)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl<L: SagaLogStore + Clone> ExecutorBuilder<L> {
    /// Registers a saga definition (several versions of one name may be registered: new sagas
    /// use the highest, running ones keep theirs).
    pub fn register(mut self, def: SagaDef) -> Self {
        self.defs.push(def);
        self
    }
    /// This executor's name in the log (default: random).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
    /// How long a saga stays this executor's without a write (default 30 s). Every step's
    /// timeout must be at most half of it.
    pub fn lease(mut self, d: Duration) -> Self {
        self.lease = d;
        self
    }
    /// How often the log is searched for sagas to resume (default 1 s).
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d;
        self
    }
    /// Sagas run at once (default 64).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n;
        self
    }

    /// Checks the settings against the definitions and starts the executor on the current
    /// tokio runtime: it resumes unfinished sagas at once, then every `poll_interval`.
    pub fn start(self) -> Result<Executor<L>, DefinitionError> {
        if self.lease < Duration::from_millis(10) || self.lease > Duration::from_secs(86_400) {
            return Err(DefinitionError::Setting {
                field: "lease",
                reason: "must be between 10 ms and a day".into(),
            });
        }
        if self.poll_interval.is_zero() || self.max_in_flight == 0 {
            return Err(DefinitionError::Setting {
                field: "poll_interval / max_in_flight",
                reason: "must be positive".into(),
            });
        }
        let mut defs = HashMap::new();
        let mut latest: HashMap<String, u32> = HashMap::new();
        for d in self.defs {
            for s in &d.steps {
                if let Some(work) = &s.log_tx
                    && !self.log.runs(work)
                {
                    return Err(DefinitionError::Setting {
                        field: "log transaction",
                        reason: format!(
                            "step `{}` of `{}` works in a {} log's transaction; this executor's log cannot run it",
                            s.name,
                            d.name,
                            work.database()
                        ),
                    });
                }
                if s.timeout.saturating_mul(2) > self.lease {
                    return Err(DefinitionError::Setting {
                        field: "timeout",
                        reason: format!(
                            "step `{}` of `{}`: its timeout must be at most half the lease ({:?})",
                            s.name, d.name, self.lease
                        ),
                    });
                }
            }
            let v = latest.entry(d.name.to_string()).or_insert(d.version);
            *v = (*v).max(d.version);
            defs.insert((d.name.to_string(), d.version), Arc::new(d));
        }
        let (stop, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            log: self.log,
            defs,
            latest,
            name: self.name,
            lease: self.lease,
            poll_interval: self.poll_interval,
            permits: Arc::new(Semaphore::new(self.max_in_flight)),
            wake: Notify::new(),
            stop,
            stats: Counters::default(),
            tasks: Mutex::new(JoinSet::new()),
        });
        let worker = Arc::clone(&inner);
        let handle = tokio::spawn(async move { worker.recover_loop().await });
        Ok(Executor {
            inner,
            worker: Arc::new(std::sync::Mutex::new(Some(handle))),
        })
    }
}

struct Inner<L> {
    log: L,
    defs: HashMap<(String, u32), Arc<SagaDef>>,
    latest: HashMap<String, u32>,
    name: String,
    lease: Duration,
    poll_interval: Duration,
    permits: Arc<Semaphore>,
    wake: Notify,
    stop: watch::Sender<bool>,
    stats: Counters,
    tasks: Mutex<JoinSet<()>>,
}

/// Runs sagas. Cheap to clone; every clone is the same executor.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use stanchion_saga::{Executor, SagaDef, SqliteSagaLog, Status, Step};
/// use std::time::Duration;
/// // One connection: an in-memory database shared by several connections locks whole tables.
/// let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
/// let log = SqliteSagaLog::new(pool.clone(), "shop")?;
/// sqlx::raw_sql(sqlx::AssertSqlSafe(stanchion_saga::sqlite_schema("shop")?)).execute(&pool).await?;
/// let order = SagaDef::builder("order", 1)
///     .step(Step::compensatable("reserve", |_| async { Ok(serde_json::json!(7)) }, |_| async { Ok(()) }))
///     .step(Step::pivot("charge", |ctx| async move {
///         let hold: u32 = ctx.output("reserve")?;
///         Ok(serde_json::json!({ "charged_for_hold": hold }))
///     }))
///     .build()?;
/// let executor = Executor::builder(log).register(order).start()?;
/// let id = executor.begin("order", &serde_json::json!({"sku": "tea"})).await?;
/// let done = executor.wait(&id, Duration::from_secs(5)).await?;
/// assert_eq!(done.status, Status::Completed);
/// executor.shutdown(Duration::from_secs(5)).await;
/// # Ok(()) }
/// ```
pub struct Executor<L> {
    inner: Arc<Inner<L>>,
    worker: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl<L> Clone for Executor<L> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            worker: Arc::clone(&self.worker),
        }
    }
}

impl<L> std::fmt::Debug for Executor<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

impl<L: SagaLogStore + Clone> Executor<L> {
    /// A builder over `log`.
    pub fn builder(log: L) -> ExecutorBuilder<L> {
        ExecutorBuilder {
            log,
            defs: Vec::new(),
            name: format!("executor-{:016x}", fastrand::u64(..)),
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            max_in_flight: 64,
        }
    }

    /// Begins a saga of the highest registered version of `name`: one commit (the saga row and
    /// its `started` line), then it runs in the background.
    pub async fn begin<I: Serialize + ?Sized>(
        &self,
        name: &str,
        input: &I,
    ) -> Result<SagaId, SagaError> {
        let version = *self
            .inner
            .latest
            .get(name)
            .ok_or_else(|| SagaError::UnknownSaga(name.to_owned()))?;
        let def = Arc::clone(&self.inner.defs[&(name.to_owned(), version)]);
        let input = serde_json::to_string(input).map_err(SagaError::Input)?;
        let id = SagaId::random();
        self.inner
            .log
            .create(&NewSaga {
                id: id.clone(),
                name: name.to_owned(),
                version,
                input: input.clone(),
                owner: self.inner.name.clone(),
                lease: self.inner.lease,
                deadline: def.deadline,
            })
            .await?;
        count(&self.inner.stats, Event::Started, name);
        let record = SagaRecord {
            id: id.clone(),
            name: name.to_owned(),
            version,
            status: Status::Running,
            position: 0,
            input,
            outputs: "{}".to_owned(),
            attempts: 0,
            generation: 1,
            error: None,
            deadline_passed: false,
            parked_from: None,
        };
        let deadline = def.deadline.map(|d| Instant::now() + d);
        self.inner.spawn_drive(record, deadline).await;
        Ok(id)
    }

    /// Waits until the saga is over (completed, compensated, resolved) or parked.
    pub async fn wait(&self, id: &SagaId, timeout: Duration) -> Result<SagaRecord, SagaError> {
        let start = Instant::now();
        loop {
            let r = self
                .inner
                .log
                .get(id)
                .await?
                .ok_or_else(|| SagaError::NotFound(id.to_string()))?;
            if r.status.is_final() || r.status == Status::Parked {
                return Ok(r);
            }
            if start.elapsed() >= timeout {
                return Err(SagaError::Timeout(id.to_string()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The saga as stored.
    pub async fn get(&self, id: &SagaId) -> Result<Option<SagaRecord>, SagaError> {
        self.inner.log.get(id).await
    }
    /// The saga's history.
    pub async fn history(&self, id: &SagaId) -> Result<Vec<HistoryEntry>, SagaError> {
        self.inner.log.history(id).await
    }
    /// Parked sagas, oldest first.
    pub async fn parked(&self, limit: usize) -> Result<Vec<SagaRecord>, SagaError> {
        self.inner.log.parked(limit).await
    }
    /// Puts a parked saga back where it was parked from; an executor picks it up.
    pub async fn retry_parked(&self, id: &SagaId, note: &str) -> Result<(), SagaError> {
        self.operate(id, false, note).await
    }
    /// Closes a parked saga by hand (after fixing things outside).
    pub async fn resolve(&self, id: &SagaId, note: &str) -> Result<(), SagaError> {
        self.operate(id, true, note).await
    }

    async fn operate(&self, id: &SagaId, resolve: bool, note: &str) -> Result<(), SagaError> {
        if self.inner.log.operate(id, resolve, note).await? {
            self.inner.wake.notify_one();
            return Ok(());
        }
        match self.inner.log.get(id).await? {
            None => Err(SagaError::NotFound(id.to_string())),
            Some(r) => Err(SagaError::WrongStatus {
                id: id.to_string(),
                status: r.status.to_string(),
                expected: "parked",
            }),
        }
    }

    /// Counters.
    pub fn stats(&self) -> ExecutorStats {
        let c = &self.inner.stats;
        ExecutorStats {
            started: c.started.load(Ordering::Relaxed),
            resumed: c.resumed.load(Ordering::Relaxed),
            completed: c.completed.load(Ordering::Relaxed),
            compensated: c.compensated.load(Ordering::Relaxed),
            parked: c.parked.load(Ordering::Relaxed),
            step_runs: c.step_runs.load(Ordering::Relaxed),
            lease_lost: c.lease_lost.load(Ordering::Relaxed),
        }
    }

    /// Stops taking sagas; running ones finish the step they are in, give their lease back and
    /// stop (another executor resumes them). Waits at most `timeout`, then aborts the rest.
    pub async fn shutdown(&self, timeout: Duration) {
        let _ = self.inner.stop.send(true);
        if let Some(w) = self.worker.lock().ok().and_then(|mut w| w.take()) {
            w.abort();
        }
        let mut tasks = self.inner.tasks.lock().await;
        let drained = tokio::time::timeout(timeout, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tasks.abort_all();
        }
    }

    /// Stops everything at once, as a crash would: nothing more is written; the sagas come back
    /// to an executor when their leases expire.
    pub async fn abort(&self) {
        let _ = self.inner.stop.send(true);
        if let Some(w) = self.worker.lock().ok().and_then(|mut w| w.take()) {
            w.abort();
        }
        self.inner.tasks.lock().await.abort_all();
    }
}

/// What happened to a saga, for [`count`].
#[derive(Clone, Copy)]
enum Event {
    Started,
    Resumed,
    Completed,
    Compensated,
    Parked,
}

/// Adds one to the executor's counter of `event` and, with the `metrics` feature, to the metric
/// of the same name (`saga.started`, ...) labelled with the saga's name.
fn count(stats: &Counters, event: Event, saga: &str) {
    let counter = match event {
        Event::Started => &stats.started,
        Event::Resumed => &stats.resumed,
        Event::Completed => &stats.completed,
        Event::Compensated => &stats.compensated,
        Event::Parked => &stats.parked,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    #[cfg(feature = "metrics")]
    {
        let saga = saga.to_owned();
        match event {
            Event::Started => metrics::counter!("saga.started", "saga.name" => saga).increment(1),
            Event::Resumed => metrics::counter!("saga.resumed", "saga.name" => saga).increment(1),
            Event::Completed => {
                metrics::counter!("saga.completed", "saga.name" => saga).increment(1);
            }
            Event::Compensated => {
                metrics::counter!("saga.compensated", "saga.name" => saga).increment(1);
            }
            Event::Parked => metrics::counter!("saga.parked", "saga.name" => saga).increment(1),
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = saga;
}

/// Runs one attempt of an action or compensation inside a `saga.step` span, bounded by the
/// step's timeout, and records its duration (`saga.step_duration`, seconds, with the `metrics`
/// feature).
async fn run_step<F, T>(
    saga: &str,
    step: &str,
    compensating: bool,
    attempt: u32,
    timeout: Duration,
    attempt_future: F,
) -> Result<T, StepError>
where
    F: std::future::Future<Output = Result<T, StepError>>,
{
    let span = tracing::info_span!(
        "saga.step",
        saga.step = %step,
        saga.attempt = attempt,
        saga.compensating = compensating,
    );
    let started = Instant::now();
    let result = match tokio::time::timeout(timeout, attempt_future)
        .instrument(span)
        .await
    {
        Ok(r) => r,
        Err(_) => Err(StepError::transient(format!("timed out after {timeout:?}"))),
    };
    #[cfg(feature = "metrics")]
    metrics::histogram!(
        "saga.step_duration",
        "saga.name" => saga.to_owned(),
        "saga.step" => step.to_owned(),
        "phase" => if compensating { "compensation" } else { "action" },
        "outcome" => if result.is_ok() { "ok" } else { "error" },
    )
    .record(started.elapsed().as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = (saga, started);
    result
}

impl<L: SagaLogStore + Clone> Inner<L> {
    async fn spawn_drive(self: &Arc<Self>, record: SagaRecord, deadline: Option<Instant>) {
        let Ok(permit) = Arc::clone(&self.permits).acquire_owned().await else {
            return;
        };
        let me = Arc::clone(self);
        let span = tracing::info_span!("saga", saga.id = %record.id, saga.name = %record.name);
        let mut tasks = self.tasks.lock().await;
        // Finished sagas' tasks are reaped here, so the set holds only running ones.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(
            async move {
                me.drive(record, deadline).await;
                drop(permit);
            }
            .instrument(span),
        );
    }

    async fn recover_loop(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        let mut backoff = Duration::from_millis(50);
        loop {
            if *stop.borrow() {
                return;
            }
            let free = self.permits.available_permits();
            if free > 0 {
                match self.log.claim(&self.name, self.lease, free).await {
                    Ok(records) => {
                        backoff = Duration::from_millis(50);
                        for r in records {
                            count(&self.stats, Event::Resumed, &r.name);
                            tracing::info!(saga.id = %r.id, saga.name = %r.name, "saga resumed");
                            self.spawn_drive(r, None).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "saga log unavailable; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = backoff.saturating_mul(2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(self.poll_interval) => {}
                () = self.wake.notified() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Writes a transition; `false` when fenced out (another executor owns the saga now).
    async fn write(&self, t: Transition) -> bool {
        let mut wait = Duration::from_millis(20);
        loop {
            match self.log.write(&t).await {
                Ok(true) => return true,
                Ok(false) => {
                    self.stats.lease_lost.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(saga.id = %t.id, "saga lease lost; another executor has it");
                    return false;
                }
                Err(e) => {
                    // The database is down: keep trying while the lease may still be ours; a
                    // lost lease shows as a fenced write once it is back.
                    tracing::warn!(saga.id = %t.id, error = %e, "saga log write failed; retrying");
                    if *self.stop.borrow() {
                        return false;
                    }
                    tokio::time::sleep(wait).await;
                    wait = wait.saturating_mul(2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// [`write`](Self::write) with a step's log-transaction work: `Ok(true)` both committed,
    /// `Ok(false)` fenced out (or stopping while the database is down), `Err` the work failed.
    async fn write_with_work(
        &self,
        t: Transition,
        work: &LogTxWork,
        ctx: &StepContext,
        output: &Value,
        timeout: Duration,
    ) -> Result<bool, StepError> {
        let mut wait = Duration::from_millis(20);
        loop {
            // Bounded like the action: a hung transaction is dropped (rolled back) and counts
            // as a failed attempt.
            let attempt =
                tokio::time::timeout(timeout, self.log.write_with_work(&t, work, ctx, output))
                    .await
                    .unwrap_or_else(|_| {
                        Ok(WorkWrite::WorkFailed(StepError::transient(format!(
                            "the step's log transaction timed out after {timeout:?}"
                        ))))
                    });
            match attempt {
                Ok(WorkWrite::Written) => return Ok(true),
                Ok(WorkWrite::Fenced) => {
                    self.stats.lease_lost.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(saga.id = %t.id, "saga lease lost; another executor has it");
                    return Ok(false);
                }
                Ok(WorkWrite::WorkFailed(e)) => return Err(e),
                Err(e) => {
                    tracing::warn!(saga.id = %t.id, error = %e, "saga log write failed; retrying");
                    if *self.stop.borrow() {
                        return Ok(false);
                    }
                    tokio::time::sleep(wait).await;
                    wait = wait.saturating_mul(2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn park(&self, r: &SagaRecord, from: Status, position: i64, attempts: u32, why: String) {
        tracing::error!(saga.id = %r.id, saga.name = %r.name, error = %why, "saga parked for an operator");
        if self
            .write(Transition {
                id: r.id.clone(),
                generation: r.generation,
                status: Status::Parked,
                position,
                outputs: None,
                attempts,
                error: Some(why),
                parked_from: Some(from),
                lease: None,
                event: "parked",
                step: None,
            })
            .await
        {
            count(&self.stats, Event::Parked, &r.name);
        }
    }

    async fn drive(&self, r: SagaRecord, deadline: Option<Instant>) {
        let Some(def) = self.defs.get(&(r.name.clone(), r.version)).cloned() else {
            let why = format!(
                "no definition `{}` version {} is registered",
                r.name, r.version
            );
            return self.park(&r, r.status, r.position, r.attempts, why).await;
        };
        let input: Value = match serde_json::from_str(&r.input) {
            Ok(v) => v,
            Err(e) => {
                let why = format!("stored input is not JSON: {e}");
                return self.park(&r, r.status, r.position, r.attempts, why).await;
            }
        };
        let mut outputs: BTreeMap<String, Value> = match serde_json::from_str(&r.outputs) {
            Ok(v) => v,
            Err(e) => {
                let why = format!("stored outputs are not a JSON object: {e}");
                return self.park(&r, r.status, r.position, r.attempts, why).await;
            }
        };
        let input = Arc::new(input);
        let mut status = r.status;
        let mut pos = r.position;
        let mut attempts = r.attempts;
        let mut deadline_passed = r.deadline_passed;
        let steps = def.steps.len() as i64;
        // Why the saga is being compensated: kept on the row through every compensation, so a
        // compensated saga still says what failed.
        let mut cause = (status == Status::Compensating)
            .then(|| r.error.clone())
            .flatten();
        if !matches!(status, Status::Running | Status::Compensating)
            || pos < -1
            || pos > steps
            || (status == Status::Running && pos == steps)
        {
            let why = format!(
                "stored position {pos} does not fit `{}` v{} ({steps} steps)",
                r.name, r.version
            );
            return self.park(&r, status, pos, attempts, why).await;
        }
        let fence =
            |status, position, outputs, attempts, error, event, step: Option<&str>, lease| {
                Transition {
                    id: r.id.clone(),
                    generation: r.generation,
                    status,
                    position,
                    outputs,
                    attempts,
                    error,
                    parked_from: None,
                    lease,
                    event,
                    step: step.map(str::to_owned),
                }
            };
        loop {
            if *self.stop.borrow() {
                // Give the saga back where it is; another executor resumes it.
                let _ = self
                    .write(fence(
                        status, pos, None, attempts, None, "released", None, None,
                    ))
                    .await;
                return;
            }
            match status {
                Status::Running => {
                    let i = pos as usize;
                    let step = &def.steps[i];
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        deadline_passed = true;
                    }
                    // Up to and including the pivot nothing irreversible has happened yet.
                    if deadline_passed && step.kind != StepKind::Retriable {
                        tracing::warn!(saga.step = %step.name, "saga deadline passed before the pivot; compensating");
                        let error = Some("deadline passed before the pivot".to_owned());
                        cause.clone_from(&error);
                        // A parallel group may have run in part before a crash: it is
                        // compensated too (its compensations accept keys never applied).
                        let from = if step.group { pos } else { pos - 1 };
                        if !self
                            .write(fence(
                                Status::Compensating,
                                from,
                                None,
                                0,
                                error,
                                "compensating",
                                Some(&step.name),
                                Some(self.lease),
                            ))
                            .await
                        {
                            return;
                        }
                        status = Status::Compensating;
                        pos = from;
                        attempts = 0;
                        continue;
                    }
                    let ctx = StepContext {
                        saga_id: r.id.clone(),
                        step: Arc::clone(&step.name),
                        input: Arc::clone(&input),
                        outputs: Arc::new(outputs.clone()),
                        attempt: attempts + 1,
                        compensating: false,
                    };
                    self.stats.step_runs.fetch_add(1, Ordering::Relaxed);
                    let work_ctx = step.log_tx.as_ref().map(|_| ctx.clone());
                    let result = run_step(
                        &r.name,
                        &step.name,
                        false,
                        attempts + 1,
                        step.timeout,
                        (step.action)(ctx),
                    )
                    .await;
                    let done = pos + 1 == steps;
                    let completion = |outputs: &BTreeMap<String, Value>| {
                        let json = serde_json::to_string(outputs).unwrap_or_else(|_| "{}".into());
                        let (st, ev, lease) = if done {
                            (Status::Completed, "completed", None)
                        } else {
                            (Status::Running, "step_completed", Some(self.lease))
                        };
                        fence(
                            st,
                            pos + 1,
                            Some(json),
                            0,
                            None,
                            ev,
                            Some(&step.name),
                            lease,
                        )
                    };
                    // A step with work in the log's transaction: the work and the record of the
                    // step's completion commit together, or neither does.
                    let mut recorded = false;
                    let result = match (result, &step.log_tx, work_ctx) {
                        (Ok(v), Some(work), Some(work_ctx)) => {
                            let mut with = outputs.clone();
                            with.insert(step.name.to_string(), v.clone());
                            match self
                                .write_with_work(
                                    completion(&with),
                                    work,
                                    &work_ctx,
                                    &v,
                                    step.timeout,
                                )
                                .await
                            {
                                Ok(true) => {
                                    recorded = true;
                                    Ok(v)
                                }
                                Ok(false) => return,
                                Err(e) => Err(e),
                            }
                        }
                        (result, _, _) => result,
                    };
                    match result {
                        Ok(v) => {
                            if step.group {
                                // Later steps read a branch's output by the branch's name.
                                if let Value::Object(branches) = &v {
                                    for (name, out) in branches {
                                        outputs.insert(name.clone(), out.clone());
                                    }
                                }
                            }
                            outputs.insert(step.name.to_string(), v);
                            if !recorded && !self.write(completion(&outputs)).await {
                                return;
                            }
                            pos += 1;
                            attempts = 0;
                            if done {
                                count(&self.stats, Event::Completed, &r.name);
                                tracing::info!("saga completed");
                                return;
                            }
                        }
                        Err(e) => {
                            attempts += 1;
                            let retriable = step.kind == StepKind::Retriable;
                            if retriable && e.is_permanent() {
                                let why = format!(
                                    "step `{}` after the pivot failed permanently: {e}",
                                    step.name
                                );
                                return self.park(&r, Status::Running, pos, attempts, why).await;
                            }
                            let exhausted = e.is_permanent() || attempts >= step.retry.max_attempts;
                            if exhausted && !retriable {
                                tracing::warn!(saga.step = %step.name, error = %e, "saga step failed; compensating");
                                cause = Some(e.to_string());
                                // A parallel group that failed may have applied some branches:
                                // compensation starts at the group itself.
                                let from = if step.group { pos } else { pos - 1 };
                                if !self
                                    .write(fence(
                                        Status::Compensating,
                                        from,
                                        None,
                                        0,
                                        Some(e.to_string()),
                                        "compensating",
                                        Some(&step.name),
                                        Some(self.lease),
                                    ))
                                    .await
                                {
                                    return;
                                }
                                status = Status::Compensating;
                                pos = from;
                                attempts = 0;
                                continue;
                            }
                            if !self
                                .write(fence(
                                    Status::Running,
                                    pos,
                                    None,
                                    attempts,
                                    Some(e.to_string()),
                                    "step_failed",
                                    Some(&step.name),
                                    Some(self.lease),
                                ))
                                .await
                            {
                                return;
                            }
                            // After the pivot: retried until it succeeds, the wait capped.
                            let n = attempts.min(step.retry.max_attempts.max(1));
                            tokio::time::sleep(step.retry.wait(n)).await;
                        }
                    }
                }
                Status::Compensating => {
                    if pos < 0 {
                        // Nothing was completed before the failure.
                        if self
                            .write(fence(
                                Status::Compensated,
                                -1,
                                None,
                                0,
                                None,
                                "compensated_all",
                                None,
                                None,
                            ))
                            .await
                        {
                            count(&self.stats, Event::Compensated, &r.name);
                        }
                        return;
                    }
                    let step = &def.steps[pos as usize];
                    let Some(compensation) = step.compensation.clone() else {
                        // Only compensatable steps come before a pivot; nothing to undo here.
                        pos -= 1;
                        continue;
                    };
                    let ctx = StepContext {
                        saga_id: r.id.clone(),
                        step: Arc::clone(&step.name),
                        input: Arc::clone(&input),
                        outputs: Arc::new(outputs.clone()),
                        attempt: attempts + 1,
                        compensating: true,
                    };
                    self.stats.step_runs.fetch_add(1, Ordering::Relaxed);
                    let result = run_step(
                        &r.name,
                        &step.name,
                        true,
                        attempts + 1,
                        step.timeout,
                        compensation(ctx),
                    )
                    .await;
                    match result {
                        Ok(()) => {
                            let done = pos == 0;
                            let (st, ev, lease) = if done {
                                (Status::Compensated, "compensated_all", None)
                            } else {
                                (Status::Compensating, "compensated", Some(self.lease))
                            };
                            if !self
                                .write(fence(
                                    st,
                                    pos - 1,
                                    None,
                                    0,
                                    cause.clone(),
                                    ev,
                                    Some(&step.name),
                                    lease,
                                ))
                                .await
                            {
                                return;
                            }
                            pos -= 1;
                            attempts = 0;
                            if done {
                                count(&self.stats, Event::Compensated, &r.name);
                                tracing::info!("saga compensated");
                                return;
                            }
                        }
                        Err(e) => {
                            attempts += 1;
                            if e.is_permanent() || attempts >= step.retry.max_attempts {
                                let why = format!("compensation of `{}` failed: {e}", step.name);
                                return self
                                    .park(&r, Status::Compensating, pos, attempts, why)
                                    .await;
                            }
                            if !self
                                .write(fence(
                                    Status::Compensating,
                                    pos,
                                    None,
                                    attempts,
                                    Some(e.to_string()),
                                    "compensation_failed",
                                    Some(&step.name),
                                    Some(self.lease),
                                ))
                                .await
                            {
                                return;
                            }
                            tokio::time::sleep(step.retry.wait(attempts)).await;
                        }
                    }
                }
                _ => return,
            }
        }
    }
}
