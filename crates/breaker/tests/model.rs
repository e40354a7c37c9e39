//! Random sequences of calls, held permits and time steps drive the breaker exactly like a
//! simple reference model.

use std::time::Duration;

use proptest::prelude::*;
use stanchion_breaker::{
    CircuitBreaker, ConsecutiveFailures, ManualClock, OpenWait, Outcome, State,
};

#[derive(Debug, Clone, Copy)]
enum Op {
    /// Acquire a permit and keep it.
    Acquire,
    /// Finish a held permit (index modulo the number held) with an outcome.
    Finish(usize, Outcome),
    /// Drop a held permit unrecorded.
    Drop(usize),
    /// Acquire and finish at once.
    Call(Outcome),
    /// Move time forward by this many seconds.
    Advance(u64),
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        4 => Just(Outcome::Success),
        4 => Just(Outcome::Failure),
        1 => Just(Outcome::Ignored),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Acquire),
        3 => (any::<usize>(), outcome()).prop_map(|(i, o)| Op::Finish(i, o)),
        1 => any::<usize>().prop_map(Op::Drop),
        4 => outcome().prop_map(Op::Call),
        2 => (0u64..15).prop_map(Op::Advance),
    ]
}

/// The reference: the states and rules written plainly, with a generation per state entered.
#[derive(Debug)]
struct Model {
    threshold: u32,
    probes: u32,
    wait: u64,
    now: u64,
    state: State,
    generation: u64,
    fails: u32,
    until: u64,
    left: u32,
    successes: u32,
    failures: u32,
    /// resilience4j's half-open rule (failure rate over the probes, basis points), if chosen.
    rate_bp: Option<u32>,
}

impl Model {
    fn enter(&mut self, state: State) {
        self.state = state;
        self.generation += 1;
        match state {
            State::Open => self.until = self.now + self.wait,
            State::HalfOpen => {
                self.left = self.probes;
                self.successes = 0;
                self.failures = 0;
            }
            State::Closed => self.fails = 0,
            _ => {}
        }
    }

    /// `Some((generation, state))` when admitted.
    fn acquire(&mut self) -> Option<(u64, State)> {
        if self.state == State::Open && self.now >= self.until {
            self.enter(State::HalfOpen);
        }
        match self.state {
            State::Closed => Some((self.generation, State::Closed)),
            State::HalfOpen if self.left > 0 => {
                self.left -= 1;
                Some((self.generation, State::HalfOpen))
            }
            _ => None,
        }
    }

    fn finish(&mut self, permit: (u64, State), outcome: Outcome) {
        if permit.0 != self.generation {
            return;
        }
        match (permit.1, outcome) {
            (State::Closed, Outcome::Failure) => {
                self.fails += 1;
                if self.fails >= self.threshold {
                    self.enter(State::Open);
                }
            }
            (State::Closed, Outcome::Success) => self.fails = 0,
            (State::HalfOpen, Outcome::Failure) if self.rate_bp.is_none() => {
                self.enter(State::Open)
            }
            (State::HalfOpen, Outcome::Failure) => {
                self.failures += 1;
                self.decide_half_open();
            }
            (State::HalfOpen, Outcome::Success) => {
                self.successes += 1;
                self.decide_half_open();
            }
            (State::HalfOpen, Outcome::Ignored) => self.left += 1,
            _ => {}
        }
    }

    fn decide_half_open(&mut self) {
        match self.rate_bp {
            None if self.successes >= self.probes => self.enter(State::Closed),
            None => {}
            Some(bp) => {
                // The rate over all probes is at least the threshold whatever the rest do.
                if u64::from(self.failures) * 10_000 >= u64::from(bp) * u64::from(self.probes) {
                    self.enter(State::Open);
                } else if self.successes + self.failures >= self.probes {
                    self.enter(State::Closed);
                }
            }
        }
    }

    fn drop_permit(&mut self, permit: (u64, State)) {
        if permit.0 == self.generation && permit.1 == State::HalfOpen {
            self.left += 1;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn breaker_matches_the_reference_model(
        threshold in 1u32..5,
        probes in 1u32..6,
        wait in 1u64..10,
        rate_percent in prop::option::of(1u32..=100),
        ops in prop::collection::vec(op(), 1..200),
    ) {
        let clock = ManualClock::new();
        let mut builder = CircuitBreaker::builder()
            .policy(ConsecutiveFailures::new(threshold).unwrap())
            .clock(clock.clone())
            .open_wait(OpenWait::Fixed(Duration::from_secs(wait)))
            .half_open_calls(probes);
        if let Some(p) = rate_percent {
            builder = builder.half_open_failure_rate(f64::from(p));
        }
        let breaker = builder.build().unwrap();
        let mut model = Model {
            threshold, probes, wait, now: 0, state: State::Closed, generation: 0,
            fails: 0, until: 0, left: 0, successes: 0, failures: 0,
            rate_bp: rate_percent.map(|p| p * 100),
        };
        let mut held = Vec::new();
        for op in ops {
            match op {
                Op::Acquire => {
                    let real = breaker.try_acquire().ok();
                    let expected = model.acquire();
                    prop_assert_eq!(real.is_some(), expected.is_some(), "admission differs");
                    if let (Some(r), Some(e)) = (real, expected) {
                        held.push((r, e));
                    }
                }
                Op::Finish(i, outcome) if !held.is_empty() => {
                    let (real, expected) = held.remove(i % held.len());
                    real.record(outcome);
                    model.finish(expected, outcome);
                }
                Op::Drop(i) if !held.is_empty() => {
                    let (real, expected) = held.remove(i % held.len());
                    drop(real);
                    model.drop_permit(expected);
                }
                Op::Finish(..) | Op::Drop(_) => {}
                Op::Call(outcome) => {
                    let real = breaker.call_sync_with(&move |_: &Result<(), ()>| outcome, || Ok(()));
                    let expected = model.acquire();
                    prop_assert_eq!(real.is_ok(), expected.is_some(), "admission differs");
                    if let Some(e) = expected {
                        model.finish(e, outcome);
                    }
                }
                Op::Advance(secs) => {
                    clock.advance(Duration::from_secs(secs));
                    model.now += secs;
                }
            }
            // `state()` has no side effects without automatic half-open, so it can be compared.
            prop_assert_eq!(breaker.state(), model.state);
        }
    }
}
