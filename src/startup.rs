//! Builds the application from validated settings: binds the listener (port 0 picks a free one
//! and [`Application::port`] reports it), loads keys and agents, opens the store and starts the
//! HTTP server. Production and the tests use this same factory.

use std::{
    net::TcpListener,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use actix_web::{App, HttpServer, dev::Server, web};
use anyhow::Context;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore;
use secrecy::SecretString;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    agents::{Agent, AgentRegistry, WebsocketAuth},
    api_keys,
    bridge::BridgeLimits,
    config::Settings,
    metrics::Metrics,
    registry::{self, LiveRegistry},
    routes,
    sessions::{self, LeaseTiming, LiveSessions, Stop},
    store::{PrepareError, Store, memory::MemoryStore, redis::RedisStore},
    token::SigningKeys,
};

/// How often a drain checks whether the sessions have ended.
const DRAIN_POLL: Duration = Duration::from_millis(100);
/// How long sessions closed at the drain deadline get to finish their close handshakes.
const DRAIN_CLOSE_GRACE: Duration = Duration::from_secs(3);

/// Id of the signing key generated when none is configured (embedded mode only).
pub const GENERATED_KEY_ID: &str = "generated";
/// Name of the built-in demo org and agent.
pub const DEMO_ORG: &str = "demo";
pub const DEMO_AGENT: &str = "echo";

/// Everything a request handler needs, shared by all workers.
pub struct AppState {
    pub region: String,
    /// This replica's id, written as the holder of the tokens it consumes.
    pub replica_id: String,
    /// Public WebSocket base URL of every known region, e.g. `wss://us-west.example.net`; this
    /// replica's own region is always present.
    pub ws_base_urls: std::collections::BTreeMap<String, String>,
    pub token_lifetime: Duration,
    pub keyring: SigningKeys,
    /// Agents and public keys: static ones, and the shared registry's, kept fresh.
    pub registry: Arc<LiveRegistry>,
    pub store: Arc<dyn Store>,
    pub bridge: BridgeLimits,
    pub bot_connect_timeout: Duration,
    pub start_rate: Option<(u64, Duration)>,
    /// Ceiling on every agent's `max_session_duration`.
    pub max_session: Duration,
    pub leases: LeaseTiming,
    /// The sessions this replica holds.
    pub live: Arc<LiveSessions>,
    /// `redis.on_unavailable = "open"`: connects go through unchecked while Redis is down.
    pub fail_open: bool,
    pub metrics: Arc<Metrics>,
    /// The store was prepared (schema checked, scripts loaded); readiness waits for it.
    pub prepared: Arc<AtomicBool>,
    /// Set on SIGTERM: readiness fails and new upgrades are refused while sessions finish.
    pub draining: AtomicBool,
}

impl AppState {
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
}

/// Background tasks that live as long as the application, and stop with it.
struct Background(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Background {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

pub struct Application {
    server: Server,
    drain_deadline: Duration,
    port: u16,
    state: web::Data<AppState>,
    /// Lease renewal, sweeping, termination listening and the demo's echo bot.
    background: Background,
}

impl Application {
    /// Must be called within a Tokio runtime: the store's connection and the demo bot live on it.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(&settings.listen)
            .with_context(|| format!("listen: cannot bind {}", settings.listen))?;
        let local = listener.local_addr()?;

        let mut agents = AgentRegistry::default();
        let mut static_keys = Vec::new();
        let mut background = Background(Vec::new());
        if settings.is_demo() {
            let bot = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let bot_url = format!("ws://{}/", bot.local_addr()?);
            background.0.push(tokio::spawn(crate::echo_bot::serve(bot)));
            agents.insert(demo_agent(&bot_url)?).map_err(anyhow::Error::msg)?;
            static_keys
                .push((api_keys::hash_api_key(api_keys::DEMO_PUBLIC_KEY), DEMO_ORG.to_owned()));
            tracing::warn!(
                public_key = api_keys::DEMO_PUBLIC_KEY,
                agent = DEMO_AGENT,
                org = DEMO_ORG,
                "demo mode: no agents or orgs configured; serving the built-in echo agent, \
                 which accepts the public demo key. Never expose this to a network."
            );
        }
        load_agents(&settings, &mut agents)?;
        for (org, org_settings) in &settings.orgs {
            for hash in &org_settings.public_key_hashes {
                // validate() already checked the format.
                let hash = api_keys::parse_api_key_hash(hash).context("orgs: bad key hash")?;
                static_keys.push((hash, org.clone()));
            }
        }
        for agent in agents.iter() {
            let region = agent.region_for(&settings.region);
            if region != settings.region && !settings.regions.contains_key(region) {
                tracing::warn!(
                    agent = %agent.service_host, region,
                    "the agent's region has no regions.<name>.public_ws_url; /start will answer this replica's URL"
                );
            }
        }
        for agent in agents.iter().filter(|a| !settings.orgs.contains_key(&a.org)) {
            if !settings.is_demo() {
                tracing::warn!(agent = %agent.service_host, "the agent's org has no public keys configured; /start cannot reach it");
            }
        }

        let keyring = build_keyring(&settings)?;
        let store: Arc<dyn Store> = if settings.redis.is_configured() {
            Arc::new(
                RedisStore::new(&settings.redis, settings.command_timeout())
                    .map_err(|e| anyhow::anyhow!("redis: {e}"))?,
            )
        } else {
            tracing::info!(
                "state store: embedded in memory (single process; configure redis to run replicas)"
            );
            Arc::new(MemoryStore::default())
        };
        if settings.redis.on_unavailable == crate::config::FailMode::Open {
            tracing::warn!(
                "redis.on_unavailable = open: while Redis is unreachable, connects are accepted \
                 WITHOUT checking that their token is unused; every such accept is logged"
            );
        }
        let prepared = Arc::new(AtomicBool::new(false));
        match store.prepare().await {
            Ok(()) => prepared.store(true, Ordering::Release),
            Err(e @ PrepareError::Incompatible { .. }) => return Err(e.into()),
            Err(PrepareError::Unavailable(e)) => {
                tracing::warn!(error = %e, "state store not reachable yet; connects answer 503 until it is");
                background
                    .0
                    .push(tokio::spawn(prepare_when_reachable(store.clone(), prepared.clone())));
            }
        }

        let mut ws_base_urls: std::collections::BTreeMap<String, String> = settings
            .regions
            .iter()
            .map(|(name, r)| (name.clone(), r.public_ws_url.trim_end_matches('/').to_owned()))
            .collect();
        ws_base_urls.entry(settings.region.clone()).or_insert_with(|| format!("ws://{local}"));
        let limits = &settings.limits;
        let leases = LeaseTiming {
            lease: Duration::from_millis(settings.sessions.lease_ttl_ms),
            sweep_interval: Duration::from_millis(settings.sessions.sweep_interval_ms),
            retention: Duration::from_secs(settings.sessions.retention_secs),
        };
        let registry = Arc::new(LiveRegistry::new(
            agents.iter().map(|a| (**a).clone()).collect(),
            static_keys,
        ));
        if settings.redis.is_configured() {
            // The shared registry's agents and api_keys, before the first request is served.
            if let Err(e) = registry.refresh(&*store).await {
                tracing::warn!(error = %e, "shared registry not loaded yet; retrying in the background");
            }
            let every = Duration::from_millis(settings.registry.refresh_ms);
            background.0.push(tokio::spawn(registry::keep_fresh(
                registry.clone(),
                store.clone(),
                every,
            )));
        }
        let live = Arc::new(LiveSessions::default());
        background.0.extend([
            tokio::spawn(sessions::renew_leases(store.clone(), live.clone(), leases)),
            tokio::spawn(sessions::sweep_lapsed(store.clone(), registry.clone(), leases)),
            tokio::spawn(sessions::listen_for_terminations(store.terminations(), live.clone())),
        ]);
        let state = web::Data::new(AppState {
            region: settings.region.clone(),
            replica_id: format!("{}/{}", settings.region, uuid::Uuid::new_v4().simple()),
            ws_base_urls,
            token_lifetime: Duration::from_secs(settings.token.lifetime_secs),
            keyring,
            registry,
            store,
            bridge: BridgeLimits {
                max_frame_bytes: limits.max_frame_bytes,
                heartbeat_interval: Duration::from_millis(limits.heartbeat_interval_ms),
                heartbeat_timeout: Duration::from_millis(limits.heartbeat_timeout_ms),
            },
            bot_connect_timeout: Duration::from_millis(limits.bot_connect_timeout_ms),
            start_rate: (limits.start_rate_per_key > 0).then(|| {
                (limits.start_rate_per_key, Duration::from_secs(limits.start_rate_window_secs))
            }),
            max_session: Duration::from_secs(limits.max_session_secs),
            leases,
            live,
            fail_open: settings.redis.on_unavailable == crate::config::FailMode::Open,
            metrics: Arc::new(Metrics::new()),
            prepared,
            draining: AtomicBool::new(false),
        });

        let app_state = state.clone();
        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(app_state.clone())
                .configure(routes::configure)
                .wrap_fn(crate::telemetry::request_span)
        })
        // Signals are the binary's: SIGTERM drains (see `Application::drain`).
        .disable_signals()
        .client_disconnect_timeout(Duration::from_millis(limits.client_disconnect_timeout_ms))
        .listen(listener)?;
        if settings.workers > 0 {
            server = server.workers(settings.workers);
        }
        tracing::info!(
            listen = %local,
            region = %settings.region,
            ws_base_url = %state.ws_base_urls[&settings.region],
            agents = state.registry.load().agents.len(),
            signing_key = state.keyring.signing_kid(),
            "session broker ready"
        );
        let drain_deadline = Duration::from_secs(limits.drain_deadline_secs);
        Ok(Self { server: server.run(), drain_deadline, port: local.port(), state, background })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// A handle that stops the server (gracefully, or not) from elsewhere.
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let _background = self.background;
        self.server.await
    }

    /// Runs until SIGTERM or SIGINT, then drains: readiness fails at once and new upgrades get
    /// 503, live sessions go on until they end or `limits.drain_deadline_secs` passes, the rest
    /// are closed with 1001, and the server stops. Returns when all of that is done.
    pub async fn run_until_signalled(self) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let state = self.state.clone();
        let deadline = self.drain_deadline;
        let mut server = tokio::spawn(self.run_until_stopped());
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        tokio::select! {
            finished = &mut server => return Ok(finished??),
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        state.draining.store(true, Ordering::Release);
        tracing::info!(sessions = state.live.len(), ?deadline, "draining");
        let until = tokio::time::Instant::now() + deadline;
        while !state.live.is_empty() && tokio::time::Instant::now() < until {
            tokio::time::sleep(DRAIN_POLL).await;
        }
        if !state.live.is_empty() {
            tracing::info!(sessions = state.live.len(), "drain deadline passed; closing sessions");
            state.live.stop_all(Stop::Draining);
            let until = tokio::time::Instant::now() + DRAIN_CLOSE_GRACE;
            while !state.live.is_empty() && tokio::time::Instant::now() < until {
                tokio::time::sleep(DRAIN_POLL).await;
            }
        }
        handle.stop(true).await;
        server.await??;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Prepares the store once Redis answers. A newer, incompatible schema found then is as fatal as
/// at start: the process stops rather than work on data it would misread.
async fn prepare_when_reachable(store: Arc<dyn Store>, prepared: Arc<AtomicBool>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match store.prepare().await {
            Ok(()) => {
                prepared.store(true, Ordering::Release);
                return tracing::info!("state store reachable and prepared");
            }
            Err(PrepareError::Unavailable(_)) => continue,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("session-broker: {e}");
                std::process::exit(2);
            }
        }
    }
}

fn demo_agent(bot_url: &str) -> anyhow::Result<Agent> {
    let text = format!(
        "agent_name = \"{DEMO_AGENT}\"\nwebsocket_auth = \"token\"\n\n[broker]\norg = \"{DEMO_ORG}\"\nbot_url = \"{bot_url}\"\n"
    );
    let agent = Agent::from_toml(&text, "built-in demo agent")?;
    debug_assert_eq!(agent.websocket_auth, WebsocketAuth::Token);
    Ok(agent)
}

fn load_agents(settings: &Settings, agents: &mut AgentRegistry) -> anyhow::Result<()> {
    let mut files = settings.agents.files.clone();
    if let Some(dir) = &settings.agents.dir {
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("agents.dir: cannot read {}", dir.display()))?;
        let mut found: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        found.sort();
        files.extend(found);
    }
    for file in files {
        let agent = Agent::from_file(&file)?;
        agents.insert(agent).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    }
    Ok(())
}

/// The configured keyring, or, with no keys configured (validation allows that only without
/// Redis), a random key that lives as long as the process.
fn build_keyring(settings: &Settings) -> anyhow::Result<SigningKeys> {
    if !settings.token.keys.is_empty() {
        return Ok(SigningKeys::new(&settings.token.signing_key_id, &settings.token.keys)?);
    }
    if settings.redis.is_configured() {
        anyhow::bail!("token.keys: required with Redis: replicas must share their signing keys");
    }
    let mut bytes = [0u8; 48];
    rand::rng().fill_bytes(&mut bytes);
    let keys = std::collections::BTreeMap::from([(
        GENERATED_KEY_ID.to_owned(),
        SecretString::from(URL_SAFE_NO_PAD.encode(bytes)),
    )]);
    tracing::warn!(
        key_id = GENERATED_KEY_ID,
        "no token.keys configured: generated a random signing key for this process; tokens \
         will not survive a restart and no other replica can verify them"
    );
    Ok(SigningKeys::new(GENERATED_KEY_ID, &keys)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_on_redis_must_be_given_their_keys() {
        let mut settings = Settings::default();
        assert!(build_keyring(&settings).is_ok(), "one process may generate its own");
        settings.redis.url = Some(SecretString::from("redis://127.0.0.1:1"));
        let error = build_keyring(&settings).unwrap_err().to_string();
        assert!(error.contains("token.keys: required with Redis"), "{error}");
    }
}
