//! Time sources, in microseconds.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A time source in microseconds. GCRA state is absolute time in these units.
///
/// ```
/// use stanchion_ratelimit::{Clock, ManualClock};
/// let clock = ManualClock::new();
/// clock.advance(std::time::Duration::from_millis(2));
/// assert_eq!(clock.now_micros(), 2_000);
/// ```
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Microseconds since this clock's origin; never decreases.
    fn now_micros(&self) -> u64;
}

/// Monotonic time since the process started (the in-process limiter's default), read from the
/// CPU's time-stamp counter through `quanta` (about 10 ns where `Instant::now()` costs about 29 ns
/// on our machines).
///
/// ```
/// use stanchion_ratelimit::{Clock, MonotonicClock};
/// let c = MonotonicClock::default();
/// assert!(c.now_micros() <= c.now_micros());
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct MonotonicClock {
    _private: (),
}

impl Clock for MonotonicClock {
    #[inline]
    fn now_micros(&self) -> u64 {
        static ORIGIN: std::sync::OnceLock<quanta::Instant> = std::sync::OnceLock::new();
        let origin = *ORIGIN.get_or_init(quanta::Instant::now);
        let elapsed = quanta::Instant::now().saturating_duration_since(origin);
        // Start at one second so that "never seen" (0) is always in the past.
        u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX) + 1_000_000
    }
}

/// Moved by hand, for tests. Clones share the time.
///
/// ```
/// use std::time::Duration;
/// use stanchion_ratelimit::{Clock, ManualClock};
/// let c = ManualClock::new();
/// c.clone().advance(Duration::from_secs(1));
/// assert_eq!(c.now_micros(), 1_000_000);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    micros: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves time forward.
    pub fn advance(&self, by: Duration) {
        let micros = u64::try_from(by.as_micros()).unwrap_or(u64::MAX);
        self.micros.fetch_add(micros, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_micros(&self) -> u64 {
        self.micros.load(Ordering::SeqCst)
    }
}
