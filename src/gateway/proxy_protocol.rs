//! The PROXY protocol, versions 1 (text) and 2 (binary), as HAProxy's
//! specification defines them: a trusted L4 proxy prepends one header to the
//! connection naming the client it accepted.
//!
//! [`parse`] is pure and strict (suitable as a fuzz target): it accepts one
//! well-formed header at the start of a buffer, reports how many bytes it
//! used, asks for more when the buffer ends inside a header, and refuses
//! anything else. [`read_header`] drives it over a socket without reading a
//! byte past the header, so the TLS handshake that follows sees an untouched
//! stream.
//!
//! Whether to believe a header at all is not decided here: the listener reads
//! one only from a peer in the listener's trusted-proxy groups and refuses the
//! connection of anyone else who sends one (see `gateway::listener`).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The version 2 signature (12 bytes).
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The version 1 prefix.
pub const V1_PREFIX: &[u8] = b"PROXY ";
/// Version 1 headers are at most 107 bytes, CRLF included (the spec's bound).
pub const V1_MAX: usize = 107;
/// The largest version 2 header we accept: the 16-byte preamble plus
/// addresses and TLVs. The spec allows 64 KiB of TLVs; real proxies (AWS
/// NLB, HAProxy, Envoy) send far less, and a bound keeps a trusted but
/// misbehaving proxy from making us buffer much before TLS.
pub const V2_MAX: usize = 16 + 1024;

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The proxy relays a TCP connection from `source` (the client) to
    /// `destination` (the address the client connected to).
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// v1 `UNKNOWN`, v2 `LOCAL`, or a v2 `PROXY` of an unspecified or Unix
    /// family: no client address. The spec says to use the connection's own
    /// endpoints, so the proxy speaks for itself (e.g. its health checks).
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The buffer ends inside what may still be a valid header.
    #[error("incomplete PROXY header")]
    Incomplete,
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    #[error("PROXY header longer than {0} bytes")]
    TooLong(usize),
}

/// Parses one header at the start of `buf`; returns it and its length in
/// bytes (whatever follows belongs to the next protocol).
pub fn parse(buf: &[u8]) -> Result<(Header, usize), ParseError> {
    if buf.len() < V1_PREFIX.len().min(V2_SIGNATURE.len()) {
        // Too short to tell; but a first byte that starts neither form is
        // already an answer.
        if V1_PREFIX.starts_with(buf) || V2_SIGNATURE.starts_with(buf) {
            return Err(ParseError::Incomplete);
        }
        return Err(ParseError::NotProxy);
    }
    if buf.starts_with(V1_PREFIX) {
        parse_v1(buf)
    } else if V2_SIGNATURE.starts_with(&buf[..buf.len().min(12)]) {
        parse_v2(buf)
    } else {
        Err(ParseError::NotProxy)
    }
}

fn parse_v1(buf: &[u8]) -> Result<(Header, usize), ParseError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        return if buf.len() >= V1_MAX {
            Err(ParseError::TooLong(V1_MAX))
        } else if window.contains(&b'\n') {
            Err(ParseError::Malformed("line feed without carriage return"))
        } else {
            Err(ParseError::Incomplete)
        };
    };
    if cr + 2 > V1_MAX {
        return Err(ParseError::TooLong(V1_MAX));
    }
    match window.get(cr + 1) {
        None => return Err(ParseError::Incomplete),
        Some(b'\n') => {}
        Some(_) => return Err(ParseError::Malformed("carriage return without line feed")),
    }
    let line = &window[V1_PREFIX.len()..cr];
    let line = std::str::from_utf8(line).map_err(|_| ParseError::Malformed("not ASCII"))?;
    if !line.is_ascii() {
        return Err(ParseError::Malformed("not ASCII"));
    }
    let used = cr + 2;
    if line == "UNKNOWN" || line.starts_with("UNKNOWN ") {
        // The spec: the rest of the line is to be ignored.
        return Ok((Header::Local, used));
    }
    let fields: Vec<&str> = line.split(' ').collect();
    let [family, src, dst, sport, dport] = fields.as_slice() else {
        return Err(ParseError::Malformed(
            "expected PROXY <TCP4|TCP6> <source> <destination> <source port> <destination port>",
        ));
    };
    let (source, destination): (IpAddr, IpAddr) = match *family {
        "TCP4" => (
            IpAddr::V4(
                src.parse()
                    .map_err(|_| ParseError::Malformed("bad IPv4 source"))?,
            ),
            IpAddr::V4(
                dst.parse()
                    .map_err(|_| ParseError::Malformed("bad IPv4 destination"))?,
            ),
        ),
        "TCP6" => (
            IpAddr::V6(
                src.parse()
                    .map_err(|_| ParseError::Malformed("bad IPv6 source"))?,
            ),
            IpAddr::V6(
                dst.parse()
                    .map_err(|_| ParseError::Malformed("bad IPv6 destination"))?,
            ),
        ),
        _ => return Err(ParseError::Malformed("unknown protocol family")),
    };
    let sport = port(sport)?;
    let dport = port(dport)?;
    Ok((
        Header::Proxied {
            source: SocketAddr::new(source, sport),
            destination: SocketAddr::new(destination, dport),
        },
        used,
    ))
}

/// A decimal port, 0–65535, without sign or leading zeros.
fn port(text: &str) -> Result<u16, ParseError> {
    let bad = ParseError::Malformed("bad port");
    if text.is_empty()
        || text.len() > 5
        || !text.bytes().all(|b| b.is_ascii_digit())
        || (text.len() > 1 && text.starts_with('0'))
    {
        return Err(bad);
    }
    text.parse().map_err(|_| bad)
}

fn parse_v2(buf: &[u8]) -> Result<(Header, usize), ParseError> {
    if buf.len() < 16 {
        return Err(ParseError::Incomplete);
    }
    let version_command = buf[12];
    if version_command >> 4 != 2 {
        return Err(ParseError::Malformed("version is not 2"));
    }
    let command = version_command & 0x0f;
    if command > 1 {
        return Err(ParseError::Malformed("unknown command"));
    }
    let family = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let total = 16 + len;
    if total > V2_MAX {
        return Err(ParseError::TooLong(V2_MAX));
    }
    if buf.len() < total {
        return Err(ParseError::Incomplete);
    }
    let body = &buf[16..total];
    let (address_len, header) = match (command, family) {
        // LOCAL: the proxy's own connection (health checks); the spec says
        // to ignore the family and any address block.
        (0, _) => (len, Header::Local),
        // PROXY over TCP/IPv4.
        (1, 0x11) => {
            if body.len() < 12 {
                return Err(ParseError::Malformed(
                    "address block too short for TCP/IPv4",
                ));
            }
            let ip = |at: usize| Ipv4Addr::new(body[at], body[at + 1], body[at + 2], body[at + 3]);
            let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
            (
                12,
                Header::Proxied {
                    source: SocketAddr::new(IpAddr::V4(ip(0)), port(8)),
                    destination: SocketAddr::new(IpAddr::V4(ip(4)), port(10)),
                },
            )
        }
        // PROXY over TCP/IPv6.
        (1, 0x21) => {
            if body.len() < 36 {
                return Err(ParseError::Malformed(
                    "address block too short for TCP/IPv6",
                ));
            }
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&body[at..at + 16]);
                Ipv6Addr::from(octets)
            };
            let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
            (
                36,
                Header::Proxied {
                    source: SocketAddr::new(IpAddr::V6(ip(0)), port(32)),
                    destination: SocketAddr::new(IpAddr::V6(ip(16)), port(34)),
                },
            )
        }
        // UNSPEC, or a Unix socket: no usable address; the spec says to
        // use the connection's endpoints.
        (1, 0x00 | 0x31) => (len, Header::Local),
        (1, 0x12 | 0x22 | 0x32) => {
            return Err(ParseError::Malformed(
                "a datagram family on a stream connection",
            ))
        }
        _ => return Err(ParseError::Malformed("unknown address family")),
    };
    if command == 1 && matches!(family, 0x11 | 0x21) {
        check_tlvs(&body[address_len..])?;
    }
    Ok((header, total))
}

/// The TLVs after the addresses must tile the rest of the block exactly.
/// Their contents (ALPN, authority, CRC, vendor data) are not used.
fn check_tlvs(mut rest: &[u8]) -> Result<(), ParseError> {
    while !rest.is_empty() {
        if rest.len() < 3 {
            return Err(ParseError::Malformed("truncated TLV"));
        }
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        if rest.len() < 3 + len {
            return Err(ParseError::Malformed("TLV longer than the header"));
        }
        rest = &rest[3 + len..];
    }
    Ok(())
}

/// Why no header could be read from a connection.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error("timed out waiting for the PROXY header")]
    Timeout,
    #[error("connection closed before the PROXY header ended")]
    Closed,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads exactly one header from `stream` within `timeout`, never reading a
/// byte beyond it: v1 is read a byte at a time up to its CRLF (at most 107
/// bytes), v2 by its declared length (at most [`V2_MAX`]).
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<Header, ReadError> {
    tokio::time::timeout(timeout, read_header_inner(stream))
        .await
        .map_err(|_| ReadError::Timeout)?
}

async fn read_header_inner<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Header, ReadError> {
    let mut buf: Vec<u8> = Vec::with_capacity(64);
    loop {
        match parse(&buf) {
            Ok((header, used)) => {
                // `want` below never reads past a header's end.
                debug_assert_eq!(used, buf.len());
                return Ok(header);
            }
            Err(ParseError::Incomplete) => {}
            Err(e) => return Err(e.into()),
        }
        // How many more bytes can be read without overrunning the header.
        // The shortest v1 line ("PROXY UNKNOWN\r\n") is 15 bytes, so the
        // 6-byte prefix comes first; v1 then goes a byte at a time to its CRLF.
        let want = if buf.starts_with(V1_PREFIX) {
            1
        } else if buf.len() < V1_PREFIX.len() {
            V1_PREFIX.len() - buf.len()
        } else if buf.len() < 16 {
            16 - buf.len()
        } else {
            let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
            (16 + len).saturating_sub(buf.len()).max(1)
        };
        let start = buf.len();
        buf.resize(start + want, 0);
        let n = stream.read(&mut buf[start..]).await?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        buf.truncate(start + n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn v2_tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&src);
        body.extend_from_slice(&dst);
        body.extend_from_slice(&sport.to_be_bytes());
        body.extend_from_slice(&dport.to_be_bytes());
        v2(1, 0x11, &body)
    }

    #[test]
    fn v1_tcp4_and_tcp6() {
        let text = b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 443\r\n\x16\x03\x01";
        let (h, used) = parse(text).unwrap();
        assert_eq!(used, text.len() - 3);
        assert_eq!(
            h,
            Header::Proxied {
                source: sa("192.0.2.7:51000"),
                destination: sa("198.51.100.1:443")
            }
        );
        let text = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n";
        let (h, used) = parse(text).unwrap();
        assert_eq!(used, text.len());
        assert_eq!(
            h,
            Header::Proxied {
                source: sa("[2001:db8::1]:1"),
                destination: sa("[2001:db8::2]:65535")
            }
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap(), (Header::Local, 15));
        assert_eq!(
            parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").unwrap().0,
            Header::Local
        );
    }

    #[test]
    fn v1_refuses_malformed_lines() {
        for bad in [
            &b"PROXY TCP4 192.0.2.7 198.51.100.1 51000\r\n"[..],
            b"PROXY TCP4 192.0.2.7  198.51.100.1 51000 443\r\n",
            b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n",
            b"PROXY TCP6 192.0.2.7 2001:db8::2 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 051000 443\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 443\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 +1 443\r\n",
            b"PROXY TCP4 192.0.2.07 198.51.100.1 1 443\r\n",
            b"PROXY UDP4 192.0.2.7 198.51.100.1 1 443\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 1 443\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 1 443\rX",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 1 443 \r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(ParseError::Malformed(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(bad),
                parse(bad)
            );
        }
        let long = [b"PROXY UNKNOWN ".as_slice(), &[b'a'; 120]].concat();
        assert_eq!(parse(&long), Err(ParseError::TooLong(V1_MAX)));
    }

    #[test]
    fn incomplete_until_the_header_ends() {
        let full = b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 443\r\n";
        for cut in 1..full.len() {
            assert_eq!(
                parse(&full[..cut]),
                Err(ParseError::Incomplete),
                "cut {cut}"
            );
        }
        let full = v2_tcp4([192, 0, 2, 7], [198, 51, 100, 1], 51000, 443);
        for cut in 1..full.len() {
            assert_eq!(
                parse(&full[..cut]),
                Err(ParseError::Incomplete),
                "cut {cut}"
            );
        }
        assert!(parse(&full).is_ok());
    }

    #[test]
    fn not_proxy_is_told_apart() {
        // A TLS ClientHello.
        assert_eq!(
            parse(b"\x16\x03\x01\x02\x00\x01"),
            Err(ParseError::NotProxy)
        );
        assert_eq!(parse(b"\x16"), Err(ParseError::NotProxy));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ParseError::NotProxy));
        assert_eq!(parse(b"PROXX TCP4"), Err(ParseError::NotProxy));
    }

    #[test]
    fn v2_tcp4_tcp6_local_and_tlvs() {
        let h = v2_tcp4([192, 0, 2, 7], [198, 51, 100, 1], 51000, 443);
        let mut with_tls = h.clone();
        with_tls.extend_from_slice(b"\x16\x03");
        assert_eq!(
            parse(&with_tls).unwrap(),
            (
                Header::Proxied {
                    source: sa("192.0.2.7:51000"),
                    destination: sa("198.51.100.1:443")
                },
                h.len()
            )
        );
        let mut body = Vec::new();
        body.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&7u16.to_be_bytes());
        body.extend_from_slice(&8u16.to_be_bytes());
        // An ALPN TLV and a NOOP TLV.
        body.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2', 0x04, 0x00, 0x00]);
        assert_eq!(
            parse(&v2(1, 0x21, &body)).unwrap().0,
            Header::Proxied {
                source: sa("[2001:db8::1]:7"),
                destination: sa("[2001:db8::2]:8")
            }
        );
        assert_eq!(parse(&v2(0, 0x00, &[])).unwrap(), (Header::Local, 16));
        assert_eq!(parse(&v2(1, 0x00, &[])).unwrap().0, Header::Local);
    }

    #[test]
    fn v2_refuses_malformed_headers() {
        let good = v2_tcp4([192, 0, 2, 7], [198, 51, 100, 1], 1, 2);
        let mut version1 = good.clone();
        version1[12] = 0x11;
        let mut command = good.clone();
        command[12] = 0x22;
        let mut udp = good.clone();
        udp[13] = 0x12;
        let mut family = good.clone();
        family[13] = 0x41;
        let short = v2(1, 0x11, &[0; 8]);
        let short6 = v2(1, 0x21, &[0; 20]);
        let bad_tlv = v2(
            1,
            0x11,
            &[[0u8; 12].as_slice(), &[0x01, 0x00, 0x05, b'h']].concat(),
        );
        let cut_tlv = v2(1, 0x11, &[[0u8; 12].as_slice(), &[0x01, 0x00]].concat());
        for bad in [
            version1, command, udp, family, short, short6, bad_tlv, cut_tlv,
        ] {
            assert!(
                matches!(parse(&bad), Err(ParseError::Malformed(_))),
                "{bad:?}: {:?}",
                parse(&bad)
            );
        }
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&huge), Err(ParseError::TooLong(V2_MAX)));
    }

    /// A poor man's fuzz run: random bytes behind each signature, every
    /// truncation and single-byte corruption of valid headers. `parse` must
    /// never panic, never claim more bytes than it was given, and what it
    /// accepts must re-parse identically from exactly the bytes it used.
    #[test]
    fn parse_survives_random_and_mutated_input() {
        let mut x = 0x243f_6a88_85a3_08d3u64;
        let mut next = move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let check = |buf: &[u8]| {
            if let Ok((header, used)) = parse(buf) {
                assert!(used <= buf.len());
                assert_eq!(parse(&buf[..used]), Ok((header, used)));
            }
        };
        let seeds = [
            b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 443\r\n".to_vec(),
            b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n".to_vec(),
            v2_tcp4([192, 0, 2, 7], [198, 51, 100, 1], 1, 2),
            v2(1, 0x21, &[7u8; 40]),
        ];
        for seed in &seeds {
            for cut in 0..=seed.len() {
                check(&seed[..cut]);
            }
            for i in 0..seed.len() {
                for _ in 0..16 {
                    let mut m = seed.clone();
                    m[i] = next() as u8;
                    check(&m);
                }
            }
        }
        for _ in 0..20_000 {
            let prefix: &[u8] = match next() % 3 {
                0 => V1_PREFIX,
                1 => &V2_SIGNATURE,
                _ => b"",
            };
            let len = (next() % 200) as usize;
            let mut buf = prefix.to_vec();
            buf.extend((0..len).map(|_| next() as u8));
            check(&buf);
        }
    }

    #[tokio::test]
    async fn read_header_stops_at_the_header() {
        for header in [
            b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 443\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            v2_tcp4([192, 0, 2, 7], [198, 51, 100, 1], 1, 2),
            v2(0, 0, &[]),
        ] {
            let mut stream = [header.as_slice(), b"\x16\x03\x01rest"].concat();
            let mut reader = &stream[..];
            read_header(&mut reader, Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(reader, b"\x16\x03\x01rest", "{header:?}");
            stream.clear();
        }
    }

    #[tokio::test]
    async fn read_header_refuses_garbage_and_eof() {
        let mut reader = &b"\x16\x03\x01\x02\x00\x01\xfc\x03\x03"[..];
        assert!(matches!(
            read_header(&mut reader, Duration::from_secs(5)).await,
            Err(ReadError::Parse(ParseError::NotProxy))
        ));
        let mut reader = &b"PROXY TCP4 192.0.2.7"[..];
        assert!(matches!(
            read_header(&mut reader, Duration::from_secs(5)).await,
            Err(ReadError::Closed)
        ));
        let mut reader = &b"PRO"[..];
        assert!(matches!(
            read_header(&mut reader, Duration::from_secs(5)).await,
            Err(ReadError::Closed)
        ));
    }
}
