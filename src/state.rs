//! The application state every request handler and background task shares, built once from the
//! validated settings.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    agents::Agent,
    bot_addresses::BotAddresses,
    bridge::BridgeLimits,
    config::{FailMode, Settings},
    log_budget::LogBudget,
    metrics::Metrics,
    registry::LiveRegistry,
    sessions::{LeaseTiming, LiveSessions},
    store::{EventLog, SessionEvent, Store, unix_ms},
    token::SigningKeys,
};

/// How long a readiness answer is reused. Each fresh answer writes to the store; a flood of
/// probes must not become a flood of Redis writes.
pub const READINESS_CACHE: Duration = Duration::from_secs(1);

/// Session events kept per agent for `agent logs`: the newest ones.
pub const EVENTS_PER_AGENT: usize = 1_000;

/// The last answer of the store's readiness check, and when it was found.
#[derive(Default)]
pub struct ReadinessCache {
    last: Mutex<Option<(Instant, Result<(), String>)>>,
}

pub struct AppState {
    pub region: String,
    /// This replica's id, written as the holder of the tokens it consumes.
    pub replica_id: String,
    /// Public WebSocket base URL of every known region, e.g. `wss://us-west.example.net`; this
    /// replica's own region is always present.
    ws_base_urls: BTreeMap<String, String>,
    pub token_lifetime: Duration,
    pub signing_keys: SigningKeys,
    /// Agents and public keys: static ones, and the shared registry's, kept fresh.
    pub registry: Arc<LiveRegistry>,
    pub store: Arc<dyn Store>,
    pub bridge: BridgeLimits,
    /// How `wss://` bots are dialled: whom they must be vouched for by (`bots.tls_ca_file`).
    pub bot_tls: Arc<rustls::ClientConfig>,
    /// Bot host names' addresses, looked up every few seconds rather than on every connect.
    pub bot_addresses: BotAddresses,
    pub bot_connect_timeout: Duration,
    /// `/start` calls allowed per public key and per client address in each window; `None` is
    /// unlimited.
    pub start_rate_per_key: Option<u64>,
    pub start_rate_per_address: Option<u64>,
    pub start_rate_window: Duration,
    pub start_body_timeout: Duration,
    pub max_query_bytes: usize,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Open client connections, counted by the server's connection hook.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    pub max_connections: usize,
    pub max_live_sessions: usize,
    /// See `token.clock_skew_ms`.
    pub clock_skew: Duration,
    /// Bot URLs for deployed agents that bring none.
    bots: crate::agents::BotDefaults,
    /// Each agent's provider credentials, by `agent.org`, for the answer webhooks.
    pub telephony: std::collections::HashMap<String, crate::config::AgentTelephony>,
    /// The base URL providers call the webhooks at, when configured.
    pub telephony_public_url: Option<String>,
    /// Browser origins each org allows (CORS).
    pub allowed_origins: std::collections::HashMap<String, Vec<String>>,
    /// Ceiling on every agent's `max_session_duration`.
    pub max_session: Duration,
    /// The cap of agents whose file sets none.
    pub default_max_agents: u32,
    pub leases: LeaseTiming,
    /// The sessions this replica holds.
    pub live: Arc<LiveSessions>,
    /// `redis.on_unavailable = "open"`: connects go through unchecked while Redis is down.
    pub fail_open: bool,
    pub metrics: Arc<Metrics>,
    /// The store was prepared (schema checked, scripts loaded); readiness waits for it.
    pub prepared: Arc<AtomicBool>,
    /// Set on SIGTERM: readiness fails and new upgrades are refused while sessions finish.
    draining: AtomicBool,
    readiness: ReadinessCache,
    /// Lines about refused requests, which strangers can cause, are logged within this budget.
    pub refusal_log: LogBudget,
}

impl AppState {
    /// `local` is the address the public listener bound: the WebSocket base URL of this
    /// replica's region when the settings name none (a laptop). `bot_tls` is built from
    /// `[bots]` (see [`crate::tls::bot_client_config`]).
    pub fn new(
        settings: &Settings,
        local: SocketAddr,
        bot_tls: Arc<rustls::ClientConfig>,
        signing_keys: SigningKeys,
        registry: Arc<LiveRegistry>,
        store: Arc<dyn Store>,
        prepared: Arc<AtomicBool>,
    ) -> Self {
        let mut ws_base_urls: BTreeMap<String, String> = settings
            .regions
            .iter()
            .map(|(name, r)| (name.clone(), r.public_ws_url.trim_end_matches('/').to_owned()))
            .collect();
        ws_base_urls.entry(settings.region.clone()).or_insert_with(|| format!("ws://{local}"));
        let limits = &settings.limits;
        let metrics = Arc::new(Metrics::new());
        Self {
            region: settings.region.clone(),
            replica_id: format!("{}/{}", settings.region, uuid::Uuid::new_v4().simple()),
            ws_base_urls,
            token_lifetime: settings.token.lifetime,
            signing_keys,
            registry,
            store,
            bridge: BridgeLimits {
                max_frame_bytes: limits.max_frame_bytes,
                heartbeat_interval: limits.heartbeat_interval,
                heartbeat_timeout: limits.heartbeat_timeout,
            },
            bot_tls,
            bot_addresses: BotAddresses::new(metrics.bot_address_lookups.clone()),
            bot_connect_timeout: limits.bot_connect_timeout,
            start_rate_per_key: (limits.start_rate_per_key > 0)
                .then_some(limits.start_rate_per_key),
            start_rate_window: limits.start_rate_window,
            start_rate_per_address: (limits.start_rate_per_address > 0)
                .then_some(limits.start_rate_per_address),
            start_body_timeout: limits.start_body_timeout,
            max_query_bytes: limits.max_query_bytes,
            trusted_proxies: settings.trusted_proxy_nets(),
            connections: Arc::default(),
            max_connections: limits.max_connections,
            max_live_sessions: limits.max_live_sessions,
            clock_skew: settings.token.clock_skew,
            bots: settings.bots.defaults(),
            telephony: settings.telephony.agents.clone().into_iter().collect(),
            telephony_public_url: settings.telephony.public_url.clone(),
            allowed_origins: settings
                .orgs
                .iter()
                .map(|(org, o)| (org.clone(), o.allowed_origins.clone()))
                .collect(),
            max_session: limits.max_session,
            default_max_agents: settings.agents.default_max_agents,
            leases: LeaseTiming {
                lease: settings.sessions.lease_ttl,
                sweep_interval: settings.sessions.sweep_interval,
                retention: settings.sessions.retention,
            },
            live: Arc::new(LiveSessions::default()),
            fail_open: settings.redis.on_unavailable == FailMode::Open,
            metrics,
            prepared,
            draining: AtomicBool::new(false),
            readiness: ReadinessCache::default(),
            refusal_log: LogBudget::for_refusals(),
        }
    }

    /// The public WebSocket base URL for `region`; this replica's own when the region has none
    /// configured (start-up warns about such agents).
    pub fn ws_base_url(&self, region: &str) -> &str {
        self.ws_base_urls.get(region).unwrap_or(&self.ws_base_urls[&self.region])
    }

    /// How long a record lives once its session is active: through the longest session, then
    /// retention. A record whose replica and every sweeper died still goes away eventually.
    pub fn active_record_ttl(&self, max_duration: Duration) -> Duration {
        max_duration + self.leases.lease + self.leases.retention
    }

    /// Refuses a request when this replica serves more connections than it may: the client
    /// should try another replica.
    pub fn check_connections(&self) -> Result<(), crate::error::ApiError> {
        if self.connections.load(Ordering::Relaxed) > self.max_connections {
            return Err(crate::error::ApiError::ReplicaBusy);
        }
        Ok(())
    }

    /// Adds `text` about session `sid` to the agent's event log (`pipecat cloud agent logs`),
    /// in the background: no request waits for it, and a failure is only logged.
    pub fn log_event(&self, service_host: &str, sid: uuid::Uuid, text: String) {
        let event = SessionEvent { at_ms: unix_ms(), session_id: sid, text };
        let (store, agent, retention) =
            (self.store.clone(), service_host.to_owned(), self.leases.retention);
        tokio::spawn(async move { store_event(&*store, &agent, &event, retention).await });
    }

    /// Where session events go: [`EVENTS_PER_AGENT`] per agent, kept for the retention period.
    pub fn event_log(&self) -> EventLog {
        EventLog { cap: EVENTS_PER_AGENT, retention: self.leases.retention }
    }

    /// An agent's concurrent-session cap across all replicas.
    pub fn cap_of(&self, agent: &Agent) -> u32 {
        agent.max_agents.unwrap_or(self.default_max_agents)
    }

    /// The bot URLs of `[bots]`, for deployed agents that bring none.
    pub fn bot_defaults(&self) -> crate::agents::BotDefaults {
        self.bots.clone()
    }

    /// Every region replicas serve (those with a public WebSocket URL), this one's included.
    pub fn regions(&self) -> impl Iterator<Item = &str> {
        self.ws_base_urls.keys().map(String::as_str)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// From now on readiness fails and new upgrades are refused.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_prepared(&self) -> bool {
        self.prepared.load(Ordering::Acquire)
    }

    /// Whether the store answers and takes writes, asked at most once per [`READINESS_CACHE`].
    pub async fn store_ready(&self) -> Result<(), String> {
        let cached = self.readiness.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some((at, result)) = cached
            && at.elapsed() < READINESS_CACHE
        {
            return result;
        }
        let result = self.store.check().await.map_err(|e| e.to_string());
        let mut last = self.readiness.last.lock().unwrap_or_else(|e| e.into_inner());
        *last = Some((Instant::now(), result.clone()));
        result
    }
}

/// Appends a session event to its agent's list; an event that cannot be written is only logged
/// (events are a convenience for operators, never a session's fate).
async fn store_event(store: &dyn Store, agent: &str, event: &SessionEvent, retention: Duration) {
    if let Err(e) = store.log_event(agent, event, EVENTS_PER_AGENT, retention).await {
        tracing::debug!(%agent, error = %e, "could not log a session event");
    }
}
