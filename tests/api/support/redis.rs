//! Real Redis set-ups for the tests: a standalone server, a Sentinel group (one master, one
//! replica, three sentinels) and a three-master Cluster, each on free loopback ports, each
//! killed when dropped. Every server runs with `--save "" --appendonly no`. Each set-up also
//! comes speaking TLS only (`rediss://`), with a [`TestCa`]'s certificates, among its own
//! members as well as to clients.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use super::{output::Output, tls::TestCa, wait::wait_until};

/// How long a `redis-server` may take to say it is ready.
const READY_WITHIN: Duration = Duration::from_secs(10);

/// One `redis-server` process (a server or a sentinel), killed when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Child,
    /// What a client presents to this server, when it speaks TLS only.
    tls: Option<redis::TlsCertificates>,
}

/// How a server listens.
#[derive(Clone, Copy)]
pub enum Listen<'a> {
    Plain,
    /// TLS only, with the CA's leaf certificate, also towards its master and its peers
    /// (`tls-replication`); clients must present a certificate when `auth_clients`.
    Tls {
        ca: &'a TestCa,
        auth_clients: bool,
    },
}

impl Listen<'_> {
    /// The `redis-server` arguments that make it listen on `port` this way.
    fn args(&self, port: u16) -> Vec<String> {
        let port = port.to_string();
        let Self::Tls { ca, auth_clients } = *self else { return vec!["--port".into(), port] };
        let path = |p: &Path| p.to_str().unwrap().to_owned();
        let auth = if auth_clients { "yes" } else { "no" };
        [
            ["--port", "0"].map(String::from),
            ["--tls-port".into(), port],
            ["--tls-cert-file".into(), path(&ca.leaf.cert)],
            ["--tls-key-file".into(), path(&ca.leaf.key)],
            ["--tls-ca-cert-file".into(), path(&ca.ca_file)],
            ["--tls-auth-clients".into(), auth.into()],
            ["--tls-replication", "yes"].map(String::from),
        ]
        .concat()
    }
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    /// Starts with extra `redis-server` arguments, e.g. `["--maxmemory-policy", "allkeys-lru"]`.
    pub fn start_with(extra: &[&str]) -> Self {
        Self::spawn(free_port(), Listen::Plain, extra, None, "Ready to accept connections")
    }

    /// Starts on a given port, for tests that stop Redis and bring it back.
    pub fn start_on(port: u16) -> Self {
        Self::spawn(port, Listen::Plain, &[], None, "Ready to accept connections")
    }

    /// Starts a server that speaks TLS only (`rediss://`).
    pub fn start_tls(ca: &TestCa, auth_clients: bool) -> Self {
        let listen = Listen::Tls { ca, auth_clients };
        Self::spawn(free_port(), listen, &[], None, "Ready to accept connections")
    }

    /// Starts `redis-server` with extra arguments (a config file first, if any) in `dir`, and
    /// waits until it prints `ready` rather than polling it. Its output keeps being drained
    /// afterwards so that it never blocks on a full pipe.
    fn spawn(port: u16, listen: Listen, extra: &[&str], dir: Option<&Path>, ready: &str) -> Self {
        let listen_args = listen.args(port);
        // A dump file of its own in the temporary directory: a replica writes one on its full
        // sync, which a later server started in the same directory would load.
        let (tmp, dbfilename) =
            (std::env::temp_dir().display().to_string(), format!("session-broker-test-{port}.rdb"));
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(listen_args.iter().map(String::as_str));
        args.extend(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        if dir.is_none() {
            // Left by an earlier server on this port, it would be loaded.
            let _ = std::fs::remove_file(std::env::temp_dir().join(&dbfilename));
            args.extend(["--dir", &tmp, "--dbfilename", &dbfilename]);
        }
        let mut command = Command::new("redis-server");
        command.args(&args).stdout(Stdio::piped()).stderr(Stdio::null());
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        let mut child =
            command.spawn().expect("redis-server must be installed (apt-get install redis-server)");
        let output = Output::capture(child.stdout.take().unwrap());
        if let Err(missing) =
            output.wait_for_line(READY_WITHIN, |line| line.contains(ready).then_some(()))
        {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "redis-server on port {port} not ready ({missing:?}); it printed:\n{}",
                output.text()
            );
        }
        let tls = match listen {
            Listen::Plain => None,
            Listen::Tls { ca, .. } => Some(ca.redis_certificates()),
        };
        Self { port, child, tls }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and returns its port.
    pub fn stop(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }

    /// Freezes the server (SIGSTOP): it keeps its data and its run id but answers nothing, as
    /// when the network to it fails. [`RedisServer::resume`] thaws it.
    pub fn pause(&self) {
        // SAFETY: kill(2) with a child's pid and a signal number has no memory effects.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGSTOP) };
    }

    pub fn resume(&self) {
        // SAFETY: as in `pause`.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
    }

    /// A synchronous connection, for set-up and inspection.
    pub fn client(&self) -> redis::Connection {
        let client = match &self.tls {
            Some(certs) => redis::Client::build_with_tls(self.url(), certs.clone()),
            None => redis::Client::open(self.url()),
        };
        client.unwrap().get_connection().unwrap()
    }

    /// A store of the broker's own on this server (plain `redis://`, shipped settings), its
    /// scripts loaded and its schema recorded, for tests of the store itself.
    pub async fn store(&self) -> session_broker::store::redis::RedisStore {
        use session_broker::store::SessionStore;
        let url = Some(secrecy::SecretString::from(self.url()));
        let settings = session_broker::config::RedisSettings { url, ..Default::default() };
        let store = session_broker::store::redis::RedisStore::new(&settings).unwrap();
        store.prepare().await.unwrap();
        store
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub const MASTER_NAME: &str = "broker-master";

/// One master, one replica and three sentinels with quorum 2.
pub struct SentinelGroup {
    pub master: Option<RedisServer>,
    pub replica: RedisServer,
    pub sentinels: Vec<RedisServer>,
    _dir: tempfile::TempDir,
}

impl SentinelGroup {
    pub fn start() -> Self {
        Self::launch(Listen::Plain)
    }

    /// Every member speaks TLS only, and requires a client certificate.
    pub fn start_tls(ca: &TestCa) -> Self {
        Self::launch(Listen::Tls { ca, auth_clients: true })
    }

    fn launch(listen: Listen) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ready = "Ready to accept connections";
        let master = RedisServer::spawn(free_port(), listen, &[], None, ready);
        let replica_of = master.port.to_string();
        let replica_args = ["--replicaof", "127.0.0.1", &replica_of];
        let replica = RedisServer::spawn(free_port(), listen, &replica_args, None, ready);
        wait_until(Duration::from_secs(10), "replica in sync", || {
            let info: String =
                redis::cmd("INFO").arg("replication").query(&mut replica.client()).unwrap();
            info.contains("master_link_status:up")
        });
        let sentinels = (0..3)
            .map(|i| {
                let port = free_port();
                let conf = dir.path().join(format!("sentinel-{i}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "sentinel monitor {MASTER_NAME} 127.0.0.1 {} 2\n\
                         sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                         sentinel failover-timeout {MASTER_NAME} 5000\n\
                         sentinel parallel-syncs {MASTER_NAME} 1\n",
                        master.port
                    ),
                )
                .unwrap();
                let conf = conf.to_str().unwrap().to_owned();
                RedisServer::spawn(
                    port,
                    listen,
                    &[&conf, "--sentinel"],
                    Some(dir.path()),
                    "+monitor master",
                )
            })
            .collect::<Vec<_>>();
        let group = Self { master: Some(master), replica, sentinels, _dir: dir };
        // Failover needs every sentinel to know the replica and the other sentinels.
        for sentinel in &group.sentinels {
            wait_until(Duration::from_secs(20), "sentinels discover the group", || {
                let mut conn = sentinel.client();
                let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
                    .arg("REPLICAS")
                    .arg(MASTER_NAME)
                    .query(&mut conn)
                    .unwrap();
                let peers: Vec<redis::Value> = redis::cmd("SENTINEL")
                    .arg("SENTINELS")
                    .arg(MASTER_NAME)
                    .query(&mut conn)
                    .unwrap();
                replicas.len() == 1 && peers.len() == 2
            });
        }
        group
    }

    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(RedisServer::url).collect()
    }

    /// Kills the master without a chance to hand over; returns its port.
    pub fn kill_master(&mut self) -> u16 {
        self.master.take().unwrap().stop()
    }

    /// Brings the old master back on `port`, empty; the sentinels make it a replica of the new
    /// master. Returns once the new master counts it as a connected replica.
    pub fn rejoin_old_master(&mut self, port: u16) {
        self.master = Some(RedisServer::start_on(port));
        wait_until(Duration::from_secs(30), "the old master rejoins as a replica", || {
            let info: String =
                redis::cmd("INFO").arg("replication").query(&mut self.replica.client()).unwrap();
            info.contains("connected_slaves:1") && info.contains("state=online")
        });
    }

    /// Waits until the sentinels report the replica as the master.
    pub fn await_failover(&self) {
        let promoted = self.replica.port.to_string();
        wait_until(Duration::from_secs(30), "failover to the replica", || {
            let mut conn = self.sentinels[0].client();
            let addr: Vec<String> = redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(MASTER_NAME)
                .query(&mut conn)
                .unwrap();
            addr.get(1) == Some(&promoted)
        });
    }
}

/// Three masters, no replicas, slots spread by `redis-cli --cluster create`.
pub struct Cluster {
    pub nodes: Vec<RedisServer>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    pub fn start() -> Self {
        Self::launch(Listen::Plain)
    }

    /// Every node speaks TLS only, to clients and on the cluster bus (`tls-cluster`).
    pub fn start_tls(ca: &TestCa) -> Self {
        Self::launch(Listen::Tls { ca, auth_clients: false })
    }

    fn launch(listen: Listen) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                let port = free_port();
                let conf = format!("nodes-{port}.conf");
                // The bus port is given: the default, port + 10000, is past 65535 for a third
                // of the free ports.
                let bus = free_port().to_string();
                let mut args = vec!["--cluster-enabled", "yes", "--cluster-config-file", &conf];
                args.extend(["--cluster-port", &bus]);
                if let Listen::Tls { .. } = listen {
                    args.extend(["--tls-cluster", "yes"]);
                }
                RedisServer::spawn(
                    port,
                    listen,
                    &args,
                    Some(dir.path()),
                    "Ready to accept connections",
                )
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let mut create = Command::new("redis-cli");
        if let Listen::Tls { ca, .. } = listen {
            let path = |p: &Path| p.to_str().unwrap().to_owned();
            create.arg("--tls").args(["--cacert", &path(&ca.ca_file)]);
            create.args(["--cert", &path(&ca.leaf.cert), "--key", &path(&ca.leaf.key)]);
        }
        let created = create
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed");
        assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stdout));
        for node in &nodes {
            wait_until(Duration::from_secs(20), "cluster state ok", || {
                let info: String =
                    redis::cmd("CLUSTER").arg("INFO").query(&mut node.client()).unwrap();
                info.contains("cluster_state:ok")
            });
        }
        Self { nodes, _dir: dir }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}
