//! Issue 13: permessage-deflate negotiated per hop (contract section 8).
//!
//! The deflate-capable client and backend are raw sockets plus flate2, so
//! that RSV1 and the exact wire bytes are visible to the tests.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use wsguard::sign::{self, Direction, MsgType, SeqState};

use crate::common::*;

const QUIET: &str = "keepalive: { interval: 0s, upstream_interval: 0s }\nlimits: { per_ip: null, per_connection: null }\n";
const OFFER: &str = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    loop {
        let before = c.total_in() as usize;
        out.reserve(64 * 1024);
        c.compress_vec(&data[before..], &mut out, FlushCompress::Sync)
            .unwrap();
        if c.total_in() as usize == data.len() && out.len() < out.capacity() {
            break;
        }
    }
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

fn inflate(data: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(data.len() * 4 + 1024);
    loop {
        let before = d.total_in() as usize;
        out.reserve(256 * 1024);
        d.decompress_vec(&input[before..], &mut out, FlushDecompress::Sync)
            .unwrap();
        if d.total_in() as usize == input.len() && out.len() < out.capacity() {
            return out;
        }
    }
}

/// One frame: (fin, rsv1, opcode, payload).
type Frame = (bool, bool, u8, Vec<u8>);

fn frame(fin: bool, rsv1: bool, op: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    crate::raw::encode_rsv1(fin, rsv1, op, payload, masked)
}

/// Reads one frame from `s` (unmasking if needed); None on EOF.
async fn read_frame<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> Option<Frame> {
    loop {
        if buf.len() >= 2 {
            let b0 = buf[0];
            let masked = buf[1] & 0x80 != 0;
            let len0 = (buf[1] & 0x7f) as usize;
            let (len, mut off) = match len0 {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => (
                    u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => (usize::MAX, 0),
                n => (n, 2),
            };
            let need = off + if masked { 4 } else { 0 };
            if len != usize::MAX && buf.len() >= need + len {
                let key = masked.then(|| [buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]);
                if masked {
                    off += 4;
                }
                let mut payload = buf[off..off + len].to_vec();
                if let Some(k) = key {
                    payload
                        .iter_mut()
                        .enumerate()
                        .for_each(|(i, b)| *b ^= k[i % 4]);
                }
                buf.drain(..off + len);
                return Some((b0 & 0x80 != 0, b0 & 0x40 != 0, b0 & 0x0f, payload));
            }
        }
        let mut b = vec![0u8; 256 * 1024];
        match within("a frame", s.read(&mut b)).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&b[..n]),
        }
    }
}

/// Reads one whole data message: (opcode, plaintext, was compressed).
/// Control frames are skipped; a close returns opcode 8 with its payload.
async fn read_message<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> Option<(u8, Vec<u8>, bool)> {
    let mut msg: Option<(u8, Vec<u8>, bool)> = None;
    loop {
        let (fin, rsv1, op, payload) = read_frame(s, buf).await?;
        if op == 8 {
            return Some((8, payload, false));
        }
        if op >= 8 {
            continue;
        }
        let m = msg.get_or_insert((op, Vec::new(), rsv1));
        m.1.extend_from_slice(&payload);
        if fin {
            let (op, data, c) = msg.take().unwrap();
            return Some((op, if c { inflate(&data) } else { data }, c));
        }
    }
}

async fn write_message<S: AsyncWrite + Unpin>(
    s: &mut S,
    op: u8,
    data: &[u8],
    compress: bool,
    masked: bool,
) {
    let f = if compress {
        frame(true, true, op, &deflate(data), masked)
    } else {
        frame(true, false, op, data, masked)
    };
    s.write_all(&f).await.unwrap();
}

/// What the backend does with each message's plaintext: the reply.
type Handler = Arc<dyn Fn(u8, Vec<u8>) -> Vec<u8> + Send + Sync>;

/// What the backend saw: its upgrade request head, then each message as
/// (plaintext, arrived compressed).
#[derive(Debug)]
enum Saw {
    Request(String),
    Message(Vec<u8>, bool),
}

/// A raw backend that accepts permessage-deflate (no context takeover)
/// when `accept` and it is offered, and answers every message with
/// `handler`'s reply, compressed when the hop is.
async fn backend(accept: bool, handler: Handler) -> (SocketAddr, mpsc::UnboundedReceiver<Saw>) {
    backend_answering(accept.then_some(GOOD_ANSWER), handler).await
}

const GOOD_ANSWER: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// Like [`backend`], answering an offer with `answer` as it is (None:
/// declining).
async fn backend_answering(
    answer: Option<&'static str>,
    handler: Handler,
) -> (SocketAddr, mpsc::UnboundedReceiver<Saw>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            let handler = Arc::clone(&handler);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let head = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let h = String::from_utf8_lossy(&buf[..i + 4]).to_string();
                        buf.drain(..i + 4);
                        break h;
                    }
                    let mut b = [0u8; 4096];
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                };
                let _ = tx.send(Saw::Request(head.clone()));
                let offered = head.to_ascii_lowercase().contains("permessage-deflate");
                let on = answer.is_some() && offered;
                let ext = match answer.filter(|_| offered) {
                    Some(a) => format!("Sec-WebSocket-Extensions: {a}\r\n"),
                    None => String::new(),
                };
                let resp = switching_protocols(&head, &ext);
                if s.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
                while let Some((op, data, c)) = read_message(&mut s, &mut buf).await {
                    if op == 8 {
                        let _ = s.write_all(&frame(true, false, 8, &data, false)).await;
                        return;
                    }
                    let _ = tx.send(Saw::Message(data.clone(), c));
                    let reply = handler(op, data);
                    write_message(&mut s, op, &reply, on, false).await;
                }
            });
        }
    });
    (addr, rx)
}

fn echo() -> Handler {
    Arc::new(|_, d| d)
}

/// A client connected through the proxy, offering permessage-deflate when
/// `offer`. Returns the socket, its read buffer and whether the proxy
/// accepted the offer.
async fn client(addr: SocketAddr, offer: bool) -> (TcpStream, Vec<u8>, Option<String>) {
    let (r, h) = Raw::upgrade(addr, "/", if offer { OFFER } else { "" }).await;
    assert_eq!(h.status, 101, "{}", h.text);
    let ext = h.header("sec-websocket-extensions");
    let (s, buf) = r.into_parts();
    (s, buf, ext)
}

/// JSON-like, compressible: ~200 KiB.
fn compressible(n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 64);
    let mut i = 0u64;
    while v.len() < n {
        v.extend_from_slice(
            format!(
                "{{\"id\":{i},\"symbol\":\"ABC\",\"price\":{}.25,\"side\":\"buy\"}},",
                i % 97
            )
            .as_bytes(),
        );
        i += 1;
    }
    v.truncate(n);
    v
}

async fn request_of(rx: &mut mpsc::UnboundedReceiver<Saw>) -> String {
    match within("backend request", rx.recv()).await {
        Some(Saw::Request(h)) => h,
        other => panic!("expected the upgrade request, got {other:?}"),
    }
}

async fn message_of(rx: &mut mpsc::UnboundedReceiver<Saw>) -> (Vec<u8>, bool) {
    match within("backend message", rx.recv()).await {
        Some(Saw::Message(d, c)) => (d, c),
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test]
async fn all_four_hop_combinations_echo_text_and_binary() {
    let big = compressible(200 * 1024);
    for client_c in [false, true] {
        for backend_c in [false, true] {
            let what = format!("client compressed {client_c}, backend compressed {backend_c}");
            let (b, mut rx) = backend(backend_c, echo()).await;
            let p = proxy(b, QUIET).await;
            let (mut s, mut buf, ext) = client(p.addr, client_c).await;
            assert_eq!(ext.is_some(), client_c, "{what}");
            if let Some(e) = &ext {
                assert!(e.contains("server_no_context_takeover"), "{e}");
                assert!(e.contains("client_no_context_takeover"), "{e}");
            }
            let req = request_of(&mut rx).await.to_ascii_lowercase();
            // wsguard's own offer, never the client's.
            assert!(
                req.contains("sec-websocket-extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
                "{req}"
            );
            for (op, data) in [
                (1u8, b"hello deflate".to_vec()),
                (1, big.clone()),
                (2, big.clone()),
            ] {
                write_message(&mut s, op, &data, client_c, true).await;
                let (got, backend_saw_c) = message_of(&mut rx).await;
                assert_eq!(got, data, "{what}");
                // Re-deflated for a compressed backend hop; a plain message
                // from a plain client stays plain.
                assert_eq!(backend_saw_c, backend_c && client_c, "{what}");
                let (rop, echoed, c) = read_message(&mut s, &mut buf).await.unwrap();
                assert_eq!((rop, echoed.len()), (op, data.len()), "{what}");
                assert_eq!(echoed, data, "{what}");
                assert_eq!(c, client_c && backend_c, "{what}");
            }
            // Payload bytes against wire bytes, per hop: the saving shows.
            let payload = metric(&p, "wsguard_bytes_total{direction=\"c2s\"}");
            let wire = |hop: &str, dir: &str| {
                metric(
                    &p,
                    &format!("wsguard_wire_bytes_total{{hop=\"{hop}\",direction=\"{dir}\"}}"),
                )
            };
            assert!(payload >= 400.0 * 1024.0, "{what}: {payload}");
            for (hop, dir, compressed) in [
                ("client", "c2s", client_c),
                ("backend", "c2s", client_c && backend_c),
                ("backend", "s2c", backend_c),
                ("client", "s2c", client_c && backend_c),
            ] {
                let w = wire(hop, dir);
                assert!(w > 0.0, "{what}: {hop} {dir}");
                assert_eq!(
                    w < payload / 3.0,
                    compressed,
                    "{what}: {hop} {dir} {w} vs {payload}"
                );
            }
            s.write_all(&frame(true, false, 8, &1000u16.to_be_bytes(), true))
                .await
                .unwrap();
            p.shutdown(std::time::Duration::from_secs(1)).await;
        }
    }
}

#[tokio::test]
async fn a_compressed_fragmented_message_is_reassembled() {
    let (b, mut rx) = backend(true, echo()).await;
    let p = proxy(b, QUIET).await;
    let (mut s, mut buf, ext) = client(p.addr, true).await;
    assert!(ext.is_some());
    let data = compressible(50 * 1024);
    let z = deflate(&data);
    let (a, rest) = z.split_at(z.len() / 3);
    let (m, e) = rest.split_at(rest.len() / 2);
    s.write_all(&frame(false, true, 1, a, true)).await.unwrap();
    s.write_all(&frame(false, false, 0, m, true)).await.unwrap();
    s.write_all(&frame(true, false, 0, e, true)).await.unwrap();
    let _ = request_of(&mut rx).await;
    assert_eq!(message_of(&mut rx).await, (data.clone(), true));
    let (op, echoed, c) = read_message(&mut s, &mut buf).await.unwrap();
    assert_eq!((op, c), (1, true));
    assert_eq!(echoed, data);
}

async fn close_code_of(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<u16> {
    while let Some((_, _, op, p)) = read_frame(s, buf).await {
        if op == 8 {
            return Some(u16::from_be_bytes([p[0], p[1]]));
        }
    }
    None
}

#[tokio::test]
async fn rsv1_where_not_allowed_is_a_protocol_error() {
    let (b, _rx) = backend(true, echo()).await;
    let p = proxy(b, QUIET).await;
    // A hop without compression.
    let (mut s, mut buf, _) = client(p.addr, false).await;
    s.write_all(&frame(true, true, 1, &deflate(b"hi"), true))
        .await
        .unwrap();
    assert_eq!(close_code_of(&mut s, &mut buf).await, Some(1002));
    // A control frame on a compressed hop.
    let (mut s, mut buf, ext) = client(p.addr, true).await;
    assert!(ext.is_some());
    s.write_all(&frame(true, true, 9, b"ping", true))
        .await
        .unwrap();
    assert_eq!(close_code_of(&mut s, &mut buf).await, Some(1002));
    // A continuation frame on a compressed hop.
    let (mut s, mut buf, _) = client(p.addr, true).await;
    let z = deflate(b"hello there");
    s.write_all(&frame(false, true, 1, &z[..2], true))
        .await
        .unwrap();
    s.write_all(&frame(true, true, 0, &z[2..], true))
        .await
        .unwrap();
    assert_eq!(close_code_of(&mut s, &mut buf).await, Some(1002));
    // The proxy still serves.
    let (mut s, mut buf, _) = client(p.addr, true).await;
    write_message(&mut s, 1, b"after", true, true).await;
    let (_, echoed, _) = read_message(&mut s, &mut buf).await.unwrap();
    assert_eq!(echoed, b"after");
}

#[tokio::test]
async fn a_bomb_is_closed_1009_and_the_proxy_keeps_serving() {
    let bomb = deflate(&vec![0u8; 16 * 1024 * 1024]);
    assert!(bomb.len() < 32 * 1024, "{}", bomb.len());
    // A plain backend: the message is assembled and inflated; a compressing
    // one: it is relayed as it came and inflated only to be measured.
    for backend_c in [false, true] {
        let (b, mut rx) = backend(backend_c, echo()).await;
        let p = proxy(b, QUIET).await;
        let (mut s, mut buf, _) = client(p.addr, true).await;
        s.write_all(&frame(true, true, 2, &bomb, true))
            .await
            .unwrap();
        assert_eq!(close_code_of(&mut s, &mut buf).await, Some(1009));
        assert_eq!(p.process.inflate.used(), 0);
        let _ = request_of(&mut rx).await;
        let (mut s, mut buf, _) = client(p.addr, true).await;
        write_message(&mut s, 1, b"normal", true, true).await;
        let (_, echoed, c) = read_message(&mut s, &mut buf).await.unwrap();
        assert_eq!((echoed.as_slice(), c), (&b"normal"[..], backend_c));
    }
}

#[tokio::test]
async fn mode_off_negotiates_nothing_on_either_hop() {
    let (b, mut rx) = backend(true, echo()).await;
    let p = proxy(b, &format!("{QUIET}compression: {{ mode: off }}\n")).await;
    let (mut s, mut buf, ext) = client(p.addr, true).await;
    assert_eq!(ext, None);
    let req = request_of(&mut rx).await.to_ascii_lowercase();
    assert!(!req.contains("sec-websocket-extensions"), "{req}");
    write_message(&mut s, 1, b"plain", false, true).await;
    assert_eq!(message_of(&mut rx).await, (b"plain".to_vec(), false));
    let (_, echoed, c) = read_message(&mut s, &mut buf).await.unwrap();
    assert_eq!((echoed.as_slice(), c), (&b"plain"[..], false));
    // RSV1 is then a protocol error.
    write_message(&mut s, 1, b"sneaky", true, true).await;
    assert_eq!(close_code_of(&mut s, &mut buf).await, Some(1002));
}

#[tokio::test]
async fn hmac_covers_the_decompressed_payload_on_compressed_hops() {
    use crate::hmac::{key, key_file, CLIENT1, UPSTREAM};
    let seq = Arc::new(Mutex::new((SeqState::default(), 0u64)));
    let handler: Handler = Arc::new(move |_, d| {
        let mut g = seq.lock().unwrap();
        let (state, out_seq) = &mut *g;
        let payload = sign::verify(
            &[key("p1", &UPSTREAM)],
            Direction::C2s,
            "",
            MsgType::Text,
            &d,
            sign::now_ms(),
            30_000,
            state,
        )
        .expect("wsguard's signature verifies");
        *out_seq += 1;
        let mut reply = b"echo:".to_vec();
        reply.extend_from_slice(payload);
        sign::sign(
            &key("p1", &UPSTREAM),
            Direction::S2c,
            *out_seq,
            sign::now_ms(),
            "",
            MsgType::Text,
            &reply,
        )
    });
    let (b, mut rx) = backend(true, handler).await;
    let p = proxy(
        b,
        &format!(
            "hmac:\n  mode: enforce\n  client_keys:\n    - {{ id: c1, secret_file: \"{}\" }}\n  upstream_key: {{ id: p1, secret_file: \"{}\" }}\n{QUIET}",
            key_file("c1", &CLIENT1),
            key_file("p1", &UPSTREAM)
        ),
    )
    .await;
    let (mut s, mut buf, ext) = client(p.addr, true).await;
    assert!(ext.is_some());
    let _ = request_of(&mut rx).await;
    let text = String::from_utf8(compressible(20 * 1024)).unwrap();
    let signed = sign::sign(
        &key("c1", &CLIENT1),
        Direction::C2s,
        1,
        sign::now_ms(),
        "",
        MsgType::Text,
        text.as_bytes(),
    );
    write_message(&mut s, 1, &signed, true, true).await;
    let (_, backend_c) = message_of(&mut rx).await;
    assert!(
        backend_c,
        "the re-signed message is deflated for the backend"
    );
    let (op, reply, c) = read_message(&mut s, &mut buf).await.unwrap();
    assert_eq!((op, c), (1, true));
    let mut st = SeqState::default();
    let payload = sign::verify(
        &[key("c1", &CLIENT1)],
        Direction::S2c,
        "",
        MsgType::Text,
        &reply,
        sign::now_ms(),
        30_000,
        &mut st,
    )
    .unwrap();
    assert_eq!(payload, format!("echo:{text}").as_bytes());
}

#[tokio::test]
async fn reload_switches_compression_for_new_sessions_only() {
    let (b, mut rx) = backend(true, echo()).await;
    let p = proxy(b, QUIET).await;
    let (mut old, mut old_buf, ext) = client(p.addr, true).await;
    assert!(ext.is_some());
    let _ = request_of(&mut rx).await;
    let policy = |mode: &str| {
        wsguard::policy::Policy::from_text(
            "reload.yaml",
            &format!(
                "listen: \"127.0.0.1:0\"\nadmin: {{ listen: \"127.0.0.1:0\" }}\nupstream: {{ url: \"ws://{b}\" }}\n{QUIET}compression: {{ mode: {mode} }}\n"
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    };
    p.process.install(policy("off"));
    // A new session negotiates nothing on either hop.
    let (mut new, mut new_buf, ext) = client(p.addr, true).await;
    assert_eq!(ext, None);
    let req = request_of(&mut rx).await.to_ascii_lowercase();
    assert!(!req.contains("sec-websocket-extensions"), "{req}");
    write_message(&mut new, 1, b"new", false, true).await;
    assert_eq!(message_of(&mut rx).await, (b"new".to_vec(), false));
    let (_, echoed, c) = read_message(&mut new, &mut new_buf).await.unwrap();
    assert_eq!((echoed.as_slice(), c), (&b"new"[..], false));
    // The live session keeps what it negotiated.
    write_message(&mut old, 1, b"old", true, true).await;
    assert_eq!(message_of(&mut rx).await, (b"old".to_vec(), true));
    let (_, echoed, c) = read_message(&mut old, &mut old_buf).await.unwrap();
    assert_eq!((echoed.as_slice(), c), (&b"old"[..], true));
    // And back on.
    p.process.install(policy("on"));
    let (_s, _buf, ext) = client(p.addr, true).await;
    assert!(ext.is_some());
}

#[tokio::test]
async fn a_backend_answer_that_does_not_fit_the_offer_is_a_502() {
    for answer in [
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover; bogus",
        // server_no_context_takeover was asked for and not granted.
        "permessage-deflate; client_no_context_takeover",
        "x-webkit-deflate-frame",
        "permessage-deflate; server_no_context_takeover, permessage-deflate; server_no_context_takeover",
        "permessage-deflate; server_no_context_takeover; server_max_window_bits=16",
    ] {
        let (b, _rx) = backend_answering(Some(answer), echo()).await;
        let p = proxy(b, QUIET).await;
        let (_r, h) = Raw::upgrade(p.addr, "/", OFFER).await;
        assert_eq!(h.status, 502, "{answer}: {}", h.text);
    }
    // A backend may narrow its own window and still be accepted.
    let (b, _rx) = backend_answering(
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=15"),
        echo(),
    )
    .await;
    let p = proxy(b, QUIET).await;
    let (mut s, mut buf, _) = client(p.addr, true).await;
    write_message(&mut s, 1, b"fits", true, true).await;
    let (_, echoed, _) = read_message(&mut s, &mut buf).await.unwrap();
    assert_eq!(echoed, b"fits");
}

#[tokio::test]
async fn bad_compressed_data_and_bad_inflated_text_are_1007() {
    // Assembled (plain backend) and relayed as it came (compressing one).
    for backend_c in [false, true] {
        let (b, _rx) = backend(backend_c, echo()).await;
        let p = proxy(b, QUIET).await;
        let (mut s, mut buf, _) = client(p.addr, true).await;
        s.write_all(&frame(true, true, 2, b"\xff\xff\xff\xfe not deflate", true))
            .await
            .unwrap();
        assert_eq!(close_code_of(&mut s, &mut buf).await, Some(1007));
        let (mut s, mut buf, _) = client(p.addr, true).await;
        s.write_all(&frame(
            true,
            true,
            1,
            &deflate(b"ok \xc3\x28 not utf-8"),
            true,
        ))
        .await
        .unwrap();
        assert_eq!(close_code_of(&mut s, &mut buf).await, Some(1007));
        // Binary may hold any bytes.
        let (mut s, mut buf, _) = client(p.addr, true).await;
        write_message(&mut s, 2, b"ok \xc3\x28", true, true).await;
        let (op, echoed, _) = read_message(&mut s, &mut buf).await.unwrap();
        assert_eq!((op, echoed.as_slice()), (2, &b"ok \xc3\x28"[..]));
    }
}

#[tokio::test]
async fn the_byte_rate_limit_counts_inflated_bytes() {
    let (b, _rx) = backend(true, echo()).await;
    let p = proxy(
        b,
        "keepalive: { interval: 0s, upstream_interval: 0s }\nlimits:\n  max_message_size: 256KiB\n  per_ip: null\n  per_connection:\n    bytes: { rate: 1KiB/s, burst: 256KiB }\n",
    )
    .await;
    let (mut s, mut buf, _) = client(p.addr, true).await;
    let big = compressible(200 * 1024);
    // A few KiB on the wire each: counted by wire size, both would pass.
    assert!(deflate(&big).len() < 32 * 1024);
    write_message(&mut s, 1, &big, true, true).await;
    let (_, echoed, _) = read_message(&mut s, &mut buf).await.unwrap();
    assert_eq!(echoed, big);
    write_message(&mut s, 1, &big, true, true).await;
    assert_eq!(close_code_of(&mut s, &mut buf).await, Some(1008));
}

/// Inflates one message with a `bits` window, 256 bytes of output at a
/// time so that back references must come from the window, not from the
/// output buffer: a stream whose matches reach further back than the window
/// fails ("invalid distance too far back").
fn inflate_window(data: &[u8], bits: u8) -> Result<Vec<u8>, flate2::DecompressError> {
    let mut d = Decompress::new_with_window_bits(false, bits);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::new();
    let mut chunk = [0u8; 256];
    loop {
        let (in0, out0) = (d.total_in() as usize, d.total_out());
        d.decompress(&input[in0..], &mut chunk, FlushDecompress::Sync)?;
        let wrote = (d.total_out() - out0) as usize;
        out.extend_from_slice(&chunk[..wrote]);
        if d.total_in() as usize == input.len() && wrote < chunk.len() {
            return Ok(out);
        }
        assert!(wrote > 0 || d.total_in() as usize > in0, "no progress");
    }
}

#[tokio::test]
async fn a_granted_server_window_bounds_what_wsguard_compresses_toward_the_client() {
    // Autobahn 13.5's offer: a 512-byte server window. The Autobahn run
    // never makes wsguard compress toward the client (its echo backend has
    // no deflate), so this is where that direction is held to the window.
    const OFFER_9: &str = "Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover; \
                           client_max_window_bits; server_no_context_takeover; server_max_window_bits=9\r\n";
    // 4 KiB of noise, twice: a 15-bit deflater matches the second copy
    // 4,096 bytes back, which a 9-bit inflater cannot follow.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let data = [noise.as_slice(), noise.as_slice()].concat();
    // The check is sensitive: a 15-bit stream of it does not inflate with 9 bits.
    assert!(inflate_window(&deflate(&data), 9).is_err());

    let (b, mut rx) = backend(true, echo()).await;
    let p = proxy(b, QUIET).await;
    let (r, h) = Raw::upgrade(p.addr, "/", OFFER_9).await;
    assert_eq!(h.status, 101, "{}", h.text);
    assert_eq!(
        h.header("sec-websocket-extensions").as_deref(),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=9")
    );
    let (mut s, mut buf) = r.into_parts();
    let _ = request_of(&mut rx).await;
    for op in [2u8, 1] {
        let msg = if op == 1 {
            compressible(64 * 1024)
        } else {
            data.clone()
        };
        write_message(&mut s, op, &msg, true, true).await;
        assert_eq!(message_of(&mut rx).await, (msg.clone(), true));
        // The backend's compressed echo is inflated and deflated again by
        // wsguard for the client, within the 9-bit window it granted.
        let mut wire = Vec::new();
        let (rop, rsv1) = loop {
            let (fin, rsv1, rop, payload) =
                within("echo", read_frame(&mut s, &mut buf)).await.unwrap();
            wire.extend_from_slice(&payload);
            if fin {
                break (rop, rsv1);
            }
        };
        assert_eq!((rop, rsv1), (op, true));
        assert_eq!(inflate_window(&wire, 9).unwrap(), msg);
    }
    s.write_all(&frame(true, false, 8, &1000u16.to_be_bytes(), true))
        .await
        .unwrap();
    p.shutdown(std::time::Duration::from_secs(1)).await;
}

/// The bomb, measured where it matters: 50 clients at once each send a
/// message of 16 KiB that inflates to 16 MiB, against the real binary with
/// a 1 MiB message limit. Each gets 1009, and the process's peak RSS
/// (VmHWM) grows by what the caps allow (50 messages inflated up to 1 MiB
/// each, at most), nowhere near the 800 MiB the bombs would inflate to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_bombs_raise_peak_memory_only_by_the_caps() {
    use crate::process::{policy_file, Proc, ANY_PORTS};
    const CLIENTS: usize = 50;
    // A plain backend: every bomb is assembled and inflated under the caps
    // (relayed messages hold no inflated bytes at all).
    let (b, _rx) = backend(false, echo()).await;
    let f = policy_file(
        "bomb-rss",
        &format!("{ANY_PORTS}upstream: {{ url: \"ws://{b}\" }}\nkeepalive: {{ interval: 0s, upstream_interval: 0s }}\nlimits: {{ per_ip: null, per_connection: null, max_message_size: 1MiB }}\n"),
    );
    let mut p = Proc::spawn(&f);
    let (addr, _) = p.listening().await;
    let peak_kib = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(client(addr, true).await);
    }
    let before = peak_kib(p.pid());
    let bomb = frame(true, true, 2, &deflate(&vec![0u8; 16 << 20]), true);
    assert!(bomb.len() < 32 * 1024, "{}", bomb.len());
    let sends = clients.into_iter().map(|(mut s, mut buf, ext)| {
        let bomb = bomb.clone();
        async move {
            assert!(ext.is_some(), "deflate not negotiated");
            s.write_all(&bomb).await.unwrap();
            close_code_of(&mut s, &mut buf).await
        }
    });
    let codes = within("every bomb answered", futures_util::future::join_all(sends)).await;
    assert!(codes.iter().all(|c| *c == Some(1009)), "{codes:?}");
    let grew = peak_kib(p.pid()).saturating_sub(before);
    assert!(
        grew < (CLIENTS as u64 + 32) * 1024,
        "peak RSS grew by {grew} KiB for {CLIENTS} bombs"
    );
    eprintln!("peak RSS grew by {grew} KiB for {CLIENTS} concurrent 16 MiB bombs (1 MiB cap)");
    // And the proxy still serves.
    let (mut s, mut buf, _) = client(addr, true).await;
    write_message(&mut s, 1, b"normal", true, true).await;
    let (_, echoed, _) = read_message(&mut s, &mut buf).await.unwrap();
    assert_eq!(echoed, b"normal");
}

/// A raw backend that answers the offer with `answer` and echoes every
/// frame it receives verbatim (unmasked, same fin, RSV1, opcode and
/// payload bytes), reporting each frame it saw.
async fn mirror_backend(answer: &'static str) -> (SocketAddr, mpsc::UnboundedReceiver<Frame>) {
    recording_backend(answer, true).await
}

/// [`mirror_backend`], echoing only when `echo`; else it just records, and
/// reports each new connection first as a frame with opcode 0xff.
const NEW_CONNECTION: u8 = 0xff;

async fn recording_backend(
    answer: &'static str,
    echo: bool,
) -> (SocketAddr, mpsc::UnboundedReceiver<Frame>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(Ok((head, mut buf))) =
                    tokio::time::timeout(std::time::Duration::from_secs(10), async {
                        let mut buf = Vec::new();
                        loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                let h = String::from_utf8_lossy(&buf[..i + 4]).to_string();
                                buf.drain(..i + 4);
                                return Ok((h, buf));
                            }
                            let mut b = [0u8; 4096];
                            match s.read(&mut b).await {
                                Ok(0) | Err(_) => return Err(()),
                                Ok(n) => buf.extend_from_slice(&b[..n]),
                            }
                        }
                    })
                    .await
                else {
                    return;
                };
                let ext = format!("Sec-WebSocket-Extensions: {answer}\r\n");
                if s.write_all(switching_protocols(&head, &ext).as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                if !echo {
                    let _ = tx.send((true, false, NEW_CONNECTION, Vec::new()));
                }
                while let Some((fin, rsv1, op, payload)) = read_frame(&mut s, &mut buf).await {
                    let _ = tx.send((fin, rsv1, op, payload.clone()));
                    if echo || op == 8 {
                        let _ = s.write_all(&frame(fin, rsv1, op, &payload, false)).await;
                    }
                    if op == 8 {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// Level-1 deflate of `data` as three frames' worth of bytes: wsguard's
/// own deflater (level 6) would produce other bytes, so identical bytes at
/// the far end mean they were relayed, not re-compressed.
fn fast_deflate(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::fast(), false);
    let mut out = Vec::with_capacity(data.len() + 1024);
    c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

async fn frame_of(rx: &mut mpsc::UnboundedReceiver<Frame>) -> Frame {
    within("a frame at the backend", rx.recv())
        .await
        .expect("the backend saw a frame")
}

#[tokio::test]
async fn compatible_hops_relay_compressed_frames_untouched() {
    let (b, mut rx) = mirror_backend(GOOD_ANSWER).await;
    let p = proxy(b, QUIET).await;
    let (mut s, mut buf, ext) = client(p.addr, true).await;
    assert!(ext.is_some());
    let data = compressible(64 * 1024);
    let z = fast_deflate(&data);
    let mut own = Vec::new();
    wsguard::compression::Deflater::new(15, false)
        .unwrap()
        .deflate(&data, true, &mut own)
        .unwrap();
    assert_ne!(own, z, "wsguard's deflater would write other bytes");
    // Three frames, RSV1 on the first only.
    let cuts = [0, z.len() / 3, 2 * z.len() / 3, z.len()];
    let sent: Vec<Frame> = (0..3)
        .map(|i| {
            (
                i == 2,
                i == 0,
                if i == 0 { 1 } else { 0 },
                z[cuts[i]..cuts[i + 1]].to_vec(),
            )
        })
        .collect();
    for (fin, rsv1, op, payload) in &sent {
        s.write_all(&frame(*fin, *rsv1, *op, payload, true))
            .await
            .unwrap();
    }
    // The backend gets the client's frames as they were sent...
    for want in &sent {
        assert_eq!(&frame_of(&mut rx).await, want);
    }
    // ...and the client gets the backend's the same way.
    for want in &sent {
        assert_eq!(read_frame(&mut s, &mut buf).await.as_ref(), Some(want));
    }
    // Counted as what they inflate to; the wire bytes match on both hops.
    let payload = metric(&p, "wsguard_bytes_total{direction=\"c2s\"}");
    assert_eq!(payload, data.len() as f64);
    let wire = |hop: &str, dir: &str| {
        metric(
            &p,
            &format!("wsguard_wire_bytes_total{{hop=\"{hop}\",direction=\"{dir}\"}}"),
        )
    };
    // Masked both ways c2s, unmasked both ways s2c: the same bytes.
    assert_eq!(wire("client", "c2s"), wire("backend", "c2s"));
    assert_eq!(wire("backend", "s2c"), wire("client", "s2c"));
    assert!(wire("backend", "c2s") < data.len() as f64 / 3.0);
}

#[tokio::test]
async fn relayed_compressed_messages_are_still_held_to_the_limits() {
    let (b, mut rx) = recording_backend(GOOD_ANSWER, false).await;
    let p = proxy(
        b,
        "keepalive: { interval: 0s, upstream_interval: 0s }\nlimits: { per_ip: null, per_connection: null, max_message_size: 64KiB }\n",
    )
    .await;
    // Past max_message_size once inflated: 1009, though a few bytes on the
    // wire. The first frame (under the cap) went on as it came; the frame
    // that crosses the cap does not.
    let (mut s, mut buf, _) = client(p.addr, true).await;
    assert_eq!(frame_of(&mut rx).await.2, NEW_CONNECTION);
    // One DEFLATE stream: 32 KiB of JSON, a sync flush, then 1 MiB of zeros.
    let mut c = Compress::new(Compression::fast(), false);
    let mut first = Vec::with_capacity(64 * 1024);
    c.compress_vec(&compressible(32 * 1024), &mut first, FlushCompress::Sync)
        .unwrap();
    let mut bomb = Vec::with_capacity(64 * 1024);
    c.compress_vec(&vec![0u8; 1024 * 1024], &mut bomb, FlushCompress::Sync)
        .unwrap();
    assert!(bomb.len() < 16 * 1024, "{}", bomb.len());
    s.write_all(&frame(false, true, 2, &first, true))
        .await
        .unwrap();
    assert_eq!(frame_of(&mut rx).await, (false, true, 2, first.clone()));
    s.write_all(&frame(true, false, 0, &bomb, true))
        .await
        .unwrap();
    assert_eq!(close_code_of(&mut s, &mut buf).await, Some(1009));
    // Text cut inside a code point at the message's end: 1007.
    let (mut s, mut buf, _) = client(p.addr, true).await;
    s.write_all(&frame(true, true, 1, &fast_deflate(b"cut \xe2\x82"), true))
        .await
        .unwrap();
    assert_eq!(close_code_of(&mut s, &mut buf).await, Some(1007));
    // (Bad UTF-8 and bad DEFLATE on this path: the 1007 test above.)
    // A normal client is still served, its frames relayed as they are:
    // text whose code points are cut by the frames and by the 16 KiB
    // chunks wsguard inflates into ("é€" is 5 bytes; 16,384 is not a
    // multiple of it).
    let (mut s, _buf, _) = client(p.addr, true).await;
    // Skip what the backend saw of the two sessions above: up to the
    // third connection.
    let mut connections = 1;
    while connections < 3 {
        if frame_of(&mut rx).await.2 == NEW_CONNECTION {
            connections += 1;
        }
    }
    let text = "é€".repeat(12 * 1024);
    let z = fast_deflate(text.as_bytes());
    let (a, b2) = z.split_at(z.len() / 2);
    s.write_all(&frame(false, true, 1, a, true)).await.unwrap();
    s.write_all(&frame(true, false, 0, b2, true)).await.unwrap();
    assert_eq!(frame_of(&mut rx).await, (false, true, 1, a.to_vec()));
    assert_eq!(frame_of(&mut rx).await, (true, false, 0, b2.to_vec()));
    assert_eq!(
        metric(&p, "wsguard_bytes_total{direction=\"c2s\"}"),
        text.len() as f64
    );
}

/// A deflater/inflater pair with context takeover on the test's side.
struct Takeover {
    c: Compress,
    d: Decompress,
}

impl Takeover {
    fn new(bits: u8) -> Self {
        Self::with_level(bits, Compression::default())
    }
    fn with_level(bits: u8, level: Compression) -> Self {
        Takeover {
            c: Compress::new_with_window_bits(level, false, bits),
            d: Decompress::new_with_window_bits(false, bits),
        }
    }
    fn deflate(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() + 1024);
        self.c
            .compress_vec(data, &mut out, FlushCompress::Sync)
            .unwrap();
        assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
        out.truncate(out.len() - 4);
        out
    }
    fn inflate(&mut self, data: &[u8]) -> Vec<u8> {
        let mut input = data.to_vec();
        input.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut out = Vec::with_capacity(256 * 1024);
        let start = self.d.total_in();
        self.d
            .decompress_vec(&input, &mut out, FlushDecompress::Sync)
            .unwrap();
        assert_eq!(self.d.total_in() - start, input.len() as u64);
        out
    }
}

const TAKEOVER: &str = "compression: { mode: on, context_takeover: true }\n";
/// `n` pseudo-random letters: barely compressible alone, so that a second
/// copy in a takeover stream shrinks to a few back references.
fn letters(n: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'a' + (x % 26) as u8
        })
        .collect()
}

#[tokio::test]
async fn context_takeover_is_negotiated_and_relayed() {
    let (b, mut rx) = mirror_backend("permessage-deflate").await;
    let p = proxy(b, &format!("{QUIET}{TAKEOVER}")).await;
    let (mut s, mut buf, ext) = client(p.addr, true).await;
    // Nothing asked for no takeover, so nothing is granted.
    assert_eq!(ext.as_deref(), Some("permessage-deflate"));
    // Level 1, which wsguard never writes, and messages that refer back
    // into the previous one: relayed byte for byte, in three frames each.
    let mut me = Takeover::with_level(15, Compression::fast());
    let data = letters(16 * 1024);
    let first = me.deflate(&data);
    let second = me.deflate(&data);
    assert!(
        second.len() * 4 < first.len(),
        "the second message refers back"
    );
    let mut plain = Takeover::new(15);
    for z in [&first, &second] {
        let cuts = [0, z.len() / 3, 2 * z.len() / 3, z.len()];
        let frames: Vec<Frame> = (0..3)
            .map(|i| {
                (
                    i == 2,
                    i == 0,
                    if i == 0 { 1 } else { 0 },
                    z[cuts[i]..cuts[i + 1]].to_vec(),
                )
            })
            .collect();
        for f in &frames {
            s.write_all(&frame(f.0, f.1, f.2, &f.3, true))
                .await
                .unwrap();
        }
        for f in &frames {
            assert_eq!(&frame_of(&mut rx).await, f);
        }
        let mut echoed = Vec::new();
        for f in &frames {
            let got = read_frame(&mut s, &mut buf).await.unwrap();
            assert_eq!(&got, f);
            echoed.extend_from_slice(&got.3);
        }
        assert_eq!(plain.inflate(&echoed), data);
    }
    assert_eq!(
        metric(&p, "wsguard_bytes_total{direction=\"c2s\"}"),
        2.0 * data.len() as f64
    );
}

#[tokio::test]
async fn context_takeover_inflates_and_deflates_across_messages() {
    // The client hop takes over context; the backend is plain: wsguard
    // inflates with the client's window kept between messages.
    let (b, mut rx) = backend(false, echo()).await;
    let p = proxy(b, &format!("{QUIET}{TAKEOVER}")).await;
    let (mut s, mut buf, ext) = client(p.addr, true).await;
    assert_eq!(ext.as_deref(), Some("permessage-deflate"));
    let _ = request_of(&mut rx).await;
    let mut me = Takeover::new(15);
    for _ in 0..3 {
        let z = me.deflate(b"Hello");
        s.write_all(&frame(true, true, 1, &z, true)).await.unwrap();
        assert_eq!(message_of(&mut rx).await, (b"Hello".to_vec(), false));
        let (_, echoed, c) = read_message(&mut s, &mut buf).await.unwrap();
        assert_eq!((echoed.as_slice(), c), (&b"Hello"[..], false));
    }

    // Hops that cannot share frames (the client granted wsguard a 10-bit
    // window, the backend compresses with 15): wsguard inflates the
    // backend's stream and deflates its own toward the client, both with
    // the window kept between messages.
    let (b, mut rx) = mirror_backend("permessage-deflate").await;
    let p = proxy(b, &format!("{QUIET}{TAKEOVER}")).await;
    let (r, h) = Raw::upgrade(
        p.addr,
        "/",
        "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10; client_max_window_bits\r\n",
    )
    .await;
    assert_eq!(h.status, 101, "{}", h.text);
    assert_eq!(
        h.header("sec-websocket-extensions").as_deref(),
        Some("permessage-deflate; server_max_window_bits=10")
    );
    let (mut s, mut buf) = r.into_parts();
    let mut me = Takeover::new(15);
    let mut from_proxy = Takeover::new(10);
    let mut first_len = 0;
    for i in 0..3 {
        let z = me.deflate(b"Hello");
        s.write_all(&frame(true, true, 1, &z, true)).await.unwrap();
        // Relayed to the backend as it came (its window is 15 bits).
        assert_eq!(frame_of(&mut rx).await.3, z);
        // The mirror sends the same bytes back: a 15-bit takeover stream
        // that wsguard inflates and compresses again for the client.
        let (_, rsv1, _, echoed) = read_frame(&mut s, &mut buf).await.unwrap();
        assert!(rsv1);
        if i == 0 {
            first_len = echoed.len();
        } else {
            // A back reference is shorter than "Hello" again, and means
            // nothing to an inflater without the window.
            assert!(
                echoed.len() < first_len,
                "wsguard's deflater kept its window"
            );
            assert!(Decompress::new_with_window_bits(false, 10)
                .decompress_vec(
                    &[&echoed[..], &[0, 0, 0xff, 0xff]].concat(),
                    &mut Vec::with_capacity(64),
                    FlushDecompress::Sync
                )
                .is_err());
        }
        assert_eq!(from_proxy.inflate(&echoed), b"Hello");
    }
}

#[tokio::test]
async fn a_rate_limit_closes_a_takeover_stream_instead_of_dropping() {
    let (b, mut rx) = mirror_backend("permessage-deflate").await;
    let p = proxy(
        b,
        &format!(
            "keepalive: {{ interval: 0s, upstream_interval: 0s }}\nlimits:\n  per_ip: null\n  on_message_limit: drop\n  per_connection:\n    messages: {{ rate: 1/m, burst: 1 }}\n{TAKEOVER}"
        ),
    )
    .await;
    let (mut s, mut buf, _) = client(p.addr, true).await;
    let mut me = Takeover::new(15);
    let z = me.deflate(b"Hello");
    s.write_all(&frame(true, true, 1, &z, true)).await.unwrap();
    assert_eq!(frame_of(&mut rx).await.3, z);
    // The next one would be dropped, and the message after it would refer
    // to what the backend never saw: the session closes (1008) instead.
    let z = me.deflate(b"Hello");
    s.write_all(&frame(true, true, 1, &z, true)).await.unwrap();
    assert_eq!(close_code_of(&mut s, &mut buf).await, Some(1008));

    // Without takeover the same limit drops, and the session goes on.
    let (b, mut rx) = mirror_backend(GOOD_ANSWER).await;
    let p = proxy(
        b,
        "keepalive: { interval: 0s, upstream_interval: 0s }\nlimits:\n  per_ip: null\n  on_message_limit: drop\n  per_connection:\n    messages: { rate: 1/m, burst: 1 }\n",
    )
    .await;
    let (mut s, mut buf, _) = client(p.addr, true).await;
    let z = fast_deflate(b"Hello");
    for _ in 0..2 {
        s.write_all(&frame(true, true, 1, &z, true)).await.unwrap();
    }
    // A close after them: its answer comes once both were handled.
    s.write_all(&frame(true, false, 8, &1000u16.to_be_bytes(), true))
        .await
        .unwrap();
    assert_eq!(frame_of(&mut rx).await.3, z);
    assert_eq!(
        frame_of(&mut rx).await.2,
        8,
        "the second message was dropped"
    );
    assert_eq!(read_frame(&mut s, &mut buf).await.map(|f| f.3), Some(z));
    assert_eq!(close_code_of(&mut s, &mut buf).await, Some(1000));
    assert_eq!(
        metric(&p, "wsguard_rejections_total{reason=\"message_rate\"}"),
        1.0
    );
}

#[tokio::test]
async fn a_message_wsguard_compresses_ends_relaying_a_takeover_stream() {
    use crate::hmac::{key, key_file, CLIENT1, UPSTREAM};
    // Context takeover on both hops, relayed as it came; then a reload adds
    // hmac, so wsguard compresses a re-signed message of its own into the
    // backend's window; then a reload takes hmac away again. The client's
    // next message refers back into its own stream, which the backend's
    // window no longer mirrors: wsguard must not relay it as it came.
    let (b, mut rx) = recording_backend("permessage-deflate", false).await;
    let p = proxy(b, &format!("{QUIET}{TAKEOVER}")).await;
    let policy = |hmac: &str| {
        wsguard::policy::Policy::from_text(
            "reload.yaml",
            &format!(
                "listen: \"127.0.0.1:0\"\nadmin: {{ listen: \"127.0.0.1:0\" }}\nupstream: {{ url: \"ws://{b}\" }}\n{QUIET}{TAKEOVER}{hmac}"
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    };
    let (mut s, _buf, ext) = client(p.addr, true).await;
    assert_eq!(ext.as_deref(), Some("permessage-deflate"));
    let mut me = Takeover::with_level(15, Compression::fast());
    let data = letters(8 * 1024);
    let z1 = me.deflate(&data);
    s.write_all(&frame(true, true, 1, &z1, true)).await.unwrap();
    assert_eq!(frame_of(&mut rx).await.2, NEW_CONNECTION);
    assert_eq!(frame_of(&mut rx).await.3, z1, "relayed as it came");

    p.process.install(policy(&format!(
        "hmac:\n  mode: enforce\n  client_keys:\n    - {{ id: c1, secret_file: \"{}\" }}\n  upstream_key: {{ id: p1, secret_file: \"{}\" }}\n",
        key_file("c1", &CLIENT1),
        key_file("p1", &UPSTREAM)
    )));
    let signed = sign::sign(
        &key("c1", &CLIENT1),
        Direction::C2s,
        1,
        sign::now_ms(),
        "",
        MsgType::Text,
        b"signed, sent plain",
    );
    s.write_all(&frame(true, false, 1, &signed, true))
        .await
        .unwrap();
    let (_, rsv1, _, z2) = frame_of(&mut rx).await;
    assert!(rsv1, "the re-signed message is compressed for the backend");

    p.process.install(policy(""));
    let z3 = me.deflate(&data);
    assert!(
        z3.len() * 4 < z1.len(),
        "refers back into the first message"
    );
    s.write_all(&frame(true, true, 1, &z3, true)).await.unwrap();
    let (_, rsv1, _, got3) = frame_of(&mut rx).await;
    assert!(rsv1);
    assert_ne!(got3, z3, "not relayed as it came");
    // The backend's inflater, fed the frames in order, reads every message.
    let mut backend = Takeover::new(15);
    assert_eq!(backend.inflate(&z1), data);
    let resigned = backend.inflate(&z2);
    assert!(resigned.ends_with(b"\nsigned, sent plain"));
    assert_eq!(backend.inflate(&got3), data);
}

#[tokio::test]
async fn with_hmac_wsguard_compresses_with_its_own_window_kept() {
    use crate::hmac::{key, key_file, CLIENT1, UPSTREAM};
    // Takeover on both hops and hmac on the route: nothing can be relayed
    // as it came, so wsguard's own deflater toward the backend keeps its
    // window between messages (a repeat shrinks to back references).
    let (b, mut rx) = recording_backend("permessage-deflate", false).await;
    let p = proxy(
        b,
        &format!(
            "hmac:\n  mode: enforce\n  client_keys:\n    - {{ id: c1, secret_file: \"{}\" }}\n  upstream_key: {{ id: p1, secret_file: \"{}\" }}\n{QUIET}{TAKEOVER}",
            key_file("c1", &CLIENT1),
            key_file("p1", &UPSTREAM)
        ),
    )
    .await;
    let (mut s, _buf, ext) = client(p.addr, true).await;
    assert_eq!(ext.as_deref(), Some("permessage-deflate"));
    assert_eq!(frame_of(&mut rx).await.2, NEW_CONNECTION);
    let data = letters(8 * 1024);
    let mut me = Takeover::new(15);
    let mut backend = Takeover::new(15);
    let mut sizes = Vec::new();
    for seq in 1..=2 {
        let signed = sign::sign(
            &key("c1", &CLIENT1),
            Direction::C2s,
            seq,
            sign::now_ms(),
            "",
            MsgType::Text,
            &data,
        );
        s.write_all(&frame(true, true, 1, &me.deflate(&signed), true))
            .await
            .unwrap();
        let (_, rsv1, _, z) = frame_of(&mut rx).await;
        assert!(rsv1);
        assert!(backend.inflate(&z).ends_with(&data));
        sizes.push(z.len());
    }
    assert!(sizes[1] * 4 < sizes[0], "{sizes:?}");
}
