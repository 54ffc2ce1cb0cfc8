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
    Client, Cmd, Pipeline, RedisFuture, RedisResult, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
    sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType},
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
    /// Reads the topology from the settings; connects to nothing yet.
    pub fn new(settings: &RedisSettings) -> RedisResult<Self> {
        let timeout = settings.command_timeout;
        let kind = if let Some(url) = &settings.url {
            Kind::Standalone(Client::open(url.expose_secret())?)
        } else if !settings.sentinels.is_empty() {
            let mut node = SentinelNodeConnectionInfo::default();
            if let Some(password) = &settings.master_password {
                let info =
                    redis::RedisConnectionInfo::default().set_password(password.expose_secret());
                node = node.set_redis_connection_info(info);
            }
            let client = SentinelClient::build(
                settings.sentinels.clone(),
                settings.master_name.clone().unwrap_or_default(),
                Some(node),
                SentinelServerType::Master,
            )?;
            Kind::Sentinel(tokio::sync::Mutex::new(client))
        } else {
            let client = ClusterClient::builder(settings.cluster_nodes.clone())
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .build()?;
            let seeds = settings
                .cluster_nodes
                .iter()
                .map(|url| Client::open(url.as_str()))
                .collect::<RedisResult<_>>()?;
            Kind::Cluster(client, seeds)
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_max_delay(timeout);
        Ok(Self { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), kind, config })
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
