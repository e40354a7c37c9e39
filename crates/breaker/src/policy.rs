//! Failure policies: when does a closed breaker open?
//!
//! A policy sees every recorded call made while the breaker is `Closed` and answers whether the
//! breaker should open now. Policies keep their counters in atomics so that many threads record
//! without a lock; they are reset when the breaker closes.

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU32, AtomicU64};
use std::time::Duration;

use crate::clock::nanos;
use crate::error::{BuildError, percent};

/// One finished call, as a policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// The classifier said failure.
    pub failure: bool,
    /// How long the call took, in nanoseconds (0 unless a policy [needs the clock](FailurePolicy::needs_clock)).
    pub elapsed_nanos: u64,
    /// When it finished, in the breaker clock's nanoseconds (0 unless a policy needs the clock).
    pub now_nanos: u64,
}

/// The counts a policy currently judges, for [`Stats`](crate::Stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowCounts {
    /// Calls in the window.
    pub calls: u64,
    /// Failed calls in the window.
    pub failures: u64,
    /// Slow calls in the window.
    pub slow_calls: u64,
    /// Failures in a row (for [`ConsecutiveFailures`]).
    pub consecutive_failures: u64,
}

/// Decides when a closed breaker opens.
///
/// Implementations: [`ConsecutiveFailures`], [`CountWindow`], [`TimeWindow`] (both with
/// optional slow-call rates and a minimum number of calls), combined with [`FailurePolicy::or`].
///
/// ```
/// use stanchion_breaker::{ConsecutiveFailures, FailurePolicy, Record};
/// let policy = ConsecutiveFailures::new(2)?;
/// let failure = Record { failure: true, elapsed_nanos: 0, now_nanos: 0 };
/// assert!(!policy.record(&failure));
/// assert!(policy.record(&failure)); // second in a row: open
/// fn _object_safe(_: &dyn FailurePolicy) {}
/// # Ok::<(), stanchion_breaker::BuildError>(())
/// ```
pub trait FailurePolicy: Send + Sync + fmt::Debug + 'static {
    /// Records a call made while closed; `true` means the breaker should open now.
    fn record(&self, record: &Record) -> bool;
    /// Forgets everything (called when the breaker closes).
    fn reset(&self);
    /// Whether [`Record::now_nanos`] and [`Record::elapsed_nanos`] must be filled in. When no
    /// policy needs them, the breaker reads no clock on the closed path.
    fn needs_clock(&self) -> bool {
        false
    }
    /// The counts being judged.
    fn counts(&self) -> WindowCounts {
        WindowCounts::default()
    }
    /// The counts being judged at `now_nanos` (the breaker clock's time): a window over time
    /// first lets what is older than the window age out, so a window without calls for longer
    /// than its length reports nothing. The breaker's [`stats`](crate::CircuitBreaker::stats)
    /// calls this when the policy [needs the clock](Self::needs_clock). Defaults to
    /// [`counts`](Self::counts).
    fn counts_at(&self, now_nanos: u64) -> WindowCounts {
        let _ = now_nanos;
        self.counts()
    }
    /// Opens when either policy says so. Both see every call.
    fn or<B: FailurePolicy>(self, other: B) -> Or<Self, B>
    where
        Self: Sized,
    {
        Or { a: self, b: other }
    }
}

impl FailurePolicy for Box<dyn FailurePolicy> {
    fn record(&self, record: &Record) -> bool {
        (**self).record(record)
    }
    fn reset(&self) {
        (**self).reset();
    }
    fn needs_clock(&self) -> bool {
        (**self).needs_clock()
    }
    fn counts(&self) -> WindowCounts {
        (**self).counts()
    }
    fn counts_at(&self, now_nanos: u64) -> WindowCounts {
        (**self).counts_at(now_nanos)
    }
}

/// Two policies combined: opens when either does. Made by [`FailurePolicy::or`].
#[derive(Debug)]
pub struct Or<A, B> {
    a: A,
    b: B,
}

impl<A: FailurePolicy, B: FailurePolicy> FailurePolicy for Or<A, B> {
    fn record(&self, record: &Record) -> bool {
        let a = self.a.record(record);
        let b = self.b.record(record);
        a || b
    }
    fn reset(&self) {
        self.a.reset();
        self.b.reset();
    }
    fn needs_clock(&self) -> bool {
        self.a.needs_clock() || self.b.needs_clock()
    }
    fn counts(&self) -> WindowCounts {
        Self::merge(self.a.counts(), self.b.counts())
    }
    fn counts_at(&self, now_nanos: u64) -> WindowCounts {
        Self::merge(self.a.counts_at(now_nanos), self.b.counts_at(now_nanos))
    }
}

impl<A, B> Or<A, B> {
    fn merge(a: WindowCounts, b: WindowCounts) -> WindowCounts {
        WindowCounts {
            calls: a.calls.max(b.calls),
            failures: a.failures.max(b.failures),
            slow_calls: a.slow_calls.max(b.slow_calls),
            consecutive_failures: a.consecutive_failures.max(b.consecutive_failures),
        }
    }
}

/// Opens after `threshold` failures in a row (gobreaker's default `ReadyToTrip` and failsafe's
/// `consecutive_failures`). A success resets the count.
///
/// ```
/// use stanchion_breaker::ConsecutiveFailures;
/// assert!(ConsecutiveFailures::new(5).is_ok());
/// assert_eq!(ConsecutiveFailures::new(0).unwrap_err().field(), "consecutive_failures");
/// ```
#[derive(Debug)]
pub struct ConsecutiveFailures {
    threshold: u32,
    count: AtomicU32,
}

impl ConsecutiveFailures {
    /// Opens on the `threshold`-th failure in a row; `threshold` must be at least 1.
    ///
    /// # Errors
    /// [`BuildError`] for a threshold of zero.
    pub fn new(threshold: u32) -> Result<Self, BuildError> {
        if threshold == 0 {
            return Err(BuildError::new(
                "consecutive_failures",
                "at least 1",
                threshold,
            ));
        }
        Ok(Self {
            threshold,
            count: AtomicU32::new(0),
        })
    }
}

impl FailurePolicy for ConsecutiveFailures {
    #[inline]
    fn record(&self, record: &Record) -> bool {
        if record.failure {
            self.count.fetch_add(1, Relaxed).saturating_add(1) >= self.threshold
        } else {
            // Read first: a success after a success writes nothing (no cache-line ping-pong).
            if self.count.load(Relaxed) != 0 {
                self.count.store(0, Relaxed);
            }
            false
        }
    }
    fn reset(&self) {
        self.count.store(0, Relaxed);
    }
    fn counts(&self) -> WindowCounts {
        WindowCounts {
            consecutive_failures: u64::from(self.count.load(Relaxed)),
            ..WindowCounts::default()
        }
    }
}

/// Rate thresholds shared by the two windows.
#[derive(Debug, Clone, Copy)]
struct Rates {
    minimum_calls: u32,
    failure_bp: Option<u32>,
    slow_bp: Option<u32>,
    slow_nanos: u64,
}

impl Rates {
    fn validate(
        minimum_calls: u32,
        failure_rate: Option<f64>,
        slow: Option<(Duration, f64)>,
    ) -> Result<Self, BuildError> {
        if minimum_calls == 0 {
            return Err(BuildError::new("minimum_calls", "at least 1", 0));
        }
        let failure_bp = failure_rate
            .map(|r| percent("failure_rate", r))
            .transpose()?;
        let (slow_bp, slow_nanos) = match slow {
            Some((duration, rate)) => {
                if duration.is_zero() {
                    return Err(BuildError::new(
                        "slow_call_duration",
                        "greater than zero",
                        "0s",
                    ));
                }
                (Some(percent("slow_call_rate", rate)?), nanos(duration))
            }
            None => (None, u64::MAX),
        };
        if failure_bp.is_none() && slow_bp.is_none() {
            return Err(BuildError::new(
                "failure_rate",
                "set (or a slow-call rate set), otherwise the window never opens",
                "neither",
            ));
        }
        Ok(Self {
            minimum_calls,
            failure_bp,
            slow_bp,
            slow_nanos,
        })
    }

    #[inline]
    fn exceeded(&self, calls: i64, failures: i64, slow: i64) -> bool {
        if calls < i64::from(self.minimum_calls) || calls <= 0 {
            return false;
        }
        let over = |count: i64, bp: Option<u32>| {
            bp.is_some_and(|bp| count.saturating_mul(10_000) >= i64::from(bp) * calls)
        };
        over(failures, self.failure_bp) || over(slow, self.slow_bp)
    }
}

/// Settings for a [`CountWindow`] or [`TimeWindow`].
#[derive(Debug, Clone)]
#[must_use]
pub struct WindowBuilder<W> {
    size: u64,
    minimum_calls: Option<u32>,
    failure_rate: Option<f64>,
    slow: Option<(Duration, f64)>,
    stripes: Option<usize>,
    _kind: std::marker::PhantomData<fn() -> W>,
}

impl<W> WindowBuilder<W> {
    fn new(size: u64) -> Self {
        Self {
            size,
            minimum_calls: None,
            failure_rate: Some(50.0),
            slow: None,
            stripes: None,
            _kind: std::marker::PhantomData,
        }
    }

    /// Opens when at least this percentage of the window's calls failed (default 50).
    pub fn failure_rate(mut self, percent: f64) -> Self {
        self.failure_rate = Some(percent);
        self
    }

    /// Judges only the slow-call rate, not failures.
    pub fn no_failure_rate(mut self) -> Self {
        self.failure_rate = None;
        self
    }

    /// Opens when at least `percent` of the window's calls took `duration` or longer
    /// (slow-call detection; turns on clock reads on the closed path).
    pub fn slow_call_rate(mut self, duration: Duration, percent: f64) -> Self {
        self.slow = Some((duration, percent));
        self
    }

    /// No rate is judged before the window holds this many calls (default: the count window's
    /// size, or 100 for a time window).
    pub fn minimum_calls(mut self, calls: u32) -> Self {
        self.minimum_calls = Some(calls);
        self
    }
}

/// Aligns a hot atomic to its own cache line (128 bytes covers adjacent-line prefetch).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

const OCCUPIED: u8 = 0b100;
const FAILED: u8 = 0b001;
const SLOW: u8 = 0b010;
/// Largest count window: counts fit comfortably in the slot and aggregate arithmetic.
pub const MAX_COUNT_WINDOW: u32 = 1 << 20;

/// Failure (and slow-call) rate over the last `size` calls, lock-free: a ring of one-byte slots
/// and two running totals, so each call costs one `fetch_add` and one `swap` (plus a counter
/// update only when the outcome replaced in the ring differs) and the snapshot is O(1).
///
/// ```
/// use std::time::Duration;
/// use stanchion_breaker::CountWindow;
/// let window = CountWindow::builder(100)
///     .failure_rate(50.0)
///     .slow_call_rate(Duration::from_secs(2), 80.0)
///     .minimum_calls(20)
///     .build()?;
/// # Ok::<(), stanchion_breaker::BuildError>(())
/// ```
pub struct CountWindow {
    rates: Rates,
    size: u32,
    /// Lemire's fast-modulo constant for `size`: a slot index without a division.
    fastmod: u64,
    /// Written by every call: on a cache line of its own, so reading the settings above does
    /// not miss when several threads share the window.
    next: Padded<AtomicU64>,
    slots: Box<[AtomicU8]>,
    failures: AtomicI64,
    slow: AtomicI64,
}

impl fmt::Debug for CountWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountWindow")
            .field("size", &self.size)
            .field("rates", &self.rates)
            .field("counts", &self.counts())
            .finish()
    }
}

impl CountWindow {
    /// A window over the last `size` calls (1 to [`MAX_COUNT_WINDOW`]).
    pub fn builder(size: u32) -> WindowBuilder<CountWindow> {
        WindowBuilder::new(u64::from(size))
    }
}

impl WindowBuilder<CountWindow> {
    /// Validates the settings.
    ///
    /// # Errors
    /// [`BuildError`] for a size outside 1 to [`MAX_COUNT_WINDOW`], a minimum of calls of zero or
    /// above the size, a rate outside (0, 100], a zero slow-call duration, or no rate at all.
    pub fn build(self) -> Result<CountWindow, BuildError> {
        let size = u32::try_from(self.size).unwrap_or(u32::MAX);
        if size == 0 || size > MAX_COUNT_WINDOW {
            return Err(BuildError::new(
                "window_size",
                "between 1 and 1048576 calls",
                self.size,
            ));
        }
        let minimum_calls = self.minimum_calls.unwrap_or(size);
        if minimum_calls > size {
            return Err(BuildError::new(
                "minimum_calls",
                "at most the window size",
                minimum_calls,
            ));
        }
        let rates = Rates::validate(minimum_calls, self.failure_rate, self.slow)?;
        Ok(CountWindow {
            rates,
            size,
            fastmod: (u64::MAX / u64::from(size)).wrapping_add(1),
            next: Padded(AtomicU64::new(0)),
            slots: (0..size).map(|_| AtomicU8::new(0)).collect(),
            failures: AtomicI64::new(0),
            slow: AtomicI64::new(0),
        })
    }
}

impl CountWindow {
    /// `index mod size` for the low 32 bits of `index` (the ring's start moves once every 2^32
    /// calls, which only shifts which slot is overwritten next).
    #[inline]
    fn slot(&self, index: u64) -> usize {
        let low = index & u64::from(u32::MAX);
        let slot =
            ((u128::from(self.fastmod.wrapping_mul(low)) * u128::from(self.size)) >> 64) as usize;
        slot.min(self.slots.len() - 1)
    }
}

impl FailurePolicy for CountWindow {
    #[inline]
    fn record(&self, record: &Record) -> bool {
        let slow = record.elapsed_nanos >= self.rates.slow_nanos;
        let new = OCCUPIED | if record.failure { FAILED } else { 0 } | if slow { SLOW } else { 0 };
        let index = self.next.0.fetch_add(1, Relaxed);
        let slot = &self.slots[self.slot(index)];
        // The common case, the same outcome as the one it replaces, writes nothing. (Two calls
        // racing for one slot, possible only when the ring wraps within their overlap, may then
        // lose one record; the totals always match the slots.)
        if slot.load(Relaxed) != new {
            let old = slot.swap(new, Relaxed);
            let changed = old ^ new;
            if changed & FAILED != 0 {
                self.failures
                    .fetch_add(if record.failure { 1 } else { -1 }, Relaxed);
            }
            if changed & SLOW != 0 {
                self.slow.fetch_add(if slow { 1 } else { -1 }, Relaxed);
            }
        }
        // A fast success lowers the rates, except for the call that brings the window to its
        // minimum: that one starts the judging, so it is judged (fail, fail, fail, success,
        // success with a minimum of 5 at 50 % opens, as in resilience4j).
        if !record.failure && !slow && index + 1 != u64::from(self.rates.minimum_calls) {
            return false;
        }
        let calls = (index + 1).min(u64::from(self.size)) as i64;
        self.rates
            .exceeded(calls, self.failures.load(Relaxed), self.slow.load(Relaxed))
    }

    fn reset(&self) {
        for slot in self.slots.iter() {
            slot.store(0, Relaxed);
        }
        self.failures.store(0, Relaxed);
        self.slow.store(0, Relaxed);
        self.next.0.store(0, Relaxed);
    }

    fn needs_clock(&self) -> bool {
        self.rates.slow_bp.is_some()
    }

    fn counts(&self) -> WindowCounts {
        WindowCounts {
            calls: self.next.0.load(Relaxed).min(u64::from(self.size)),
            failures: self.failures.load(Relaxed).max(0) as u64,
            slow_calls: self.slow.load(Relaxed).max(0) as u64,
            consecutive_failures: 0,
        }
    }
}

#[derive(Debug, Default)]
struct Bucket {
    calls: AtomicI64,
    failures: AtomicI64,
    slow: AtomicI64,
}

impl Bucket {
    fn clear(&self) {
        self.calls.store(0, Relaxed);
        self.failures.store(0, Relaxed);
        self.slow.store(0, Relaxed);
    }
}

/// One thread group's share of a [`TimeWindow`]: its own buckets and totals, so threads on
/// different stripes never write the same cache line.
#[derive(Debug)]
struct Stripe {
    totals: Bucket,
    buckets: Box<[Bucket]>,
}

/// Most stripes a time window uses by default.
const MAX_DEFAULT_STRIPES: usize = 8;

/// A stripe index per thread, handed out in turn.
fn thread_stripe() -> usize {
    use std::cell::Cell;
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    STRIPE.with(|s| {
        let mut i = s.get();
        if i == usize::MAX {
            i = NEXT.fetch_add(1, Relaxed) & (usize::MAX >> 1);
            s.set(i);
        }
        i
    })
}

const AGED: u8 = 0b01;
const BELOW_MINIMUM: u8 = 0b10;

/// Failure (and slow-call) rate over the last N whole seconds, in per-second buckets with running
/// totals, striped by thread: recording is a few atomic adds on the calling thread's stripe, a
/// snapshot sums the stripes, and buckets that age out are cleared under a lock taken at most
/// once per second.
///
/// Memory: `stripes x seconds x 24` bytes (the default stripe count is the number of CPUs
/// rounded up to a power of two, at most 8; set it with
/// [`stripes`](WindowBuilder::stripes)).
///
/// ```
/// use std::time::Duration;
/// use stanchion_breaker::TimeWindow;
/// let window = TimeWindow::builder(Duration::from_secs(10))
///     .failure_rate(25.0)
///     .minimum_calls(50)
///     .build()?;
/// # Ok::<(), stanchion_breaker::BuildError>(())
/// ```
pub struct TimeWindow {
    rates: Rates,
    len: u64,
    /// `stripes.len() - 1` (a power of two minus one).
    mask: usize,
    head: AtomicU64,
    /// [`AGED`]: calls aged out since the last judgement, so the rates may have risen;
    /// [`BELOW_MINIMUM`]: the last judgement saw fewer calls than the minimum. Either makes the
    /// next fast success judged too. Read by every call, written rarely.
    flags: AtomicU8,
    stripes: Box<[Padded<Stripe>]>,
    rotate: Mutex<()>,
}

impl fmt::Debug for TimeWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimeWindow")
            .field("seconds", &self.len)
            .field("stripes", &self.stripes.len())
            .field("rates", &self.rates)
            .field("counts", &self.counts())
            .finish()
    }
}

/// Longest time window, in seconds.
pub const MAX_TIME_WINDOW_SECS: u64 = 3600;

/// Most stripes of a time window.
pub const MAX_TIME_WINDOW_STRIPES: usize = 64;

impl TimeWindow {
    /// A window over the last `length` (whole seconds, 1 s to one hour).
    pub fn builder(length: Duration) -> WindowBuilder<TimeWindow> {
        // Sub-second remainders are rejected by `build`, not rounded away.
        let size = if length.subsec_nanos() == 0 {
            length.as_secs()
        } else {
            u64::MAX
        };
        WindowBuilder::new(size)
    }

    fn advance(&self, second: u64) {
        let _guard = match self.rotate.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let head = self.head.load(Relaxed);
        if second <= head {
            return;
        }
        let from = if second - head >= self.len {
            second + 1 - self.len
        } else {
            head + 1
        };
        let mut dropped = 0;
        for stripe in self.stripes.iter() {
            let stripe = &stripe.0;
            for s in from..=second {
                let bucket = &stripe.buckets[(s % self.len) as usize];
                let calls = bucket.calls.swap(0, Relaxed);
                dropped += calls;
                stripe.totals.calls.fetch_sub(calls, Relaxed);
                stripe
                    .totals
                    .failures
                    .fetch_sub(bucket.failures.swap(0, Relaxed), Relaxed);
                stripe
                    .totals
                    .slow
                    .fetch_sub(bucket.slow.swap(0, Relaxed), Relaxed);
            }
        }
        self.head.store(second, Relaxed);
        if dropped != 0 {
            self.flags.fetch_or(AGED, Relaxed);
        }
    }

    /// (calls, failures, slow calls) over every stripe.
    fn sum(&self) -> (i64, i64, i64) {
        self.stripes.iter().fold((0, 0, 0), |(c, f, s), stripe| {
            let t = &stripe.0.totals;
            (
                c + t.calls.load(Relaxed),
                f + t.failures.load(Relaxed),
                s + t.slow.load(Relaxed),
            )
        })
    }
}

impl WindowBuilder<TimeWindow> {
    /// Stripes of a time window's counters (1 to 64, rounded up to a power of two; default:
    /// the number of CPUs, at most 8). Threads are spread over the stripes so that callers on
    /// different cores do not write the same cache line; each stripe costs 24 bytes per second
    /// of the window. One stripe is the smallest window, for breakers used by one thread.
    pub fn stripes(mut self, stripes: usize) -> Self {
        self.stripes = Some(stripes);
        self
    }

    /// Validates the settings.
    ///
    /// # Errors
    /// [`BuildError`] for a length that is not whole seconds from 1 to
    /// [`MAX_TIME_WINDOW_SECS`], a minimum of calls of zero, a rate outside (0, 100], a zero
    /// slow-call duration, no rate at all, or a stripe count outside 1 to
    /// [`MAX_TIME_WINDOW_STRIPES`].
    pub fn build(self) -> Result<TimeWindow, BuildError> {
        if self.size == 0 || self.size > MAX_TIME_WINDOW_SECS {
            return Err(BuildError::new(
                "window_duration",
                "whole seconds between 1 s and 3600 s",
                if self.size == u64::MAX {
                    "a fraction of a second".to_owned()
                } else {
                    format!("{}s", self.size)
                },
            ));
        }
        let rates = Rates::validate(
            self.minimum_calls.unwrap_or(100),
            self.failure_rate,
            self.slow,
        )?;
        let stripes = match self.stripes {
            Some(n) if n == 0 || n > MAX_TIME_WINDOW_STRIPES => {
                return Err(BuildError::new("stripes", "between 1 and 64", n));
            }
            Some(n) => n.next_power_of_two(),
            None => std::thread::available_parallelism()
                .map_or(1, usize::from)
                .min(MAX_DEFAULT_STRIPES)
                .next_power_of_two(),
        };
        Ok(TimeWindow {
            rates,
            len: self.size,
            mask: stripes - 1,
            head: AtomicU64::new(0),
            flags: AtomicU8::new(BELOW_MINIMUM),
            stripes: (0..stripes)
                .map(|_| {
                    Padded(Stripe {
                        totals: Bucket::default(),
                        buckets: (0..self.size).map(|_| Bucket::default()).collect(),
                    })
                })
                .collect(),
            rotate: Mutex::new(()),
        })
    }
}

impl FailurePolicy for TimeWindow {
    #[inline]
    fn record(&self, record: &Record) -> bool {
        let second = record.now_nanos / 1_000_000_000;
        let mut head = self.head.load(Relaxed);
        if second > head {
            self.advance(second);
            head = self.head.load(Relaxed);
        }
        // A call that finished in a second already aged out (a very late thread) counts now.
        let second = if second + self.len <= head {
            head
        } else {
            second.min(head)
        };
        let stripe = &self.stripes[thread_stripe() & self.mask].0;
        let bucket = &stripe.buckets[(second % self.len) as usize];
        let slow = record.elapsed_nanos >= self.rates.slow_nanos;
        bucket.calls.fetch_add(1, Relaxed);
        stripe.totals.calls.fetch_add(1, Relaxed);
        if record.failure {
            bucket.failures.fetch_add(1, Relaxed);
            stripe.totals.failures.fetch_add(1, Relaxed);
        }
        if slow {
            bucket.slow.fetch_add(1, Relaxed);
            stripe.totals.slow.fetch_add(1, Relaxed);
        }
        let flags = self.flags.load(Relaxed);
        // A fast success lowers the rates unless calls aged out since the last judgement or
        // the window was below its minimum (this call may be the one that reaches it).
        if !record.failure && !slow && flags == 0 {
            return false;
        }
        let (calls, failures, slow_calls) = self.sum();
        let below = if calls < i64::from(self.rates.minimum_calls) {
            BELOW_MINIMUM
        } else {
            0
        };
        if flags != below {
            // Clears AGED (this judgement saw the aging) and keeps BELOW_MINIMUM current.
            self.flags.store(below, Relaxed);
        }
        self.rates.exceeded(calls, failures, slow_calls)
    }

    fn reset(&self) {
        let _guard = match self.rotate.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        for stripe in self.stripes.iter() {
            stripe.0.totals.clear();
            for bucket in stripe.0.buckets.iter() {
                bucket.clear();
            }
        }
        self.flags.store(BELOW_MINIMUM, Relaxed);
    }

    fn needs_clock(&self) -> bool {
        true
    }

    fn counts_at(&self, now_nanos: u64) -> WindowCounts {
        let second = now_nanos / 1_000_000_000;
        if second > self.head.load(Relaxed) {
            self.advance(second);
        }
        self.counts()
    }

    fn counts(&self) -> WindowCounts {
        let (calls, failures, slow) = self.sum();
        WindowCounts {
            calls: calls.max(0) as u64,
            failures: failures.max(0) as u64,
            slow_calls: slow.max(0) as u64,
            consecutive_failures: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(failure: bool, elapsed_ms: u64, now_s: u64) -> Record {
        Record {
            failure,
            elapsed_nanos: elapsed_ms * 1_000_000,
            now_nanos: now_s * 1_000_000_000,
        }
    }

    #[test]
    fn count_window_waits_for_minimum_calls_then_judges_the_rate() {
        let w = CountWindow::builder(10)
            .failure_rate(50.0)
            .minimum_calls(4)
            .build()
            .unwrap();
        assert!(!w.record(&rec(true, 0, 0)));
        assert!(!w.record(&rec(true, 0, 0)));
        assert!(!w.record(&rec(false, 0, 0)));
        // 3 of 4 failed: 75 % >= 50 %.
        assert!(w.record(&rec(true, 0, 0)));
    }

    #[test]
    fn the_success_that_reaches_the_minimum_is_judged() {
        // resilience4j: fail, fail, fail, success, success with a minimum of 5 at 50 % opens
        // (3 of 5 = 60 %) on the fifth call, a success.
        let w = CountWindow::builder(10)
            .failure_rate(50.0)
            .minimum_calls(5)
            .build()
            .unwrap();
        for _ in 0..3 {
            assert!(!w.record(&rec(true, 0, 0)));
        }
        assert!(!w.record(&rec(false, 0, 0)));
        assert!(w.record(&rec(false, 0, 0)));

        let t = TimeWindow::builder(Duration::from_secs(10))
            .failure_rate(50.0)
            .minimum_calls(5)
            .build()
            .unwrap();
        for _ in 0..3 {
            assert!(!t.record(&rec(true, 0, 100)));
        }
        assert!(!t.record(&rec(false, 0, 100)));
        assert!(t.record(&rec(false, 0, 100)));
    }

    #[test]
    fn a_success_after_older_successes_aged_out_is_judged() {
        let t = TimeWindow::builder(Duration::from_secs(10))
            .failure_rate(50.0)
            .minimum_calls(5)
            .build()
            .unwrap();
        for _ in 0..10 {
            assert!(!t.record(&rec(false, 0, 100)));
        }
        for _ in 0..5 {
            assert!(!t.record(&rec(true, 0, 105))); // 5 of 15
        }
        // At 111 s the ten successes have aged out: 5 failures and this success, 83 %.
        assert!(t.record(&rec(false, 0, 111)));
    }

    #[test]
    fn aging_seen_by_a_read_is_still_judged_by_the_next_success() {
        let t = TimeWindow::builder(Duration::from_secs(10))
            .failure_rate(50.0)
            .minimum_calls(5)
            .build()
            .unwrap();
        for _ in 0..10 {
            t.record(&rec(false, 0, 100));
        }
        for _ in 0..5 {
            t.record(&rec(true, 0, 105));
        }
        assert_eq!(t.counts_at(111 * 1_000_000_000).calls, 5);
        assert!(t.record(&rec(false, 0, 111)));
    }

    #[test]
    fn time_window_counts_age_out_on_read() {
        let t = TimeWindow::builder(Duration::from_secs(5))
            .failure_rate(50.0)
            .build()
            .unwrap();
        t.record(&rec(true, 10, 100));
        t.record(&rec(false, 10, 102));
        assert_eq!(t.counts_at(104 * 1_000_000_000).calls, 2);
        assert_eq!(t.counts_at(105 * 1_000_000_000).calls, 1);
        assert_eq!(
            t.counts_at(200 * 1_000_000_000),
            WindowCounts::default(),
            "no calls for longer than the window"
        );
    }

    #[test]
    fn stripes_written_by_many_threads_add_up_and_age_out_together() {
        let t = TimeWindow::builder(Duration::from_secs(5))
            .failure_rate(50.0)
            .minimum_calls(1_000_000)
            .stripes(4)
            .build()
            .unwrap();
        std::thread::scope(|s| {
            for thread in 0..6u64 {
                let t = &t;
                s.spawn(move || {
                    for i in 0..10_000u64 {
                        t.record(&rec(i % 10 == thread % 10, 0, 100));
                    }
                });
            }
        });
        let c = t.counts();
        assert_eq!((c.calls, c.failures), (60_000, 6_000));
        assert_eq!(t.counts_at(104 * 1_000_000_000).calls, 60_000);
        assert_eq!(t.counts_at(105 * 1_000_000_000), WindowCounts::default());
    }

    #[test]
    fn a_striped_window_opens_on_failures_from_several_threads() {
        let t = TimeWindow::builder(Duration::from_secs(10))
            .failure_rate(50.0)
            .minimum_calls(100)
            .stripes(8)
            .build()
            .unwrap();
        let opened = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..30 {
                        t.record(&rec(false, 0, 100));
                        if t.record(&rec(true, 0, 100)) {
                            opened.store(true, Relaxed);
                        }
                    }
                });
            }
        });
        assert!(opened.load(Relaxed), "240 calls, half failed: opens");
        assert_eq!(
            field_of(
                TimeWindow::builder(Duration::from_secs(1))
                    .stripes(0)
                    .build()
            ),
            "stripes"
        );
        assert_eq!(
            field_of(
                TimeWindow::builder(Duration::from_secs(1))
                    .stripes(65)
                    .build()
            ),
            "stripes"
        );
    }

    fn field_of<T>(r: Result<T, BuildError>) -> &'static str {
        r.err().map_or("", |e| e.field())
    }

    #[test]
    fn fast_modulo_matches_the_remainder() {
        for size in [1u32, 2, 3, 7, 10, 100, 1000, 65_537, MAX_COUNT_WINDOW] {
            let w = CountWindow::builder(size).build().unwrap();
            for index in (0..5000u64).chain([u64::from(u32::MAX) - 3, u64::from(u32::MAX)]) {
                assert_eq!(
                    w.slot(index) as u64,
                    (index & u64::from(u32::MAX)) % u64::from(size)
                );
            }
        }
    }

    #[test]
    fn count_window_forgets_calls_that_slide_out() {
        let w = CountWindow::builder(4).failure_rate(50.0).build().unwrap();
        for _ in 0..4 {
            w.record(&rec(false, 0, 0));
        }
        assert!(!w.record(&rec(true, 0, 0))); // 1 of 4
        assert_eq!(w.counts().failures, 1);
        for _ in 0..4 {
            w.record(&rec(false, 0, 0));
        }
        assert_eq!(w.counts().failures, 0);
        assert_eq!(w.counts().calls, 4);
    }

    #[test]
    fn slow_calls_open_a_window_on_their_own() {
        let w = CountWindow::builder(4)
            .no_failure_rate()
            .slow_call_rate(Duration::from_millis(100), 50.0)
            .build()
            .unwrap();
        assert!(w.needs_clock());
        assert!(!w.record(&rec(false, 150, 0)));
        assert!(!w.record(&rec(false, 10, 0)));
        assert!(!w.record(&rec(false, 10, 0)));
        assert!(w.record(&rec(false, 150, 0)));
        assert_eq!(w.counts().slow_calls, 2);
    }

    #[test]
    fn time_window_ages_out_whole_seconds() {
        let w = TimeWindow::builder(Duration::from_secs(2))
            .failure_rate(50.0)
            .minimum_calls(2)
            .build()
            .unwrap();
        assert!(!w.record(&rec(true, 0, 100)));
        assert_eq!(w.counts().calls, 1);
        // Three seconds later the failure has aged out.
        assert!(!w.record(&rec(false, 0, 103)));
        assert_eq!(
            w.counts(),
            WindowCounts {
                calls: 1,
                ..Default::default()
            }
        );
        assert!(w.record(&rec(true, 0, 103)));
        assert!(!w.record(&rec(false, 0, 104)));
        assert_eq!(w.counts().calls, 3);
    }

    #[test]
    fn bad_settings_name_their_field() {
        let field = |r: Result<CountWindow, BuildError>| r.unwrap_err().field();
        assert_eq!(field(CountWindow::builder(0).build()), "window_size");
        assert_eq!(
            field(CountWindow::builder(10).failure_rate(101.0).build()),
            "failure_rate"
        );
        assert_eq!(
            field(CountWindow::builder(10).failure_rate(f64::NAN).build()),
            "failure_rate"
        );
        assert_eq!(
            field(CountWindow::builder(10).failure_rate(0.0).build()),
            "failure_rate"
        );
        assert_eq!(
            field(CountWindow::builder(10).minimum_calls(11).build()),
            "minimum_calls"
        );
        assert_eq!(
            field(CountWindow::builder(10).minimum_calls(0).build()),
            "minimum_calls"
        );
        assert_eq!(
            field(
                CountWindow::builder(10)
                    .slow_call_rate(Duration::ZERO, 50.0)
                    .build()
            ),
            "slow_call_duration"
        );
        assert_eq!(
            field(CountWindow::builder(10).no_failure_rate().build()),
            "failure_rate"
        );
        let t = |d| TimeWindow::builder(d).build().unwrap_err().field();
        assert_eq!(t(Duration::ZERO), "window_duration");
        assert_eq!(t(Duration::from_millis(1500)), "window_duration");
        assert_eq!(t(Duration::from_secs(7200)), "window_duration");
    }

    #[test]
    fn or_opens_when_either_opens() {
        let p = ConsecutiveFailures::new(3)
            .unwrap()
            .or(CountWindow::builder(2).failure_rate(100.0).build().unwrap());
        assert!(!p.record(&rec(true, 0, 0)));
        assert!(p.record(&rec(true, 0, 0))); // the window of 2 is all failures
    }
}
