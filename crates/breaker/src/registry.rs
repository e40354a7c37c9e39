//! Named breakers: one per dependency, per replica, per shard.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use crate::breaker::{CircuitBreaker, Stats};
use crate::clock::{Clock, CoarseClock};
use crate::error::BuildError;
use crate::policy::{CountWindow, FailurePolicy};

type Map<P, C> = Arc<RwLock<HashMap<Arc<str>, CircuitBreaker<P, C>>>>;
type Factory<P, C> = dyn Fn(&str) -> Result<CircuitBreaker<P, C>, BuildError> + Send + Sync;

/// Breakers by name, made on first use by a factory. Cheap to clone (clones share the map).
///
/// ```
/// use stanchion_breaker::{CircuitBreaker, ConsecutiveFailures, Registry};
/// let registry = Registry::new(|name: &str| {
///     CircuitBreaker::builder()
///         .name(name)
///         .policy(ConsecutiveFailures::new(5)?)
///         .build()
/// });
/// let replica = registry.get("replica-1")?;
/// assert_eq!(replica.name(), "replica-1");
/// assert_eq!(registry.names(), vec!["replica-1".to_string()]);
/// # Ok::<(), stanchion_breaker::BuildError>(())
/// ```
pub struct Registry<P = CountWindow, C = CoarseClock> {
    factory: Arc<Factory<P, C>>,
    breakers: Map<P, C>,
}

impl<P, C> Clone for Registry<P, C> {
    fn clone(&self) -> Self {
        Self {
            factory: Arc::clone(&self.factory),
            breakers: Arc::clone(&self.breakers),
        }
    }
}

impl<P: FailurePolicy, C: Clock> fmt::Debug for Registry<P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("names", &self.names())
            .finish_non_exhaustive()
    }
}

impl<P: FailurePolicy, C: Clock> Registry<P, C> {
    /// A registry whose breakers `factory` builds (it receives the name).
    pub fn new(
        factory: impl Fn(&str) -> Result<CircuitBreaker<P, C>, BuildError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            factory: Arc::new(factory),
            breakers: Arc::default(),
        }
    }

    /// The breaker called `name`, built on first use.
    ///
    /// # Errors
    /// The factory's [`BuildError`] when it cannot build a breaker for `name` (nothing is kept,
    /// so the next call tries again).
    pub fn get(&self, name: &str) -> Result<CircuitBreaker<P, C>, BuildError> {
        if let Some(b) = self.read().get(name) {
            return Ok(b.clone());
        }
        let built = (self.factory)(name)?;
        let mut map = match self.breakers.write() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        Ok(map.entry(Arc::from(name)).or_insert(built).clone())
    }

    /// The names present, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.read().keys().map(|k| k.to_string()).collect();
        names.sort();
        names
    }

    /// Every breaker's stats, sorted by name.
    pub fn stats(&self) -> Vec<(String, Stats)> {
        let mut all: Vec<(String, Stats)> = self
            .read()
            .iter()
            .map(|(k, b)| (k.to_string(), b.stats()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Arc<str>, CircuitBreaker<P, C>>> {
        match self.breakers.read() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}
