//! Issue 2: transparent relaying, the upgrade's statuses, close codes.

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

const NO_GUARDS: &str = "keepalive: { interval: 0s, upstream_interval: 0s }\nlimits:\n  per_ip: null\n  per_connection: null\n";

#[tokio::test]
async fn echoes_text_and_binary() {
    let p = proxy(echo_backend().await, NO_GUARDS).await;
    let mut c = ws(p.addr, "/").await;
    c.send(Message::text("héllo")).await.unwrap();
    assert_eq!(next(&mut c).await, Message::text("héllo"));
    c.send(Message::binary(vec![0u8, 1, 2, 255])).await.unwrap();
    assert_eq!(next(&mut c).await, Message::binary(vec![0u8, 1, 2, 255]));
    c.close(None).await.unwrap();
    assert_eq!(metric(&p, "wsguard_messages_total{direction=\"c2s\"}"), 2.0);
    assert_eq!(metric(&p, "wsguard_bytes_total{direction=\"s2c\"}"), 10.0);
    assert_eq!(metric(&p, "wsguard_handshakes_total{result=\"ok\"}"), 1.0);
}

#[tokio::test]
async fn message_at_the_limit_passes_one_byte_over_is_1009() {
    let p = proxy(
        echo_backend().await,
        "keepalive: { interval: 0s, upstream_interval: 0s }\nlimits:\n  max_message_size: 1MiB\n  max_frame_size: 1MiB\n  per_ip: null\n  per_connection: null\n",
    )
    .await;
    let mut c = ws(p.addr, "/").await;
    let big = vec![7u8; 1 << 20];
    c.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(next(&mut c).await, Message::binary(big));
    c.send(Message::binary(vec![7u8; (1 << 20) + 1]))
        .await
        .unwrap();
    let m = next(&mut c).await;
    assert_eq!(close_of(&m).map(|c| c.0), Some(1009), "{m:?}");
    assert_echo(p.addr).await;
}

#[tokio::test]
async fn fragmented_message_over_the_limit_is_1009() {
    let p = proxy(
        echo_backend().await,
        &format!("{NO_GUARDS}  max_message_size: 1KiB\n  max_frame_size: 512\n"),
    )
    .await;
    let (mut r, h) = Raw::upgrade(p.addr, "/", "").await;
    assert_eq!(h.status, 101);
    r.send_frame(false, 2, &[1u8; 500], true).await;
    r.send_frame(false, 0, &[1u8; 500], true).await;
    r.send_frame(true, 0, &[1u8; 500], true).await;
    assert_eq!(r.close_code().await, Some(1009));
    // A frame over max_frame_size alone is refused too.
    let (mut r, _) = Raw::upgrade(p.addr, "/", "").await;
    r.send_frame(true, 2, &[1u8; 600], true).await;
    assert_eq!(r.close_code().await, Some(1009));
    assert_echo(p.addr).await;
}

#[tokio::test]
async fn path_query_and_subprotocol_pass_through() {
    let (b, mut rx) = recording_backend().await;
    let p = proxy(b, NO_GUARDS).await;
    let (r, h) = Raw::upgrade(
        p.addr,
        "/rooms/7?user=ann&x=1",
        "Sec-WebSocket-Protocol: v2, chat\r\n",
    )
    .await;
    assert_eq!(h.status, 101, "{}", h.text);
    assert_eq!(h.header("sec-websocket-protocol").as_deref(), Some("chat"));
    let Seen::Request { path, headers } = seen(&mut rx).await else {
        panic!("request first")
    };
    assert_eq!(path, "/rooms/7?user=ann&x=1");
    let protos: Vec<_> = headers
        .iter()
        .filter(|(k, _)| k == "sec-websocket-protocol")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(protos, vec!["v2, chat"]);
    drop(r);
}

#[tokio::test]
async fn backend_choosing_no_subprotocol_is_accepted() {
    let (b, _rx) = recording_backend().await;
    let p = proxy(b, NO_GUARDS).await;
    let (_r, h) = Raw::upgrade(p.addr, "/", "Sec-WebSocket-Protocol: other\r\n").await;
    assert_eq!(h.status, 101);
    assert_eq!(h.header("sec-websocket-protocol"), None);
}

#[tokio::test]
async fn forwarded_headers_are_set_and_forgeries_replaced() {
    let (b, mut rx) = recording_backend().await;
    // With compression off the client's extension offer goes nowhere.
    let p = proxy(b, &format!("{NO_GUARDS}compression: {{ mode: off }}\n")).await;
    let (_r, h) = Raw::upgrade(
        p.addr,
        "/",
        "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Request-Id: forged\r\nX-Custom: kept\r\nCookie: s=1\r\nSec-WebSocket-Extensions: permessage-deflate\r\nKeep-Alive: 5\r\nProxy-Authorization: Basic eA==\r\n",
    )
    .await;
    assert_eq!(h.status, 101);
    assert_eq!(h.header("sec-websocket-extensions"), None);
    let Seen::Request { headers, .. } = seen(&mut rx).await else {
        panic!()
    };
    let get = |n: &str| {
        headers
            .iter()
            .filter(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(get("x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(get("x-forwarded-proto"), vec!["http"]);
    let rid = get("x-request-id");
    assert_eq!(rid.len(), 1);
    assert_ne!(rid[0], "forged");
    assert_eq!(rid[0].len(), 32);
    assert_eq!(get("x-custom"), vec!["kept"]);
    assert_eq!(get("cookie"), vec!["s=1"]);
    assert_eq!(get("host"), vec![p.addr.to_string()]);
    assert!(get("sec-websocket-extensions").is_empty());
    assert!(get("keep-alive").is_empty());
    assert!(get("proxy-authorization").is_empty());
}

#[tokio::test]
async fn trusted_proxy_xff_is_extended() {
    let (b, mut rx) = recording_backend().await;
    let p = proxy(
        b,
        &format!("{NO_GUARDS}  trusted_proxies: [\"127.0.0.0/8\"]\n"),
    )
    .await;
    let (_r, h) = Raw::upgrade(
        p.addr,
        "/",
        "X-Forwarded-For: 203.0.113.9\r\nX-Request-Id: rid-42\r\n",
    )
    .await;
    assert_eq!(h.status, 101);
    let Seen::Request { headers, .. } = seen(&mut rx).await else {
        panic!()
    };
    let get = |n: &str| {
        headers
            .iter()
            .filter(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(get("x-forwarded-for"), vec!["203.0.113.9, 127.0.0.1"]);
    assert_eq!(get("x-request-id"), vec!["rid-42"]);
}

#[tokio::test]
async fn client_close_reaches_backend_with_code_and_reason() {
    let (b, mut rx) = recording_backend().await;
    let p = proxy(b, NO_GUARDS).await;
    let mut c = ws(p.addr, "/").await;
    c.close(Some(CloseFrame {
        code: CloseCode::Library(4001),
        reason: "done".into(),
    }))
    .await
    .unwrap();
    let m = seen_msg(&mut rx).await.unwrap();
    assert_eq!(close_of(&m), Some((4001, "done".into())));
    // The client's close handshake completes.
    let end = within("close echo", c.next()).await;
    assert!(matches!(end, Some(Ok(Message::Close(_))) | None), "{end:?}");
}

#[tokio::test]
async fn backend_close_reaches_client_with_code_and_reason() {
    let (b, _rx) = recording_backend().await;
    let p = proxy(b, NO_GUARDS).await;
    let mut c = ws(p.addr, "/").await;
    c.send(Message::text("please-close")).await.unwrap();
    let m = next(&mut c).await;
    assert_eq!(close_of(&m), Some((4000, "bye".into())));
    assert_echo(p.addr).await;
}

#[tokio::test]
async fn backend_abort_gives_1014() {
    let (b, _rx) = recording_backend().await;
    let p = proxy(b, NO_GUARDS).await;
    let (mut r, h) = Raw::upgrade(p.addr, "/", "").await;
    assert_eq!(h.status, 101);
    r.send_frame(true, 1, b"please-abort", true).await;
    assert_eq!(r.close_code().await, Some(1014));
    assert_echo(p.addr).await;
}

#[tokio::test]
async fn client_abort_gives_backend_1001() {
    let (b, mut rx) = recording_backend().await;
    let p = proxy(b, NO_GUARDS).await;
    let (mut r, _) = Raw::upgrade(p.addr, "/", "").await;
    r.send_frame(true, 1, b"hi", true).await;
    assert_eq!(seen_msg(&mut rx).await, Some(Message::text("hi")));
    r.s.shutdown().await.unwrap();
    drop(r);
    let m = seen_msg(&mut rx).await.unwrap();
    assert_eq!(close_of(&m).map(|c| c.0), Some(1001));
}

#[tokio::test]
async fn bad_backend_answers_give_502() {
    let wrong_accept = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n";
    let answers = [
        "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_string(),
        "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n".to_string(),
        "HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n".to_string(),
        wrong_accept.to_string(),
    ];
    for answer in answers {
        let p = proxy(http_backend(answer.clone()).await, NO_GUARDS).await;
        let (_r, h) = Raw::upgrade(p.addr, "/", "").await;
        assert_eq!(h.status, 502, "backend answered {answer:?}");
        assert_eq!(
            metric(&p, "wsguard_handshakes_total{result=\"bad_gateway\"}"),
            1.0
        );
    }
}

#[tokio::test]
async fn backend_down_is_502_and_silent_backend_is_504() {
    let p = proxy(dead_port().await, NO_GUARDS).await;
    let (_r, h) = Raw::upgrade(p.addr, "/", "").await;
    assert_eq!(h.status, 502);
    let p = proxy_yaml(&format!(
        "listen: \"127.0.0.1:0\"\nadmin: {{ listen: \"127.0.0.1:0\" }}\nupstream:\n  url: \"ws://{}\"\n  connect_timeout: 300ms\n{NO_GUARDS}",
        silent_backend().await
    ))
    .await;
    let (_r, h) = Raw::upgrade(p.addr, "/", "").await;
    assert_eq!(h.status, 504);
}

#[tokio::test]
async fn upgrade_statuses() {
    let p = proxy(echo_backend().await, NO_GUARDS).await;
    let a = p.addr;
    let (_r, h) = Raw::request(a, &format!("GET / HTTP/1.1\r\nHost: {a}\r\n\r\n")).await;
    assert_eq!(h.status, 426);
    let v8 = format!("GET / HTTP/1.1\r\nHost: {a}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: {KEY}\r\n\r\n");
    let (_r, h) = Raw::request(a, &v8).await;
    assert_eq!(h.status, 426);
    assert_eq!(h.header("sec-websocket-version").as_deref(), Some("13"));
    let post = format!("POST / HTTP/1.1\r\nHost: {a}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(Raw::request(a, &post).await.1.status, 400);
    let bad_key = format!("GET / HTTP/1.1\r\nHost: {a}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n");
    assert_eq!(Raw::request(a, &bad_key).await.1.status, 400);
    let no_conn = format!("GET / HTTP/1.1\r\nHost: {a}\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n");
    assert_eq!(Raw::request(a, &no_conn).await.1.status, 400);
    let http10 = format!("GET / HTTP/1.0\r\nHost: {a}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n");
    assert_eq!(Raw::request(a, &http10).await.1.status, 400);
    let big = format!(
        "GET / HTTP/1.1\r\nHost: {a}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    assert_eq!(Raw::request(a, &big).await.1.status, 431);
    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let (_r, h) = Raw::request(a, &format!("GET / HTTP/1.1\r\nHost: {a}\r\n{many}\r\n")).await;
    assert_eq!(h.status, 431);
    assert_echo(a).await;
}

#[tokio::test]
async fn slowloris_is_cut_while_others_connect() {
    let p = proxy(
        echo_backend().await,
        &format!("{NO_GUARDS}  handshake_timeout: 1s\n"),
    )
    .await;
    let mut slow = Raw::connect(p.addr).await;
    slow.s
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // A normal client is served meanwhile.
    assert_echo(p.addr).await;
    // The slow one never finishes its head and is dropped at the deadline.
    assert!(slow.eof().await);
    assert_eq!(
        metric(&p, "wsguard_rejections_total{reason=\"handshake_timeout\"}"),
        1.0
    );
}

#[tokio::test]
async fn raw_protocol_violations_get_their_close_codes() {
    let p = proxy(echo_backend().await, NO_GUARDS).await;
    // (fin, opcode, payload, masked) -> expected close code
    let cases: Vec<(bool, u8, Vec<u8>, bool, u16)> = vec![
        (true, 1, b"unmasked".to_vec(), false, 1002),
        (true, 9, vec![0u8; 126], true, 1002),
        (true, 3, b"reserved".to_vec(), true, 1002),
        (true, 0xB, b"reserved control".to_vec(), true, 1002),
        (true, 1, vec![0xff, 0xfe, 0xfd], true, 1007),
        (false, 9, b"fragmented ping".to_vec(), true, 1002),
        (true, 0, b"continuation without start".to_vec(), true, 1002),
    ];
    for (fin, op, payload, masked, want) in cases {
        let (mut r, h) = Raw::upgrade(p.addr, "/", "").await;
        assert_eq!(h.status, 101);
        r.send_frame(fin, op, &payload, masked).await;
        assert_eq!(
            r.close_code().await,
            Some(want),
            "opcode {op:#x} masked {masked}"
        );
        assert_echo(p.addr).await;
    }
    // RSV bits set without an extension.
    let (mut r, _) = Raw::upgrade(p.addr, "/", "").await;
    r.s.write_all(&[0xC1, 0x80 | 2, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2])
        .await
        .unwrap();
    assert_eq!(r.close_code().await, Some(1002));
    assert_echo(p.addr).await;
}

#[tokio::test]
async fn application_pings_get_exactly_one_pong_the_backends() {
    let (b, mut rx) = recording_backend().await;
    let p = proxy(b, NO_GUARDS).await;
    let (mut r, _) = Raw::upgrade(p.addr, "/", "").await;
    r.send_frame(true, 9, b"app-ping", true).await;
    assert_eq!(r.read_frame().await, Some((0xA, b"app-ping".to_vec())));
    assert_eq!(
        seen_msg(&mut rx).await,
        Some(Message::Ping("app-ping".into()))
    );
    // A data message after it comes back next: no second pong in between.
    r.send_frame(true, 1, b"after", true).await;
    assert_eq!(r.read_frame().await, Some((1, b"after".to_vec())));
    // The pong is the backend's, not one wsguard made up: this backend
    // answers with a payload of its own.
    r.send_frame(true, 9, b"who-answers", true).await;
    assert_eq!(r.read_frame().await, Some((0xA, b"backend-pong".to_vec())));
    r.send_frame(true, 1, b"after2", true).await;
    assert_eq!(r.read_frame().await, Some((1, b"after2".to_vec())));
    // The other way round: the backend's ping reaches the client, and the
    // client's pong reaches the backend, once, between the two messages.
    r.send_frame(true, 1, b"please-ping", true).await;
    assert_eq!(r.read_frame().await, Some((9, b"bp".to_vec())));
    r.send_frame(true, 0xA, b"client-pong", true).await;
    r.send_frame(true, 1, b"done", true).await;
    assert_eq!(r.read_frame().await, Some((1, b"done".to_vec())));
    let mut after_please_ping = Vec::new();
    loop {
        let m = seen_msg(&mut rx).await;
        if m == Some(Message::text("please-ping")) {
            break;
        }
        assert!(m.is_some(), "backend ended early");
    }
    for _ in 0..2 {
        after_please_ping.push(seen_msg(&mut rx).await);
    }
    assert_eq!(
        after_please_ping,
        vec![
            Some(Message::Pong("client-pong".into())),
            Some(Message::text("done"))
        ]
    );
    assert_echo(p.addr).await;
}

#[tokio::test]
async fn max_connections_gives_503_with_retry_after() {
    let p = proxy(
        echo_backend().await,
        &format!("{NO_GUARDS}  max_connections: 2\n"),
    )
    .await;
    let mut a = ws(p.addr, "/").await;
    let _b = ws(p.addr, "/").await;
    let (_r, h) = Raw::upgrade(p.addr, "/", "").await;
    assert_eq!(h.status, 503);
    assert_eq!(h.header("retry-after").as_deref(), Some("1"));
    // A slot frees when a session ends.
    a.close(None).await.unwrap();
    while let Some(Ok(_)) = within("close", a.next()).await {}
    let mut ok = false;
    for _ in 0..50 {
        if Raw::upgrade(p.addr, "/", "").await.1.status == 101 {
            ok = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(ok, "slot was not released");
}

#[tokio::test]
async fn admin_endpoints() {
    let p = proxy(echo_backend().await, NO_GUARDS).await;
    let get = |path: &'static str| {
        let a = p.admin_addr;
        async move {
            let (mut r, h) = Raw::request(
                a,
                &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            )
            .await;
            (h.status, r.body().await)
        }
    };
    assert_eq!(get("/healthz").await.0, 200);
    assert_eq!(get("/readyz").await.0, 200);
    assert_echo(p.addr).await;
    let (s, body) = get("/metrics").await;
    assert_eq!(s, 200);
    for name in [
        "wsguard_connections_active",
        "wsguard_handshakes_total{result=\"ok\"} 1",
        "wsguard_messages_total{direction=\"c2s\"} 1",
        "wsguard_bytes_total{direction=\"s2c\"} 11",
        "wsguard_ping_rtt_seconds",
        "wsguard_circuit_state",
        "wsguard_policy_generation 1",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics");
    }
    assert_eq!(get("/nope").await.0, 404);
}

#[tokio::test]
async fn shutdown_sends_1001_to_both_sides() {
    let (b, mut rx) = recording_backend().await;
    let p = proxy(b, NO_GUARDS).await;
    let mut c = ws(p.addr, "/").await;
    c.send(Message::text("x")).await.unwrap();
    assert_eq!(next(&mut c).await, Message::text("x"));
    let shutdown = tokio::spawn(p.shutdown(WAIT));
    let m = next(&mut c).await;
    assert_eq!(close_of(&m).map(|c| c.0), Some(1001));
    drop(c);
    assert_eq!(backend_close(&mut rx).await.map(|c| c.0), Some(1001));
    assert!(
        within("drain", shutdown).await.unwrap(),
        "drain finished within grace"
    );
}

/// `shutdown_close_code: 1012` (Service Restart): clients that know it
/// reconnect at once. It is read from the policy in force at the drain, so
/// a reload can turn it on; the backend still gets 1001 (wsguard is its
/// client, going away).
#[tokio::test]
async fn shutdown_close_code_1012_reaches_the_client_after_a_reload() {
    let (b, mut rx) = recording_backend().await;
    let p = proxy(b, NO_GUARDS).await;
    assert_eq!(p.process.current().policy.shutdown_close_code, 1001);
    let mut c = ws(p.addr, "/").await;
    c.send(Message::text("x")).await.unwrap();
    assert_eq!(next(&mut c).await, Message::text("x"));
    let policy = wsguard::policy::Policy::from_text(
        "t.yaml",
        &format!("listen: \"127.0.0.1:0\"\nadmin: {{ listen: \"127.0.0.1:0\" }}\nupstream: {{ url: \"ws://{b}\" }}\nshutdown_close_code: 1012\n{NO_GUARDS}"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    p.process.install(policy);
    let shutdown = tokio::spawn(p.shutdown(WAIT));
    let m = next(&mut c).await;
    assert_eq!(close_of(&m), Some((1012, "shutting down".into())));
    drop(c);
    assert_eq!(backend_close(&mut rx).await.map(|c| c.0), Some(1001));
    assert!(
        within("drain", shutdown).await.unwrap(),
        "drain finished within grace"
    );
}

#[tokio::test]
async fn echo_of_earlier_message_arrives_before_the_protocol_error_close() {
    let p = proxy(echo_backend().await, NO_GUARDS).await;
    let (mut r, h) = Raw::upgrade(p.addr, "/", "").await;
    assert_eq!(h.status, 101);
    r.send_frame(true, 1, b"first", true).await;
    r.send_frame(true, 3, b"reserved opcode", true).await;
    // As with a direct connection: the echo first, then the failure.
    assert_eq!(r.read_frame().await, Some((1, b"first".to_vec())));
    assert_eq!(r.close_code().await, Some(1002));
}

/// A backend that, on "flood", sends numbered 64 KiB messages until a send
/// has been blocked for 1 s, reports how many it sent, then sends "end".
async fn flooding_backend() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<u64>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(mut ws) =
                    tokio_tungstenite::accept_async_with_config(s, Some(client_config())).await
                else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m != Message::text("flood") {
                        if m.is_text() || m.is_binary() {
                            let _ = ws.send(m).await;
                        }
                        continue;
                    }
                    let mut sent = 0u64;
                    loop {
                        let mut msg = vec![0u8; 64 * 1024];
                        msg[..8].copy_from_slice(&sent.to_be_bytes());
                        let send = ws.send(Message::binary(msg));
                        match tokio::time::timeout(std::time::Duration::from_secs(1), send).await {
                            Ok(Ok(())) => sent += 1,
                            Ok(Err(_)) => return,
                            // Blocked: the message is queued in tungstenite
                            // and goes out once the path drains.
                            Err(_) => break,
                        }
                    }
                    let _ = tx.send(sent);
                    if ws.send(Message::text("end")).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (a, rx)
}

#[tokio::test]
async fn a_client_that_stops_reading_blocks_the_backend_and_loses_nothing() {
    let (b, mut sent_rx) = flooding_backend().await;
    let p = proxy(b, NO_GUARDS).await;
    let mut c = ws(p.addr, "/").await;
    c.send(Message::text("flood")).await.unwrap();
    // The client reads nothing: wsguard's write to it stalls, so wsguard
    // stops reading from the backend, whose own send then blocks. Without
    // backpressure wsguard would buffer and the backend would never block.
    let sent = within("the backend to block", sent_rx.recv())
        .await
        .unwrap();
    let mib = sent as f64 * 64.0 / 1024.0;
    // What is in flight fits in the two hops' kernel socket buffers plus
    // one message per pump; nothing piles up in wsguard.
    assert!(
        sent >= 1 && mib < 48.0,
        "backend sent {mib:.1} MiB before blocking"
    );
    // Now the client reads: everything arrives, in order, then "end".
    for i in 0..=sent {
        let m = next(&mut c).await;
        let Message::Binary(b) = m else {
            panic!("message {i}: {m:?}")
        };
        assert_eq!(b.len(), 64 * 1024);
        assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), i);
    }
    assert_eq!(next(&mut c).await, Message::text("end"));
    assert_echo(p.addr).await;
}
