//! The Redis store: one Lua script, one round trip per check, on a single server or a cluster,
//! with concurrent checks coalesced into one script call.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::cluster_routing::Slot;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};

use crate::error::StoreError;
use crate::gcra::{Decision, Source, Verdict};
use crate::quota::Limits;
use crate::store::RateLimitStore;

/// The GCRA script (also usable from other languages sharing the same keys).
pub const GCRA_SCRIPT: &str = include_str!("gcra.lua");

/// Most checks coalesced into one script call.
const MAX_BATCH: usize = 64;
/// Most checks waiting for a batch per store (see [`RedisStore::MAX_QUEUED`]).
const MAX_QUEUED: usize = 4096;
/// Script calls in flight at once per store; checks arriving meanwhile wait and form the next
/// batch (no timer: a lone check goes out at once). Two keep Redis busy while the next batch
/// forms; more make smaller batches (measured: 4 gave 10 checks per call and lower
/// throughput, 1 left Redis idle between calls). The second call waits to be as large as the
/// first (up to half of `MAX_BATCH`) or for the first to return; see `batcher`.
const BATCHES_IN_FLIGHT: usize = 2;

type Reply = Result<[i64; 4], StoreError>;

/// Most values describing one `Limits`: per quota, emission interval, capacity and burst.
const SPEC_LEN: usize = 3 * crate::quota::MAX_LIMITS;

struct Job {
    key: String,
    cost: u32,
    /// `spec[..spec_len]` describes the check's limits; checks of one batch sharing them send
    /// them once.
    spec: [u64; SPEC_LEN],
    spec_len: usize,
    reply: oneshot::Sender<Reply>,
}

impl Job {
    fn spec(&self) -> &[u64] {
        &self.spec[..self.spec_len]
    }
}

struct Exec<C> {
    conn: C,
    script: redis::Script,
    fixed_now: Option<u64>,
    /// Set once a batch spanning several hash slots was refused: from then on, batches hold
    /// one slot each (Redis Cluster).
    by_slot: AtomicBool,
    calls: AtomicU64,
    checks: AtomicU64,
    /// Checks dropped before sending because their caller had stopped waiting.
    abandoned: AtomicU64,
    /// Checks sent to the batcher and not yet in a batch.
    queued: AtomicUsize,
}

/// How well checks were coalesced: script calls made and checks they carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchStats {
    /// Script calls sent to Redis.
    pub script_calls: u64,
    /// Checks answered by them.
    pub checks: u64,
    /// Checks never sent because their caller had stopped waiting (timed out or dropped the
    /// future) before their batch went out: they charged nothing.
    pub abandoned: u64,
}

/// GCRA state in Redis, through any async redis-rs connection: a
/// `redis::aio::ConnectionManager` (reconnects by itself) for a single server, a
/// `redis::cluster_async::ClusterConnection` for Redis Cluster.
///
/// Each key is one string `PREFIX{KEY}` (the braces are a hash tag: everything about a key lives
/// in one cluster slot) holding its expiry and the quotas' TATs as little-endian doubles
/// (layout in [`GCRA_SCRIPT`]). It expires at most one second after its last TAT passes: a write
/// keeps the key's TTL (`SET .. KEEPTTL`) while that TTL still covers the new TAT and moves it
/// (`SET .. PX`) otherwise. The check is `EVALSHA` of [`GCRA_SCRIPT`] (loaded again on
/// `NOSCRIPT`), using the server's clock.
///
/// Checks made concurrently through one store (and its clones) are coalesced: while two script
/// calls are under way, new checks queue and go out together in the next call (up to 64), each
/// still answered after one round trip of its own; the call reads all their keys with one
/// `MGET` and sends a limit set shared by several checks once. A lone check is sent at once;
/// a call sent while another is under way waits until it holds as many checks as that one (at
/// most 32) or that one returns, so under load each call's fixed cost on the server is spread
/// over many checks.
/// On Redis Cluster a batch is split into one script call per hash slot (learned from the first
/// `CROSSSLOT` refusal, or set up front with [`for_cluster`](Self::for_cluster)), and the calls
/// are sent together, so a batch over many slots still costs about one round trip. At most
/// [`MAX_QUEUED`](Self::MAX_QUEUED) checks wait for a batch; beyond that a check fails at once with
/// [`StoreError::Overloaded`](crate::StoreError::Overloaded), so a Redis that stops answering
/// cannot grow the queue without bound.
///
/// ```no_run
/// use stanchion_ratelimit::{Limits, Quota, RateLimitStore, RedisStore};
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let client = redis::Client::open("redis://127.0.0.1:6379/")?;
/// let store = RedisStore::new(redis::aio::ConnectionManager::new(client).await?, "rl:");
/// let limits = Limits::single(Quota::per_second(100)?);
/// let decision = store.check("api-key-42", &limits, 1).await?;
/// println!("{decision:?}");
/// # Ok(()) }
/// ```
pub struct RedisStore<C> {
    prefix: Arc<str>,
    exec: Arc<Exec<C>>,
    /// The running batcher's queue; replaced when that batcher stopped (its runtime shut down).
    queue: Arc<RwLock<Option<mpsc::UnboundedSender<Job>>>>,
}

impl<C> Clone for RedisStore<C> {
    fn clone(&self) -> Self {
        Self {
            prefix: Arc::clone(&self.prefix),
            exec: Arc::clone(&self.exec),
            queue: Arc::clone(&self.queue),
        }
    }
}

impl<C> fmt::Debug for RedisStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("by_slot", &self.exec.by_slot.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<C> RedisStore<C> {
    /// Most checks waiting for a batch; more are refused with
    /// [`StoreError::Overloaded`](crate::StoreError::Overloaded) rather than queued behind a
    /// Redis that does not answer.
    ///
    /// ```
    /// # use stanchion_ratelimit::RedisStore;
    /// assert_eq!(RedisStore::<redis::aio::ConnectionManager>::MAX_QUEUED, 4096);
    /// ```
    pub const MAX_QUEUED: usize = MAX_QUEUED;
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A store over `conn`, namespacing its keys with `prefix`.
    pub fn new(conn: C, prefix: &str) -> Self {
        Self {
            prefix: Arc::from(prefix),
            exec: Arc::new(Exec {
                conn,
                script: redis::Script::new(GCRA_SCRIPT),
                fixed_now: None,
                by_slot: AtomicBool::new(false),
                calls: AtomicU64::new(0),
                checks: AtomicU64::new(0),
                abandoned: AtomicU64::new(0),
                queued: AtomicUsize::new(0),
            }),
            queue: Arc::new(RwLock::new(None)),
        }
    }

    /// Batches hold keys of one hash slot from the start (Redis Cluster).
    pub fn for_cluster(self) -> Self {
        self.exec.by_slot.store(true, Ordering::Relaxed);
        self
    }

    /// Uses `now` (microseconds) instead of the server's clock: for deterministic tests only.
    #[doc(hidden)]
    pub fn with_fixed_now(self, now: u64) -> Self {
        let exec = Exec {
            conn: self.exec.conn.clone(),
            script: redis::Script::new(GCRA_SCRIPT),
            fixed_now: Some(now.max(1)),
            by_slot: AtomicBool::new(self.exec.by_slot.load(Ordering::Relaxed)),
            calls: AtomicU64::new(0),
            checks: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            queued: AtomicUsize::new(0),
        };
        Self {
            prefix: self.prefix,
            exec: Arc::new(exec),
            queue: Arc::new(RwLock::new(None)),
        }
    }

    /// Script calls made and checks carried so far (their ratio is the average batch size).
    pub fn batch_stats(&self) -> BatchStats {
        BatchStats {
            script_calls: self.exec.calls.load(Ordering::Relaxed),
            checks: self.exec.checks.load(Ordering::Relaxed),
            abandoned: self.exec.abandoned.load(Ordering::Relaxed),
        }
    }

    /// The Redis key holding `key`'s state.
    pub fn redis_key(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + key.len() + 2);
        k.push_str(&self.prefix);
        k.push('{');
        k.push_str(key);
        k.push('}');
        k
    }

    /// Hands `job` to the batching task, starting one on the current runtime if none runs: the
    /// first check starts it, and a check after the runtime it ran on shut down starts another.
    fn send(&self, job: Job) -> Result<(), StoreError> {
        let job = {
            let queue = self.queue.read().unwrap_or_else(PoisonError::into_inner);
            match queue.as_ref() {
                Some(tx) => match tx.send(job) {
                    Ok(()) => return Ok(()),
                    Err(mpsc::error::SendError(job)) => job,
                },
                None => job,
            }
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Err(StoreError::Protocol(
                "no tokio runtime to run the batching task on".into(),
            ));
        };
        let mut queue = self.queue.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = queue.as_ref()
            && !tx.is_closed()
        {
            // Another check restarted it meanwhile.
            return tx
                .send(job)
                .map_err(|_| StoreError::Protocol("the batching task stopped".into()));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        runtime.spawn(batcher(Arc::clone(&self.exec), rx));
        let sent = tx.send(job);
        *queue = Some(tx);
        sent.map_err(|_| StoreError::Protocol("the batching task stopped".into()))
    }
}

/// Collects queued checks into batches; ends when every store clone is gone, and then aborts
/// the script calls still under way (a hung Redis must not keep the connection alive for a
/// store nobody holds).
async fn batcher<C>(exec: Arc<Exec<C>>, mut rx: mpsc::UnboundedReceiver<Job>)
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    // Dropped when the loop ends: aborts the calls still under way.
    let mut calls = tokio::task::JoinSet::new();
    let finished = Arc::new(Notify::new());
    // Checks in the calls under way.
    let ahead = Arc::new(AtomicUsize::new(0));
    while let Some(first) = rx.recv().await {
        // Wait for a free call, or for every store to go (then abort the calls).
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = rx_closed(&rx) => return,
        };
        while calls.try_join_next().is_some() {}
        let mut jobs = vec![first];
        loop {
            while jobs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            // While a call keeps Redis busy, the next one waits to be as large as it, up to half
            // a full batch (or for it to return): a call's fixed cost on the server is then
            // spread over many checks under load, and a lone check still goes out at once.
            let busy = ahead.load(Ordering::Acquire);
            if busy == 0 || jobs.len() >= busy.min(MAX_BATCH / 2) {
                break;
            }
            tokio::select! {
                job = rx.recv() => match job {
                    Some(job) => jobs.push(job),
                    None => break,
                },
                () = finished.notified() => {}
            }
        }
        exec.queued.fetch_sub(jobs.len(), Ordering::Relaxed);
        let n = jobs.len();
        ahead.fetch_add(n, Ordering::AcqRel);
        let (exec, finished, ahead) =
            (Arc::clone(&exec), Arc::clone(&finished), Arc::clone(&ahead));
        calls.spawn(async move {
            exec.execute(jobs).await;
            ahead.fetch_sub(n, Ordering::AcqRel);
            drop(permit);
            finished.notify_one();
        });
    }
}

/// Resolves once every sender of `rx` is gone (every store clone dropped).
async fn rx_closed(rx: &mpsc::UnboundedReceiver<Job>) {
    while !rx.is_closed() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

impl<C> Exec<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn execute(&self, mut jobs: Vec<Job>) {
        // A check whose caller stopped waiting (its timeout passed while the batch waited for
        // a free call, or its future was dropped) is not sent: it would charge quota nobody
        // uses, and the caller has already been answered by the fallback.
        let before = jobs.len();
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.len() < before {
            self.abandoned
                .fetch_add((before - jobs.len()) as u64, Ordering::Relaxed);
        }
        if jobs.is_empty() {
            return;
        }
        if !self.by_slot.load(Ordering::Relaxed) || jobs.len() == 1 {
            match self.call(&jobs).await {
                Err(e) if is_cross_slot(&e) => {
                    self.by_slot.store(true, Ordering::Relaxed);
                }
                result => return answer(jobs, result),
            }
        }
        // One script call per hash slot (a script's keys must share one), all sent at once:
        // redis-rs writes the calls for one node on its connection back to back, so a batch
        // over many slots costs about one round trip, not one per slot.
        let mut groups: Vec<(Slot, Vec<Job>)> = Vec::new();
        for job in jobs {
            let slot = Slot::for_key(job.key.as_bytes());
            match groups.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, g)) => g.push(job),
                None => groups.push((slot, vec![job])),
            }
        }
        futures_util::future::join_all(groups.into_iter().map(|(_, group)| async move {
            let result = self.call(&group).await;
            answer(group, result);
        }))
        .await;
    }

    async fn call(&self, jobs: &[Job]) -> Result<Vec<u8>, redis::RedisError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.checks.fetch_add(jobs.len() as u64, Ordering::Relaxed);
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(jobs.len());
        for job in jobs {
            cmd.arg(&job.key);
        }
        cmd.arg(self.fixed_now.unwrap_or(0));
        // The script remembers its own writes only when a key repeats in the batch.
        let mut seen = hashbrown::HashSet::with_capacity_and_hasher(
            jobs.len(),
            foldhash::fast::FixedState::default(),
        );
        let distinct = jobs.iter().all(|j| seen.insert(j.key.as_str()));
        cmd.arg(u8::from(distinct));
        // Distinct limit sets first (usually one per batch), then each check's cost and set,
        // or a single cost when every check shares it and the only set.
        let mut specs: Vec<&[u64]> = Vec::new();
        let mut index = Vec::with_capacity(jobs.len());
        for job in jobs {
            let at = match specs.iter().position(|s| *s == job.spec()) {
                Some(at) => at,
                None => {
                    specs.push(job.spec());
                    specs.len() - 1
                }
            };
            index.push(at + 1);
        }
        cmd.arg(specs.len());
        for spec in &specs {
            cmd.arg(spec.len() / 3);
            for v in *spec {
                cmd.arg(*v);
            }
        }
        if specs.len() == 1 && jobs.iter().all(|j| j.cost == jobs[0].cost) {
            cmd.arg(1).arg(jobs[0].cost);
        } else {
            cmd.arg(0);
            for (job, at) in jobs.iter().zip(index) {
                cmd.arg(job.cost).arg(at);
            }
        }
        let mut conn = self.conn.clone();
        match cmd.query_async(&mut conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                // A restarted or flushed server: load the script where this batch goes, retry.
                redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(GCRA_SCRIPT)
                    .query_async::<String>(&mut conn)
                    .await?;
                cmd.query_async(&mut conn).await
            }
            result => result,
        }
    }
}

fn answer(jobs: Vec<Job>, result: Result<Vec<u8>, redis::RedisError>) {
    match result {
        Ok(bytes) if bytes.len() == 32 * jobs.len() => {
            for (job, chunk) in jobs.into_iter().zip(bytes.chunks_exact(32)) {
                let mut four = [0i64; 4];
                let mut bad = None;
                for (slot, raw) in four.iter_mut().zip(chunk.chunks_exact(8)) {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(raw);
                    let v = f64::from_le_bytes(b);
                    // Every value the script sends is a whole number within +-2^53.
                    if v.is_finite() && v.fract() == 0.0 && v.abs() <= 9_007_199_254_740_992.0 {
                        *slot = v as i64;
                    } else {
                        bad = Some(v);
                    }
                }
                let reply = match bad {
                    None => Ok(four),
                    Some(v) => Err(StoreError::Protocol(format!("not a whole number: {v}"))),
                };
                let _ = job.reply.send(reply);
            }
        }
        Ok(bytes) => {
            let msg = format!("expected {} bytes, got {}", 32 * jobs.len(), bytes.len());
            for job in jobs {
                let _ = job.reply.send(Err(StoreError::Protocol(msg.clone())));
            }
        }
        Err(e) => {
            for job in jobs {
                let _ = job.reply.send(Err(StoreError::Redis(e.clone())));
            }
        }
    }
}

fn is_cross_slot(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::CrossSlot)
        || e.to_string().contains("CROSSSLOT")
}

impl<C> RateLimitStore for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn check(&self, key: &str, limits: &Limits, cost: u32) -> Result<Decision, StoreError> {
        if limits.is_empty() {
            // Nothing limits this key (as `RateLimiter` decides too): no state to keep.
            return Ok(Decision::allow_all(Source::Local));
        }
        let mut spec = [0u64; SPEC_LEN];
        let mut spec_len = 0;
        for ((_, q), slot) in limits.quotas().zip(spec.chunks_exact_mut(3)) {
            slot.copy_from_slice(&[
                q.emission_micros(),
                q.capacity_micros(),
                u64::from(q.burst_size()),
            ]);
            spec_len += 3;
        }
        let (reply, wait) = oneshot::channel();
        let job = Job {
            key: self.redis_key(key),
            cost,
            spec,
            spec_len,
            reply,
        };
        let queued = self.exec.queued.fetch_add(1, Ordering::Relaxed);
        if queued >= MAX_QUEUED {
            self.exec.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(StoreError::Overloaded { queued });
        }
        if let Err(e) = self.send(job) {
            self.exec.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(e);
        }
        let four = wait
            .await
            .map_err(|_| StoreError::Protocol("the batching task dropped a check".into()))??;
        parse(&four, limits)
    }

    async fn probe(&self) -> Result<(), StoreError> {
        let mut conn = self.exec.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(drop)
            .map_err(StoreError::Redis)
    }
}

fn parse(reply: &[i64; 4], limits: &Limits) -> Result<Decision, StoreError> {
    let [flags, remaining, reset, retry] = *reply;
    if flags < 0 {
        return Err(StoreError::Protocol(format!("negative verdict {flags}")));
    }
    let (verdict, quota, corrupt) = (flags % 4, flags / 4 % 4, flags / 16);
    let verdict = match verdict {
        0 => Verdict::Allowed,
        1 => Verdict::Denied,
        2 => Verdict::Impossible,
        3 => return Err(StoreError::KeyHoldsOtherType),
        other => return Err(StoreError::Protocol(format!("unknown verdict {other}"))),
    };
    let quota = usize::try_from(quota)
        .ok()
        .filter(|q| *q < limits.len())
        .ok_or_else(|| StoreError::Protocol(format!("quota index {quota} out of range")))?;
    let micros = |v: i64, what: &str| {
        u64::try_from(v).map_err(|_| StoreError::Protocol(format!("negative {what} {v}")))
    };
    if corrupt > 0 {
        tracing::warn!(
            ratelimit.corrupt_fields = corrupt,
            "rate-limit state in Redis was not a TAT; it was reset"
        );
    }
    Ok(Decision {
        verdict,
        quota,
        limit: limits.quota(quota).map_or(0, |q| q.burst_size()),
        remaining: u32::try_from(micros(remaining, "remaining")?).unwrap_or(u32::MAX),
        reset_after: Duration::from_micros(micros(reset, "reset")?),
        retry_after: (verdict == Verdict::Denied)
            .then(|| micros(retry, "retry_after").map(Duration::from_micros))
            .transpose()?,
        shadow_denied: false,
        source: Source::Shared,
    })
}
