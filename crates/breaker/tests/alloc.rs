//! Zero heap allocations per call in the closed state (a counting global allocator).

use std::alloc::System;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use stanchion_breaker::{CircuitBreaker, CountWindow, TimeWindow};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn poll_once<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the test future is ready at once"),
    }
}

// One test in this binary, so no other test allocates concurrently. The harness's own main
// thread still can (a CI run once counted 4 allocations, 900 bytes, never freed, during the
// loop), and the counter is process-wide: the loop runs up to five times and one run must count
// nothing. An allocation per call would count at least 40,000 in every run.
#[test]
fn closed_calls_allocate_nothing() {
    let count = CircuitBreaker::builder()
        .policy(
            CountWindow::builder(100)
                .failure_rate(50.0)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let timed = CircuitBreaker::builder()
        .policy(
            TimeWindow::builder(Duration::from_secs(10))
                .slow_call_rate(Duration::from_secs(1), 50.0)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    // Warm up (lazy statics, first bucket rotation).
    let _ = count.call_sync(|| Ok::<_, ()>(1));
    let _ = timed.call_sync(|| Ok::<_, ()>(1));

    let mut runs = Vec::with_capacity(5);
    for _ in 0..5 {
        let region = Region::new(GLOBAL);
        for i in 0..10_000u32 {
            let _ =
                std::hint::black_box(count.call_sync(|| if i % 10 == 0 { Err(i) } else { Ok(i) }));
            let _ =
                std::hint::black_box(timed.call_sync(|| if i % 10 == 0 { Err(i) } else { Ok(i) }));
            let _ = poll_once(count.call(async move { Ok::<_, ()>(i) }));
            let _ = poll_once(timed.call(async move { Ok::<_, ()>(i) }));
        }
        let change = region.change();
        let clean = change.allocations == 0 && change.reallocations == 0;
        runs.push(change);
        if clean {
            break;
        }
    }
    assert!(
        runs.iter()
            .any(|c| c.allocations == 0 && c.reallocations == 0),
        "every run allocated: {runs:?}"
    );
    assert_eq!(count.state(), stanchion_breaker::State::Closed);
}
