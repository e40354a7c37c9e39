//! stanchion-breaker next to failsafe 1.3, recloser 1.4 and tower's ConcurrencyLimit, in one run.
//!
//! `cargo bench -p stanchion-benches --bench breaker && scripts/bench-report`

use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use stanchion_breaker::{
    CircuitBreaker, CircuitBreakerLayer, ConsecutiveFailures, CountWindow, OpenWait, TimeWindow,
};
use tower::{Layer, Service};

fn bare(x: u64) -> Result<u64, ()> {
    Ok(black_box(x))
}

fn count_window() -> CircuitBreaker<CountWindow> {
    CircuitBreaker::builder()
        .policy(
            CountWindow::builder(100)
                .failure_rate(50.0)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap()
}

fn time_window_slow() -> CircuitBreaker<TimeWindow> {
    CircuitBreaker::builder()
        .policy(
            TimeWindow::builder(Duration::from_secs(60))
                .failure_rate(50.0)
                .slow_call_rate(Duration::from_secs(1), 80.0)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap()
}

fn closed(c: &mut Criterion) {
    let mut g = c.benchmark_group("breaker_closed");
    g.bench_function("bare_call", |b| b.iter(|| bare(1)));
    let cw = count_window();
    g.bench_function("stanchion_count_window", |b| {
        b.iter(|| cw.call_sync(|| bare(1)))
    });
    let cf = CircuitBreaker::builder()
        .policy(ConsecutiveFailures::new(5).unwrap())
        .build()
        .unwrap();
    g.bench_function("stanchion_consecutive", |b| {
        b.iter(|| cf.call_sync(|| bare(1)))
    });
    let tw = time_window_slow();
    g.bench_function("stanchion_time_window_slow_calls", |b| {
        b.iter(|| tw.call_sync(|| bare(1)))
    });
    let fs = failsafe::Config::new().build();
    g.bench_function("failsafe", |b| {
        b.iter(|| failsafe::CircuitBreaker::call(&fs, || bare(1)))
    });
    let rc = recloser::Recloser::default();
    g.bench_function("recloser", |b| b.iter(|| rc.call(|| bare(1))));
    g.finish();
}

fn open(c: &mut Criterion) {
    let mut g = c.benchmark_group("breaker_open");
    let cb = CircuitBreaker::builder()
        .policy(ConsecutiveFailures::new(1).unwrap())
        .open_wait(OpenWait::Fixed(Duration::from_secs(3600)))
        .build()
        .unwrap();
    let _ = cb.call_sync(|| Err::<(), _>(()));
    g.bench_function("stanchion_rejection", |b| {
        b.iter(|| cb.call_sync(|| bare(1)))
    });
    let fs = failsafe::Config::new().build();
    while failsafe::CircuitBreaker::is_call_permitted(&fs) {
        let _ = failsafe::CircuitBreaker::call(&fs, || Err::<(), _>(()));
    }
    g.bench_function("failsafe_rejection", |b| {
        b.iter(|| failsafe::CircuitBreaker::call(&fs, || bare(1)))
    });
    g.finish();
}

/// Two threads calling one shared breaker; the time per call across both (lower is better).
fn contended(c: &mut Criterion) {
    let mut g = c.benchmark_group("breaker_two_threads");
    fn run(iters: u64, call: impl Fn() + Sync) -> Duration {
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..iters / 2 {
                        call();
                    }
                });
            }
        });
        start.elapsed()
    }
    let cw = count_window();
    g.bench_function("stanchion_count_window", |b| {
        b.iter_custom(|iters| {
            run(iters, || {
                let _ = black_box(cw.call_sync(|| bare(1)));
            })
        })
    });
    let tw = time_window_slow();
    g.bench_function("stanchion_time_window_slow_calls", |b| {
        b.iter_custom(|iters| {
            run(iters, || {
                let _ = black_box(tw.call_sync(|| bare(1)));
            })
        })
    });
    let fs = failsafe::Config::new().build();
    g.bench_function("failsafe", |b| {
        b.iter_custom(|iters| {
            run(iters, || {
                let _ = black_box(failsafe::CircuitBreaker::call(&fs, || bare(1)));
            })
        })
    });
    let rc = recloser::Recloser::default();
    g.bench_function("recloser", |b| {
        b.iter_custom(|iters| {
            run(iters, || {
                let _ = black_box(rc.call(|| bare(1)));
            })
        })
    });
    g.finish();
}

/// One request through a tower service whose futures are ready at once, polled by hand.
fn call_ready<S: Service<u64>>(svc: &mut S, cx: &mut Context<'_>, x: u64) {
    if let Poll::Ready(Ok(())) = svc.poll_ready(cx) {
        let fut = pin!(svc.call(x));
        let _ = black_box(fut.poll(cx));
    }
}

fn tower_layer(c: &mut Criterion) {
    let mut g = c.benchmark_group("tower_layer");
    let mut cx = Context::from_waker(Waker::noop());
    // tower's convention: the inner error converts into `BoxError` (the layer's error type).
    let inner =
        tower::service_fn(|x: u64| std::future::ready(Ok::<_, std::io::Error>(black_box(x))));
    let mut plain = inner;
    g.bench_function("bare_service", |b| {
        b.iter(|| call_ready(&mut plain, &mut cx, 1))
    });
    let mut limited = tower::limit::ConcurrencyLimitLayer::new(1024).layer(inner);
    g.bench_function("tower_concurrency_limit", |b| {
        b.iter(|| call_ready(&mut limited, &mut cx, 1))
    });
    let mut broken = CircuitBreakerLayer::new(count_window()).layer(inner);
    g.bench_function("stanchion_breaker_layer", |b| {
        b.iter(|| call_ready(&mut broken, &mut cx, 1))
    });
    g.finish();
}

use std::future::Future;

criterion_group!(benches, closed, open, contended, tower_layer);
criterion_main!(benches);
