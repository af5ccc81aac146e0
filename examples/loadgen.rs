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
//! Only uses crates that are dependencies of wsguard (tokio, tokio-tungstenite,
//! futures-util, bytes, clap) plus std, and the `wsguard::sign` module.
//!
//! Examples:
//!   loadgen echo-server --listen 127.0.0.1:0
//!   loadgen echo --url ws://127.0.0.1:9000/ --conns 100 --size 64 --duration 10 --warmup 2
//!   loadgen idle --url ws://127.0.0.1:9000/ --conns 5000 --hold 20 --rate 2000
//!   loadgen echo-server --listen 127.0.0.1:0 --sign-key-file upstream.key --kid p1
//!   loadgen echo --url ws://127.0.0.1:8080/ --sign-key-file client.key --kid c1

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
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use wsguard::sign::{self, Direction, Key, MsgType};

type Ws = WebSocketStream<TcpStream>;

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

/// Connect TCP (nodelay) and run the client handshake, each step bounded by `t`.
async fn connect_ws(target: &Target, cfg: WebSocketConfig, t: Duration) -> Result<Ws, String> {
    let tcp = match timeout(t, TcpStream::connect(target.addr)).await {
        Err(_) => return Err("connect: timeout".into()),
        Ok(Err(e)) => return Err(format!("connect: {}", io_kind(&e))),
        Ok(Ok(s)) => s,
    };
    tcp.set_nodelay(true)
        .map_err(|e| format!("connect: set_nodelay: {e}"))?;
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
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.ok()?;
            match connect_ws(&target, client_cfg_echo(), connect_t).await {
                Ok(ws) => Some(ws),
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
            "\"latency_samples\":{},\"errors\":{},\"connect_errors\":{},\"run_errors\":{},\"error_reasons\":{}}}"
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
        reasons.json()
    );
    print_stdout_line(&js);
    let human = match &lat {
        Some(l) => format!(
            "echo{}{}: {} conns ({} connected), {} B msgs, {:.1}s: {} msgs, {:.0} msg/s, latency us p50={} p90={} p99={} p99.9={} max={}, errors={}{}",
            if a.label.is_empty() { String::new() } else { format!(" [{}]", a.label) },
            if sign_key.is_some() { " (signed)" } else { "" },
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

#[allow(clippy::too_many_arguments)]
async fn echo_conn(
    mut ws: Ws,
    id: u64,
    template: Bytes,
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
    };
    let mut seq: u64 = id << 40;
    // c2s signing sequence: per connection, from 1.
    let mut sign_seq: u64 = 0;
    let mut healthy = true;
    'outer: while Instant::now() < end {
        // Stamp a per-connection sequence number so stale/duplicated echoes are detected.
        seq += 1;
        let payload = if template.len() >= 8 {
            let mut b = BytesMut::from(&template[..]);
            b[..8].copy_from_slice(&seq.to_le_bytes());
            b.freeze()
        } else {
            template.clone()
        };
        let t0 = Instant::now();
        let wire = match &sign_key {
            Some(k) => {
                sign_seq += 1;
                Bytes::from(sign::sign(
                    k,
                    Direction::C2s,
                    sign_seq,
                    sign::now_ms(),
                    "",
                    MsgType::Binary,
                    &payload,
                ))
            }
            None => payload.clone(),
        };
        match timeout(op_t, ws.send(Message::Binary(wire))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                reasons.add(format!("send: {}", short_ws_err(&e)));
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
            match tokio::time::timeout_at(deadline.into(), ws.next()).await {
                Err(_) => {
                    reasons.add("recv: timeout");
                    r.errors += 1;
                    healthy = false;
                    break 'outer;
                }
                Ok(None) => {
                    reasons.add("recv: connection closed");
                    r.errors += 1;
                    healthy = false;
                    break 'outer;
                }
                Ok(Some(Err(e))) => {
                    reasons.add(format!("recv: {}", short_ws_err(&e)));
                    r.errors += 1;
                    healthy = false;
                    break 'outer;
                }
                // Pings are answered by tungstenite on the next poll; just keep reading.
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => continue,
                Ok(Some(Ok(Message::Close(cf)))) => {
                    reasons.add(format!(
                        "recv: close frame {}",
                        cf.map(|c| u16::from(c.code).to_string())
                            .unwrap_or_else(|| "-".into())
                    ));
                    r.errors += 1;
                    healthy = false;
                    break 'outer;
                }
                Ok(Some(Ok(Message::Text(_)))) => {
                    reasons.add("recv: unexpected text message");
                    r.errors += 1;
                    continue;
                }
                Ok(Some(Ok(Message::Binary(data)))) => {
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
        }
    }
    if healthy {
        // Polite close, bounded.
        let _ = timeout(Duration::from_secs(2), async {
            let _ = ws.close(None).await;
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
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
        set.spawn(async move {
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
