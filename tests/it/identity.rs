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
    std::fs::write(d.join("hs"), JWT_SECRET).unwrap();
    std::fs::write(d.join("c"), DERIVE_SECRET_B64).unwrap();
    std::fs::write(
        d.join("u"),
        base64::engine::general_purpose::STANDARD.encode([4u8; 32]),
    )
    .unwrap();
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
