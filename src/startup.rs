//! Builds the application from validated settings: binds the listener (port 0 picks a free one
//! and [`Application::port`] reports it), loads keys and agents, opens the store, starts the
//! background work and the HTTP server. Production and the tests use this same factory.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use actix_http::{Extensions, HttpService};
use actix_service::{IntoServiceFactory, map_config};
use actix_web::{
    App, HttpServer,
    dev::{AppConfig, Server},
    web,
};
use anyhow::Context;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore;
use secrecy::SecretString;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    agents::{Agent, AgentRegistry, WebsocketAuth},
    api_keys::{ApiKeyHash, DEMO_PUBLIC_KEY, hash_api_key, parse_api_key_hash},
    config::{FailMode, Settings},
    registry::{self, LiveRegistry},
    routes, server,
    sessions::{self, Stop},
    state::AppState,
    store::{PrepareError, Store, memory::MemoryStore, redis::RedisStore},
    token::SigningKeys,
    upgrade,
};

/// How long sessions closed at the drain deadline get to finish their close handshakes.
const DRAIN_CLOSE_GRACE: Duration = Duration::from_secs(3);
/// Pause between attempts to prepare a store that was unreachable at start.
const PREPARE_RETRY: Duration = Duration::from_secs(1);

/// Id of the signing key generated when none is configured (embedded mode only).
pub const GENERATED_KEY_ID: &str = "generated";
/// Name of the built-in demo org and agent.
pub const DEMO_ORG: &str = "demo";
pub const DEMO_AGENT: &str = "echo";
/// Concurrent sessions the demo agent allows: enough to try it, too few to lend it out.
pub const DEMO_MAX_SESSIONS: u32 = 5;

/// Background tasks that live as long as the application: dropping this cancels them all. A
/// task that hits an error the process cannot outlive reports it through `fatal`, and the
/// application stops with it.
struct Background {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    fatal: mpsc::Sender<anyhow::Error>,
}

impl Background {
    fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.push(tokio::spawn(task));
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

pub struct Application {
    /// The public listener: the session API and WebSocket connects.
    server: server::Server,
    /// The internal listener: metrics and probes.
    internal: Server,
    drain_deadline: Duration,
    port: u16,
    internal_port: u16,
    state: web::Data<AppState>,
    /// Lease renewal, sweeping, termination listening, registry refresh and the demo's bot.
    background: Background,
    fatal: mpsc::Receiver<anyhow::Error>,
}

/// Agents and public keys from files and settings, before the shared registry is read.
struct Catalog {
    agents: AgentRegistry,
    api_keys: Vec<(ApiKeyHash, String)>,
}

impl Application {
    /// Must be called within a Tokio runtime: the store's connection and the demo bot live on it.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        check_open_file_limit(&settings);
        let bind = || {
            let addr = std::net::ToSocketAddrs::to_socket_addrs(&settings.listen)?
                .next()
                .ok_or_else(|| std::io::Error::other("the address resolves to nothing"))?;
            server::bind(addr)
        };
        let listener =
            bind().with_context(|| format!("listen: cannot bind {}", settings.listen))?;
        Self::build_on(settings, listener).await
    }

    /// [`Application::build`] on a public listener bound beforehand (`settings.listen` is then
    /// not used): whoever must know the port before the settings are complete (the public URL
    /// of a region, say) binds first.
    pub async fn build_on(settings: Settings, listener: TcpListener) -> anyhow::Result<Self> {
        let local = listener.local_addr()?;
        let (fatal_tx, fatal) = mpsc::channel(1);
        let mut background = Background { tasks: Vec::new(), fatal: fatal_tx };

        let internal = TcpListener::bind(&settings.internal_listen).with_context(|| {
            format!("internal_listen: cannot bind {}", settings.internal_listen)
        })?;
        let internal_local = internal.local_addr()?;
        let mut catalog = Catalog { agents: AgentRegistry::default(), api_keys: Vec::new() };
        if settings.demo {
            add_demo(&mut catalog, &mut background).await?;
        } else if settings.configures_nothing() {
            tracing::warn!(
                "no agents (agents.files, agents.dir) and no orgs configured: only agents deployed \
                 to the shared registry can be reached; for the built-in demo on a laptop, run \
                 with --demo"
            );
        }
        load_catalog(&settings, &mut catalog)?;
        let signing_keys = build_signing_keys(&settings)?;
        let bot_tls = crate::tls::bot_client_config(&settings.bots)?;
        let store = open_store(&settings)?;
        let prepared = prepare_store(&store, &mut background).await?;
        let registry = start_registry(&settings, catalog, &store, &mut background).await;
        let state = web::Data::new(AppState::new(
            &settings,
            local,
            bot_tls,
            signing_keys,
            registry,
            store,
            prepared,
        ));
        state.store.observe_with(state.metrics.clone());
        spawn_session_work(&state, &mut background);
        let server = http_server(&settings, listener, state.clone()).await?;
        let internal = internal_server(internal, state.clone())?;
        tracing::info!(
            listen = %local,
            internal_listen = %internal_local,
            region = %settings.region,
            ws_base_url = %state.ws_base_url(&settings.region),
            agents = state.registry.load().agents.len(),
            signing_key = state.signing_keys.signing_kid(),
            "session broker ready"
        );
        let drain_deadline = settings.limits.drain_deadline;
        Ok(Self {
            server,
            internal,
            drain_deadline,
            port: local.port(),
            internal_port: internal_local.port(),
            state,
            background,
            fatal,
        })
    }

    /// Port of the public listener.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Port of the internal listener (metrics and probes).
    pub fn internal_port(&self) -> u16 {
        self.internal_port
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// A handle that stops the server (gracefully, or not) from elsewhere.
    pub fn handle(&self) -> server::ServerHandle {
        self.server.handle()
    }

    /// Serves until the server is stopped through its handle, or a background task fails in a
    /// way the process cannot outlive.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Self { server, internal, background, mut fatal, .. } = self;
        let _background = background;
        let internal_handle = internal.handle();
        let internal = tokio::spawn(internal);
        let outcome = tokio::select! {
            served = server => served.map_err(anyhow::Error::from),
            Some(e) = fatal.recv() => Err(e),
        };
        // Probes and metrics answer as long as the public listener does, and no longer.
        internal_handle.stop(true).await;
        let _ = internal.await;
        outcome
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
            finished = &mut server => return finished?,
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        state.start_draining();
        tracing::info!(sessions = state.live.len(), ?deadline, "draining");
        if tokio::time::timeout(deadline, state.live.until_empty()).await.is_err() {
            tracing::info!(sessions = state.live.len(), "drain deadline passed; closing sessions");
            state.live.stop_all(Stop::Draining);
            let _ = tokio::time::timeout(DRAIN_CLOSE_GRACE, state.live.until_empty()).await;
        }
        handle.stop(true).await;
        server.await??;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The built-in demo: an echo bot on a free loopback port, its agent and the public demo key.
async fn add_demo(catalog: &mut Catalog, background: &mut Background) -> anyhow::Result<()> {
    let bot = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let bot_url = format!("ws://{}/", bot.local_addr()?);
    background.spawn(crate::echo_bot::serve(bot));
    catalog.agents.insert(demo_agent(&bot_url)?).map_err(anyhow::Error::msg)?;
    catalog.api_keys.push((hash_api_key(DEMO_PUBLIC_KEY), DEMO_ORG.to_owned()));
    tracing::warn!(
        public_key = DEMO_PUBLIC_KEY,
        agent = DEMO_AGENT,
        org = DEMO_ORG,
        "demo mode: serving the built-in echo agent, which accepts the public demo key; \
         listening on loopback only"
    );
    Ok(())
}

/// Agents from `agents.files` and `agents.dir`, and the orgs' key hashes; warns about agents
/// that no request could reach as configured.
fn load_catalog(settings: &Settings, catalog: &mut Catalog) -> anyhow::Result<()> {
    load_agents(settings, &mut catalog.agents)?;
    for (org, org_settings) in &settings.orgs {
        for hash in &org_settings.public_key_hashes {
            // validate() already checked the format.
            let hash = parse_api_key_hash(hash).context("orgs: bad key hash")?;
            catalog.api_keys.push((hash, org.clone()));
        }
    }
    for agent in catalog.agents.iter() {
        let region = agent.region_for(&settings.region);
        if region != settings.region && !settings.regions.contains_key(region) {
            tracing::warn!(
                agent = %agent.service_host, region,
                "the agent's region has no regions.<name>.public_ws_url; /start will answer this replica's URL"
            );
        }
        let demo = settings.demo && agent.org == DEMO_ORG;
        if !demo && !settings.orgs.contains_key(&agent.org) {
            tracing::warn!(agent = %agent.service_host, "the agent's org has no public keys configured; /start cannot reach it");
        }
    }
    Ok(())
}

fn open_store(settings: &Settings) -> anyhow::Result<Arc<dyn Store>> {
    if settings.redis.on_unavailable == FailMode::Open {
        tracing::warn!(
            "redis.on_unavailable = open: while Redis is unreachable, connects are accepted \
             WITHOUT checking that their token is unused; every such accept is logged"
        );
    }
    if !settings.redis.is_configured() {
        tracing::info!(
            "state store: embedded in memory (single process; configure redis to run replicas)"
        );
        return Ok(Arc::new(MemoryStore::default()));
    }
    let store = RedisStore::new(&settings.redis).context("redis")?;
    Ok(Arc::new(store))
}

/// Raises the open-file limit as far as the hard limit allows, and warns when it is below what
/// `limits.max_connections` and `limits.max_live_sessions` allow for: past it, accepts and bot
/// dials fail, which clients see as stalled connects and 503s.
fn check_open_file_limit(settings: &Settings) {
    let limits = &settings.limits;
    let needed = (limits.max_connections + limits.max_live_sessions) as u64 + server::FD_MARGIN;
    match server::raise_open_file_limit() {
        Ok((_, now)) if now < needed => tracing::warn!(
            limit = now,
            needed,
            "the open-file limit is below what limits.max_connections and \
             limits.max_live_sessions allow for: connects past it fail; raise the hard limit \
             (LimitNOFILE= in a systemd unit, ulimit -Hn) or lower those limits"
        ),
        Ok((before, now)) if now > before => {
            tracing::info!(before, now, "open-file limit raised to the hard limit")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not read or raise the open-file limit"),
    }
}

/// Prepares the store (schema, scripts). A store that is unreachable now is prepared in the
/// background once it answers; until then readiness fails and connects answer 503. A schema
/// this broker cannot work with, or a TLS handshake its settings cannot pass, stops it, now or
/// then.
async fn prepare_store(
    store: &Arc<dyn Store>,
    background: &mut Background,
) -> anyhow::Result<Arc<AtomicBool>> {
    let prepared = Arc::new(AtomicBool::new(false));
    match store.prepare().await {
        Ok(()) => prepared.store(true, Ordering::Release),
        Err(
            e @ (PrepareError::Incompatible { .. }
            | PrepareError::EvictingPolicy { .. }
            | PrepareError::Tls(_)),
        ) => {
            return Err(e.into());
        }
        Err(PrepareError::Unavailable(e)) => {
            tracing::warn!(error = %e, "state store not reachable yet; connects answer 503 until it is");
            let (store, done, fatal) = (store.clone(), prepared.clone(), background.fatal.clone());
            background.spawn(async move {
                if let Err(e) = prepare_when_reachable(&*store, &done).await {
                    let _ = fatal.send(e.into()).await;
                }
            });
        }
    }
    Ok(prepared)
}

async fn prepare_when_reachable(
    store: &dyn Store,
    prepared: &AtomicBool,
) -> Result<(), PrepareError> {
    loop {
        tokio::time::sleep(PREPARE_RETRY).await;
        match store.prepare().await {
            Ok(()) => {
                prepared.store(true, Ordering::Release);
                tracing::info!("state store reachable and prepared");
                return Ok(());
            }
            Err(PrepareError::Unavailable(_)) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The live registry over the catalog; with Redis, the shared registry's agents and keys are
/// read before the first request is served and kept fresh every `registry.refresh_ms`.
async fn start_registry(
    settings: &Settings,
    catalog: Catalog,
    store: &Arc<dyn Store>,
    background: &mut Background,
) -> Arc<LiveRegistry> {
    let agents = catalog.agents.iter().map(|a| (**a).clone()).collect();
    let registry = Arc::new(LiveRegistry::new(agents, catalog.api_keys, settings.bots.defaults()));
    if settings.redis.is_configured() {
        if let Err(e) = registry.refresh(&**store).await {
            tracing::warn!(error = %e, "shared registry not loaded yet; retrying in the background");
        }
        let every = settings.registry.refresh;
        background.spawn(registry::keep_fresh(registry.clone(), store.clone(), every));
    }
    registry
}

/// Lease renewal, the sweep for lost replicas' sessions and termination announcements.
fn spawn_session_work(state: &AppState, background: &mut Background) {
    let (store, live, leases) = (&state.store, &state.live, state.leases);
    background.spawn(sessions::renew_leases(store.clone(), live.clone(), leases));
    let lost = state.metrics.sessions_lost.clone();
    background.spawn(sessions::sweep_lapsed(store.clone(), state.registry.clone(), leases, lost));
    background.spawn(sessions::listen_for_terminations(store.terminations(), live.clone()));
}

async fn http_server(
    settings: &Settings,
    listener: TcpListener,
    state: web::Data<AppState>,
) -> anyhow::Result<server::Server> {
    let connections = state.connections.clone();
    let local = listener.local_addr()?;
    let limits = &settings.limits;
    let (head_timeout, disconnect_timeout) =
        (limits.request_head_timeout, limits.client_disconnect_timeout);
    let app = move || {
        App::new()
            .app_data(state.clone())
            .configure(routes::configure)
            .wrap_fn(routes::middleware::request_span)
    };
    // What actix-web's `HttpServer` builds for each worker, plus an upgrade service (see
    // `upgrade`), so that a WebSocket session runs on its socket in the connection's task.
    let service = move || {
        let connections = connections.clone();
        HttpService::build()
            .client_request_timeout(head_timeout)
            .client_disconnect_timeout(disconnect_timeout)
            .tcp_nodelay(true)
            .local_addr(local)
            .on_connect_ext(move |_: &tokio::net::TcpStream, extensions: &mut Extensions| {
                extensions.insert(ConnectionCount::open(&connections));
            })
            .upgrade(upgrade::service(app().into_factory()))
            .finish(map_config(app(), |_| AppConfig::default()))
            .tcp()
    };
    let workers = match settings.workers {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        workers => workers,
    };
    // Past `max_connections` requests are answered 503 (see `AppState::check_connections`); past
    // twice that per worker, the worker stops accepting, the last resort.
    let per_worker = limits.max_connections.saturating_mul(2);
    let server = server::Server::start(listener, workers, per_worker, service).await?;
    Ok(server)
}

/// One open client connection: counted while the server keeps it in its extensions, which
/// it drops with the connection.
struct ConnectionCount(Arc<std::sync::atomic::AtomicUsize>);

impl ConnectionCount {
    fn open(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for ConnectionCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The internal listener: one worker is plenty for probes and scrapes.
fn internal_server(listener: TcpListener, state: web::Data<AppState>) -> anyhow::Result<Server> {
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .configure(routes::health::configure)
            .wrap_fn(routes::middleware::request_span)
    })
    .disable_signals()
    .workers(1)
    .listen(listener)?;
    Ok(server.run())
}

fn demo_agent(bot_url: &str) -> anyhow::Result<Agent> {
    let text = format!(
        "agent_name = \"{DEMO_AGENT}\"\nwebsocket_auth = \"token\"\n\n[scaling]\nmax_agents = {DEMO_MAX_SESSIONS}\n"
    );
    let mut agent = Agent::from_toml_for(&text, "built-in demo agent", Some(DEMO_ORG))?;
    agent.bots.any_region =
        Some(crate::agents::parse_bot_url(bot_url).map_err(anyhow::Error::msg)?);
    debug_assert_eq!(agent.websocket_auth, WebsocketAuth::Token);
    Ok(agent)
}

/// Agents from `agents.files` and `agents.dir` (files in its subdirectories belong to the org
/// the subdirectory is named after), each given its bots from `[bots]` unless it brings its own.
fn load_agents(settings: &Settings, agents: &mut AgentRegistry) -> anyhow::Result<()> {
    let default_org = settings.agents.org.clone();
    let mut files: Vec<(PathBuf, Option<String>)> =
        settings.agents.files.iter().map(|f| (f.clone(), default_org.clone())).collect();
    if let Some(dir) = &settings.agents.dir {
        for path in sorted_entries(dir)? {
            if path.is_dir() {
                let org = path.file_name().map(|n| n.to_string_lossy().into_owned());
                let tomls = sorted_entries(&path)?.into_iter().filter(|p| is_toml(p));
                files.extend(tomls.map(|p| (p, org.clone())));
            } else if is_toml(&path) {
                files.push((path, default_org.clone()));
            }
        }
    }
    let defaults = settings.bots.defaults();
    for (file, org) in files {
        let mut agent = Agent::from_file(&file, org.as_deref())?;
        if agent.legacy_section {
            tracing::warn!(
                file = %file.display(),
                "the [broker] section is deprecated (pcc deploy rejects such files): remove it, \
                 give bot URLs in the settings' [bots] (or deploy --bot-url) and the org by \
                 agents.org or an agents.dir/<org>/ directory"
            );
        }
        defaults.apply(&mut agent).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        agents.insert(agent).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    }
    Ok(())
}

fn is_toml(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == "toml")
}

/// The entries of `dir`, sorted, so that agents load in the same order everywhere.
fn sorted_entries(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("agents.dir: cannot read {}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    paths.sort();
    Ok(paths)
}

/// The configured signing keys, or, with none configured (validation allows that only without
/// Redis), a random key that lives as long as the process.
fn build_signing_keys(settings: &Settings) -> anyhow::Result<SigningKeys> {
    let max_lifetime = settings.token.lifetime + settings.token.clock_skew;
    if !settings.token.keys.is_empty() {
        let keys = SigningKeys::new(&settings.token.signing_key_id, &settings.token.keys)?;
        return Ok(keys.with_max_lifetime(max_lifetime));
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
    Ok(SigningKeys::new(GENERATED_KEY_ID, &keys)?.with_max_lifetime(max_lifetime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_on_redis_must_be_given_their_keys() {
        let mut settings = Settings::default();
        assert!(build_signing_keys(&settings).is_ok(), "one process may generate its own");
        settings.redis.url = Some(SecretString::from("redis://127.0.0.1:1"));
        let error = build_signing_keys(&settings).unwrap_err().to_string();
        assert!(error.contains("token.keys: required with Redis"), "{error}");
    }
}
