//! The circuit breaker state machine.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::classify::{Classifier, DefaultClassifier, Outcome};
use crate::clock::{Clock, CoarseClock, nanos};
use crate::error::{BreakerError, BuildError, Rejected, percent};
use crate::policy::{CountWindow, FailurePolicy, Record, WindowCounts};

/// The state of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Calls flow; outcomes are recorded by the failure policy.
    Closed,
    /// Calls are rejected until the open wait has passed.
    Open,
    /// A fixed number of probe calls are admitted; their outcomes decide.
    HalfOpen,
    /// Held open by an operator: every call is rejected until [`CircuitBreaker::reset`].
    ForcedOpen,
    /// Switched off by an operator: every call is admitted and nothing is recorded.
    Disabled,
}

impl State {
    const fn code(self) -> u64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
            State::ForcedOpen => 3,
            State::Disabled => 4,
        }
    }

    const fn from_code(code: u64) -> Self {
        match code {
            0 => State::Closed,
            1 => State::Open,
            2 => State::HalfOpen,
            3 => State::ForcedOpen,
            _ => State::Disabled,
        }
    }

    /// Stable lowercase name, as used in events and metrics (`breaker.state`).
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::ForcedOpen => "forced_open",
            State::Disabled => "disabled",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// The state word: generation << 3 | state. Every transition bumps the generation, so an outcome
// recorded for a call admitted under an earlier state is recognised and dropped.
const STATE_BITS: u64 = 3;
const STATE_MASK: u64 = (1 << STATE_BITS) - 1;

fn word_state(word: u64) -> State {
    State::from_code(word & STATE_MASK)
}

fn word(generation: u64, state: State) -> u64 {
    (generation << STATE_BITS) | state.code()
}

/// How long the breaker stays open before probing.
///
/// ```
/// use std::time::Duration;
/// use stanchion_breaker::OpenWait;
/// let wait = OpenWait::exponential(Duration::from_secs(1), 2.0, Duration::from_secs(60));
/// assert_eq!(wait.after_opens(1), Duration::from_secs(1));
/// assert_eq!(wait.after_opens(3), Duration::from_secs(4));
/// assert_eq!(wait.after_opens(30), Duration::from_secs(60));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum OpenWait {
    /// Always the same wait (resilience4j `waitDurationInOpenState`, gobreaker `Timeout`).
    Fixed(Duration),
    /// `initial * multiplier^(opens-1)`, capped at `max`, where `opens` counts the times the
    /// breaker opened since it was last closed (a failed probe grows the wait).
    Exponential {
        /// The first wait.
        initial: Duration,
        /// Growth per repeated open (at least 1).
        multiplier: f64,
        /// The longest wait.
        max: Duration,
    },
}

impl OpenWait {
    /// A wait that grows with repeated opens.
    pub fn exponential(initial: Duration, multiplier: f64, max: Duration) -> Self {
        OpenWait::Exponential {
            initial,
            multiplier,
            max,
        }
    }

    /// The wait after the `opens`-th consecutive open (1-based).
    pub fn after_opens(&self, opens: u32) -> Duration {
        match *self {
            OpenWait::Fixed(d) => d,
            OpenWait::Exponential {
                initial,
                multiplier,
                max,
            } => {
                let exponent = i32::try_from(opens.saturating_sub(1)).unwrap_or(i32::MAX);
                let secs = initial.as_secs_f64() * multiplier.powi(exponent);
                if secs.is_finite() && secs < max.as_secs_f64() {
                    Duration::from_secs_f64(secs)
                } else {
                    max
                }
            }
        }
    }

    fn validate(&self) -> Result<(), BuildError> {
        match *self {
            OpenWait::Fixed(d) if d.is_zero() => {
                Err(BuildError::new("open_wait", "greater than zero", "0s"))
            }
            OpenWait::Exponential {
                initial,
                multiplier,
                max,
            } => {
                if initial.is_zero() {
                    return Err(BuildError::new(
                        "open_wait.initial",
                        "greater than zero",
                        "0s",
                    ));
                }
                if multiplier.is_nan() || multiplier < 1.0 || multiplier.is_infinite() {
                    return Err(BuildError::new(
                        "open_wait.multiplier",
                        "a finite number of at least 1",
                        multiplier,
                    ));
                }
                if max < initial {
                    return Err(BuildError::new(
                        "open_wait.max",
                        "at least the initial wait",
                        format!("{max:?}"),
                    ));
                }
                Ok(())
            }
            OpenWait::Fixed(_) => Ok(()),
        }
    }
}

/// Something that happened to a breaker, passed to [`OnEvent`] hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerEvent<'a> {
    /// The state changed.
    Transition {
        /// The breaker's name.
        name: &'a str,
        /// The state before.
        from: State,
        /// The state after.
        to: State,
    },
    /// A call was refused.
    Rejected {
        /// The breaker's name.
        name: &'a str,
        /// The state that refused it.
        state: State,
    },
}

/// A hook called on transitions and rejections (never on the closed path). Implemented for `()`
/// (nothing) and for closures.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use stanchion_breaker::{BreakerEvent, CircuitBreaker, ConsecutiveFailures, State};
/// let seen = Arc::new(Mutex::new(Vec::new()));
/// let log = seen.clone();
/// let breaker = CircuitBreaker::builder()
///     .policy(ConsecutiveFailures::new(1)?)
///     .on_event(move |e: &BreakerEvent<'_>| {
///         if let BreakerEvent::Transition { to, .. } = e {
///             log.lock().unwrap().push(*to);
///         }
///     })
///     .build()?;
/// let _ = breaker.call_sync(|| Err::<(), _>(()));
/// assert_eq!(*seen.lock().unwrap(), vec![State::Open]);
/// # Ok::<(), stanchion_breaker::BuildError>(())
/// ```
pub trait OnEvent: Send + Sync + 'static {
    /// Called after the event, outside any lock of the breaker.
    fn on_event(&self, event: &BreakerEvent<'_>);
}

impl OnEvent for () {
    fn on_event(&self, _event: &BreakerEvent<'_>) {}
}

impl<F> OnEvent for F
where
    F: Fn(&BreakerEvent<'_>) + Send + Sync + 'static,
{
    fn on_event(&self, event: &BreakerEvent<'_>) {
        self(event);
    }
}

/// A snapshot of a breaker, cheap to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// The current state.
    pub state: State,
    /// What the failure policy currently judges (cleared when the breaker closes).
    pub window: WindowCounts,
    /// Calls refused since the breaker was built.
    pub rejected: u64,
    /// State changes since the breaker was built.
    pub transitions: u64,
    /// Times opened since last closed (drives [`OpenWait::Exponential`]).
    pub consecutive_opens: u32,
}

/// Settings of a [`CircuitBreaker`].
#[must_use]
pub struct CircuitBreakerBuilder<P = CountWindow, C = CoarseClock> {
    name: Arc<str>,
    policy: Result<P, BuildError>,
    clock: C,
    open_wait: OpenWait,
    half_open_calls: u32,
    half_open_failure_rate: Option<f64>,
    automatic_half_open: bool,
    on_event: Option<Arc<dyn OnEvent>>,
}

impl<P: fmt::Debug, C: fmt::Debug> fmt::Debug for CircuitBreakerBuilder<P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerBuilder")
            .field("name", &self.name)
            .field("policy", &self.policy)
            .field("clock", &self.clock)
            .field("open_wait", &self.open_wait)
            .field("half_open_calls", &self.half_open_calls)
            .field("half_open_failure_rate", &self.half_open_failure_rate)
            .field("automatic_half_open", &self.automatic_half_open)
            .finish_non_exhaustive()
    }
}

impl Default for CircuitBreakerBuilder {
    fn default() -> Self {
        Self {
            name: Arc::from("default"),
            // resilience4j's defaults: 100 calls, 50 %, judged once the window is full.
            policy: CountWindow::builder(100).failure_rate(50.0).build(),
            clock: CoarseClock::default(),
            open_wait: OpenWait::Fixed(Duration::from_secs(60)),
            half_open_calls: 10,
            half_open_failure_rate: None,
            automatic_half_open: false,
            on_event: None,
        }
    }
}

impl<P: FailurePolicy, C: Clock> CircuitBreakerBuilder<P, C> {
    /// The name used in events, metrics and the [`Registry`](crate::Registry).
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// The failure policy (default: [`CountWindow`] of 100 calls at 50 %).
    pub fn policy<Q: FailurePolicy>(self, policy: Q) -> CircuitBreakerBuilder<Q, C> {
        CircuitBreakerBuilder {
            name: self.name,
            policy: Ok(policy),
            clock: self.clock,
            open_wait: self.open_wait,
            half_open_calls: self.half_open_calls,
            half_open_failure_rate: self.half_open_failure_rate,
            automatic_half_open: self.automatic_half_open,
            on_event: self.on_event,
        }
    }

    /// The time source (default [`CoarseClock`]; [`ManualClock`](crate::ManualClock) in tests).
    pub fn clock<D: Clock>(self, clock: D) -> CircuitBreakerBuilder<P, D> {
        CircuitBreakerBuilder {
            name: self.name,
            policy: self.policy,
            clock,
            open_wait: self.open_wait,
            half_open_calls: self.half_open_calls,
            half_open_failure_rate: self.half_open_failure_rate,
            automatic_half_open: self.automatic_half_open,
            on_event: self.on_event,
        }
    }

    /// How long to stay open (default 60 s fixed).
    pub fn open_wait(mut self, wait: OpenWait) -> Self {
        self.open_wait = wait;
        self
    }

    /// Probe calls admitted in half-open (default 10, 1 to 65,535). By default all must succeed
    /// to close and any failure opens again (gobreaker's rule); see
    /// [`half_open_failure_rate`](Self::half_open_failure_rate) for resilience4j's.
    ///
    /// A slow probe that succeeds counts as a success: the slow-call threshold belongs to the
    /// failure policy, which judges only calls made while closed. Classify slow probes as
    /// failures with a [`Classifier`] if they should reopen the breaker.
    pub fn half_open_calls(mut self, calls: u32) -> Self {
        self.half_open_calls = calls;
        self
    }

    /// Decides half-open by a failure rate over the probes (resilience4j's rule) instead of
    /// "all must succeed": once every one of the `half_open_calls` probes has an outcome, the
    /// breaker opens if at least `percent` of them failed and closes otherwise. It opens as soon
    /// as enough probes failed that the remaining ones cannot bring the rate below `percent`.
    ///
    /// ```
    /// use stanchion_breaker::{CircuitBreaker, ConsecutiveFailures};
    /// // Four probes; close unless half or more of them fail.
    /// let breaker = CircuitBreaker::builder()
    ///     .policy(ConsecutiveFailures::new(5)?)
    ///     .half_open_calls(4)
    ///     .half_open_failure_rate(50.0)
    ///     .build()?;
    /// # let _ = breaker;
    /// # Ok::<(), stanchion_breaker::BuildError>(())
    /// ```
    pub fn half_open_failure_rate(mut self, percent: f64) -> Self {
        self.half_open_failure_rate = Some(percent);
        self
    }

    /// Move to half-open as soon as the open wait passes, on a timer (needs a tokio runtime at
    /// the time the breaker opens), and also from [`CircuitBreaker::state`] once the wait has
    /// passed. Off (the default), the breaker stays `Open`, as `state()` reports, until the
    /// first call after the wait, which moves it to half-open and is admitted as a probe.
    pub fn automatic_half_open(mut self, automatic: bool) -> Self {
        self.automatic_half_open = automatic;
        self
    }

    /// A hook for transitions and rejections.
    pub fn on_event(mut self, hook: impl OnEvent) -> Self {
        self.on_event = Some(Arc::new(hook));
        self
    }

    /// Validates the settings.
    ///
    /// # Errors
    /// [`BuildError`] naming the setting when the policy's own settings were invalid, the open
    /// wait is zero (or an exponential wait has a multiplier below 1 or a maximum below its
    /// initial wait), `half_open_calls` is outside 1 to 65,535, or the half-open failure rate is
    /// outside (0, 100].
    pub fn build(self) -> Result<CircuitBreaker<P, C>, BuildError> {
        let policy = self.policy?;
        self.open_wait.validate()?;
        if self.half_open_calls == 0 || self.half_open_calls > MAX_HALF_OPEN_CALLS {
            return Err(BuildError::new(
                "half_open_calls",
                "between 1 and 65535",
                self.half_open_calls,
            ));
        }
        let half_open_failure_bp = self
            .half_open_failure_rate
            .map(|p| percent("half_open_failure_rate", p))
            .transpose()?;
        let needs_clock = policy.needs_clock();
        #[cfg(feature = "metrics")]
        let counters = Counters::register(&self.name);
        Ok(CircuitBreaker {
            inner: Arc::new(Inner {
                word: AtomicU64::new(word(0, State::Closed)),
                open_until: AtomicU64::new(0),
                probes: AtomicU64::new(0),
                probe_outcomes: AtomicU64::new(0),
                consecutive_opens: AtomicU32::new(0),
                rejected: AtomicU64::new(0),
                transitions: AtomicU64::new(0),
                transition: Mutex::new(()),
                policy,
                clock: self.clock,
                needs_clock,
                name: self.name,
                open_wait: self.open_wait,
                half_open_calls: self.half_open_calls,
                half_open_failure_bp,
                automatic_half_open: self.automatic_half_open,
                on_event: self.on_event,
                #[cfg(feature = "metrics")]
                counters,
            }),
        })
    }
}

/// A circuit breaker: cheap to clone (clones share state), `Send + Sync`.
///
/// In `Closed` the path of a call is lock-free and allocation-free: one atomic load of the state
/// word before, one after, and the failure policy's atomic update. The clock is read only when
/// the policy needs it.
///
/// ```
/// use std::time::Duration;
/// use stanchion_breaker::{CircuitBreaker, ConsecutiveFailures, OpenWait, State};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let breaker = CircuitBreaker::builder()
///     .name("payments")
///     .policy(ConsecutiveFailures::new(3)?)
///     .open_wait(OpenWait::Fixed(Duration::from_secs(30)))
///     .half_open_calls(2)
///     .build()?;
/// for _ in 0..3 {
///     let _ = breaker.call(async { Err::<(), _>("503") }).await;
/// }
/// assert_eq!(breaker.state(), State::Open);
/// let err = breaker.call(async { Ok::<_, &str>(()) }).await.unwrap_err();
/// assert!(err.is_rejected() && err.retry_after().is_some());
/// # Ok(()) }
/// ```
pub struct CircuitBreaker<P = CountWindow, C = CoarseClock> {
    inner: Arc<Inner<P, C>>,
}

impl<P, C> Clone for CircuitBreaker<P, C> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<P: FailurePolicy, C: Clock> fmt::Debug for CircuitBreaker<P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.inner.name)
            .field("stats", &self.stats())
            .finish()
    }
}

struct Inner<P, C> {
    word: AtomicU64,
    open_until: AtomicU64,
    /// (generation as u32) << 32 | probe permits left.
    probes: AtomicU64,
    /// (generation as u32) << 32 | successes << 16 | failures: the outcomes of this half-open
    /// round's probes, tagged like the permits so that a late probe of an earlier round can never
    /// count toward this one.
    probe_outcomes: AtomicU64,
    consecutive_opens: AtomicU32,
    rejected: AtomicU64,
    transitions: AtomicU64,
    transition: Mutex<()>,
    policy: P,
    clock: C,
    needs_clock: bool,
    name: Arc<str>,
    open_wait: OpenWait,
    half_open_calls: u32,
    half_open_failure_bp: Option<u32>,
    automatic_half_open: bool,
    on_event: Option<Arc<dyn OnEvent>>,
    #[cfg(feature = "metrics")]
    counters: Counters,
}

/// The breaker's counters, registered once when it is built (a rejection or transition then
/// costs one increment, with no lookup and no allocation of label strings).
#[cfg(feature = "metrics")]
struct Counters {
    /// Indexed by `State::code`.
    rejected: [metrics::Counter; 5],
    transitions: [metrics::Counter; 5],
}

#[cfg(feature = "metrics")]
impl Counters {
    const STATES: [State; 5] = [
        State::Closed,
        State::Open,
        State::HalfOpen,
        State::ForcedOpen,
        State::Disabled,
    ];

    fn register(name: &Arc<str>) -> Self {
        let each = |metric: &'static str| {
            Self::STATES.map(|state| {
                metrics::counter!(metric, "breaker.name" => name.to_string(), "breaker.state" => state.as_str())
            })
        };
        Self {
            rejected: each("breaker.rejected"),
            transitions: each("breaker.transitions"),
        }
    }
}

/// Most probe calls in one half-open round (the outcome counters have 16 bits each).
const MAX_HALF_OPEN_CALLS: u32 = u16::MAX as u32;

/// What an admitted call carries until its outcome is recorded.
#[derive(Debug, Clone, Copy)]
struct Ticket {
    word: u64,
    start: u64,
}

impl CircuitBreaker {
    /// Settings, starting from resilience4j's defaults.
    pub fn builder() -> CircuitBreakerBuilder {
        CircuitBreakerBuilder::default()
    }
}

impl<P: FailurePolicy, C: Clock> CircuitBreaker<P, C> {
    /// Runs `call` if the breaker admits it and records its outcome (`Ok` success, `Err`
    /// failure). A cancelled call (the future dropped) records nothing and frees its probe
    /// permit.
    ///
    /// # Errors
    /// [`BreakerError::Open`] when the breaker refused the call (it was not polled), and
    /// [`BreakerError::Inner`] with the call's own error.
    pub async fn call<F, T, E>(&self, call: F) -> Result<T, BreakerError<E>>
    where
        F: Future<Output = Result<T, E>>,
    {
        self.call_with(&DefaultClassifier, call).await
    }

    /// Like [`call`](Self::call), with a [`Classifier`] deciding success, failure or ignored.
    ///
    /// # Errors
    /// As [`call`](Self::call).
    pub async fn call_with<K, F, T, E>(&self, classifier: &K, call: F) -> Result<T, BreakerError<E>>
    where
        K: Classifier<T, E> + ?Sized,
        F: Future<Output = Result<T, E>>,
    {
        let permit = self.try_acquire()?;
        let result = call.await;
        permit.record(classifier.classify(&result));
        result.map_err(BreakerError::Inner)
    }

    /// Runs a synchronous `call` if admitted and records its outcome.
    ///
    /// # Errors
    /// As [`call`](Self::call).
    ///
    /// # Panics
    /// Only if `call` panics; the panic passes through and a half-open probe permit is given back.
    pub fn call_sync<F, T, E>(&self, call: F) -> Result<T, BreakerError<E>>
    where
        F: FnOnce() -> Result<T, E>,
    {
        self.call_sync_with(&DefaultClassifier, call)
    }

    /// Like [`call_sync`](Self::call_sync), with a [`Classifier`].
    ///
    /// # Errors
    /// As [`call`](Self::call).
    ///
    /// # Panics
    /// Only if `call` or the classifier panics; a half-open probe permit is given back.
    pub fn call_sync_with<K, F, T, E>(&self, classifier: &K, call: F) -> Result<T, BreakerError<E>>
    where
        K: Classifier<T, E> + ?Sized,
        F: FnOnce() -> Result<T, E>,
    {
        let permit = self.try_acquire()?;
        let result = call();
        permit.record(classifier.classify(&result));
        result.map_err(BreakerError::Inner)
    }

    /// Asks for admission without running anything; the [`Permit`] records the outcome. Dropping
    /// it unrecorded frees a half-open probe permit and records nothing.
    ///
    /// ```
    /// use stanchion_breaker::{CircuitBreaker, Outcome};
    /// let breaker = CircuitBreaker::builder().build()?;
    /// let permit = breaker.try_acquire().expect("closed");
    /// permit.record(Outcome::Success);
    /// # Ok::<(), stanchion_breaker::BuildError>(())
    /// ```
    ///
    /// # Errors
    /// [`Rejected`] when the breaker is open, forced open, or half-open with every probe permit
    /// taken.
    #[inline]
    pub fn try_acquire(&self) -> Result<Permit<'_, P, C>, Rejected> {
        let ticket = self.inner.acquire()?;
        Ok(Permit {
            inner: &self.inner,
            ticket,
            done: false,
        })
    }

    /// Like [`try_acquire`](Self::try_acquire), with a permit that owns a handle to the breaker
    /// (for futures that must be `'static`, such as tower's).
    ///
    /// # Errors
    /// As [`try_acquire`](Self::try_acquire).
    #[inline]
    pub fn try_acquire_owned(&self) -> Result<OwnedPermit<P, C>, Rejected> {
        let ticket = self.inner.acquire()?;
        Ok(OwnedPermit {
            inner: Arc::clone(&self.inner),
            ticket,
            done: false,
        })
    }

    /// The current state (moving `Open` to `HalfOpen` first when the wait has passed and
    /// automatic half-open is on).
    pub fn state(&self) -> State {
        let w = self.inner.word.load(Ordering::Acquire);
        if word_state(w) == State::Open
            && self.inner.automatic_half_open
            && self.inner.clock.now_nanos() >= self.inner.open_until.load(Ordering::Acquire)
        {
            self.inner.transition(w, State::HalfOpen);
            return word_state(self.inner.word.load(Ordering::Acquire));
        }
        word_state(w)
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// A snapshot for tests, dashboards and health endpoints.
    pub fn stats(&self) -> Stats {
        Stats {
            state: self.state(),
            window: if self.inner.needs_clock {
                self.inner.policy.counts_at(self.inner.clock.now_nanos())
            } else {
                self.inner.policy.counts()
            },
            rejected: self.inner.rejected.load(Ordering::Relaxed),
            transitions: self.inner.transitions.load(Ordering::Relaxed),
            consecutive_opens: self.inner.consecutive_opens.load(Ordering::Relaxed),
        }
    }

    /// Holds the breaker open until [`reset`](Self::reset) (an operator's switch).
    pub fn force_open(&self) {
        self.inner.force(State::ForcedOpen);
    }

    /// Admits every call and records nothing until [`reset`](Self::reset).
    pub fn disable(&self) {
        self.inner.force(State::Disabled);
    }

    /// Back to `Closed` with an empty window, from any state.
    pub fn reset(&self) {
        self.inner.force(State::Closed);
    }
}

impl<P: FailurePolicy, C: Clock> Inner<P, C> {
    #[inline]
    fn acquire(&self) -> Result<Ticket, Rejected> {
        loop {
            let w = self.word.load(Ordering::Acquire);
            match word_state(w) {
                State::Closed => {
                    let start = if self.needs_clock {
                        self.clock.now_nanos()
                    } else {
                        0
                    };
                    return Ok(Ticket { word: w, start });
                }
                State::Disabled => return Ok(Ticket { word: w, start: 0 }),
                State::Open => {
                    let now = self.clock.now_nanos();
                    let until = self.open_until.load(Ordering::Acquire);
                    if now >= until {
                        self.transition(w, State::HalfOpen);
                        continue;
                    }
                    return Err(self.reject(State::Open, Some(Duration::from_nanos(until - now))));
                }
                State::HalfOpen => {
                    let generation = (w >> STATE_BITS) as u32;
                    let taken =
                        self.probes
                            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                                let (g, left) = ((p >> 32) as u32, p as u32);
                                (g == generation && left > 0).then(|| p - 1)
                            });
                    if taken.is_ok() {
                        return Ok(Ticket { word: w, start: 0 });
                    }
                    if self.word.load(Ordering::Acquire) != w {
                        continue;
                    }
                    return Err(self.reject(State::HalfOpen, None));
                }
                State::ForcedOpen => return Err(self.reject(State::ForcedOpen, None)),
            }
        }
    }

    #[cold]
    fn reject(&self, state: State, retry_after: Option<Duration>) -> Rejected {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        if let Some(hook) = &self.on_event {
            hook.on_event(&BreakerEvent::Rejected {
                name: &self.name,
                state,
            });
        }
        #[cfg(feature = "metrics")]
        self.counters.rejected[state.code() as usize].increment(1);
        tracing::trace!(breaker.name = %self.name, breaker.state = %state, "call rejected");
        Rejected { state, retry_after }
    }

    #[inline]
    fn record(&self, ticket: Ticket, outcome: Outcome) {
        let current = self.word.load(Ordering::Acquire);
        if current != ticket.word {
            // Admitted under an earlier state: its outcome no longer says anything. A probe
            // permit of an earlier generation is void already.
            return;
        }
        match word_state(ticket.word) {
            State::Closed => {
                let failure = match outcome {
                    Outcome::Success => false,
                    Outcome::Failure => true,
                    Outcome::Ignored => return,
                };
                let (now, elapsed) = if self.needs_clock {
                    let now = self.clock.now_nanos();
                    (now, now.saturating_sub(ticket.start))
                } else {
                    (0, 0)
                };
                let record = Record {
                    failure,
                    elapsed_nanos: elapsed,
                    now_nanos: now,
                };
                if self.policy.record(&record) {
                    self.transition(ticket.word, State::Open);
                }
            }
            State::HalfOpen => self.record_probe(ticket, outcome),
            State::Open | State::ForcedOpen | State::Disabled => {}
        }
    }

    /// A half-open probe's outcome; out of line so that the closed path stays small.
    #[cold]
    #[inline(never)]
    fn record_probe(&self, ticket: Ticket, outcome: Outcome) {
        match outcome {
            Outcome::Ignored => self.release_probe(ticket),
            Outcome::Failure if self.half_open_failure_bp.is_none() => {
                self.transition(ticket.word, State::Open);
            }
            Outcome::Success | Outcome::Failure => {
                let failure = outcome == Outcome::Failure;
                if let Some(to) = self.count_probe(ticket, failure) {
                    self.transition(ticket.word, to);
                }
            }
        }
    }

    /// Counts a probe's outcome in its own half-open round and says where the round goes, if it
    /// is decided. `None` also when the round is over (the tag no longer matches).
    fn count_probe(&self, ticket: Ticket, failure: bool) -> Option<State> {
        let generation = (ticket.word >> STATE_BITS) as u32;
        let add = if failure { 1 } else { 1 << 16 };
        let counted = self
            .probe_outcomes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                ((p >> 32) as u32 == generation).then(|| p + add)
            })
            .ok()?
            + add;
        let successes = u64::from((counted >> 16) as u16);
        let failures = u64::from(counted as u16);
        let n = u64::from(self.half_open_calls);
        match self.half_open_failure_bp {
            None => (successes >= n).then_some(State::Closed),
            Some(bp) => {
                let bp = u64::from(bp);
                // Open as soon as the rate is reached even if every remaining probe succeeds.
                if failures * 10_000 >= bp * n {
                    Some(State::Open)
                } else if successes + failures >= n {
                    Some(State::Closed)
                } else {
                    None
                }
            }
        }
    }

    /// Gives a probe permit back (unrecorded or ignored probe), if its generation is current.
    fn release_probe(&self, ticket: Ticket) {
        if word_state(ticket.word) != State::HalfOpen {
            return;
        }
        let generation = (ticket.word >> STATE_BITS) as u32;
        let _ = self
            .probes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                ((p >> 32) as u32 == generation).then(|| p + 1)
            });
    }

    fn force(&self, to: State) {
        // A lost race with another transition is retried: the operator's choice wins.
        loop {
            let w = self.word.load(Ordering::Acquire);
            if word_state(w) == to {
                // Already there: no transition, no event. `reset` still empties the window.
                if to == State::Closed {
                    let _guard = match self.transition.lock() {
                        Ok(g) => g,
                        Err(poisoned) => poisoned.into_inner(),
                    };
                    if self.word.load(Ordering::Acquire) != w {
                        continue;
                    }
                    self.policy.reset();
                    self.consecutive_opens.store(0, Ordering::Release);
                }
                return;
            }
            if self.transition(w, to) {
                return;
            }
        }
    }

    /// Moves from the state word `expected` to `to`; false if the word changed meanwhile.
    #[cold]
    fn transition(&self, expected: u64, to: State) -> bool {
        // A panic in a user policy's `reset` must not wedge every later transition.
        let guard = match self.transition.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if self.word.load(Ordering::Acquire) != expected {
            return false;
        }
        let from = word_state(expected);
        let generation = (expected >> STATE_BITS) + 1;
        let mut wait = None;
        match to {
            State::Open => {
                let opens = self.consecutive_opens.fetch_add(1, Ordering::AcqRel) + 1;
                let d = self.open_wait.after_opens(opens);
                self.open_until.store(
                    self.clock.now_nanos().saturating_add(nanos(d)),
                    Ordering::Release,
                );
                wait = Some(d);
            }
            State::HalfOpen => {
                self.probe_outcomes
                    .store(u64::from(generation as u32) << 32, Ordering::Release);
                self.probes.store(
                    (u64::from(generation as u32) << 32) | u64::from(self.half_open_calls),
                    Ordering::Release,
                );
            }
            State::Closed => {
                self.policy.reset();
                self.consecutive_opens.store(0, Ordering::Release);
            }
            State::ForcedOpen | State::Disabled => {}
        }
        self.word.store(word(generation, to), Ordering::Release);
        self.transitions.fetch_add(1, Ordering::Relaxed);
        drop(guard);

        match to {
            State::Open | State::ForcedOpen => tracing::warn!(
                breaker.name = %self.name,
                breaker.state = %to,
                breaker.from = %from,
                breaker.open_wait_ms = wait.map(|d| d.as_millis() as u64),
                "circuit breaker opened"
            ),
            _ => tracing::info!(
                breaker.name = %self.name,
                breaker.state = %to,
                breaker.from = %from,
                "circuit breaker state changed"
            ),
        }
        #[cfg(feature = "metrics")]
        self.counters.transitions[to.code() as usize].increment(1);
        if let Some(hook) = &self.on_event {
            hook.on_event(&BreakerEvent::Transition {
                name: &self.name,
                from,
                to,
            });
        }
        true
    }
}

impl<P: FailurePolicy, C: Clock> Inner<P, C>
where
    Self: Send + Sync + 'static,
{
    fn schedule_half_open(self: &Arc<Self>, open_word: u64, wait: Duration) {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(self);
            let open_word = word(open_word >> STATE_BITS, State::Open);
            handle.spawn(async move {
                tokio::time::sleep(wait).await;
                if let Some(inner) = weak.upgrade() {
                    inner.transition(open_word, State::HalfOpen);
                }
            });
        }
    }
}

/// Permission for one call, borrowed from the breaker. Record the outcome with
/// [`record`](Self::record); dropping it unrecorded (cancellation, panic) records nothing and
/// returns a half-open probe permit, so the breaker can never be stuck in `HalfOpen`.
#[must_use = "record the call's outcome, or drop the permit to give it back"]
pub struct Permit<'a, P: FailurePolicy, C: Clock> {
    inner: &'a Arc<Inner<P, C>>,
    ticket: Ticket,
    done: bool,
}

impl<P: FailurePolicy, C: Clock> fmt::Debug for Permit<'_, P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("state", &word_state(self.ticket.word))
            .finish()
    }
}

impl<P: FailurePolicy, C: Clock> Permit<'_, P, C> {
    /// Records the call's outcome.
    #[inline]
    pub fn record(mut self, outcome: Outcome) {
        record_and_schedule(self.inner, self.ticket, outcome);
        // Set afterwards: if a policy panics while recording, `Drop` still returns the permit.
        self.done = true;
    }

    /// The state the call was admitted in.
    pub fn state(&self) -> State {
        word_state(self.ticket.word)
    }
}

impl<P: FailurePolicy, C: Clock> Drop for Permit<'_, P, C> {
    #[inline]
    fn drop(&mut self) {
        if !self.done {
            self.inner.release_probe(self.ticket);
        }
    }
}

/// A [`Permit`] that owns a handle to its breaker.
#[must_use = "record the call's outcome, or drop the permit to give it back"]
pub struct OwnedPermit<P: FailurePolicy, C: Clock> {
    inner: Arc<Inner<P, C>>,
    ticket: Ticket,
    done: bool,
}

impl<P: FailurePolicy, C: Clock> fmt::Debug for OwnedPermit<P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedPermit")
            .field("state", &word_state(self.ticket.word))
            .finish()
    }
}

impl<P: FailurePolicy, C: Clock> OwnedPermit<P, C> {
    /// Records the call's outcome.
    #[inline]
    pub fn record(mut self, outcome: Outcome) {
        record_and_schedule(&self.inner, self.ticket, outcome);
        self.done = true;
    }
}

impl<P: FailurePolicy, C: Clock> Drop for OwnedPermit<P, C> {
    fn drop(&mut self) {
        if !self.done {
            self.inner.release_probe(self.ticket);
        }
    }
}

#[inline]
fn record_and_schedule<P: FailurePolicy, C: Clock>(
    inner: &Arc<Inner<P, C>>,
    ticket: Ticket,
    outcome: Outcome,
) {
    if !inner.automatic_half_open {
        inner.record(ticket, outcome);
        return;
    }
    let before = inner.transitions.load(Ordering::Relaxed);
    inner.record(ticket, outcome);
    if inner.transitions.load(Ordering::Relaxed) != before {
        let w = inner.word.load(Ordering::Acquire);
        if word_state(w) == State::Open {
            let until = inner.open_until.load(Ordering::Acquire);
            let wait = Duration::from_nanos(until.saturating_sub(inner.clock.now_nanos()));
            inner.schedule_half_open(w, wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ConsecutiveFailures, ManualClock};

    fn breaker(
        half_open_calls: u32,
    ) -> (
        CircuitBreaker<ConsecutiveFailures, ManualClock>,
        ManualClock,
    ) {
        let clock = ManualClock::new();
        let breaker = CircuitBreaker::builder()
            .policy(ConsecutiveFailures::new(1).unwrap())
            .open_wait(OpenWait::Fixed(Duration::from_secs(1)))
            .half_open_calls(half_open_calls)
            .clock(clock.clone())
            .build()
            .unwrap();
        (breaker, clock)
    }

    /// The interleaving of issue #11, forced: probe A of one half-open round passes the state
    /// word check in `record`, then (before it counts its success) another probe fails, the
    /// breaker reopens and half-opens again. A's count must not go to the new round.
    #[test]
    fn a_late_probe_success_never_counts_toward_the_next_half_open_round() {
        let (cb, clock) = breaker(2);
        let _ = cb.call_sync(|| Err::<(), _>(()));
        clock.advance(Duration::from_secs(1));
        let a = cb.inner.acquire().unwrap();
        let b = cb.inner.acquire().unwrap();
        assert_eq!(word_state(a.word), State::HalfOpen);
        // B fails: open again, then half-open again with a new generation.
        cb.inner.record(b, Outcome::Failure);
        assert_eq!(cb.state(), State::Open);
        clock.advance(Duration::from_secs(2));
        let c = cb.inner.acquire().unwrap();
        assert_eq!(cb.state(), State::HalfOpen);
        // A's increment, the step after its (passed) word check.
        assert_eq!(cb.inner.count_probe(a, false), None);
        // One real probe of the new round is not enough to close it.
        cb.inner.record(c, Outcome::Success);
        assert_eq!(cb.state(), State::HalfOpen);
        let d = cb.inner.acquire().unwrap();
        cb.inner.record(d, Outcome::Success);
        assert_eq!(cb.state(), State::Closed);
    }

    #[test]
    fn probe_counters_are_tagged_with_the_generation_for_the_rate_rule_too() {
        let clock = ManualClock::new();
        let cb = CircuitBreaker::builder()
            .policy(ConsecutiveFailures::new(1).unwrap())
            .open_wait(OpenWait::Fixed(Duration::from_secs(1)))
            .half_open_calls(2)
            .half_open_failure_rate(50.0)
            .clock(clock.clone())
            .build()
            .unwrap();
        let _ = cb.call_sync(|| Err::<(), _>(()));
        clock.advance(Duration::from_secs(1));
        let stale = cb.inner.acquire().unwrap();
        cb.reset();
        let _ = cb.call_sync(|| Err::<(), _>(()));
        clock.advance(Duration::from_secs(1));
        let fresh = cb.inner.acquire().unwrap();
        assert_ne!(stale.word, fresh.word);
        assert_eq!(cb.inner.count_probe(stale, true), None);
        cb.inner.record(fresh, Outcome::Success);
        assert_eq!(cb.state(), State::HalfOpen);
    }
}
