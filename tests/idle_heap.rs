//! Heap held per idle proxied session, counted by a global allocator,
//! deterministically (no RSS, no timing). Issue 12's target is at most
//! 4 KiB; it is met, and the test asserts it (see `TARGET` for the figures
//! and where the bytes go).
//!
//! Its own test binary, so that the counting allocator sees this test and
//! nothing else, and so that `unsafe impl GlobalAlloc` stays out of the
//! library (which forbids unsafe code).
//!
//! How the proxy's share is separated from the clients' and the backend's:
//! the clients and the backend are raw sockets driven by this file (no
//! WebSocket library: an idle client is a `TcpStream` in a preallocated
//! `Vec`; an idle backend connection is one small task), and the same N
//! sessions are measured twice, in one process, one after the other:
//!
//! 1. **direct**: N clients straight to the backend. The heap that grows
//!    while they are open, over N, is what a client and a backend
//!    connection hold (`direct`).
//! 2. **proxied**: N clients through wsguard to the same backend, one 1 MiB
//!    message echoed through a few of them first. Growth over N, minus
//!    `direct`, is what wsguard holds per session, both hops (`proxy`).
//!
//! Before either, a warm-up opens sessions of both kinds and pushes 1 MiB
//! through each proxied one, and keeps them open: what is allocated once
//! per process or per thread (the engine's per-thread scratch buffers,
//! metric families, the per-IP entry, the runtime's own structures) is
//! then already there and is not charged to the measured sessions. Every
//! measured session has completed a small echo before the count is read,
//! so its engine is running and idle; the runtime is current-thread, so
//! nothing runs while the count is read. Keepalive is on (the defaults:
//! 25 s pings both ways), so its timers are part of the measured state.
use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wsguard::frame::{self, Decoder, FrameError, Header, Rules, Sink};

/// Counts live heap bytes and a histogram of live allocations by size.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
/// Live allocations by size class: <=64, <=128, <=256, <=512, <=1K, <=2K,
/// <=4K, <=8K, <=16K, <=64K, larger.
static BY_SIZE: [AtomicIsize; 11] = [const { AtomicIsize::new(0) }; 11];
static BY_SIZE_BYTES: [AtomicIsize; 11] = [const { AtomicIsize::new(0) }; 11];
/// Live allocations by exact size, for sizes below 8 KiB.
static BY_EXACT: [AtomicIsize; 8192] = [const { AtomicIsize::new(0) }; 8192];

fn class(size: usize) -> usize {
    const LIMITS: [usize; 10] = [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536];
    LIMITS.iter().position(|&l| size <= l).unwrap_or(10)
}

fn count(size: usize, sign: isize) {
    let s = size as isize * sign;
    LIVE.fetch_add(s, Relaxed);
    let c = class(size);
    BY_SIZE[c].fetch_add(sign, Relaxed);
    BY_SIZE_BYTES[c].fetch_add(s, Relaxed);
    if let Some(e) = BY_EXACT.get(size) {
        e.fetch_add(sign, Relaxed);
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counters are atomics and allocate nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size(), 1);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size(), 1);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        count(layout.size(), -1);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(layout.size(), -1);
            count(new_size, 1);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Live heap bytes and the per-size-class counts, read together.
struct Snapshot {
    live: isize,
    n: [isize; 11],
    bytes: [isize; 11],
    exact: Vec<isize>,
}

/// Reads the counters. `exact` is allocated by the caller before any
/// measurement starts (with room for 8192 entries), so that reading the
/// counters allocates nothing.
fn snapshot(mut exact: Vec<isize>) -> Snapshot {
    exact.clear();
    exact.extend(BY_EXACT.iter().map(|e| e.load(Relaxed)));
    Snapshot {
        live: LIVE.load(Relaxed),
        n: std::array::from_fn(|i| BY_SIZE[i].load(Relaxed)),
        bytes: std::array::from_fn(|i| BY_SIZE_BYTES[i].load(Relaxed)),
        exact,
    }
}

/// "class: +count allocations, +bytes" per session, for the classes that
/// grew between `a` and `b`, then the exact sizes (below 8 KiB) of which at
/// least one allocation per two sessions was added.
fn breakdown(a: &Snapshot, b: &Snapshot, sessions: usize) -> String {
    let exact: String = (0..a.exact.len().min(b.exact.len()))
        .filter(|&i| (b.exact[i] - a.exact[i]).unsigned_abs() * 2 >= sessions)
        .map(|i| {
            format!(
                "{i} B x {:+.2}, ",
                (b.exact[i] - a.exact[i]) as f64 / sessions as f64
            )
        })
        .collect();
    format!("{}    exact sizes: {exact}\n", classes(a, b, sessions))
}

fn classes(a: &Snapshot, b: &Snapshot, sessions: usize) -> String {
    const NAMES: [&str; 11] = [
        "<=64", "<=128", "<=256", "<=512", "<=1K", "<=2K", "<=4K", "<=8K", "<=16K", "<=64K", ">64K",
    ];
    let n = sessions as f64;
    (0..11)
        .filter(|&i| b.n[i] != a.n[i] || b.bytes[i] != a.bytes[i])
        .map(|i| {
            format!(
                "  {:>6}: {:+.2} allocations, {:+.0} bytes per session\n",
                NAMES[i],
                (b.n[i] - a.n[i]) as f64 / n,
                (b.bytes[i] - a.bytes[i]) as f64 / n
            )
        })
        .collect()
}

/// Issue 12's target: at most 4 KiB of heap per idle proxied session.
///
/// **The target is met** and is what this test asserts. Measured after the
/// commits that met it (rustc 1.95, tokio 1.54): 2,821 B per session in a
/// debug build, 2,813 B in a release build. The commit before them
/// (1c743de) had 5,349 B and 5,325 B (4,645 B and 4,685 B on commit
/// 13e77c0, before permessage-deflate and the shared limits grew the
/// session future). Where it goes (release; the breakdown this test
/// prints):
///
/// - one 1,920 B allocation, the same in debug (2,048 B since the
///   pass-through state of issue 13, 16 B per direction: 2,949 B per
///   session in a debug build, with or without compression negotiated):
///   the task that runs
///   `session::run` (tokio's task cell, 128-byte aligned, around the
///   session future: both hops' decoders, the engine's state, the
///   keepalive tickers, the shutdown signal, `SessionInfo`). It was
///   4,480 B: the shared-slot release (a Redis round trip, ~1 KiB of
///   future state) is boxed now; `run`'s arguments come in one box freed
///   at the start instead of being kept beside the locals they move into;
///   the inflater and deflater are boxed (a pointer each when compression
///   is off); the idle and wall-clock timers (off by default) are boxed
///   when set instead of two `Sleep`s inline; and a control frame is
///   buffered on the heap only while a read has cut it, not in 125 B
///   inline per direction;
/// - two 256 B allocations: tokio's registration of the two sockets wsguard
///   holds (client hop and backend hop);
/// - two 112 B: the keepalive tickers' timers (a `tokio::time::Interval`
///   boxes its `Sleep`), one per hop;
/// - one 72 B: the per-connection message-rate bucket (on by default;
///   each bucket is boxed only when the route sets it);
/// - one 48 B (56 B in debug): hyper's box around the upgraded client
///   stream;
/// - 32 B and 5 B: the request id and the path, for the access log.
///
/// No read or write buffer is held: nothing of 64 KiB or more outlives the
/// 1 MiB messages (asserted above), and no allocation between 512 B and
/// the task is held per session.
const TARGET: f64 = 4096.0;

const N: usize = 200;
/// Sessions of the N that carry a 1 MiB message first.
const LARGE: usize = 4;
const MIB: usize = 1 << 20;
const WAIT: Duration = Duration::from_secs(20);

async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(WAIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// Counts frames' payload bytes and answers pings.
#[derive(Default)]
struct Collect {
    /// Payload bytes of finished data messages.
    done: Vec<usize>,
    current: usize,
    /// Data frames to send back (opcode, payload), and pongs.
    echo: Vec<u8>,
    /// Whether `echo` is filled (the backend) or not (a client).
    backend: bool,
    /// The opcode of the message in progress.
    op: u8,
}

impl Sink for Collect {
    type Error = FrameError;
    fn frame_start(&mut self, h: &Header, op: u8, first: bool) -> Result<(), FrameError> {
        if first {
            self.op = op;
        }
        if self.backend {
            // Echo frame by frame, as the header says (unmasked: the
            // backend is a server).
            let opcode = if first { op } else { frame::OP_CONTINUATION };
            frame::write_header(&mut self.echo, h.fin, h.rsv, opcode, h.len, None);
        }
        Ok(())
    }
    fn payload(&mut self, data: &[u8]) -> Result<(), FrameError> {
        self.current += data.len();
        if self.backend {
            self.echo.extend_from_slice(data);
        }
        Ok(())
    }
    fn frame_end(&mut self, fin: bool) -> Result<(), FrameError> {
        if fin {
            self.done.push(self.current);
            self.current = 0;
        }
        Ok(())
    }
    fn control(&mut self, opcode: u8, payload: &[u8]) -> Result<(), FrameError> {
        if opcode == frame::OP_PING {
            let mask = (!self.backend).then_some([1, 2, 3, 4]);
            frame::write_frame(&mut self.echo, true, frame::OP_PONG, payload, mask);
        }
        Ok(())
    }
}

/// The backend: answers the upgrade, then echoes every data frame. An idle
/// connection holds its socket and a task; reads use a short-lived heap
/// buffer, so nothing of a read stays.
async fn backend(listener: TcpListener, mode: Mode) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let Some(deflate) = upgrade_server(&mut s, mode).await else {
                return;
            };
            let rules = Rules {
                masked: true,
                allow_rsv1: deflate,
                max_frame: u64::MAX >> 1,
                max_message: u64::MAX >> 1,
            };
            let mut dec = Decoder::new(rules);
            loop {
                if s.readable().await.is_err() {
                    return;
                }
                let mut buf = vec![0u8; 64 * 1024];
                let n = match s.try_read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => return,
                };
                let mut sink = Collect {
                    backend: true,
                    ..Collect::default()
                };
                if dec.feed(&mut buf[..n], &mut sink).is_err() {
                    return;
                }
                drop(buf);
                if s.write_all(&sink.echo).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Reads an HTTP head (up to the blank line) byte by byte, so that no
/// frame byte is taken with it.
async fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        if s.read_exact(&mut b).await.is_err() || head.len() > 8192 {
            return None;
        }
        head.push(b[0]);
    }
    String::from_utf8(head).ok()
}

/// Answers the upgrade; whether permessage-deflate was agreed (the mode's
/// answer, when wsguard offered it).
async fn upgrade_server(s: &mut TcpStream, mode: Mode) -> Option<bool> {
    let head = read_head(s).await?;
    let offered = head.to_ascii_lowercase().contains("permessage-deflate");
    let ext = match mode.answer() {
        Some(a) if offered => format!("Sec-WebSocket-Extensions: {a}\r\n"),
        _ => String::new(),
    };
    let key = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim().to_string())
    })?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{ext}\r\n"
    );
    s.write_all(resp.as_bytes()).await.ok()?;
    Some(!ext.is_empty())
}

/// A raw client: the upgrade by hand, then one small echo so that the
/// session is known to be running end to end.
async fn client(addr: SocketAddr, mode: Mode) -> TcpStream {
    let mut s = within("connect", TcpStream::connect(addr))
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let ext = match mode.answer() {
        Some(_) => "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
        None => "",
    };
    let req = format!(
        "GET /idle HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n"
    );
    within("send upgrade", s.write_all(req.as_bytes()))
        .await
        .unwrap_or_else(|e| panic!("send upgrade: {e}"));
    let head = within("upgrade answer", read_head(&mut s))
        .await
        .unwrap_or_else(|| panic!("no upgrade answer from {addr}"));
    assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
    let agreed = head.to_ascii_lowercase().contains("permessage-deflate");
    assert_eq!(agreed, mode.answer().is_some(), "{head}");
    echo(&mut s, 16, mode).await;
    s
}

/// Sends one binary message of `len` bytes and reads its echo back whole,
/// writing and reading at once (a 1 MiB message does not fit the socket
/// buffers in one go). With compression the message goes compressed (the
/// first message of a stream: the same bytes with or without takeover)
/// and its echo is counted in compressed bytes.
async fn echo(s: &mut TcpStream, len: usize, mode: Mode) {
    let mut msg = Vec::with_capacity(len + 14);
    let mut payload = vec![0x5A; len];
    let compressed = mode.answer().is_some();
    if compressed {
        let mut z = Vec::new();
        wsguard::compression::Deflater::new(15, false)
            .expect("a 15-bit deflater")
            .deflate(&payload, true, &mut z)
            .expect("deflate");
        payload = z;
        frame::write_header(
            &mut msg,
            true,
            0b100,
            frame::OP_BINARY,
            payload.len() as u64,
            Some([9, 8, 7, 6]),
        );
        frame::mask_extend(&mut msg, &payload, [9, 8, 7, 6], 0);
    } else {
        frame::write_frame(
            &mut msg,
            true,
            frame::OP_BINARY,
            &payload,
            Some([9, 8, 7, 6]),
        );
    }
    let want = payload.len();
    drop(payload);
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(&msg)
            .await
            .unwrap_or_else(|e| panic!("send {len} bytes: {e}"));
    };
    let read = async {
        let rules = Rules {
            masked: false,
            allow_rsv1: compressed,
            max_frame: u64::MAX >> 1,
            max_message: u64::MAX >> 1,
        };
        let mut dec = Decoder::new(rules);
        let mut sink = Collect::default();
        let mut buf = vec![0u8; 64 * 1024];
        while sink.done.is_empty() {
            let n = r
                .read(&mut buf)
                .await
                .unwrap_or_else(|e| panic!("read echo: {e}"));
            assert!(n > 0, "connection closed before the echo of {len} bytes");
            dec.feed(&mut buf[..n], &mut sink)
                .unwrap_or_else(|e| panic!("echo of {len} bytes: {e}"));
        }
        assert_eq!(sink.done, vec![want], "echo of {len} bytes");
    };
    within("echo", async { tokio::join!(write, read) }).await;
}

/// Lets every task that is ready run, so the count is read at rest.
async fn settle() {
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
}

/// What the sessions negotiate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No compression (the client offers none).
    Plain,
    /// permessage-deflate on both hops, no context takeover (the default).
    Deflate,
    /// permessage-deflate on both hops with context takeover.
    Takeover,
}

impl Mode {
    /// The backend's answer to wsguard's offer (and whether the client
    /// offers at all).
    fn answer(self) -> Option<&'static str> {
        match self {
            Mode::Plain => None,
            Mode::Deflate => {
                Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
            }
            Mode::Takeover => Some("permessage-deflate"),
        }
    }

    fn policy(self) -> &'static str {
        match self {
            Mode::Takeover => "compression:\n  context_takeover: true\n",
            _ => "",
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn idle_session_heap_is_bounded_and_buffers_go_back() {
    // One after the other: the counting allocator sees the whole process.
    let plain = measure(Mode::Plain).await;
    assert!(
        plain <= TARGET,
        "wsguard holds more than issue 12's {TARGET} B per idle session"
    );
    eprintln!("MET: issue 12's target of at most {TARGET} B per idle session");
    // Issue 13: compression negotiated on both hops, without context
    // takeover, adds nothing to an idle session (the zlib state lives for
    // one message and goes back to a per-thread pool).
    let deflate = measure(Mode::Deflate).await;
    assert!(
        deflate <= TARGET && deflate - plain < 64.0,
        "compression costs an idle session {deflate} B against {plain} B"
    );
    // With context takeover each hop's stream keeps its inflater and its
    // window for the session's life: the cost documented in
    // docs/benchmarks.md, bounded here so that it cannot grow unseen.
    let takeover = measure(Mode::Takeover).await;
    eprintln!(
        "per idle session: plain {plain:.0} B, deflate {deflate:.0} B, takeover {takeover:.0} B"
    );
    assert!(
        takeover > plain + 32.0 * 1024.0 && takeover <= TAKEOVER_MAX,
        "context takeover: {takeover} B per idle session"
    );
}

/// What an idle session with context takeover (both hops, relayed as they
/// are) may hold: two inflaters with their 32 KiB windows.
const TAKEOVER_MAX: f64 = 128.0 * 1024.0;

/// Opens the sessions of one mode and returns wsguard's heap per idle
/// session (bytes), after printing where it goes.
async fn measure(mode: Mode) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let backend_addr = listener.local_addr().expect("backend addr");
    let backend_task = tokio::spawn(backend(listener, mode));
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nupstream:\n  url: \"ws://{backend_addr}\"\nkeepalive:\n  interval: 25s\n  upstream_interval: 25s\nlimits:\n  per_ip: null\n{}",
        mode.policy()
    );
    let policy = wsguard::policy::Policy::from_text("idle_heap.yaml", &yaml)
        .unwrap_or_else(|e| panic!("policy: {e}"));
    let proxy = wsguard::start(policy).await.expect("proxy starts");

    // Room for every socket this test keeps, allocated before any count.
    let mut warm: Vec<TcpStream> = Vec::with_capacity(16);
    let mut direct: Vec<TcpStream> = Vec::with_capacity(N);
    let mut proxied: Vec<TcpStream> = Vec::with_capacity(N);
    let room = || Vec::with_capacity(BY_EXACT.len());
    let (room1, room2, room3) = (room(), room(), room());

    // Warm-up: one-time and per-thread allocations happen here.
    for _ in 0..8 {
        let mut s = client(proxy.addr, mode).await;
        echo(&mut s, MIB, mode).await;
        echo(&mut s, 16, mode).await;
        warm.push(s);
        warm.push(client(backend_addr, mode).await);
    }
    settle().await;

    let before = snapshot(room1);
    for _ in 0..N {
        direct.push(client(backend_addr, mode).await);
    }
    settle().await;
    let after_direct = snapshot(room2);
    for i in 0..N {
        let mut s = client(proxy.addr, mode).await;
        if i < LARGE {
            echo(&mut s, MIB, mode).await;
            echo(&mut s, 16, mode).await;
        }
        proxied.push(s);
    }
    settle().await;
    let after_proxied = snapshot(room3);

    let per_direct = (after_direct.live - before.live) as f64 / N as f64;
    let per_proxied = (after_proxied.live - after_direct.live) as f64 / N as f64;
    let per_session = per_proxied - per_direct;
    let report = format!(
        "{mode:?}: {N} idle sessions ({LARGE} of them after a 1 MiB echo), keepalive on:\n\
         direct (client + backend): {per_direct:.0} B per session\n{}\
         proxied (client + wsguard + backend): {per_proxied:.0} B per session\n{}\
         wsguard's share: {per_session:.0} B per session",
        breakdown(&before, &after_direct, N),
        breakdown(&after_direct, &after_proxied, N),
    );
    eprintln!("{report}");

    // The 1 MiB messages left nothing behind in the sessions they crossed:
    // no allocation of 64 KiB or more is held for them.
    assert!(
        after_proxied.n[10] - after_direct.n[10] <= 0,
        "a large buffer outlived its message\n{report}"
    );
    drop(proxied);
    drop(direct);
    drop(warm);
    let _ = proxy.shutdown(Duration::from_secs(1)).await;
    backend_task.abort();
    per_session
}
