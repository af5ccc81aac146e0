//! Validation of the client's upgrade request, and the header set that
//! travels upstream (contract sections 4 and 6).
//!
//! This is pure code over `http` types: no I/O, so it is fuzzed and unit
//! tested directly.

use base64::Engine as _;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Version};

use crate::error::Reject;

/// What a valid upgrade request told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// The client's `Sec-WebSocket-Key`, for our `Sec-WebSocket-Accept`.
    pub key: String,
    /// Offered subprotocols, in order.
    pub protocols: Vec<String>,
    /// The normalised path (see [`normalize_path`]) and the query as
    /// requested: what goes upstream.
    pub path_and_query: String,
    /// The normalised path without `;` parameters: what routes match on.
    pub match_path: String,
}

/// Why a request path cannot be normalised safely (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("encoded slash in the path")]
    EncodedSlash,
    #[error("backslash in the path")]
    Backslash,
    #[error("encoded NUL or control character in the path")]
    Control,
    #[error("bad percent-encoding in the path")]
    BadPercent,
    #[error("dot-segments climb above the root")]
    AboveRoot,
    #[error("the path must start with /")]
    NotAbsolute,
}

impl PathError {
    /// A static reason for [`Reject::BadRequest`].
    pub fn reason(self) -> &'static str {
        match self {
            PathError::EncodedSlash => "encoded slash in the path",
            PathError::Backslash => "backslash in the path",
            PathError::Control => "encoded control character in the path",
            PathError::BadPercent => "bad percent-encoding in the path",
            PathError::AboveRoot => "dot-segments climb above the root",
            PathError::NotAbsolute => "request target must be a path",
        }
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalises a request path (without its query), contract section 7:
/// percent-encoded unreserved characters are decoded (`%61` is `a`), other
/// escapes are kept with upper-case hex digits, repeated slashes are merged
/// and dot-segments removed (RFC 3986 section 5.2.4; a segment that is `.`
/// or `..` before its `;` parameters counts as one, as servlet containers
/// read it). Refused: an encoded slash, an encoded or raw backslash, an
/// encoded NUL or control character, bad percent-encoding, and dot-segments
/// that climb above the root.
///
/// Normalising a normalised path gives it back unchanged.
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    let b = raw.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // 1. Percent-decoding of unreserved characters.
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    b.get(i + 1).copied().and_then(hex_val),
                    b.get(i + 2).copied().and_then(hex_val),
                ) else {
                    return Err(PathError::BadPercent);
                };
                let v = hi * 16 + lo;
                match v {
                    b'/' => return Err(PathError::EncodedSlash),
                    b'\\' => return Err(PathError::Backslash),
                    0..=0x1f | 0x7f => return Err(PathError::Control),
                    v if unreserved(v) => decoded.push(char::from(v)),
                    v => {
                        const HEX: &[u8; 16] = b"0123456789ABCDEF";
                        decoded.push('%');
                        decoded.push(char::from(HEX[usize::from(v >> 4)]));
                        decoded.push(char::from(HEX[usize::from(v & 15)]));
                    }
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            0..=0x1f | 0x7f => return Err(PathError::Control),
            _ => {
                // `raw` is a &str and only ASCII bytes are matched above,
                // so a multi-byte character is copied whole.
                let ch = raw
                    .get(i..)
                    .and_then(|r| r.chars().next())
                    .unwrap_or('\u{fffd}');
                decoded.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    // 2. Segments: merge empty ones, resolve dot-segments.
    let mut out: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (n, seg) in segments.iter().enumerate() {
        let name = seg.split(';').next().unwrap_or(seg);
        let is_last = n == last;
        match name {
            "." => trailing_slash = is_last,
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing_slash = is_last;
            }
            "" if seg.is_empty() => trailing_slash = is_last,
            _ => {
                out.push(seg);
                trailing_slash = false;
            }
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for seg in &out {
        path.push('/');
        path.push_str(seg);
    }
    if trailing_slash || path.is_empty() {
        path.push('/');
    }
    Ok(path)
}

/// A normalised path without the `;` parameters of its segments (for route
/// matching: `/admin;x=1` is on route `/admin`).
pub fn without_params(path: &str) -> String {
    if !path.contains(';') {
        return path.to_string();
    }
    path.split('/')
        .map(|seg| seg.split(';').next().unwrap_or(seg))
        .collect::<Vec<_>>()
        .join("/")
}

/// The route-matching form of a raw request path (the top-level route's
/// form, "", when it cannot be normalised): for metrics labels.
pub fn match_path_of(raw: &str) -> String {
    normalize_path(raw)
        .map(|p| without_params(&p))
        .unwrap_or_default()
}

fn has_token(headers: &HeaderMap, name: &str, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Checks an upgrade request. A request with no `Upgrade` header at all is a
/// plain HTTP request (426); anything else that is not a valid RFC 6455
/// opening handshake is 400, except a version other than 13 (426).
pub fn validate<B>(req: &Request<B>) -> Result<Upgrade, Reject> {
    let h = req.headers();
    if !h.contains_key(hyper::header::UPGRADE) {
        return Err(Reject::NotUpgrade);
    }
    if req.method() != Method::GET {
        return Err(Reject::BadRequest("method must be GET"));
    }
    if req.version() != Version::HTTP_11 {
        return Err(Reject::BadRequest("HTTP/1.1 required"));
    }
    if !has_token(h, "upgrade", "websocket") {
        return Err(Reject::BadRequest("Upgrade must be websocket"));
    }
    if !has_token(h, "connection", "upgrade") {
        return Err(Reject::BadRequest("Connection must include upgrade"));
    }
    let mut hosts = h.get_all(hyper::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(host), None) if valid_host(host.as_bytes()) => {}
        (Some(_), None) => return Err(Reject::BadRequest("invalid Host header")),
        _ => return Err(Reject::BadRequest("exactly one Host header required")),
    }
    // An upgrade has no body (RFC 6455 section 4.1 is a GET); one that
    // announces a body would leave bytes for the backend to read as frames.
    if h.contains_key(hyper::header::TRANSFER_ENCODING) {
        return Err(Reject::BadRequest(
            "an upgrade request must not carry a body",
        ));
    }
    for v in h.get_all(hyper::header::CONTENT_LENGTH) {
        if v.as_bytes() != b"0" {
            return Err(Reject::BadRequest(
                "an upgrade request must not carry a body",
            ));
        }
    }
    let mut versions = h.get_all(hyper::header::SEC_WEBSOCKET_VERSION).iter();
    match (versions.next(), versions.next()) {
        (None, _) => return Err(Reject::BadRequest("Sec-WebSocket-Version missing")),
        (Some(v), None) if v.as_bytes() == b"13" => {}
        _ => return Err(Reject::Version),
    }
    let mut keys = h.get_all(hyper::header::SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(k), None) => k,
        _ => return Err(Reject::BadRequest("exactly one Sec-WebSocket-Key required")),
    };
    let key = key
        .to_str()
        .map_err(|_| Reject::BadRequest("Sec-WebSocket-Key is not ASCII"))?
        .trim();
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(raw) if raw.len() == 16 => {}
        _ => {
            return Err(Reject::BadRequest(
                "Sec-WebSocket-Key must be 16 bytes in base64",
            ))
        }
    }
    let mut protocols = Vec::new();
    for v in h.get_all(hyper::header::SEC_WEBSOCKET_PROTOCOL) {
        let v = v
            .to_str()
            .map_err(|_| Reject::BadRequest("Sec-WebSocket-Protocol is not ASCII"))?;
        for p in v.split(',') {
            let p = p.trim();
            if p.is_empty() || !p.bytes().all(is_tchar) {
                return Err(Reject::BadRequest("invalid subprotocol token"));
            }
            protocols.push(p.to_string());
        }
    }
    let raw = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| p.starts_with('/'))
        .ok_or(Reject::BadRequest("request target must be a path"))?;
    let (raw_path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (raw, None),
    };
    let path = normalize_path(raw_path).map_err(|e| Reject::BadRequest(e.reason()))?;
    let match_path = without_params(&path);
    let mut path_and_query = path;
    if let Some(q) = query {
        path_and_query.push('?');
        path_and_query.push_str(q);
    }
    Ok(Upgrade {
        key: key.to_string(),
        protocols,
        path_and_query,
        match_path,
    })
}

/// `Host` as nginx accepts it: a host name or IPv4 address (letters,
/// digits, `-`, `.`, `_`, `~`) or a bracketed IPv6 address, and an optional
/// numeric port. No control characters, spaces, `@`, `/`, `\` or non-ASCII
/// bytes (hyper lets some of those through).
pub fn valid_host(v: &[u8]) -> bool {
    let port = if let Some(rest) = v.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let (inner, after) = rest.split_at(end);
        if inner.is_empty()
            || !inner
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return false;
        }
        after.get(1..).unwrap_or_default()
    } else {
        let end = v.iter().position(|&b| b == b':').unwrap_or(v.len());
        let (host, port) = v.split_at(end);
        if host.is_empty()
            || !host
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
        {
            return false;
        }
        port
    };
    match port.strip_prefix(b":") {
        None => port.is_empty(),
        Some(p) => !p.is_empty() && p.len() <= 5 && p.iter().all(u8::is_ascii_digit),
    }
}

/// Watches the bytes of a request head for a bare LF line ending (an LF
/// not preceded by CR). hyper's parser accepts them; nginx refuses them,
/// and a front proxy that reads the head differently from wsguard could be
/// used to smuggle a header past it. Stops looking at the end of the head
/// (`\r\n\r\n`), so WebSocket frames are never scanned.
#[derive(Debug, Default, Clone)]
pub struct HeadScan {
    /// The last two bytes seen (CR/LF tracking).
    prev: [u8; 2],
    /// Whether a bare LF was seen.
    pub bare_lf: bool,
    /// The head is over (or already refused): nothing more to look at.
    pub done: bool,
}

impl HeadScan {
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.done {
                return;
            }
            if b == b'\n' {
                if self.prev[1] != b'\r' {
                    self.bare_lf = true;
                    self.done = true;
                } else if self.prev == [b'\n', b'\r'] {
                    self.done = true;
                }
            }
            self.prev = [self.prev[1], b];
        }
    }
}

/// RFC 7230 token characters (subprotocol names are tokens).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Headers never forwarded: hop-by-hop ones (RFC 7230 6.1), the handshake
/// headers wsguard regenerates for its own hop, and the ones it sets itself
/// (a client copy of those is dropped so it cannot forge them).
pub const DROP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-protocol",
    "sec-websocket-accept",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-request-id",
    "forwarded",
    "x-real-ip",
    "content-length",
];

/// Context for building the upstream request.
pub struct Forwarding<'a> {
    /// The client IP as wsguard determined it.
    pub client_ip: std::net::IpAddr,
    /// True when the immediate peer is a trusted proxy: its
    /// `X-Forwarded-For` list is kept and extended, its `X-Request-Id` kept.
    pub peer_trusted: bool,
    pub peer_ip: std::net::IpAddr,
    pub tls: bool,
    pub request_id: &'a str,
    /// Every header wsguard can assert anywhere in the policy (all routes'
    /// `forward_claims` targets, the mTLS subject header): a client copy is
    /// never forwarded, whatever the route enables.
    pub asserted: &'a [HeaderName],
}

/// Whether a client header may travel upstream: not hop-by-hop (nor named
/// in the client's `Connection`), not one wsguard asserts, and no `_` in
/// its name (WSGI, PHP and Rack read `X_Auth_Subject` as `X-Auth-Subject`).
fn forwardable(name: &HeaderName, listed: &[String], asserted: &[HeaderName]) -> bool {
    let n = name.as_str();
    !DROP.contains(&n)
        && !n.contains('_')
        && !listed.iter().any(|l| l == n)
        && !asserted.contains(name)
}

/// The end-to-end headers to send upstream, in order, plus the ones wsguard
/// adds (`X-Forwarded-For`, `X-Forwarded-Proto`, `X-Request-Id`). The
/// client's headers are filtered first, so nothing the client lists in
/// `Connection` can remove a header wsguard sets; the caller appends the
/// claim and client-certificate headers after this. The handshake headers
/// themselves are written by the dialer.
pub fn upstream_headers(
    client: &HeaderMap,
    fwd: &Forwarding<'_>,
) -> Vec<(HeaderName, HeaderValue)> {
    // Headers the client listed in Connection are hop-by-hop too.
    let listed: Vec<String> = client
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut out: Vec<(HeaderName, HeaderValue)> = client
        .iter()
        .filter(|(n, _)| forwardable(n, &listed, fwd.asserted))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    let xff = if fwd.peer_trusted {
        let prior: Vec<&str> = client
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if prior.is_empty() {
            fwd.peer_ip.to_string()
        } else {
            format!("{}, {}", prior.join(", "), fwd.peer_ip)
        }
    } else {
        fwd.client_ip.to_string()
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        out.push((HeaderName::from_static("x-forwarded-for"), v));
    }
    // A trusted TLS-terminating proxy in front knows the real scheme.
    let proto = match client.get("x-forwarded-proto").map(|v| v.as_bytes()) {
        Some(b"https") if fwd.peer_trusted => "https",
        Some(b"http") if fwd.peer_trusted => "http",
        _ if fwd.tls => "https",
        _ => "http",
    };
    out.push((
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(proto),
    ));
    if let Ok(v) = HeaderValue::from_str(fwd.request_id) {
        out.push((HeaderName::from_static("x-request-id"), v));
    }
    out
}

/// The request id to use: a trusted peer's `X-Request-Id` if it is sane,
/// else a fresh random one.
pub fn request_id(client: &HeaderMap, peer_trusted: bool) -> String {
    if peer_trusted {
        if let Some(v) = client.get("x-request-id").and_then(|v| v.to_str().ok()) {
            if !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()) {
                return v.to_string();
            }
        }
    }
    let n: u128 = rand::random();
    format!("{n:032x}")
}

/// The query string is where tokens travel; logs only ever see the path.
pub fn redacted(path_and_query: &str) -> &str {
    path_and_query.split('?').next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(
        f: impl FnOnce(hyper::http::request::Builder) -> hyper::http::request::Builder,
    ) -> Request<()> {
        let b = Request::builder()
            .uri("/chat?room=1")
            .header("host", "example.com")
            .header("upgrade", "websocket")
            .header("connection", "keep-alive, Upgrade")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
        f(b).body(()).unwrap()
    }

    #[test]
    fn valid_upgrade() {
        let u = validate(&req(|b| {
            b.header("sec-websocket-protocol", "chat, v2.json")
        }))
        .unwrap();
        assert_eq!(u.protocols, vec!["chat", "v2.json"]);
        assert_eq!(u.path_and_query, "/chat?room=1");
    }

    #[test]
    fn statuses() {
        let status = |r: Request<()>| validate(&r).map(|_| ()).unwrap_err().status().as_u16();
        let plain = Request::builder()
            .uri("/")
            .header("host", "x")
            .body(())
            .unwrap();
        assert_eq!(status(plain), 426);
        assert_eq!(status(req(|b| b.method("POST"))), 400);
        assert_eq!(status(req(|b| b.version(Version::HTTP_10))), 400);
        let mut r = req(|b| b);
        r.headers_mut()
            .insert("upgrade", HeaderValue::from_static("h2c"));
        assert_eq!(status(r), 400);
        let mut r = req(|b| b);
        r.headers_mut()
            .insert("connection", HeaderValue::from_static("close"));
        assert_eq!(status(r), 400);
        let mut r = req(|b| b);
        r.headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("8"));
        assert_eq!(status(r), 426);
        let mut r = req(|b| b);
        r.headers_mut()
            .insert("sec-websocket-key", HeaderValue::from_static("c2hvcnQ="));
        assert_eq!(status(r), 400);
        let mut r = req(|b| b);
        r.headers_mut().remove("sec-websocket-key");
        assert_eq!(status(r), 400);
        assert_eq!(status(req(|b| b.header("host", "evil.example"))), 400);
        assert_eq!(
            status(req(|b| b.header("sec-websocket-protocol", "a b"))),
            400
        );
    }

    #[test]
    fn forwarded_headers_replace_client_copies() {
        let r = req(|b| {
            b.header("x-forwarded-for", "6.6.6.6")
                .header("x-request-id", "forged")
                .header("cookie", "a=1")
                .header("x-custom", "keep")
                .header("x-auth-subject", "root")
                .header("x_auth_subject", "root")
                .header("x-forwarded-host", "evil")
                .header("connection", "x-secret, x-request-id, x-forwarded-for")
                .header("x-secret", "hop")
                .header("sec-websocket-extensions", "permessage-deflate")
        });
        let fwd = Forwarding {
            client_ip: "1.2.3.4".parse().unwrap(),
            peer_trusted: false,
            peer_ip: "1.2.3.4".parse().unwrap(),
            tls: false,
            request_id: "abc",
            asserted: &[HeaderName::from_static("x-auth-subject")],
        };
        let h = upstream_headers(r.headers(), &fwd);
        let get = |n: &str| -> Vec<&str> {
            h.iter()
                .filter(|(k, _)| k == n)
                .map(|(_, v)| v.to_str().unwrap())
                .collect()
        };
        assert_eq!(get("x-forwarded-for"), vec!["1.2.3.4"]);
        assert_eq!(get("x-request-id"), vec!["abc"]);
        assert_eq!(get("x-forwarded-proto"), vec!["http"]);
        assert_eq!(get("cookie"), vec!["a=1"]);
        assert_eq!(get("x-custom"), vec!["keep"]);
        assert_eq!(get("host"), vec!["example.com"]);
        assert!(get("x-secret").is_empty());
        assert!(get("x-auth-subject").is_empty());
        assert!(get("x_auth_subject").is_empty());
        assert!(get("x-forwarded-host").is_empty());
        assert!(get("sec-websocket-extensions").is_empty());
        assert!(get("upgrade").is_empty());
    }

    #[test]
    fn trusted_peer_list_is_extended() {
        let r = req(|b| {
            b.header("x-forwarded-for", "1.2.3.4")
                .header("x-request-id", "rid-1")
                .header("x-forwarded-proto", "https")
        });
        let fwd = Forwarding {
            client_ip: "1.2.3.4".parse().unwrap(),
            peer_trusted: true,
            peer_ip: "10.0.0.1".parse().unwrap(),
            tls: false,
            request_id: &request_id(r.headers(), true),
            asserted: &[],
        };
        let h = upstream_headers(r.headers(), &fwd);
        let xff: Vec<_> = h.iter().filter(|(k, _)| k == "x-forwarded-for").collect();
        assert_eq!(xff.len(), 1);
        assert_eq!(xff[0].1, "1.2.3.4, 10.0.0.1");
        assert!(h.iter().any(|(k, v)| k == "x-request-id" && v == "rid-1"));
        assert!(h
            .iter()
            .any(|(k, v)| k == "x-forwarded-proto" && v == "https"));
    }

    #[test]
    fn paths_are_normalised() {
        let n = |p: &str| normalize_path(p).unwrap();
        assert_eq!(n("/%61dmin"), "/admin");
        assert_eq!(n("//admin"), "/admin");
        assert_eq!(n("/./admin"), "/admin");
        assert_eq!(n("/public/../admin"), "/admin");
        assert_eq!(n("/public/%2e%2E/admin"), "/admin");
        assert_eq!(n("/public/..;x=1/admin"), "/admin");
        assert_eq!(n("/admin;jsessionid=1"), "/admin;jsessionid=1");
        assert_eq!(without_params("/admin;jsessionid=1/x;y"), "/admin/x");
        assert_eq!(n("/a/b/"), "/a/b/");
        assert_eq!(n("/a/b/."), "/a/b/");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/a/.."), "/");
        assert_eq!(n("/"), "/");
        assert_eq!(n("///"), "/");
        assert_eq!(n("/a%7e%41"), "/a~A");
        assert_eq!(n("/a%20b%c3%a9"), "/a%20b%C3%A9");
        assert_eq!(n("/%25"), "/%25");
        assert_eq!(n("/Admin"), "/Admin");
    }

    #[test]
    fn unsafe_paths_are_refused() {
        let e = |p: &str| normalize_path(p).unwrap_err();
        assert_eq!(e("/a%2Fb"), PathError::EncodedSlash);
        assert_eq!(e("/a%2fb"), PathError::EncodedSlash);
        assert_eq!(e("/a%5Cb"), PathError::Backslash);
        assert_eq!(e("/a\\b"), PathError::Backslash);
        assert_eq!(e("/a%00"), PathError::Control);
        assert_eq!(e("/a%0d%0a"), PathError::Control);
        assert_eq!(e("/a%7f"), PathError::Control);
        assert_eq!(e("/a%"), PathError::BadPercent);
        assert_eq!(e("/a%4"), PathError::BadPercent);
        assert_eq!(e("/a%zz"), PathError::BadPercent);
        assert_eq!(e("/.."), PathError::AboveRoot);
        assert_eq!(e("/a/../../b"), PathError::AboveRoot);
        assert_eq!(e("/%2e%2e/b"), PathError::AboveRoot);
        assert_eq!(e("a"), PathError::NotAbsolute);
    }

    #[test]
    fn normalising_is_idempotent() {
        for p in [
            "/%61dmin",
            "//a//b/",
            "/a/./b/../c",
            "/a;x/..;y/b;z",
            "/%c3%a9%20",
            "/;x",
            "/a/;/b",
            "/.;/a",
            "/a/b/..;",
            "/~%7E",
        ] {
            let once = normalize_path(p).unwrap();
            assert_eq!(normalize_path(&once).unwrap(), once, "{p}");
        }
    }

    #[test]
    fn normalising_random_paths_is_idempotent() {
        use rand::Rng;
        let alphabet: &[&str] = &[
            "/", ".", "..", "a", ";", "%2e", "%61", "%2F", "%20", "%", "~", "%C3%A9",
        ];
        let mut rng = rand::rng();
        for _ in 0..5000 {
            let n = rng.random_range(0..12);
            let mut p = String::from("/");
            for _ in 0..n {
                p.push_str(alphabet[rng.random_range(0..alphabet.len())]);
            }
            if let Ok(once) = normalize_path(&p) {
                assert_eq!(normalize_path(&once).as_deref(), Ok(once.as_str()), "{p}");
                assert!(!once.contains("//"), "{p} -> {once}");
            }
        }
    }

    #[test]
    fn the_upgrade_carries_the_normalised_path() {
        let mut r = req(|b| b);
        *r.uri_mut() = "/public/../%61dmin;j=1?access_token=x%2F".parse().unwrap();
        let u = validate(&r).unwrap();
        assert_eq!(u.path_and_query, "/admin;j=1?access_token=x%2F");
        assert_eq!(u.match_path, "/admin");
        *r.uri_mut() = "/a%2fb".parse().unwrap();
        assert_eq!(validate(&r).unwrap_err().status().as_u16(), 400);
    }

    #[test]
    fn bodies_and_bad_hosts_are_refused() {
        let status = |r: Request<()>| validate(&r).map(|_| ()).unwrap_err().status().as_u16();
        assert_eq!(status(req(|b| b.header("content-length", "5"))), 400);
        assert_eq!(
            status(req(|b| b.header("transfer-encoding", "chunked"))),
            400
        );
        assert!(validate(&req(|b| b.header("content-length", "0"))).is_ok());
        for bad in [
            "a b", "a\tb", "", "a@b", "a/b", "a\\b", "[::1", "[zz]", "a:", "a:123456", "a:x",
        ] {
            let mut r = req(|b| b);
            r.headers_mut()
                .insert("host", HeaderValue::from_str(bad).unwrap());
            assert_eq!(status(r), 400, "{bad:?}");
        }
        let mut r = req(|b| b);
        r.headers_mut()
            .insert("host", HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap());
        assert_eq!(status(r), 400);
        for good in [
            "example.com",
            "example.com:8080",
            "127.0.0.1:1",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(valid_host(good.as_bytes()), "{good}");
        }
    }

    #[test]
    fn bare_lf_in_the_head_is_seen() {
        let scan = |chunks: &[&[u8]]| {
            let mut s = HeadScan::default();
            for c in chunks {
                s.feed(c);
            }
            s
        };
        let ok = scan(&[b"GET / HTTP/1.1\r\nHost: a\r", b"\n\r\n\x81\n\n"]);
        assert!(!ok.bare_lf && ok.done);
        assert!(scan(&[b"GET / HTTP/1.1\nHost: a\r\n\r\n"]).bare_lf);
        assert!(scan(&[b"GET / HTTP/1.1\r\nX: 1\n\r\n"]).bare_lf);
        let partial = scan(&[b"GET / HTTP/1.1\r\n"]);
        assert!(!partial.bare_lf && !partial.done);
    }

    #[test]
    fn redaction() {
        assert_eq!(redacted("/a?token=x"), "/a");
        assert_eq!(redacted("/a"), "/a");
    }
}
