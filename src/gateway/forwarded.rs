//! Who the client is, per request, when a proxy stands in between.
//!
//! The TCP peer is the only address nobody can forge. A listener may name
//! trusted proxies (`trusted_proxy_groups`) and how they pass the client on
//! (`xff_hops` or `proxy_protocol`); their word is then the *effective
//! client*, which the security groups, route-class groups and rate limits
//! judge. From any other peer, `X-Forwarded-For` is ignored (and a PROXY
//! header refuses the connection, in `gateway::listener`).
//!
//! Admin routes, crypto-officer logins and the break-glass listener never use
//! the effective client: `gateway::router` judges them by the TCP peer.
use std::net::IpAddr;

use hyper::HeaderMap;

use super::listener::ConnInfo;
use crate::config::{Forwarded, ListenerConfig};
use crate::netfilter::{self, ListenerFilter};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardedError {
    #[error("X-Forwarded-For from a trusted proxy has {found} entries; xff_hops = {hops} needs at least that many")]
    TooFewHops { found: usize, hops: u8 },
    #[error("X-Forwarded-For from a trusted proxy holds an entry that is not an IP address")]
    Malformed,
    /// The connection's client came from a PROXY header, and the proxy that
    /// sent it is no longer trusted by the current snapshot.
    #[error("the proxy that named this connection's client is no longer trusted")]
    ProxyRevoked,
}

/// The address `hops` from the right of the `X-Forwarded-For` header
/// fields (all of them, in order, as one comma-separated list). Entries left
/// of it are whatever the client sent and are never read. `Ok(None)`: no
/// header at all (the proxy speaks for itself, e.g. a health check).
pub fn client_from_xff(headers: &HeaderMap, hops: u8) -> Result<Option<IpAddr>, ForwardedError> {
    let hops = usize::from(hops.max(1));
    let mut fields = headers.get_all("x-forwarded-for").iter().peekable();
    if fields.peek().is_none() {
        return Ok(None);
    }
    // Entries from the right: the last field's last entry first.
    let mut entries: Vec<&[u8]> = Vec::new();
    for field in fields {
        entries.extend(field.as_bytes().split(|&b| b == b','));
    }
    if entries.len() < hops {
        return Err(ForwardedError::TooFewHops {
            found: entries.len(),
            hops: hops as u8,
        });
    }
    let entry = entries[entries.len() - hops];
    // The entries right of it were appended by the trusted chain too; a
    // malformed one means the chain is not what the config says.
    for e in &entries[entries.len() - hops..] {
        parse_entry(e)?;
    }
    parse_entry(entry).map(|ip| Some(netfilter::canonical(ip)))
}

/// One entry: an IP address, optionally with a port (`192.0.2.1:443`,
/// `[2001:db8::1]:443`) as some proxies append; spaces around it allowed.
fn parse_entry(entry: &[u8]) -> Result<IpAddr, ForwardedError> {
    let text = std::str::from_utf8(entry)
        .map_err(|_| ForwardedError::Malformed)?
        .trim_matches([' ', '\t']);
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(ip);
    }
    if let Ok(sa) = text.parse::<std::net::SocketAddr>() {
        return Ok(sa.ip());
    }
    text.strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .and_then(|t| t.parse::<std::net::Ipv6Addr>().ok())
        .map(IpAddr::V6)
        .ok_or(ForwardedError::Malformed)
}

/// This request's effective client: `conn.client` (the TCP peer, or what a
/// trusted proxy's PROXY header said), or, on an `xff_hops` listener and
/// only from a trusted proxy, the address its `X-Forwarded-For` names.
/// Trust is judged against the request's snapshot, so a reload that drops a
/// proxy stops its claims on kept-alive connections too.
pub fn effective_client(
    listener: &ListenerConfig,
    filter: &ListenerFilter,
    conn: &ConnInfo,
    headers: &HeaderMap,
) -> Result<IpAddr, ForwardedError> {
    if conn.proxied {
        let still = listener.forwarded == Forwarded::ProxyProtocol
            && filter.is_trusted_proxy(conn.peer, conn.port);
        return if still {
            Ok(conn.client)
        } else {
            Err(ForwardedError::ProxyRevoked)
        };
    }
    match listener.forwarded {
        Forwarded::XForwardedFor { hops } if filter.is_trusted_proxy(conn.peer, conn.port) => {
            Ok(client_from_xff(headers, hops)?.unwrap_or(conn.peer))
        }
        _ => Ok(conn.peer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(fields: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for f in fields {
            h.append("x-forwarded-for", HeaderValue::from_str(f).unwrap());
        }
        h
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn takes_the_entry_hops_from_the_right() {
        let h = headers(&["203.0.113.9, 198.51.100.7", "192.0.2.1"]);
        assert_eq!(client_from_xff(&h, 1), Ok(Some(ip("192.0.2.1"))));
        assert_eq!(client_from_xff(&h, 2), Ok(Some(ip("198.51.100.7"))));
        assert_eq!(client_from_xff(&h, 3), Ok(Some(ip("203.0.113.9"))));
        assert_eq!(
            client_from_xff(&h, 4),
            Err(ForwardedError::TooFewHops { found: 3, hops: 4 })
        );
        assert_eq!(client_from_xff(&HeaderMap::new(), 1), Ok(None));
    }

    #[test]
    fn spoofed_entries_left_of_the_hop_are_never_read() {
        // A client sent "10.0.0.1, garbage"; the proxy appended the real one.
        let h = headers(&["10.0.0.1, not-an-ip, 192.0.2.1"]);
        assert_eq!(client_from_xff(&h, 1), Ok(Some(ip("192.0.2.1"))));
    }

    #[test]
    fn entries_with_ports_brackets_and_mapped_forms() {
        let h = headers(&["[2001:db8::1]:443 , 192.0.2.1:80,[2001:db8::2], ::ffff:192.0.2.9"]);
        assert_eq!(client_from_xff(&h, 1), Ok(Some(ip("192.0.2.9"))));
        assert_eq!(client_from_xff(&h, 2), Ok(Some(ip("2001:db8::2"))));
        assert_eq!(client_from_xff(&h, 3), Ok(Some(ip("192.0.2.1"))));
        assert_eq!(client_from_xff(&h, 4), Ok(Some(ip("2001:db8::1"))));
    }

    #[test]
    fn malformed_trusted_entries_are_refused() {
        for bad in ["unknown", "", "192.0.2.1, ", "192.0.2.256", "host.example"] {
            assert_eq!(
                client_from_xff(&headers(&[bad]), 1),
                Err(ForwardedError::Malformed),
                "{bad:?}"
            );
        }
        // Within the trusted hops, every entry must be an address.
        assert_eq!(
            client_from_xff(&headers(&["192.0.2.1, junk"]), 2),
            Err(ForwardedError::Malformed)
        );
    }
}
