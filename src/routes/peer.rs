//! Who is asking: the client's address as far as the broker can tell, and the
//! `X-Forwarded-For` chain it hands to bots. A client's own `X-Forwarded-For` is only a claim:
//! it is believed only when the peer that sent it is a trusted proxy (`trusted_proxies`).

use std::net::IpAddr;

use actix_web::HttpRequest;
use ipnet::IpNet;

/// The client behind a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The client's address: the peer's own, or, behind trusted proxies, the nearest address
    /// in their chain that is not itself a trusted proxy.
    pub client: IpAddr,
    /// What the bot receives as `X-Forwarded-For`: the trusted chain plus the peer, or only the
    /// peer.
    pub forwarded_for: String,
}

impl Peer {
    pub fn of(req: &HttpRequest, trusted: &[IpNet]) -> Self {
        let peer = req.peer_addr().map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
        // Several header lines form one list, in order (RFC 9110 §5.3): reading only the first
        // would let a client pick its address past a proxy that appends a line of its own.
        let lines: Vec<&str> =
            req.headers().get_all("x-forwarded-for").map(|v| v.to_str().unwrap_or("?")).collect();
        let chain = (!lines.is_empty()).then(|| lines.join(", "));
        Self::resolve(peer, chain.as_deref(), trusted)
    }

    fn resolve(peer: IpAddr, chain: Option<&str>, trusted: &[IpNet]) -> Self {
        let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
        let alone = Self { client: peer, forwarded_for: peer.to_string() };
        let Some(chain) = chain.filter(|_| is_trusted(&peer)) else { return alone };
        let hops: Vec<IpAddr> = chain.split(',').map_while(|hop| hop.trim().parse().ok()).collect();
        // A chain that does not parse whole is not one our proxies wrote.
        if hops.len() != chain.split(',').count() {
            return alone;
        }
        // From the nearest hop outwards: the first that is not a proxy of ours is the client.
        let client = hops.iter().rev().find(|hop| !is_trusted(hop)).or(hops.first()).copied();
        Self { client: client.unwrap_or(peer), forwarded_for: format!("{chain}, {peer}") }
    }

    /// The rate-limit bucket of the client's address. IPv6 clients usually hold a whole /64,
    /// so they are counted by it.
    pub fn bucket(&self) -> String {
        match self.client {
            IpAddr::V4(ip) => format!("addr:{ip}"),
            IpAddr::V6(ip) => {
                let net = IpNet::new(IpAddr::V6(ip), 64).map(|n| n.trunc());
                format!("addr:{}", net.map_or(ip.to_string(), |n| n.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_stranger_s_forwarded_for_is_ignored() {
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        let peer = Peer::resolve(ip("203.0.113.9"), Some("1.2.3.4"), &trusted);
        assert_eq!(peer, Peer { client: ip("203.0.113.9"), forwarded_for: "203.0.113.9".into() });
    }

    #[test]
    fn behind_trusted_proxies_the_nearest_untrusted_hop_is_the_client() {
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        let peer = Peer::resolve(ip("10.0.0.2"), Some("6.6.6.6, 198.51.100.7, 10.0.0.1"), &trusted);
        assert_eq!(peer.client, ip("198.51.100.7"), "the spoofable left part is not believed");
        assert_eq!(peer.forwarded_for, "6.6.6.6, 198.51.100.7, 10.0.0.1, 10.0.0.2");
        let garbage = Peer::resolve(ip("10.0.0.2"), Some("nonsense, 1.2.3.4"), &trusted);
        assert_eq!(garbage.client, ip("10.0.0.2"));
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        let a = Peer::resolve(ip("2001:db8:1:2::5"), None, &[]);
        let b = Peer::resolve(ip("2001:db8:1:2:ffff::1"), None, &[]);
        assert_eq!(a.bucket(), b.bucket());
        assert_eq!(a.bucket(), "addr:2001:db8:1:2::/64");
    }
}
