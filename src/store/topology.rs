//! How the broker reaches Redis: a standalone server, a master found through Sentinel, or a
//! Cluster. Each thread gets its own multiplexed connection of the right kind, created on first
//! use and driven by that thread's runtime (see `store::redis` for why).
//!
//! Failover: a standalone connection reconnects to its address by itself, and a cluster
//! connection follows slot moves and promotions by itself. A Sentinel-found master is different:
//! after a failover the old address is dead or a read-only replica, so after any error the
//! thread's connection is dropped and the next command asks the sentinels for the master again.

use std::{
    cell::RefCell,
    collections::HashMap,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind,
    IntoConnectionInfo, Pipeline, RedisError, RedisFuture, RedisResult, TlsCertificates, TlsMode,
    Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
    sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType},
};
use secrecy::ExposeSecret;

use crate::config::RedisSettings;

/// Reconnect attempts a connection makes in the background after it breaks. Requests do not
/// wait for them beyond the command timeout; they fail fast with 503 instead.
const RECONNECT_RETRIES: usize = 2;

/// Master lookups tried before a command fails, and the pause that grows between them.
const MASTER_LOOKUPS: u32 = 4;
const MASTER_LOOKUP_PAUSE: Duration = Duration::from_millis(50);

/// Distinguishes connection tables of different stores (tests run several in one process).
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This thread's connections, by (topology id, purpose).
    static CONNECTIONS: RefCell<HashMap<(u64, Purpose), Conn>> = RefCell::new(HashMap::new());
}

/// What a connection is for. Durable consumes get a connection of their own because `WAIT`
/// blocks the connection it is sent on until the replicas answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Purpose {
    Commands,
    Durable,
}

pub struct Topology {
    id: u64,
    kind: Kind,
    config: ConnectionManagerConfig,
    /// Whether the servers are reached over TLS (`rediss://`).
    tls: bool,
}

enum Kind {
    Standalone(Client),
    Sentinel(tokio::sync::Mutex<SentinelClient>),
    /// The cluster, and a client per seed node for pub/sub.
    Cluster(ClusterClient, Vec<Client>),
}

/// One thread's connection, of whichever kind the topology calls for.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Topology {
    /// Reads the topology from the settings (and the TLS files they name); connects to nothing
    /// yet.
    pub fn new(settings: &RedisSettings) -> RedisResult<Self> {
        let timeout = settings.command_timeout;
        let certs = crate::tls::redis_certificates(settings).map_err(|e| {
            RedisError::from((ErrorKind::InvalidClientConfig, "TLS settings", e.to_string()))
        })?;
        let tls = settings.url.iter().map(|url| url.expose_secret()).any(is_tls)
            || settings.sentinels.iter().chain(&settings.cluster_nodes).any(|url| is_tls(url));
        let kind = if let Some(url) = &settings.url {
            Kind::Standalone(client(url.expose_secret(), certs.as_ref())?)
        } else if !settings.sentinels.is_empty() {
            Kind::Sentinel(tokio::sync::Mutex::new(sentinel_client(settings, certs)?))
        } else {
            let mut builder = ClusterClient::builder(settings.cluster_nodes.clone())
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .tcp_settings(tcp());
            // `certs` would turn TLS on for plain nodes too: only `rediss://` nodes get them.
            if let Some(certs) = &certs
                && settings.cluster_nodes.iter().any(|url| is_tls(url))
            {
                builder = builder.certs(certs.clone());
            }
            let seeds = settings
                .cluster_nodes
                .iter()
                .map(|url| client(url, certs.as_ref()))
                .collect::<RedisResult<_>>()?;
            Kind::Cluster(builder.build()?, seeds)
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_max_delay(timeout);
        Ok(Self { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), kind, config, tls })
    }

    /// This thread's connection for `purpose`, made on first use.
    pub async fn conn(&self, purpose: Purpose) -> RedisResult<Conn> {
        let key = (self.id, purpose);
        if let Some(conn) = CONNECTIONS.with(|table| table.borrow().get(&key).cloned()) {
            return Ok(conn);
        }
        let conn = match &self.kind {
            Kind::Standalone(client) => Conn::Single(ConnectionManager::new_lazy_with_config(
                client.clone(),
                self.config.clone(),
            )?),
            Kind::Sentinel(sentinel) => {
                let master = find_master(sentinel).await?;
                Conn::Single(ConnectionManager::new_lazy_with_config(master, self.config.clone())?)
            }
            Kind::Cluster(cluster, _) => Conn::Cluster(cluster.get_async_connection().await?),
        };
        CONNECTIONS.with(|table| table.borrow_mut().insert(key, conn.clone()));
        Ok(conn)
    }

    /// Whether this is a Cluster, where one `MULTI` cannot span hash tags.
    pub fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster(..))
    }

    /// Whether any failed command should be retried on a fresh connection: under Sentinel an
    /// error may mean the master moved (a dead address, or `READONLY` from a demoted master).
    pub fn replaceable(&self) -> bool {
        matches!(self.kind, Kind::Sentinel(_))
    }

    /// Called after a command failed or timed out on this thread's connection for `purpose`.
    pub fn on_failure(&self, purpose: Purpose) {
        if let Kind::Sentinel(_) = self.kind {
            CONNECTIONS.with(|table| table.borrow_mut().remove(&(self.id, purpose)));
        }
    }

    /// Why TLS fails, if it does, on one connection made to each server a dedicated connection
    /// would use (see [`Topology::pubsub_clients`]). The command connections retry a failed
    /// connect until the command timeout hides why it failed, but a handshake that these
    /// settings can never pass must be told apart from a server that is down. `None` without
    /// TLS, and when every server answered or failed otherwise.
    pub async fn tls_failure(&self, timeout: Duration) -> Option<RedisError> {
        if !self.tls {
            return None;
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let probe = async {
            let clients = match self.pubsub_clients().await {
                Ok(clients) => clients,
                Err(e) => return crate::tls::is_tls_failure(&e).then_some(e),
            };
            for client in clients {
                match client.get_multiplexed_async_connection_with_config(&config).await {
                    Err(e) if crate::tls::is_tls_failure(&e) => return Some(e),
                    _ => {}
                }
            }
            None
        };
        tokio::time::timeout(timeout, probe).await.ok().flatten()
    }

    /// Clients to try, in order, for a dedicated pub/sub connection: the standalone server, the
    /// current master, or the cluster's seed nodes (a cluster passes messages to every node).
    pub async fn pubsub_clients(&self) -> RedisResult<Vec<Client>> {
        match &self.kind {
            Kind::Standalone(client) => Ok(vec![client.clone()]),
            Kind::Sentinel(sentinel) => Ok(vec![find_master(sentinel).await?]),
            Kind::Cluster(_, seeds) => Ok(seeds.clone()),
        }
    }
}

/// Whether a Redis URL is `rediss://` (validation refused anything unparsable).
fn is_tls(url: &str) -> bool {
    url.into_connection_info().is_ok_and(|info| tls_addr(&info))
}

fn tls_addr(info: &ConnectionInfo) -> bool {
    matches!(info.addr(), ConnectionAddr::TcpTls { .. })
}

/// A client for one server, with the settings' CA bundle and client certificate if it is
/// `rediss://`.
fn client(url: &str, certs: Option<&TlsCertificates>) -> RedisResult<Client> {
    let info = url.into_connection_info()?.set_tcp_settings(tcp());
    match certs {
        Some(certs) if is_tls(url) => Client::build_with_tls(info, certs.clone()),
        _ => Client::open(info),
    }
}

/// Every connection to Redis sends at once: a request is one small write, and with Nagle's
/// algorithm (redis-rs leaves it on) one written while the previous is unacknowledged waits for
/// the peer's delayed ACK, up to 40 ms on Linux. The far-store benchmark showed it: /start at
/// 1.25 round trips at the median, 1.9 at p99.
fn tcp() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

/// The sentinels' client. With `rediss://` sentinels the master is reached over TLS too, and
/// both sides get the settings' CA bundle and client certificate. The builder gives every
/// sentinel the same credentials: the first URL's (validation checked they are all alike).
fn sentinel_client(
    settings: &RedisSettings,
    certs: Option<TlsCertificates>,
) -> RedisResult<SentinelClient> {
    let sentinels = settings
        .sentinels
        .iter()
        .map(|url| url.as_str().into_connection_info())
        .collect::<RedisResult<Vec<_>>>()?;
    let master_name = settings.master_name.clone().unwrap_or_default();
    let addrs = sentinels.iter().map(|info| info.addr().clone());
    let mut builder = SentinelClientBuilder::new(addrs, master_name, SentinelServerType::Master)?
        .set_client_to_redis_tcp_settings(tcp())
        .set_client_to_sentinel_tcp_settings(tcp());
    if let Some(first) = sentinels.first().map(ConnectionInfo::redis_settings) {
        if let Some(username) = first.username() {
            builder = builder.set_client_to_sentinel_username(username);
        }
        if let Some(password) = first.password() {
            builder = builder.set_client_to_sentinel_password(password);
        }
    }
    if let Some(password) = &settings.master_password {
        builder = builder.set_client_to_redis_password(password.expose_secret());
    }
    if sentinels.iter().any(tls_addr) {
        builder = builder.set_client_to_redis_tls_mode(TlsMode::Secure);
        if let Some(certs) = certs {
            builder = builder
                .set_client_to_sentinel_certificates(certs.clone())
                .set_client_to_redis_certificates(certs);
        }
    }
    builder.build()
}

/// Asks the sentinels for the master. Sentinels may briefly know no valid master (during a
/// failover, or when one flags the master down for a moment), so a few lookups are tried before
/// giving up; the caller's command timeout bounds them all.
async fn find_master(sentinel: &tokio::sync::Mutex<SentinelClient>) -> RedisResult<Client> {
    let mut attempt = 1;
    loop {
        match sentinel.lock().await.async_get_client().await {
            Err(e) if attempt < MASTER_LOOKUPS => {
                tracing::debug!(error = %e, attempt, "no master from the sentinels yet");
            }
            result => return result,
        }
        tokio::time::sleep(MASTER_LOOKUP_PAUSE * attempt).await;
        attempt += 1;
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}
