//! Every tracing event of a test process, as text, for tests that check what reaches the logs
//! (secrets never do).
//!
//! ```
//! let events = stanchion_testkit::events::capture();
//! tracing::warn!(pool.size = 4, "pool shrunk");
//! assert!(events.text().contains("WARN"));
//! assert!(events.text().contains("pool.size=4"));
//! ```

use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use tracing_subscriber::layer::SubscriberExt;

/// The events recorded so far: one line each, level, target and fields.
#[derive(Clone, Default)]
pub struct Events(Arc<Mutex<String>>);

impl Events {
    /// Everything recorded, one event a line.
    pub fn text(&self) -> String {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

struct Fields<'a>(&'a mut String);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Events {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut line = format!(
            "{} {}:",
            event.metadata().level(),
            event.metadata().target()
        );
        event.record(&mut Fields(&mut line));
        line.push('\n');
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_str(&line);
    }
}

/// Records every event of this process, at every level, from now on (the global subscriber:
/// call it in a test binary of its own; later calls return the same record).
pub fn capture() -> Events {
    static EVENTS: OnceLock<Events> = OnceLock::new();
    EVENTS
        .get_or_init(|| {
            let events = Events::default();
            tracing::subscriber::set_global_default(
                tracing_subscriber::registry().with(events.clone()),
            )
            .expect("no other global tracing subscriber in this test binary");
            events
        })
        .clone()
}
