//! Wall-clock time in milliseconds: entries carry absolute times that every instance reads.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A time source in milliseconds since the Unix epoch. Entries in L2 carry absolute times in
/// these units, so instances sharing a Redis must have clocks that agree (NTP-synchronised
/// hosts are off by milliseconds, far below any TTL worth setting).
///
/// ```
/// use stanchion_tiered_cache::{Clock, ManualClock};
/// let clock = ManualClock::new(1_000);
/// clock.advance(std::time::Duration::from_millis(5));
/// assert_eq!(clock.now_ms(), 1_005);
/// ```
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system clock (the default).
///
/// ```
/// use stanchion_tiered_cache::{Clock, SystemClock};
/// assert!(SystemClock.now_ms() > 1_700_000_000_000);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// Moved by hand, for tests. Clones share the time.
///
/// ```
/// use std::time::Duration;
/// use stanchion_tiered_cache::{Clock, ManualClock};
/// let c = ManualClock::new(0);
/// c.clone().advance(Duration::from_secs(1));
/// assert_eq!(c.now_ms(), 1_000);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    ms: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock reading `start_ms`.
    pub fn new(start_ms: u64) -> Self {
        Self {
            ms: Arc::new(AtomicU64::new(start_ms)),
        }
    }

    /// Moves time forward (saturating).
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        let _ = self
            .ms
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(by))
            });
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.ms.load(Ordering::SeqCst)
    }
}
