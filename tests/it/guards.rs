//! Keepalive (issue 5), limits and the circuit breaker (issue 6).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

const NO_LIMITS: &str = "limits:\n  per_ip: null\n  per_connection: null\n";

#[tokio::test(start_paused = true)]
async fn responsive_client_stays_connected_across_many_pings() {
    let p = proxy(
        echo_backend().await,
        &format!(
            "keepalive: {{ interval: 100ms, max_missed: 6, upstream_interval: 0s }}\n{NO_LIMITS}"
        ),
    )
    .await;
    let mut c = ws(p.addr, "/").await;
    // tungstenite answers each ping while we read: 8 intervals pass.
    let mut pings = 0;
    while pings < 8 {
        match next(&mut c).await {
            Message::Ping(_) => pings += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    c.send(Message::text("still here")).await.unwrap();
    loop {
        match next(&mut c).await {
            Message::Ping(_) => continue,
            m => {
                assert_eq!(m, Message::text("still here"));
                break;
            }
        }
    }
    assert!(metric(&p, "wsguard_ping_rtt_seconds_count") >= 7.0);
}

#[tokio::test(start_paused = true)]
async fn silent_client_is_closed_1011_and_backend_gets_1001() {
    let (b, mut rx) = recording_backend().await;
    let p = proxy(
        b,
        &format!(
            "keepalive: {{ interval: 100ms, max_missed: 3, upstream_interval: 0s }}\n{NO_LIMITS}"
        ),
    )
    .await;
    let (mut r, _) = Raw::upgrade(p.addr, "/", "").await;
    let started = tokio::time::Instant::now();
    let mut pings = 0;
    let code = loop {
        match r.read_frame().await {
            Some((9, payload)) => {
                assert_eq!(payload.len(), 24);
                pings += 1;
            }
            Some((8, p)) => break u16::from_be_bytes([p[0], p[1]]),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!((pings, code), (3, 1011));
    let took = started.elapsed();
    // Paused time: three pings at 100, 200 and 300 ms, the close at the
    // fourth tick, whatever the machine's load.
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(500),
        "{took:?}"
    );
    // The TCP connection is shut without waiting for our close reply.
    assert!(r.eof().await);
    assert_eq!(backend_close(&mut rx).await.map(|c| c.0), Some(1001));
    assert_echo(p.addr).await;
}

#[tokio::test(start_paused = true)]
async fn own_pongs_stay_on_their_hop() {
    let (b, mut rx) = recording_backend().await;
    let p = proxy(b, &format!("keepalive: {{ interval: 100ms, max_missed: 6, upstream_interval: 100ms }}\n{NO_LIMITS}")).await;
    let mut c = ws(p.addr, "/").await;
    let mut pings = 0;
    while pings < 4 {
        if let Message::Ping(_) = next(&mut c).await {
            pings += 1;
        }
    }
    c.send(Message::text("marker")).await.unwrap();
    // Everything the backend saw before the marker: wsguard's own pings
    // toward it are allowed; a pong (from the client's hop) is not.
    loop {
        match seen_msg(&mut rx).await.unwrap() {
            Message::Text(t) if t.as_str() == "marker" => break,
            Message::Pong(p) => panic!("a keepalive pong leaked to the backend: {p:?}"),
            _ => {}
        }
    }
    // And the client never sees the backend's pongs to wsguard's pings.
    loop {
        match next(&mut c).await {
            Message::Text(t) => {
                assert_eq!(t.as_str(), "marker");
                break;
            }
            Message::Pong(p) => panic!("backend pong leaked to the client: {p:?}"),
            _ => {}
        }
    }
}

#[tokio::test(start_paused = true)]
async fn hung_backend_gives_client_1014() {
    let p = proxy(
        mute_backend().await,
        &format!(
            "keepalive: {{ interval: 0s, max_missed: 2, upstream_interval: 100ms }}\n{NO_LIMITS}"
        ),
    )
    .await;
    let (mut r, h) = Raw::upgrade(p.addr, "/", "").await;
    assert_eq!(h.status, 101);
    assert_eq!(r.close_code().await, Some(1014));
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_fires_and_traffic_resets_it() {
    let p = proxy(echo_backend().await, &format!("keepalive: {{ interval: 0s, upstream_interval: 0s, idle_timeout: 700ms }}\n{NO_LIMITS}")).await;
    let mut c = ws(p.addr, "/").await;
    let start = tokio::time::Instant::now();
    // Traffic every 150ms for ~900ms keeps it open past the timeout.
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        c.send(Message::text(format!("m{i}"))).await.unwrap();
        assert_eq!(next(&mut c).await, Message::text(format!("m{i}")));
    }
    assert!(start.elapsed() >= Duration::from_millis(900));
    let m = next(&mut c).await;
    // Paused time: the close comes exactly idle_timeout after the last
    // message (900 ms + 700 ms), not earlier.
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1600) && took < Duration::from_millis(1650),
        "{took:?}"
    );
    assert_eq!(close_of(&m), Some((1001, "idle timeout".into())));
}

#[tokio::test(start_paused = true)]
async fn max_session_duration_closes_both_sides_with_1001_session_too_long() {
    let (b, mut rx) = recording_backend().await;
    let p = proxy(
        b,
        &format!("keepalive: {{ interval: 0s, upstream_interval: 0s }}\n{NO_LIMITS}  max_session_duration: 1s\n"),
    )
    .await;
    let mut c = ws(p.addr, "/").await;
    let start = tokio::time::Instant::now();
    c.send(Message::text("x")).await.unwrap();
    assert_eq!(next(&mut c).await, Message::text("x"));
    // Traffic does not extend it (unlike idle_timeout): wait for the close.
    let m = next(&mut c).await;
    let after = start.elapsed();
    assert_eq!(close_of(&m), Some((1001, "session too long".into())));
    // Paused time: 1s plus at most 10% jitter, whatever the machine's load.
    assert!(
        after >= Duration::from_secs(1) && after < Duration::from_millis(1110),
        "{after:?}"
    );
    assert_eq!(
        backend_close(&mut rx).await,
        Some((1001, "session too long".into()))
    );
    assert_eq!(metric(&p, "wsguard_session_duration_closes_total"), 1.0);
    assert_eq!(
        metric(
            &p,
            "wsguard_session_closes_total{side=\"proxy\",code=\"1001\"}"
        ),
        1.0
    );
    // The proxy goes on serving.
    let mut c = ws(p.addr, "/").await;
    c.send(Message::text("again")).await.unwrap();
    assert_eq!(next(&mut c).await, Message::text("again"));
}

#[tokio::test]
async fn handshake_rate_gives_429_with_retry_after() {
    let p = proxy(
        echo_backend().await,
        "limits:\n  per_ip:\n    handshakes: { rate: 1/m, burst: 2 }\n    connections: null\n",
    )
    .await;
    for _ in 0..2 {
        assert_eq!(Raw::upgrade(p.addr, "/", "").await.1.status, 101);
    }
    let (_r, h) = Raw::upgrade(p.addr, "/", "").await;
    assert_eq!(h.status, 429);
    let retry: u64 = h.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    assert_eq!(
        metric(&p, "wsguard_rejections_total{reason=\"handshake_rate\"}"),
        1.0
    );
}

#[tokio::test]
async fn handshake_rate_is_keyed_by_forwarded_client_from_trusted_proxy() {
    let p = proxy(
        echo_backend().await,
        "limits:\n  trusted_proxies: [\"127.0.0.1/32\"]\n  per_ip:\n    handshakes: { rate: 1/m, burst: 1 }\n    connections: null\n",
    )
    .await;
    let xff = |ip: &str| format!("X-Forwarded-For: {ip}\r\n");
    assert_eq!(
        Raw::upgrade(p.addr, "/", &xff("198.51.100.1"))
            .await
            .1
            .status,
        101
    );
    assert_eq!(
        Raw::upgrade(p.addr, "/", &xff("198.51.100.1"))
            .await
            .1
            .status,
        429
    );
    // A different client behind the same proxy has its own bucket.
    assert_eq!(
        Raw::upgrade(p.addr, "/", &xff("198.51.100.2"))
            .await
            .1
            .status,
        101
    );
}

#[tokio::test]
async fn per_ip_connection_cap_gives_429() {
    let p = proxy(
        echo_backend().await,
        "limits:\n  per_ip:\n    handshakes: null\n    connections: 1\n",
    )
    .await;
    let _a = ws(p.addr, "/").await;
    let (_r, h) = Raw::upgrade(p.addr, "/", "").await;
    assert_eq!(h.status, 429);
    assert!(h.header("retry-after").is_some());
}

#[tokio::test]
async fn message_rate_closes_with_1008() {
    let p = proxy(
        echo_backend().await,
        "limits:\n  per_ip: null\n  per_connection:\n    messages: { rate: 1/m, burst: 3 }\n",
    )
    .await;
    let mut c = ws(p.addr, "/").await;
    for i in 0..3 {
        c.send(Message::text(format!("{i}"))).await.unwrap();
        assert_eq!(next(&mut c).await, Message::text(format!("{i}")));
    }
    c.send(Message::text("one too many")).await.unwrap();
    let m = next(&mut c).await;
    assert_eq!(close_of(&m), Some((1008, "rate limit".into())));
    assert_echo(p.addr).await;
}

#[tokio::test]
async fn message_rate_drop_mode_keeps_the_session() {
    let p = proxy(
        echo_backend().await,
        "limits:\n  per_ip: null\n  on_message_limit: drop\n  per_connection:\n    messages: { rate: 1/m, burst: 2 }\n",
    )
    .await;
    let mut c = ws(p.addr, "/").await;
    for m in ["a", "b", "dropped", "dropped too"] {
        c.send(Message::text(m)).await.unwrap();
    }
    assert_eq!(next(&mut c).await, Message::text("a"));
    assert_eq!(next(&mut c).await, Message::text("b"));
    // A ping counts against the empty bucket too: it is dropped, so the
    // backend never answers it.
    c.send(Message::Ping("alive?".into())).await.unwrap();
    let rejected = || metric(&p, "wsguard_rejections_total{reason=\"message_rate\"}");
    within("third rejection", async {
        while rejected() < 3.0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(rejected(), 3.0);
    // The session is still open (drop, not close): a close handshake
    // completes with the client's code, and no pong came before it.
    c.send(Message::Close(None)).await.unwrap();
    match next(&mut c).await {
        Message::Close(_) => {}
        other => panic!("expected the close echo, got {other:?}"),
    }
}

#[tokio::test]
async fn byte_rate_closes_when_the_bucket_is_empty() {
    let p = proxy(
        echo_backend().await,
        "limits:\n  max_message_size: 200\n  max_frame_size: 200\n  per_ip: null\n  per_connection:\n    messages: null\n    bytes: { rate: 200/h, burst: 300 }\n",
    )
    .await;
    let mut c = ws(p.addr, "/").await;
    c.send(Message::binary(vec![1u8; 200])).await.unwrap();
    assert_eq!(next(&mut c).await, Message::binary(vec![1u8; 200]));
    // 100 bytes left in the bucket: a 150-byte message is refused, not delayed.
    c.send(Message::binary(vec![1u8; 150])).await.unwrap();
    assert_eq!(
        close_of(&next(&mut c).await),
        Some((1008, "rate limit".into()))
    );
}

#[tokio::test]
async fn breaker_opens_answers_503_fast_then_recovers() {
    let (dead, socket) = down_port();
    let p = proxy(dead, "limits: { per_ip: null, per_connection: null }\n").await;
    // Replace the policy's breaker with a quick one through a reload.
    let policy = wsguard::policy::Policy::from_text(
        "t.yaml",
        &format!("listen: \"127.0.0.1:0\"\nadmin: {{ listen: \"127.0.0.1:0\" }}\nupstream:\n  url: \"ws://{dead}\"\n  circuit_breaker: {{ consecutive_failures: 2, open_for: 300ms, max_open_for: 1s }}\nlimits: {{ per_ip: null, per_connection: null }}\n"),
    )
    .unwrap();
    p.process.install(policy);
    let series = format!("wsguard_circuit_state{{upstream=\"ws://{dead}\"}}");
    for _ in 0..2 {
        assert_eq!(Raw::upgrade(p.addr, "/", "").await.1.status, 502);
    }
    assert_eq!(metric(&p, &series), 1.0);
    let t = std::time::Instant::now();
    let (_r, h) = Raw::upgrade(p.addr, "/", "").await;
    assert_eq!(h.status, 503);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert!(h.header("retry-after").is_some());
    // The backend comes up on the same port; after open_for a probe closes it.
    let l = socket.listen(1024).unwrap();
    tokio::spawn(wsguard::demo::echo_backend(l));
    let mut status = 0;
    for _ in 0..100 {
        status = Raw::upgrade(p.addr, "/", "").await.1.status;
        if status == 101 {
            break;
        }
        assert_eq!(status, 503);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 101);
    assert_eq!(metric(&p, &series), 0.0);
}

#[tokio::test]
async fn live_sessions_survive_the_breaker_opening() {
    // The first upgrade succeeds; every later one gets a 500.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        tokio::spawn(async move {
            let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
            while let Some(Ok(m)) = ws.next().await {
                if m.is_text() && ws.send(m).await.is_err() {
                    break;
                }
            }
        });
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut b = [0u8; 4096];
                let _ = s.read(&mut b).await;
                let _ = s
                    .write_all(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n")
                    .await;
            });
        }
    });
    let p = proxy_yaml(&format!(
        "listen: \"127.0.0.1:0\"\nadmin: {{ listen: \"127.0.0.1:0\" }}\nupstream:\n  url: \"ws://{addr}\"\n  circuit_breaker: {{ consecutive_failures: 2, open_for: 1m }}\nkeepalive: {{ interval: 0s, upstream_interval: 0s }}\nlimits: {{ per_ip: null, per_connection: null }}\n"
    ))
    .await;
    let mut live = ws(p.addr, "/").await;
    assert_eq!(Raw::upgrade(p.addr, "/", "").await.1.status, 502);
    assert_eq!(Raw::upgrade(p.addr, "/", "").await.1.status, 502);
    assert_eq!(Raw::upgrade(p.addr, "/", "").await.1.status, 503);
    live.send(Message::text("still flowing")).await.unwrap();
    assert_eq!(next(&mut live).await, Message::text("still flowing"));
}
