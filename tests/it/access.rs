//! Origin checks, routes, and protection of the handshake path.

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

const OFF: &str = "keepalive: { interval: 0s, upstream_interval: 0s }\nlimits: { per_ip: null, per_connection: null }\n";

#[tokio::test]
async fn origin_enforce_allows_listed_and_refuses_the_rest_before_the_backend() {
    let (b, mut rx) = recording_backend().await;
    let p = proxy(b, &format!("origin:\n  mode: enforce\n  allow: [\"https://app.example.com\", \"https://*.example.org\"]\n{OFF}")).await;
    let refused = [
        "Origin: https://evil.example\r\n",
        "Origin: https://app.example.com.evil.io\r\n",
        "Origin: http://app.example.com\r\n",
        "Origin: https://app.example.com:8443\r\n",
        "Origin: null\r\n",
        "Origin: https://a.b.example.org\r\n",
        "Origin: not a url\r\n",
        "",
    ];
    for o in refused {
        let (_r, h) = Raw::upgrade(p.addr, "/", o).await;
        assert_eq!(h.status, 403, "{o:?}");
    }
    for o in [
        "Origin: https://APP.example.com:443\r\n",
        "Origin: https://x.example.org\r\n",
    ] {
        let (_r, h) = Raw::upgrade(p.addr, "/first", o).await;
        assert_eq!(h.status, 101, "{o:?}");
    }
    // The backend never saw a refused connection: its first request is the
    // first allowed one.
    let Seen::Request { path, .. } = seen(&mut rx).await else {
        panic!()
    };
    assert_eq!(path, "/first");
    assert_eq!(
        metric(
            &p,
            "wsguard_rejections_total{reason=\"origin_not_allowed\"}"
        ),
        5.0
    );
    assert_eq!(
        metric(&p, "wsguard_rejections_total{reason=\"origin_null\"}"),
        1.0
    );
    assert_eq!(
        metric(&p, "wsguard_rejections_total{reason=\"origin_malformed\"}"),
        1.0
    );
    assert_eq!(
        metric(&p, "wsguard_rejections_total{reason=\"origin_missing\"}"),
        1.0
    );
    assert_echo_with(p.addr, "Origin: https://app.example.com\r\n").await;
}

#[tokio::test]
async fn origin_allow_missing_and_report_mode() {
    let p = proxy(
        echo_backend().await,
        &format!("origin:\n  mode: enforce\n  allow: []\n  allow_missing: true\n{OFF}"),
    )
    .await;
    assert_eq!(Raw::upgrade(p.addr, "/", "").await.1.status, 101);
    assert_eq!(
        Raw::upgrade(p.addr, "/", "Origin: https://a.example\r\n")
            .await
            .1
            .status,
        403
    );
    let p = proxy(
        echo_backend().await,
        &format!("origin:\n  mode: report\n  allow: [\"https://ok.example\"]\n{OFF}"),
    )
    .await;
    assert_eq!(
        Raw::upgrade(p.addr, "/", "Origin: https://evil.example\r\n")
            .await
            .1
            .status,
        101
    );
    assert_eq!(
        metric(&p, "wsguard_rejections_total{reason=\"origin_report\"}"),
        1.0
    );
}

#[tokio::test]
async fn routes_pick_upstream_and_policy_by_longest_prefix() {
    let (main_b, mut main_rx) = recording_backend().await;
    let (admin_b, mut admin_rx) = recording_backend().await;
    let p = proxy(
        main_b,
        &format!(
            "origin:\n  mode: enforce\n  allow: [\"https://app.example.com\"]\n{OFF}routes:\n  - path: /admin\n    upstream: {{ url: \"ws://{admin_b}/internal\" }}\n    origin: {{ mode: enforce, allow: [\"https://admin.example.com\"] }}\n  - path: /public\n    origin: {{ mode: off }}\n"
        ),
    )
    .await;
    // /admin goes to the admin backend, under its base path, with its own origin list.
    assert_eq!(
        Raw::upgrade(
            p.addr,
            "/admin/x?y=1",
            "Origin: https://app.example.com\r\n"
        )
        .await
        .1
        .status,
        403
    );
    let (_a, h) = Raw::upgrade(
        p.addr,
        "/admin/x?y=1",
        "Origin: https://admin.example.com\r\n",
    )
    .await;
    assert_eq!(h.status, 101);
    let Seen::Request { path, .. } = seen(&mut admin_rx).await else {
        panic!()
    };
    assert_eq!(path, "/internal/admin/x?y=1");
    // /public needs no origin; /administrator is not /admin.
    assert_eq!(Raw::upgrade(p.addr, "/public/feed", "").await.1.status, 101);
    assert_eq!(
        Raw::upgrade(
            p.addr,
            "/administrator",
            "Origin: https://admin.example.com\r\n"
        )
        .await
        .1
        .status,
        403
    );
    let (_m, h) = Raw::upgrade(
        p.addr,
        "/administrator",
        "Origin: https://app.example.com\r\n",
    )
    .await;
    assert_eq!(h.status, 101);
    assert_eq!(seen_request(&mut main_rx).await, "/public/feed");
    assert_eq!(
        metric(
            &p,
            "wsguard_route_handshakes_total{route=\"/admin\",result=\"ok\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &p,
            "wsguard_route_handshakes_total{route=\"/admin\",result=\"origin_not_allowed\"}"
        ),
        1.0
    );
    assert_eq!(seen_request(&mut main_rx).await, "/administrator");
}

#[tokio::test]
async fn idle_sockets_from_one_peer_are_capped_before_the_handshake() {
    let p = proxy(
        echo_backend().await,
        "keepalive: { interval: 0s, upstream_interval: 0s }\nlimits:\n  per_ip: { handshakes: null, connections: null, pending_handshakes: 32 }\n  per_connection: null\n",
    )
    .await;
    let mut idle = Vec::new();
    for _ in 0..32 {
        idle.push(Raw::connect(p.addr).await);
    }
    // The 33rd silent socket from this address is refused at once.
    let mut extra = Raw::connect(p.addr).await;
    let h = extra.read_head().await;
    assert_eq!(h.status, 429);
    assert_eq!(h.header("retry-after").as_deref(), Some("1"));
    // Capacity comes back as the idle ones go away (the proxy frees the
    // slot before it closes the socket).
    for mut r in idle {
        use tokio::io::AsyncWriteExt;
        r.s.shutdown().await.unwrap();
        assert!(r.eof().await);
    }
    let (_r, h) = Raw::upgrade(p.addr, "/", "").await;
    assert_eq!(h.status, 101);
    assert!(metric(&p, "wsguard_rejections_total{reason=\"pending_limit\"}") >= 1.0);
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_stops_reading_is_blamed_not_the_client() {
    let p = proxy(
        stuck_backend().await,
        "keepalive: { interval: 100ms, max_missed: 2, upstream_interval: 100ms }\nlimits: { per_ip: null, per_connection: null }\n",
    )
    .await;
    use futures_util::StreamExt;
    let (mut tx, mut rx) = ws(p.addr, "/").await.split();
    // Fill the backend's TCP window; the client keeps reading (and so
    // answering pings) the whole time.
    let chunk = vec![0u8; 64 * 1024];
    let close = within("close", async {
        loop {
            tokio::select! {
                m = rx.next() => match m {
                    Some(Ok(Message::Close(f))) => return f,
                    Some(Ok(_)) => continue,
                    _ => return None,
                },
                r = tx.send(Message::binary(chunk.clone())) => if r.is_err() {
                    // Writing failed: the close frame may already be queued.
                    while let Some(Ok(m)) = rx.next().await {
                        if let Message::Close(f) = m {
                            return f;
                        }
                    }
                    return None;
                },
            }
        }
    })
    .await;
    // tungstenite 0.30 does not know code 1014 and shows it as 1002, so
    // read what wsguard sent from its own books.
    assert!(close.is_some());
    assert_eq!(
        metric(
            &p,
            "wsguard_session_closes_total{side=\"backend\",code=\"1014\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &p,
            "wsguard_session_closes_total{side=\"client\",code=\"1011\"}"
        ),
        0.0
    );
}
