//! Frame-level peers for the engine tests: a raw WebSocket client (masked
//! frames) and a raw backend (unmasked frames) that read every frame as it
//! is on the wire, so nothing between the test and the proxy answers a
//! ping, rewrites a close code or hides a connection reset.
#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::common::*;

pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// One frame as it was on the wire (payload unmasked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

impl Frame {
    /// (code, reason) of a close frame; 1005 for an empty one.
    pub fn close(&self) -> Option<(u16, String)> {
        (self.opcode == CLOSE).then(|| {
            if self.payload.len() >= 2 {
                (
                    u16::from_be_bytes([self.payload[0], self.payload[1]]),
                    String::from_utf8_lossy(&self.payload[2..]).to_string(),
                )
            } else {
                (1005, String::new())
            }
        })
    }
}

/// How a read ended when it did not return a frame.
#[derive(Debug)]
pub enum End {
    /// A clean FIN from the peer.
    Eof,
    /// A read error: a reset (ECONNRESET) or another error.
    Err(io::ErrorKind),
}

/// The bytes of one frame; masked with a fixed key when `mask`.
pub fn encode(fin: bool, opcode: u8, payload: &[u8], mask: bool) -> Vec<u8> {
    encode_rsv1(fin, false, opcode, payload, mask)
}

/// [`encode`], with RSV1 (permessage-deflate's "compressed" bit) set when
/// `rsv1`. The tests' one frame encoder, written apart from wsguard's so
/// that a bug in `frame.rs` cannot hide in both.
pub fn encode_rsv1(fin: bool, rsv1: bool, opcode: u8, payload: &[u8], mask: bool) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push((if fin { 0x80 } else { 0 }) | (if rsv1 { 0x40 } else { 0 }) | opcode);
    let m = if mask { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(m | n as u8),
        n if n < 65536 => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(m | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if mask {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

/// A close payload: code then reason.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

/// Parses one frame from the front of `buf`: the frame and its length.
pub fn parse(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let masked = buf[1] & 0x80 != 0;
    let (len, mut off) = match buf[1] & 0x7f {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let key: Option<[u8; 4]> = if masked {
        let k = buf.get(off..off + 4)?.try_into().ok()?;
        off += 4;
        Some(k)
    } else {
        None
    };
    let body = buf.get(off..off.checked_add(len)?)?;
    let payload = match key {
        Some(k) => body.iter().enumerate().map(|(i, b)| b ^ k[i % 4]).collect(),
        None => body.to_vec(),
    };
    Some((
        Frame {
            fin: buf[0] & 0x80 != 0,
            rsv: (buf[0] >> 4) & 0x7,
            opcode: buf[0] & 0x0f,
            masked,
            payload,
        },
        off + len,
    ))
}

/// Reads frames from one half of a socket.
pub struct Reader<R> {
    pub r: R,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(r: R, already: Vec<u8>) -> Self {
        Reader { r, buf: already }
    }

    /// The next frame, or how the stream ended. No timeout: wrap it.
    pub async fn frame(&mut self) -> Result<Frame, End> {
        loop {
            if let Some((f, n)) = parse(&self.buf) {
                self.buf.drain(..n);
                return Ok(f);
            }
            let mut b = vec![0u8; 256 * 1024];
            match self.r.read(&mut b).await {
                Ok(0) => return Err(End::Eof),
                Ok(n) => self.buf.extend_from_slice(&b[..n]),
                Err(e) => return Err(End::Err(e.kind())),
            }
        }
    }

    /// After a close: reads to the end and says how it ended (bytes that
    /// still arrive are ignored).
    pub async fn end(&mut self) -> End {
        let mut b = vec![0u8; 64 * 1024];
        loop {
            match self.r.read(&mut b).await {
                Ok(0) => return End::Eof,
                Ok(_) => continue,
                Err(e) => return End::Err(e.kind()),
            }
        }
    }
}

/// What a client sees, with data frames reassembled into messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    Msg(u8, Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(u16, String),
}

/// A raw WebSocket client through the proxy: it masks what it sends and
/// reports every frame it gets.
pub struct Client {
    pub rd: Reader<OwnedReadHalf>,
    pub wr: OwnedWriteHalf,
    partial: Option<(u8, Vec<u8>)>,
}

impl Client {
    /// Upgrades on `path`; panics unless the answer is 101.
    pub async fn connect(addr: SocketAddr, path: &str) -> Client {
        let (r, h) = Raw::upgrade(addr, path, "").await;
        assert_eq!(h.status, 101, "{}", h.text);
        let (s, rest) = r.into_parts();
        let (rd, wr) = s.into_split();
        Client {
            rd: Reader::new(rd, rest),
            wr,
            partial: None,
        }
    }

    pub async fn send(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        within(
            "a write to the proxy",
            self.wr.write_all(&encode(fin, opcode, payload, true)),
        )
        .await
        .expect("write to the proxy");
    }

    pub async fn text(&mut self, t: &str) {
        self.send(true, TEXT, t.as_bytes()).await;
    }

    /// The next frame within the test timeout.
    pub async fn frame(&mut self) -> Result<Frame, End> {
        within("a frame from the proxy", self.rd.frame()).await
    }

    /// The next message or control frame; panics on EOF or reset.
    pub async fn seen(&mut self) -> Got {
        loop {
            let f = match self.frame().await {
                Ok(f) => f,
                Err(e) => panic!("connection ended without a close frame: {e:?}"),
            };
            match f.opcode {
                PING => return Got::Ping(f.payload),
                PONG => return Got::Pong(f.payload),
                CLOSE => {
                    let (c, r) = f.close().unwrap_or((1005, String::new()));
                    return Got::Close(c, r);
                }
                0 => {
                    let (op, mut data) = self.partial.take().expect("continuation with no start");
                    data.extend_from_slice(&f.payload);
                    if f.fin {
                        return Got::Msg(op, data);
                    }
                    self.partial = Some((op, data));
                }
                op if f.fin => return Got::Msg(op, f.payload),
                op => self.partial = Some((op, f.payload)),
            }
        }
    }

    /// Everything seen up to and including `last` (which must come).
    pub async fn seen_until(&mut self, last: &Got) -> Vec<Got> {
        let mut all = Vec::new();
        loop {
            let s = self.seen().await;
            let done = &s == last;
            all.push(s);
            if done {
                return all;
            }
            if let Some(Got::Close(..)) = all.last() {
                panic!("closed before {last:?}: {all:?}");
            }
        }
    }

    /// Reads until a close frame: its (code, reason), or how the
    /// connection ended without one.
    pub async fn close_frame(&mut self) -> Result<(u16, String), End> {
        loop {
            let f = self.frame().await?;
            if let Some(c) = f.close() {
                return Ok(c);
            }
        }
    }
}

// ---------------------------------------------------------------- backend

/// How the raw backend answers a ping, chosen by the request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PongMode {
    /// `/pong-echo`: a pong with the ping's payload (RFC 6455 5.5.3).
    Echo,
    /// Any other path: a pong whose payload is `b:` + the ping's, so the
    /// client can tell the backend's pong from one the proxy made up.
    Tag,
    /// `/pong-none`: never answers a ping.
    None,
    /// `/pong-tag-app`: tags pings whose payload starts with `app`, and
    /// echoes the others (wsguard's keepalive pings, matched by payload).
    TagApp,
}

/// What the raw backend reports to the test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// A close frame from the proxy.
    Close(u16, String),
    /// The flood blocked after this many 64 KiB messages had been written.
    Flooded(u64),
}

enum Cmd {
    Bytes(Vec<u8>),
    Flood,
}

/// A raw backend. It echoes data frames as they come (fin and opcode kept),
/// answers pings per [`PongMode`], and obeys text commands:
/// - `close CODE REASON`: sends Close(CODE, REASON) unmasked, waits for the
///   proxy's answer, then closes TCP;
/// - `rsv1`: sends a text frame with RSV1 set (no extension was agreed);
/// - `flood`: writes numbered 64 KiB binary messages until one write has
///   been blocked for 500 ms, reports [`Backend::Flooded`], finishes that
///   write, then sends text `end`.
///
/// Frames are written in order by one writer task, so a pong answering a
/// ping that arrives during a flood goes out after the flood.
pub async fn raw_backend() -> (SocketAddr, mpsc::UnboundedReceiver<Backend>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve(s, tx.clone()));
        }
    });
    (a, rx)
}

async fn serve(mut s: TcpStream, events: mpsc::UnboundedSender<Backend>) {
    let mut head = Vec::new();
    let mut b = [0u8; 4096];
    let end = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut b).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&b[..n]),
        }
    };
    let text = String::from_utf8_lossy(&head[..end]).to_string();
    let rest = head[end..].to_vec();
    let path = text.split(' ').nth(1).unwrap_or("/").to_string();
    let mode = if path.starts_with("/pong-tag-app") {
        PongMode::TagApp
    } else if path.starts_with("/pong-echo") {
        PongMode::Echo
    } else if path.starts_with("/pong-none") {
        PongMode::None
    } else {
        PongMode::Tag
    };
    if s.write_all(crate::common::switching_protocols(&text, "").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let (rd, wr) = s.into_split();
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_loop(wr, cmd_rx, events.clone()));
    let mut rd = Reader::new(rd, rest);
    let send = |f: Vec<u8>| {
        let _ = cmd_tx.send(Cmd::Bytes(f));
    };
    let mut closing = false;
    while let Ok(f) = rd.frame().await {
        match f.opcode {
            PING => {
                let _ = events.send(Backend::Ping(f.payload.clone()));
                match mode {
                    PongMode::Echo => send(encode(true, PONG, &f.payload, false)),
                    PongMode::TagApp if !f.payload.starts_with(b"app") => {
                        send(encode(true, PONG, &f.payload, false))
                    }
                    PongMode::Tag | PongMode::TagApp => {
                        let mut p = b"b:".to_vec();
                        p.extend_from_slice(&f.payload);
                        send(encode(true, PONG, &p, false));
                    }
                    PongMode::None => {}
                }
            }
            PONG => {
                let _ = events.send(Backend::Pong(f.payload));
            }
            CLOSE => {
                let (c, r) = f.close().unwrap_or((1005, String::new()));
                let _ = events.send(Backend::Close(c, r));
                if !closing {
                    send(encode(true, CLOSE, &f.payload, false));
                }
                break;
            }
            TEXT if f.fin && f.payload == b"flood" => {
                let _ = cmd_tx.send(Cmd::Flood);
            }
            TEXT if f.fin && f.payload == b"rsv1" => {
                // A "compressed" text frame on a hop that negotiated no
                // compression (this backend never answers the extension).
                send(encode_rsv1(true, true, TEXT, b"not deflate", false));
            }
            TEXT if f.fin && f.payload.starts_with(b"close ") => {
                let cmd = String::from_utf8_lossy(&f.payload[6..]).to_string();
                let (code, reason) = cmd.split_once(' ').unwrap_or((&cmd, ""));
                let code: u16 = code.parse().unwrap_or(1000);
                send(encode(true, CLOSE, &close_payload(code, reason), false));
                closing = true;
            }
            op => send(encode(f.fin, op, &f.payload, false)),
        }
    }
    drop(cmd_tx);
    let _ = writer.await;
}

async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    events: mpsc::UnboundedSender<Backend>,
) {
    while let Some(c) = cmds.recv().await {
        match c {
            Cmd::Bytes(b) => {
                if wr.write_all(&b).await.is_err() {
                    return;
                }
            }
            Cmd::Flood => {
                let mut sent = 0u64;
                loop {
                    let mut msg = vec![0u8; 64 * 1024];
                    msg[..8].copy_from_slice(&sent.to_be_bytes());
                    let frame = encode(true, BINARY, &msg, false);
                    let write = wr.write_all(&frame);
                    tokio::pin!(write);
                    let blocked = tokio::select! {
                        r = &mut write => { if r.is_err() { return; } false }
                        _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => true,
                    };
                    if blocked {
                        let _ = events.send(Backend::Flooded(sent));
                        // Finish this frame (never cut one in half).
                        if write.await.is_err() {
                            return;
                        }
                        break;
                    }
                    sent += 1;
                }
                if wr
                    .write_all(&encode(true, TEXT, b"end", false))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
    let _ = wr.shutdown().await;
}
