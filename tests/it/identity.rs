//! Issue 16: per-client derived HMAC keys and OAuth 2.0 token
//! introspection.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use wsguard::sign::{self, Direction, Key, MsgType};

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_wsguard");
const JWT_SECRET: &str = "an-hs256-secret-that-is-at-least-32-bytes-long";
/// The secret of the pinned vector (docs/signing.md): bytes 0..32.
const DERIVE_SECRET_B64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const ALICE_KEY_B64: &str = "OrVOkVa9XdODhNO+zeCaM5suPhSujwo4lzJXn4hOnxk=";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("wsguard-it-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn token(claims: serde_json::Value) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

// ------------------------------------------------------------ derived keys

/// jwt (HS256) + hmac with one client key derived from `sub`; the
/// backend's messages are trusted (verify_upstream: false) so that the
/// echo comes back re-signed with the session's derived key.
async fn derived_proxy() -> (wsguard::Running, tokio::sync::mpsc::UnboundedReceiver<Seen>) {
    let d = dir("derive");
    write_atomic(&d.join("hs"), JWT_SECRET);
    write_atomic(&d.join("c"), DERIVE_SECRET_B64);
    write_atomic(
        &d.join("u"),
        base64::engine::general_purpose::STANDARD.encode([4u8; 32]),
    );
    let (b, rx) = recording_backend().await;
    let p = proxy(
        b,
        &format!(
            "jwt:\n  mode: enforce\n  algorithms: [HS256]\n  keys: [{{ secret_file: \"{}\" }}]\n\
             hmac:\n  mode: enforce\n  verify_upstream: false\n  client_keys: [{{ id: user, secret_file: \"{}\", derive: sub }}]\n  upstream_key: {{ id: p1, secret_file: \"{}\" }}\n\
             keepalive: {{ interval: 0s, upstream_interval: 0s }}\nlimits: {{ per_ip: null, per_connection: null }}\n",
            d.join("hs").display(),
            d.join("c").display(),
            d.join("u").display()
        ),
    )
    .await;
    (p, rx)
}

async fn connect_with(p: &wsguard::Running, bearer: &str) -> Ws {
    let url = format!("ws://{}/", p.addr);
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {bearer}").parse().unwrap());
    within("connect", tokio_tungstenite::connect_async(req))
        .await
        .unwrap()
        .0
}

fn derived(value: &str) -> Key {
    let secret = base64::engine::general_purpose::STANDARD
        .decode(DERIVE_SECRET_B64)
        .unwrap();
    Key::new("user", sign::derive_secret(&secret, value).to_vec()).unwrap()
}

fn signed_text(key: &Key, seq: u64, payload: &[u8]) -> Message {
    let m = sign::sign(
        key,
        Direction::C2s,
        seq,
        sign::now_ms(),
        "",
        MsgType::Text,
        payload,
    );
    Message::text(String::from_utf8(m).unwrap())
}

async fn close_of_session(c: &mut Ws) -> (u16, String) {
    loop {
        match within("close", c.next()).await {
            Some(Ok(m @ Message::Close(_))) => return close_of(&m).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn derived_key_signs_for_its_own_client_only() {
    let (p, mut rx) = derived_proxy().await;
    let alice = derived("alice");
    // The pinned vector: the key the token service hands to alice.
    assert_eq!(
        sign::sign(&alice, Direction::C2s, 1, 1, "", MsgType::Text, b"x"),
        sign::sign(
            &Key::from_base64("user", ALICE_KEY_B64).unwrap(),
            Direction::C2s,
            1,
            1,
            "",
            MsgType::Text,
            b"x"
        )
    );
    let t = token(json!({ "sub": "alice", "exp": now() + 600 }));
    let mut c = connect_with(&p, &t).await;
    c.send(signed_text(&alice, 1, b"hello")).await.unwrap();
    // The backend gets it re-signed with the upstream key.
    let up = Key::new("p1", vec![4u8; 32]).unwrap();
    let Some(Message::Text(at_backend)) = seen_msg(&mut rx).await else {
        panic!("backend got nothing")
    };
    let mut st = sign::SeqState::default();
    let payload = sign::verify(
        std::slice::from_ref(&up),
        Direction::C2s,
        "",
        MsgType::Text,
        at_backend.as_bytes(),
        sign::now_ms(),
        30_000,
        &mut st,
    )
    .unwrap();
    assert_eq!(payload, b"hello");
    // The echo comes back signed with alice's derived key, toward her.
    let Message::Text(back) = within("echo", c.next()).await.unwrap().unwrap() else {
        panic!("not text")
    };
    let mut st = sign::SeqState::default();
    let payload = sign::verify(
        std::slice::from_ref(&alice),
        Direction::S2c,
        "",
        MsgType::Text,
        back.as_bytes(),
        sign::now_ms(),
        30_000,
        &mut st,
    )
    .unwrap();
    assert_eq!(payload, b"hello");

    // The same message signed with bob's derived key fails on alice's
    // session: 1008, bad MAC.
    c.send(signed_text(&derived("bob"), 2, b"hello"))
        .await
        .unwrap();
    assert_eq!(
        close_of_session(&mut c).await,
        (1008, "signature failure: bad_mac".to_string())
    );
    assert_eq!(
        metric(&p, "wsguard_signature_failures_total{reason=\"bad_mac\"}"),
        1.0
    );

    // Bob, with his own token, signs with his own key and passes.
    let mut b = connect_with(&p, &token(json!({ "sub": "bob", "exp": now() + 600 }))).await;
    b.send(signed_text(&derived("bob"), 1, b"hi bob"))
        .await
        .unwrap();
    let Message::Text(back) = within("echo", b.next()).await.unwrap().unwrap() else {
        panic!("not text")
    };
    assert!(back.as_str().ends_with("\nhi bob"));
}

#[tokio::test]
async fn a_token_without_the_claim_cannot_use_a_derived_key() {
    let (p, _rx) = derived_proxy().await;
    // Valid token, no `sub`: the session has no derived key at all.
    let mut c = connect_with(&p, &token(json!({ "exp": now() + 600 }))).await;
    c.send(signed_text(&derived("alice"), 1, b"hello"))
        .await
        .unwrap();
    assert_eq!(
        close_of_session(&mut c).await,
        (1008, "signature failure: unknown_kid".to_string())
    );
    // A non-string claim is not a derivation input either.
    let mut c = connect_with(&p, &token(json!({ "sub": 42, "exp": now() + 600 }))).await;
    c.send(signed_text(&derived("42"), 1, b"hello"))
        .await
        .unwrap();
    assert_eq!(close_of_session(&mut c).await.0, 1008);
}

fn cli(args: &[&str], stdin: &[u8]) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env("DERIVE_SECRET", DERIVE_SECRET_B64)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn cli_derive_key_sign_and_verify_match_the_pinned_vector() {
    let out = cli(
        &[
            "derive-key",
            "--key-env",
            "DERIVE_SECRET",
            "--claim-value",
            "alice",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), ALICE_KEY_B64);
    let out = cli(
        &[
            "sign",
            "--key-env",
            "DERIVE_SECRET",
            "--derive-claim-value",
            "alice",
            "--kid",
            "user",
            "--dir",
            "c2s",
            "--seq",
            "1",
            "--ts",
            "1700000000000",
        ],
        br#"{"op":"hello"}"#,
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        out.stdout,
        b"wsg1.user.1.1700000000000.1unlZ9CHMlxcTiFLQCmKZPPXdsr7PJJPhmTuazhTwW8\n{\"op\":\"hello\"}"
    );
    let signed = out.stdout;
    let ok = cli(
        &[
            "verify",
            "--key-env",
            "DERIVE_SECRET",
            "--derive-claim-value",
            "alice",
            "--dir",
            "c2s",
        ],
        &signed,
    );
    assert_eq!(ok.status.code(), Some(0));
    assert_eq!(ok.stdout, br#"{"op":"hello"}"#);
    let bob = cli(
        &[
            "verify",
            "--key-env",
            "DERIVE_SECRET",
            "--derive-claim-value",
            "bob",
            "--dir",
            "c2s",
        ],
        &signed,
    );
    assert_eq!(bob.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bob.stderr).contains("bad_mac"));
    let empty = cli(
        &[
            "derive-key",
            "--key-env",
            "DERIVE_SECRET",
            "--claim-value",
            "",
        ],
        b"",
    );
    assert_eq!(empty.status.code(), Some(1));
}

// ------------------------------------------------------------ introspection

/// A test introspection endpoint (RFC 7662) on 127.0.0.1:0. It counts its
/// calls, checks wsguard's Basic credentials, and answers by token:
/// `act-NAME` active for subject NAME (exp in 10 min), `short-NAME` active
/// with exp in 2 s, `expired` active but past exp, `inactive`; anything
/// else inactive. While `hold` is set, answers wait for `release`.
pub(crate) struct Idp {
    pub(crate) addr: std::net::SocketAddr,
    calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    gate: tokio::sync::watch::Sender<bool>,
}

pub(crate) const IDP_ID: &str = "wsguard";
const IDP_SECRET: &str = "idp-client-secret:with/odd chars";

impl Idp {
    pub(crate) async fn start(hold: bool) -> Idp {
        use http_body_util::BodyExt as _;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (gate, open) = tokio::sync::watch::channel(!hold);
        let calls2 = calls.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                let (calls, open) = (calls2.clone(), open.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (calls, mut open) = (calls.clone(), open.clone());
                            async move {
                                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                let enc = |s: &str| {
                                    form_urlencoded::byte_serialize(s.as_bytes())
                                        .collect::<String>()
                                };
                                let want = format!(
                                    "Basic {}",
                                    base64::engine::general_purpose::STANDARD.encode(format!(
                                        "{}:{}",
                                        enc(IDP_ID),
                                        enc(IDP_SECRET)
                                    ))
                                );
                                let authorized = req.method() == hyper::Method::POST
                                    && req
                                        .headers()
                                        .get("authorization")
                                        .and_then(|v| v.to_str().ok())
                                        == Some(want.as_str())
                                    && req
                                        .headers()
                                        .get("content-type")
                                        .and_then(|v| v.to_str().ok())
                                        == Some("application/x-www-form-urlencoded");
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let _ = open.wait_for(|o| *o).await;
                                let token = form_urlencoded::parse(&body)
                                    .find(|(k, _)| k == "token")
                                    .map(|(_, v)| v.into_owned())
                                    .unwrap_or_default();
                                let (status, answer) = if !authorized {
                                    (401, json!({ "error": "invalid_client" }))
                                } else if let Some(name) = token.strip_prefix("act-") {
                                    (
                                        200,
                                        json!({ "active": true, "sub": name, "scope": "chat read", "exp": now() + 600, "iss": "https://idp.example", "aud": ["chat"] }),
                                    )
                                } else if let Some(name) = token.strip_prefix("short-") {
                                    (
                                        200,
                                        json!({ "active": true, "sub": name, "exp": now() + 2, "iss": "https://idp.example", "aud": "chat" }),
                                    )
                                } else if token == "expired" {
                                    (
                                        200,
                                        json!({ "active": true, "sub": "old", "exp": now() - 30, "iss": "https://idp.example", "aud": "chat" }),
                                    )
                                } else {
                                    (200, json!({ "active": false }))
                                };
                                let mut resp = hyper::Response::new(http_body_util::Full::new(
                                    bytes::Bytes::from(answer.to_string()),
                                ));
                                *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Idp { addr, calls, gate }
    }

    pub(crate) fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn release(&self) {
        let _ = self.gate.send(true);
    }
}

/// A file holding the introspection client secret, one per call: tests
/// run in parallel, and a shared file rewritten by one test (truncated,
/// then written) could be read empty by another in between.
pub(crate) fn idp_secret_file() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let f = dir("introspect").join(format!("client-{n}.secret"));
    std::fs::write(&f, format!("{IDP_SECRET}\n")).unwrap();
    f.display().to_string()
}

/// An introspection policy toward `url`, with extra keys in the section
/// (indented two spaces) and extra top-level YAML.
pub(crate) fn introspection_policy(url: &str, section: &str, top: &str) -> String {
    format!(
        "introspection:\n  mode: enforce\n  url: \"{url}\"\n  client_id: {IDP_ID}\n  client_secret_file: \"{}\"\n  issuer: https://idp.example\n  audience: [chat]\n  forward_claims: {{ sub: x-auth-subject, scope: x-auth-scope }}\n{section}\
         keepalive: {{ interval: 0s, upstream_interval: 0s }}\nlimits:\n  per_ip: null\n  per_connection: null\n{top}",
        idp_secret_file()
    )
}

pub(crate) fn bearer(t: &str) -> String {
    format!("Authorization: Bearer {t}\r\n")
}

fn header_values<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

async fn next_request_headers(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Seen>,
) -> Vec<(String, String)> {
    loop {
        if let Seen::Request { headers, .. } = seen(rx).await {
            return headers;
        }
    }
}

#[tokio::test]
async fn introspection_active_inactive_expired_cache_and_forward_claims() {
    let idp = Idp::start(false).await;
    let (b, mut rx) = recording_backend().await;
    let p = proxy(
        b,
        &introspection_policy(&format!("http://{}/introspect", idp.addr), "", ""),
    )
    .await;

    // Active: 101, and the backend gets the claims of the answer, not the
    // client's forged copy, and not the token.
    let (_s, h) = Raw::upgrade(
        p.addr,
        "/",
        &format!("{}X-Auth-Subject: forged\r\n", bearer("act-alice")),
    )
    .await;
    assert_eq!(h.status, 101);
    let headers = next_request_headers(&mut rx).await;
    assert_eq!(header_values(&headers, "x-auth-subject"), vec!["alice"]);
    assert_eq!(header_values(&headers, "x-auth-scope"), vec!["chat read"]);
    assert!(header_values(&headers, "authorization").is_empty());
    assert_eq!(idp.calls(), 1);

    // The same token again: answered from the cache.
    let (_s2, h) = Raw::upgrade(p.addr, "/", &bearer("act-alice")).await;
    assert_eq!(h.status, 101);
    assert_eq!(idp.calls(), 1);
    assert_eq!(
        metric(&p, "wsguard_introspection_cache_total{result=\"hit\"}"),
        1.0
    );
    assert_eq!(
        metric(
            &p,
            "wsguard_introspection_requests_total{result=\"active\"}"
        ),
        1.0
    );

    // Inactive: 401 invalid_token; cached briefly (no second call).
    for _ in 0..2 {
        let (_r, h) = Raw::upgrade(p.addr, "/", &bearer("inactive")).await;
        assert_eq!(h.status, 401);
        assert_eq!(
            h.header("www-authenticate").as_deref(),
            Some("Bearer error=\"invalid_token\"")
        );
    }
    assert_eq!(idp.calls(), 2);
    assert_eq!(
        metric(
            &p,
            "wsguard_rejections_total{reason=\"introspection_inactive\"}"
        ),
        2.0
    );

    // Active but past its exp: 401, and not cached as active.
    let (_r, h) = Raw::upgrade(p.addr, "/", &bearer("expired")).await;
    assert_eq!(h.status, 401);
    assert_eq!(
        metric(
            &p,
            "wsguard_rejections_total{reason=\"introspection_expired\"}"
        ),
        1.0
    );

    // No token: 401 with a bare Bearer challenge, no call.
    let before = idp.calls();
    let (_r, h) = Raw::upgrade(p.addr, "/", "").await;
    assert_eq!(h.status, 401);
    assert_eq!(h.header("www-authenticate").as_deref(), Some("Bearer"));
    assert_eq!(idp.calls(), before);

    // After all that, a normal client is still served.
    let (_r, h) = Raw::upgrade(p.addr, "/", &bearer("act-bob")).await;
    assert_eq!(h.status, 101);
}

#[tokio::test]
async fn introspection_checks_issuer_and_audience_and_credentials() {
    let idp = Idp::start(false).await;
    let url = format!("http://{}/introspect", idp.addr);
    let p = proxy(
        echo_backend().await,
        &introspection_policy(&url, "", "").replace("audience: [chat]", "audience: [admin]"),
    )
    .await;
    let (_r, h) = Raw::upgrade(p.addr, "/", &bearer("act-alice")).await;
    assert_eq!(h.status, 401);
    assert_eq!(
        metric(
            &p,
            "wsguard_rejections_total{reason=\"introspection_wrong_audience\"}"
        ),
        1.0
    );
    // Wrong client credentials: the endpoint answers 401, which is not an
    // answer about the token: on_error (deny) applies.
    let wrong = dir("introspect-wrong").join("s");
    std::fs::write(&wrong, "not-the-secret").unwrap();
    let policy = introspection_policy(&url, "", "");
    let key = "client_secret_file: \"";
    let start = policy.find(key).unwrap() + key.len();
    let end = start + policy[start..].find('"').unwrap();
    let policy = format!("{}{}{}", &policy[..start], wrong.display(), &policy[end..]);
    let p = proxy(echo_backend().await, &policy).await;
    let (_r, h) = Raw::upgrade(p.addr, "/", &bearer("act-alice")).await;
    assert_eq!(h.status, 503);
    assert_eq!(h.header("retry-after").as_deref(), Some("1"));
}

#[tokio::test]
async fn hundred_concurrent_handshakes_with_one_token_make_one_call() {
    let idp = Idp::start(true).await;
    let p = proxy(
        echo_backend().await,
        // One subject, 100 sessions: no per-subject cap here.
        &introspection_policy(
            &format!("http://{}/introspect", idp.addr),
            "  timeout: 5s\n",
            "",
        )
        .replace(
            "  per_connection: null\n",
            "  per_connection: null\n  per_subject: null\n",
        ),
    )
    .await;
    let addr = p.addr;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..100 {
        set.spawn(async move {
            let (raw, h) = Raw::upgrade(addr, "/", &bearer("act-storm")).await;
            (raw, h.status)
        });
    }
    // Every handshake has reached the endpoint's single call (one miss,
    // 99 joined it) before the endpoint answers.
    within("100 handshakes waiting on one call", async {
        loop {
            let miss = metric(&p, "wsguard_introspection_cache_total{result=\"miss\"}");
            let joined = metric(
                &p,
                "wsguard_introspection_cache_total{result=\"coalesced\"}",
            );
            if miss + joined >= 100.0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    idp.release();
    let mut held = Vec::new();
    while let Some(r) = within("handshake", set.join_next()).await {
        let (raw, status) = r.unwrap();
        assert_eq!(status, 101);
        held.push(raw);
    }
    assert_eq!(held.len(), 100);
    assert_eq!(idp.calls(), 1);
    assert_eq!(
        metric(&p, "wsguard_introspection_cache_total{result=\"miss\"}"),
        1.0
    );
}

#[tokio::test]
async fn endpoint_down_under_each_on_error() {
    // Nothing listening.
    let down = format!("http://{}/introspect", dead_port().await);
    // Accepts and never answers: the 200ms timeout is the deadline.
    let silent = format!("http://{}/introspect", silent_backend().await);
    // Answers, but not with 200.
    let broken = format!(
        "http://{}/introspect",
        http_backend("HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n".into())
            .await
    );
    for url in [&down, &silent, &broken] {
        let p = proxy(
            echo_backend().await,
            &introspection_policy(url, "  timeout: 200ms\n", ""),
        )
        .await;
        let started = std::time::Instant::now();
        let (_r, h) = Raw::upgrade(p.addr, "/", &bearer("act-alice")).await;
        assert_eq!(h.status, 503, "{url}");
        assert_eq!(h.header("retry-after").as_deref(), Some("1"));
        assert!(started.elapsed() < std::time::Duration::from_secs(3));
        assert_eq!(
            metric(
                &p,
                "wsguard_rejections_total{reason=\"introspection_unavailable\"}"
            ),
            1.0
        );

        let (b, mut rx) = recording_backend().await;
        let p = proxy(
            b,
            &introspection_policy(url, "  timeout: 200ms\n  on_error: allow\n", ""),
        )
        .await;
        let (_r, h) = Raw::upgrade(
            p.addr,
            "/",
            &format!("{}X-Auth-Subject: forged\r\n", bearer("act-alice")),
        )
        .await;
        assert_eq!(h.status, 101, "{url}");
        // Let through without claims: nothing is asserted upstream.
        let headers = next_request_headers(&mut rx).await;
        assert!(header_values(&headers, "x-auth-subject").is_empty());
        assert_eq!(
            metric(
                &p,
                "wsguard_rejections_total{reason=\"introspection_unavailable_allowed\"}"
            ),
            1.0
        );
    }
}

#[tokio::test]
async fn close_on_expiry_applies_to_introspected_tokens() {
    let idp = Idp::start(false).await;
    let p = proxy(
        echo_backend().await,
        &introspection_policy(&format!("http://{}/introspect", idp.addr), "", ""),
    )
    .await;
    let (mut r, h) = Raw::upgrade(p.addr, "/", &bearer("short-erin")).await;
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
async fn report_mode_and_per_subject_limits_with_introspection() {
    let idp = Idp::start(false).await;
    let url = format!("http://{}/introspect", idp.addr);
    let p = proxy(
        echo_backend().await,
        &introspection_policy(&url, "", "").replace("mode: enforce", "mode: report"),
    )
    .await;
    let (_r, h) = Raw::upgrade(p.addr, "/", &bearer("inactive")).await;
    assert_eq!(h.status, 101);
    assert_eq!(
        metric(
            &p,
            "wsguard_rejections_total{reason=\"introspection_report\"}"
        ),
        1.0
    );

    let p = proxy(
        echo_backend().await,
        &introspection_policy(&url, "", "").replace(
            "  per_connection: null\n",
            "  per_connection: null\n  per_subject: { connections: 1 }\n",
        ),
    )
    .await;
    let (_a, h) = Raw::upgrade(p.addr, "/", &bearer("act-gina")).await;
    assert_eq!(h.status, 101);
    let (_b, h) = Raw::upgrade(p.addr, "/", &bearer("act-gina")).await;
    assert_eq!(h.status, 429);
    assert_eq!(
        Raw::upgrade(p.addr, "/", &bearer("act-hank"))
            .await
            .1
            .status,
        101
    );
}

#[tokio::test]
async fn derived_keys_and_bind_claim_from_an_introspection_answer() {
    let idp = Idp::start(false).await;
    let d = dir("introspect-derive");
    write_atomic(&d.join("c"), DERIVE_SECRET_B64);
    write_atomic(
        &d.join("u"),
        base64::engine::general_purpose::STANDARD.encode([4u8; 32]),
    );
    let (b, mut rx) = recording_backend().await;
    let p = proxy(
        b,
        &introspection_policy(
            &format!("http://{}/introspect", idp.addr),
            "",
            &format!(
                "hmac:\n  mode: enforce\n  bind_claim: sub\n  client_keys: [{{ id: user, secret_file: \"{}\", derive: sub }}]\n  upstream_key: {{ id: p1, secret_file: \"{}\" }}\n",
                d.join("c").display(),
                d.join("u").display()
            ),
        ),
    )
    .await;
    let mut c = connect_with(&p, "act-alice").await;
    let m = sign::sign(
        &derived("alice"),
        Direction::C2s,
        1,
        sign::now_ms(),
        "alice",
        MsgType::Text,
        b"hi",
    );
    c.send(Message::text(String::from_utf8(m).unwrap()))
        .await
        .unwrap();
    let Some(Message::Text(at_backend)) = seen_msg(&mut rx).await else {
        panic!("backend got nothing")
    };
    let up = Key::new("p1", vec![4u8; 32]).unwrap();
    let mut st = sign::SeqState::default();
    assert_eq!(
        sign::verify(
            std::slice::from_ref(&up),
            Direction::C2s,
            "alice",
            MsgType::Text,
            at_backend.as_bytes(),
            sign::now_ms(),
            30_000,
            &mut st,
        )
        .unwrap(),
        b"hi"
    );
}
