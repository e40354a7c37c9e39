//! Queries across shards: scatter-gather with a concurrency limit, a deadline and a policy for
//! shards that fail; and an ordered merge with a limit for paginated lists.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::future::Future;
use std::time::Duration;

use futures_util::StreamExt;

use crate::error::BuildError;
use crate::sharder::ShardId;

/// What to do when a shard fails or misses the deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnShardFailure {
    /// Fail the whole call with the first failure (the other queries are dropped).
    Fail,
    /// Return what answered, and each failure by shard.
    Partial,
}

/// A scatter-gather configuration.
///
/// ```
/// use std::time::Duration;
/// use stanchion_shard_router::{OnShardFailure, Scatter};
/// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
/// let scatter = Scatter::new(Duration::from_millis(200))?
///     .concurrency(4)?
///     .on_failure(OnShardFailure::Partial);
/// let shards = vec![(0, 10), (1, 20), (2, 30)];
/// let got = scatter
///     .run(shards, |shard, n| async move {
///         if shard == 1 { Err("down") } else { Ok(n * 2) }
///     })
///     .await?;
/// assert_eq!(got.answers, vec![(0, 20), (2, 60)]);
/// assert_eq!(got.failures.len(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Scatter {
    concurrency: usize,
    deadline: Duration,
    on_failure: OnShardFailure,
}

/// What came back.
#[derive(Debug)]
pub struct Gathered<R, E> {
    /// Each answer with its shard, in shard order.
    pub answers: Vec<(ShardId, R)>,
    /// Each failure with its shard, in shard order (empty under [`OnShardFailure::Fail`]).
    pub failures: Vec<(ShardId, ShardFailure<E>)>,
}

/// How one shard failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShardFailure<E> {
    /// Its query returned an error.
    #[error("shard query failed: {0}")]
    Error(E),
    /// It had not answered by the deadline.
    #[error("shard did not answer within {0:?}")]
    TimedOut(Duration),
}

/// The whole call failed ([`OnShardFailure::Fail`]).
#[derive(Debug, thiserror::Error)]
#[error("shard {shard}: {failure}")]
pub struct ScatterError<E> {
    /// The first shard that failed.
    pub shard: ShardId,
    /// How.
    pub failure: ShardFailure<E>,
}

impl Scatter {
    /// Every shard at once, failing on the first failure, with this deadline for the whole call
    /// (from 1 ms to one hour).
    pub fn new(deadline: Duration) -> Result<Self, BuildError> {
        if deadline < Duration::from_millis(1) {
            return Err(BuildError::Zero {
                field: "deadline (ms)",
            });
        }
        if deadline > Duration::from_secs(3600) {
            return Err(BuildError::TooLarge {
                field: "deadline (ms)",
                value: u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
                max: 3_600_000,
            });
        }
        Ok(Scatter {
            concurrency: usize::MAX,
            deadline,
            on_failure: OnShardFailure::Fail,
        })
    }

    /// At most `n` shard queries in flight (at least one).
    pub fn concurrency(mut self, n: usize) -> Result<Self, BuildError> {
        if n == 0 {
            return Err(BuildError::Zero {
                field: "concurrency",
            });
        }
        self.concurrency = n;
        Ok(self)
    }

    /// The policy for failed shards.
    pub fn on_failure(mut self, policy: OnShardFailure) -> Self {
        self.on_failure = policy;
        self
    }

    /// Runs `query(shard, target)` for each target, under the limit and the deadline.
    pub async fn run<T, R, E, F, Fut>(
        &self,
        targets: impl IntoIterator<Item = (ShardId, T)>,
        query: F,
    ) -> Result<Gathered<R, E>, ScatterError<E>>
    where
        F: Fn(ShardId, T) -> Fut,
        Fut: Future<Output = Result<R, E>>,
    {
        let deadline = tokio::time::Instant::now() + self.deadline;
        let limit = self.deadline;
        let query = &query;
        let mut stream = futures_util::stream::iter(targets)
            .map(|(shard, target)| async move {
                match tokio::time::timeout_at(deadline, query(shard, target)).await {
                    Ok(Ok(r)) => (shard, Ok(r)),
                    Ok(Err(e)) => (shard, Err(ShardFailure::Error(e))),
                    Err(_) => (shard, Err(ShardFailure::TimedOut(limit))),
                }
            })
            .buffer_unordered(self.concurrency);
        let mut out = Gathered {
            answers: Vec::new(),
            failures: Vec::new(),
        };
        while let Some((shard, result)) = stream.next().await {
            match result {
                Ok(r) => out.answers.push((shard, r)),
                Err(failure) => match self.on_failure {
                    OnShardFailure::Fail => return Err(ScatterError { shard, failure }),
                    OnShardFailure::Partial => out.failures.push((shard, failure)),
                },
            }
        }
        out.answers.sort_by_key(|a| a.0);
        out.failures.sort_by_key(|f| f.0);
        Ok(out)
    }
}

/// Merges lists that are each sorted by `key` into the first `limit` items overall, in order:
/// the gather step of a paginated list (ask each shard for `limit` rows after the cursor, merge,
/// and the last item's key is the next cursor). Ties keep the order of the lists.
///
/// ```
/// use stanchion_shard_router::merge_sorted;
/// let pages = vec![vec![1, 4, 9], vec![2, 3, 10], vec![5]];
/// assert_eq!(merge_sorted(pages, |x| *x, 4), vec![1, 2, 3, 4]);
/// ```
pub fn merge_sorted<R, K: Ord>(lists: Vec<Vec<R>>, key: impl Fn(&R) -> K, limit: usize) -> Vec<R> {
    struct Head<K> {
        key: K,
        list: usize,
    }
    impl<K: Ord> PartialEq for Head<K> {
        fn eq(&self, o: &Self) -> bool {
            self.cmp(o) == Ordering::Equal
        }
    }
    impl<K: Ord> Eq for Head<K> {}
    impl<K: Ord> PartialOrd for Head<K> {
        fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
            Some(self.cmp(o))
        }
    }
    impl<K: Ord> Ord for Head<K> {
        fn cmp(&self, o: &Self) -> Ordering {
            // A max-heap: reverse, so the smallest key (then the lowest list) comes first.
            o.key.cmp(&self.key).then(o.list.cmp(&self.list))
        }
    }
    let mut iters: Vec<std::vec::IntoIter<R>> = lists.into_iter().map(Vec::into_iter).collect();
    let mut pending: Vec<Option<R>> = iters.iter_mut().map(Iterator::next).collect();
    let mut heap = BinaryHeap::new();
    for (list, item) in pending.iter().enumerate() {
        if let Some(item) = item {
            heap.push(Head {
                key: key(item),
                list,
            });
        }
    }
    let mut out = Vec::with_capacity(limit.min(1024));
    while out.len() < limit {
        let Some(Head { list, .. }) = heap.pop() else {
            break;
        };
        let item = pending[list].take().expect("a head has its item");
        out.push(item);
        if let Some(next) = iters[list].next() {
            heap.push(Head {
                key: key(&next),
                list,
            });
            pending[list] = Some(next);
        }
    }
    out
}
