//! Many threads and tasks on one breaker: half-open never admits more probes than configured,
//! and cancelled probes never leave it stuck.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use stanchion_breaker::{
    CircuitBreaker, ConsecutiveFailures, ManualClock, OpenWait, Outcome, State,
};

#[test]
fn half_open_never_has_more_probes_in_flight_than_configured() {
    let clock = ManualClock::new();
    let probes = 3;
    let b = CircuitBreaker::builder()
        .policy(ConsecutiveFailures::new(1).unwrap())
        .clock(clock.clone())
        .open_wait(OpenWait::Fixed(Duration::from_secs(1)))
        .half_open_calls(probes)
        .build()
        .unwrap();
    let _ = b.call_sync(|| Err::<(), _>(()));
    clock.advance(Duration::from_secs(1));
    let in_flight = AtomicU32::new(0);
    let most = AtomicU32::new(0);
    let admitted = AtomicU32::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..20_000 {
                    if let Ok(permit) = b.try_acquire() {
                        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        admitted.fetch_add(1, Ordering::SeqCst);
                        std::hint::spin_loop();
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        drop(permit); // unrecorded: the permit goes back
                    }
                }
            });
        }
    });
    assert!(most.load(Ordering::SeqCst) <= probes);
    // Permits were recycled many times, so the bound was really exercised.
    assert!(admitted.load(Ordering::SeqCst) > 100 * probes);
    assert_eq!(b.state(), State::HalfOpen);
}

#[test]
fn concurrent_probes_that_all_hold_their_permits_see_exactly_the_probe_count() {
    let clock = ManualClock::new();
    let b = CircuitBreaker::builder()
        .policy(ConsecutiveFailures::new(1).unwrap())
        .clock(clock.clone())
        .open_wait(OpenWait::Fixed(Duration::from_secs(1)))
        .half_open_calls(5)
        .build()
        .unwrap();
    let _ = b.call_sync(|| Err::<(), _>(()));
    clock.advance(Duration::from_secs(1));
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    std::thread::scope(|s| {
        for _ in 0..8 {
            let (b, held) = (&b, held.clone());
            s.spawn(move || {
                for _ in 0..100 {
                    if let Ok(p) = b.try_acquire_owned() {
                        held.lock().unwrap().push(p);
                    }
                }
            });
        }
    });
    let held = std::mem::take(&mut *held.lock().unwrap());
    assert_eq!(held.len(), 5);
    for p in held {
        p.record(Outcome::Success);
    }
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_cancelled_probe_tasks_never_leave_it_stuck() {
    let clock = ManualClock::new();
    let b = CircuitBreaker::builder()
        .policy(ConsecutiveFailures::new(1).unwrap())
        .clock(clock.clone())
        .open_wait(OpenWait::Fixed(Duration::from_secs(1)))
        .half_open_calls(2)
        .build()
        .unwrap();
    let _ = b.call(async { Err::<(), _>(()) }).await;
    clock.advance(Duration::from_secs(1));
    let mut tasks = Vec::new();
    for _ in 0..2000 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let _ = b
                .call(async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok::<(), ()>(())
                })
                .await;
        }));
    }
    // Let every task reach the breaker: two hold the probe permits (sleeping), the rest were
    // rejected and are done. Aborting before they ran would test nothing.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while tasks.iter().filter(|t| t.is_finished()).count() < 1998 {
        assert!(
            std::time::Instant::now() < deadline,
            "the tasks never reached the breaker"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(b.stats().rejected, 1998);
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    assert_eq!(b.state(), State::HalfOpen);
    b.call(async { Ok::<_, ()>(()) }).await.unwrap();
    b.call(async { Ok::<_, ()>(()) }).await.unwrap();
    assert_eq!(b.state(), State::Closed);
}

#[test]
fn a_shared_count_window_stays_consistent_under_contention() {
    let b = CircuitBreaker::builder()
        .policy(
            stanchion_breaker::CountWindow::builder(64)
                .failure_rate(100.0)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    std::thread::scope(|s| {
        for t in 0..4 {
            let b = &b;
            s.spawn(move || {
                for i in 0..100_000u32 {
                    // A quarter failures: never 100 %, so it stays closed.
                    let _ = b.call_sync(|| if (i + t) % 4 == 0 { Err(()) } else { Ok(()) });
                }
            });
        }
    });
    let stats = b.stats();
    assert_eq!(stats.state, State::Closed);
    assert_eq!(stats.window.calls, 64);
    assert!(stats.window.failures <= 64);
}
