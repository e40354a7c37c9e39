//! Which key a request is limited under.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use crate::error::BuildError;

/// The peer's socket address, as a request extension. axum's `ConnectInfo<SocketAddr>` is read
/// as well, so with axum `into_make_service_with_connect_info::<SocketAddr>()` is all it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Finds the key of a request; `None` when it has none (see `RateLimitLayer::missing_key`).
/// Implemented for closures.
///
/// ```
/// use stanchion_ratelimit::KeyExtractor;
/// let by_tenant = |req: &http::Request<()>| {
///     req.uri().path().split('/').nth(1).map(str::to_owned)
/// };
/// let req = http::Request::builder().uri("/acme/orders").body(()).unwrap();
/// assert_eq!(by_tenant.extract(&req).as_deref(), Some("acme"));
/// ```
pub trait KeyExtractor<B>: Send + Sync + 'static {
    /// The key of `req`.
    fn extract(&self, req: &http::Request<B>) -> Option<String>;
}

impl<B, F> KeyExtractor<B> for F
where
    F: Fn(&http::Request<B>) -> Option<String> + Send + Sync + 'static,
{
    fn extract(&self, req: &http::Request<B>) -> Option<String> {
        self(req)
    }
}

/// A request header that carries a credential (an API key), as a key that is not the secret
/// itself: `key:` and 32 hexadecimal digits of an HMAC-SHA-256 of the header's value, keyed by a
/// secret of the application's.
///
/// An API key is a secret: written as it is into Redis key names and shadow-mode log lines, it
/// would be readable by anyone who can list Redis keys or read the logs. The keyed hash keeps
/// the key stable (every instance configured with the same `secret` computes the same one, so
/// limits stay shared) without revealing the credential, and without the secret nobody can
/// test guesses of credentials against the Redis key names. 128 bits of the hash are kept:
/// two credentials share a limit with a probability of about 2^-64 at four billion keys.
///
/// ```
/// use stanchion_ratelimit::{HeaderKey, KeyExtractor};
/// let key = HeaderKey::new("x-api-key", b"a secret of at least 16 bytes")?;
/// let req = http::Request::builder().header("x-api-key", "k-123").body(()).unwrap();
/// let extracted = key.extract(&req).unwrap();
/// assert!(extracted.starts_with("key:") && !extracted.contains("k-123"));
/// assert_eq!(extracted.len(), 4 + 32);
/// # Ok::<(), stanchion_ratelimit::BuildError>(())
/// ```
#[derive(Clone)]
pub struct HeaderKey {
    name: http::HeaderName,
    /// The keyed state, cloned per request (the secret is hashed once).
    mac: hmac::Hmac<sha2::Sha256>,
}

impl fmt::Debug for HeaderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret.
        f.debug_struct("HeaderKey")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The shortest secret accepted by [`HeaderKey::new`].
pub const MIN_KEY_SECRET_LEN: usize = 16;

impl HeaderKey {
    /// Uses the header `name`, hashing its values with `secret` (at least
    /// [`MIN_KEY_SECRET_LEN`] bytes; the same on every instance that shares limits, and kept
    /// as secret as the credentials themselves).
    ///
    /// # Errors
    /// [`BuildError`] for an invalid header name or a secret shorter than 16 bytes.
    pub fn new(name: &str, secret: &[u8]) -> Result<Self, BuildError> {
        use hmac::KeyInit;
        let name = http::HeaderName::from_str(name)
            .map_err(|_| BuildError::new("header name", "a valid HTTP header name", name))?;
        if secret.len() < MIN_KEY_SECRET_LEN {
            return Err(BuildError::new(
                "key secret",
                "at least 16 bytes",
                format!("{} bytes", secret.len()),
            ));
        }
        let mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret)
            .map_err(|_| BuildError::new("key secret", "a usable HMAC key", "another"))?;
        Ok(Self { name, mac })
    }
}

impl<B> KeyExtractor<B> for HeaderKey {
    fn extract(&self, req: &http::Request<B>) -> Option<String> {
        use hmac::Mac;
        use std::fmt::Write;
        let value = req.headers().get(&self.name)?.as_bytes().trim_ascii();
        if value.is_empty() {
            return None;
        }
        let mut mac = self.mac.clone();
        mac.update(value);
        let digest = mac.finalize().into_bytes();
        let mut key = String::with_capacity(4 + 32);
        key.push_str("key:");
        for byte in &digest[..16] {
            let _ = write!(key, "{byte:02x}");
        }
        Some(key)
    }
}

/// An IP network (`10.0.0.0/8`, `2001:db8::/32`, or a single address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Whether `ip` is inside this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = BuildError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BuildError::new("trusted proxy", "an IP address or CIDR network", s);
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let raw = IpAddr::from_str(addr.trim()).map_err(|_| bad())?;
        let addr = canonical(raw);
        // An IPv4 network written in IPv4-mapped IPv6 notation (`::ffff:10.0.0.0/104`, as some
        // dual-stack configurations write it) has its prefix counted over 128 bits: it is the
        // IPv4 network with the prefix minus 96.
        let mapped = raw.is_ipv6() && addr.is_ipv4();
        let max = if addr.is_ipv4() && !mapped { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if prefix > max {
            return Err(bad());
        }
        let prefix = if mapped {
            // Below /96 the network is wider than the mapped IPv4 range.
            prefix.checked_sub(96).ok_or_else(bad)?
        } else {
            prefix
        };
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Which forwarding header trusted proxies set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ProxyHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2`.
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for="[2001:db8::1]:4711"`.
    Forwarded,
}

/// The client's IP address as the key (`ip:203.0.113.7`, or `ip:2001:db8:1:2::/64` for IPv6,
/// whose clients usually own a whole /64).
///
/// Forwarding headers are believed only when the peer is a configured trusted proxy, and then
/// walked from the right: each trusted hop hands over to the address it reports, and the first
/// address that is not a trusted proxy is the client. A client cannot choose its own key by
/// sending `X-Forwarded-For`, and an unparsable entry stops the walk at the last good hop.
///
/// ```
/// use std::net::SocketAddr;
/// use stanchion_ratelimit::{ClientIp, KeyExtractor, PeerAddr};
/// let ip = ClientIp::trusting(["10.0.0.0/8"])?;
/// let mut req = http::Request::builder()
///     .header("x-forwarded-for", "198.51.100.1, 203.0.113.7")
///     .body(()).unwrap();
/// req.extensions_mut().insert(PeerAddr("10.1.2.3:443".parse::<SocketAddr>().unwrap()));
/// assert_eq!(ip.extract(&req).as_deref(), Some("ip:203.0.113.7"));
/// # Ok::<(), stanchion_ratelimit::BuildError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct ClientIp {
    trusted: Vec<IpNet>,
    header: ProxyHeader,
}

impl ClientIp {
    /// Trusts no proxy: the key is the peer address.
    pub fn direct() -> Self {
        Self::default()
    }

    /// Trusts forwarding headers from these networks (your load balancers).
    pub fn trusting<'a>(networks: impl IntoIterator<Item = &'a str>) -> Result<Self, BuildError> {
        Ok(Self {
            trusted: networks
                .into_iter()
                .map(IpNet::from_str)
                .collect::<Result<_, _>>()?,
            header: ProxyHeader::default(),
        })
    }

    /// Which header the trusted proxies set (default `X-Forwarded-For`).
    #[must_use]
    pub fn header(mut self, header: ProxyHeader) -> Self {
        self.header = header;
        self
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(ip))
    }

    /// The client address of `req`, before grouping.
    pub fn client_addr<B>(&self, req: &http::Request<B>) -> Option<IpAddr> {
        let peer = peer_addr(req)?;
        let mut client = canonical(peer.ip());
        if !self.is_trusted(client) {
            return Some(client);
        }
        let hops = match self.header {
            ProxyHeader::XForwardedFor => header_list(req, "x-forwarded-for", parse_xff_entry),
            ProxyHeader::Forwarded => header_list(req, "forwarded", parse_forwarded_element),
        };
        for hop in hops.into_iter().rev() {
            match hop {
                Some(ip) => {
                    client = canonical(ip);
                    if !self.is_trusted(client) {
                        break;
                    }
                }
                None => break,
            }
        }
        Some(client)
    }
}

impl<B> KeyExtractor<B> for ClientIp {
    fn extract(&self, req: &http::Request<B>) -> Option<String> {
        Some(match self.client_addr(req)? {
            IpAddr::V4(v4) => format!("ip:{v4}"),
            IpAddr::V6(v6) => {
                let net = Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64));
                format!("ip:{net}/64")
            }
        })
    }
}

fn peer_addr<B>(req: &http::Request<B>) -> Option<SocketAddr> {
    if let Some(PeerAddr(addr)) = req.extensions().get::<PeerAddr>() {
        return Some(*addr);
    }
    #[cfg(feature = "axum")]
    if let Some(info) = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(info.0);
    }
    None
}

/// Every element of every instance of a comma-separated header, parsed; `None` for an element
/// that does not parse (which stops the walk).
fn header_list<B>(
    req: &http::Request<B>,
    name: &str,
    parse: fn(&str) -> Option<IpAddr>,
) -> Vec<Option<IpAddr>> {
    let mut out = Vec::new();
    for value in req.headers().get_all(name) {
        match value.to_str() {
            Ok(text) => out.extend(text.split(',').map(|e| parse(e.trim()))),
            Err(_) => out.push(None),
        }
    }
    out
}

fn parse_xff_entry(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = IpAddr::from_str(entry) {
        return Some(ip);
    }
    // Some proxies append a port: "203.0.113.7:51234" or "[2001:db8::1]:51234".
    SocketAddr::from_str(entry).ok().map(|s| s.ip())
}

fn parse_forwarded_element(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("for") {
            return None;
        }
        let v = v.trim().trim_matches('"');
        let v = v
            .strip_prefix('[')
            .map_or(v, |rest| rest.split(']').next().unwrap_or(rest));
        parse_xff_entry(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(peer: &str, headers: &[(&str, &str)]) -> http::Request<()> {
        let mut b = http::Request::builder();
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let mut r = b.body(()).unwrap();
        r.extensions_mut().insert(PeerAddr(peer.parse().unwrap()));
        r
    }

    #[test]
    fn ipv4_networks_in_ipv4_mapped_notation_are_the_ipv4_networks() {
        let net: IpNet = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(net, "10.0.0.0/8".parse().unwrap());
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(net.contains("::ffff:10.9.9.9".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert_eq!(
            "::ffff:192.168.1.7".parse::<IpNet>().unwrap(),
            "192.168.1.7/32".parse().unwrap()
        );
        assert_eq!(
            "::ffff:0.0.0.0/96".parse::<IpNet>().unwrap(),
            "0.0.0.0/0".parse().unwrap()
        );
        // Out of range either way.
        for bad in [
            "::ffff:10.0.0.0/129",
            "::ffff:10.0.0.0/95",
            "10.0.0.0/33",
            "::1/129",
        ] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
        // Plain IPv6 networks keep their prefix.
        let v6: IpNet = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn untrusted_peers_cannot_choose_their_key() {
        let ip = ClientIp::trusting(["10.0.0.0/8"]).unwrap();
        let r = req("203.0.113.9:1000", &[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(ip.extract(&r).as_deref(), Some("ip:203.0.113.9"));
    }

    #[test]
    fn walks_trusted_hops_from_the_right() {
        let ip = ClientIp::trusting(["10.0.0.0/8", "192.168.0.0/16"]).unwrap();
        let r = req(
            "10.0.0.1:1",
            &[("x-forwarded-for", "6.6.6.6, 198.51.100.4, 192.168.1.1")],
        );
        // 192.168.1.1 is a trusted proxy; 198.51.100.4 is the client; 6.6.6.6 was sent by it.
        assert_eq!(ip.extract(&r).as_deref(), Some("ip:198.51.100.4"));
    }

    #[test]
    fn garbage_stops_at_the_last_good_hop() {
        let ip = ClientIp::trusting(["10.0.0.0/8"]).unwrap();
        let r = req(
            "10.0.0.1:1",
            &[("x-forwarded-for", "198.51.100.4, not-an-ip")],
        );
        assert_eq!(ip.extract(&r).as_deref(), Some("ip:10.0.0.1"));
    }

    #[test]
    fn ipv6_clients_are_grouped_by_64() {
        let ip = ClientIp::direct();
        let a = req("[2001:db8:1:2:aaaa::1]:1", &[]);
        let b = req("[2001:db8:1:2:bbbb::9]:1", &[]);
        assert_eq!(ip.extract(&a), ip.extract(&b));
        assert_eq!(ip.extract(&a).as_deref(), Some("ip:2001:db8:1:2::/64"));
    }

    #[test]
    fn parses_rfc_7239_forwarded() {
        let ip = ClientIp::trusting(["10.0.0.0/8"])
            .unwrap()
            .header(ProxyHeader::Forwarded);
        let r = req(
            "10.0.0.1:1",
            &[(
                "forwarded",
                "for=192.0.2.60;proto=http, for=\"[2001:db8::7]:4711\"",
            )],
        );
        assert_eq!(ip.extract(&r).as_deref(), Some("ip:2001:db8::/64"));
    }

    #[test]
    fn networks_parse_and_match() {
        let n: IpNet = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains("10.200.1.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.1.1".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("nonsense".parse::<IpNet>().is_err());
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
    }
}
