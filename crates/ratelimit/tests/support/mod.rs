//! Shared helpers for the Redis tests.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// A key prefix unique to this test run and call site.
pub fn prefix(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}:{}:{}:",
        std::process::id(),
        test,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub async fn manager(url: &str) -> redis::aio::ConnectionManager {
    stanchion_testkit::connection_manager(url).await.unwrap()
}

/// Counters shared by every clone of a [`Watched`] connection.
#[derive(Default)]
pub struct Watch {
    /// Clones alive (the first one included).
    pub live: AtomicUsize,
    /// Commands under way now.
    pub now: AtomicUsize,
    /// The most commands ever under way at once.
    pub most: AtomicUsize,
}

/// A connection that counts its live clones and its commands in flight.
pub struct Watched<C> {
    inner: C,
    watch: std::sync::Arc<Watch>,
}

impl<C> Watched<C> {
    pub fn new(inner: C) -> (Self, std::sync::Arc<Watch>) {
        let watch = std::sync::Arc::new(Watch::default());
        watch.live.store(1, Ordering::SeqCst);
        let conn = Self {
            inner,
            watch: std::sync::Arc::clone(&watch),
        };
        (conn, watch)
    }
}

impl<C: Clone> Clone for Watched<C> {
    fn clone(&self) -> Self {
        self.watch.live.fetch_add(1, Ordering::SeqCst);
        Self {
            inner: self.inner.clone(),
            watch: std::sync::Arc::clone(&self.watch),
        }
    }
}

impl<C> Drop for Watched<C> {
    fn drop(&mut self) {
        self.watch.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<C: redis::aio::ConnectionLike + Send> redis::aio::ConnectionLike for Watched<C> {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let n = self.watch.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.watch.most.fetch_max(n, Ordering::SeqCst);
            let out = self.inner.req_packed_command(cmd).await;
            self.watch.now.fetch_sub(1, Ordering::SeqCst);
            out
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        self.inner.req_packed_commands(cmd, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}
