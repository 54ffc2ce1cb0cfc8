//! The Redis store. Hot-path commands go over one shared multiplexed connection
//! ([`ConnectionManager`], which reconnects by itself): a pooled connection would add a
//! `PING` round trip per checkout (see `PERF-NOTES.md`), and one connection pipelines all
//! concurrent requests of a replica.
//!
//! Keys are `{prefix}:{<session id>}:…`: the braces make every key of one session hash to the
//! same Redis Cluster slot, so scripts that touch several of them stay legal on a cluster.

use std::time::Duration;

use async_trait::async_trait;
use redis::{
    AsyncCommands, Client, Script, SetExpiry, SetOptions,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use uuid::Uuid;

use super::{Store, StoreError};

/// Reconnect attempts the manager makes in the background after a connection breaks. Requests
/// do not wait for them beyond the command timeout; they fail fast with 503 instead.
const RECONNECT_RETRIES: usize = 2;

/// Undoes a consume held by the caller; see the script's header.
const RELEASE_TOKEN_LUA: &str = include_str!("../../migrations-lua/001_release_token.lua");

pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    release_token: Script,
}

impl RedisStore {
    /// Creates the store without waiting for Redis: a replica starts (and reports itself not
    /// ready) while Redis is down, and connects as soon as Redis answers.
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Self, StoreError> {
        let client = Client::open(url).map_err(|e| StoreError(format!("{:?}", e.kind())))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_max_delay(timeout);
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| StoreError(e.to_string()))?;
        Ok(Self {
            conn,
            prefix: prefix.to_owned(),
            timeout,
            release_token: Script::new(RELEASE_TOKEN_LUA),
        })
    }

    fn token_key(&self, sid: Uuid) -> String {
        format!("{}:{{{sid}}}:token", self.prefix)
    }

    /// Runs one store operation within the command timeout, turning every failure into a
    /// [`StoreError`] that names the operation.
    async fn bounded<T>(
        &self,
        what: &str,
        op: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, op).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(StoreError(format!("{what}: {e}"))),
            Err(_) => Err(StoreError(format!("{what}: no answer within {:?}", self.timeout))),
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn consume_token(
        &self,
        sid: Uuid,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let key = self.token_key(sid);
        let options = SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .with_expiration(SetExpiry::PX(ttl.as_millis().max(1) as u64));
        // SET NX answers OK when it wrote and nil when the key existed.
        let written: Option<String> =
            self.bounded("consume token", conn.set_options(&key, holder, options)).await?;
        Ok(written.is_some())
    }

    async fn release_token(&self, sid: Uuid, holder: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let mut call = self.release_token.key(self.token_key(sid));
        call.arg(holder);
        let released: i64 = self.bounded("release token", call.invoke_async(&mut conn)).await?;
        Ok(released == 1)
    }

    async fn rate_limit(
        &self,
        bucket: &str,
        limit: u64,
        window: Duration,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let window_ms = window.as_millis().max(1) as u64;
        let window_number = super::unix_ms() / window_ms;
        let key = format!("{}:rate:{{{bucket}}}:{window_number}", self.prefix);
        // INCR and PEXPIRE in one MULTI: a counter never outlives its window by more than one
        // window, even if this replica dies between the two.
        let (count,): (u64,) = self
            .bounded(
                "rate limit",
                redis::pipe()
                    .atomic()
                    .incr(&key, 1)
                    .pexpire(&key, (2 * window_ms) as i64)
                    .ignore()
                    .query_async(&mut conn),
            )
            .await?;
        Ok(count <= limit)
    }

    async fn check(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let key = format!("{}:health", self.prefix);
        self.bounded("health write", conn.set_ex::<_, _, ()>(&key, super::unix_ms(), 60)).await
    }
}
