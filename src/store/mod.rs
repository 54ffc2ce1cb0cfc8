//! The state store: every fact that replicas share. Two implementations behind one trait:
//! [`redis::RedisStore`] for production (any replica, any region) and [`memory::MemoryStore`],
//! the embedded default for a single process.
//!
//! Both give the same guarantees; the integration tests run the same assertions on each.

pub mod memory;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

/// The store could not answer. Callers answer 503 and change nothing.
#[derive(Debug, thiserror::Error)]
#[error("state store unavailable: {0}")]
pub struct StoreError(pub String);

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Marks the token of session `sid` as used by `holder`, unless it already is. Returns
    /// `true` for the one caller that wins. The mark lives for `ttl`, the token's remaining
    /// lifetime, after which the token is refused as expired anyway.
    async fn consume_token(
        &self,
        sid: Uuid,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Undoes [`Store::consume_token`] if, and only if, `holder` still holds it, so that a
    /// connect that could not reach the bot leaves the token usable. Returns whether it did.
    async fn release_token(&self, sid: Uuid, holder: &str) -> Result<bool, StoreError>;

    /// Counts one call against `bucket` in the current fixed window of length `window` and says
    /// whether it stays within `limit`.
    async fn rate_limit(
        &self,
        bucket: &str,
        limit: u64,
        window: Duration,
    ) -> Result<bool, StoreError>;

    /// Proves the store answers and accepts writes.
    async fn check(&self) -> Result<(), StoreError>;
}

/// Milliseconds since the Unix epoch, the time base of token expiry.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
