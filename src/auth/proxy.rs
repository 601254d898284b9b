//! Trusted proxies: who the client is when Streamgate sits behind a load balancer.
//!
//! ```text
//! accept ─ peer in trusted_proxies? ─ yes ─ PROXY v1/v2 header first? ─ yes ─ its source is the peer
//!                                  │                                  └ no ── the TCP peer
//!                                  └ no ── the TCP peer (a PROXY header is then just bad HTTP)
//! request ─ client_addr middleware: walk X-Forwarded-For from the right while the hop
//!           before it is trusted; the first untrusted hop is the client ─► ClientAddr
//! ```
//!
//! Only a peer listed in `trusted_proxies` can speak for someone else: from any other peer,
//! `X-Forwarded-For` is ignored and a PROXY header is not parsed, so a client cannot spoof its
//! address. The rightmost untrusted hop (not the leftmost) is taken because every proxy
//! *appends* the address it saw; whatever a client wrote itself is further left. The result,
//! [`ClientAddr`], is what `limits.per_ip` counts and what request logs show.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use ipnet::IpNet;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tracing::Instrument;

/// The 12-byte signature that starts a PROXY protocol v2 header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// What starts a PROXY protocol v1 header.
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// Longest v1 header, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// Longest v2 address block we accept (addresses plus TLVs; haproxy sends a few dozen bytes).
const V2_MAX_LEN: usize = 4096;
/// How long to wait before peeking again when the first segment was too short to tell.
const PEEK_RETRY: Duration = Duration::from_millis(5);

/// The configured `trusted_proxies`.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

/// The client's address, as far as trusted proxies vouch for it (a request extension set by
/// [`client_addr`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

impl TrustedProxies {
    /// Parses CIDRs (`10.0.0.0/8`, `::1/128`) and single addresses (`192.0.2.7`).
    pub fn parse(list: &[String]) -> Result<TrustedProxies, String> {
        let nets = list
            .iter()
            .map(|text| {
                let text = text.trim();
                text.parse::<IpNet>()
                    .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| {
                        format!(
                            "trusted_proxies: {text:?} is not an address or a CIDR \
                             (e.g. \"10.0.0.0/8\")"
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustedProxies { nets })
    }

    /// Whether no proxy is trusted (then every peer is a client).
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Whether `ip` is a trusted proxy. An IPv4-mapped IPv6 address counts as its IPv4 one.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|net| net.contains(&ip))
    }

    /// The client behind `peer`: `peer` itself unless it is trusted, else the rightmost
    /// untrusted hop of `X-Forwarded-For` (every header line, in order). A hop that is not an
    /// address stops the walk at the trusted proxy before it; when every hop is trusted, the
    /// leftmost is the client.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = peer.to_canonical();
        if !self.trusts(client) {
            return client;
        }
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .collect();
        for hop in hops.iter().rev() {
            let Some(ip) = parse_hop(hop) else {
                return client;
            };
            client = ip.to_canonical();
            if !self.trusts(client) {
                return client;
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry: an address, optionally with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            hop.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .and_then(|h| h.parse().ok())
        })
}

/// The middleware that sets [`ClientAddr`] from the connection's peer (`ConnectInfo`, already
/// the PROXY header's source when there was one) and `X-Forwarded-For`, and runs the handler
/// in a span naming the client (the response body is not in it: streams would pay per frame).
pub async fn client_addr(
    State(trusted): State<Arc<TrustedProxies>>,
    mut request: Request,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    let Some(peer) = peer else {
        return next.run(request).await;
    };
    let client = trusted.client_ip(peer, request.headers());
    request.extensions_mut().insert(ClientAddr(client));
    let span = tracing::info_span!("request", client = %client);
    next.run(request).instrument(span).await
}

/// Reads a PROXY protocol header (v1 or v2) at the start of a connection from a trusted peer.
/// Returns the source address it names; `None` when the connection does not start with one
/// (plain HTTP), or when it names no usable address (`UNKNOWN`, `LOCAL`, a Unix socket): then
/// the TCP peer stands. Only the header's bytes are consumed. The caller bounds the wait.
pub async fn read_proxy_header(tcp: &mut TcpStream) -> std::io::Result<Option<SocketAddr>> {
    let mut start = [0u8; 16];
    loop {
        tcp.readable().await?;
        let peeked = tcp.peek(&mut start).await?;
        if peeked == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let seen = &start[..peeked];
        let v2 = seen.len() >= 16 && seen.starts_with(V2_SIGNATURE);
        let v1 = seen.len() >= V1_PREFIX.len() && seen.starts_with(V1_PREFIX);
        if v2 {
            return read_v2(tcp).await;
        }
        if v1 {
            return read_v1(tcp).await;
        }
        // Too short to tell a header from a request: wait for the rest of the segment (rare:
        // proxies send the header in one write). Anything else is not a header.
        let maybe_v2 = V2_SIGNATURE.starts_with(&seen[..seen.len().min(12)]);
        let maybe_v1 = V1_PREFIX.starts_with(&seen[..seen.len().min(V1_PREFIX.len())]);
        if (maybe_v2 && seen.len() < 16) || (maybe_v1 && seen.len() < V1_PREFIX.len()) {
            tokio::time::sleep(PEEK_RETRY).await;
            continue;
        }
        return Ok(None);
    }
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("bad PROXY header: {what}"),
    )
}

/// `PROXY TCP4 <src> <dst> <sport> <dport>\r\n`, `PROXY TCP6 …` or `PROXY UNKNOWN…\r\n`.
async fn read_v1(tcp: &mut TcpStream) -> std::io::Result<Option<SocketAddr>> {
    let mut line = Vec::with_capacity(V1_MAX);
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(invalid("v1 line longer than 107 bytes"));
        }
        line.push(tcp.read_u8().await?);
    }
    parse_v1(&line[..line.len() - 2])
}

fn parse_v1(line: &[u8]) -> std::io::Result<Option<SocketAddr>> {
    let line = std::str::from_utf8(line).map_err(|_| invalid("v1 is not text"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(None),
        [
            "PROXY",
            family @ ("TCP4" | "TCP6"),
            source,
            _destination,
            port,
            _,
        ] => {
            let ip: IpAddr = source.parse().map_err(|_| invalid("v1 source address"))?;
            if ip.is_ipv4() != (*family == "TCP4") {
                return Err(invalid("v1 address does not match its family"));
            }
            let port: u16 = port.parse().map_err(|_| invalid("v1 source port"))?;
            Ok(Some(SocketAddr::new(ip, port)))
        }
        _ => Err(invalid("v1 line is not PROXY TCP4|TCP6|UNKNOWN …")),
    }
}

/// The binary header: signature, version/command, family/protocol, length, addresses, TLVs.
async fn read_v2(tcp: &mut TcpStream) -> std::io::Result<Option<SocketAddr>> {
    let mut head = [0u8; 16];
    tcp.read_exact(&mut head).await?;
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if len > V2_MAX_LEN {
        return Err(invalid("v2 header too long"));
    }
    let mut body = vec![0u8; len];
    tcp.read_exact(&mut body).await?;
    parse_v2(head[12], head[13], &body)
}

fn parse_v2(version_command: u8, family: u8, body: &[u8]) -> std::io::Result<Option<SocketAddr>> {
    if version_command >> 4 != 2 {
        return Err(invalid("v2 version is not 2"));
    }
    match version_command & 0x0F {
        // LOCAL: the proxy's own connection (health checks): the peer stands.
        0 => return Ok(None),
        1 => {}
        _ => return Err(invalid("v2 command is neither LOCAL nor PROXY")),
    }
    match family >> 4 {
        // AF_INET: source, destination (4 bytes each), source port, destination port.
        1 => {
            let b = body
                .get(..12)
                .ok_or_else(|| invalid("v2 IPv4 block too short"))?;
            let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            let port = u16::from_be_bytes([b[8], b[9]]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port)))
        }
        // AF_INET6: the same with 16-byte addresses.
        2 => {
            let b = body
                .get(..36)
                .ok_or_else(|| invalid("v2 IPv6 block too short"))?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&b[..16]);
            let port = u16::from_be_bytes([b[32], b[33]]);
            Ok(Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(octets)),
                port,
            )))
        }
        // AF_UNSPEC or AF_UNIX: no IP address to use.
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn trusted(list: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        headers
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn parses_cidrs_and_addresses() {
        let t = trusted(&["10.0.0.0/8", "192.0.2.7", "::1/128"]);
        assert!(t.trusts(ip("10.1.2.3")));
        assert!(t.trusts(ip("192.0.2.7")));
        assert!(!t.trusts(ip("192.0.2.8")));
        assert!(t.trusts(ip("::1")));
        assert!(
            t.trusts(ip("::ffff:10.0.0.1")),
            "IPv4-mapped counts as IPv4"
        );
        let err = TrustedProxies::parse(&["10.0.0.0/33".into()]).unwrap_err();
        assert!(err.contains("10.0.0.0/33"), "{err}");
        assert!(TrustedProxies::parse(&["proxy.local".into()]).is_err());
    }

    #[test]
    fn forwarded_for_is_read_from_the_right_and_only_from_trusted_peers() {
        let t = trusted(&["10.0.0.0/8"]);
        // An untrusted peer's header is ignored entirely.
        assert_eq!(
            t.client_ip(ip("203.0.113.9"), &xff(&["1.1.1.1"])),
            ip("203.0.113.9")
        );
        // The client wrote a forged hop; the proxy appended what it saw.
        assert_eq!(
            t.client_ip(ip("10.0.0.2"), &xff(&["6.6.6.6, 198.51.100.4"])),
            ip("198.51.100.4")
        );
        // Two proxies, over two header lines.
        assert_eq!(
            t.client_ip(ip("10.0.0.2"), &xff(&["198.51.100.4", "10.9.9.9"])),
            ip("198.51.100.4")
        );
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(
            t.client_ip(ip("10.0.0.2"), &xff(&["198.51.100.4, nonsense"])),
            ip("10.0.0.2")
        );
        // No header: the proxy itself.
        assert_eq!(t.client_ip(ip("10.0.0.2"), &xff(&[])), ip("10.0.0.2"));
        // Ports and brackets.
        assert_eq!(
            t.client_ip(ip("10.0.0.2"), &xff(&["[2001:db8::1]:443"])),
            ip("2001:db8::1")
        );
        // Nothing trusted: the peer, always.
        assert_eq!(
            trusted(&[]).client_ip(ip("10.0.0.2"), &xff(&["1.1.1.1"])),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn v1_lines() {
        assert_eq!(
            parse_v1(b"PROXY TCP4 198.51.100.4 10.0.0.1 56324 443").unwrap(),
            Some("198.51.100.4:56324".parse().unwrap())
        );
        assert_eq!(
            parse_v1(b"PROXY TCP6 2001:db8::1 ::1 1 2").unwrap(),
            Some("[2001:db8::1]:1".parse().unwrap())
        );
        assert_eq!(parse_v1(b"PROXY UNKNOWN").unwrap(), None);
        assert!(parse_v1(b"PROXY TCP4 2001:db8::1 ::1 1 2").is_err());
        assert!(parse_v1(b"PROXY TCP4 1.2.3.4").is_err());
    }

    #[test]
    fn v2_blocks() {
        let mut v4 = vec![198, 51, 100, 4, 10, 0, 0, 1];
        v4.extend_from_slice(&56324u16.to_be_bytes());
        v4.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(
            parse_v2(0x21, 0x11, &v4).unwrap(),
            Some("198.51.100.4:56324".parse().unwrap())
        );
        assert_eq!(parse_v2(0x20, 0x00, &[]).unwrap(), None, "LOCAL");
        assert!(
            parse_v2(0x11, 0x11, &v4).is_err(),
            "version 1 in a v2 header"
        );
        assert!(parse_v2(0x21, 0x11, &v4[..6]).is_err());
        assert_eq!(parse_v2(0x21, 0x31, &[0; 216]).unwrap(), None, "AF_UNIX");
    }
}
