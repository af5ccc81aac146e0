//! wsguard benchmark load generator (plain `ws://` only).
//!
//! Subcommands:
//!
//! * `echo`: N connections doing closed-loop echo (send one binary message, wait
//!   for its echo, repeat) for T seconds; prints a one-line JSON summary on stdout
//!   and a human-readable line on stderr.
//! * `idle`: open N connections (rate-limited ramp, bounded in-flight handshakes),
//!   print `READY <open>` once every attempt finished, keep them idle (still
//!   reading, so pings are answered) for T seconds, then print a JSON summary.
//! * `echo-server`: minimal WebSocket echo server used as the benchmark/Autobahn
//!   backend; prints `LISTENING <addr>` once bound.
//!
//! Per-message signing (wsguard `hmac`, see docs/signing.md), for the HMAC benchmark:
//!
//! * `echo --sign-key-file F --kid c1`: every message is sent as a `wsg1` envelope
//!   signed c2s with key `c1` (own seq from 1 per connection, ts = now, empty bind,
//!   type binary). Replies have their envelope stripped (not verified: in enforce
//!   mode wsguard has verified the backend's s2c signature already) and the payload
//!   is compared with what was sent.
//! * `echo-server --sign-key-file G --kid p1`: strips the incoming envelope (not
//!   verified) and replies with the payload signed s2c with key `p1` (own seq from 1
//!   per connection, ts = now, same frame type).
//!
//! Key files hold the secret as base64 (like wsguard's `secret_file`).
//!
//! permessage-deflate (RFC 7692; tungstenite has none, so these use their own
//! handshake and framing, built on `wsguard::frame` and `wsguard::compression`):
//!
//! * `echo-server --deflate [--context-takeover]`: answers a client's offer with
//!   `negotiate::answer_client` (window 15, no context takeover unless asked),
//!   decodes with `frame::Decoder`, inflates compressed messages (capped at
//!   --max-message-size) and echoes each message with its opcode, compressed
//!   when the extension was negotiated. Pings get pongs, a close is echoed, a
//!   protocol error or bad compressed data is answered with a close carrying the
//!   error's code. Signing (--sign-key-file) works as without --deflate.
//! * `echo --deflate [--context-takeover]` and `idle --deflate`: offer
//!   `permessage-deflate; server_no_context_takeover; client_no_context_takeover;
//!   client_max_window_bits` (without the two no-context-takeover parameters
//!   with --context-takeover), check the answer with
//!   `negotiate::accept_backend_response`, send masked (compressed) frames and
//!   inflate the replies.
//!
//! `echo --payload json`: text messages of --size bytes, a JSON array of small
//! quote objects varied per message (compressible, unlike the binary pattern).
//! The echo summary reports `wire_bytes_per_msg` (bytes written to and read from
//! the sockets during the echo loop, per echo) and `payload_bytes_per_msg`
//! (application bytes sent + received per echo), with and without --deflate.
//!
//! Only uses crates that are dependencies of wsguard (tokio, tokio-tungstenite,
//! futures-util, bytes, clap, httparse, rand) plus std, and the `wsguard::sign`,
//! `wsguard::frame` and `wsguard::compression` modules.
//!
//! Examples:
//!   loadgen echo-server --listen 127.0.0.1:0
//!   loadgen echo --url ws://127.0.0.1:9000/ --conns 100 --size 64 --duration 10 --warmup 2
//!   loadgen idle --url ws://127.0.0.1:9000/ --conns 5000 --hold 20 --rate 2000
//!   loadgen echo-server --listen 127.0.0.1:0 --sign-key-file upstream.key --kid p1
//!   loadgen echo --url ws://127.0.0.1:8080/ --sign-key-file client.key --kid c1
//!   loadgen echo-server --listen 127.0.0.1:0 --deflate
//!   loadgen echo --url ws://127.0.0.1:9000/ --deflate --payload json --size 2048

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use wsguard::compression::negotiate::{self, HopParams, Settings};
use wsguard::compression::{Deflater, InflateBudget, InflateError, Inflated, Inflater};
use wsguard::frame::{self, Decoder, FrameError, Header, Rules, Sink as FrameSink};
use wsguard::sign::{self, Direction, Key, MsgType};

type Ws = WebSocketStream<Counted>;

/// A TCP stream that counts the bytes read from and written to it (wire bytes).
struct Counted {
    inner: TcpStream,
    read: u64,
    written: u64,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &r {
            self.read += (buf.filled().len() - before) as u64;
        }
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.written += *n as u64;
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    about = "wsguard benchmark load generator (plain ws:// only)"
)]
struct Cli {
    /// Tokio worker threads (default: number of CPUs).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Closed-loop echo throughput/latency test.
    Echo(EchoArgs),
    /// Open many idle connections and hold them.
    Idle(IdleArgs),
    /// Minimal WebSocket echo server (benchmark / Autobahn backend).
    EchoServer(ServerArgs),
}

#[derive(clap::Args, Debug)]
struct EchoArgs {
    /// Target URL, e.g. ws://127.0.0.1:9000/path
    #[arg(long)]
    url: String,
    /// Number of concurrent connections.
    #[arg(long, default_value_t = 100)]
    conns: usize,
    /// Binary message size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Measurement duration in seconds (after warmup).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Warmup seconds (messages exchanged but not counted).
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    /// Timeout in seconds for TCP connect and for the WebSocket handshake.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// Timeout in seconds for a single send or for waiting on one echo.
    #[arg(long, default_value_t = 5.0)]
    op_timeout: f64,
    /// Max concurrent handshakes while connecting.
    #[arg(long, default_value_t = 256)]
    max_inflight: usize,
    /// Max latency samples stored per connection (reservoir sampling beyond that).
    #[arg(long, default_value_t = 200_000)]
    max_samples: usize,
    /// Free-form label copied into the JSON summary.
    #[arg(long, default_value = "")]
    label: String,
    /// Sign every message (wsg1, c2s) with the base64 secret in this file; strip
    /// the envelope from replies before comparing them.
    #[arg(long)]
    sign_key_file: Option<PathBuf>,
    /// Key id used with --sign-key-file.
    #[arg(long, default_value = "c1")]
    kid: String,
    /// Extra handshake header, "Name: value" (repeatable), e.g. "Origin: https://app.example".
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Offer permessage-deflate (own client implementation, not tungstenite) and
    /// compress every message when the server accepts it.
    #[arg(long)]
    deflate: bool,
    /// With --deflate: do not ask for no context takeover.
    #[arg(long)]
    context_takeover: bool,
    /// Message content: `binary` (a fixed pattern, binary frames) or `json`
    /// (JSON-like compressible text of --size bytes, varied per message).
    #[arg(long, value_enum, default_value_t = Payload::Binary)]
    payload: Payload,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Payload {
    Binary,
    Json,
}

#[derive(clap::Args, Debug)]
struct IdleArgs {
    /// Target URL, e.g. ws://127.0.0.1:9000/path
    #[arg(long)]
    url: String,
    /// Number of connections to open.
    #[arg(long, default_value_t = 1000)]
    conns: usize,
    /// Seconds to hold the connections after all of them were attempted.
    #[arg(long, default_value_t = 10.0)]
    hold: f64,
    /// Connection attempts started per second.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Max concurrent handshakes in flight.
    #[arg(long, default_value_t = 256)]
    max_inflight: usize,
    /// Timeout in seconds for TCP connect and for the WebSocket handshake.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// Free-form label copied into the JSON summary.
    #[arg(long, default_value = "")]
    label: String,
    /// Extra handshake header, "Name: value" (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// After its handshake, every --burst-every'th connection sends one binary
    /// message of this many bytes and waits for its echo before going idle (0 = none).
    /// Shows whether the proxy's buffers go back once a large message has passed.
    #[arg(long, default_value_t = 0)]
    burst_size: usize,
    /// Which connections send the burst message: every Nth (1 = all).
    #[arg(long, default_value_t = 1)]
    burst_every: usize,
    /// Offer permessage-deflate (own client implementation); bursts are then
    /// sent compressed.
    #[arg(long)]
    deflate: bool,
    /// With --deflate: do not ask for no context takeover.
    #[arg(long)]
    context_takeover: bool,
}

#[derive(clap::Args, Debug)]
struct ServerArgs {
    /// Listen address; port 0 picks a free port (the real one is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Max incoming message size in bytes (frame limit stays at tungstenite's 16 MiB).
    #[arg(long, default_value_t = 64 << 20)]
    max_message_size: usize,
    /// Timeout in seconds for the server-side WebSocket handshake.
    #[arg(long, default_value_t = 10.0)]
    handshake_timeout: f64,
    /// Strip the incoming wsg1 envelope and sign every reply (s2c) with the base64
    /// secret in this file.
    #[arg(long)]
    sign_key_file: Option<PathBuf>,
    /// Key id used with --sign-key-file.
    #[arg(long, default_value = "p1")]
    kid: String,
    /// Accept permessage-deflate (own server implementation on wsguard's frame
    /// decoder and codec, not tungstenite); the frame limit is then
    /// --max-message-size too.
    #[arg(long)]
    deflate: bool,
    /// With --deflate: allow context takeover (default: always answer with
    /// server_no_context_takeover and client_no_context_takeover).
    #[arg(long)]
    context_takeover: bool,
}

fn load_key(path: &Path, kid: &str) -> Result<Key, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
    Key::from_base64(kid, &text)
}

/// The payload of a message: the part after a `wsg1` envelope if there is one
/// (not verified), else the whole message. `None` for a malformed envelope.
fn strip_envelope(msg: &[u8]) -> Option<&[u8]> {
    match sign::parse(msg) {
        Ok(env) => Some(env.payload),
        Err(sign::SigFailure::MissingEnvelope) => Some(msg),
        Err(_) => None,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = cli.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot build tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let res = rt.block_on(async move {
        match cli.cmd {
            Cmd::Echo(a) => run_echo(a).await,
            Cmd::Idle(a) => run_idle(a).await,
            Cmd::EchoServer(a) => run_server(a).await,
        }
    });
    // Do not wait for stray tasks (e.g. half-closed sockets) on the way out.
    rt.shutdown_timeout(Duration::from_millis(200));
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(1)
        }
    }
}

// ---------------------------------------------------------------------------
// shared helpers
// ---------------------------------------------------------------------------

struct Target {
    url: String,
    addr: SocketAddr,
    /// Extra request headers (`--header "Name: value"`), e.g. Origin for wsguard's origin guard.
    headers: Vec<(String, String)>,
}

/// Parse `--header "Name: value"` arguments.
fn parse_headers(raw: &[String]) -> Result<Vec<(String, String)>, String> {
    raw.iter()
        .map(|h| {
            let (n, v) = h
                .split_once(':')
                .ok_or_else(|| format!("bad --header {h:?} (expected \"Name: value\")"))?;
            Ok((n.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

async fn resolve_target(url: &str, headers: &[String]) -> Result<Target, String> {
    let headers = parse_headers(headers)?;
    let uri: Uri = url.parse().map_err(|e| format!("bad url {url:?}: {e}"))?;
    match uri.scheme_str() {
        Some("ws") => {}
        Some(s) => {
            return Err(format!(
                "unsupported scheme {s:?} (only plain ws:// is supported)"
            ))
        }
        None => {
            return Err(format!(
                "url {url:?} has no scheme (expected ws://host:port/path)"
            ))
        }
    }
    let host = uri
        .host()
        .ok_or_else(|| format!("url {url:?} has no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let addr = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("cannot resolve {host}:{port}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}:{port} resolved to no address"))?;
    Ok(Target {
        url: url.to_string(),
        addr,
        headers,
    })
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(if s.is_finite() && s > 0.0 { s } else { 0.0 })
}

/// Connect TCP (nodelay), bounded by `t`.
async fn dial(target: &Target, t: Duration) -> Result<TcpStream, String> {
    let tcp = match timeout(t, TcpStream::connect(target.addr)).await {
        Err(_) => return Err("connect: timeout".into()),
        Ok(Err(e)) => return Err(format!("connect: {}", io_kind(&e))),
        Ok(Ok(s)) => s,
    };
    tcp.set_nodelay(true)
        .map_err(|e| format!("connect: set_nodelay: {e}"))?;
    Ok(tcp)
}

/// Connect TCP (nodelay) and run the client handshake, each step bounded by `t`.
async fn connect_ws(target: &Target, cfg: WebSocketConfig, t: Duration) -> Result<Ws, String> {
    let tcp = dial(target, t).await?;
    let tcp = Counted {
        inner: tcp,
        read: 0,
        written: 0,
    };
    let mut req = target
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("handshake: bad request: {}", short_ws_err(&e)))?;
    for (n, v) in &target.headers {
        let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(n.as_bytes())
            .map_err(|e| format!("bad header name {n:?}: {e}"))?;
        let value = tokio_tungstenite::tungstenite::http::HeaderValue::from_str(v)
            .map_err(|e| format!("bad header value for {n}: {e}"))?;
        req.headers_mut().append(name, value);
    }
    match timeout(
        t,
        tokio_tungstenite::client_async_with_config(req, tcp, Some(cfg)),
    )
    .await
    {
        Err(_) => Err("handshake: timeout".into()),
        Ok(Err(e)) => Err(format!("handshake: {}", short_ws_err(&e))),
        Ok(Ok((ws, _resp))) => Ok(ws),
    }
}

fn io_kind(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => format!("{:?} (os error {code})", e.kind()),
        None => format!("{:?}", e.kind()),
    }
}

fn short_ws_err(e: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::Http(resp) => format!("http status {}", resp.status().as_u16()),
        E::Io(io) => format!("io {}", io_kind(io)),
        E::ConnectionClosed => "connection closed".into(),
        E::AlreadyClosed => "already closed".into(),
        E::Protocol(p) => format!("protocol: {p}"),
        E::Capacity(c) => format!("capacity: {c}"),
        other => {
            let s = other.to_string();
            s.chars().take(80).collect()
        }
    }
}

/// Error-reason histogram shared by tasks.
#[derive(Default)]
struct Reasons(Mutex<HashMap<String, u64>>);

impl Reasons {
    fn add(&self, r: impl Into<String>) {
        *self.0.lock().unwrap().entry(r.into()).or_insert(0) += 1;
    }
    fn json(&self) -> String {
        let m = self.0.lock().unwrap();
        let mut v: Vec<_> = m.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let parts: Vec<String> = v
            .iter()
            .map(|(k, n)| format!("{}:{}", json_str(k), n))
            .collect();
        format!("{{{}}}", parts.join(","))
    }
    fn human(&self) -> String {
        let m = self.0.lock().unwrap();
        let mut v: Vec<_> = m.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        v.iter()
            .take(5)
            .map(|(k, n)| format!("{k} x{n}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_f(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "null".into()
    }
}

fn print_stdout_line(s: &str) {
    let out = std::io::stdout();
    let mut l = out.lock();
    let _ = writeln!(l, "{s}");
    let _ = l.flush();
}

// ---------------------------------------------------------------------------
// latency samples: bounded reservoir per connection
// ---------------------------------------------------------------------------

struct Samples {
    buf: Vec<u32>,
    cap: usize,
    seen: u64,
    sum: u64,
    max: u32,
    rng: u64,
}

impl Samples {
    fn new(cap: usize, seed: u64) -> Self {
        Samples {
            buf: Vec::with_capacity(cap.min(4096)),
            cap: cap.max(1),
            seen: 0,
            sum: 0,
            max: 0,
            rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }
    fn next_rand(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn record(&mut self, us: u32) {
        self.seen += 1;
        self.sum += us as u64;
        self.max = self.max.max(us);
        if self.buf.len() < self.cap {
            self.buf.push(us);
        } else {
            // Algorithm R: keep each of the `seen` samples with probability cap/seen.
            let j = self.next_rand() % self.seen;
            if (j as usize) < self.cap {
                self.buf[j as usize] = us;
            }
        }
    }
}

struct Latency {
    p50: u32,
    p90: u32,
    p99: u32,
    p999: u32,
    max: u32,
    mean: f64,
    stored: usize,
}

/// Weighted percentiles over per-connection reservoirs: each stored sample stands
/// for `seen / stored` real samples of its connection, so connections that
/// overflowed their reservoir are not under-represented.
fn percentiles(all: &[Samples]) -> Option<Latency> {
    let total_seen: u64 = all.iter().map(|s| s.seen).sum();
    if total_seen == 0 {
        return None;
    }
    let mut v: Vec<(u32, f64)> = Vec::with_capacity(all.iter().map(|s| s.buf.len()).sum());
    for s in all {
        if s.buf.is_empty() {
            continue;
        }
        let w = s.seen as f64 / s.buf.len() as f64;
        v.extend(s.buf.iter().map(|&x| (x, w)));
    }
    v.sort_unstable_by_key(|p| p.0);
    let total_w: f64 = v.iter().map(|p| p.1).sum();
    let pick = |q: f64| -> u32 {
        let target = q * total_w;
        let mut acc = 0.0;
        for &(x, w) in &v {
            acc += w;
            if acc >= target - 1e-9 {
                return x;
            }
        }
        v.last().map(|p| p.0).unwrap_or(0)
    };
    Some(Latency {
        p50: pick(0.50),
        p90: pick(0.90),
        p99: pick(0.99),
        p999: pick(0.999),
        max: all.iter().map(|s| s.max).max().unwrap_or(0),
        mean: all.iter().map(|s| s.sum).sum::<u64>() as f64 / total_seen as f64,
        stored: v.len(),
    })
}

// ---------------------------------------------------------------------------
// echo: closed-loop throughput / latency
// ---------------------------------------------------------------------------

struct ConnResult {
    samples: Samples,
    messages: u64,
    warmup_messages: u64,
    errors: u64,
    /// Every echo that came back right (warmup, measured, and the last one
    /// after the end): what `wire_bytes` is divided by.
    echoed: u64,
    /// Bytes written to and read from the socket during the echo loop.
    wire_bytes: u64,
    /// Application payload bytes of the echoes (sent + received).
    payload_bytes: u64,
    /// permessage-deflate was negotiated on this connection.
    deflate: bool,
}

fn client_cfg_echo() -> WebSocketConfig {
    // Explicit client config: 64 KiB read buffer, eager writes (one message in flight).
    WebSocketConfig::default()
        .read_buffer_size(64 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(64 << 20))
}

async fn run_echo(a: EchoArgs) -> Result<(), String> {
    if a.conns == 0 {
        return Err("--conns must be > 0".into());
    }
    let target = Arc::new(resolve_target(&a.url, &a.headers).await?);
    let reasons = Arc::new(Reasons::default());
    let connect_t = secs(a.connect_timeout);
    let op_t = secs(a.op_timeout).max(Duration::from_millis(1));
    let sign_key = match &a.sign_key_file {
        Some(p) => Some(Arc::new(load_key(p, &a.kid)?)),
        None => None,
    };

    // Phase 1: connect everything (bounded concurrency), so all connections start together.
    let t_conn = Instant::now();
    let sem = Arc::new(Semaphore::new(a.max_inflight.max(1)));
    let mut set = JoinSet::new();
    for _ in 0..a.conns {
        let (target, sem, reasons) = (target.clone(), sem.clone(), reasons.clone());
        let (deflate, takeover) = (a.deflate, a.context_takeover);
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.ok()?;
            match Conn::connect(&target, deflate, takeover, client_cfg_echo(), connect_t).await {
                Ok(c) => Some(c),
                Err(e) => {
                    reasons.add(e);
                    None
                }
            }
        });
    }
    let mut streams = Vec::with_capacity(a.conns);
    // Every connect is bounded by 2*connect_t; the outer guard only protects against bugs.
    let guard = Instant::now()
        + connect_t * 2 * (1 + a.conns as u32 / a.max_inflight.max(1) as u32)
        + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(guard.into(), set.join_next()).await {
            Ok(Some(Ok(Some(ws)))) => streams.push(ws),
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                set.abort_all();
                reasons.add("connect: phase guard timeout");
                break;
            }
        }
    }
    let connected = streams.len();
    let connect_errors = a.conns - connected;
    let connect_secs = t_conn.elapsed().as_secs_f64();
    if connected == 0 {
        let js = format!(
            "{{\"mode\":\"echo\",\"label\":{},\"url\":{},\"conns\":{},\"connected\":0,\"connect_errors\":{},\"error_reasons\":{}}}",
            json_str(&a.label),
            json_str(&a.url),
            a.conns,
            connect_errors,
            reasons.json()
        );
        print_stdout_line(&js);
        return Err(format!(
            "no connection could be established: {}",
            reasons.human()
        ));
    }

    // Phase 2: closed-loop echo.
    let mut template = vec![0u8; a.size];
    for (i, b) in template.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let template = Bytes::from(template);
    let start = Instant::now();
    let warm_end = start + secs(a.warmup);
    let end = warm_end + secs(a.duration);
    let mut set = JoinSet::new();
    for (i, ws) in streams.into_iter().enumerate() {
        let reasons = reasons.clone();
        let template = template.clone();
        let cap = a.max_samples;
        set.spawn(echo_conn(
            ws,
            i as u64,
            template,
            a.payload,
            warm_end,
            end,
            op_t,
            cap,
            reasons,
            sign_key.clone(),
        ));
    }
    let mut results = Vec::with_capacity(connected);
    let guard = end + op_t * 2 + Duration::from_secs(10);
    let mut aborted = 0u64;
    loop {
        match tokio::time::timeout_at(guard.into(), set.join_next()).await {
            Ok(Some(Ok(r))) => results.push(r),
            Ok(Some(Err(_))) => aborted += 1,
            Ok(None) => break,
            Err(_) => {
                aborted += set.len() as u64;
                set.abort_all();
                reasons.add("run: task guard timeout (aborted)");
                break;
            }
        }
    }
    let elapsed_total = start.elapsed().as_secs_f64();
    let measured = secs(a.duration).as_secs_f64();
    let messages: u64 = results.iter().map(|r| r.messages).sum();
    let warmup_messages: u64 = results.iter().map(|r| r.warmup_messages).sum();
    let run_errors: u64 = results.iter().map(|r| r.errors).sum::<u64>() + aborted;
    let echoed: u64 = results.iter().map(|r| r.echoed).sum();
    let wire_bytes: u64 = results.iter().map(|r| r.wire_bytes).sum();
    let payload_bytes: u64 = results.iter().map(|r| r.payload_bytes).sum();
    let deflate_conns = results.iter().filter(|r| r.deflate).count();
    let per_msg = |b: u64| {
        if echoed > 0 {
            b as f64 / echoed as f64
        } else {
            f64::NAN
        }
    };
    let errors = run_errors + connect_errors as u64;
    let rate = if measured > 0.0 {
        messages as f64 / measured
    } else {
        f64::NAN
    };
    let samples: Vec<Samples> = results.into_iter().map(|r| r.samples).collect();
    let lat = percentiles(&samples);
    let (p50, p90, p99, p999, max, mean, stored) = match &lat {
        Some(l) => (
            l.p50.to_string(),
            l.p90.to_string(),
            l.p99.to_string(),
            l.p999.to_string(),
            l.max.to_string(),
            json_f(l.mean),
            l.stored,
        ),
        None => (
            "null".into(),
            "null".into(),
            "null".into(),
            "null".into(),
            "null".into(),
            "null".into(),
            0,
        ),
    };
    let js = format!(
        concat!(
            "{{\"mode\":\"echo\",\"label\":{},\"url\":{},\"signed\":{},\"conns\":{},\"connected\":{},\"size\":{},",
            "\"duration_s\":{},\"warmup_s\":{},\"connect_s\":{},\"elapsed_s\":{},",
            "\"messages\":{},\"warmup_messages\":{},\"msgs_per_sec\":{},",
            "\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{},\"mean_us\":{},",
            "\"latency_samples\":{},\"errors\":{},\"connect_errors\":{},\"run_errors\":{},\"error_reasons\":{},",
            "\"payload\":{},\"deflate\":{},\"deflate_conns\":{},\"echoed\":{},\"wire_bytes\":{},",
            "\"wire_bytes_per_msg\":{},\"payload_bytes_per_msg\":{}}}"
        ),
        json_str(&a.label),
        json_str(&a.url),
        sign_key.is_some(),
        a.conns,
        connected,
        a.size,
        json_f(measured),
        json_f(secs(a.warmup).as_secs_f64()),
        json_f(connect_secs),
        json_f(elapsed_total),
        messages,
        warmup_messages,
        json_f(rate),
        p50,
        p90,
        p99,
        p999,
        max,
        mean,
        stored,
        errors,
        connect_errors,
        run_errors,
        reasons.json(),
        json_str(match a.payload {
            Payload::Binary => "binary",
            Payload::Json => "json",
        }),
        a.deflate,
        deflate_conns,
        echoed,
        wire_bytes,
        json_f(per_msg(wire_bytes)),
        json_f(per_msg(payload_bytes)),
    );
    print_stdout_line(&js);
    let human = match &lat {
        Some(l) => format!(
            "echo{}{}{}: {} conns ({} connected), {} B msgs, {:.1}s: {} msgs, {:.0} msg/s, latency us p50={} p90={} p99={} p99.9={} max={}, wire B/msg={:.0}, errors={}{}",
            if a.label.is_empty() { String::new() } else { format!(" [{}]", a.label) },
            if sign_key.is_some() { " (signed)" } else { "" },
            if a.deflate { format!(" (deflate on {deflate_conns} conns)") } else { String::new() },
            a.conns,
            connected,
            a.size,
            measured,
            messages,
            rate,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            per_msg(wire_bytes),
            errors,
            if errors > 0 { format!(" ({})", reasons.human()) } else { String::new() }
        ),
        None => format!("echo: no message completed in the measurement window, errors={} ({})", errors, reasons.human()),
    };
    eprintln!("{human}");
    if messages == 0 {
        return Err("no echo completed in the measurement window".into());
    }
    Ok(())
}

/// One echo connection: tungstenite's, or the own client (`--deflate`).
enum Conn {
    Ws(Box<Ws>),
    Raw(Box<RawConn>),
}

impl Conn {
    async fn connect(
        target: &Target,
        deflate: bool,
        context_takeover: bool,
        cfg: WebSocketConfig,
        t: Duration,
    ) -> Result<Conn, String> {
        if deflate {
            RawConn::connect(target, context_takeover, t)
                .await
                .map(|c| Conn::Raw(Box::new(c)))
        } else {
            connect_ws(target, cfg, t)
                .await
                .map(|w| Conn::Ws(Box::new(w)))
        }
    }

    /// Wire bytes so far (read + written).
    fn wire(&self) -> u64 {
        match self {
            Conn::Ws(ws) => ws.get_ref().read + ws.get_ref().written,
            Conn::Raw(c) => c.read + c.written,
        }
    }

    fn deflate(&self) -> bool {
        matches!(self, Conn::Raw(c) if c.deflate)
    }

    async fn send(&mut self, text: bool, data: Bytes) -> Result<(), String> {
        match self {
            Conn::Ws(ws) => {
                let m = if text {
                    let t = String::from_utf8(data.to_vec()).map_err(|_| "text is not utf-8")?;
                    Message::text(t)
                } else {
                    Message::Binary(data)
                };
                ws.send(m).await.map_err(|e| short_ws_err(&e))
            }
            Conn::Raw(c) => {
                let op = if text {
                    frame::OP_TEXT
                } else {
                    frame::OP_BINARY
                };
                c.send(op, &data).await
            }
        }
    }

    /// The next data message: (is text, bytes). Pings are answered on the way.
    async fn recv(&mut self) -> Result<(bool, Bytes), String> {
        match self {
            Conn::Ws(ws) => loop {
                match ws.next().await {
                    None => return Err("connection closed".into()),
                    Some(Err(e)) => return Err(short_ws_err(&e)),
                    Some(Ok(Message::Binary(b))) => return Ok((false, b)),
                    Some(Ok(Message::Text(t))) => return Ok((true, Bytes::from(t))),
                    Some(Ok(Message::Close(cf))) => {
                        return Err(format!(
                            "close frame {}",
                            cf.map(|c| u16::from(c.code).to_string())
                                .unwrap_or_else(|| "-".into())
                        ))
                    }
                    // Pings are answered by tungstenite on the next poll.
                    Some(Ok(_)) => {}
                }
            },
            Conn::Raw(c) => c
                .next_message()
                .await
                .map(|(op, d)| (op == frame::OP_TEXT, Bytes::from(d))),
        }
    }

    /// Polite close, bounded.
    async fn close(&mut self) {
        match self {
            Conn::Ws(ws) => {
                let _ = timeout(Duration::from_secs(2), async {
                    let _ = WebSocketStream::close(&mut **ws, None).await;
                    while let Some(Ok(_)) = ws.next().await {}
                })
                .await;
            }
            Conn::Raw(c) => c.close().await,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn echo_conn(
    mut conn: Conn,
    id: u64,
    template: Bytes,
    payload_kind: Payload,
    warm_end: Instant,
    end: Instant,
    op_t: Duration,
    cap: usize,
    reasons: Arc<Reasons>,
    sign_key: Option<Arc<Key>>,
) -> ConnResult {
    let mut r = ConnResult {
        samples: Samples::new(cap, id + 1),
        messages: 0,
        warmup_messages: 0,
        errors: 0,
        echoed: 0,
        wire_bytes: 0,
        payload_bytes: 0,
        deflate: conn.deflate(),
    };
    let text = payload_kind == Payload::Json;
    let wire0 = conn.wire();
    let mut seq: u64 = id << 40;
    // c2s signing sequence: per connection, from 1.
    let mut sign_seq: u64 = 0;
    let mut healthy = true;
    'outer: while Instant::now() < end {
        // Stamp a per-connection sequence number so stale/duplicated echoes are detected.
        seq += 1;
        let payload = match payload_kind {
            Payload::Json => Bytes::from(json_payload(template.len(), seq)),
            Payload::Binary if template.len() >= 8 => {
                let mut b = BytesMut::from(&template[..]);
                b[..8].copy_from_slice(&seq.to_le_bytes());
                b.freeze()
            }
            Payload::Binary => template.clone(),
        };
        let t0 = Instant::now();
        let wire = match &sign_key {
            Some(k) => {
                sign_seq += 1;
                let ty = if text { MsgType::Text } else { MsgType::Binary };
                Bytes::from(sign::sign(
                    k,
                    Direction::C2s,
                    sign_seq,
                    sign::now_ms(),
                    "",
                    ty,
                    &payload,
                ))
            }
            None => payload.clone(),
        };
        match timeout(op_t, conn.send(text, wire)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                reasons.add(format!("send: {e}"));
                r.errors += 1;
                healthy = false;
                break;
            }
            Err(_) => {
                reasons.add("send: timeout");
                r.errors += 1;
                healthy = false;
                break;
            }
        }
        let deadline = t0 + op_t;
        loop {
            let (got_text, data) = match tokio::time::timeout_at(deadline.into(), conn.recv()).await
            {
                Err(_) => {
                    reasons.add("recv: timeout");
                    r.errors += 1;
                    healthy = false;
                    break 'outer;
                }
                Ok(Err(e)) => {
                    reasons.add(format!("recv: {e}"));
                    r.errors += 1;
                    healthy = false;
                    break 'outer;
                }
                Ok(Ok(m)) => m,
            };
            if got_text != text {
                reasons.add(if got_text {
                    "recv: unexpected text message"
                } else {
                    "recv: unexpected binary message"
                });
                r.errors += 1;
                continue;
            }
            let t1 = Instant::now();
            let got = if sign_key.is_some() {
                match strip_envelope(&data) {
                    Some(p) => p,
                    None => {
                        reasons.add("recv: malformed wsg1 envelope");
                        r.errors += 1;
                        continue;
                    }
                }
            } else {
                &data[..]
            };
            if got != &payload[..] {
                reasons.add("recv: echo mismatch");
                r.errors += 1;
                // Resynchronise by reading until our payload shows up (bounded by deadline).
                continue;
            }
            r.echoed += 1;
            r.payload_bytes += 2 * payload.len() as u64;
            if t1 > end {
                break 'outer;
            }
            if t1 >= warm_end {
                r.messages += 1;
                let us = (t1 - t0).as_micros().min(u32::MAX as u128) as u32;
                r.samples.record(us);
            } else {
                r.warmup_messages += 1;
            }
            break;
        }
    }
    r.wire_bytes = conn.wire().saturating_sub(wire0);
    if healthy {
        conn.close().await;
    }
    r
}

// ---------------------------------------------------------------------------
// idle: many open, quiet connections
// ---------------------------------------------------------------------------

fn client_cfg_idle() -> WebSocketConfig {
    // Keep the client process small: 4 KiB read buffer, no write buffering.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

#[derive(Default)]
struct IdleStats {
    opened: AtomicU64,
    open: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    pings: AtomicU64,
    attempted: AtomicU64,
    bursts: AtomicU64,
}

async fn run_idle(a: IdleArgs) -> Result<(), String> {
    if a.conns == 0 {
        return Err("--conns must be > 0".into());
    }
    let target = Arc::new(resolve_target(&a.url, &a.headers).await?);
    let stats = Arc::new(IdleStats::default());
    let reasons = Arc::new(Reasons::default());
    let connect_t = secs(a.connect_timeout);
    let rate = if a.rate.is_finite() && a.rate > 0.0 {
        a.rate
    } else {
        2000.0
    };
    let inflight = a.max_inflight.max(1);
    let burst_size = a.burst_size;
    let burst_every = a.burst_every.max(1);
    let sem = Arc::new(Semaphore::new(inflight));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut set = JoinSet::new();

    // Progress reporter (stderr), stops on its own once the stop flag flips.
    {
        let stats = stats.clone();
        let mut stop = stop_rx.clone();
        let n = a.conns;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = sleep(Duration::from_secs(2)) => {}
                    _ = stop.changed() => return,
                }
                eprintln!(
                    "idle: attempted={}/{} open={} failed={} dropped={}",
                    stats.attempted.load(Ordering::Relaxed),
                    n,
                    stats.open.load(Ordering::Relaxed),
                    stats.failed.load(Ordering::Relaxed),
                    stats.dropped.load(Ordering::Relaxed)
                );
            }
        });
    }

    let t0 = Instant::now();
    for i in 0..a.conns {
        sleep_until((t0 + Duration::from_secs_f64(i as f64 / rate)).into()).await;
        let permit = match sem.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => break,
        };
        stats.attempted.fetch_add(1, Ordering::Relaxed);
        let (target, stats, reasons, mut stop) = (
            target.clone(),
            stats.clone(),
            reasons.clone(),
            stop_rx.clone(),
        );
        let (deflate, takeover) = (a.deflate, a.context_takeover);
        set.spawn(async move {
            if deflate {
                let burst = if burst_size > 0 && i % burst_every == 0 {
                    burst_size
                } else {
                    0
                };
                idle_raw(&target, takeover, connect_t, burst, &stats, &reasons, permit, stop).await;
                return;
            }
            let res = connect_ws(&target, client_cfg_idle(), connect_t).await;
            // Account before releasing the permit, so READY (which waits for all
            // permits) sees final counters.
            let mut ws = match res {
                Ok(ws) => ws,
                Err(e) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    reasons.add(e);
                    drop(permit);
                    return;
                }
            };
            // The burst message (if any) is echoed while the permit is held, so READY
            // comes only after every burst has passed through.
            if burst_size > 0 && i % burst_every == 0 {
                let msg = Message::Binary(Bytes::from(vec![0x5a_u8; burst_size]));
                let echoed = timeout(connect_t * 3, async {
                    ws.send(msg).await.map_err(|e| short_ws_err(&e))?;
                    loop {
                        match ws.next().await {
                            Some(Ok(Message::Binary(b))) if b.len() == burst_size => return Ok(()),
                            Some(Ok(Message::Binary(b))) => return Err(format!("burst: echo of {} bytes", b.len())),
                            Some(Ok(Message::Close(cf))) => return Err(format!("burst: close frame {}", cf.map(|c| u16::from(c.code).to_string()).unwrap_or_else(|| "-".into()))),
                            Some(Ok(_)) => {}
                            Some(Err(e)) => return Err(format!("burst: {}", short_ws_err(&e))),
                            None => return Err("burst: connection closed".into()),
                        }
                    }
                })
                .await
                .unwrap_or_else(|_| Err("burst: timeout".into()));
                if let Err(e) = echoed {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    reasons.add(e);
                    drop(permit);
                    return;
                }
                stats.bursts.fetch_add(1, Ordering::Relaxed);
            }
            stats.opened.fetch_add(1, Ordering::Relaxed);
            stats.open.fetch_add(1, Ordering::Relaxed);
            drop(permit);
            // Keep polling the stream so pings are answered (tungstenite queues the pong
            // and flushes it on the next read) and closes/drops are noticed.
            let stopped = loop {
                tokio::select! {
                    m = ws.next() => match m {
                        Some(Ok(Message::Ping(_))) => { stats.pings.fetch_add(1, Ordering::Relaxed); }
                        Some(Ok(Message::Close(cf))) => {
                            reasons.add(format!("hold: close frame {}", cf.map(|c| u16::from(c.code).to_string()).unwrap_or_else(|| "-".into())));
                            // Let tungstenite finish the close handshake.
                            let _ = timeout(Duration::from_secs(2), async { while let Some(Ok(_)) = ws.next().await {} }).await;
                            break false;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => { reasons.add(format!("hold: {}", short_ws_err(&e))); break false; }
                        None => { reasons.add("hold: connection closed"); break false; }
                    },
                    _ = stop.changed() => break true,
                }
            };
            stats.open.fetch_sub(1, Ordering::Relaxed);
            if stopped {
                let _ = timeout(Duration::from_secs(3), async {
                    let _ = ws.close(None).await;
                    while let Some(Ok(_)) = ws.next().await {}
                })
                .await;
            } else {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    // Wait until every handshake finished (all permits back), bounded.
    let ramp_guard = connect_t * 2 + Duration::from_secs(5);
    let all_done = timeout(ramp_guard, sem.acquire_many(inflight as u32)).await;
    if all_done.is_err() {
        reasons.add("ramp: guard timeout waiting for handshakes");
    }
    let ramp_s = t0.elapsed().as_secs_f64();
    let open_ready = stats.open.load(Ordering::Relaxed);
    print_stdout_line(&format!("READY {open_ready}"));
    eprintln!(
        "idle: ramp done in {:.2}s: open={} failed={}{}",
        ramp_s,
        open_ready,
        stats.failed.load(Ordering::Relaxed),
        if stats.failed.load(Ordering::Relaxed) > 0 {
            format!(" ({})", reasons.human())
        } else {
            String::new()
        }
    );
    drop(all_done);

    if open_ready > 0 {
        sleep(secs(a.hold)).await;
    }

    let open_end = stats.open.load(Ordering::Relaxed);
    let opened = stats.opened.load(Ordering::Relaxed);
    let failed = stats.failed.load(Ordering::Relaxed);
    let dropped = stats.dropped.load(Ordering::Relaxed);
    let pings = stats.pings.load(Ordering::Relaxed);
    let js = format!(
        concat!(
            "{{\"mode\":\"idle\",\"label\":{},\"url\":{},\"conns\":{},\"opened\":{},\"open_at_ready\":{},",
            "\"open_at_end\":{},\"failed\":{},\"dropped\":{},\"pings_received\":{},\"bursts\":{},\"ramp_s\":{},\"hold_s\":{},",
            "\"error_reasons\":{}}}"
        ),
        json_str(&a.label),
        json_str(&a.url),
        a.conns,
        opened,
        open_ready,
        open_end,
        failed,
        dropped,
        pings,
        stats.bursts.load(Ordering::Relaxed),
        json_f(ramp_s),
        json_f(secs(a.hold).as_secs_f64()),
        reasons.json()
    );
    print_stdout_line(&js);
    eprintln!(
        "idle{}: {} requested, {} opened, {} open at end, {} failed, {} dropped during hold, {} pings answered{}",
        if a.label.is_empty() { String::new() } else { format!(" [{}]", a.label) },
        a.conns,
        opened,
        open_end,
        failed,
        dropped,
        pings,
        if failed + dropped > 0 { format!(" ({})", reasons.human()) } else { String::new() }
    );

    // Close everything, bounded.
    let _ = stop_tx.send(true);
    let closed_in_time = timeout(Duration::from_secs(10), async {
        while set.join_next().await.is_some() {}
    })
    .await;
    if closed_in_time.is_err() {
        set.abort_all();
    }
    if opened == 0 {
        return Err(format!(
            "no connection could be established: {}",
            reasons.human()
        ));
    }
    Ok(())
}

/// One idle connection of `idle --deflate` (own client): connect, optionally
/// echo one burst message, hold (answering pings) until `stop`, close.
#[allow(clippy::too_many_arguments)]
async fn idle_raw(
    target: &Target,
    takeover: bool,
    connect_t: Duration,
    burst: usize,
    stats: &IdleStats,
    reasons: &Reasons,
    permit: tokio::sync::OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) {
    let mut c = match RawConn::connect(target, takeover, connect_t).await {
        Ok(c) => c,
        Err(e) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            reasons.add(e);
            return;
        }
    };
    if !c.deflate {
        reasons.add("handshake: permessage-deflate not negotiated (info)");
    }
    if burst > 0 {
        let data = vec![0x5a_u8; burst];
        let echoed = timeout(connect_t * 3, async {
            c.send(frame::OP_BINARY, &data).await?;
            match c.next_message().await? {
                (_, b) if b == data => Ok(()),
                (_, b) => Err(format!("burst: echo of {} bytes", b.len())),
            }
        })
        .await
        .unwrap_or_else(|_| Err("burst: timeout".into()));
        if let Err(e) = echoed {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            reasons.add(e);
            return;
        }
        stats.bursts.fetch_add(1, Ordering::Relaxed);
    }
    stats.opened.fetch_add(1, Ordering::Relaxed);
    stats.open.fetch_add(1, Ordering::Relaxed);
    drop(permit);
    // The buffers of a held connection: keep the client small.
    c.rbuf = vec![0u8; 1024];
    let stopped = loop {
        let pings = c.pings;
        tokio::select! {
            m = c.next_event() => {
                stats.pings.fetch_add(c.pings - pings, Ordering::Relaxed);
                if let Err(e) = m {
                    reasons.add(format!("hold: {e}"));
                    break false;
                }
            }
            _ = stop.changed() => break true,
        }
    };
    stats.open.fetch_sub(1, Ordering::Relaxed);
    if stopped {
        let _ = timeout(Duration::from_secs(3), c.close()).await;
    } else {
        stats.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// echo-server: backend for benchmarks and Autobahn
// ---------------------------------------------------------------------------

async fn run_server(a: ServerArgs) -> Result<(), String> {
    let listener = TcpListener::bind(&a.listen)
        .await
        .map_err(|e| format!("bind {}: {e}", a.listen))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("local_addr: {e}"))?;
    print_stdout_line(&format!("LISTENING {local}"));
    // Small per-connection buffers (many idle sessions), eager writes; the frame
    // limit stays at tungstenite's default (16 MiB), the message limit is configurable.
    let cfg = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(a.max_message_size));
    let hs_t = secs(a.handshake_timeout).max(Duration::from_millis(100));
    let sign_key = match &a.sign_key_file {
        Some(p) => Some(Arc::new(load_key(p, &a.kid)?)),
        None => None,
    };
    let deflate_srv = a.deflate.then(|| {
        Arc::new(DeflateServer {
            settings: pmd_settings(a.context_takeover),
            max_message: a.max_message_size,
            budget: InflateBudget::new(usize::MAX / 2),
            sign_key: sign_key.clone(),
        })
    });
    loop {
        let (tcp, _peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // e.g. EMFILE: back off briefly instead of spinning.
                eprintln!("echo-server: accept: {e}");
                sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        if let Some(srv) = &deflate_srv {
            tokio::spawn(serve_deflate(tcp, srv.clone(), hs_t));
            continue;
        }
        let sign_key = sign_key.clone();
        tokio::spawn(async move {
            let mut ws = match timeout(
                hs_t,
                tokio_tungstenite::accept_async_with_config(tcp, Some(cfg)),
            )
            .await
            {
                Ok(Ok(ws)) => ws,
                _ => return,
            };
            // Echo data messages; tungstenite answers pings and replies to close
            // frames itself as long as the stream is polled, and ends the stream
            // (None / ConnectionClosed) once the close handshake is done. On a
            // protocol error the connection is simply dropped ("fail the connection").
            // s2c signing sequence: per connection, from 1.
            let mut sign_seq: u64 = 0;
            while let Some(msg) = ws.next().await {
                match msg {
                    Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                        let m = match &sign_key {
                            None => m,
                            Some(k) => {
                                sign_seq += 1;
                                match sign_reply(k, sign_seq, m) {
                                    Some(m) => m,
                                    // Malformed envelope: fail the connection.
                                    None => break,
                                }
                            }
                        };
                        if ws.send(m).await.is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
    }
}

/// Signed echo: strip the incoming envelope (if any), sign the payload s2c with
/// `seq` and ts = now, keep the frame type.
fn sign_reply(key: &Key, seq: u64, m: Message) -> Option<Message> {
    let (ty, data): (MsgType, Bytes) = match m {
        Message::Text(t) => (MsgType::Text, Bytes::from(t)),
        Message::Binary(b) => (MsgType::Binary, b),
        _ => return None,
    };
    let payload = strip_envelope(&data)?;
    let out = sign::sign(key, Direction::S2c, seq, sign::now_ms(), "", ty, payload);
    Some(match ty {
        // The envelope is ASCII and the payload was the tail of a valid UTF-8 text
        // message after an ASCII newline, so this cannot fail.
        MsgType::Text => Message::Text(out.try_into().ok()?),
        MsgType::Binary => Message::Binary(Bytes::from(out)),
    })
}

// ---------------------------------------------------------------------------
// permessage-deflate (RFC 7692): own handshake and framing, built from
// wsguard's `frame` and `compression` modules (tungstenite has no
// permessage-deflate). Used by `echo-server --deflate`, `echo --deflate` and
// `idle --deflate`.
// ---------------------------------------------------------------------------

/// Largest HTTP head (request or response) read during a handshake.
const MAX_HEAD: usize = 8 * 1024;
/// Read buffer of a raw connection.
const RAW_READ_BUF: usize = 8 * 1024;

fn pmd_settings(context_takeover: bool) -> Settings {
    Settings {
        context_takeover,
        max_window_bits: 15,
    }
}

/// Reads an HTTP head (up to and including the empty line) into `buf`, at
/// most [`MAX_HEAD`] bytes; returns its length. Whatever followed it stays
/// in `buf` after the head.
async fn read_head(
    tcp: &mut TcpStream,
    buf: &mut Vec<u8>,
    read: &mut u64,
) -> Result<usize, String> {
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(pos + 4);
        }
        if buf.len() >= MAX_HEAD {
            return Err("http head too large".into());
        }
        let n = tcp
            .read(&mut chunk)
            .await
            .map_err(|e| format!("io {}", io_kind(&e)))?;
        if n == 0 {
            return Err("connection closed during the handshake".into());
        }
        *read += n as u64;
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
}

/// Whether a comma-separated header value contains `token` (case-insensitive).
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Why a raw connection stops decoding.
enum Stop {
    Frame(FrameError),
    Inflate(InflateError),
    /// The peer's close frame (validated); its payload.
    Close(Vec<u8>),
}

impl From<FrameError> for Stop {
    fn from(e: FrameError) -> Self {
        Stop::Frame(e)
    }
}

impl Stop {
    /// The close frame payload to answer with.
    fn answer(&self) -> Vec<u8> {
        let (code, reason): (u16, &str) = match self {
            Stop::Close(p) => return p.clone(),
            Stop::Frame(e) => (e.code(), e.reason()),
            Stop::Inflate(e) => (
                e.close_code(),
                match e {
                    InflateError::TooBig { .. } => "message too big",
                    InflateError::Busy => "busy",
                    InflateError::Corrupt(_) => "invalid compressed data",
                },
            ),
        };
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason.as_bytes());
        p
    }

    fn describe(&self) -> String {
        match self {
            Stop::Close(p) => match frame::parse_close(p) {
                Ok(Some((code, _))) => format!("close frame {code}"),
                _ => "close frame -".into(),
            },
            Stop::Frame(e) => format!("protocol: {e}"),
            Stop::Inflate(e) => format!("inflate: {e}"),
        }
    }
}

/// What the decoder delivered, in order.
enum Event {
    Message(u8, Vec<u8>),
    Ping(Vec<u8>),
}

/// A frame sink that assembles data messages (inflating compressed ones)
/// and queues them and pings, in arrival order.
struct Assembler {
    max: usize,
    budget: Arc<InflateBudget>,
    inflater: Option<Inflater>,
    op: u8,
    compressed: bool,
    plain: Vec<u8>,
    inflated: Option<Inflated>,
    events: std::collections::VecDeque<Event>,
}

impl Assembler {
    fn new(max: usize, budget: Arc<InflateBudget>, inflater: Option<Inflater>) -> Self {
        Assembler {
            max,
            budget,
            inflater,
            op: frame::OP_BINARY,
            compressed: false,
            plain: Vec::new(),
            inflated: None,
            events: std::collections::VecDeque::new(),
        }
    }

    fn inflate(&mut self, data: &[u8], fin: bool) -> Result<(), Stop> {
        let (Some(inf), Some(out)) = (self.inflater.as_mut(), self.inflated.as_mut()) else {
            return Err(Stop::Frame(FrameError::Protocol(
                "compressed message without the extension",
            )));
        };
        inf.inflate_into(data, fin, self.max, out)
            .map_err(Stop::Inflate)
    }
}

impl FrameSink for Assembler {
    type Error = Stop;

    fn frame_start(&mut self, h: &Header, message_op: u8, first: bool) -> Result<(), Stop> {
        if first {
            self.op = message_op;
            self.compressed = h.rsv & 0b100 != 0;
            if self.compressed {
                self.inflated = Some(Inflated::new(&self.budget));
            } else {
                self.plain.clear();
            }
        }
        Ok(())
    }

    fn payload(&mut self, data: &[u8]) -> Result<(), Stop> {
        if self.compressed {
            self.inflate(data, false)
        } else {
            // The decoder enforced the message limit on the wire bytes.
            self.plain.extend_from_slice(data);
            Ok(())
        }
    }

    fn frame_end(&mut self, fin: bool) -> Result<(), Stop> {
        if !fin {
            return Ok(());
        }
        let data = if self.compressed {
            self.inflate(&[], true)?;
            let data = match self.inflated.take() {
                Some(i) => i.into_parts().0,
                None => Vec::new(),
            };
            if self.op == frame::OP_TEXT && std::str::from_utf8(&data).is_err() {
                return Err(Stop::Frame(FrameError::Utf8));
            }
            data
        } else {
            std::mem::take(&mut self.plain)
        };
        self.events.push_back(Event::Message(self.op, data));
        Ok(())
    }

    fn control(&mut self, opcode: u8, payload: &[u8]) -> Result<(), Stop> {
        match opcode {
            frame::OP_PING => {
                self.events.push_back(Event::Ping(payload.to_vec()));
                Ok(())
            }
            frame::OP_CLOSE => {
                frame::parse_close(payload)?;
                Err(Stop::Close(payload.to_vec()))
            }
            _ => Ok(()),
        }
    }
}

/// Writes frames: masked (client) or not (server), data messages deflated
/// when a deflater was negotiated.
struct FrameWriter {
    masked: bool,
    deflater: Option<Deflater>,
    scratch: Vec<u8>,
}

impl FrameWriter {
    fn mask(&self) -> Option<[u8; 4]> {
        self.masked.then(rand::random::<[u8; 4]>)
    }

    fn message(&mut self, out: &mut Vec<u8>, op: u8, data: &[u8]) -> Result<(), String> {
        let mask = self.mask();
        match self.deflater.as_mut() {
            Some(d) => {
                self.scratch.clear();
                d.deflate(data, true, &mut self.scratch)
                    .map_err(|e| format!("deflate: {e}"))?;
                frame::write_header(out, true, 0b100, op, self.scratch.len() as u64, mask);
                match mask {
                    Some(k) => frame::mask_extend(out, &self.scratch, k, 0),
                    None => out.extend_from_slice(&self.scratch),
                }
                if self.scratch.capacity() > 256 * 1024 {
                    self.scratch = Vec::new();
                }
            }
            None => frame::write_frame(out, true, op, data, mask),
        }
        Ok(())
    }

    fn control(&mut self, out: &mut Vec<u8>, op: u8, payload: &[u8]) {
        let p = payload
            .get(..payload.len().min(frame::MAX_CONTROL))
            .unwrap_or_default();
        let mask = self.mask();
        frame::write_frame(out, true, op, p, mask);
    }
}

/// Sends what is left of a close handshake: `close` (if any) is written, the
/// write side shut down, and the socket drained until the peer closes (at
/// most 2 s), so the close frame is not lost to a reset.
async fn finish_close(tcp: &mut TcpStream, out: &mut Vec<u8>) {
    let _ = timeout(Duration::from_secs(2), async {
        if !out.is_empty() && tcp.write_all(out).await.is_err() {
            return;
        }
        out.clear();
        let _ = tcp.shutdown().await;
        let mut sink = [0u8; 4096];
        while let Ok(n) = tcp.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

// --- server ------------------------------------------------------------------

struct DeflateServer {
    settings: Settings,
    max_message: usize,
    budget: Arc<InflateBudget>,
    sign_key: Option<Arc<Key>>,
}

/// Server handshake: returns the negotiated parameters (None: no compression)
/// and the bytes that followed the request.
async fn server_handshake(
    tcp: &mut TcpStream,
    srv: &DeflateServer,
) -> Result<(Option<HopParams>, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(1024);
    let mut read = 0;
    let head = read_head(tcp, &mut buf, &mut read).await?;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let parsed = req.parse(buf.get(..head).unwrap_or_default());
    let checked: Result<(String, Option<negotiate::Accepted>), &str> = match parsed {
        Ok(httparse::Status::Complete(_)) => {
            let hdr = |name: &'static str| {
                req.headers
                    .iter()
                    .filter(move |h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| h.value)
            };
            let key = hdr("sec-websocket-key").next();
            if req.method != Some("GET") {
                Err("method")
            } else if !hdr("upgrade").any(|v| has_token(v, "websocket")) {
                Err("upgrade")
            } else if !hdr("connection").any(|v| has_token(v, "upgrade")) {
                Err("connection")
            } else if hdr("sec-websocket-version").next() != Some(b"13".as_slice()) {
                Err("version")
            } else if let Some(key) = key {
                let accept =
                    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.trim_ascii());
                let answer =
                    negotiate::answer_client(hdr("sec-websocket-extensions"), Some(&srv.settings));
                Ok((accept, answer))
            } else {
                Err("key")
            }
        }
        _ => Err("request"),
    };
    match checked {
        Err(what) => {
            let _ = tcp
                .write_all(b"HTTP/1.1 400 Bad Request\r\nSec-WebSocket-Version: 13\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await;
            Err(format!("bad upgrade request ({what})"))
        }
        Ok((accept, answer)) => {
            let mut resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
            );
            if let Some(a) = &answer {
                resp.push_str("Sec-WebSocket-Extensions: ");
                resp.push_str(&a.response);
                resp.push_str("\r\n");
            }
            resp.push_str("\r\n");
            tcp.write_all(resp.as_bytes())
                .await
                .map_err(|e| format!("io {}", io_kind(&e)))?;
            buf.drain(..head);
            Ok((answer.map(|a| a.params), buf))
        }
    }
}

/// One connection of `echo-server --deflate`.
async fn serve_deflate(mut tcp: TcpStream, srv: Arc<DeflateServer>, hs_t: Duration) {
    let (params, leftover) = match timeout(hs_t, server_handshake(&mut tcp, &srv)).await {
        Ok(Ok(x)) => x,
        _ => return,
    };
    let max = srv.max_message;
    let mut dec = Decoder::new(Rules {
        masked: true,
        allow_rsv1: params.is_some(),
        max_frame: max as u64,
        max_message: max as u64,
    });
    let mut asm = Assembler::new(
        max,
        srv.budget.clone(),
        params.map(|p| Inflater::new(p.recv_window_bits, p.recv_context_takeover)),
    );
    let mut w = FrameWriter {
        masked: false,
        deflater: params.and_then(|p| Deflater::new(p.send_window_bits, p.send_context_takeover)),
        scratch: Vec::new(),
    };
    let mut rbuf = vec![0u8; RAW_READ_BUF];
    let mut pending = leftover;
    let mut out: Vec<u8> = Vec::new();
    let mut sign_seq: u64 = 0;
    loop {
        let r = if !pending.is_empty() {
            let mut p = std::mem::take(&mut pending);
            dec.feed(&mut p, &mut asm)
        } else {
            match tcp.read(&mut rbuf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => match rbuf.get_mut(..n) {
                    Some(b) => dec.feed(b, &mut asm),
                    None => return,
                },
            }
        };
        let mut stop = r.err();
        while let Some(ev) = asm.events.pop_front() {
            match ev {
                Event::Ping(p) => w.control(&mut out, frame::OP_PONG, &p),
                Event::Message(op, data) => {
                    let data = match &srv.sign_key {
                        None => data,
                        Some(k) => {
                            sign_seq += 1;
                            let ty = if op == frame::OP_TEXT {
                                MsgType::Text
                            } else {
                                MsgType::Binary
                            };
                            match strip_envelope(&data) {
                                Some(p) => sign::sign(
                                    k,
                                    Direction::S2c,
                                    sign_seq,
                                    sign::now_ms(),
                                    "",
                                    ty,
                                    p,
                                ),
                                None => {
                                    stop = Some(Stop::Frame(FrameError::BadData(
                                        "malformed wsg1 envelope",
                                    )));
                                    break;
                                }
                            }
                        }
                    };
                    if w.message(&mut out, op, &data).is_err() {
                        stop = Some(Stop::Frame(FrameError::BadData("deflate failed")));
                        break;
                    }
                }
            }
        }
        if let Some(stop) = stop {
            w.control(&mut out, frame::OP_CLOSE, &stop.answer());
            finish_close(&mut tcp, &mut out).await;
            return;
        }
        if !out.is_empty() {
            if tcp.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
            if out.capacity() > 256 * 1024 {
                out = Vec::new();
            }
        }
    }
}

// --- client --------------------------------------------------------------------

/// A client connection with its own framing (for `--deflate`).
struct RawConn {
    tcp: TcpStream,
    dec: Decoder,
    asm: Assembler,
    w: FrameWriter,
    rbuf: Vec<u8>,
    pending: Vec<u8>,
    out: Vec<u8>,
    /// Whether permessage-deflate was negotiated.
    deflate: bool,
    /// Bytes read from / written to the socket.
    read: u64,
    written: u64,
    pings: u64,
    /// The connection failed or closed: do not use it further.
    done: bool,
    /// Why, when it was a close frame or a protocol error.
    failure: Option<String>,
}

impl RawConn {
    async fn connect(
        target: &Target,
        context_takeover: bool,
        t: Duration,
    ) -> Result<RawConn, String> {
        let tcp = dial(target, t).await?;
        match timeout(t, Self::handshake(tcp, target, context_takeover)).await {
            Err(_) => Err("handshake: timeout".into()),
            Ok(r) => r.map_err(|e| format!("handshake: {e}")),
        }
    }

    async fn handshake(
        mut tcp: TcpStream,
        target: &Target,
        context_takeover: bool,
    ) -> Result<RawConn, String> {
        let settings = pmd_settings(context_takeover);
        let uri: Uri = target.url.parse().map_err(|e| format!("bad url: {e}"))?;
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let path = if path.is_empty() { "/" } else { path };
        let host = uri.authority().map(|a| a.as_str()).unwrap_or("localhost");
        let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        );
        if let Some(offer) = negotiate::offer_to_backend(Some(&settings)) {
            req.push_str("Sec-WebSocket-Extensions: ");
            req.push_str(&offer);
            req.push_str("\r\n");
        }
        for (n, v) in &target.headers {
            if n.contains(['\r', '\n']) || v.contains(['\r', '\n']) {
                return Err(format!("bad header {n:?}"));
            }
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        tcp.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("io {}", io_kind(&e)))?;
        let written = req.len() as u64;
        let mut read = 0;
        let mut buf = Vec::with_capacity(1024);
        let head = read_head(&mut tcp, &mut buf, &mut read).await?;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(buf.get(..head).unwrap_or_default()) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return Err("malformed http response".into()),
        }
        if resp.code != Some(101) {
            return Err(format!("http status {}", resp.code.unwrap_or(0)));
        }
        let hdr = |name: &'static str| {
            resp.headers
                .iter()
                .filter(move |h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value)
        };
        let want = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        if hdr("sec-websocket-accept").next().map(|v| v.trim_ascii()) != Some(want.as_bytes()) {
            return Err("bad Sec-WebSocket-Accept".into());
        }
        let params =
            negotiate::accept_backend_response(hdr("sec-websocket-extensions"), Some(&settings))
                .map_err(|e| format!("extension answer: {e}"))?;
        buf.drain(..head);
        let max = 64 << 20;
        Ok(RawConn {
            tcp,
            dec: Decoder::new(Rules {
                masked: false,
                allow_rsv1: params.is_some(),
                max_frame: max as u64,
                max_message: max as u64,
            }),
            asm: Assembler::new(
                max,
                InflateBudget::new(usize::MAX / 2),
                params.map(|p| Inflater::new(p.recv_window_bits, p.recv_context_takeover)),
            ),
            w: FrameWriter {
                masked: true,
                deflater: params
                    .and_then(|p| Deflater::new(p.send_window_bits, p.send_context_takeover)),
                scratch: Vec::new(),
            },
            rbuf: vec![0u8; RAW_READ_BUF],
            pending: buf,
            out: Vec::new(),
            deflate: params.is_some(),
            read,
            written,
            pings: 0,
            done: false,
            failure: None,
        })
    }

    async fn flush(&mut self) -> Result<(), String> {
        if self.out.is_empty() {
            return Ok(());
        }
        let r = self.tcp.write_all(&self.out).await;
        self.written += self.out.len() as u64;
        self.out.clear();
        r.map_err(|e| {
            self.done = true;
            format!("io {}", io_kind(&e))
        })
    }

    async fn send(&mut self, op: u8, data: &[u8]) -> Result<(), String> {
        self.w.message(&mut self.out, op, data)?;
        self.flush().await
    }

    /// The next data message; pings are answered on the way.
    async fn next_message(&mut self) -> Result<(u8, Vec<u8>), String> {
        loop {
            if let Some(m) = self.next_event().await? {
                return Ok(m);
            }
        }
    }

    /// The next data message, or `None` after a ping was answered or a read
    /// completed no message. Messages that arrived before a close or an error
    /// are still delivered; then the close or error is.
    async fn next_event(&mut self) -> Result<Option<(u8, Vec<u8>)>, String> {
        if let Some(ev) = self.asm.events.pop_front() {
            return match ev {
                Event::Message(op, data) => Ok(Some((op, data))),
                Event::Ping(p) => {
                    self.pings += 1;
                    if !self.done {
                        self.w.control(&mut self.out, frame::OP_PONG, &p);
                        self.flush().await?;
                    }
                    Ok(None)
                }
            };
        }
        if self.done {
            return Err(self
                .failure
                .clone()
                .unwrap_or_else(|| "connection closed".into()));
        }
        let r = if !self.pending.is_empty() {
            let mut p = std::mem::take(&mut self.pending);
            self.dec.feed(&mut p, &mut self.asm)
        } else {
            let n = match self.tcp.read(&mut self.rbuf).await {
                Ok(0) => {
                    self.done = true;
                    return Err("connection closed".into());
                }
                Ok(n) => n,
                Err(e) => {
                    self.done = true;
                    return Err(format!("io {}", io_kind(&e)));
                }
            };
            self.read += n as u64;
            match self.rbuf.get_mut(..n) {
                Some(b) => self.dec.feed(b, &mut self.asm),
                None => Ok(()),
            }
        };
        if let Err(stop) = r {
            // Answer (echo a close, or close with the error's code), then stop.
            self.done = true;
            self.failure = Some(stop.describe());
            self.w
                .control(&mut self.out, frame::OP_CLOSE, &stop.answer());
            self.written += self.out.len() as u64;
            finish_close(&mut self.tcp, &mut self.out).await;
        }
        Ok(None)
    }

    /// Polite close: send a close frame, wait (bounded) for the peer's.
    async fn close(&mut self) {
        if self.done {
            return;
        }
        self.w
            .control(&mut self.out, frame::OP_CLOSE, &1000u16.to_be_bytes());
        if self.flush().await.is_err() {
            return;
        }
        let _ = timeout(Duration::from_secs(2), async {
            while self.next_message().await.is_ok() {}
        })
        .await;
    }
}

/// A JSON-like, compressible message of exactly `size` bytes (for `size` >= 2):
/// an array of small quote objects whose values vary with `seq`.
fn json_payload(size: usize, seq: u64) -> Vec<u8> {
    use std::fmt::Write as _;
    const SYMS: [&str; 8] = [
        "AAPL", "MSFT", "GOOG", "AMZN", "TSLA", "NVDA", "META", "NFLX",
    ];
    if size < 2 {
        return vec![b' '; size];
    }
    let mut s = String::with_capacity(size + 160);
    let mut obj = String::with_capacity(160);
    s.push('[');
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut i: u64 = 0;
    loop {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        obj.clear();
        let _ = write!(
            obj,
            "{{\"id\":{},\"sym\":\"{}\",\"px\":{}.{:02},\"qty\":{},\"side\":\"{}\",\"venue\":\"XNAS\"}}",
            seq.wrapping_mul(1000).wrapping_add(i),
            SYMS[(x % 8) as usize],
            100 + x % 900,
            (x >> 12) % 100,
            ((x >> 20) % 50 + 1) * 10,
            if (x >> 40) & 1 == 0 { "buy" } else { "sell" }
        );
        let sep = usize::from(i > 0);
        if s.len() + sep + obj.len() + 1 > size {
            break;
        }
        if sep == 1 {
            s.push(',');
        }
        s.push_str(&obj);
        i += 1;
    }
    while s.len() + 1 < size {
        s.push(' ');
    }
    s.push(']');
    s.into_bytes()
}
