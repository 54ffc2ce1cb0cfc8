//! The embedded store: one process, no set-up. Gives the same one-time-use guarantee as Redis
//! within the process, with the same expiry, so `cargo run` behaves like production.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use uuid::Uuid;

use super::{Store, StoreError};

/// How often expired entries are swept out. Between sweeps they are only ignored, so memory
/// stays bounded by what was written during one token lifetime plus this interval.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Consumed {
    holder: String,
    expires: Instant,
}

#[derive(Debug)]
struct Inner {
    tokens: HashMap<Uuid, Consumed>,
    /// bucket -> (window number, calls counted in it)
    rates: HashMap<String, (u64, u64)>,
    next_sweep: Instant,
}

#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    started: Instant,
}

impl Default for MemoryStore {
    fn default() -> Self {
        let now = Instant::now();
        Self {
            inner: Mutex::new(Inner {
                tokens: HashMap::new(),
                rates: HashMap::new(),
                next_sweep: now + SWEEP_INTERVAL,
            }),
            started: now,
        }
    }
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps inconsistent (every update is a
        // single insert or remove), so a poisoned lock is still safe to use.
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now >= inner.next_sweep {
            inner.tokens.retain(|_, c| c.expires > now);
            let window_floor = now.duration_since(self.started).as_millis() as u64;
            inner.rates.retain(|_, (window_end, _)| *window_end > window_floor);
            inner.next_sweep = now + SWEEP_INTERVAL;
        }
        inner
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn consume_token(
        &self,
        sid: Uuid,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        if inner.tokens.get(&sid).is_some_and(|c| c.expires > now) {
            return Ok(false);
        }
        inner.tokens.insert(sid, Consumed { holder: holder.to_owned(), expires: now + ttl });
        Ok(true)
    }

    async fn release_token(&self, sid: Uuid, holder: &str) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        if inner.tokens.get(&sid).is_some_and(|c| c.holder == holder) {
            inner.tokens.remove(&sid);
            return Ok(true);
        }
        Ok(false)
    }

    async fn rate_limit(
        &self,
        bucket: &str,
        limit: u64,
        window: Duration,
    ) -> Result<bool, StoreError> {
        let window_ms = window.as_millis().max(1) as u64;
        let elapsed = self.started.elapsed().as_millis() as u64;
        // Windows are identified by the time they end, which also tells the sweep when to drop them.
        let window_end = (elapsed / window_ms + 1) * window_ms;
        let mut inner = self.lock();
        let entry = inner.rates.entry(bucket.to_owned()).or_insert((window_end, 0));
        if entry.0 != window_end {
            *entry = (window_end, 0);
        }
        entry.1 += 1;
        Ok(entry.1 <= limit)
    }

    async fn check(&self) -> Result<(), StoreError> {
        drop(self.lock());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_is_consumed_once_until_it_expires() {
        let store = MemoryStore::default();
        let sid = Uuid::new_v4();
        assert!(store.consume_token(sid, "a", Duration::from_millis(50)).await.unwrap());
        assert!(!store.consume_token(sid, "b", Duration::from_millis(50)).await.unwrap());
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(store.consume_token(sid, "c", Duration::from_secs(5)).await.unwrap());
    }

    #[tokio::test]
    async fn only_the_holder_releases() {
        let store = MemoryStore::default();
        let sid = Uuid::new_v4();
        assert!(store.consume_token(sid, "a", Duration::from_secs(5)).await.unwrap());
        assert!(!store.release_token(sid, "b").await.unwrap());
        assert!(!store.consume_token(sid, "b", Duration::from_secs(5)).await.unwrap());
        assert!(store.release_token(sid, "a").await.unwrap());
        assert!(store.consume_token(sid, "b", Duration::from_secs(5)).await.unwrap());
    }

    #[tokio::test]
    async fn rate_limit_counts_per_bucket() {
        let store = MemoryStore::default();
        let window = Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(store.rate_limit("k", 3, window).await.unwrap());
        }
        assert!(!store.rate_limit("k", 3, window).await.unwrap());
        assert!(store.rate_limit("other", 3, window).await.unwrap());
    }
}
