//! Counters: a cheap snapshot for tests and reports, and the `metrics` facade behind a feature.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// What a cache did since it was built (see [`crate::TieredCache::stats`]).
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Stats {
            $($(#[$doc])* pub $name: u64,)*
        }

        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $(pub(crate) $name: AtomicU64,)*
        }

        impl Counters {
            pub(crate) fn snapshot(&self) -> Stats {
                Stats { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

counters! {
    /// Calls answered from process memory.
    l1_hits,
    /// Calls that found nothing usable in process memory.
    l1_misses,
    /// Lookups answered from L2.
    l2_hits,
    /// Lookups that found nothing usable in L2.
    l2_misses,
    /// Loader calls.
    loads,
    /// Loader calls that returned an error or panicked.
    load_errors,
    /// Total time spent in loaders, in microseconds.
    load_micros,
    /// Callers that waited for another caller's load in this process instead of loading.
    coalesced,
    /// Values served past their soft TTL (a refresh was due) or, on failure, past their TTL.
    stale_served,
    /// Background refreshes started.
    refreshes,
    /// Loads that waited for another instance holding the key's lease.
    lease_waits,
    /// Of those, waits that ended without the other instance's value.
    lease_timeouts,
    /// Waits that took the lease over once the holder's had lapsed without a value (its
    /// process died), and loaded for everyone.
    lease_takeovers,
    /// Invalidation messages published.
    invalidations_sent,
    /// Invalidation messages from other instances applied.
    invalidations_received,
    /// Process memory cleared because bus messages may have been lost.
    l1_clears,
    /// L2 calls that failed or timed out.
    l2_errors,
    /// L2 calls not made because the skip policy said so.
    l2_skipped,
    /// L2 values that failed to decode (treated as misses and overwritten).
    corrupt,
    /// Values over the size limit, not written to L2.
    oversized,
    /// Loaded values not written back because an invalidation came first.
    stale_writes_refused,
    /// Values not cached because the tagger gave more than 32 tags, or an empty tag or one
    /// over 128 bytes.
    invalid_tags,
}

#[inline]
pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[inline]
pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Under the `metrics` feature: the counter `cache.<field>` labelled with `cache.namespace`.
#[cfg(feature = "metrics")]
pub(crate) fn emit(labels: &[metrics::Label], name: &'static str) {
    emit_n(labels, name, 1);
}

/// [`emit`] by `n`.
#[cfg(feature = "metrics")]
pub(crate) fn emit_n(labels: &[metrics::Label], name: &'static str, n: u64) {
    if n > 0 {
        metrics::counter!(name, labels.iter()).increment(n);
    }
}
