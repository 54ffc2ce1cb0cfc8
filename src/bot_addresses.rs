//! Where bots are: their host names, looked up on a timer rather than once per connect.
//!
//! Bot URLs name hosts (`ws://{agent}.{org}.bots.internal:8080/ws`, a Kubernetes service). A
//! lookup per connect would put the resolver on every session's critical path: a blocking
//! thread for `getaddrinfo`, and often DNS queries (several, under Kubernetes' `ndots:5`), which
//! cost more CPU than the rest of the dial. HAProxy and Envoy resolve on a timer too. Here a host's
//! addresses are kept for [`ADDRESS_TTL`] and then looked up again on the next connect; an
//! address that refuses is forgotten at once and the host looked up again within the same dial,
//! so a bot that moved costs its first caller one refused connect, not a failed session.

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
    /// In the resolver's order, except that the address that last answered comes first.
    addrs: Vec<SocketAddr>,
    looked_up: Instant,
}

impl BotAddresses {
    pub fn new(lookups: IntCounterVec) -> Self {
        Self { hosts: Mutex::default(), lookups }
    }

    /// Opens a TCP connection to `host:port`: to an address known for it, or, when none is or
    /// none answers, to one looked up now.
    pub async fn connect(&self, host: &str, port: u16) -> io::Result<TcpStream> {
        let key = (host.to_owned(), port);
        let known = self.fresh(&key, Instant::now());
        let mut refused = None;
        if let Some(addrs) = &known {
            match connect_any(addrs).await {
                Ok((tcp, at)) => {
                    self.answered(&key, at);
                    return Ok(tcp);
                }
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
        if let Some(e) = refused.filter(|_| known.as_ref() == Some(&looked_up)) {
            // The same addresses: dialling them again would only be refused again.
            return Err(e);
        }
        let (tcp, at) = connect_any(&looked_up).await?;
        let mut hosts = self.lock();
        if hosts.len() >= MAX_HOSTS {
            let now = Instant::now();
            hosts.retain(|_, entry| now.duration_since(entry.looked_up) < ADDRESS_TTL);
            if hosts.len() >= MAX_HOSTS {
                hosts.clear();
            }
        }
        let mut entry = Entry { addrs: looked_up, looked_up: Instant::now() };
        entry.addrs.swap(0, at);
        hosts.insert(key, entry);
        Ok(tcp)
    }

    /// Forgets `host:port`'s addresses: the next connect looks them up.
    pub fn forget(&self, host: &str, port: u16) {
        self.lock().remove(&(host.to_owned(), port));
    }

    fn fresh(&self, key: &(String, u16), now: Instant) -> Option<Vec<SocketAddr>> {
        let hosts = self.lock();
        let entry = hosts.get(key)?;
        (now.duration_since(entry.looked_up) < ADDRESS_TTL).then(|| entry.addrs.clone())
    }

    /// Puts the address at `at`, which answered, first: a host with an address that never
    /// answers (an IPv6 address for a bot that listens on IPv4 only) is not dialled there first
    /// on every connect.
    fn answered(&self, key: &(String, u16), at: usize) {
        if at > 0
            && let Some(entry) = self.lock().get_mut(key)
        {
            entry.addrs.swap(0, at);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u16), Entry>> {
        // Nothing panics while holding the lock; a poisoned map is still a valid map.
        self.hosts.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Connects to the first of `addrs` that answers, in order; returns which one it was, or the
/// last refusal.
async fn connect_any(addrs: &[SocketAddr]) -> io::Result<(TcpStream, usize)> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
    for (at, addr) in addrs.iter().enumerate() {
        match TcpStream::connect(addr).await {
            Ok(tcp) => return Ok((tcp, at)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Opts;

    fn addresses() -> BotAddresses {
        let lookups = IntCounterVec::new(Opts::new("lookups", "lookups"), &["outcome"]).unwrap();
        BotAddresses::new(lookups)
    }

    fn lookups(addresses: &BotAddresses, outcome: &str) -> u64 {
        addresses.lookups.with_label_values(&[outcome]).get()
    }

    #[tokio::test]
    async fn a_host_is_looked_up_once_per_ttl_and_its_answering_address_goes_first() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let addresses = addresses();
        addresses.connect("localhost", port).await.unwrap();
        addresses.connect("localhost", port).await.unwrap();
        assert_eq!(lookups(&addresses, "ok"), 1, "the second connect used the known addresses");
        let key = ("localhost".to_owned(), port);
        let first = addresses.fresh(&key, Instant::now()).unwrap()[0];
        assert_eq!(first, SocketAddr::from(([127, 0, 0, 1], port)), "the one that answers");
        assert!(addresses.fresh(&key, Instant::now() + ADDRESS_TTL).is_none(), "stale after");
    }

    #[tokio::test]
    async fn an_address_that_refuses_is_forgotten_and_the_host_looked_up_again() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let addresses = addresses();
        addresses.connect("localhost", port).await.unwrap();
        drop(listener);
        assert!(addresses.connect("localhost", port).await.is_err());
        assert_eq!(lookups(&addresses, "ok"), 2, "looked up again after the refusal");
        assert!(addresses.fresh(&("localhost".to_owned(), port), Instant::now()).is_none());
        // Back on the same port: found again.
        let _listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
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
