//! The errors the tower services add, as concrete types inside tower's `BoxError`.

use std::fmt;

/// A request refused by a [`BulkheadService`](super::BulkheadService): every slot was busy (and
/// stayed busy for the bulkhead's wait). The inner service was not called. Found in the
/// service's `BoxError` with `downcast_ref::<BulkheadFull>()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkheadFull {
    max_concurrent: usize,
}

impl BulkheadFull {
    pub(crate) fn new(max_concurrent: usize) -> Self {
        Self { max_concurrent }
    }

    /// The bulkhead's limit.
    pub fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }
}

impl fmt::Display for BulkheadFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bulkhead full ({} calls in flight)", self.max_concurrent)
    }
}

impl std::error::Error for BulkheadFull {}
