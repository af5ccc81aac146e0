//! Dialing the backend and checking its answer to the upgrade strictly.
//!
//! wsguard writes the backend handshake itself instead of using
//! tungstenite's client: it must forward the client's headers verbatim,
//! refuse any extension (no deflate is negotiated on either hop), accept a
//! backend that selects no subprotocol, and tell a timeout (504) from a
//! refusal (502) and a 4xx from a 5xx (for the circuit breaker).

use std::time::Duration;

use base64::Engine as _;
use hyper::header::{HeaderName, HeaderValue};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::policy::Upstream;

/// Largest response head accepted from the backend.
const MAX_HEAD: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("backend did not answer in time")]
    Timeout,
    /// A well-formed non-101 answer; `status` decides breaker accounting.
    #[error("backend answered {status} to the upgrade")]
    Status { status: u16 },
    /// Anything else wrong with the answer: bad accept key, missing
    /// Upgrade, unoffered subprotocol or extension, garbage.
    #[error("invalid upgrade answer: {0}")]
    Invalid(String),
    #[error("connection lost during handshake: {0}")]
    Io(std::io::Error),
}

impl DialError {
    /// Whether the circuit breaker counts this against the backend: 4xx
    /// answers are the backend working as designed.
    pub fn is_backend_failure(&self) -> bool {
        match self {
            // Only 5xx answers say the backend is failing; 1xx-4xx are the
            // backend answering as designed (and give the client a 502).
            DialError::Status { status } => (500..600).contains(status),
            // Out of file descriptors here (EMFILE/ENFILE) says nothing
            // about the backend: never let local exhaustion open the circuit.
            DialError::Connect(e) => !matches!(e.raw_os_error(), Some(23 | 24)),
            DialError::Timeout | DialError::Invalid(_) | DialError::Io(_) => true,
        }
    }
}

/// The backend connection: plain TCP or TLS (wss://).
pub enum UpStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for UpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

pub struct Dialed {
    pub stream: UpStream,
    /// Bytes the backend sent after its 101 (its first frames).
    pub rest: Vec<u8>,
    /// The subprotocol the backend selected, if any.
    pub protocol: Option<String>,
    /// End-to-end headers of the backend's 101 (e.g. Set-Cookie), returned
    /// to the client.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// permessage-deflate as the backend accepted it; None: this hop is
    /// uncompressed.
    pub deflate: Option<crate::compression::HopParams>,
}

/// Request target on the backend: its base path plus the client's path and
/// query.
pub fn target(up: &Upstream, path_and_query: &str) -> String {
    if up.base_path.is_empty() {
        path_and_query.to_string()
    } else {
        format!("{}{}", up.base_path, path_and_query)
    }
}

/// Dials `up` and performs the opening handshake, all before `deadline`.
pub async fn dial(
    up: &Upstream,
    path_and_query: &str,
    protocols: &[String],
    headers: &[(HeaderName, HeaderValue)],
    ws_config: WebSocketConfig,
    compression: Option<&crate::compression::Settings>,
    deadline: Instant,
) -> Result<Dialed, DialError> {
    tokio::time::timeout_at(
        deadline,
        handshake(
            up,
            path_and_query,
            protocols,
            headers,
            ws_config,
            compression,
        ),
    )
    .await
    .map_err(|_| DialError::Timeout)?
}

async fn handshake(
    up: &Upstream,
    path_and_query: &str,
    protocols: &[String],
    headers: &[(HeaderName, HeaderValue)],
    ws_config: WebSocketConfig,
    compression: Option<&crate::compression::Settings>,
) -> Result<Dialed, DialError> {
    let host = up.host.trim_start_matches('[').trim_end_matches(']');
    let tcp = TcpStream::connect((host, up.port))
        .await
        .map_err(DialError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let mut stream = match &up.tls {
        None => UpStream::Plain(tcp),
        Some(t) => {
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(&t.client));
            let tls = connector
                .connect(t.server_name.clone(), tcp)
                .await
                .map_err(|e| DialError::Invalid(format!("TLS to the backend failed: {e}")))?;
            UpStream::Tls(Box::new(tls))
        }
    };

    let key_bytes: [u8; 16] = rand::random();
    let key = base64::engine::general_purpose::STANDARD.encode(key_bytes);
    let mut req = Vec::with_capacity(512);
    req.extend_from_slice(b"GET ");
    req.extend_from_slice(target(up, path_and_query).as_bytes());
    req.extend_from_slice(b" HTTP/1.1\r\n");
    let mut has_host = false;
    for (n, v) in headers {
        has_host |= n == hyper::header::HOST;
        req.extend_from_slice(n.as_str().as_bytes());
        req.extend_from_slice(b": ");
        req.extend_from_slice(v.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    if !has_host {
        let default_port = if up.port == 80 {
            String::new()
        } else {
            format!(":{}", up.port)
        };
        req.extend_from_slice(format!("host: {}{}\r\n", up.host, default_port).as_bytes());
    }
    req.extend_from_slice(b"upgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-version: 13\r\nsec-websocket-key: ");
    req.extend_from_slice(key.as_bytes());
    req.extend_from_slice(b"\r\n");
    if !protocols.is_empty() {
        req.extend_from_slice(b"sec-websocket-protocol: ");
        req.extend_from_slice(protocols.join(", ").as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    // wsguard's own offer (the client's was stripped with the hop headers).
    if let Some(offer) = crate::compression::negotiate::offer_to_backend(compression) {
        req.extend_from_slice(b"sec-websocket-extensions: ");
        req.extend_from_slice(offer.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    stream.write_all(&req).await.map_err(DialError::Io)?;

    // Read until the end of the response head, never past MAX_HEAD.
    let mut buf = Vec::with_capacity(1024);
    let head_len = loop {
        if let Some(i) = find_head_end(&buf) {
            break i;
        }
        if buf.len() >= MAX_HEAD {
            return Err(DialError::Invalid("response head too large".into()));
        }
        let mut chunk = [0u8; 2048];
        let want = chunk.len().min(MAX_HEAD - buf.len());
        let n = stream
            .read(chunk.get_mut(..want).unwrap_or_default())
            .await
            .map_err(DialError::Io)?;
        if n == 0 {
            return Err(DialError::Invalid(
                "connection closed before a response".into(),
            ));
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    };
    let ((protocol, extra), deflate) = check_response_with(
        buf.get(..head_len).unwrap_or_default(),
        &key,
        protocols,
        compression,
    )?;
    let rest = buf.get(head_len..).unwrap_or_default().to_vec();
    let _ = ws_config;
    Ok(Dialed {
        stream,
        rest,
        protocol,
        headers: extra,
        deflate,
    })
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Response headers that belong to the handshake hop and are not copied
/// back to the client.
const HOP: &[&str] = &[
    "connection",
    "upgrade",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "sec-websocket-accept",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
    "sec-websocket-version",
    "proxy-authenticate",
    "trailer",
    "te",
];

type Checked = (Option<String>, Vec<(HeaderName, HeaderValue)>);

/// Strict validation of the backend's 101 when no extension was offered.
pub fn check_response(head: &[u8], key: &str, offered: &[String]) -> Result<Checked, DialError> {
    check_response_with(head, key, offered, None).map(|(c, _)| c)
}

/// Strict validation of the backend's 101, including its answer to the
/// permessage-deflate offer made under `compression` (None: nothing was
/// offered, so any extension in the answer fails the dial).
pub fn check_response_with(
    head: &[u8],
    key: &str,
    offered: &[String],
    compression: Option<&crate::compression::Settings>,
) -> Result<(Checked, Option<crate::compression::HopParams>), DialError> {
    let mut hdrs = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut hdrs);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(DialError::Invalid("truncated response".into()))
        }
        Err(e) => return Err(DialError::Invalid(format!("unparsable response: {e}"))),
    }
    let code = resp.code.unwrap_or(0);
    if code != 101 {
        return Err(DialError::Status { status: code });
    }
    if resp.version != Some(1) {
        return Err(DialError::Invalid("101 must be HTTP/1.1".into()));
    }
    let values = |name: &str| -> Vec<&[u8]> {
        resp.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
            .collect()
    };
    let tokens = |name: &str| -> Vec<String> {
        values(name)
            .into_iter()
            .filter_map(|v| std::str::from_utf8(v).ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    };
    if !tokens("upgrade").iter().any(|t| t == "websocket") {
        return Err(DialError::Invalid("missing Upgrade: websocket".into()));
    }
    if !tokens("connection").iter().any(|t| t == "upgrade") {
        return Err(DialError::Invalid("missing Connection: upgrade".into()));
    }
    let expected = derive_accept_key(key.as_bytes());
    match values("sec-websocket-accept").as_slice() {
        [v] if v.trim_ascii() == expected.as_bytes() => {}
        _ => return Err(DialError::Invalid("wrong Sec-WebSocket-Accept".into())),
    }
    let deflate = crate::compression::negotiate::accept_backend_response(
        values("sec-websocket-extensions"),
        compression,
    )
    .map_err(|e| DialError::Invalid(e.to_string()))?;
    let protocol = match values("sec-websocket-protocol").as_slice() {
        [] => None,
        [v] => {
            let p = std::str::from_utf8(v)
                .map_err(|_| DialError::Invalid("non-ASCII subprotocol".into()))?
                .trim();
            if !offered.iter().any(|o| o == p) {
                return Err(DialError::Invalid(
                    "backend selected a subprotocol that was not offered".into(),
                ));
            }
            Some(p.to_string())
        }
        _ => return Err(DialError::Invalid("several subprotocols selected".into())),
    };
    let mut extra = Vec::new();
    for h in resp.headers.iter() {
        let lower = h.name.to_ascii_lowercase();
        if HOP.contains(&lower.as_str()) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(lower.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) {
            extra.push((n, v));
        }
    }
    Ok(((protocol, extra), deflate))
}

/// A sane default when a test or the demo wants a timeout value.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    fn resp(extra: &str) -> Vec<u8> {
        format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {ACCEPT}\r\n{extra}\r\n").into_bytes()
    }

    #[test]
    fn good_answer() {
        let (p, extra) = check_response(&resp("Set-Cookie: a=b\r\n"), KEY, &[]).unwrap();
        assert_eq!(p, None);
        assert_eq!(extra.len(), 1);
        let (p, _) = check_response(
            &resp("Sec-WebSocket-Protocol: chat\r\n"),
            KEY,
            &["x".into(), "chat".into()],
        )
        .unwrap();
        assert_eq!(p.as_deref(), Some("chat"));
    }

    #[test]
    fn bad_answers() {
        let wrong_accept = resp("")
            .iter()
            .map(|b| if *b == b's' { b'S' } else { *b })
            .collect::<Vec<_>>();
        assert!(matches!(
            check_response(&wrong_accept, KEY, &[]),
            Err(DialError::Invalid(_))
        ));
        assert!(matches!(
            check_response(
                &resp("Sec-WebSocket-Extensions: permessage-deflate\r\n"),
                KEY,
                &[]
            ),
            Err(DialError::Invalid(_))
        ));
        assert!(matches!(
            check_response(
                &resp("Sec-WebSocket-Protocol: evil\r\n"),
                KEY,
                &["chat".into()]
            ),
            Err(DialError::Invalid(_))
        ));
        let s500 = b"HTTP/1.1 500 Oops\r\n\r\n";
        let e = check_response(s500, KEY, &[]).unwrap_err();
        assert!(e.is_backend_failure());
        let s200 = b"HTTP/1.1 200 OK\r\n\r\n";
        assert!(!check_response(s200, KEY, &[])
            .unwrap_err()
            .is_backend_failure());
        let s403 = b"HTTP/1.1 403 Forbidden\r\n\r\n";
        assert!(!check_response(s403, KEY, &[])
            .unwrap_err()
            .is_backend_failure());
        let no_upgrade = format!(
            "HTTP/1.1 101 OK\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {ACCEPT}\r\n\r\n"
        );
        assert!(check_response(no_upgrade.as_bytes(), KEY, &[]).is_err());
        assert!(check_response(b"garbage\r\n\r\n", KEY, &[]).is_err());
    }
}
