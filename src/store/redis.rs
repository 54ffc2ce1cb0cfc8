//! The Redis store, on a standalone server, a Sentinel-managed master or a Cluster
//! ([`Topology`]). Commands go over a multiplexed connection per thread: a pooled connection
//! would add a `PING` round trip per checkout (see `PERF-NOTES.md`), and one connection pipelines
//! all concurrent requests of its thread. actix-web runs each worker on its own single-threaded
//! runtime; a connection driven elsewhere would cost two thread switches per command, which
//! measured as a third of the broker's CPU on `/start` (see `BENCHMARKS.md`).
//!
//! Keys are named in [`Keyspace`]: the hash tags make every key one script or pipeline touches
//! hash to the same Redis Cluster slot.

use std::{collections::HashMap, time::Duration};

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::{Cmd, FromRedisValue, Pipeline, RedisResult, Script, ScriptInvocation, Value};
use tokio::sync::broadcast;
use uuid::Uuid;

use super::{
    AbandonRequest, Connected, CredentialKind, CredentialRecord, DeployedAgent, EndReason,
    EndRequest, MintRequest, Minted, OpenRequest, PrepareError, RateCount, RegistryEntries,
    RegistryStore, SessionEvent, SessionRecord, SessionStore, Status, StoreError, StoreObserver,
    TERMINATION_BACKLOG,
    keyspace::{Keyspace, RegistryPart},
    topology::{Conn, Purpose, Topology},
    unix_ms,
};
use crate::config::{EvictionCheck, RedisSettings};

/// Longest wait between two attempts to re-subscribe to termination announcements.
const RESUBSCRIBE_MAX_DELAY: Duration = Duration::from_secs(2);

/// Schema version of the data this broker writes: the number of the newest file in
/// `migrations-lua/`. Stored in Redis at start (see [`Store::prepare`]).
pub const SCHEMA_VERSION: u32 = 16;
/// The oldest schema version whose brokers can work with data written by this one. Raise it
/// only with a change that older brokers would misread. Version 7 moved session records and
/// consume marks under the agent's hash tag: a broker of version 6 or older would look for them
/// under other keys, and could consume a token a second time.
pub const COMPATIBLE_FROM: u32 = 7;

/// The migrations, in order; each documents itself in its header.
const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = [
    include_str!("../../migrations-lua/001_release_token.lua"),
    include_str!("../../migrations-lua/002_update_session.lua"),
    include_str!("../../migrations-lua/003_acquire_slot.lua"),
    include_str!("../../migrations-lua/004_renew_leases.lua"),
    include_str!("../../migrations-lua/005_claim_lapsed_leases.lua"),
    include_str!("../../migrations-lua/006_release_token_unless_ended.lua"),
    include_str!("../../migrations-lua/007_mint_session.lua"),
    include_str!("../../migrations-lua/008_connect_session.lua"),
    include_str!("../../migrations-lua/009_renew_leases_fenced.lua"),
    include_str!("../../migrations-lua/010_open_session.lua"),
    include_str!("../../migrations-lua/011_end_session.lua"),
    include_str!("../../migrations-lua/012_abandon_session.lua"),
    include_str!("../../migrations-lua/013_write_sessions.lua"),
    include_str!("../../migrations-lua/014_open_session.lua"),
    include_str!("../../migrations-lua/015_open_sessions.lua"),
    include_str!("../../migrations-lua/016_mint_sessions.lua"),
];
/// Where [`MIGRATIONS`] holds the script of one connect, for sending it whole (see
/// `RedisStore::open_durably`).
const OPEN_SESSION: usize = 13;

/// How long the first of an agent's writes off every caller's path (ends, events) waits for
/// others to go with it (`migrations-lua/013_write_sessions.lua`): slots go back, and events
/// show, this much later.
const WRITE_BATCH_WINDOW: Duration = Duration::from_millis(5);
/// The most writes sent together.
const WRITE_BATCH_MAX: usize = 100;

/// What the writes sent together share: the agent, and its event log's cap and retention (ms).
type WriteBatch = (String, usize, u64);

/// The most connects, or `/start` calls, of an agent sent together
/// (`migrations-lua/015_open_sessions.lua`, `016_mint_sessions.lua`).
const TOGETHER_MAX: usize = 64;
/// How often a connect's open, or a `/start`'s mint, is sent with others before it fails: again
/// only when the caller sending its batch gave up.
const TOGETHER_TRIES: usize = 3;

/// What a batch sent together answers each of its requests: the script's answer for it.
type Together<K, T> = super::batch::Batches<K, std::sync::Arc<T>, Result<Vec<Value>, StoreError>>;

/// What the mints sent together share: the agent, its cap, the rate window and how long its
/// session list keeps a session (ms).
type MintBatch = (String, u32, u64, u64);

/// A `/start`'s mint, waiting to be sent with others: its keys (the record, then the rate
/// counters counted in the script) and its arguments, in the order `016_mint_sessions.lua`
/// reads them.
struct QueuedMint {
    keys: Vec<String>,
    args: Vec<String>,
}

/// What the opens sent together share: the agent, its cap, and how long its session list keeps
/// a session (ms).
type OpenBatch = (String, u32, u64);

/// A connect's open, waiting to be sent with others: its keys (the record, the consume mark)
/// and its arguments, in the order `015_open_sessions.lua` reads them.
struct QueuedOpen {
    record: String,
    mark: String,
    args: Vec<String>,
}

/// A write off every caller's path, waiting to be sent with others: an event, with the end of
/// its session or alone.
struct QueuedWrite {
    event: String,
    end: Option<QueuedEnd>,
}

struct QueuedEnd {
    record: String,
    sid: Uuid,
    /// The ended record's time to live, ms.
    ttl_ms: u64,
    fields: Vec<(&'static str, String)>,
}

/// The scripts, by use.
struct Scripts {
    mint_sessions: Script,
    open_session: Script,
    open_sessions: Script,
    write_sessions: Script,
    abandon_session: Script,
    release_token_unless_ended: Script,
    update_session: Script,
    renew_leases: Script,
    claim_lapsed_leases: Script,
}

impl Scripts {
    fn new() -> Self {
        // 001 is superseded by 006, 004 by 009, 003 and 008 by 010 and 010 by 014, and 011 by
        // 013, and 007 by 016; 014 opens a session alone (with WAIT), 015 several. `prepare`
        // still loads every released one.
        let [
            _release_token,
            update_session,
            _acquire_slot,
            _renew_leases,
            claim_lapsed_leases,
            release_token_unless_ended,
            _mint_session,
            _connect_session,
            renew_leases,
            _open_session,
            _end_session,
            abandon_session,
            write_sessions,
            open_session,
            open_sessions,
            mint_sessions,
        ] = MIGRATIONS.map(Script::new);
        Self {
            mint_sessions,
            open_session,
            open_sessions,
            write_sessions,
            abandon_session,
            release_token_unless_ended,
            update_session,
            renew_leases,
            claim_lapsed_leases,
        }
    }
}

pub struct RedisStore {
    topology: std::sync::Arc<Topology>,
    keys: Keyspace,
    /// Replicas that must acknowledge a consume, and for how long to wait; see
    /// [`SessionStore::consume_token`].
    durability: Option<(u32, Duration)>,
    timeout: Duration,
    scripts: Scripts,
    /// Writes waiting to be sent together.
    writes: super::batch::Batches<WriteBatch, QueuedWrite, Result<bool, StoreError>>,
    /// Connects of the same moment, to be sent together.
    opens: Together<OpenBatch, QueuedOpen>,
    /// `/start` calls of the same moment, to be sent together.
    mints: Together<MintBatch, QueuedMint>,
    terminations: broadcast::Sender<Uuid>,
    /// Failed operations, for the `redis_errors_total` metric.
    errors: std::sync::atomic::AtomicU64,
    /// The subscriber task; ends with the store.
    subscriber: tokio::task::JoinHandle<()>,
    /// What to do about a Redis that may evict keys.
    eviction_check: EvictionCheck,
    /// Told the time of every operation (metrics).
    observer: std::sync::OnceLock<std::sync::Arc<dyn StoreObserver>>,
    /// The fence of each agent as this replica's last lease renewal saw it: a different one at
    /// the next renewal means Redis lost its data meanwhile (see migration 009).
    fences_seen: std::sync::Mutex<HashMap<String, String>>,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.subscriber.abort();
    }
}

impl RedisStore {
    /// Creates the store without waiting for Redis: a replica starts (and reports itself not
    /// ready) while Redis is down, and connects as soon as Redis answers.
    pub fn new(settings: &RedisSettings) -> Result<Self, StoreError> {
        let topology = std::sync::Arc::new(
            Topology::new(settings)
                .map_err(|source| StoreError::Redis { op: "read the topology", source })?,
        );
        let keys = Keyspace::new(&settings.key_prefix);
        let terminations = broadcast::channel(TERMINATION_BACKLOG).0;
        let channel = keys.terminations();
        let subscriber = tokio::spawn(subscribe(topology.clone(), channel, terminations.clone()));
        let durability =
            (settings.wait_replicas > 0).then_some((settings.wait_replicas, settings.wait_timeout));
        Ok(Self {
            topology,
            keys,
            durability,
            timeout: settings.command_timeout,
            scripts: Scripts::new(),
            writes: super::batch::Batches::new(WRITE_BATCH_WINDOW, WRITE_BATCH_MAX),
            opens: super::batch::Batches::same_turn(TOGETHER_MAX),
            mints: super::batch::Batches::same_turn(TOGETHER_MAX),
            terminations,
            errors: Default::default(),
            subscriber,
            observer: std::sync::OnceLock::new(),
            fences_seen: Default::default(),
            eviction_check: settings.on_evicting_policy,
        })
    }

    /// Sends `request` on this thread's connection for `purpose`, within the command timeout,
    /// turning every failure into a [`StoreError`] that names the operation.
    ///
    /// A connection learns that Redis went away (restart, failover) only when a command fails on
    /// it, so a request that fails with a dropped connection, or under Sentinel with any error,
    /// is sent once more on a fresh connection. Every request is safe to repeat: see
    /// [`Store::consume_token`] and the transition ids of `update_session`.
    async fn run<T: FromRedisValue>(
        &self,
        op: &'static str,
        purpose: Purpose,
        request: Request<'_>,
    ) -> Result<T, StoreError> {
        let attempts = async {
            let mut conn = self.topology.conn(purpose).await?;
            match request.send(&mut conn).await {
                Err(e)
                    if e.is_connection_dropped()
                        || e.is_io_error()
                        || self.topology.replaceable() =>
                {
                    self.topology.on_failure(purpose);
                    let mut conn = self.topology.conn(purpose).await?;
                    request.send(&mut conn).await
                }
                result => result,
            }
        };
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(self.timeout, attempts).await;
        if let Some(observer) = self.observer.get() {
            observer.observe(op, started.elapsed());
        }
        let failure = match answer {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(source)) => StoreError::Redis { op, source },
            Err(_) => StoreError::Timeout { op, after: self.timeout },
        };
        self.topology.on_failure(purpose);
        self.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Err(failure)
    }
}

/// One request to Redis, kept as a value so that it can be sent again.
enum Request<'a> {
    Cmd(&'a Cmd),
    Pipe(&'a Pipeline),
    Script(&'a ScriptInvocation<'a>),
}

impl Request<'_> {
    async fn send<T: FromRedisValue>(&self, conn: &mut Conn) -> RedisResult<T> {
        match self {
            Self::Cmd(cmd) => cmd.query_async(conn).await,
            Self::Pipe(pipe) => pipe.query_async(conn).await,
            // EVALSHA, falling back to EVAL when Redis lost its script cache (restart, failover).
            Self::Script(call) => call.invoke_async(conn).await,
        }
    }
}

#[async_trait]
impl SessionStore for RedisStore {
    fn error_count(&self) -> u64 {
        self.errors.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn observe_with(&self, observer: std::sync::Arc<dyn StoreObserver>) {
        // Set once at start; a second observer would be a bug, and is ignored.
        let _ = self.observer.set(observer);
    }

    async fn mint_session(&self, mint: &MintRequest<'_>) -> Result<Minted, StoreError> {
        let now = unix_ms();
        let window_ms = mint.rate_window.as_millis().max(1) as u64;
        // On a Cluster the counters hash elsewhere than the agent: counted by a request of their
        // own, sent together with the script (one round trip still), whose work is undone if a
        // limit was exceeded. Elsewhere the script counts them first and writes nothing then.
        let apart = self.topology.is_cluster() && !mint.rates.is_empty();
        let mut rate_keys: Vec<String> =
            mint.rates.iter().map(|rate| self.keys.rate(&rate.bucket, now / window_ms)).collect();
        let (ttl, retention) = mint.record.as_ref().map_or((0, 0), |(_, ttl, listing)| {
            (ttl.as_millis().max(1) as u64, listing.retention.as_millis().max(1) as u64)
        });
        let mut keys = vec![self.keys.session(mint.agent, mint.sid)];
        let mut args = vec![now.to_string(), ttl.to_string(), mint.sid.to_string()];
        if apart {
            args.push("0".into());
        } else {
            // Counted in the script: nothing else needs them.
            keys.append(&mut rate_keys);
            args.push(mint.rates.len().to_string());
            args.extend(mint.rates.iter().map(|rate| rate.limit.to_string()));
        }
        let fields =
            mint.record.as_ref().map(|(record, ..)| record.to_fields()).unwrap_or_default();
        args.push((fields.len() * 2).to_string());
        for (name, value) in fields {
            args.push(name.to_owned());
            args.push(value);
        }
        let batch = (mint.agent.to_owned(), mint.cap, window_ms, retention);
        let minted = self.together(
            &self.mints,
            "mint_session",
            batch,
            QueuedMint { keys, args },
            |b, all| self.mint_sessions(b, all),
        );
        let answer = if apart {
            let (minted, within) = futures_util::future::join(
                minted,
                self.count_apart(&rate_keys, mint.rates, window_ms),
            )
            .await;
            if !within? {
                if matches!(minted.as_deref().map(outcome), Ok(Some("ok"))) {
                    self.unmint(mint).await;
                }
                return Ok(Minted::RateLimited);
            }
            minted?
        } else {
            minted.await?
        };
        match outcome(&answer) {
            Some("ok") => Ok(Minted::Ok { fence: text_at(&answer, 1) }),
            Some("rate_limited") => Ok(Minted::RateLimited),
            Some("at_capacity") => Ok(Minted::AtCapacity),
            _ => Err(unexpected("mint_session", &answer)),
        }
    }

    async fn open_session(&self, open: &OpenRequest<'_>) -> Result<Connected, StoreError> {
        let (agent, sid) = (open.agent, open.sid);
        let now = unix_ms();
        let ms = |d: Duration| d.as_millis().max(1).to_string();
        let token = open.token.as_ref();
        let mut args: Vec<String> = vec![
            if token.is_some() { "1" } else { "0" }.to_owned(),
            token.map_or("", |t| t.fence).to_owned(),
            token.map_or("", |t| t.holder).to_owned(),
            token.map_or("1".into(), |t| ms(t.mark_ttl)),
            if token.is_some_and(|t| t.want_body) { "1" } else { "0" }.to_owned(),
            now.to_string(),
            (now + open.lease.as_millis() as u64).to_string(),
            sid.to_string(),
        ];
        let record = self.keys.session(agent, sid);
        let mark = self.keys.token(agent, sid);
        let retention = open.listing.map_or(Duration::ZERO, |l| l.retention);
        let answer: Vec<Value> = match (self.durability, token) {
            (Some((replicas, wait)), Some(token)) => {
                // 014's arguments: the cap after the session id, the listing's retention after
                // the record's time to live.
                args.push(open.cap.to_string());
                args.push(ms(open.record_ttl));
                args.push(ms(retention));
                for (name, value) in open.active.to_fields() {
                    args.push(name.to_owned());
                    args.push(value);
                }
                let keys = [
                    self.keys.fence(agent),
                    mark,
                    record,
                    self.keys.live(agent),
                    self.keys.sessions_of(agent),
                ];
                let (answer, acked) = self.open_durably(&keys, &args, replicas, wait).await?;
                if outcome(&answer) == Some("ok") && acked < replicas {
                    // The consume might not survive a failover: undo the open and refuse for now.
                    let undo = AbandonRequest {
                        agent,
                        sid,
                        holder: Some(token.holder),
                        token: true,
                        why: None,
                        record_ttl: token.mark_ttl,
                        event: None,
                        // No event: no log.
                        events: super::EventLog { cap: 0, retention: Duration::ZERO },
                    };
                    self.abandon_session(&undo).await?;
                    return Err(StoreError::NotReplicated {
                        acked,
                        wanted: replicas,
                        within: wait,
                    });
                }
                answer
            }
            _ => {
                args.push(ms(open.record_ttl));
                let fields = open.active.to_fields();
                args.push((fields.len() * 2).to_string());
                for (name, value) in fields {
                    args.push(name.to_owned());
                    args.push(value);
                }
                let batch = (agent.to_owned(), open.cap, retention.as_millis().max(1) as u64);
                let open = QueuedOpen { record, mark, args };
                let send = |batch, all| self.open_sessions(batch, all);
                self.together(&self.opens, "open_session", batch, open, send).await?
            }
        };
        match outcome(&answer) {
            Some("ok") => Ok(Connected::Ok { body: text_at(&answer, 1) }),
            Some("fenced") => Ok(Connected::Fenced),
            Some("replayed") => Ok(Connected::Replayed),
            Some("terminated") => Ok(Connected::Terminated),
            Some("at_capacity") => Ok(Connected::AtCapacity),
            _ => Err(unexpected("open_session", &answer)),
        }
    }

    async fn end_session(&self, end: &EndRequest<'_>) -> Result<bool, StoreError> {
        let ended = QueuedEnd {
            record: self.keys.session(end.agent, end.sid),
            sid: end.sid,
            ttl_ms: end.retention.as_millis().max(1) as u64,
            fields: end.ended.to_fields(),
        };
        let write = QueuedWrite { event: event_json(end.event), end: Some(ended) };
        self.write_behind(end.agent, end.events.cap, end.events.retention, write).await
    }

    async fn abandon_session(&self, abandon: &AbandonRequest<'_>) -> Result<bool, StoreError> {
        let (agent, sid) = (abandon.agent, abandon.sid);
        let mut call = self.scripts.abandon_session.key(self.keys.token(agent, sid));
        call.key(self.keys.session(agent, sid))
            .key(self.keys.live(agent))
            .key(self.keys.events_of(agent));
        call.arg(abandon.holder.unwrap_or(""))
            .arg(sid.to_string())
            .arg(abandon.why.map_or("", EndReason::as_str))
            .arg(unix_ms())
            .arg(abandon.record_ttl.as_millis().max(1) as u64)
            .arg(abandon.event.map(event_json).unwrap_or_default())
            .arg(abandon.events.cap)
            .arg(abandon.events.retention.as_millis().max(1) as u64);
        let given_back: i64 =
            self.run("abandon_session", Purpose::Commands, Request::Script(&call)).await?;
        Ok(given_back == 1)
    }

    async fn consume_token(
        &self,
        agent: &str,
        sid: Uuid,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let key = self.keys.token(agent, sid);
        let mut set = redis::cmd("SET");
        set.arg(&key).arg(holder).arg("NX").arg("PX").arg(ttl.as_millis().max(1) as u64);
        // SET NX answers OK when it wrote and nil when the key existed.
        let written: Option<String> =
            self.run("consume_token", Purpose::Commands, Request::Cmd(&set)).await?;
        if written.is_some() {
            return Ok(true);
        }
        // A nil may follow our own earlier attempt whose answer was lost with its connection:
        // the holder value tells, at the price of a GET on refusals only.
        self.holds(&key, holder).await
    }

    async fn release_token(
        &self,
        agent: &str,
        sid: Uuid,
        holder: &str,
    ) -> Result<bool, StoreError> {
        let mut call = self.scripts.release_token_unless_ended.key(self.keys.token(agent, sid));
        call.key(self.keys.session(agent, sid)).arg(holder);
        let released: i64 =
            self.run("release_token", Purpose::Commands, Request::Script(&call)).await?;
        Ok(released == 1)
    }

    async fn check(&self) -> Result<(), StoreError> {
        let mut set = redis::cmd("SET");
        set.arg(self.keys.health()).arg(unix_ms()).arg("EX").arg(60);
        self.run("check", Purpose::Commands, Request::Cmd(&set)).await
    }

    async fn prepare(&self) -> Result<(), PrepareError> {
        if let Some(source) = self.topology.tls_failure(self.timeout).await {
            return Err(PrepareError::Tls(StoreError::Redis { op: "connect", source }));
        }
        self.check_eviction_policy().await?;
        let key = self.keys.schema();
        let mut read = redis::cmd("HGETALL");
        read.arg(&key);
        let stored: HashMap<String, u32> =
            self.run("read_schema", Purpose::Commands, Request::Cmd(&read)).await?;
        let found = stored.get("version").copied().unwrap_or(0);
        let compatible_from = stored.get("compatible_from").copied().unwrap_or(0);
        if found > SCHEMA_VERSION && compatible_from > SCHEMA_VERSION {
            return Err(PrepareError::Incompatible {
                found,
                compatible_from,
                ours: SCHEMA_VERSION,
            });
        }
        if found < SCHEMA_VERSION {
            let mut write = redis::cmd("HSET");
            write
                .arg(&key)
                .arg("version")
                .arg(SCHEMA_VERSION)
                .arg("compatible_from")
                .arg(COMPATIBLE_FROM);
            self.run::<()>("write_schema", Purpose::Commands, Request::Cmd(&write)).await?;
        }
        // Loaded here so the first requests find them; a Redis that loses them later (restart,
        // failover) gets them again through EVALSHA's fallback to EVAL.
        for source in MIGRATIONS {
            let mut load = redis::cmd("SCRIPT");
            load.arg("LOAD").arg(source);
            let _: String = self.run("load_script", Purpose::Commands, Request::Cmd(&load)).await?;
        }
        Ok(())
    }

    async fn update_session(
        &self,
        agent: &str,
        sid: Uuid,
        from: &[Option<Status>],
        update: &SessionRecord,
        ttl: Option<Duration>,
    ) -> Result<bool, StoreError> {
        let mut call = self.scripts.update_session.key(self.keys.session(agent, sid));
        // Migration 002 reads an empty item as "no record".
        let from: Vec<&str> = from.iter().map(|s| s.map_or("", Status::as_str)).collect();
        call.arg(from.join(","))
            .arg(ttl.map_or(0, |t| t.as_millis().max(1) as u64))
            .arg(Uuid::new_v4().simple().to_string());
        for (name, value) in update.to_fields() {
            call.arg(name).arg(value);
        }
        let applied: i64 =
            self.run("update_session", Purpose::Commands, Request::Script(&call)).await?;
        Ok(applied == 1)
    }

    async fn get_session(
        &self,
        agent: &str,
        sid: Uuid,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let mut get = redis::cmd("HGETALL");
        get.arg(self.keys.session(agent, sid));
        let fields: HashMap<String, String> =
            self.run("get_session", Purpose::Commands, Request::Cmd(&get)).await?;
        Ok((!fields.is_empty()).then(|| SessionRecord::from_fields(&fields)))
    }

    async fn release_slot(&self, agent: &str, sid: Uuid) -> Result<(), StoreError> {
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(self.keys.live(agent)).arg(sid.to_string());
        self.run("release_slot", Purpose::Commands, Request::Cmd(&zrem)).await
    }

    async fn renew_leases(
        &self,
        agent: &str,
        sids: &[Uuid],
        lease: Duration,
    ) -> Result<Vec<Uuid>, StoreError> {
        let seen = self.fences_seen.lock().unwrap_or_else(|e| e.into_inner()).get(agent).cloned();
        let mut call = self.scripts.renew_leases.key(self.keys.live(agent));
        call.key(self.keys.fence(agent))
            .arg(unix_ms() + lease.as_millis() as u64)
            .arg(seen.unwrap_or_default());
        for sid in sids {
            call.arg(sid.to_string());
        }
        let answer: Vec<String> =
            self.run("renew_leases", Purpose::Commands, Request::Script(&call)).await?;
        let mut answer = answer.into_iter();
        if let Some(fence) = answer.next() {
            let mut seen = self.fences_seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.insert(agent.to_owned(), fence);
        }
        Ok(answer.filter_map(|s| Uuid::parse_str(&s).ok()).collect())
    }

    async fn claim_lapsed_leases(
        &self,
        agent: &str,
        limit: usize,
    ) -> Result<Vec<Uuid>, StoreError> {
        let mut call = self.scripts.claim_lapsed_leases.key(self.keys.live(agent));
        call.arg(unix_ms()).arg(limit);
        let claimed: Vec<String> =
            self.run("claim_lapsed_leases", Purpose::Commands, Request::Script(&call)).await?;
        Ok(claimed.iter().filter_map(|s| Uuid::parse_str(s).ok()).collect())
    }

    async fn live_sessions(&self, agent: &str) -> Result<u64, StoreError> {
        let mut count = redis::cmd("ZCOUNT");
        count.arg(self.keys.live(agent)).arg(format!("({}", unix_ms())).arg("+inf");
        self.run("count_live_sessions", Purpose::Commands, Request::Cmd(&count)).await
    }

    async fn trim_sessions(&self, agent: &str, before_ms: u64) -> Result<(), StoreError> {
        let mut trim = redis::cmd("ZREMRANGEBYSCORE");
        trim.arg(self.keys.sessions_of(agent)).arg("-inf").arg(format!("({before_ms}"));
        self.run("trim_sessions", Purpose::Commands, Request::Cmd(&trim)).await
    }

    async fn list_sessions(
        &self,
        agent: &str,
        limit: usize,
    ) -> Result<Vec<(Uuid, SessionRecord)>, StoreError> {
        let mut range = redis::cmd("ZRANGE");
        range.arg(self.keys.sessions_of(agent)).arg(0).arg(limit.saturating_sub(1)).arg("REV");
        let ids: Vec<String> =
            self.run("list_sessions", Purpose::Commands, Request::Cmd(&range)).await?;
        let ids: Vec<Uuid> = ids.iter().filter_map(|id| id.parse().ok()).collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // The records share the list's hash tag, but need not be read atomically with it.
        let mut pipe = redis::pipe();
        for sid in &ids {
            pipe.hgetall(self.keys.session(agent, *sid));
        }
        let records: Vec<HashMap<String, String>> =
            self.run("read_sessions", Purpose::Commands, Request::Pipe(&pipe)).await?;
        Ok(ids
            .into_iter()
            .zip(records)
            .filter(|(_, fields)| !fields.is_empty())
            .map(|(sid, fields)| (sid, SessionRecord::from_fields(&fields)))
            .collect())
    }

    async fn log_event(
        &self,
        agent: &str,
        event: &SessionEvent,
        cap: usize,
        retention: Duration,
    ) -> Result<(), StoreError> {
        let write = QueuedWrite { event: event_json(event), end: None };
        self.write_behind(agent, cap, retention, write).await.map(drop)
    }

    async fn events(&self, agent: &str) -> Result<Vec<SessionEvent>, StoreError> {
        let mut range = redis::cmd("LRANGE");
        range.arg(self.keys.events_of(agent)).arg(0).arg(-1);
        let events: Vec<String> =
            self.run("events", Purpose::Commands, Request::Cmd(&range)).await?;
        Ok(events.iter().filter_map(|json| serde_json::from_str(json).ok()).collect())
    }

    async fn claim_once(&self, what: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut set = redis::cmd("SET");
        set.arg(self.keys.once(what)).arg(1).arg("NX").arg("PX").arg(ttl.as_millis().max(1) as u64);
        let written: Option<String> =
            self.run("claim_once", Purpose::Commands, Request::Cmd(&set)).await?;
        Ok(written.is_some())
    }

    async fn publish_termination(&self, sid: Uuid) -> Result<(), StoreError> {
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(self.keys.terminations()).arg(sid.to_string());
        self.run("publish_termination", Purpose::Commands, Request::Cmd(&publish)).await
    }

    fn terminations(&self) -> broadcast::Receiver<Uuid> {
        self.terminations.subscribe()
    }
}

#[async_trait]
impl RegistryStore for RedisStore {
    async fn registry_version(&self) -> Result<u64, StoreError> {
        let mut get = redis::cmd("GET");
        get.arg(self.keys.registry(RegistryPart::Version));
        let version: Option<u64> =
            self.run("registry_version", Purpose::Commands, Request::Cmd(&get)).await?;
        Ok(version.unwrap_or(0))
    }

    async fn registry_load(&self) -> Result<RegistryEntries, StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .get(self.keys.registry(RegistryPart::Version))
            .hgetall(self.keys.registry(RegistryPart::Agents))
            .hgetall(self.keys.registry(RegistryPart::Keys))
            .hgetall(self.keys.registry(RegistryPart::Tokens));
        let (version, agents, keys, tokens): (
            Option<u64>,
            HashMap<String, String>,
            HashMap<String, String>,
            HashMap<String, String>,
        ) = self.run("registry_load", Purpose::Commands, Request::Pipe(&pipe)).await?;
        let agents = agents
            .into_iter()
            .filter_map(|(host, stored)| {
                Some((host.split_once('.')?.1.to_owned(), DeployedAgent::from_stored(&stored)))
            })
            .collect();
        let records = |stored: HashMap<String, String>| -> Vec<CredentialRecord> {
            stored.values().filter_map(|json| serde_json::from_str(json).ok()).collect()
        };
        let (keys, tokens) = (records(keys), records(tokens));
        Ok(RegistryEntries { version: version.unwrap_or(0), agents, keys, tokens })
    }

    async fn registry_put_agent(
        &self,
        org: &str,
        name: &str,
        agent: &DeployedAgent,
    ) -> Result<u64, StoreError> {
        self.registry_put(RegistryPart::Agents, &format!("{name}.{org}"), &agent.to_stored()).await
    }

    async fn registry_delete_agent(&self, org: &str, name: &str) -> Result<bool, StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hdel(self.keys.registry(RegistryPart::Agents), format!("{name}.{org}"))
            .incr(self.keys.registry(RegistryPart::Version), 1)
            .ignore();
        let (removed,): (u64,) =
            self.run("registry_delete", Purpose::Commands, Request::Pipe(&pipe)).await?;
        Ok(removed > 0)
    }

    async fn registry_put_credential(
        &self,
        kind: CredentialKind,
        record: &CredentialRecord,
    ) -> Result<u64, StoreError> {
        // Serializing a struct of strings and integers cannot fail.
        let json = serde_json::to_string(record).expect("credential record serializes");
        let part = match kind {
            CredentialKind::ApiKey => RegistryPart::Keys,
            CredentialKind::PrivateToken => RegistryPart::Tokens,
        };
        self.registry_put(part, &record.id, &json).await
    }
}

impl RedisStore {
    /// Counts a call against `rates` (their current counters are `keys`) in a request of its
    /// own, for a Cluster, where they hash elsewhere than the agent. Returns whether every count
    /// stays within its limit.
    async fn count_apart(
        &self,
        keys: &[String],
        rates: &[RateCount],
        window_ms: u64,
    ) -> Result<bool, StoreError> {
        // Each counter is made with its expiry before it is counted: a counter never outlives
        // its window by more than one window, even if this replica dies between the two. Both
        // commands name one key, so the cluster connection sends them to its node together.
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("SET").arg(key).arg(0).arg("NX").arg("PX").arg(2 * window_ms).ignore();
            pipe.incr(key, 1);
        }
        let counts: Vec<u64> =
            self.run("rate_limit", Purpose::Commands, Request::Pipe(&pipe)).await?;
        Ok(counts.iter().zip(rates).all(|(count, rate)| *count <= rate.limit))
    }

    /// Sends `request` with the others of the same `batch` that this thread handles at the same
    /// moment (`Batches::same_turn`), and answers the script's answer for it. A request whose
    /// batch's sender gave up (its client went away) is sent again: a retry of an open goes on
    /// as if it had won (`015_open_sessions.lua`), and a retried mint writes the same record
    /// again (`016_mint_sessions.lua`).
    async fn together<K, T, F>(
        &self,
        batches: &Together<K, T>,
        op: &'static str,
        batch: K,
        request: T,
        send: impl Fn(K, Vec<std::sync::Arc<T>>) -> F,
    ) -> Result<Vec<Value>, StoreError>
    where
        K: std::hash::Hash + Eq + Clone,
        F: std::future::Future<Output = Vec<Result<Vec<Value>, StoreError>>>,
    {
        let request = std::sync::Arc::new(request);
        for _ in 0..TOGETHER_TRIES {
            let key = batch.clone();
            let sent = batches.submit(key, request.clone(), |all| send(batch.clone(), all));
            if let Some(answer) = sent.await {
                return answer;
            }
        }
        Err(StoreError::Timeout { op, after: self.timeout })
    }

    /// Sends a batch of one agent's mints (`migrations-lua/016_mint_sessions.lua`), and answers
    /// each its own answer, or the batch's failure.
    async fn mint_sessions(
        &self,
        (agent, cap, window_ms, retention_ms): MintBatch,
        mints: Vec<std::sync::Arc<QueuedMint>>,
    ) -> Vec<Result<Vec<Value>, StoreError>> {
        let mut call = self.scripts.mint_sessions.key(self.keys.fence(&agent));
        call.key(self.keys.live(&agent)).key(self.keys.sessions_of(&agent));
        call.arg(cap).arg(window_ms).arg(retention_ms);
        for mint in &mints {
            call.key(&mint.keys).arg(&mint.args);
        }
        self.answers("mint_session", &call, mints.len()).await
    }

    /// Sends a batch of one agent's opens (`migrations-lua/015_open_sessions.lua`), and answers
    /// each its own answer, or the batch's failure.
    async fn open_sessions(
        &self,
        (agent, cap, retention_ms): OpenBatch,
        opens: Vec<std::sync::Arc<QueuedOpen>>,
    ) -> Vec<Result<Vec<Value>, StoreError>> {
        let mut call = self.scripts.open_sessions.key(self.keys.fence(&agent));
        call.key(self.keys.live(&agent)).key(self.keys.sessions_of(&agent));
        call.arg(cap).arg(retention_ms);
        for open in &opens {
            call.key(&open.record).key(&open.mark).arg(&open.args);
        }
        self.answers("open_session", &call, opens.len()).await
    }

    /// Sends a script of `count` requests sent together, and answers each its own answer, or
    /// the script's failure.
    async fn answers(
        &self,
        op: &'static str,
        call: &ScriptInvocation<'_>,
        count: usize,
    ) -> Vec<Result<Vec<Value>, StoreError>> {
        let sent = self.run::<Vec<Vec<Value>>>(op, Purpose::Commands, Request::Script(call));
        let failure = match sent.await {
            Ok(answers) if answers.len() == count => return answers.into_iter().map(Ok).collect(),
            Ok(answers) => unexpected(op, &[Value::Int(answers.len() as i64)]),
            Err(e) => e,
        };
        (0..count).map(|_| Err(copy_of(&failure))).collect()
    }

    /// Sends `write` with the other writes of `agent` of the same few milliseconds, and
    /// answers what the store answered for it (for an end, whether its record moved to ended).
    async fn write_behind(
        &self,
        agent: &str,
        cap: usize,
        retention: Duration,
        write: QueuedWrite,
    ) -> Result<bool, StoreError> {
        let batch = (agent.to_owned(), cap, retention.as_millis().max(1) as u64);
        let answer =
            self.writes.submit(batch.clone(), write, |all| self.write_sessions(batch, all));
        match answer.await {
            Some(answer) => answer,
            // The caller that was sending the batch gave up: see `record_end` in routes/ws.
            None => Err(StoreError::Timeout { op: "write_sessions", after: self.timeout }),
        }
    }

    /// Sends a batch of writes of one agent's sessions
    /// (`migrations-lua/013_write_sessions.lua`), and answers each: for an end whether its
    /// record moved to ended, or the batch's failure.
    async fn write_sessions(
        &self,
        (agent, cap, retention_ms): WriteBatch,
        writes: Vec<QueuedWrite>,
    ) -> Vec<Result<bool, StoreError>> {
        let mut call = self.scripts.write_sessions.key(self.keys.live(&agent));
        call.key(self.keys.events_of(&agent));
        call.arg(cap).arg(retention_ms);
        for write in &writes {
            call.arg(&write.event);
            let Some(end) = &write.end else {
                call.arg("event");
                continue;
            };
            call.key(&end.record);
            // The transition's id is the same on every try of this end (a session ends once):
            // a try after an answer that was lost is told "applied", and logs no second event.
            call.arg("end")
                .arg(end.sid.to_string())
                .arg(format!("end-{}", end.sid.simple()))
                .arg(end.ttl_ms)
                .arg(end.fields.len() * 2);
            for (name, value) in &end.fields {
                call.arg(*name).arg(value);
            }
        }
        let count = writes.len();
        let sent =
            self.run::<Vec<i64>>("write_sessions", Purpose::Commands, Request::Script(&call));
        let answer = match sent.await {
            Ok(applied) if applied.len() == count => {
                return applied.into_iter().map(|a| Ok(a == 1)).collect();
            }
            Ok(applied) => unexpected("write_sessions", &[Value::Int(applied.len() as i64)]),
            Err(e) => e,
        };
        (0..count).map(|_| Err(copy_of(&answer))).collect()
    }

    /// Undoes a mint whose call turned out to be over a rate limit (a Cluster's separate count):
    /// its token was never handed out, so its record and listing go.
    async fn unmint(&self, mint: &MintRequest<'_>) {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(self.keys.session(mint.agent, mint.sid))
            .zrem(self.keys.sessions_of(mint.agent), mint.sid.to_string());
        if let Err(e) = self.run::<()>("unmint", Purpose::Commands, Request::Pipe(&pipe)).await {
            // Unreachable by its token, it expires with the token's lifetime.
            tracing::warn!(session_id = %mint.sid, error = %e, "could not remove a rate-limited session's record");
        }
    }

    /// `open_session` followed by `WAIT` on a connection of its own: WAIT must follow the
    /// write on the same connection, and blocks it until the replicas answer. Returns the
    /// script's answer and how many replicas acknowledged.
    async fn open_durably(
        &self,
        keys: &[String; 5],
        args: &[String],
        replicas: u32,
        wait: Duration,
    ) -> Result<(Vec<Value>, u32), StoreError> {
        let pipe = |body: bool| {
            let script = &self.scripts.open_session;
            let mut pipe = redis::pipe();
            let mut eval = match body {
                false => redis::cmd("EVALSHA").arg(script.get_hash()).to_owned(),
                true => redis::cmd("EVAL").arg(MIGRATIONS[OPEN_SESSION]).to_owned(),
            };
            eval.arg(keys.len()).arg(keys).arg(args);
            pipe.add_command(eval).cmd("WAIT").arg(replicas).arg(wait.as_millis() as u64);
            pipe
        };
        let first = pipe(false);
        match self.run("open_session_durable", Purpose::Durable, Request::Pipe(&first)).await {
            // A Redis that lost its script cache (restart, failover) is sent the script itself.
            Err(StoreError::Redis { source, .. })
                if source.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                let second = pipe(true);
                self.run("open_session_durable", Purpose::Durable, Request::Pipe(&second)).await
            }
            answer => answer,
        }
    }

    /// Sets `field` of the registry hash `part` and bumps the version, atomically.
    async fn registry_put(
        &self,
        part: RegistryPart,
        field: &str,
        value: &str,
    ) -> Result<u64, StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset(self.keys.registry(part), field, value)
            .ignore()
            .incr(self.keys.registry(RegistryPart::Version), 1);
        let (version,): (u64,) =
            self.run("registry_put", Purpose::Commands, Request::Pipe(&pipe)).await?;
        Ok(version)
    }

    /// Refuses (or warns about, per `redis.on_evicting_policy`) a Redis that may evict keys.
    /// Managed Redis services often forbid `CONFIG`: then the policy cannot be known, and the
    /// operator is told to check it.
    async fn check_eviction_policy(&self) -> Result<(), PrepareError> {
        let mut get = redis::cmd("CONFIG");
        get.arg("GET").arg("maxmemory-policy");
        let policy = match self
            .run::<HashMap<String, String>>("config_get", Purpose::Commands, Request::Cmd(&get))
            .await
        {
            Ok(config) => config.get("maxmemory-policy").cloned().unwrap_or_default(),
            Err(StoreError::Redis { source, .. }) if source.kind() != redis::ErrorKind::Io => {
                tracing::warn!(error = %source, "cannot read Redis's maxmemory-policy; make sure it is noeviction");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        if policy == "noeviction" || policy.is_empty() {
            return Ok(());
        }
        match self.eviction_check {
            EvictionCheck::Refuse => Err(PrepareError::EvictingPolicy { policy }),
            EvictionCheck::Warn => {
                tracing::warn!(%policy, "Redis may evict keys: an evicted consume mark is a replayable token");
                Ok(())
            }
        }
    }

    /// Whether `key` holds `holder`: our own consume, whose answer was lost.
    async fn holds(&self, key: &str, holder: &str) -> Result<bool, StoreError> {
        let mut get = redis::cmd("GET");
        get.arg(key);
        let mark: Option<String> =
            self.run("read_token", Purpose::Commands, Request::Cmd(&get)).await?;
        Ok(mark.as_deref() == Some(holder))
    }
}

/// An event as its log keeps it. A struct of numbers and strings serializes.
fn event_json(event: &SessionEvent) -> String {
    serde_json::to_string(event).expect("event serializes")
}

/// The same failure again, for each write of a batch that failed as one.
fn copy_of(failure: &StoreError) -> StoreError {
    match failure {
        StoreError::Redis { op, source } => {
            let source = (source.kind(), "sent with other writes", source.to_string()).into();
            StoreError::Redis { op, source }
        }
        StoreError::Timeout { op, after } => StoreError::Timeout { op, after: *after },
        StoreError::Missing { what } => StoreError::Missing { what },
        StoreError::NotReplicated { acked, wanted, within } => {
            StoreError::NotReplicated { acked: *acked, wanted: *wanted, within: *within }
        }
    }
}

/// The outcome a script answers first: `ok` or why not.
fn outcome(answer: &[Value]) -> Option<&str> {
    match answer.first()? {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        Value::SimpleString(text) => Some(text),
        _ => None,
    }
}

/// The text at `index` of a script's answer; `None` for a Lua false (nil) or nothing.
fn text_at(answer: &[Value], index: usize) -> Option<String> {
    match answer.get(index)? {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

/// A script answered something it never answers: a store of another version, or a bug.
fn unexpected(op: &'static str, answer: &[Value]) -> StoreError {
    tracing::error!(op, ?answer, "unexpected answer from a script");
    let source = (redis::ErrorKind::UnexpectedReturnType, "unexpected script answer").into();
    StoreError::Redis { op, source }
}

/// Forwards termination announcements from Redis pub/sub to this replica's listeners, and
/// re-subscribes whenever the connection drops (after a failover, to the new master). An
/// announcement missed while disconnected is caught by the holder's next lease renewal, which
/// finds the lease removed.
async fn subscribe(
    topology: std::sync::Arc<Topology>,
    channel: String,
    out: broadcast::Sender<Uuid>,
) {
    let mut delay = Duration::from_millis(50);
    loop {
        for client in topology.pubsub_clients().await.unwrap_or_default() {
            let Ok(mut pubsub) = client.get_async_pubsub().await else { continue };
            if let Err(e) = pubsub.subscribe(&channel).await {
                tracing::warn!(error = %e, "cannot subscribe to terminations");
                continue;
            }
            delay = Duration::from_millis(50);
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                let sid = msg.get_payload::<String>().ok().and_then(|s| s.parse().ok());
                if let Some(sid) = sid {
                    let _ = out.send(sid);
                }
            }
            tracing::warn!("termination subscription lost; re-subscribing");
            break;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RESUBSCRIBE_MAX_DELAY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The migrations are numbered from 001 without gaps, each opens with the header the house
    /// style asks for, and SCHEMA_VERSION is the newest.
    #[test]
    fn migrations_are_versioned_and_documented() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations-lua");
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        for (i, name) in names.iter().enumerate() {
            assert!(
                name.starts_with(&format!("{:03}_", i + 1)) && name.ends_with(".lua"),
                "{name}"
            );
            let text = std::fs::read_to_string(format!("{dir}/{name}")).unwrap();
            for part in ["-- KEYS[1]", "-- ARGV[1]", "-- Returns"] {
                assert!(text.contains(part), "{name} lacks `{part}` in its header");
            }
        }
        assert_eq!(names.len() as u32, SCHEMA_VERSION, "SCHEMA_VERSION is the newest migration");
        for (name, source) in names.iter().zip(MIGRATIONS) {
            let text = std::fs::read_to_string(format!("{dir}/{name}")).unwrap();
            assert_eq!(text, source, "MIGRATIONS lists {name} in its place");
        }
    }
}
