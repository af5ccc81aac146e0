#![allow(clippy::result_large_err, clippy::collapsible_match)]
//! Test harness: real backends, a raw frame-level client, and the proxy
//! started in-process on 127.0.0.1:0. Every wait has a timeout.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsguard::policy::Policy;
use wsguard::Running;

pub const WAIT: Duration = Duration::from_secs(5);

pub async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(WAIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

// ---------------------------------------------------------------- proxy

/// Starts wsguard in front of `backend` with extra top-level YAML (which
/// must not set listen, admin or upstream.url).
pub async fn proxy(backend: SocketAddr, extra: &str) -> Running {
    proxy_yaml(&format!(
        "listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nupstream:\n  url: \"ws://{backend}\"\n  connect_timeout: 1s\n{extra}"
    ))
    .await
}

pub async fn proxy_yaml(yaml: &str) -> Running {
    let policy =
        Policy::from_text("test.yaml", yaml).unwrap_or_else(|e| panic!("bad test policy:\n{e}"));
    wsguard::start(policy).await.expect("proxy starts")
}

/// A metric's value from the proxy's registry (0 when absent).
pub fn metric(p: &Running, series: &str) -> f64 {
    p.process
        .metrics
        .encode()
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|v| v.strip_prefix(' '))
                .map(|v| v.trim().parse().unwrap_or(0.0))
        })
        .unwrap_or(0.0)
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

/// A real WebSocket client through the proxy.
pub async fn ws(addr: SocketAddr, path: &str) -> Ws {
    let url = format!("ws://{addr}{path}");
    let (ws, _) = within(
        "client handshake",
        tokio_tungstenite::connect_async_with_config(url, Some(client_config()), false),
    )
    .await
    .expect("handshake succeeds");
    ws
}

pub async fn next(ws: &mut Ws) -> Message {
    within("a message", ws.next())
        .await
        .expect("stream open")
        .expect("no error")
}

/// Like [`assert_echo`], with extra request header lines.
pub async fn assert_echo_with(addr: SocketAddr, extra: &str) {
    let (mut r, h) = Raw::upgrade(addr, "/echo-check", extra).await;
    assert_eq!(h.status, 101, "{}", h.text);
    r.send_frame(true, 1, b"still alive", true).await;
    assert_eq!(r.read_frame().await, Some((1, b"still alive".to_vec())));
}

/// Sends one text message and expects it back.
pub async fn assert_echo(addr: SocketAddr) {
    let mut c = ws(addr, "/echo-check").await;
    c.send(Message::text("still alive")).await.unwrap();
    assert_eq!(next(&mut c).await, Message::text("still alive"));
    c.close(None).await.unwrap();
}

// ---------------------------------------------------------------- backends

pub async fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(wsguard::demo::echo_backend(l));
    a
}

/// What a recording backend saw.
#[derive(Debug)]
pub enum Seen {
    Request {
        path: String,
        headers: Vec<(String, String)>,
    },
    Msg(Message),
    /// The connection ended (after a close, an error or EOF).
    End,
}

/// An echo backend that records the request and every frame, selects the
/// subprotocol "chat" when offered, and obeys scripted commands:
/// `please-close` (Close 4000 "bye"), `please-abort` (drop the TCP
/// connection), `please-ping` (send a ping with payload "bp").
pub async fn recording_backend() -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let tx = tx.clone();
            tokio::spawn(async move {
                let tx2 = tx.clone();
                let cb = move |req: &Request, mut resp: Response| {
                    let headers = req
                        .headers()
                        .iter()
                        .map(|(k, v)| {
                            (k.as_str().to_string(), v.to_str().unwrap_or("").to_string())
                        })
                        .collect();
                    let path = req
                        .uri()
                        .path_and_query()
                        .map(|p| p.to_string())
                        .unwrap_or_default();
                    let offered = req
                        .headers()
                        .get_all("sec-websocket-protocol")
                        .iter()
                        .any(|v| {
                            v.to_str()
                                .unwrap_or("")
                                .split(',')
                                .any(|p| p.trim() == "chat")
                        });
                    if offered {
                        resp.headers_mut()
                            .insert("sec-websocket-protocol", "chat".parse().unwrap());
                    }
                    let _ = tx2.send(Seen::Request { path, headers });
                    Ok(resp)
                };
                let Ok(mut ws) =
                    tokio_tungstenite::accept_hdr_async_with_config(s, cb, Some(client_config()))
                        .await
                else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    let _ = tx.send(Seen::Msg(m.clone()));
                    match &m {
                        Message::Text(t) if t.as_str() == "please-close" => {
                            let _ = ws
                                .send(Message::Close(Some(CloseFrame {
                                    code: CloseCode::Library(4000),
                                    reason: "bye".into(),
                                })))
                                .await;
                        }
                        Message::Text(t) if t.as_str() == "please-abort" => {
                            drop(ws);
                            let _ = tx.send(Seen::End);
                            return;
                        }
                        Message::Text(t) if t.as_str() == "please-ping" => {
                            let _ = ws.send(Message::Ping("bp".into())).await;
                        }
                        // A pong the client can tell from one wsguard would
                        // make up: it replaces tungstenite's automatic one.
                        Message::Ping(p) if p.as_ref() == b"who-answers" => {
                            let _ = ws.send(Message::Pong("backend-pong".into())).await;
                        }
                        Message::Text(_) | Message::Binary(_) => {
                            if ws.send(m).await.is_err() {
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                let _ = tx.send(Seen::End);
            });
        }
    });
    (a, rx)
}

pub async fn seen(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    within("backend event", rx.recv())
        .await
        .expect("backend alive")
}

/// The next request a backend saw, skipping frames and ends of others.
pub async fn seen_request(rx: &mut mpsc::UnboundedReceiver<Seen>) -> String {
    loop {
        if let Seen::Request { path, .. } = seen(rx).await {
            return path;
        }
    }
}

/// The next data/control message the backend saw (skipping the request).
pub async fn seen_msg(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Option<Message> {
    loop {
        match seen(rx).await {
            Seen::Msg(m) => return Some(m),
            Seen::End => return None,
            Seen::Request { .. } => continue,
        }
    }
}

/// The close (code, reason) a recording backend received, skipping the
/// messages before it; None if the connection ended without one.
pub async fn backend_close(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Option<(u16, String)> {
    while let Some(m) = seen_msg(rx).await {
        if let Some(c) = close_of(&m) {
            return Some(c);
        }
    }
    None
}

/// A backend that reads the request head and answers `response` verbatim,
/// then keeps the connection open until the peer leaves.
pub async fn http_backend(response: String) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let response = response.clone();
            tokio::spawn(async move {
                if read_request_head(&mut s).await.is_none() {
                    return;
                }
                let _ = s.write_all(response.as_bytes()).await;
                // Hold the connection until the peer leaves.
                let _ = s.read(&mut [0u8; 1024]).await;
            });
        }
    });
    a
}

/// Reads an HTTP request head (up to the blank line); None on EOF/error.
async fn read_request_head(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut b).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&b[..n]),
        }
    }
    Some(head)
}

/// Accepts TCP and never says a word.
pub async fn silent_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            held.push(s);
        }
    });
    a
}

/// Sockets that hold the ports `dead_port` hands out, for the life of the
/// test process.
static DEAD_PORTS: std::sync::Mutex<Vec<tokio::net::TcpSocket>> = std::sync::Mutex::new(Vec::new());

/// A port with nothing listening: bound (so no other test can take it) but
/// never listening, so a connection to it is refused at once. Not a port
/// bound and released, which another test could take meanwhile.
pub async fn dead_port() -> SocketAddr {
    let (a, s) = down_port();
    DEAD_PORTS.lock().unwrap().push(s);
    a
}

/// A port that refuses connections until the test brings a server up on
/// it with `socket.listen(..)`: bound, not listening, never released.
pub fn down_port() -> (SocketAddr, tokio::net::TcpSocket) {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    (s.local_addr().unwrap(), s)
}

// ---------------------------------------------------------------- raw client

pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A frame-level client for malformed input.
pub struct Raw {
    pub s: TcpStream,
    buf: Vec<u8>,
}

pub struct Head {
    pub status: u16,
    pub text: String,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<String> {
        self.text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            s: within("tcp connect", TcpStream::connect(addr))
                .await
                .unwrap(),
            buf: Vec::new(),
        }
    }

    /// Sends a raw request head and reads the response head.
    pub async fn request(addr: SocketAddr, head: &str) -> (Raw, Head) {
        let mut r = Raw::connect(addr).await;
        r.s.write_all(head.as_bytes()).await.unwrap();
        let h = r.read_head().await;
        (r, h)
    }

    /// A valid upgrade with extra header lines ("Name: value\r\n" each).
    pub async fn upgrade(addr: SocketAddr, path: &str, extra: &str) -> (Raw, Head) {
        Raw::request(
            addr,
            &format!(
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}\r\n"
            ),
        )
        .await
    }

    pub async fn read_head(&mut self) -> Head {
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..i + 4).collect();
                let text = String::from_utf8_lossy(&head).to_string();
                let status = text
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                return Head { status, text };
            }
            let mut b = [0u8; 4096];
            let n = within("response head", self.s.read(&mut b)).await.unwrap();
            assert!(n > 0, "connection closed before a response head");
            self.buf.extend_from_slice(&b[..n]);
        }
    }

    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8], masked: bool) {
        let f = crate::raw::encode(fin, opcode, payload, masked);
        self.s.write_all(&f).await.unwrap();
    }

    /// Next frame as (opcode, payload); None on EOF.
    pub async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let op = self.buf[0] & 0x0f;
                let len0 = (self.buf[1] & 0x7f) as usize;
                let (len, off) = match len0 {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => (
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (n, 2),
                };
                if len != usize::MAX && self.buf.len() >= off + len {
                    let payload = self.buf[off..off + len].to_vec();
                    self.buf.drain(..off + len);
                    return Some((op, payload));
                }
            }
            let mut b = [0u8; 65536];
            match within("a frame", self.s.read(&mut b)).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&b[..n]),
            }
        }
    }

    /// Reads frames until a close; returns its code (None: no close frame).
    pub async fn close_code(&mut self) -> Option<u16> {
        while let Some((op, p)) = self.read_frame().await {
            if op == 8 {
                return Some(if p.len() >= 2 {
                    u16::from_be_bytes([p[0], p[1]])
                } else {
                    1005
                });
            }
        }
        None
    }

    /// The socket and any bytes already read past the response head.
    pub fn into_parts(self) -> (TcpStream, Vec<u8>) {
        (self.s, self.buf)
    }

    /// Everything after the response head until the server closes.
    pub async fn body(&mut self) -> String {
        let mut rest = std::mem::take(&mut self.buf);
        let _ = within("body", self.s.read_to_end(&mut rest)).await;
        String::from_utf8_lossy(&rest).to_string()
    }

    /// True once the server has closed the TCP connection.
    pub async fn eof(&mut self) -> bool {
        let mut b = [0u8; 1024];
        loop {
            match within("eof", self.s.read(&mut b)).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => continue,
            }
        }
    }
}

/// Close code and reason of a close message.
pub fn close_of(m: &Message) -> Option<(u16, String)> {
    match m {
        Message::Close(Some(f)) => Some((u16::from(f.code), f.reason.to_string())),
        _ => None,
    }
}

/// A backend that completes the WebSocket handshake and then never writes
/// again (not even pongs): a hung backend.
pub async fn mute_backend() -> SocketAddr {
    hung_backend(true).await
}

/// Like [`mute_backend`], but it does not even read: its TCP window fills.
pub async fn stuck_backend() -> SocketAddr {
    hung_backend(false).await
}

async fn hung_backend(reads: bool) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Some(head) = read_request_head(&mut s).await else {
                    return;
                };
                let text = String::from_utf8_lossy(&head).to_string();
                let _ = s.write_all(switching_protocols(&text, "").as_bytes()).await;
                if !reads {
                    std::future::pending::<()>().await;
                }
                let mut b = [0u8; 4096];
                while let Ok(n) = s.read(&mut b).await {
                    if n == 0 {
                        return;
                    }
                }
            });
        }
    });
    a
}

/// Writes a file so that a reader sees either the old contents or the new,
/// never a truncated one: parallel tests that share a fixture file (the
/// same secret, rewritten by each) must not read it half written.
pub fn write_atomic(path: &std::path::Path, contents: impl AsRef<[u8]>) {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp-{}-{n}", std::process::id()));
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A backend's 101 answer to the upgrade request `head`: the accept key
/// derived from its Sec-WebSocket-Key, plus `extra` header lines (each
/// ending in CRLF).
pub fn switching_protocols(head: &str, extra: &str) -> String {
    let key = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("sec-websocket-key")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{extra}\r\n"
    )
}
