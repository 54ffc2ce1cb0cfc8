//! The state store: every fact that replicas share. Two implementations behind one trait:
//! [`redis::RedisStore`] for production (any replica, any region) and [`memory::MemoryStore`],
//! the embedded default for a single process.
//!
//! Both give the same guarantees; the integration tests run the same assertions on each.

mod batch;
pub mod keyspace;
pub mod memory;
pub mod records;
pub mod redis;
pub mod topology;

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use uuid::Uuid;

pub use records::{
    CredentialKind, CredentialRecord, DeployedAgent, EndReason, RegistryEntries, SessionEvent,
    SessionRecord, Status,
};

/// Session ids announced for termination that a slow listener may lag behind before it misses
/// some; a missed one is still ended at the holder's next lease renewal.
pub const TERMINATION_BACKLOG: usize = 1024;

/// The store could not answer. Callers answer 503 and change nothing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis answered with an error, or the connection failed.
    #[error("{op}: {source}")]
    Redis {
        op: &'static str,
        #[source]
        source: ::redis::RedisError,
    },
    #[error("{op}: no answer within {after:?}")]
    Timeout { op: &'static str, after: Duration },
    /// Something the store must hold is not there: written, then lost with the store's data.
    #[error("{what} is missing from the store")]
    Missing { what: &'static str },
    /// A durable consume was written but too few replicas acknowledged it (`redis.wait_replicas`).
    #[error("consume token: {acked} of {wanted} replicas acknowledged within {within:?}")]
    NotReplicated { acked: u32, wanted: u32, within: Duration },
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Unavailable(#[from] StoreError),
    /// The data was written by a newer broker that this one cannot work with.
    #[error(
        "Redis holds schema version {found}, written by a newer broker and usable only by brokers \
         of schema version {compatible_from} or later; this broker is at version {ours}. \
         Upgrade this broker (or point it at another key_prefix)."
    )]
    Incompatible { found: u32, compatible_from: u32, ours: u32 },
    /// Redis may evict keys, and an evicted consume mark is a token that works again.
    #[error(
        "Redis's maxmemory-policy is `{policy}`: under memory pressure it may evict the marks of \
         used tokens, which could then be replayed. Set `maxmemory-policy noeviction` (Redis \
         then refuses writes instead, and the broker answers 503), or set \
         redis.on_evicting_policy = \"warn\" to accept the risk."
    )]
    EvictingPolicy { policy: String },
    /// The TLS handshake with Redis failed: it would fail the same way on every attempt.
    #[error(
        "TLS with Redis failed ({0}). The servers' certificates must be signed by \
         redis.tls_ca_file (or, without it, a system root) and name the host the broker dials; \
         a server with tls-auth-clients needs redis.tls_client_cert_file and \
         redis.tls_client_key_file."
    )]
    Tls(StoreError),
}

/// Told the round-trip time of each store operation, named as in `RedisStore::run`
/// (`consume_token`, `update_session`, …).
pub trait StoreObserver: Send + Sync {
    fn observe(&self, operation: &'static str, took: Duration);
}

/// Where a session is listed: its agent (`agent.org`), when it was created, how long the list
/// keeps it.
#[derive(Debug, Clone, Copy)]
pub struct Listing<'a> {
    pub agent: &'a str,
    pub created_ms: u64,
    pub retention: Duration,
}

/// A rate limit that a call counts against: its bucket, and the most calls a window allows.
#[derive(Debug, Clone)]
pub struct RateCount {
    pub bucket: String,
    pub limit: u64,
}

/// What `/start` asks of the store ([`SessionStore::mint_session`]).
#[derive(Debug)]
pub struct MintRequest<'a> {
    /// The agent, `agent.org`.
    pub agent: &'a str,
    pub sid: Uuid,
    /// The agent's cap on live sessions; 0 means none.
    pub cap: u32,
    /// Every limit the call counts against, all in windows of `rate_window`.
    pub rates: &'a [RateCount],
    pub rate_window: Duration,
    /// For a token agent: the pending record, its time to live (the token's), and its listing.
    pub record: Option<(&'a SessionRecord, Duration, Listing<'a>)>,
}

/// How [`SessionStore::mint_session`] went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Minted {
    /// Go ahead; a recorded session's token must carry `fence`.
    Ok {
        fence: Option<String>,
    },
    RateLimited,
    AtCapacity,
}

/// Where session events go: the agent's log keeps the newest `cap` for `retention` after the
/// newest.
#[derive(Debug, Clone, Copy)]
pub struct EventLog {
    pub cap: usize,
    pub retention: Duration,
}

/// What a connect asks of the store, and the start of its session
/// ([`SessionStore::open_session`]).
#[derive(Debug)]
pub struct OpenRequest<'a> {
    pub agent: &'a str,
    pub sid: Uuid,
    /// The token's consume, for a token session.
    pub token: Option<TokenUse<'a>>,
    pub cap: u32,
    pub lease: Duration,
    /// The record's fields once active, and how long it then lives.
    pub active: &'a SessionRecord,
    pub record_ttl: Duration,
    /// Where a session without a token is listed (a token session was listed when minted).
    pub listing: Option<Listing<'a>>,
}

/// The consume of a token, within an [`OpenRequest`].
#[derive(Debug)]
pub struct TokenUse<'a> {
    /// The fence the token was minted under (its `fe` claim; empty when it has none).
    pub fence: &'a str,
    /// Written in the consume mark: who consumed, so a retry recognises its own consume.
    pub holder: &'a str,
    /// How long the mark lives: the token's remaining lifetime and the clock skew margin.
    pub mark_ttl: Duration,
    /// Whether to read the body minted with the token.
    pub want_body: bool,
}

/// The end of a session ([`SessionStore::end_session`]).
#[derive(Debug)]
pub struct EndRequest<'a> {
    pub agent: &'a str,
    pub sid: Uuid,
    /// The ended record's fields, and how long it is kept.
    pub ended: &'a SessionRecord,
    pub retention: Duration,
    /// The `ended` event.
    pub event: &'a SessionEvent,
    pub events: EventLog,
}

/// A connect undone because its bot could not be reached ([`SessionStore::abandon_session`]).
#[derive(Debug)]
pub struct AbandonRequest<'a> {
    pub agent: &'a str,
    pub sid: Uuid,
    /// The holder the connect wrote in the token's mark; `None` without a token, or when
    /// fail-open let the connect through unchecked.
    pub holder: Option<&'a str>,
    /// Whether the session came with a token: its record goes back to pending, not to ended.
    pub token: bool,
    /// Why the connect failed: noted on a token session's record, the end reason of a session
    /// without a token; `None` when the store answered too late (nothing is noted, and a session
    /// without a token ends with no reason).
    pub why: Option<EndReason>,
    /// How long the record lives from now: the token's remaining lifetime for a token session,
    /// the retention of ended records otherwise.
    pub record_ttl: Duration,
    pub event: Option<&'a SessionEvent>,
    pub events: EventLog,
}

/// How [`SessionStore::open_session`] went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connected {
    /// Consumed (for a token session), slotted and active; the minted body (standard base64) if
    /// asked for and there is one.
    Ok {
        body: Option<String>,
    },
    /// Minted before the store lost data (restart, failover, flush): call `/start` again.
    Fenced,
    Replayed,
    /// The session was ended through the API before it connected.
    Terminated,
    AtCapacity,
}

/// The whole store: what the broker serves sessions with, and the shared registry.
pub trait Store: SessionStore + RegistryStore {}

impl<T: SessionStore + RegistryStore> Store for T {}

/// Tokens, session records, concurrency slots and termination announcements: what the request
/// path and the background work need.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Everything `/start` needs, in one request: counts the call against its rate limits,
    /// checks the agent's cap and, for a token agent, makes sure of the fence and writes the
    /// pending record and its listing. See `migrations-lua/007_mint_session.lua`; on Redis the
    /// calls of an agent that a replica handles at the same moment go together
    /// (`016_mint_sessions.lua`).
    async fn mint_session(&self, mint: &MintRequest<'_>) -> Result<Minted, StoreError>;

    /// Everything a connect needs before the bot is dialled, and the start of its session, in
    /// one request: for a token session checks the token's fence and record, consumes the token
    /// (once across all replicas, `holder` written in its mark) and reads the minted body if
    /// asked; then takes a slot under the cap and marks the record active (creating and listing
    /// it for a session without a token). A refusal leaves everything as it was. The `connected`
    /// event is the caller's to log, once the bot has answered. On Redis the connects to an
    /// agent that a replica handles at the same moment go together (see
    /// `migrations-lua/015_open_sessions.lua`).
    async fn open_session(&self, open: &OpenRequest<'_>) -> Result<Connected, StoreError>;

    /// The end of a session, in one request: its record moved to ended if it was pending or
    /// active, its slot let go, the event logged. Returns whether the record moved. On Redis the
    /// ends of an agent's sessions within a few milliseconds of each other go together (see
    /// `migrations-lua/013_write_sessions.lua`): ends are off every caller's path.
    async fn end_session(&self, end: &EndRequest<'_>) -> Result<bool, StoreError>;

    /// Undoes [`SessionStore::open_session`] for a connect whose bot could not be reached, in one
    /// request: the slot let go; a token session's record back to pending with the failure noted
    /// and its token given back (unless the session was ended meanwhile); a session without a
    /// token ended with the failure. Returns whether the token was given back. See
    /// `migrations-lua/012_abandon_session.lua`.
    async fn abandon_session(&self, abandon: &AbandonRequest<'_>) -> Result<bool, StoreError>;

    /// Marks the token of session `sid` of `agent` as used by `holder`, unless it already is.
    /// Returns `true` for the one caller that wins. The mark lives for `ttl`, the token's
    /// remaining lifetime, after which the token is refused as expired anyway. (DELETE spends a
    /// pending session's token with it; connects consume through `open_session`.)
    async fn consume_token(
        &self,
        agent: &str,
        sid: Uuid,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Undoes a consume if, and only if, `holder` still holds it and the session has not ended,
    /// so that a connect that could not reach the bot leaves the token usable, but cannot undo a
    /// termination. Returns whether it did.
    async fn release_token(&self, agent: &str, sid: Uuid, holder: &str)
    -> Result<bool, StoreError>;

    /// Proves the store answers and accepts writes.
    async fn check(&self) -> Result<(), StoreError>;

    /// Operations that failed since start (unreachable, timed out, refused).
    fn error_count(&self) -> u64 {
        0
    }

    /// Tells `observer` the round-trip time of every operation from now on. The embedded store
    /// has no round trip, and tells nothing.
    fn observe_with(&self, _observer: std::sync::Arc<dyn StoreObserver>) {}

    /// Readies the store for this version of the broker: checks the schema version the data was
    /// written with, records this one, loads the scripts. Run at start; safe to repeat.
    async fn prepare(&self) -> Result<(), PrepareError> {
        Ok(())
    }

    /// Sets the fields `update` holds on the record of session `sid` of `agent` if its status is one of
    /// `from` (`None` standing for "no record yet"), then sets its time to live unless `ttl` is
    /// `None`. Returns whether it applied. This one conditional write is every session transition.
    async fn update_session(
        &self,
        agent: &str,
        sid: Uuid,
        from: &[Option<Status>],
        update: &SessionRecord,
        ttl: Option<Duration>,
    ) -> Result<bool, StoreError>;

    /// The record of session `sid` of `agent`.
    async fn get_session(
        &self,
        agent: &str,
        sid: Uuid,
    ) -> Result<Option<SessionRecord>, StoreError>;

    async fn release_slot(&self, agent: &str, sid: Uuid) -> Result<(), StoreError>;

    /// Extends the leases of `sids` (all of `agent`) to `lease` from now. Returns the ids whose
    /// lease is gone: terminated, or claimed after it lapsed. Their holder must end them.
    async fn renew_leases(
        &self,
        agent: &str,
        sids: &[Uuid],
        lease: Duration,
    ) -> Result<Vec<Uuid>, StoreError>;

    /// Removes up to `limit` lapsed leases of `agent` and returns their session ids; each id is
    /// returned to one caller only.
    async fn claim_lapsed_leases(&self, agent: &str, limit: usize)
    -> Result<Vec<Uuid>, StoreError>;

    /// Live sessions of `agent` (unlapsed leases).
    async fn live_sessions(&self, agent: &str) -> Result<u64, StoreError>;

    /// Removes from `agent`'s list the sessions created before `before_ms`.
    async fn trim_sessions(&self, agent: &str, before_ms: u64) -> Result<(), StoreError>;

    /// The newest `limit` sessions of `agent` that still have records, newest first.
    async fn list_sessions(
        &self,
        agent: &str,
        limit: usize,
    ) -> Result<Vec<(Uuid, SessionRecord)>, StoreError>;

    /// Appends an event to `agent`'s log, which keeps the newest `cap` events for `retention`.
    async fn log_event(
        &self,
        agent: &str,
        event: &SessionEvent,
        cap: usize,
        retention: Duration,
    ) -> Result<(), StoreError>;

    /// `agent`'s events, newest first.
    async fn events(&self, agent: &str) -> Result<Vec<SessionEvent>, StoreError>;

    /// Claims `what` (a call id, a nonce) for `ttl`: true for the first caller only, on any
    /// replica. A webhook delivered twice mints one session.
    async fn claim_once(&self, what: &str, ttl: Duration) -> Result<bool, StoreError>;

    /// Tells every replica that session `sid` must end.
    async fn publish_termination(&self, sid: Uuid) -> Result<(), StoreError>;

    /// Session ids announced by [`SessionStore::publish_termination`], on any replica.
    fn terminations(&self) -> broadcast::Receiver<Uuid>;
}

/// The shared registry: agents deployed and public keys created through the operator commands.
#[async_trait]
pub trait RegistryStore: Send + Sync + 'static {
    /// Version of the shared registry; every change below increments it.
    async fn registry_version(&self) -> Result<u64, StoreError>;

    /// Everything in the shared registry, at one version.
    async fn registry_load(&self) -> Result<RegistryEntries, StoreError>;

    /// Creates or replaces the agent `name` of `org` with its `pcc-deploy.toml` text.
    async fn registry_put_agent(
        &self,
        org: &str,
        name: &str,
        agent: &DeployedAgent,
    ) -> Result<u64, StoreError>;

    /// Removes the agent `name` of `org`. Returns whether there was one.
    async fn registry_delete_agent(&self, org: &str, name: &str) -> Result<bool, StoreError>;

    /// Adds a credential, or replaces the record with its id (to revoke it).
    async fn registry_put_credential(
        &self,
        kind: CredentialKind,
        record: &CredentialRecord,
    ) -> Result<u64, StoreError>;
}

/// Milliseconds since the Unix epoch, the time base of token expiry.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
