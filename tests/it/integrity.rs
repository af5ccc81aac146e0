//! Issue 11: request integrity. What the backend sees must be what wsguard
//! checked. One test per attack; each asserts what the backend received or
//! what the client got, then that a normal client still works.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;
use tokio::sync::mpsc;

use crate::common::*;

const SECRET: &str = "an-hs256-secret-that-is-at-least-32-bytes-long";

/// Written once per process: tests run in parallel and must never see the
/// file half written.
fn secret_file() -> String {
    static FILE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("wsguard-it-integrity-{}", std::process::id()));
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

fn token(sub: &str, aud: &str) -> String {
    encode(
        &Header::default(),
        &json!({ "sub": sub, "exp": now() + 600, "aud": aud }),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn jwt_section(indent: &str, aud: &str, extra: &str) -> String {
    format!(
        "{indent}jwt:\n{indent}  mode: enforce\n{indent}  algorithms: [HS256]\n{indent}  keys: [{{ secret_file: \"{}\" }}]\n{indent}  audience: [{aud}]\n{extra}",
        secret_file()
    )
}

const QUIET: &str =
    "keepalive: { interval: 0s, upstream_interval: 0s }\nlimits:\n  per_ip: null\n  per_connection: null\n";

/// The next request the backend saw: its request line path and headers.
async fn request(rx: &mut mpsc::UnboundedReceiver<Seen>) -> (String, Vec<(String, String)>) {
    loop {
        if let Seen::Request { path, headers } = seen(rx).await {
            return (path, headers);
        }
    }
}

fn values<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// `/admin` demands an `admin` audience; the rest of the site is open.
fn admin_route_policy() -> String {
    format!(
        "{QUIET}routes:\n  - path: /admin\n{}",
        jwt_section("    ", "admin", "")
    )
}

#[tokio::test]
async fn route_bypass_through_path_spelling_is_closed() {
    let (b, mut rx) = recording_backend().await;
    let p = proxy(b, &admin_route_policy()).await;
    let user = token("u", "user");
    let admin = token("root", "admin");
    for path in [
        "/%61dmin",
        "//admin",
        "/./admin",
        "/public/../admin",
        "/admin;jsessionid=1",
        "/public/%2e%2e/admin",
        "/public/..;x/admin/",
    ] {
        // The /admin route's audience applies to every spelling of it.
        let (_r, h) =
            Raw::upgrade(p.addr, path, &format!("Authorization: Bearer {user}\r\n")).await;
        assert_eq!(h.status, 401, "{path}: {}", h.text);
        let (_r, h) =
            Raw::upgrade(p.addr, path, &format!("Authorization: Bearer {admin}\r\n")).await;
        assert_eq!(h.status, 101, "{path}: {}", h.text);
        // The backend gets the normalised path, the one that was checked.
        let (seen_path, _) = request(&mut rx).await;
        let expected = match path {
            "/admin;jsessionid=1" => "/admin;jsessionid=1",
            "/public/..;x/admin/" => "/admin/",
            _ => "/admin",
        };
        assert_eq!(seen_path, expected, "{path}");
    }
    // The query travels unchanged after the normalised path.
    let (_r, h) = Raw::upgrade(p.addr, "/a/./b/../c?x=%2F&y=1", "").await;
    assert_eq!(h.status, 101, "{}", h.text);
    assert_eq!(request(&mut rx).await.0, "/a/c?x=%2F&y=1");
    // Paths that cannot be normalised safely never reach the backend.
    for path in [
        "/%2Fadmin",
        "/a%2fb",
        "/a%5Cb",
        "/a\\b",
        "/a%00b",
        "/a%0Ab",
        "/a%zz",
        "/a%4",
        "/..",
        "/public/../../admin",
        "/%2e%2e/admin",
    ] {
        let (_r, h) = Raw::upgrade(p.addr, path, "").await;
        assert_eq!(h.status, 400, "{path}: {}", h.text);
    }
    assert_echo(p.addr).await;
}

#[tokio::test]
async fn forged_identity_headers_never_reach_the_backend() {
    let (b, mut rx) = recording_backend().await;
    // The claim header is asserted on /secure only; the top level has no
    // JWT at all, and must still refuse to carry a client's copy.
    let p = proxy(
        b,
        &format!(
            "{QUIET}routes:\n  - path: /secure\n{}",
            jwt_section(
                "    ",
                "chat",
                "      forward_claims: { sub: x-auth-subject }\n"
            )
        ),
    )
    .await;
    let forged = "X-Auth-Subject: root\r\nX_Auth_Subject: root\r\nX_Client_Subject: root\r\nX_Forwarded_For: 6.6.6.6\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-Port: 1\r\nX-Forwarded-Proto: https\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nX-Request-Id: forged\r\nX-Custom: kept\r\n";
    let (_r, h) = Raw::upgrade(p.addr, "/open", forged).await;
    assert_eq!(h.status, 101, "{}", h.text);
    let (_, headers) = request(&mut rx).await;
    for name in [
        "x-auth-subject",
        "x_auth_subject",
        "x_client_subject",
        "x_forwarded_for",
        "x-forwarded-host",
        "x-forwarded-port",
        "forwarded",
        "x-real-ip",
    ] {
        assert!(values(&headers, name).is_empty(), "{name}: {headers:?}");
    }
    assert_eq!(values(&headers, "x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(values(&headers, "x-forwarded-proto"), vec!["http"]);
    let rid = values(&headers, "x-request-id");
    assert_eq!(rid.len(), 1);
    assert_ne!(rid[0], "forged");
    assert_eq!(values(&headers, "x-custom"), vec!["kept"]);

    // Naming wsguard's own headers in Connection removes the client's
    // copies, never the ones wsguard sets.
    let t = token("alice", "chat");
    let (_r, h) = Raw::upgrade(
        p.addr,
        "/secure",
        &format!("Authorization: Bearer {t}\r\nX-Auth-Subject: root\r\nX-Hop: 1\r\nConnection: Upgrade, x-auth-subject, x-forwarded-for, x-request-id, x-hop\r\n"),
    )
    .await;
    assert_eq!(h.status, 101, "{}", h.text);
    let (_, headers) = request(&mut rx).await;
    assert_eq!(values(&headers, "x-auth-subject"), vec!["alice"]);
    assert_eq!(values(&headers, "x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(values(&headers, "x-request-id").len(), 1);
    assert!(values(&headers, "x-hop").is_empty());
    assert!(values(&headers, "authorization").is_empty());
    assert_echo(p.addr).await;
}

fn all_sources(extra: &str) -> String {
    format!(
        "{QUIET}{}",
        jwt_section(
            "",
            "chat",
            &format!("  token_sources: [header, \"query:access_token\", \"cookie:tok\", \"subprotocol:bearer.\"]\n{extra}")
        )
    )
}

#[tokio::test]
async fn a_token_in_more_than_one_place_is_400_invalid_request() {
    let (b, mut rx) = recording_backend().await;
    let p = proxy(b, &all_sources("")).await;
    let good = token("alice", "chat");
    let forged = token("root", "other");
    let auth = format!("Authorization: Bearer {good}\r\n");
    for (path, extra) in [
        (format!("/?access_token={forged}"), auth.clone()),
        ("/".to_string(), format!("{auth}Cookie: tok={forged}\r\n")),
        (
            "/".to_string(),
            format!("{auth}Sec-WebSocket-Protocol: chat, bearer.{forged}\r\n"),
        ),
        (
            "/".to_string(),
            format!("{auth}Authorization: Bearer {forged}\r\n"),
        ),
        (
            format!("/?access_token={good}&access_token={forged}"),
            String::new(),
        ),
    ] {
        let (_r, h) = Raw::upgrade(p.addr, &path, &extra).await;
        assert_eq!(h.status, 400, "{path} {extra}: {}", h.text);
        assert_eq!(
            h.header("www-authenticate").as_deref(),
            Some("Bearer error=\"invalid_request\""),
            "{path} {extra}"
        );
    }
    // One token: every source is emptied before forwarding, including
    // empty or foreign ones the client added.
    let (_r, h) = Raw::upgrade(
        p.addr,
        "/room?access_token=&x=1",
        &format!("{auth}Cookie: tok=; theme=dark\r\nSec-WebSocket-Protocol: chat\r\n"),
    )
    .await;
    assert_eq!(h.status, 101, "{}", h.text);
    let (path, headers) = request(&mut rx).await;
    assert_eq!(path, "/room?x=1");
    assert!(values(&headers, "authorization").is_empty());
    assert_eq!(values(&headers, "cookie"), vec!["theme=dark"]);
    assert_eq!(values(&headers, "sec-websocket-protocol"), vec!["chat"]);
    let (_r, h) = Raw::upgrade(p.addr, "/", &auth).await;
    assert_eq!(h.status, 101, "{}", h.text);
}

#[tokio::test]
async fn forward_token_passes_only_the_consumed_token() {
    let (b, mut rx) = recording_backend().await;
    let p = proxy(b, &all_sources("  forward_token: true\n")).await;
    let good = token("alice", "chat");
    let (_r, h) = Raw::upgrade(
        p.addr,
        "/?access_token=&y=2",
        &format!("Authorization: Bearer {good}\r\nCookie: tok=; a=b\r\n"),
    )
    .await;
    assert_eq!(h.status, 101, "{}", h.text);
    let (path, headers) = request(&mut rx).await;
    assert_eq!(path, "/?y=2");
    assert_eq!(
        values(&headers, "authorization"),
        vec![format!("Bearer {good}").as_str()]
    );
    assert_eq!(values(&headers, "cookie"), vec!["a=b"]);
    let (_r, h) = Raw::upgrade(p.addr, &format!("/?access_token={good}"), "").await;
    assert_eq!(h.status, 101, "{}", h.text);
    let (path, headers) = request(&mut rx).await;
    assert_eq!(path, format!("/?access_token={good}"));
    assert!(values(&headers, "authorization").is_empty());
}

#[tokio::test]
async fn bodies_bare_lf_and_bad_hosts_are_400() {
    let (b, mut rx) = recording_backend().await;
    let p = proxy(b, QUIET).await;
    let a = p.addr;
    let up = format!("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n");
    for head in [
        format!("GET / HTTP/1.1\r\nHost: {a}\r\n{up}Content-Length: 5\r\n\r\nhello"),
        format!("GET / HTTP/1.1\r\nHost: {a}\r\n{up}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        format!("GET / HTTP/1.1\nHost: {a}\n{}\n", up.replace("\r\n", "\n")),
        format!("GET / HTTP/1.1\r\nHost: {a}\r\nX-Smuggle: 1\nX-Auth-Subject: root\r\n{up}\r\n"),
        format!("GET / HTTP/1.1\r\nHost: a\tb\r\n{up}\r\n"),
        format!("GET / HTTP/1.1\r\nHost: a b\r\n{up}\r\n"),
        format!("GET / HTTP/1.1\r\nHost: user@{a}\r\n{up}\r\n"),
    ] {
        let (_r, h) = Raw::request(a, &head).await;
        assert_eq!(h.status, 400, "{head:?}: {}", h.text);
    }
    // Content-Length: 0 is no body.
    let (_r, h) = Raw::upgrade(a, "/", "Content-Length: 0\r\n").await;
    assert_eq!(h.status, 101, "{}", h.text);
    assert_eq!(request(&mut rx).await.0, "/");
    assert_echo(a).await;
}

mod rotation {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use futures_util::{SinkExt, StreamExt};
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::Message;
    use wsguard::sign::{self, Direction, Key, MsgType, SeqState};

    use crate::common::*;

    const CLIENT: [u8; 32] = [7; 32];
    const P1: [u8; 32] = [1; 32];
    const P2: [u8; 32] = [2; 32];

    fn key_file(name: &str, k: &[u8]) -> String {
        use base64::Engine as _;
        let dir = std::env::temp_dir().join(format!("wsguard-it-rot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join(name);
        write_atomic(&f, base64::engine::general_purpose::STANDARD.encode(k));
        f.display().to_string()
    }

    fn signed(kid: &str, k: &[u8], dir: Direction, seq: u64, payload: &str) -> Message {
        let key = Key::new(kid, k.to_vec()).unwrap();
        let out = sign::sign(
            &key,
            dir,
            seq,
            sign::now_ms(),
            "",
            MsgType::Text,
            payload.as_bytes(),
        );
        Message::text(String::from_utf8(out).unwrap())
    }

    /// A backend that knows p1 and p2: it verifies with either, reports the
    /// kid wsguard signed with, and signs its answers with `signs_with`.
    async fn backend(
        signs_with: Arc<Mutex<&'static str>>,
    ) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let Ok((s, _)) = l.accept().await else { return };
            let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                return;
            };
            let keys = [
                Key::new("p1", P1.to_vec()).unwrap(),
                Key::new("p2", P2.to_vec()).unwrap(),
            ];
            let mut state = SeqState::default();
            let mut seq = 0;
            while let Some(Ok(Message::Text(t))) = ws.next().await {
                let kid = t.split('.').nth(1).unwrap_or("").to_string();
                let ok = sign::verify(
                    &keys,
                    Direction::C2s,
                    "",
                    MsgType::Text,
                    t.as_bytes(),
                    sign::now_ms(),
                    30_000,
                    &mut state,
                )
                .is_ok();
                let _ = tx.send(format!("{kid}:{ok}"));
                seq += 1;
                let with = *signs_with.lock().unwrap();
                let k: &[u8] = if with == "p1" { &P1 } else { &P2 };
                if ws
                    .send(signed(with, k, Direction::S2c, seq, "pong"))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        (a, rx)
    }

    #[tokio::test]
    async fn rotating_the_upstream_key_through_a_list_drops_no_session() {
        let signs_with = Arc::new(Mutex::new("p1"));
        let (b, mut rx) = backend(Arc::clone(&signs_with)).await;
        let (c, p1, p2) = (
            key_file("c", &CLIENT),
            key_file("p1", &P1),
            key_file("p2", &P2),
        );
        let yaml = |upstream: &str| {
            format!(
                "listen: \"127.0.0.1:0\"\nadmin: {{ listen: \"127.0.0.1:0\" }}\nupstream: {{ url: \"ws://{b}\" }}\nhmac:\n  mode: enforce\n  client_keys: [{{ id: c1, secret_file: \"{c}\" }}]\n  upstream_key: {upstream}\nkeepalive: {{ interval: 0s, upstream_interval: 0s }}\nlimits: {{ per_ip: null, per_connection: null }}\n"
            )
        };
        let one = |kid: &str, f: &str| format!("{{ id: {kid}, secret_file: \"{f}\" }}");
        let p = proxy_yaml(&yaml(&one("p1", &p1))).await;
        let mut client = ws(p.addr, "/").await;
        let mut seq = 0;
        let mut exchange =
            async |client: &mut Ws, rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>| {
                seq += 1;
                client
                    .send(signed("c1", &CLIENT, Direction::C2s, seq, "ping"))
                    .await
                    .unwrap();
                let m = next(client).await;
                assert!(
                    matches!(&m, Message::Text(t) if t.starts_with("wsg1.c1.")),
                    "{m:?}"
                );
                within("backend report", rx.recv()).await.unwrap()
            };
        assert_eq!(exchange(&mut client, &mut rx).await, "p1:true");
        // Step 1: wsguard accepts p2 as well, still signs with p1.
        let both = format!("[{}, {}]", one("p1", &p1), one("p2", &p2));
        p.process
            .install(wsguard::policy::Policy::from_text("r.yaml", &yaml(&both)).unwrap());
        assert_eq!(exchange(&mut client, &mut rx).await, "p1:true");
        // Step 2: the backend signs with p2 (it accepts both already).
        *signs_with.lock().unwrap() = "p2";
        assert_eq!(exchange(&mut client, &mut rx).await, "p1:true");
        // Step 3: wsguard signs with p2 first, still accepts p1.
        let swapped = format!("[{}, {}]", one("p2", &p2), one("p1", &p1));
        p.process
            .install(wsguard::policy::Policy::from_text("r.yaml", &yaml(&swapped)).unwrap());
        assert_eq!(exchange(&mut client, &mut rx).await, "p2:true");
        // Step 4: p1 is retired.
        p.process
            .install(wsguard::policy::Policy::from_text("r.yaml", &yaml(&one("p2", &p2))).unwrap());
        assert_eq!(exchange(&mut client, &mut rx).await, "p2:true");
        assert_eq!(
            metric(
                &p,
                "wsguard_signature_failures_total{reason=\"unknown_kid\"}"
            ),
            0.0
        );
        client.close(None).await.unwrap();
    }
}

mod jwks {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    use base64::Engine as _;
    use jsonwebtoken::{encode, Algorithm, DecodingKey, EncodingKey, Header};
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use crate::common::*;

    const EC1_PRIV: &str = include_str!("../fixtures/jwt/ec1_private.pem");
    const EC1_PUB: &str = include_str!("../fixtures/jwt/ec1_public.pem");

    struct Idp {
        up: AtomicBool,
        hits: AtomicUsize,
        discovery_hits: AtomicUsize,
    }

    /// A JWKS endpoint serving the ec1 key as kid e1 while `up`, else 503.
    async fn idp() -> (Arc<Idp>, String) {
        let k = DecodingKey::from_ec_pem(EC1_PUB.as_bytes()).unwrap();
        let p = k.try_get_as_bytes().unwrap().to_vec();
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let body = json!({ "keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": "e1",
            "x": b64(&p[1..33]), "y": b64(&p[33..65]),
        }]})
        .to_string();
        let state = Arc::new(Idp {
            up: AtomicBool::new(true),
            hits: AtomicUsize::new(0),
            discovery_hits: AtomicUsize::new(0),
        });
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let url = format!("http://{addr}/jwks.json");
        let st = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let (st, body) = (Arc::clone(&st), body.clone());
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 2048];
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    st.hits.fetch_add(1, Ordering::SeqCst);
                    let head = String::from_utf8_lossy(&got).to_string();
                    let target = head.split(' ').nth(1).unwrap_or("").to_string();
                    let (status, body) = if !st.up.load(Ordering::SeqCst) {
                        (503, "down".to_string())
                    } else if target.ends_with("/.well-known/openid-configuration") {
                        // Whatever the path, the provider's issuer is its
                        // root URL.
                        st.discovery_hits.fetch_add(1, Ordering::SeqCst);
                        let root = format!("http://{addr}");
                        (
                            200,
                            json!({ "issuer": root, "jwks_uri": format!("{root}/jwks.json") })
                                .to_string(),
                        )
                    } else {
                        (200, body)
                    };
                    let resp = format!("HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        (state, url)
    }

    fn token() -> String {
        token_from("")
    }

    fn token_from(iss: &str) -> String {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("e1".into());
        encode(
            &h,
            &json!({ "sub": "alice", "exp": exp, "iss": iss }),
            &EncodingKey::from_ec_pem(EC1_PRIV.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn jwks_keys_survive_a_reload_while_the_idp_is_down() {
        let (idp, url) = idp().await;
        let (b, _rx) = recording_backend().await;
        let dir = std::env::temp_dir().join(format!("wsguard-it-jwks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("policy.yaml");
        let yaml = |refresh: &str, audience: &str| {
            format!(
                "listen: \"127.0.0.1:0\"\nadmin: {{ listen: \"127.0.0.1:0\" }}\nupstream: {{ url: \"ws://{b}\" }}\njwt:\n  mode: enforce\n  algorithms: [ES256]\n  jwks_url: \"{url}\"\n  jwks_refresh: {refresh}\n{audience}routes:\n  - path: /other\n    jwt: {{ mode: enforce, algorithms: [ES256], jwks_url: \"{url}\" }}\nkeepalive: {{ interval: 0s, upstream_interval: 0s }}\nlimits: {{ per_ip: null, per_connection: null }}\n"
            )
        };
        let p = proxy_yaml(&yaml("10m", "")).await;
        let auth = format!("Authorization: Bearer {}\r\n", token());
        let (_r, h) = Raw::upgrade(p.addr, "/", &auth).await;
        assert_eq!(h.status, 101, "{}", h.text);
        let (_r, h) = Raw::upgrade(p.addr, "/other", &auth).await;
        assert_eq!(h.status, 101, "{}", h.text);
        // Two routes name the URL: one cache, fetched once.
        let cache = p.process.jwks_cache(&url).expect("a cache for the URL");
        assert_eq!(cache.fetches(), 1);
        assert_eq!(idp.hits.load(Ordering::SeqCst), 1);

        // The identity provider goes down; the operator reloads (SIGHUP),
        // once with the same settings, once with other ones.
        idp.up.store(false, Ordering::SeqCst);
        for (refresh, audience) in [("10m", ""), ("5m", "  leeway: 10s\n")] {
            std::fs::write(&file, yaml(refresh, audience)).unwrap();
            let gen = p.process.generation();
            assert!(wsguard::reload::reload(&p.process, &file));
            assert_eq!(p.process.generation(), gen + 1);
            let (_r, h) = Raw::upgrade(p.addr, "/", &auth).await;
            assert_eq!(h.status, 101, "after reload: {}", h.text);
        }
        // Nothing was refetched: the keys were fresh.
        assert_eq!(idp.hits.load(Ordering::SeqCst), 1);
        assert!(Arc::ptr_eq(&cache, &p.process.jwks_cache(&url).unwrap()));

        // A policy that no longer names the URL drops its cache.
        std::fs::write(
            &file,
            format!("listen: \"127.0.0.1:0\"\nadmin: {{ listen: \"127.0.0.1:0\" }}\nupstream: {{ url: \"ws://{b}\" }}\n"),
        )
        .unwrap();
        assert!(wsguard::reload::reload(&p.process, &file));
        assert!(p.process.jwks_cache(&url).is_none());
        assert_echo(p.addr).await;
    }

    /// Log lines written while a test runs (the test's runtime is single
    /// threaded, so every task logs on this thread).
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn oidc_discovery_leads_to_the_jwks_and_a_wrong_issuer_is_refused() {
        let logs = Captured::default();
        let sink = logs.clone();
        let _log = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::WARN)
                .with_ansi(false)
                .with_writer(move || sink.clone())
                .finish(),
        );
        let (idp, url) = idp().await;
        let root = url.trim_end_matches("/jwks.json").to_string();
        let (b, _rx) = recording_backend().await;
        let yaml = |issuer: &str| {
            format!(
                "listen: \"127.0.0.1:0\"\nadmin: {{ listen: \"127.0.0.1:0\" }}\nupstream: {{ url: \"ws://{b}\" }}\njwt:\n  mode: enforce\n  algorithms: [ES256]\n  discovery: true\n  issuer: \"{issuer}\"\nkeepalive: {{ interval: 0s, upstream_interval: 0s }}\nlimits: {{ per_ip: null, per_connection: null }}\n"
            )
        };
        // The document at {issuer}/.well-known/openid-configuration names
        // this issuer and its jwks_uri: tokens verify with that JWKS.
        let p = proxy_yaml(&yaml(&root)).await;
        let auth = format!("Authorization: Bearer {}\r\n", token_from(&root));
        let (_r, h) = Raw::upgrade(p.addr, "/", &auth).await;
        assert_eq!(h.status, 101, "{}", h.text);
        assert_eq!(idp.discovery_hits.load(Ordering::SeqCst), 1);
        assert_eq!(idp.hits.load(Ordering::SeqCst), 2);
        drop(p);

        // An issuer the document does not name exactly (here a realm under
        // the provider's root): the document is refused, so are its keys.
        let realm = format!("{root}/realms/a");
        let p = proxy_yaml(&yaml(&realm)).await;
        let auth = format!("Authorization: Bearer {}\r\n", token_from(&realm));
        let (_r, h) = Raw::upgrade(p.addr, "/", &auth).await;
        assert_eq!(h.status, 401, "{}", h.text);
        assert_eq!(idp.discovery_hits.load(Ordering::SeqCst), 2);
        // Only the document was read: no JWKS fetched for it.
        assert_eq!(idp.hits.load(Ordering::SeqCst), 3);
        let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.contains("OIDC discovery refused: the document's issuer is not jwt.issuer")
                && text.contains(&format!("configured_issuer=\"{realm}\"")),
            "{text}"
        );
    }
}

mod caps {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    use crate::common::*;

    /// Accepts TCP, reports each connection, never answers: a handshake
    /// toward it stays in progress.
    async fn holding_backend() -> (SocketAddr, mpsc::UnboundedReceiver<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                held.push(s);
                let _ = tx.send(());
            }
        });
        (a, rx)
    }

    fn upgrade_head(addr: SocketAddr, path: &str, xff: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\nX-Forwarded-For: {xff}\r\n\r\n")
    }

    async fn closed_by_proxy(mut s: TcpStream) {
        s.shutdown().await.unwrap();
        let mut b = [0u8; 64];
        while within("the proxy closes", s.read(&mut b))
            .await
            .unwrap_or(0)
            > 0
        {}
    }

    #[tokio::test]
    async fn pending_handshakes_are_capped_per_client_ip_behind_a_trusted_proxy() {
        let echo = echo_backend().await;
        let (hold, mut accepted) = holding_backend().await;
        let p = proxy(
            echo,
            &format!("keepalive: {{ interval: 0s, upstream_interval: 0s }}\nlimits:\n  handshake_timeout: 30s\n  trusted_proxies: [\"127.0.0.1/32\"]\n  per_ip:\n    handshakes: null\n    pending_handshakes: 2\nroutes:\n  - path: /hold\n    upstream: {{ url: \"ws://{hold}\", connect_timeout: 30s }}\n"),
        )
        .await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(p.addr).await.unwrap();
            s.write_all(upgrade_head(p.addr, "/hold", "10.0.0.1").as_bytes())
                .await
                .unwrap();
            held.push(s);
            within("the dial", accepted.recv()).await.unwrap();
        }
        // The same client through the same proxy: over its cap.
        let (_r, h) = Raw::request(p.addr, &upgrade_head(p.addr, "/hold", "10.0.0.1")).await;
        assert_eq!(h.status, 429, "{}", h.text);
        assert_eq!(h.header("retry-after").as_deref(), Some("1"));
        // Other clients of the proxy are not: the proxy's own address is
        // never capped, 40 handshakes from it are in progress at once.
        for i in 2..40 {
            let mut s = TcpStream::connect(p.addr).await.unwrap();
            s.write_all(upgrade_head(p.addr, "/hold", &format!("10.0.0.{i}")).as_bytes())
                .await
                .unwrap();
            held.push(s);
            within("the dial", accepted.recv()).await.unwrap();
        }
        assert_eq!(
            metric(&p, "wsguard_rejections_total{reason=\"pending_limit\"}"),
            1.0
        );
        assert_echo_with(p.addr, "X-Forwarded-For: 10.0.0.99\r\n").await;
        drop(held);
    }

    #[tokio::test]
    async fn idle_sockets_are_capped_per_ip_and_globally() {
        let echo = echo_backend().await;
        let p = proxy(
            echo,
            "keepalive: { interval: 0s, upstream_interval: 0s }\nlimits:\n  per_ip:\n    handshakes: null\n    pending_handshakes: 2\n",
        )
        .await;
        // Two idle sockets that never send a byte fill this address's cap.
        let a = TcpStream::connect(p.addr).await.unwrap();
        let b = TcpStream::connect(p.addr).await.unwrap();
        let (_r, h) = Raw::request(p.addr, "").await;
        assert_eq!(h.status, 429, "{}", h.text);
        assert_eq!(h.header("retry-after").as_deref(), Some("1"));
        closed_by_proxy(a).await;
        closed_by_proxy(b).await;
        assert_echo(p.addr).await;

        // The global cap on handshakes in progress, whoever holds them.
        let p = proxy(
            echo,
            "keepalive: { interval: 0s, upstream_interval: 0s }\nlimits:\n  max_pending_handshakes: 2\n  per_ip:\n    handshakes: null\n    pending_handshakes: null\n",
        )
        .await;
        let a = TcpStream::connect(p.addr).await.unwrap();
        let b = TcpStream::connect(p.addr).await.unwrap();
        let (_r, h) = Raw::request(p.addr, "").await;
        assert_eq!(h.status, 503, "{}", h.text);
        assert_eq!(h.header("retry-after").as_deref(), Some("1"));
        closed_by_proxy(a).await;
        closed_by_proxy(b).await;
        assert_echo(p.addr).await;
    }
}

mod admin {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use crate::common::*;

    async fn get(addr: std::net::SocketAddr, path: &str) -> u16 {
        let (_r, h) = Raw::request(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"),
        )
        .await;
        h.status
    }

    #[tokio::test]
    async fn admin_connections_are_capped_and_idle_ones_closed() {
        let p = proxy(echo_backend().await, "").await;
        let a = p.admin_addr;
        let mut idle = Vec::new();
        for _ in 0..wsguard::admin::MAX_CONNECTIONS {
            idle.push(TcpStream::connect(a).await.unwrap());
        }
        // One over the cap: refused at once, nothing read.
        let (_r, h) = Raw::request(a, "").await;
        assert_eq!(h.status, 503, "{}", h.text);
        // An idle admin socket is closed after the header timeout; the
        // proxy frees its slot before closing it.
        let mut first = idle.remove(0);
        let started = std::time::Instant::now();
        let mut b = [0u8; 64];
        let n = within("header timeout", first.read(&mut b))
            .await
            .unwrap_or(0);
        assert!(
            n == 0 || String::from_utf8_lossy(&b[..n]).contains("408"),
            "{n}"
        );
        assert!(
            started.elapsed() < wsguard::admin::HEADER_TIMEOUT + std::time::Duration::from_secs(1)
        );
        assert_eq!(get(a, "/healthz").await, 200);
        for mut s in idle {
            s.shutdown().await.unwrap();
            while within("close", s.read(&mut b)).await.unwrap_or(0) > 0 {}
        }
        assert_eq!(get(a, "/metrics").await, 200);
        assert_echo(p.addr).await;
    }
}
