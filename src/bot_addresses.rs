//! Where bots are: their host names, looked up on a timer rather than once per connect.
//!
//! Bot URLs name hosts (`ws://{agent}.{org}.bots.internal:8080/ws`, a Kubernetes service). A
//! lookup per connect would put the resolver on every session's critical path: a blocking
//! thread for `getaddrinfo`, and often DNS queries (several, under Kubernetes' `ndots:5`), which
//! cost more CPU than the rest of the dial. HAProxy and Envoy resolve on a timer too. Here a host's
//! addresses are kept for [`ADDRESS_TTL`] and then looked up again on the next connect.
//! Connects take the addresses in turn (a headless service's bots share the sessions); one that
//! refuses is dropped until the next lookup, and when all have, the host is looked up again
//! within the same dial, so a bot that moved costs its first caller a refused connect, not a
//! failed session.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use prometheus::IntCounterVec;
use tokio::net::TcpStream;

/// How long a host's addresses are dialled before they are looked up again (Envoy's default
/// DNS refresh).
pub const ADDRESS_TTL: Duration = Duration::from_secs(5);
/// Most hosts kept; past it, the stale ones go, then all of them.
const MAX_HOSTS: usize = 4096;

/// The addresses of the bot hosts this replica dials, shared by its workers.
pub struct BotAddresses {
    hosts: Mutex<HashMap<(String, u16), Entry>>,
    /// Lookups by outcome (`ok`, `failed`): how often the resolver is asked.
    lookups: IntCounterVec,
}

struct Entry {
    /// The addresses looked up, less those that have refused a connect since.
    addrs: Vec<SocketAddr>,
    looked_up: Instant,
    /// The address the next connect tries first: connects take a host's addresses in turn, as
    /// a lookup per connect spread them over a headless service's bots.
    next: usize,
}

impl BotAddresses {
    pub fn new(lookups: IntCounterVec) -> Self {
        Self { hosts: Mutex::default(), lookups }
    }

    /// Opens a TCP connection to `host:port`: to an address known for it, or, when none is or
    /// none answers, to one looked up now.
    pub async fn connect(&self, host: &str, port: u16) -> io::Result<TcpStream> {
        let key = (host.to_owned(), port);
        let known = self.next_turn(&key, Instant::now());
        let mut refused = None;
        if let Some(addrs) = &known {
            match self.connect_any(&key, addrs).await {
                Ok(tcp) => return Ok(tcp),
                Err(e) => {
                    tracing::debug!(host, port, error = %e, "known bot addresses refused; looking up again");
                    self.forget(host, port);
                    refused = Some(e);
                }
            }
        }
        let looked_up = match tokio::net::lookup_host((host, port)).await {
            Ok(addrs) => addrs.collect::<Vec<_>>(),
            Err(e) => {
                self.lookups.with_label_values(&["failed"]).inc();
                return Err(e);
            }
        };
        self.lookups.with_label_values(&["ok"]).inc();
        if let (Some(e), Some(known)) = (refused, known)
            && same_addresses(known, looked_up.clone())
        {
            // Dialling them again would only be refused again.
            return Err(e);
        }
        self.keep(key.clone(), looked_up.clone());
        let connected = self.connect_any(&key, &looked_up).await;
        if connected.is_err() {
            self.forget(host, port);
        }
        connected
    }

    /// Forgets `host:port`'s addresses: the next connect looks them up.
    pub fn forget(&self, host: &str, port: u16) {
        self.lock().remove(&(host.to_owned(), port));
    }

    /// The host's addresses, fresh, in the order this connect tries them; the next connect
    /// starts one further.
    fn next_turn(&self, key: &(String, u16), now: Instant) -> Option<Vec<SocketAddr>> {
        let mut hosts = self.lock();
        let entry = hosts.get_mut(key)?;
        if now.duration_since(entry.looked_up) >= ADDRESS_TTL || entry.addrs.is_empty() {
            return None;
        }
        let start = entry.next % entry.addrs.len();
        entry.next = start + 1;
        Some(entry.addrs[start..].iter().chain(&entry.addrs[..start]).copied().collect())
    }

    fn keep(&self, key: (String, u16), addrs: Vec<SocketAddr>) {
        let mut hosts = self.lock();
        if hosts.len() >= MAX_HOSTS {
            let now = Instant::now();
            hosts.retain(|_, entry| now.duration_since(entry.looked_up) < ADDRESS_TTL);
            if hosts.len() >= MAX_HOSTS {
                hosts.clear();
            }
        }
        hosts.insert(key, Entry { addrs, looked_up: Instant::now(), next: 1 });
    }

    /// Connects to the first of `addrs` that answers, in order, and drops those that refuse
    /// from the host's addresses (they come back with the next lookup); the last refusal when
    /// none answers.
    async fn connect_any(
        &self,
        key: &(String, u16),
        addrs: &[SocketAddr],
    ) -> io::Result<TcpStream> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(tcp) => return Ok(tcp),
                Err(e) => {
                    if let Some(entry) = self.lock().get_mut(key) {
                        entry.addrs.retain(|known| known != addr);
                    }
                    last = e;
                }
            }
        }
        Err(last)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u16), Entry>> {
        // Nothing panics while holding the lock; a poisoned map is still a valid map.
        self.hosts.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Whether two lookups gave the same addresses, in any order.
fn same_addresses(mut a: Vec<SocketAddr>, mut b: Vec<SocketAddr>) -> bool {
    a.sort_unstable();
    b.sort_unstable();
    a == b
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Opts;
    use tokio::net::TcpListener;

    fn addresses() -> BotAddresses {
        let lookups = IntCounterVec::new(Opts::new("lookups", "lookups"), &["outcome"]).unwrap();
        BotAddresses::new(lookups)
    }

    fn lookups(addresses: &BotAddresses, outcome: &str) -> u64 {
        addresses.lookups.with_label_values(&[outcome]).get()
    }

    fn known(addresses: &BotAddresses, host: &str, port: u16) -> Vec<SocketAddr> {
        let hosts = addresses.lock();
        hosts.get(&(host.to_owned(), port)).map(|entry| entry.addrs.clone()).unwrap_or_default()
    }

    #[tokio::test]
    async fn a_host_is_looked_up_once_per_ttl() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let addresses = addresses();
        addresses.connect("localhost", port).await.unwrap();
        addresses.connect("localhost", port).await.unwrap();
        assert_eq!(lookups(&addresses, "ok"), 1, "the second connect used the known addresses");
        // `localhost` may also be ::1, where nothing listens: dropped once it refused.
        let ipv4 = SocketAddr::from(([127, 0, 0, 1], port));
        assert_eq!(known(&addresses, "localhost", port), [ipv4]);
        let key = ("localhost".to_owned(), port);
        assert!(addresses.next_turn(&key, Instant::now() + ADDRESS_TTL).is_none(), "stale after");
    }

    #[tokio::test]
    async fn connects_take_a_host_s_addresses_in_turn_and_drop_one_that_refuses() {
        let (one, two) =
            (TcpListener::bind("127.0.0.1:0").await, TcpListener::bind("127.0.0.2:0").await);
        let (one, two) = (one.unwrap(), two.unwrap());
        let closed = TcpListener::bind("127.0.0.3:0").await.unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        let addresses = addresses();
        let bots = vec![one.local_addr().unwrap(), gone, two.local_addr().unwrap()];
        addresses.keep(("bots.internal".to_owned(), 8080), bots.clone());
        for _ in 0..4 {
            addresses.connect("bots.internal", 8080).await.unwrap();
        }
        let accepted = |listener: TcpListener| async move {
            let mut count = 0;
            while tokio::time::timeout(Duration::from_millis(100), listener.accept()).await.is_ok()
            {
                count += 1;
            }
            count
        };
        assert_eq!((accepted(one).await, accepted(two).await), (2, 2), "in turn");
        assert_eq!(
            known(&addresses, "bots.internal", 8080),
            [bots[0], bots[2]],
            "refused, dropped"
        );
        assert_eq!(lookups(&addresses, "ok") + lookups(&addresses, "failed"), 0);
    }

    #[tokio::test]
    async fn a_host_whose_addresses_all_refuse_is_looked_up_again() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let addresses = addresses();
        addresses.connect("localhost", port).await.unwrap();
        drop(listener);
        assert!(addresses.connect("localhost", port).await.is_err());
        assert_eq!(lookups(&addresses, "ok"), 2, "looked up again after the refusal");
        assert!(known(&addresses, "localhost", port).is_empty(), "nothing kept that refuses");
        // Back on the same port: found again.
        let _listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        addresses.connect("localhost", port).await.unwrap();
        assert_eq!(lookups(&addresses, "ok"), 3);
    }

    #[tokio::test]
    async fn a_host_that_does_not_resolve_is_counted_and_not_kept() {
        let addresses = addresses();
        assert!(addresses.connect("no-such-bot.invalid", 80).await.is_err());
        assert_eq!(lookups(&addresses, "failed"), 1);
        assert!(addresses.lock().is_empty());
    }
}
