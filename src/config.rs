//! Typed settings: defaults, then an optional file, then `BROKER__…` environment variables, then
//! command-line overrides. Read and validated once at start-up; nothing else reads the
//! environment.
//!
//! A setting that is wrong stops the process with a message that names it, e.g.
//! `token.keys.k1: 20 bytes; at least 32 are required`.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::token::MIN_KEY_BYTES;

/// Prefix of the environment variables read as settings (`BROKER__REDIS__URL`, ...).
pub const ENV_PREFIX: &str = "BROKER";
/// Separator between a setting's path segments in an environment variable name.
pub const ENV_SEPARATOR: &str = "__";

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address the public HTTP server binds, `host:port`; port 0 picks a free one.
    pub listen: String,
    /// Address of the internal listener, which alone serves `/metrics`, `/healthz` and
    /// `/readyz`; loopback by default, so that only the host (or the pod) reaches it.
    pub internal_listen: String,
    /// Serve the built-in demo (an echo agent and the public key `pk_demo`). Refused with
    /// Redis or on a non-loopback address: it is for a laptop.
    pub demo: bool,
    /// Proxies (addresses or CIDR ranges) whose `X-Forwarded-For` is believed. From anyone else
    /// the header is ignored: the client's address is the peer's.
    #[serde(deserialize_with = "string_or_list")]
    pub trusted_proxies: Vec<String>,
    /// HTTP worker threads; 0 means one per CPU.
    pub workers: usize,
    /// Name of the region this replica serves, e.g. `us-west`.
    pub region: String,
    /// Public WebSocket base URL of each region (`wss://us-west.example.net`). When this replica's
    /// own region is missing, `ws://<bound address>` is used, which suits a laptop.
    pub regions: BTreeMap<String, RegionSettings>,
    pub redis: RedisSettings,
    pub token: TokenSettings,
    pub agents: AgentSettings,
    /// Where agents' bots listen, for agents whose deploy brought no bot URL.
    pub bots: BotSettings,
    /// Organizations and the SHA-256 hashes of their public keys.
    pub orgs: BTreeMap<String, OrgSettings>,
    /// The providers' answer webhooks: where providers call them, and each agent's credentials.
    pub telephony: TelephonySettings,
    pub limits: LimitSettings,
    pub sessions: SessionSettings,
    pub registry: RegistrySettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrySettings {
    /// How often each replica checks the shared registry (agents deployed, keys created or
    /// revoked through the CLI) for changes; a change reaches every replica within this.
    #[serde(rename = "refresh_ms", deserialize_with = "millis")]
    pub refresh: Duration,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self { refresh: Duration::from_secs(1) }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionSettings {
    pub public_ws_url: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// A standalone Redis, `redis://…`, or `rediss://…` for TLS. With none of `url`,
    /// `sentinels` and `cluster_nodes` the broker uses the embedded in-memory store (one
    /// process only).
    pub url: Option<SecretString>,
    /// Sentinels watching the master named `master_name`, `redis://host:26379` each. The broker
    /// asks them for the master, and asks again after any error, so it follows a failover. With
    /// `rediss://` sentinels, the master is reached over TLS too (Redis's `tls-replication`).
    /// The sentinels share one username and password, if any.
    #[serde(deserialize_with = "string_or_list")]
    pub sentinels: Vec<String>,
    pub master_name: Option<String>,
    /// Password of the master and replicas found through the sentinels, if they need one.
    pub master_password: Option<SecretString>,
    /// Seed nodes of a Redis Cluster, `redis://host:port` each, or `rediss://` for TLS.
    #[serde(deserialize_with = "string_or_list")]
    pub cluster_nodes: Vec<String>,
    /// PEM file of the CA certificates that sign the Redis servers' certificates (`rediss://`
    /// only). It replaces the system's roots for Redis; unset, the system's roots are used.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM certificate (chain) the broker presents to Redis servers that require one
    /// (`tls-auth-clients yes`), with its private key in `tls_client_key_file`: both or neither.
    pub tls_client_cert_file: Option<PathBuf>,
    pub tls_client_key_file: Option<PathBuf>,
    /// Prefix of every key the broker writes, so that several deployments (or tests) can share
    /// one Redis without seeing each other.
    pub key_prefix: String,
    /// Upper bound on one store operation, connection set-up included. Past it the request is
    /// answered 503 rather than left hanging.
    #[serde(rename = "command_timeout_ms", deserialize_with = "millis")]
    pub command_timeout: Duration,
    /// What a connect does when Redis cannot be asked whether its token was used: `closed`
    /// (default) refuses with 503; `open` lets it through unchecked, logged and counted.
    pub on_unavailable: FailMode,
    /// Replicas that must acknowledge a token's consume (Redis `WAIT`) before the connect goes
    /// on; 0 (default) does not wait. See README: what this does and does not guarantee.
    pub wait_replicas: u32,
    /// How long to wait for those acknowledgements before refusing with 503.
    #[serde(rename = "wait_timeout_ms", deserialize_with = "millis")]
    pub wait_timeout: Duration,
    /// What to do at start when Redis's `maxmemory-policy` may evict the broker's keys
    /// (anything but `noeviction`): an evicted consume mark is a replayable token. `refuse`
    /// (default) stops the broker; `warn` logs it loudly and goes on.
    pub on_evicting_policy: EvictionCheck,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvictionCheck {
    #[default]
    Refuse,
    Warn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    #[default]
    Closed,
    Open,
}

impl RedisSettings {
    /// Whether a Redis of any topology is configured.
    pub fn is_configured(&self) -> bool {
        self.url.is_some() || !self.sentinels.is_empty() || !self.cluster_nodes.is_empty()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenSettings {
    /// How long a minted token stays valid.
    #[serde(rename = "lifetime_secs", deserialize_with = "secs")]
    pub lifetime: Duration,
    /// Key id used to sign new tokens; must be one of `keys`.
    pub signing_key_id: String,
    /// Verification keys by id, each at least 32 bytes. Several may be listed during a rotation.
    pub keys: BTreeMap<String, SecretString>,
    /// Largest difference assumed between replicas' clocks. A token's consume mark outlives the
    /// token by this much, so that a replica whose clock runs behind cannot accept it again,
    /// and a token claiming to live longer than `lifetime_secs` plus this is refused.
    #[serde(rename = "clock_skew_ms", deserialize_with = "millis")]
    pub clock_skew: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentSettings {
    /// `pcc-deploy.toml` files, each describing one agent.
    #[serde(deserialize_with = "string_or_list")]
    pub files: Vec<PathBuf>,
    /// A directory of agent files: `*.toml` directly in it belong to `org`; those in a
    /// subdirectory belong to the org the subdirectory is named after (`dir/<org>/*.toml`).
    pub dir: Option<PathBuf>,
    /// The org of agent files that name none (Pipecat Cloud's files never do).
    pub org: Option<String>,
    /// Concurrent sessions of an agent whose file sets no `scaling.max_agents`, across all
    /// replicas. Agents without tokens are open to anyone: this keeps them capped too.
    pub default_max_agents: u32,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self { files: Vec::new(), dir: None, org: None, default_max_agents: DEFAULT_MAX_AGENTS }
    }
}

/// `[bots]`: an agent's bot URL, when its deploy brought none, and whom `wss://` bots must be
/// vouched for by. `{agent}` and `{org}` in a template are replaced by the agent's name and org.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BotSettings {
    /// For every region, e.g. `ws://{agent}.{org}.bots.internal:8080/ws`.
    pub url_template: Option<String>,
    /// Per region, over `url_template`.
    pub regions: BTreeMap<String, String>,
    /// Per agent (`"agent.org" = "ws://…"`), over every template.
    pub agents: BTreeMap<String, String>,
    /// PEM file of the CA certificates that sign the bots' certificates, for `wss://` bot URLs.
    /// It replaces the system's roots for bots; unset, the system's roots are used.
    pub tls_ca_file: Option<PathBuf>,
}

impl BotSettings {
    /// The defaults agents get their bots from (validation checked every URL).
    pub fn defaults(&self) -> crate::agents::BotDefaults {
        crate::agents::BotDefaults {
            url_template: self.url_template.clone(),
            region_templates: self.regions.clone(),
            agents: self
                .agents
                .iter()
                .filter_map(|(host, url)| {
                    Some((host.clone(), crate::agents::parse_bot_url(url).ok()?))
                })
                .collect(),
        }
    }
}

/// `[telephony]`: the answer webhooks that mint sessions for calls.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelephonySettings {
    /// The base URL providers call the webhooks at, e.g. `https://voice.example.net`. Providers
    /// sign the URL as they called it; behind a TLS-terminating load balancer the broker cannot
    /// see it, so it is configured. Without it, `https://` and the request's `Host` are assumed.
    pub public_url: Option<String>,
    /// Per agent (`"agent.org"`): the provider credentials its webhooks check, and custom
    /// parameters added to every call's body.
    pub agents: BTreeMap<String, AgentTelephony>,
}

/// One agent's provider credentials. Secrets: never logged, never shown back.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentTelephony {
    /// Twilio account Auth Token (`X-Twilio-Signature`, HMAC-SHA1).
    pub twilio_auth_token: Option<SecretString>,
    /// Telnyx account public key, base64 (`telnyx-signature-ed25519`).
    pub telnyx_public_key: Option<String>,
    /// Plivo (sub)account Auth Token (`X-Plivo-Signature-V3`).
    pub plivo_auth_token: Option<SecretString>,
    /// Exotel signs nothing: its applet URL carries this secret as its last path segment.
    pub exotel_url_secret: Option<SecretString>,
    /// Added to every call's body, beside the caller, the callee and the call id.
    pub parameters: BTreeMap<String, String>,
}

/// `agents.default_max_agents` unless set.
pub const DEFAULT_MAX_AGENTS: u32 = 50;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrgSettings {
    /// Hex SHA-256 of each public key (`session-broker hash-key pk_…` prints it), optionally
    /// prefixed `sha256:`.
    #[serde(deserialize_with = "string_or_list")]
    pub public_key_hashes: Vec<String>,
    /// Browser origins (`https://app.example.com`) allowed to call this org's public session
    /// API directly (CORS); none by default.
    #[serde(deserialize_with = "string_or_list")]
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    /// `/start` calls allowed per public key in each `start_rate_window_secs`; 0 disables.
    pub start_rate_per_key: u64,
    /// `/start` calls allowed per client address in each window, across replicas; 0 disables.
    pub start_rate_per_address: u64,
    #[serde(rename = "start_rate_window_secs", deserialize_with = "secs")]
    pub start_rate_window: Duration,
    /// Open client connections this replica serves; past it, requests get 503.
    pub max_connections: usize,
    /// Sessions this replica relays at once; past it, connects get 503 before any token is
    /// spent, so the client can try another replica.
    pub max_live_sessions: usize,
    /// Time a client has to send its request head (line and headers); then 408.
    #[serde(rename = "request_head_timeout_ms", deserialize_with = "millis")]
    pub request_head_timeout: Duration,
    /// Time a client has to send a whole `/start` body; then 408.
    #[serde(rename = "start_body_timeout_ms", deserialize_with = "millis")]
    pub start_body_timeout: Duration,
    /// Longest WebSocket query string (`?token=`, `?body=`), checked before it is parsed.
    pub max_query_bytes: usize,
    /// Largest WebSocket frame (and reassembled message) accepted from either side. The default
    /// fits voice (20 ms of audio is a few hundred bytes to a few KiB); raise it, e.g. to
    /// 1048576, for bots that send images or large JSON.
    pub max_frame_bytes: usize,
    /// How long the broker waits for the bot's WebSocket handshake before answering 503.
    #[serde(rename = "bot_connect_timeout_ms", deserialize_with = "millis")]
    pub bot_connect_timeout: Duration,
    /// Interval of the pings the broker sends to each side of a bridged session.
    #[serde(rename = "heartbeat_interval_ms", deserialize_with = "millis")]
    pub heartbeat_interval: Duration,
    /// A side from which nothing (not even a pong) arrived for this long is considered gone.
    #[serde(rename = "heartbeat_timeout_ms", deserialize_with = "millis")]
    pub heartbeat_timeout: Duration,
    /// Ceiling on every agent's `max_session_duration`.
    #[serde(rename = "max_session_secs", deserialize_with = "secs")]
    pub max_session: Duration,
    /// How long actix waits for a client to close TCP after a WebSocket close before dropping it.
    #[serde(rename = "client_disconnect_timeout_ms", deserialize_with = "millis")]
    pub client_disconnect_timeout: Duration,
    /// On SIGTERM, how long live sessions may go on before they are closed with 1001.
    #[serde(rename = "drain_deadline_secs", deserialize_with = "secs")]
    pub drain_deadline: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionSettings {
    /// How long session records are kept after they end.
    #[serde(rename = "retention_secs", deserialize_with = "secs")]
    pub retention: Duration,
    /// Lease of a live session on its concurrency slot. A replica that dies stops renewing;
    /// its slots free within one lease, its sessions are marked `replica_lost` within one lease
    /// plus one sweep interval.
    #[serde(rename = "lease_ttl_ms", deserialize_with = "millis")]
    pub lease_ttl: Duration,
    /// How often each replica looks for lapsed leases.
    #[serde(rename = "sweep_interval_ms", deserialize_with = "millis")]
    pub sweep_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// `tracing` filter directives, e.g. `info,session_broker=debug`. `RUST_LOG` wins if set.
    pub filter: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            internal_listen: "127.0.0.1:9090".into(),
            demo: false,
            trusted_proxies: Vec::new(),
            workers: 0,
            region: "local".into(),
            regions: BTreeMap::new(),
            redis: RedisSettings::default(),
            token: TokenSettings::default(),
            agents: AgentSettings::default(),
            bots: BotSettings::default(),
            orgs: BTreeMap::new(),
            telephony: TelephonySettings::default(),
            limits: LimitSettings::default(),
            sessions: SessionSettings::default(),
            registry: RegistrySettings::default(),
            log: LogSettings::default(),
        }
    }
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: None,
            sentinels: Vec::new(),
            master_name: None,
            master_password: None,
            cluster_nodes: Vec::new(),
            tls_ca_file: None,
            tls_client_cert_file: None,
            tls_client_key_file: None,
            key_prefix: "broker".into(),
            command_timeout: Duration::from_secs(1),
            on_unavailable: FailMode::Closed,
            wait_replicas: 0,
            wait_timeout: Duration::from_millis(100),
            on_evicting_policy: EvictionCheck::Refuse,
        }
    }
}

impl Default for TokenSettings {
    fn default() -> Self {
        Self {
            lifetime: Duration::from_secs(300),
            signing_key_id: String::new(),
            keys: BTreeMap::new(),
            clock_skew: Duration::from_secs(30),
        }
    }
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            start_rate_per_key: 600,
            start_rate_per_address: 120,
            start_rate_window: Duration::from_secs(60),
            max_connections: 10_000,
            max_live_sessions: 5_000,
            request_head_timeout: Duration::from_secs(5),
            start_body_timeout: Duration::from_secs(5),
            max_query_bytes: 8 * 1024,
            max_frame_bytes: 64 * 1024,
            bot_connect_timeout: Duration::from_secs(3),
            heartbeat_interval: Duration::from_secs(15),
            heartbeat_timeout: Duration::from_secs(45),
            max_session: Duration::from_secs(crate::agents::MAX_SESSION_SECS),
            client_disconnect_timeout: Duration::from_secs(1),
            drain_deadline: Duration::from_secs(60),
        }
    }
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(86_400),
            lease_ttl: Duration::from_secs(15),
            sweep_interval: Duration::from_secs(2),
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        Self { format: LogFormat::Human, filter: "info".into() }
    }
}

/// Where settings come from, in increasing precedence after the built-in defaults.
#[derive(Debug, Default)]
pub struct Sources {
    pub file: Option<PathBuf>,
    /// Environment variables to read; `None` reads the process environment.
    pub env: Option<std::collections::HashMap<String, String>>,
    /// `(setting path, value)` pairs from the command line.
    pub overrides: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl Settings {
    /// Layers the sources over the defaults and validates the result.
    pub fn load(sources: Sources) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(file) = &sources.file {
            builder = builder.add_source(config::File::from(file.as_path()).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator(ENV_SEPARATOR)
                .separator(ENV_SEPARATOR)
                .try_parsing(true)
                .source(sources.env),
        );
        for (key, value) in sources.overrides {
            builder = builder.set_override(key, value).map_err(|e| ConfigError(e.to_string()))?;
        }
        let settings: Settings = builder
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(|e| ConfigError(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what types alone cannot. Errors name the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |setting: &str, why: String| Err(ConfigError(format!("{setting}: {why}")));
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(
                "listen",
                format!("`{}` is not an address like 127.0.0.1:8080", self.listen),
            );
        }
        if self.internal_listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(
                "internal_listen",
                format!("`{}` is not an address like 127.0.0.1:9090", self.internal_listen),
            );
        }
        if let Some(bad_proxy) = self.trusted_proxies.iter().find(|p| parse_proxy(p).is_none()) {
            return bad(
                "trusted_proxies",
                format!("`{bad_proxy}` is not an IP address or CIDR range"),
            );
        }
        if self.demo && self.redis.is_configured() {
            return bad("demo", "the demo runs on the embedded store only; unset redis".into());
        }
        if self.demo
            && !self.listen.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_loopback())
        {
            return bad(
                "demo",
                format!(
                    "the demo accepts a public key anyone knows; it listens on loopback only, not {}",
                    self.listen
                ),
            );
        }
        if !crate::agents::is_valid_name(&self.region) {
            return bad("region", format!("`{}` is not a valid region name", self.region));
        }
        for (name, region) in &self.regions {
            if url::Url::parse(&region.public_ws_url)
                .map(|u| !matches!(u.scheme(), "ws" | "wss"))
                .unwrap_or(true)
            {
                return bad(
                    &format!("regions.{name}.public_ws_url"),
                    "must be a ws:// or wss:// URL".into(),
                );
            }
        }
        if let Some(url) = &self.redis.url
            && let Err(e) = redis::Client::open(url.expose_secret())
        {
            // The URL may hold a password: say what is wrong, not what it is.
            return bad("redis.url", format!("not a usable Redis URL ({:?})", e.kind()));
        }
        if self.redis.command_timeout.is_zero() {
            return bad("redis.command_timeout_ms", "must be above 0".into());
        }
        if !(1..=86_400).contains(&self.token.lifetime.as_secs()) {
            return bad("token.lifetime_secs", "must be between 1 and 86400".into());
        }
        for (id, key) in &self.token.keys {
            let len = key.expose_secret().len();
            if len < MIN_KEY_BYTES {
                return bad(
                    &format!("token.keys.{id}"),
                    format!("{len} bytes; at least {MIN_KEY_BYTES} are required"),
                );
            }
        }
        if !self.token.keys.is_empty() && !self.token.keys.contains_key(&self.token.signing_key_id)
        {
            return bad(
                "token.signing_key_id",
                format!("`{}` is not one of token.keys", self.token.signing_key_id),
            );
        }
        let r = &self.redis;
        let topologies = [r.url.is_some(), !r.sentinels.is_empty(), !r.cluster_nodes.is_empty()];
        if topologies.iter().filter(|set| **set).count() > 1 {
            return bad(
                "redis",
                "set one of redis.url, redis.sentinels and redis.cluster_nodes".into(),
            );
        }
        for (setting, urls) in
            [("redis.sentinels", &r.sentinels), ("redis.cluster_nodes", &r.cluster_nodes)]
        {
            if let Some(e) = urls.iter().find_map(|u| redis::Client::open(u.as_str()).err()) {
                return bad(setting, format!("not a usable Redis URL ({:?})", e.kind()));
            }
        }
        if !r.sentinels.is_empty() && r.master_name.as_deref().unwrap_or("").is_empty() {
            return bad("redis.master_name", "required with redis.sentinels".into());
        }
        self.validate_redis_tls()?;
        if r.wait_replicas > 0 && (r.wait_timeout.is_zero() || r.wait_timeout >= r.command_timeout)
        {
            return bad(
                "redis.wait_timeout_ms",
                "must be above 0 and below redis.command_timeout_ms when wait_replicas is set"
                    .into(),
            );
        }
        if r.wait_replicas > 0 && !r.cluster_nodes.is_empty() {
            return bad(
                "redis.wait_replicas",
                "not supported with redis.cluster_nodes (WAIT must follow the write's node)".into(),
            );
        }

        for (org, settings) in &self.orgs {
            if !crate::agents::is_valid_name(org) {
                return bad(&format!("orgs.{org}"), "not a valid organization name".into());
            }
            for origin in &settings.allowed_origins {
                let parsed = url::Url::parse(origin).ok();
                let is_origin = parsed.is_some_and(|u| {
                    matches!(u.scheme(), "http" | "https")
                        && u.host().is_some()
                        && u.path() == "/"
                        && !origin.ends_with('/')
                });
                if !is_origin {
                    return bad(
                        &format!("orgs.{org}.allowed_origins"),
                        format!("`{origin}` is not an origin like https://app.example.com"),
                    );
                }
            }
            for hash in &settings.public_key_hashes {
                if crate::api_keys::parse_api_key_hash(hash).is_none() {
                    return bad(
                        &format!("orgs.{org}.public_key_hashes"),
                        "each entry must be 64 hex digits (optionally prefixed sha256:)".into(),
                    );
                }
            }
        }
        let l = &self.limits;
        if l.start_rate_per_key > 0 && l.start_rate_window.is_zero() {
            return bad("limits.start_rate_window_secs", "must be above 0".into());
        }
        if l.max_frame_bytes < 1024 {
            return bad("limits.max_frame_bytes", "must be at least 1024".into());
        }
        for (setting, value) in [
            ("limits.max_connections", l.max_connections),
            ("limits.max_live_sessions", l.max_live_sessions),
            ("limits.max_query_bytes", l.max_query_bytes),
        ] {
            if value == 0 {
                return bad(setting, "must be above 0".into());
            }
        }
        for (setting, value) in [
            ("limits.request_head_timeout_ms", l.request_head_timeout),
            ("limits.start_body_timeout_ms", l.start_body_timeout),
        ] {
            if value.is_zero() {
                return bad(setting, "must be above 0".into());
            }
        }
        crate::tls::bot_client_config(&self.bots).map_err(|e| ConfigError(e.to_string()))?;
        let template_ok = |t: &str| {
            crate::agents::parse_bot_url(&t.replace("{agent}", "a").replace("{org}", "o"))
        };
        if let Some(Err(e)) = self.bots.url_template.as_deref().map(template_ok) {
            return bad("bots.url_template", e);
        }
        for (region, template) in &self.bots.regions {
            if !crate::agents::is_valid_name(region) {
                return bad(&format!("bots.regions.{region}"), "not a valid region name".into());
            }
            if let Err(e) = template_ok(template) {
                return bad(&format!("bots.regions.{region}"), e);
            }
        }
        for (host, url) in &self.bots.agents {
            if let Err(e) = crate::agents::parse_bot_url(url) {
                return bad(&format!("bots.agents.\"{host}\""), e);
            }
        }
        if let Some(org) = &self.agents.org
            && !crate::agents::is_valid_name(org)
        {
            return bad("agents.org", format!("`{org}` is not a valid organization name"));
        }
        if let Some(url) = &self.telephony.public_url
            && url::Url::parse(url).map(|u| !matches!(u.scheme(), "http" | "https")).unwrap_or(true)
        {
            return bad("telephony.public_url", format!("`{url}` is not an http(s) URL"));
        }
        for (host, agent) in &self.telephony.agents {
            if let Some(key) = &agent.telnyx_public_key
                && crate::telephony::signatures::telnyx_key(key).is_none()
            {
                return bad(
                    &format!("telephony.agents.\"{host}\".telnyx_public_key"),
                    "must be the base64 of a 32-byte Ed25519 public key".into(),
                );
            }
            if let Some(secret) = &agent.exotel_url_secret
                && secret.expose_secret().len() < 16
            {
                return bad(
                    &format!("telephony.agents.\"{host}\".exotel_url_secret"),
                    "must be at least 16 characters: it is the only thing that authenticates Exotel".into(),
                );
            }
        }
        if self.agents.default_max_agents == 0 {
            return bad("agents.default_max_agents", "must be above 0".into());
        }
        if l.bot_connect_timeout.is_zero() {
            return bad("limits.bot_connect_timeout_ms", "must be above 0".into());
        }
        if l.heartbeat_interval.is_zero() || l.heartbeat_timeout <= l.heartbeat_interval {
            return bad(
                "limits.heartbeat_timeout_ms",
                "must be above limits.heartbeat_interval_ms, which must be above 0".into(),
            );
        }
        if l.max_session.is_zero() {
            return bad("limits.max_session_secs", "must be above 0".into());
        }
        let s = &self.sessions;
        if s.lease_ttl < Duration::from_millis(30) {
            return bad("sessions.lease_ttl_ms", "must be at least 30".into());
        }
        if s.sweep_interval.is_zero() {
            return bad("sessions.sweep_interval_ms", "must be above 0".into());
        }
        if self.registry.refresh.is_zero() {
            return bad("registry.refresh_ms", "must be above 0".into());
        }
        Ok(())
    }

    /// `rediss://`: one scheme per topology, certificates always checked, and the files usable.
    fn validate_redis_tls(&self) -> Result<(), ConfigError> {
        let bad = |setting: &str, why: &str| Err(ConfigError(format!("{setting}: {why}")));
        let r = &self.redis;
        let (setting, urls): (&str, Vec<&str>) = match &r.url {
            Some(url) => ("redis.url", vec![url.expose_secret()]),
            None if !r.sentinels.is_empty() => {
                ("redis.sentinels", r.sentinels.iter().map(String::as_str).collect())
            }
            None => ("redis.cluster_nodes", r.cluster_nodes.iter().map(String::as_str).collect()),
        };
        let infos: Vec<redis::ConnectionInfo> = urls
            .iter()
            .filter_map(|u| redis::IntoConnectionInfo::into_connection_info(*u).ok())
            .collect();
        let tls_of = |info: &redis::ConnectionInfo| match info.addr() {
            redis::ConnectionAddr::TcpTls { insecure, .. } => Some(!insecure),
            _ => None,
        };
        let modes: Vec<Option<bool>> = infos.iter().map(tls_of).collect();
        if modes.contains(&Some(false)) {
            return bad(
                setting,
                "TLS without checking the server's certificate (#insecure) is not supported; \
                 give the CA that signs it in redis.tls_ca_file",
            );
        }
        if modes.windows(2).any(|pair| pair[0] != pair[1]) {
            return bad(setting, "mixes redis:// and rediss:// URLs; use one scheme");
        }
        if setting == "redis.sentinels"
            && infos.windows(2).any(|pair| {
                let (a, b) = (pair[0].redis_settings(), pair[1].redis_settings());
                (a.username(), a.password()) != (b.username(), b.password())
            })
        {
            return bad(setting, "every sentinel URL must carry the same username and password");
        }
        let files = [
            ("redis.tls_ca_file", &r.tls_ca_file),
            ("redis.tls_client_cert_file", &r.tls_client_cert_file),
            ("redis.tls_client_key_file", &r.tls_client_key_file),
        ];
        let uses_tls = modes.first().is_some_and(Option::is_some);
        if let Some((file_setting, _)) = files.iter().find(|(_, file)| file.is_some())
            && !uses_tls
        {
            let instead = if r.is_configured() {
                format!("{setting} is not rediss://")
            } else {
                "no Redis is configured".into()
            };
            return bad(file_setting, &format!("applies to rediss:// only, and {instead}"));
        }
        crate::tls::redis_certificates(r).map_err(|e| ConfigError(e.to_string()))?;
        Ok(())
    }

    /// True when no file names an agent and no org has keys: such a replica serves only what
    /// the shared registry holds (or, with `demo`, the demo).
    pub fn configures_nothing(&self) -> bool {
        self.agents.files.is_empty() && self.agents.dir.is_none() && self.orgs.is_empty()
    }

    /// The trusted proxies, parsed (validation checked them).
    pub fn trusted_proxy_nets(&self) -> Vec<ipnet::IpNet> {
        self.trusted_proxies.iter().filter_map(|p| parse_proxy(p)).collect()
    }
}

/// A trusted proxy: a CIDR range, or one address.
fn parse_proxy(text: &str) -> Option<ipnet::IpNet> {
    text.parse().ok().or_else(|| text.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

/// A duration given in milliseconds, as every `…_ms` setting is.
fn millis<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    u64::deserialize(deserializer).map(Duration::from_millis)
}

/// A duration given in seconds, as every `…_secs` setting is.
fn secs<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    u64::deserialize(deserializer).map(Duration::from_secs)
}

/// Accepts `["a", "b"]` or `"a,b"`, so that list settings can come from one environment variable.
fn string_or_list<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: From<String>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let items = match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(s) => {
            s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
        }
        OneOrMany::Many(v) => v,
    };
    Ok(items.into_iter().map(T::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Sources {
        Sources {
            env: Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_the_embedded_demo() {
        let s = Settings::load(env(&[])).unwrap();
        assert_eq!(s.listen, "127.0.0.1:8080");
        assert!(s.redis.url.is_none());
        assert!(s.configures_nothing() && !s.demo);
        assert_eq!(s.token.lifetime, Duration::from_secs(300));
    }

    #[test]
    fn environment_sets_nested_settings() {
        let s = Settings::load(env(&[
            ("BROKER__LISTEN", "0.0.0.0:9000"),
            ("BROKER__TOKEN__LIFETIME_SECS", "30"),
            ("BROKER__AGENTS__FILES", "a.toml, b.toml"),
        ]))
        .unwrap();
        assert_eq!(s.listen, "0.0.0.0:9000");
        assert_eq!(s.token.lifetime, Duration::from_secs(30));
        assert_eq!(s.agents.files, vec![PathBuf::from("a.toml"), PathBuf::from("b.toml")]);
    }

    /// The form deploy/kubernetes uses for keys from a Secret: the id may hold a dash.
    #[test]
    fn signing_keys_come_from_the_environment() {
        let s = Settings::load(env(&[
            ("BROKER__TOKEN__SIGNING_KEY_ID", "2026-11"),
            ("BROKER__TOKEN__KEYS__2026-11", "a-signing-key-from-a-kubernetes-secret!"),
            ("BROKER__REDIS__SENTINELS", "redis://s1:26379,redis://s2:26379"),
            ("BROKER__REDIS__MASTER_NAME", "broker"),
        ]))
        .unwrap();
        assert!(s.token.keys.contains_key("2026-11"));
        assert_eq!(s.redis.sentinels.len(), 2);
    }

    #[test]
    fn the_example_file_is_valid() {
        let file =
            Some(PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/broker.toml")));
        let s = Settings::load(Sources { file, ..env(&[]) }).unwrap();
        assert_eq!(s.region, "us-west");
        assert!(!s.configures_nothing());
        let hash = &s.orgs["my-org"].public_key_hashes[0];
        assert_eq!(
            crate::api_keys::parse_api_key_hash(hash),
            Some(crate::api_keys::hash_api_key("pk_example"))
        );
    }

    #[test]
    fn the_compose_settings_are_valid() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/compose/broker.toml");
        let s = Settings::load(Sources { file: Some(PathBuf::from(path)), ..env(&[]) }).unwrap();
        let hash = &s.orgs["demo"].public_key_hashes[0];
        assert_eq!(
            crate::api_keys::parse_api_key_hash(hash),
            Some(crate::api_keys::hash_api_key("pk_compose_demo"))
        );
        assert_eq!(s.regions.len(), 2);
    }

    #[test]
    fn errors_name_the_setting() {
        let err = |pairs: &[(&str, &str)]| Settings::load(env(pairs)).unwrap_err().to_string();
        assert!(err(&[("BROKER__LISTEN", "nowhere")]).contains("listen"));
        assert!(err(&[("BROKER__TOKEN__LIFETIME_SECS", "0")]).contains("token.lifetime_secs"));
        assert!(
            err(&[("BROKER__TOKEN__KEYS__K1", "short"), ("BROKER__TOKEN__SIGNING_KEY_ID", "k1")])
                .contains("token.keys.k1: 5 bytes")
        );
        assert!(err(&[("BROKER__REDIS__URL", "http://x")]).contains("redis.url"));
        assert!(err(&[("BROKER__NO_SUCH_SETTING", "1")]).contains("no_such_setting"));
        assert!(err(&[("BROKER__TRUSTED_PROXIES", "10.0.0.0/8, nonsense")]).contains("nonsense"));
        assert!(err(&[("BROKER__INTERNAL_LISTEN", "x")]).contains("internal_listen"));
    }

    #[test]
    fn tls_settings_are_checked_at_load() {
        let err = |pairs: &[(&str, &str)]| Settings::load(env(pairs)).unwrap_err().to_string();
        let rediss = ("BROKER__REDIS__URL", "rediss://r:6379");
        let ca = |path| ("BROKER__REDIS__TLS_CA_FILE", path);
        let plain = err(&[("BROKER__REDIS__URL", "redis://r:6379"), ca("ca.pem")]);
        assert!(plain.contains("redis.tls_ca_file: applies to rediss:// only"), "{plain}");
        let none = err(&[ca("ca.pem")]);
        assert!(none.contains("no Redis is configured"), "{none}");
        let missing = err(&[rediss, ca("/no/such/ca.pem")]);
        assert!(missing.contains("redis.tls_ca_file: cannot read /no/such/ca.pem"), "{missing}");
        let half = err(&[rediss, ("BROKER__REDIS__TLS_CLIENT_CERT_FILE", "c.pem")]);
        assert!(half.contains("set both or neither"), "{half}");
        let insecure = err(&[("BROKER__REDIS__URL", "rediss://r:6379/#insecure")]);
        assert!(insecure.contains("redis.url: TLS without checking"), "{insecure}");
        let sentinels =
            |urls| err(&[("BROKER__REDIS__SENTINELS", urls), ("BROKER__REDIS__MASTER_NAME", "m")]);
        let mixed = sentinels("redis://s1:26379, rediss://s2:26379");
        assert!(mixed.contains("redis.sentinels: mixes redis:// and rediss://"), "{mixed}");
        let credentials = sentinels("redis://:a@s1:26379, redis://:b@s2:26379");
        assert!(credentials.contains("same username and password"), "{credentials}");
        let bots = err(&[("BROKER__BOTS__TLS_CA_FILE", "/no/such/bots.pem")]);
        assert!(bots.contains("bots.tls_ca_file: cannot read"), "{bots}");
    }

    #[test]
    fn tls_files_must_hold_what_they_are_named_for() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path.to_str().unwrap().to_owned()
        };
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        let cert = write("cert.pem", params.self_signed(&key).unwrap().pem());
        let key = write("key.pem", key.serialize_pem());
        let other_key = write("other.pem", rcgen::KeyPair::generate().unwrap().serialize_pem());
        let rediss = ("BROKER__REDIS__URL", "rediss://r:6379");
        let settings = |ca: &str, key: &str| {
            Settings::load(env(&[
                rediss,
                ("BROKER__REDIS__TLS_CA_FILE", ca),
                ("BROKER__REDIS__TLS_CLIENT_CERT_FILE", &cert),
                ("BROKER__REDIS__TLS_CLIENT_KEY_FILE", key),
                ("BROKER__BOTS__TLS_CA_FILE", ca),
            ]))
            .map_err(|e| e.to_string())
        };
        let ok = settings(&cert, &key).unwrap();
        assert_eq!(ok.redis.tls_client_key_file, Some(PathBuf::from(&key)));
        assert_eq!(ok.bots.tls_ca_file, Some(PathBuf::from(&cert)));
        let not_a_ca = settings(&key, &key).unwrap_err();
        assert!(not_a_ca.contains("redis.tls_ca_file") && not_a_ca.contains("no PEM certificate"));
        let mismatched = settings(&cert, &other_key).unwrap_err();
        assert!(mismatched.contains("redis.tls_client_key_file: does not go with"), "{mismatched}");
        let no_key = settings(&cert, &cert).unwrap_err();
        assert!(
            no_key.contains("redis.tls_client_key_file") && no_key.contains("no PEM private key")
        );
    }

    #[test]
    fn the_demo_is_for_a_laptop_only() {
        let ok = Settings::load(env(&[("BROKER__DEMO", "true")])).unwrap();
        assert!(ok.demo);
        let err = |pairs: &[(&str, &str)]| Settings::load(env(pairs)).unwrap_err().to_string();
        let public = err(&[("BROKER__DEMO", "true"), ("BROKER__LISTEN", "0.0.0.0:8080")]);
        assert!(public.contains("demo") && public.contains("loopback"), "{public}");
        let shared = err(&[("BROKER__DEMO", "true"), ("BROKER__REDIS__URL", "redis://r:6379")]);
        assert!(shared.contains("demo") && shared.contains("embedded"), "{shared}");
    }
}
