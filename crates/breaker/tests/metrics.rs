//! With the `metrics` feature, counters are registered once when a breaker is built; rejections
//! and transitions then increment them without a lookup.
#![cfg(feature = "metrics")]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{
    Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use stanchion_breaker::{CircuitBreaker, ConsecutiveFailures};

#[derive(Default)]
struct Counting {
    registrations: AtomicU64,
    values: Mutex<HashMap<String, Arc<Value>>>,
}

#[derive(Default)]
struct Value(AtomicU64);

impl CounterFn for Value {
    fn increment(&self, by: u64) {
        self.0.fetch_add(by, Ordering::SeqCst);
    }
    fn absolute(&self, v: u64) {
        self.0.store(v, Ordering::SeqCst);
    }
}

impl Recorder for Counting {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.registrations.fetch_add(1, Ordering::SeqCst);
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let id = format!("{}{{{}}}", key.name(), labels.join(","));
        let value = self.values.lock().unwrap().entry(id).or_default().clone();
        Counter::from_arc(value)
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[test]
fn counters_are_registered_at_build_and_only_incremented_afterwards() {
    let recorder = Counting::default();
    let breaker = metrics::with_local_recorder(&recorder, || {
        CircuitBreaker::builder()
            .name("payments")
            .policy(ConsecutiveFailures::new(1).unwrap())
            .build()
            .unwrap()
    });
    let at_build = recorder.registrations.load(Ordering::SeqCst);
    assert_eq!(at_build, 10, "two counters for each of the five states");
    metrics::with_local_recorder(&recorder, || {
        let _ = breaker.call_sync(|| Err::<(), _>(()));
        for _ in 0..1000 {
            let _ = breaker.call_sync(|| Ok::<_, ()>(()));
        }
    });
    assert_eq!(recorder.registrations.load(Ordering::SeqCst), at_build);
    let values = recorder.values.lock().unwrap();
    let get = |id: &str| values[id].0.load(Ordering::SeqCst);
    assert_eq!(
        get("breaker.rejected{breaker.name=payments,breaker.state=open}"),
        1000
    );
    assert_eq!(
        get("breaker.transitions{breaker.name=payments,breaker.state=open}"),
        1
    );
    assert_eq!(
        get("breaker.transitions{breaker.name=payments,breaker.state=closed}"),
        0
    );
}
