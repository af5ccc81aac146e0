//! Issue 12 (wsguard's own frame engine), black box: close codes pass
//! unchanged, pings are answered by the far end only, a 1009 close can be
//! read, partial messages live under a budget, and memory comes back after
//! a large message. Peers are raw sockets ([`crate::raw`]) so that no
//! library between the test and the proxy answers a ping or rewrites a code.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::SinkExt;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;
use crate::process::{policy_file, Proc, ANY_PORTS};
use crate::raw::*;

const NO_GUARDS: &str = "keepalive: { interval: 0s, upstream_interval: 0s }\nlimits:\n  per_ip: null\n  per_connection: null\n";

/// The next event of `kind` from the raw backend, skipping others.
async fn backend_event(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Backend>,
    want: impl Fn(&Backend) -> bool,
) -> Backend {
    within("a backend event", async {
        loop {
            let e = rx.recv().await.expect("backend alive");
            if want(&e) {
                return e;
            }
        }
    })
    .await
}

/// Pings the backend has reported so far (drains the queue).
fn pings_so_far(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Backend>) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    while let Ok(e) = rx.try_recv() {
        if let Backend::Ping(p) = e {
            v.push(p);
        }
    }
    v
}

// ---------------------------------------------------------------- close codes

#[tokio::test]
async fn backend_close_codes_and_reasons_reach_the_client_unchanged() {
    let (b, _events) = raw_backend().await;
    let p = proxy(b, NO_GUARDS).await;
    for (code, reason) in [
        (1012u16, "service restart"),
        (1013, "try again later"),
        (1014, "bad gateway"),
        (3000, ""),
        (4321, "app: état ✓"),
        (4999, "last private code"),
    ] {
        let mut c = Client::connect(p.addr, "/").await;
        c.text(&format!("close {code} {reason}")).await;
        let got = c.close_frame().await;
        assert!(
            matches!(&got, Ok((c, r)) if *c == code && r == reason),
            "backend closed with {code} {reason:?}, client got {got:?}"
        );
        // The client answers like a browser; the proxy then ends TCP
        // cleanly (a FIN, not a reset).
        c.send(true, CLOSE, &close_payload(code, reason)).await;
        let end = within("the proxy to end TCP", c.rd.end()).await;
        assert!(matches!(end, End::Eof), "after close {code}: {end:?}");
    }
    assert_echo(p.addr).await;
}

/// A backend that sets RSV1 on a hop where no compression was agreed (it
/// ignored wsguard's offer) breaks the protocol: wsguard closes that hop
/// with 1002 and tells the client 1014 (bad gateway), blaming the backend;
/// the proxy goes on serving.
#[tokio::test]
async fn a_backends_rsv1_without_compression_is_1002_to_it_and_1014_to_the_client() {
    let (b, mut events) = raw_backend().await;
    let p = proxy(b, NO_GUARDS).await;
    let mut c = Client::connect(p.addr, "/").await;
    c.text("rsv1").await;
    let got = c.close_frame().await;
    assert!(
        matches!(&got, Ok((1014, _))),
        "client got {got:?} for the backend's RSV1"
    );
    let to_backend = within("the backend's close", async {
        loop {
            match events.recv().await {
                Some(Backend::Close(code, reason)) => return (code, reason),
                Some(_) => continue,
                None => panic!("backend events ended without a close"),
            }
        }
    })
    .await;
    assert_eq!(to_backend.0, 1002, "{to_backend:?}");
    assert_eq!(
        metric(
            &p,
            "wsguard_session_closes_total{side=\"backend\",code=\"1014\"}"
        ),
        1.0
    );
    assert_echo(p.addr).await;
}

// ---------------------------------------------------------------- pings

#[tokio::test]
async fn a_ping_gets_exactly_the_backends_pong_or_none() {
    let (b, mut events) = raw_backend().await;
    let p = proxy(b, NO_GUARDS).await;
    let long = vec![b'x'; 125];
    let cases: Vec<(&str, Vec<u8>, Vec<Got>)> = vec![
        // The backend tags its pong: a pong the proxy made up would show.
        (
            "/pong-tag",
            b"app-ping".to_vec(),
            vec![Got::Pong(b"b:app-ping".to_vec())],
        ),
        (
            "/pong-echo",
            b"app-ping".to_vec(),
            vec![Got::Pong(b"app-ping".to_vec())],
        ),
        ("/pong-echo", Vec::new(), vec![Got::Pong(Vec::new())]),
        ("/pong-echo", long.clone(), vec![Got::Pong(long.clone())]),
        // A backend that never answers: nobody else may.
        ("/pong-none", b"app-ping".to_vec(), vec![]),
    ];
    for (path, ping, want) in cases {
        let mut c = Client::connect(p.addr, path).await;
        c.send(true, PING, &ping).await;
        c.text("after").await;
        let mut got = c.seen_until(&Got::Msg(TEXT, b"after".to_vec())).await;
        got.pop();
        assert_eq!(
            got,
            want,
            "{path} ping {:?}",
            String::from_utf8_lossy(&ping)
        );
        // The backend read the ping (before "after"), exactly once.
        assert_eq!(pings_so_far(&mut events), vec![ping.clone()], "{path}");
        // And nothing else turns up later: one more round trip is clean.
        c.text("later").await;
        assert_eq!(
            c.seen().await,
            Got::Msg(TEXT, b"later".to_vec()),
            "{path}: a second pong or something else arrived late"
        );
    }
    assert_echo(p.addr).await;
}

#[tokio::test]
async fn a_ping_under_write_backpressure_gets_exactly_one_pong_the_backends() {
    let (b, mut events) = raw_backend().await;
    let p = proxy(b, NO_GUARDS).await;
    let mut c = Client::connect(p.addr, "/pong-tag").await;
    c.text("flood").await;
    // The client reads nothing: the proxy's writes to it stall, and so do
    // the backend's writes to the proxy.
    let Backend::Flooded(n) =
        backend_event(&mut events, |e| matches!(e, Backend::Flooded(_))).await
    else {
        unreachable!()
    };
    // A ping now still reaches the backend (the other direction flows)...
    c.send(true, PING, b"under-pressure").await;
    assert_eq!(
        backend_event(&mut events, |e| matches!(e, Backend::Ping(_))).await,
        Backend::Ping(b"under-pressure".to_vec())
    );
    // ...and once the client reads again, everything arrives in order, with
    // exactly one pong for that ping: the backend's, behind its flood.
    let mut seen = c.seen_until(&Got::Msg(TEXT, b"end".to_vec())).await;
    c.text("after").await;
    seen.extend(c.seen_until(&Got::Msg(TEXT, b"after".to_vec())).await);
    let pongs: Vec<&Got> = seen.iter().filter(|s| matches!(s, Got::Pong(_))).collect();
    assert_eq!(
        pongs,
        vec![&Got::Pong(b"b:under-pressure".to_vec())],
        "pongs the client got"
    );
    let numbers: Vec<u64> = seen
        .iter()
        .filter_map(|s| match s {
            Got::Msg(BINARY, b) => Some(u64::from_be_bytes(b[..8].try_into().unwrap())),
            _ => None,
        })
        .collect();
    assert_eq!(numbers, (0..=n).collect::<Vec<_>>(), "flood messages");
    assert_eq!(pings_so_far(&mut events), Vec::<Vec<u8>>::new());
    assert_echo(p.addr).await;
}

/// With keepalive on both hops, wsguard's own pings and their pongs stay
/// on their hop (consumed by nonce), and an application ping still gets
/// exactly one pong: the backend's.
#[tokio::test(start_paused = true)]
async fn with_keepalive_on_both_hops_a_ping_gets_only_the_backends_pong() {
    let (b, mut events) = raw_backend().await;
    let p = proxy(
        b,
        "keepalive: { interval: 100ms, max_missed: 20, upstream_interval: 100ms }\nlimits: { per_ip: null, per_connection: null }\n",
    )
    .await;
    let mut c = Client::connect(p.addr, "/pong-tag-app").await;
    // Two keepalive pings reach the client, which answers them.
    for _ in 0..2 {
        match c.seen().await {
            Got::Ping(nonce) => c.send(true, PONG, &nonce).await,
            other => panic!("expected a keepalive ping, got {other:?}"),
        }
    }
    // Two keepalive pings reach the backend (which echoes them).
    for _ in 0..2 {
        backend_event(&mut events, |e| matches!(e, Backend::Ping(_))).await;
    }
    for round in 0..5 {
        let ping = format!("app-{round}");
        c.send(true, PING, ping.as_bytes()).await;
        c.text("after").await;
        let mut pongs = Vec::new();
        loop {
            match c.seen().await {
                Got::Ping(nonce) => c.send(true, PONG, &nonce).await,
                Got::Pong(p) => pongs.push(String::from_utf8_lossy(&p).to_string()),
                Got::Msg(TEXT, m) if m == b"after" => break,
                other => panic!("round {round}: {other:?}"),
            }
        }
        assert_eq!(pongs, vec![format!("b:{ping}")], "round {round}");
    }
    // The backend saw each application ping once and none of the client's
    // keepalive pongs.
    let mut app_pings = Vec::new();
    while let Ok(e) = events.try_recv() {
        match e {
            Backend::Ping(p) if p.starts_with(b"app") => app_pings.push(p),
            Backend::Pong(p) => panic!("a client pong leaked to the backend: {p:?}"),
            _ => {}
        }
    }
    let want: Vec<Vec<u8>> = (0..5).map(|r| format!("app-{r}").into_bytes()).collect();
    assert_eq!(app_pings, want);
}

// ---------------------------------------------------------------- 1009 close

/// Sends 2 MiB (one frame, or 32 fragments of 64 KiB) and reads the
/// answer, either while writing (as a browser's network thread does) or
/// only once the whole write is done (a page busy elsewhere; a reset then
/// throws away a close frame that had already arrived). Says what the
/// client saw: the close frame (or how the connection ended without one),
/// how the write ended, and how TCP ended after the client answered the
/// close.
async fn send_2mib(addr: SocketAddr, fragmented: bool, read_while_writing: bool) -> String {
    let c = Client::connect(addr, "/").await;
    let payload = vec![0x5au8; 2 << 20];
    let bytes: Vec<u8> = if fragmented {
        let chunks: Vec<&[u8]> = payload.chunks(64 * 1024).collect();
        let last = chunks.len() - 1;
        chunks
            .iter()
            .enumerate()
            .flat_map(|(i, ch)| encode(i == last, if i == 0 { BINARY } else { 0 }, ch, true))
            .collect()
    } else {
        encode(true, BINARY, &payload, true)
    };
    write_and_read_close(c, bytes, read_while_writing).await
}

/// Writes `bytes` and reads up to the proxy's close frame (see
/// [`send_2mib`]); answers the close with the same code and reads to the
/// end of TCP.
async fn write_and_read_close(c: Client, bytes: Vec<u8>, read_while_writing: bool) -> String {
    let Client { mut rd, mut wr, .. } = c;
    let mut writer = tokio::spawn(async move {
        let r = wr.write_all(&bytes).await;
        (wr, r)
    });
    let mut done = None;
    if !read_while_writing {
        done = Some(within("the 2 MiB write", &mut writer).await.unwrap());
    }
    let close = within("the close frame", async {
        loop {
            match rd.frame().await {
                Ok(f) if f.opcode == CLOSE => return Ok(f.close().unwrap_or_default()),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    let (mut wr, written) = match done {
        Some(d) => d,
        None => within("the 2 MiB write", writer).await.unwrap(),
    };
    let code = close.as_ref().map_or(1000, |c| c.0);
    let answered = wr
        .write_all(&encode(true, CLOSE, &close_payload(code, ""), true))
        .await;
    let end = within("the end of TCP", rd.end()).await;
    format!(
        "close {close:?}, write {:?}, close answer {:?}, then {end:?}",
        written.map_err(|e| e.kind()),
        answered.map_err(|e| e.kind())
    )
}

#[tokio::test]
async fn two_mib_against_a_one_mib_limit_reads_1009_every_time_with_no_reset() {
    let p = proxy(
        echo_backend().await,
        &format!("{NO_GUARDS}  max_message_size: 1MiB\n"),
    )
    .await;
    let want = "close Ok((1009, \"";
    let mut bad = Vec::new();
    for run in 0..20 {
        for (fragmented, reading) in [(false, true), (true, true), (false, false), (true, false)] {
            let got = send_2mib(p.addr, fragmented, reading).await;
            let ok = got.starts_with(want)
                && got.ends_with("write Ok(()), close answer Ok(()), then Eof");
            if !ok {
                bad.push(format!(
                    "run {run} fragmented {fragmented} read while writing {reading}: {got}"
                ));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} of 80 runs failed:\n{}",
        bad.len(),
        bad.join("\n")
    );
    assert_echo(p.addr).await;
}

/// Issue 12, Closing: after wsguard sends its own close, the peer must be
/// able to read it even though more data is still arriving (here 1 MiB of
/// frames after the offending one, which the proxy must discard, not reset).
#[tokio::test]
async fn the_proxys_own_close_is_readable_while_the_client_keeps_sending() {
    let p = proxy(echo_backend().await, NO_GUARDS).await;
    let mut tail = Vec::new();
    for _ in 0..16 {
        tail.extend(encode(true, BINARY, &[7u8; 64 * 1024], true));
    }
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "unmasked frame",
            encode(true, TEXT, b"unmasked", false),
            1002,
        ),
        ("reserved opcode", encode(true, 3, b"x", true), 1002),
        (
            "invalid UTF-8",
            encode(true, TEXT, &[0xff, 0xfe], true),
            1007,
        ),
    ];
    let mut bad = Vec::new();
    for (what, first, code) in cases {
        for reading in [true, false] {
            let c = Client::connect(p.addr, "/").await;
            let mut bytes = first.clone();
            bytes.extend_from_slice(&tail);
            let got = write_and_read_close(c, bytes, reading).await;
            let want = format!("close Ok(({code}, ");
            if !(got.starts_with(&want)
                && got.ends_with("write Ok(()), close answer Ok(()), then Eof"))
            {
                bad.push(format!("{what} (read while writing {reading}): {got}"));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    assert_echo(p.addr).await;
}

// ---------------------------------------------------------------- memory

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc status")
}

/// The real binary with `policy` (which must not set listen or admin),
/// bound on 127.0.0.1:0; returns it and its proxy address.
async fn spawn_proxy(name: &str, policy: &str) -> (Proc, SocketAddr) {
    let f = policy_file(name, &format!("{ANY_PORTS}{policy}"));
    let mut p = Proc::spawn(&f);
    let (addr, _) = p.listening().await;
    (p, addr)
}

/// Issue 12: buffers grow to the largest message and never shrink (3.6 MB
/// per session after one 900 KiB echo, measured on main). Here 50
/// sessions each echo one 900 KiB message and then stay open and idle: the
/// proxy's RSS must grow by well under 64 KiB per session over what the
/// same sessions held before the large messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_returns_after_a_large_message() {
    const SESSIONS: usize = 50;
    let backend = echo_backend().await;
    let (p, addr) = spawn_proxy(
        "engine-mem",
        &format!("upstream: {{ url: \"ws://{backend}\" }}\nlimits: {{ max_message_size: 1MiB, per_ip: null, per_connection: null }}\n"),
    )
    .await;
    let mut clients = Vec::new();
    for _ in 0..SESSIONS {
        let mut c = ws(addr, "/").await;
        c.send(Message::text("small")).await.unwrap();
        assert_eq!(next(&mut c).await, Message::text("small"));
        clients.push(c);
    }
    let before = rss_kib(p.pid());
    let big = vec![0x42u8; 900 * 1024];
    let echoes = clients.iter_mut().map(|c| {
        let big = big.clone();
        async move {
            c.send(Message::binary(big.clone())).await.unwrap();
            assert_eq!(next(c).await, Message::binary(big));
        }
    });
    within(
        "50 echoes of 900 KiB",
        futures_util::future::join_all(echoes),
    )
    .await;
    // Every echo is back: the proxy holds no message now.
    let after = rss_kib(p.pid());
    let per_session = after.saturating_sub(before) / SESSIONS as u64;
    eprintln!(
        "RSS with {SESSIONS} idle sessions: {before} KiB before, {after} KiB after one 900 KiB echo each ({per_session} KiB per session)"
    );
    assert!(
        per_session < 64,
        "the proxy kept {per_session} KiB per idle session after a 900 KiB message ({before} -> {after} KiB)"
    );
    // The sessions still work.
    for c in clients.iter_mut().take(3) {
        c.send(Message::text("still here")).await.unwrap();
        assert_eq!(next(c).await, Message::text("still here"));
    }
    assert_echo(addr).await;
}

// ---------------------------------------------------------------- chromium

const BROWSER_RUNS: usize = 20;

/// The page: 20 times in a row, opens a WebSocket through wsguard, sends
/// 2 MiB as soon as it opens, and records the close code it sees; then
/// reports the codes.
fn page_2mib(proxy: SocketAddr) -> String {
    format!(
        r#"<!doctype html><html><body><script>
"use strict";
const big = new Uint8Array(2 * 1024 * 1024);
const codes = [];
function report(p) {{ fetch("/report?" + new URLSearchParams(p)).catch(() => {{}}); }}
function run(i) {{
  if (i === {BROWSER_RUNS}) {{ report({{ event: "done", codes: codes.join(",") }}); return; }}
  const ws = new WebSocket("ws://{proxy}/");
  ws.binaryType = "arraybuffer";
  ws.onopen = () => ws.send(big);
  ws.onclose = (e) => {{ codes.push(e.code); report({{ event: "close", run: i, code: e.code }}); run(i + 1); }};
}}
run(0);
</script></body></html>"#
    )
}

/// Issue 12: Chromium saw 1006 in 7 runs of 12 when it sent 2 MiB through
/// wsguard with a 1 MiB limit (the socket was reset with unread data).
#[tokio::test]
async fn chromium_sending_2mib_against_a_1mib_limit_sees_1009_every_time() {
    let Some(browser) = crate::ops::chromium() else {
        return;
    };
    let p = proxy(
        echo_backend().await,
        &format!("{NO_GUARDS}  max_message_size: 1MiB\n"),
    )
    .await;
    let page = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let page_addr = page.local_addr().unwrap();
    let (tx, mut reports) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(wsguard::demo::serve_page(page, page_2mib(p.addr), tx));
    let browser = crate::ops::headless_chromium(&browser, "2mib", page_addr);
    let mut got = Vec::new();
    let outcome = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(r) = reports.recv().await {
            got.push(r.clone());
            if r.starts_with("event=done") {
                return r;
            }
        }
        String::new()
    })
    .await;
    browser.quit().await;
    let done = outcome.unwrap_or_else(|_| panic!("the page did not finish within 60s: {got:?}"));
    let codes = done
        .strip_prefix("event=done&codes=")
        .unwrap_or(&done)
        .replace("%2C", ",");
    let want = vec!["1009"; BROWSER_RUNS].join(",");
    assert_eq!(
        codes, want,
        "close codes the page saw in {BROWSER_RUNS} runs"
    );
    assert_echo(p.addr).await;
}

// ---------------------------------------------------------------- budget

/// Clients that each leave a fragmented message unfinished.
const PARTIAL_CLIENTS: usize = 1000;
/// What each of them sends of its message: one non-final 512 KiB fragment
/// (under the 1 MiB `max_message_size`), 500 MiB in all.
const PARTIAL_BYTES: usize = 512 * 1024;
/// The engine's process-wide budget of bytes in partial messages: its
/// documented default (`DEFAULT_PARTIAL_BUDGET`, 256 MiB; no policy key
/// sets it). Half the clients fit; the rest must be refused.
const PARTIAL_BUDGET_KIB: u64 = 256 * 1024;
/// The most the proxy may grow while the clients hold their fragments:
/// the budget plus 64 KiB per session for everything else. Without a
/// budget it holds all 500 MiB (more, with buffers that double).
const PARTIAL_RSS_BOUND_KIB: u64 = PARTIAL_BUDGET_KIB + 64 * PARTIAL_CLIENTS as u64;
/// The close code for a message past the budget: the engine documents
/// 1013 (Try Again Later); issue 12 allowed 1013 or 1009.
const OVER_BUDGET: u16 = 1013;

/// A signed text message from a client, with key c1.
fn signed_c2s(seq: u64, payload: &[u8]) -> Vec<u8> {
    wsguard::sign::sign(
        &crate::hmac::key("c1", &crate::hmac::CLIENT1),
        wsguard::sign::Direction::C2s,
        seq,
        wsguard::sign::now_ms(),
        "",
        wsguard::sign::MsgType::Text,
        payload,
    )
}

/// A client sends one signed message (in `parts` fragments) and expects the
/// backend's answer, re-signed with c1.
async fn signed_round_trip(addr: SocketAddr, parts: usize) {
    if let Err(e) = try_signed_round_trip(addr, parts).await {
        panic!("{e}");
    }
}

async fn try_signed_round_trip(addr: SocketAddr, parts: usize) -> Result<(), String> {
    let mut c = Client::connect(addr, "/").await;
    let msg = signed_c2s(1, b"normal client");
    let size = msg.len().div_ceil(parts);
    let chunks: Vec<&[u8]> = msg.chunks(size).collect();
    for (i, ch) in chunks.iter().enumerate() {
        c.send(i + 1 == chunks.len(), if i == 0 { TEXT } else { 0 }, ch)
            .await;
    }
    match c.seen().await {
        Got::Msg(TEXT, reply)
            if reply.starts_with(b"wsg1.c1.1.") && reply.ends_with(b"\necho:normal client") =>
        {
            Ok(())
        }
        other => Err(format!(
            "a normal signed message in {parts} fragment(s) got {other:?}"
        )),
    }
}

/// Issue 12: with HMAC on, messages are assembled, and a client can hold
/// up to `max_message_size` of fragments with nothing to end it. 1,000
/// clients each leave a 512 KiB fragment unfinished; after each fragment
/// the client pings, and the backend's pong (or a close) tells it the proxy
/// has read the fragment. The proxy (the real binary, so that its RSS is
/// its own) must stay under a bound, the clients past the budget get
/// 1013/1009, and a normal client still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_messages_live_under_a_process_wide_budget() {
    use futures_util::StreamExt;
    let (backend, _seen) = crate::hmac::signing_backend().await;
    let keys = format!(
        "hmac:\n  mode: enforce\n  client_keys:\n    - {{ id: c1, secret_file: \"{}\" }}\n  upstream_key: {{ id: p1, secret_file: \"{}\" }}\n",
        crate::hmac::key_file("c1", &crate::hmac::CLIENT1),
        crate::hmac::key_file("p1", &crate::hmac::UPSTREAM)
    );
    let (p, addr) = spawn_proxy(
        "engine-budget",
        &format!("upstream: {{ url: \"ws://{backend}\" }}\n{keys}keepalive: {{ interval: 0s, upstream_interval: 0s }}\nlimits:\n  max_message_size: 1MiB\n  per_ip: null\n  per_connection: null\n"),
    )
    .await;
    signed_round_trip(addr, 1).await;
    signed_round_trip(addr, 3).await;
    let before = rss_kib(p.pid());

    let fragment = vec![b'a'; PARTIAL_BYTES];
    let outcomes: Vec<(Client, Got)> = futures_util::stream::iter(0..PARTIAL_CLIENTS)
        .map(|i| {
            let fragment = &fragment;
            async move {
                let mut c = Client::connect(addr, "/").await;
                c.send(false, TEXT, fragment).await;
                let ping = format!("held-{i}");
                c.send(true, PING, ping.as_bytes()).await;
                let got = c.seen().await;
                match &got {
                    Got::Pong(p) => assert_eq!(p, ping.as_bytes(), "client {i}"),
                    Got::Close(..) => {}
                    other => panic!("client {i} got {other:?}"),
                }
                (c, got)
            }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    let held = outcomes
        .iter()
        .filter(|(_, g)| matches!(g, Got::Pong(_)))
        .count();
    let refused: Vec<u16> = outcomes
        .iter()
        .filter_map(|(_, g)| match g {
            Got::Close(code, _) => Some(*code),
            _ => None,
        })
        .collect();
    let after = rss_kib(p.pid());
    let grew = after.saturating_sub(before);
    eprintln!(
        "{PARTIAL_CLIENTS} clients with {} KiB unfinished each: {held} held, {} refused (codes {:?}); proxy RSS {before} -> {after} KiB (+{grew} KiB)",
        PARTIAL_BYTES / 1024,
        refused.len(),
        refused.iter().collect::<std::collections::BTreeSet<_>>()
    );
    let fit = (PARTIAL_BUDGET_KIB * 1024) as usize / PARTIAL_BYTES;
    assert!(
        held <= fit && refused.len() >= PARTIAL_CLIENTS - fit && refused.iter().all(|c| *c == OVER_BUDGET),
        "at most {fit} clients fit the budget and the rest get {OVER_BUDGET}: {held} held, refused with {:?}",
        refused.iter().collect::<std::collections::BTreeSet<_>>()
    );
    assert!(
        grew < PARTIAL_RSS_BOUND_KIB,
        "the proxy grew by {grew} KiB holding partial messages (bound {PARTIAL_RSS_BOUND_KIB} KiB)"
    );
    // While the budget is taken, a small whole message should still pass
    // (issue 12: past the budget, new *large* messages get 1013). Checked
    // last, so that the rest is reported either way.
    let small_while_full = try_signed_round_trip(addr, 1).await;
    // Once the holders leave (with a close handshake, so the proxy has
    // ended their sessions), a fragmented message is assembled again.
    futures_util::stream::iter(outcomes)
        .for_each_concurrent(50, |(mut c, got)| async move {
            if let Got::Pong(_) = got {
                c.send(true, CLOSE, &close_payload(1000, "")).await;
                let _ = c.close_frame().await;
            }
        })
        .await;
    let mut ok = false;
    // The budget may come back a moment after the close handshake (the
    // session's task ends after the close frame is written): a few tries.
    for _ in 0..20 {
        let mut c = Client::connect(addr, "/").await;
        let msg = signed_c2s(1, b"normal client");
        let (a, b) = msg.split_at(20);
        c.send(false, TEXT, a).await;
        c.send(true, 0, b).await;
        if let Got::Msg(TEXT, _) = c.seen().await {
            ok = true;
            break;
        }
    }
    assert!(
        ok,
        "a fragmented message never passed after the holders left"
    );
    assert_eq!(
        small_while_full,
        Ok(()),
        "a small signed message while the budget was spent"
    );
}
