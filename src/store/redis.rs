//! The Redis store. Commands go over a shared multiplexed connection ([`ConnectionManager`],
//! which reconnects by itself): a pooled connection would add a `PING` round trip per checkout
//! (see `PERF-NOTES.md`), and one connection pipelines all concurrent requests of its thread.
//!
//! There is one such connection per thread, created on first use and driven by that thread's
//! runtime. actix-web runs each worker on its own single-threaded runtime; a connection driven
//! elsewhere would cost two thread switches per command, which measured as a third of the
//! broker's CPU on `/start` (see `BENCHMARKS.md`).
//!
//! Keys are `{prefix}:{<session id>}:…`: the braces make every key of one session hash to the
//! same Redis Cluster slot, so scripts that touch several of them stay legal on a cluster.

use std::{
    cell::RefCell,
    collections::HashMap,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::{
    AsyncCommands, Client, Script, SetExpiry, SetOptions,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use tokio::sync::broadcast;
use uuid::Uuid;

use super::{Store, StoreError, TERMINATION_BACKLOG, unix_ms};

/// Reconnect attempts the manager makes in the background after a connection breaks. Requests
/// do not wait for them beyond the command timeout; they fail fast with 503 instead.
const RECONNECT_RETRIES: usize = 2;

/// Longest wait between two attempts to re-subscribe to termination announcements.
const RESUBSCRIBE_MAX_DELAY: Duration = Duration::from_secs(2);

/// The scripts, each documented in its header.
struct Scripts {
    release_token: Script,
    update_session: Script,
    acquire_slot: Script,
    renew_leases: Script,
    claim_lapsed_leases: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            release_token: Script::new(include_str!("../../migrations-lua/001_release_token.lua")),
            update_session: Script::new(include_str!(
                "../../migrations-lua/002_update_session.lua"
            )),
            acquire_slot: Script::new(include_str!("../../migrations-lua/003_acquire_slot.lua")),
            renew_leases: Script::new(include_str!("../../migrations-lua/004_renew_leases.lua")),
            claim_lapsed_leases: Script::new(include_str!(
                "../../migrations-lua/005_claim_lapsed_leases.lua"
            )),
        }
    }
}

/// Distinguishes stores in the per-thread connection table (tests run several in one process).
static NEXT_STORE_ID: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This thread's connection of each store, by store id.
    static CONNECTIONS: RefCell<HashMap<u64, ConnectionManager>> = RefCell::new(HashMap::new());
}

pub struct RedisStore {
    id: u64,
    client: Client,
    config: ConnectionManagerConfig,
    prefix: String,
    timeout: Duration,
    scripts: Scripts,
    terminations: broadcast::Sender<Uuid>,
    /// The subscriber task; ends with the store.
    subscriber: tokio::task::JoinHandle<()>,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.subscriber.abort();
    }
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
        let terminations = broadcast::channel(TERMINATION_BACKLOG).0;
        let channel = format!("{prefix}:terminate");
        let subscriber = tokio::spawn(subscribe(client.clone(), channel, terminations.clone()));
        Ok(Self {
            id: NEXT_STORE_ID.fetch_add(1, Ordering::Relaxed),
            client,
            config,
            prefix: prefix.to_owned(),
            timeout,
            scripts: Scripts::new(),
            terminations,
            subscriber,
        })
    }

    /// This thread's connection, created (without waiting for Redis) on first use.
    fn conn(&self) -> Result<ConnectionManager, StoreError> {
        CONNECTIONS.with(|table| {
            if let Some(conn) = table.borrow().get(&self.id) {
                return Ok(conn.clone());
            }
            let conn =
                ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())
                    .map_err(|e| StoreError(e.to_string()))?;
            table.borrow_mut().insert(self.id, conn.clone());
            Ok(conn)
        })
    }

    fn token_key(&self, sid: Uuid) -> String {
        format!("{}:{{{sid}}}:token", self.prefix)
    }

    fn session_key(&self, sid: Uuid) -> String {
        format!("{}:{{{sid}}}:session", self.prefix)
    }

    /// The set of an agent's live sessions, scored by lease expiry.
    fn live_key(&self, agent: &str) -> String {
        format!("{}:agent:{{{agent}}}:live", self.prefix)
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
        let mut conn = self.conn()?;
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
        let mut conn = self.conn()?;
        let mut call = self.scripts.release_token.key(self.token_key(sid));
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
        let mut conn = self.conn()?;
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
        let mut conn = self.conn()?;
        let key = format!("{}:health", self.prefix);
        self.bounded("health write", conn.set_ex::<_, _, ()>(&key, super::unix_ms(), 60)).await
    }

    async fn create_session(
        &self,
        sid: Uuid,
        fields: &[(&str, String)],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let key = self.session_key(sid);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset_multiple(&key, fields)
            .ignore()
            .pexpire(&key, ttl.as_millis() as i64)
            .ignore();
        self.bounded("create session", pipe.query_async::<()>(&mut conn)).await
    }

    async fn update_session(
        &self,
        sid: Uuid,
        from: &[&str],
        fields: &[(&str, String)],
        ttl: Option<Duration>,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn()?;
        let mut call = self.scripts.update_session.key(self.session_key(sid));
        call.arg(from.join(",")).arg(ttl.map_or(0, |t| t.as_millis().max(1) as u64));
        for (name, value) in fields {
            call.arg(*name).arg(value);
        }
        let applied: i64 = self.bounded("update session", call.invoke_async(&mut conn)).await?;
        Ok(applied == 1)
    }

    async fn get_session(&self, sid: Uuid) -> Result<Option<HashMap<String, String>>, StoreError> {
        let mut conn = self.conn()?;
        let fields: HashMap<String, String> =
            self.bounded("read session", conn.hgetall(self.session_key(sid))).await?;
        Ok((!fields.is_empty()).then_some(fields))
    }

    async fn acquire_slot(
        &self,
        agent: &str,
        sid: Uuid,
        cap: Option<u32>,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn()?;
        let now = unix_ms();
        let mut call = self.scripts.acquire_slot.key(self.live_key(agent));
        call.arg(now)
            .arg(now + lease.as_millis() as u64)
            .arg(sid.to_string())
            .arg(cap.unwrap_or(0));
        let taken: i64 = self.bounded("acquire slot", call.invoke_async(&mut conn)).await?;
        Ok(taken == 1)
    }

    async fn release_slot(&self, agent: &str, sid: Uuid) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let key = self.live_key(agent);
        self.bounded("release slot", conn.zrem::<_, _, ()>(key, sid.to_string())).await
    }

    async fn renew_leases(
        &self,
        agent: &str,
        sids: &[Uuid],
        lease: Duration,
    ) -> Result<Vec<Uuid>, StoreError> {
        let mut conn = self.conn()?;
        let mut call = self.scripts.renew_leases.key(self.live_key(agent));
        call.arg(unix_ms() + lease.as_millis() as u64);
        for sid in sids {
            call.arg(sid.to_string());
        }
        let gone: Vec<String> = self.bounded("renew leases", call.invoke_async(&mut conn)).await?;
        Ok(gone.iter().filter_map(|s| Uuid::parse_str(s).ok()).collect())
    }

    async fn claim_lapsed_leases(
        &self,
        agent: &str,
        limit: usize,
    ) -> Result<Vec<Uuid>, StoreError> {
        let mut conn = self.conn()?;
        let mut call = self.scripts.claim_lapsed_leases.key(self.live_key(agent));
        call.arg(unix_ms()).arg(limit);
        let claimed: Vec<String> =
            self.bounded("claim lapsed leases", call.invoke_async(&mut conn)).await?;
        Ok(claimed.iter().filter_map(|s| Uuid::parse_str(s).ok()).collect())
    }

    async fn live_sessions(&self, agent: &str) -> Result<u64, StoreError> {
        let mut conn = self.conn()?;
        let key = self.live_key(agent);
        let min = format!("({}", unix_ms());
        self.bounded("count live sessions", conn.zcount(key, min, "+inf")).await
    }

    async fn publish_termination(&self, sid: Uuid) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let channel = format!("{}:terminate", self.prefix);
        self.bounded("publish termination", conn.publish::<_, _, ()>(channel, sid.to_string()))
            .await
    }

    fn terminations(&self) -> broadcast::Receiver<Uuid> {
        self.terminations.subscribe()
    }
}

/// Forwards termination announcements from Redis pub/sub to this replica's listeners, and
/// re-subscribes whenever the connection drops. An announcement missed while disconnected is
/// caught by the holder's next lease renewal, which finds the lease removed.
async fn subscribe(client: Client, channel: String, out: broadcast::Sender<Uuid>) {
    let mut delay = Duration::from_millis(50);
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                Ok(()) => {
                    delay = Duration::from_millis(50);
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        let sid = msg.get_payload::<String>().ok().and_then(|s| s.parse().ok());
                        if let Some(sid) = sid {
                            let _ = out.send(sid);
                        }
                    }
                    tracing::warn!("termination subscription lost; re-subscribing");
                }
                Err(e) => tracing::warn!(error = %e, "cannot subscribe to terminations"),
            },
            Err(e) => tracing::debug!(error = %e, "cannot connect for terminations"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RESUBSCRIBE_MAX_DELAY);
    }
}
