//! Issue 3: JWT at the upgrade, token sources, claims upstream, expiry;
//! and what builds on the subject (bind_claim, per-subject caps).

use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use wsguard::sign::{self, Direction, Key, MsgType};

use crate::common::*;

const SECRET: &str = "an-hs256-secret-that-is-at-least-32-bytes-long";

/// Written once per process: tests run in parallel, and a file rewritten
/// by one test (truncated, then written) could be read empty by another.
fn secret_file() -> String {
    static FILE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("wsguard-it-jwt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("hs.secret");
        std::fs::write(&f, SECRET).unwrap();
        f.display().to_string()
    })
    .clone()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(claims: serde_json::Value) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn good(sub: &str) -> String {
    token(
        json!({ "sub": sub, "exp": now() + 600, "iss": "https://idp.example", "aud": "chat", "roles": ["a", "b"] }),
    )
}

fn jwt_policy(extra: &str) -> String {
    format!(
        "jwt:\n  mode: enforce\n  algorithms: [HS256]\n  keys: [{{ secret_file: \"{}\" }}]\n  issuer: https://idp.example\n  audience: [chat]\n{extra}keepalive: {{ interval: 0s, upstream_interval: 0s }}\nlimits:\n  per_ip: null\n  per_connection: null\n",
        secret_file()
    )
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[tokio::test]
async fn bearer_header_valid_missing_invalid_and_expired() {
    let (b, mut rx) = recording_backend().await;
    let p = proxy(b, &jwt_policy("")).await;
    let (_r, h) = Raw::upgrade(p.addr, "/", "").await;
    assert_eq!(h.status, 401);
    assert_eq!(h.header("www-authenticate").as_deref(), Some("Bearer"));
    for bad in [
        "garbage".to_string(),
        token(
            json!({ "sub": "a", "exp": now() - 3600, "iss": "https://idp.example", "aud": "chat" }),
        ),
        token(
            json!({ "sub": "a", "exp": now() + 600, "iss": "https://evil.example", "aud": "chat" }),
        ),
        token(
            json!({ "sub": "a", "exp": now() + 600, "iss": "https://idp.example", "aud": "other" }),
        ),
        token(
            json!({ "sub": "a", "exp": now() + 600, "nbf": now() + 3600, "iss": "https://idp.example", "aud": "chat" }),
        ),
        token(json!({ "sub": "a", "iss": "https://idp.example", "aud": "chat" })),
        encode(
            &Header::default(),
            &json!({ "sub": "a", "exp": now() + 600 }),
            &EncodingKey::from_secret(b"some-other-secret-of-32-bytes-or-more!!"),
        )
        .unwrap(),
    ] {
        let (_r, h) = Raw::upgrade(p.addr, "/", &format!("Authorization: Bearer {bad}\r\n")).await;
        assert_eq!(h.status, 401, "{bad}");
        assert_eq!(
            h.header("www-authenticate").as_deref(),
            Some("Bearer error=\"invalid_token\"")
        );
    }
    let (_r, h) = Raw::upgrade(
        p.addr,
        "/ok",
        &format!("Authorization: Bearer {}\r\n", good("alice")),
    )
    .await;
    assert_eq!(h.status, 101);
    // The consumed token does not reach the backend.
    let Seen::Request { path, headers } = seen(&mut rx).await else {
        panic!()
    };
    assert_eq!(path, "/ok");
    assert!(header(&headers, "authorization").is_empty());
    assert_eq!(
        metric(&p, "wsguard_rejections_total{reason=\"jwt_missing\"}"),
        1.0
    );
    assert_eq!(
        metric(&p, "wsguard_rejections_total{reason=\"jwt_expired\"}"),
        1.0
    );
    assert_echo_with(
        p.addr,
        &format!("Authorization: Bearer {}\r\n", good("bob")),
    )
    .await;
}

#[tokio::test]
async fn query_cookie_and_subprotocol_sources_are_consumed() {
    let (b, mut rx) = recording_backend().await;
    let p = proxy(b, &jwt_policy("  token_sources: [header, \"query:access_token\", \"cookie:tok\", \"subprotocol:bearer.\"]\n")).await;
    let t = good("carol");
    let (_r, h) = Raw::upgrade(p.addr, &format!("/q?room=1&access_token={t}&x=2"), "").await;
    assert_eq!(h.status, 101);
    assert_eq!(seen_request(&mut rx).await, "/q?room=1&x=2");

    let (_r, h) = Raw::upgrade(p.addr, "/c", &format!("Cookie: a=1; tok={t}; b=2\r\n")).await;
    assert_eq!(h.status, 101);
    let headers = loop {
        if let Seen::Request { headers, .. } = seen(&mut rx).await {
            break headers;
        }
    };
    assert_eq!(header(&headers, "cookie"), vec!["a=1; b=2"]);

    // A browser sends the token as a subprotocol entry; the others still negotiate.
    let (_r, h) = Raw::upgrade(
        p.addr,
        "/s",
        &format!("Sec-WebSocket-Protocol: chat, bearer.{t}\r\n"),
    )
    .await;
    assert_eq!(h.status, 101);
    assert_eq!(h.header("sec-websocket-protocol").as_deref(), Some("chat"));
    let headers = loop {
        if let Seen::Request { headers, .. } = seen(&mut rx).await {
            break headers;
        }
    };
    assert_eq!(header(&headers, "sec-websocket-protocol"), vec!["chat"]);
}

#[tokio::test]
async fn forward_claims_replace_forged_headers() {
    let (b, mut rx) = recording_backend().await;
    let p = proxy(
        b,
        &jwt_policy("  forward_claims: { sub: x-auth-subject, roles: x-auth-roles }\n"),
    )
    .await;
    let (_r, h) = Raw::upgrade(
        p.addr,
        "/",
        &format!(
            "Authorization: Bearer {}\r\nX-Auth-Subject: admin\r\n",
            good("dave")
        ),
    )
    .await;
    assert_eq!(h.status, 101);
    let Seen::Request { headers, .. } = seen(&mut rx).await else {
        panic!()
    };
    assert_eq!(header(&headers, "x-auth-subject"), vec!["dave"]);
    assert_eq!(header(&headers, "x-auth-roles"), vec!["[\"a\",\"b\"]"]);
}

#[tokio::test]
async fn close_on_expiry_closes_a_live_session_with_1008() {
    let p = proxy(echo_backend().await, &jwt_policy("  leeway: 0s\n")).await;
    let t = token(
        json!({ "sub": "erin", "exp": now() + 2, "iss": "https://idp.example", "aud": "chat" }),
    );
    let (mut r, h) = Raw::upgrade(p.addr, "/", &format!("Authorization: Bearer {t}\r\n")).await;
    assert_eq!(h.status, 101);
    let mut code = None;
    while let Some((op, payload)) = r.read_frame().await {
        if op == 8 {
            code = Some((
                u16::from_be_bytes([payload[0], payload[1]]),
                String::from_utf8_lossy(&payload[2..]).to_string(),
            ));
            break;
        }
    }
    assert_eq!(code, Some((1008, "token expired".to_string())));
}

#[tokio::test]
async fn report_mode_lets_invalid_tokens_through_and_counts_them() {
    let p = proxy(
        echo_backend().await,
        &jwt_policy("").replace("mode: enforce", "mode: report"),
    )
    .await;
    assert_eq!(
        Raw::upgrade(p.addr, "/", "Authorization: Bearer nope\r\n")
            .await
            .1
            .status,
        101
    );
    assert_eq!(
        metric(&p, "wsguard_rejections_total{reason=\"jwt_report\"}"),
        1.0
    );
}

#[tokio::test]
async fn routes_override_jwt() {
    let p = proxy(
        echo_backend().await,
        &format!(
            "{}routes:\n  - path: /public\n    jwt: {{ mode: off }}\n  - path: /admin\n    jwt: {{ mode: enforce, algorithms: [HS256], keys: [{{ secret_file: \"{}\" }}], audience: [admin] }}\n",
            jwt_policy(""),
            secret_file()
        ),
    )
    .await;
    assert_eq!(Raw::upgrade(p.addr, "/public/x", "").await.1.status, 101);
    assert_eq!(Raw::upgrade(p.addr, "/private", "").await.1.status, 401);
    let chat = format!("Authorization: Bearer {}\r\n", good("f"));
    assert_eq!(Raw::upgrade(p.addr, "/private", &chat).await.1.status, 101);
    assert_eq!(Raw::upgrade(p.addr, "/admin", &chat).await.1.status, 401);
    let admin = token(json!({ "sub": "f", "exp": now() + 600, "aud": "admin" }));
    assert_eq!(
        Raw::upgrade(
            p.addr,
            "/admin",
            &format!("Authorization: Bearer {admin}\r\n")
        )
        .await
        .1
        .status,
        101
    );
}

#[tokio::test]
async fn per_subject_connection_cap() {
    let p = proxy(
        echo_backend().await,
        &jwt_policy("").replace(
            "  per_connection: null\n",
            "  per_connection: null\n  per_subject: { connections: 1 }\n",
        ),
    )
    .await;
    let auth = |s: &str| format!("Authorization: Bearer {}\r\n", good(s));
    let (_a, h) = Raw::upgrade(p.addr, "/", &auth("gina")).await;
    assert_eq!(h.status, 101);
    let (_b, h) = Raw::upgrade(p.addr, "/", &auth("gina")).await;
    assert_eq!(h.status, 429);
    assert!(h.header("retry-after").is_some());
    assert_eq!(Raw::upgrade(p.addr, "/", &auth("hank")).await.1.status, 101);
}

/// A token without the `hmac.bind_claim` claim: 401 when HMAC enforces;
/// in report mode the handshake passes and `hmac_report` counts it (report
/// mode goes through admission's one report path).
#[tokio::test]
async fn a_missing_bind_claim_is_refused_or_reported_by_the_hmac_mode() {
    use base64::Engine as _;
    let dir = std::env::temp_dir().join(format!("wsguard-it-bindrep-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["c", "u"] {
        std::fs::write(
            dir.join(f),
            base64::engine::general_purpose::STANDARD.encode([5u8; 32]),
        )
        .unwrap();
    }
    let hmac = |mode: &str| {
        format!(
            "hmac:\n  mode: {mode}\n  bind_claim: tenant\n  client_keys: [{{ id: c1, secret_file: \"{}\" }}]\n  upstream_key: {{ id: p1, secret_file: \"{}\" }}\n",
            dir.join("c").display(),
            dir.join("u").display()
        )
    };
    let auth = format!("Authorization: Bearer {}\r\n", good("judy"));
    let p = proxy(echo_backend().await, &jwt_policy(&hmac("enforce"))).await;
    let (_r, h) = Raw::upgrade(p.addr, "/", &auth).await;
    assert_eq!(h.status, 401, "{}", h.text);
    assert_eq!(
        metric(&p, "wsguard_rejections_total{reason=\"hmac_report\"}"),
        0.0
    );

    let p = proxy(echo_backend().await, &jwt_policy(&hmac("report"))).await;
    let (_r, h) = Raw::upgrade(p.addr, "/", &auth).await;
    assert_eq!(h.status, 101, "{}", h.text);
    assert_eq!(
        metric(&p, "wsguard_rejections_total{reason=\"hmac_report\"}"),
        1.0
    );
    assert_eq!(
        metric(&p, "wsguard_rejections_total{reason=\"jwt_report\"}"),
        0.0
    );
}

#[tokio::test]
async fn bind_claim_binds_signatures_to_the_subject() {
    use base64::Engine as _;
    let dir = std::env::temp_dir().join(format!("wsguard-it-bind-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = [3u8; 32];
    let uk = [4u8; 32];
    std::fs::write(
        dir.join("c"),
        base64::engine::general_purpose::STANDARD.encode(ck),
    )
    .unwrap();
    std::fs::write(
        dir.join("u"),
        base64::engine::general_purpose::STANDARD.encode(uk),
    )
    .unwrap();
    let (b, mut rx) = recording_backend().await;
    let p = proxy(
        b,
        &jwt_policy(&format!(
            "hmac:\n  mode: enforce\n  bind_claim: sub\n  client_keys: [{{ id: c1, secret_file: \"{}\" }}]\n  upstream_key: {{ id: p1, secret_file: \"{}\" }}\n",
            dir.join("c").display(),
            dir.join("u").display()
        )),
    )
    .await;
    let key = Key::new("c1", ck.to_vec()).unwrap();
    let up = Key::new("p1", uk.to_vec()).unwrap();
    let url = format!("ws://{}/", p.addr);
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", good("ivan")).parse().unwrap(),
    );
    let (mut c, _) = within("connect", tokio_tungstenite::connect_async(req.clone()))
        .await
        .unwrap();
    let signed = sign::sign(
        &key,
        Direction::C2s,
        1,
        sign::now_ms(),
        "ivan",
        MsgType::Text,
        b"hello",
    );
    c.send(Message::text(String::from_utf8(signed).unwrap()))
        .await
        .unwrap();
    // The backend gets it re-signed with the same bind.
    let Some(Message::Text(t)) = seen_msg(&mut rx).await else {
        panic!()
    };
    let mut st = sign::SeqState::default();
    let payload = sign::verify(
        std::slice::from_ref(&up),
        Direction::C2s,
        "ivan",
        MsgType::Text,
        t.as_bytes(),
        sign::now_ms(),
        30_000,
        &mut st,
    )
    .unwrap();
    assert_eq!(payload, b"hello");
    // A signature made for another bind value fails.
    let other = sign::sign(
        &key,
        Direction::C2s,
        2,
        sign::now_ms(),
        "mallory",
        MsgType::Text,
        b"hello",
    );
    c.send(Message::text(String::from_utf8(other).unwrap()))
        .await
        .unwrap();
    loop {
        match within("close", c.next()).await {
            Some(Ok(Message::Close(f))) => {
                assert_eq!(f.map(|f| u16::from(f.code)), Some(1008));
                break;
            }
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    }
    // A token without the claim is refused at the handshake.
    let nosub = token(json!({ "exp": now() + 600, "iss": "https://idp.example", "aud": "chat" }));
    assert_eq!(
        Raw::upgrade(p.addr, "/", &format!("Authorization: Bearer {nosub}\r\n"))
            .await
            .1
            .status,
        401
    );
}
