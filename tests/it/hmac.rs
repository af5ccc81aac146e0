//! Issue 4 end to end: verify, strip and re-sign every message.

use std::net::SocketAddr;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use wsguard::sign::{self, Direction, Key, MsgType, SeqState};

use crate::common::*;

pub(crate) const CLIENT1: [u8; 32] = [1u8; 32];
const CLIENT2: [u8; 32] = [2u8; 32];
pub(crate) const UPSTREAM: [u8; 32] = [9u8; 32];

fn b64(k: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(k)
}

pub(crate) fn key_file(name: &str, k: &[u8]) -> String {
    let dir = std::env::temp_dir().join(format!("wsguard-hmac-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Unique per call: parallel tests must never read a half-written file.
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let f = dir.join(format!("{name}-{n}"));
    std::fs::write(&f, b64(k)).unwrap();
    f.display().to_string()
}

fn policy(extra_hmac: &str) -> String {
    format!(
        "hmac:\n  mode: enforce\n  client_keys:\n    - {{ id: c1, secret_file: \"{}\" }}\n    - {{ id: c2, secret_file: \"{}\" }}\n  upstream_key: {{ id: p1, secret_file: \"{}\" }}\n{extra_hmac}keepalive: {{ interval: 0s, upstream_interval: 0s }}\nlimits: {{ per_ip: null, per_connection: null }}\n",
        key_file("c1", &CLIENT1),
        key_file("c2", &CLIENT2),
        key_file("p1", &UPSTREAM)
    )
}

pub(crate) fn key(kid: &str, k: &[u8]) -> Key {
    Key::new(kid, k.to_vec()).unwrap()
}

fn signed_text(kid: &str, k: &[u8], dir: Direction, seq: u64, ts: u64, payload: &str) -> Message {
    let m = sign::sign(
        &key(kid, k),
        dir,
        seq,
        ts,
        "",
        MsgType::Text,
        payload.as_bytes(),
    );
    Message::text(String::from_utf8(m).unwrap())
}

/// A backend that verifies every message with the upstream key (c2s),
/// reports what it got, and answers with the payload signed s2c.
pub(crate) async fn signing_backend() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Result<String, String>>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                let up = key("p1", &UPSTREAM);
                let mut state = SeqState::default();
                let mut seq = 0;
                while let Some(Ok(m)) = ws.next().await {
                    let Message::Text(t) = m else { continue };
                    let v = sign::verify(
                        std::slice::from_ref(&up),
                        Direction::C2s,
                        "",
                        MsgType::Text,
                        t.as_bytes(),
                        sign::now_ms(),
                        30_000,
                        &mut state,
                    );
                    match v {
                        Ok(payload) => {
                            let payload = String::from_utf8(payload.to_vec()).unwrap();
                            let _ = tx.send(Ok(payload.clone()));
                            seq += 1;
                            let reply = if payload == "send-unsigned" {
                                Message::text("no envelope here")
                            } else {
                                signed_text(
                                    "p1",
                                    &UPSTREAM,
                                    Direction::S2c,
                                    seq,
                                    sign::now_ms(),
                                    &format!("echo:{payload}"),
                                )
                            };
                            if ws.send(reply).await.is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(format!("{}:{}", e.label(), t)));
                        }
                    }
                }
            });
        }
    });
    (a, rx)
}

#[tokio::test]
async fn signed_messages_are_verified_and_resigned_both_ways() {
    let (b, mut rx) = signing_backend().await;
    let p = proxy(b, &policy("")).await;
    let mut c = ws(p.addr, "/").await;
    let client_keys = [key("c1", &CLIENT1), key("c2", &CLIENT2)];
    let mut seen_state = SeqState::default();
    // Key rotation: both client keys are accepted.
    for (i, (kid, k)) in [("c1", &CLIENT1), ("c2", &CLIENT2)].into_iter().enumerate() {
        let seq = i as u64 + 1;
        c.send(signed_text(
            kid,
            k,
            Direction::C2s,
            seq,
            sign::now_ms(),
            &format!("hello{seq}"),
        ))
        .await
        .unwrap();
        assert_eq!(
            within("backend", rx.recv()).await.unwrap(),
            Ok(format!("hello{seq}"))
        );
        let Message::Text(reply) = next(&mut c).await else {
            panic!("text reply")
        };
        // Re-signed for the client with the first client key.
        assert!(reply.as_str().starts_with("wsg1.c1."), "{reply}");
        let payload = sign::verify(
            &client_keys,
            Direction::S2c,
            "",
            MsgType::Text,
            reply.as_bytes(),
            sign::now_ms(),
            30_000,
            &mut seen_state,
        )
        .unwrap();
        assert_eq!(payload, format!("echo:hello{seq}").as_bytes());
    }
}

#[tokio::test]
async fn every_signature_failure_closes_1008_with_its_reason() {
    let (b, _rx) = signing_backend().await;
    let p = proxy(b, &policy("")).await;
    let now = sign::now_ms();
    let good = |seq| signed_text("c1", &CLIENT1, Direction::C2s, seq, now, "payload");
    let tamper = |m: Message, f: &dyn Fn(&mut Vec<u8>)| {
        let mut v = m.into_data().to_vec();
        f(&mut v);
        Message::text(String::from_utf8_lossy(&v).to_string())
    };
    let binary_of_text = Message::binary(sign::sign(
        &key("c1", &CLIENT1),
        Direction::C2s,
        1,
        now,
        "",
        MsgType::Text,
        b"payload",
    ));
    // (messages to send, expected reason label)
    let cases: Vec<(Vec<Message>, &str)> = vec![
        (
            vec![tamper(good(1), &|v| *v.last_mut().unwrap() ^= 0x01)],
            "bad_mac",
        ),
        (
            vec![tamper(good(1), &|v| {
                // A middle character of the signature: the last one carries only
                // 4 bits, and changing it can make the envelope malformed instead.
                let i = v.iter().position(|b| *b == b'\n').unwrap() - 10;
                v[i] = if v[i] == b'A' { b'B' } else { b'A' };
            })],
            "bad_mac",
        ),
        (vec![good(1), good(1)], "replay"),
        (vec![good(5), good(3)], "replay"),
        (
            vec![signed_text("zz", &CLIENT1, Direction::C2s, 1, now, "x")],
            "unknown_kid",
        ),
        (
            vec![signed_text(
                "c1",
                &CLIENT1,
                Direction::C2s,
                1,
                now - 60_000,
                "x",
            )],
            "skew",
        ),
        (
            vec![signed_text(
                "c1",
                &CLIENT1,
                Direction::C2s,
                1,
                now + 60_000,
                "x",
            )],
            "skew",
        ),
        (vec![Message::text("no envelope")], "missing_envelope"),
        (
            vec![Message::text("wsg1.c1.1.1700000000000.abc")],
            "malformed_envelope",
        ),
        (vec![binary_of_text], "bad_mac"),
        (
            vec![signed_text("c1", &CLIENT1, Direction::S2c, 1, now, "x")],
            "bad_mac",
        ),
    ];
    for (msgs, reason) in cases {
        let mut c = ws(p.addr, "/").await;
        let n = msgs.len();
        for (i, m) in msgs.into_iter().enumerate() {
            c.send(m).await.unwrap();
            if i + 1 < n {
                let _ = next(&mut c).await; // the echo of the good one
            }
        }
        let m = next(&mut c).await;
        assert_eq!(
            close_of(&m),
            Some((1008, format!("signature failure: {reason}"))),
            "expected {reason}"
        );
        assert!(
            metric(
                &p,
                &format!("wsguard_signature_failures_total{{reason=\"{reason}\"}}")
            ) >= 1.0,
            "{reason} not counted"
        );
    }
    assert_eq!(
        metric(&p, "wsguard_signature_failures_total{reason=\"replay\"}"),
        2.0
    );
    assert_eq!(
        metric(&p, "wsguard_signature_failures_total{reason=\"skew\"}"),
        2.0
    );
}

#[tokio::test]
async fn drop_mode_drops_and_keeps_the_session() {
    let (b, mut rx) = signing_backend().await;
    let p = proxy(b, &policy("  on_failure: drop\n")).await;
    let mut c = ws(p.addr, "/").await;
    c.send(Message::text("unsigned")).await.unwrap();
    c.send(signed_text(
        "c1",
        &CLIENT1,
        Direction::C2s,
        1,
        sign::now_ms(),
        "good",
    ))
    .await
    .unwrap();
    assert_eq!(
        within("backend", rx.recv()).await.unwrap(),
        Ok("good".into())
    );
    assert!(matches!(next(&mut c).await, Message::Text(_)));
    assert_eq!(
        metric(
            &p,
            "wsguard_signature_failures_total{reason=\"missing_envelope\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn report_mode_forwards_failures_stripped_and_unsigned() {
    let (b, mut rx) = recording_backend().await;
    let p = proxy(b, &policy("").replace("mode: enforce", "mode: report")).await;
    let mut c = ws(p.addr, "/").await;
    // A bad MAC: stripped, forwarded without a new signature.
    let mut bad = signed_text(
        "c1",
        &CLIENT1,
        Direction::C2s,
        1,
        sign::now_ms(),
        "tampered?",
    )
    .into_data()
    .to_vec();
    *bad.last_mut().unwrap() = b'!';
    c.send(Message::text(String::from_utf8(bad).unwrap()))
        .await
        .unwrap();
    assert_eq!(seen_msg(&mut rx).await, Some(Message::text("tampered!")));
    // No envelope at all: forwarded as is.
    c.send(Message::text("plain")).await.unwrap();
    assert_eq!(seen_msg(&mut rx).await, Some(Message::text("plain")));
    // A good one is re-signed with the upstream key.
    c.send(signed_text(
        "c1",
        &CLIENT1,
        Direction::C2s,
        2,
        sign::now_ms(),
        "fine",
    ))
    .await
    .unwrap();
    let Some(Message::Text(t)) = seen_msg(&mut rx).await else {
        panic!()
    };
    assert!(t.as_str().starts_with("wsg1.p1.1."), "{t}");
    assert_eq!(
        metric(&p, "wsguard_signature_failures_total{reason=\"bad_mac\"}"),
        1.0
    );
}

#[tokio::test]
async fn unsigned_backend_reply_closes_the_session() {
    let (b, mut rx) = signing_backend().await;
    let p = proxy(b, &policy("")).await;
    let mut c = ws(p.addr, "/").await;
    c.send(signed_text(
        "c1",
        &CLIENT1,
        Direction::C2s,
        1,
        sign::now_ms(),
        "send-unsigned",
    ))
    .await
    .unwrap();
    assert_eq!(
        within("backend", rx.recv()).await.unwrap(),
        Ok("send-unsigned".into())
    );
    let m = next(&mut c).await;
    assert_eq!(
        close_of(&m),
        Some((1008, "backend signature failure: missing_envelope".into()))
    );
    assert_eq!(
        metric(
            &p,
            "wsguard_signature_failures_total{reason=\"missing_envelope\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn fragmented_signed_message_is_verified_after_reassembly() {
    let (b, mut rx) = signing_backend().await;
    let p = proxy(b, &policy("")).await;
    let msg = sign::sign(
        &key("c1", &CLIENT1),
        Direction::C2s,
        1,
        sign::now_ms(),
        "",
        MsgType::Text,
        "fragmented payload".as_bytes(),
    );
    let (mut r, h) = Raw::upgrade(p.addr, "/", "").await;
    assert_eq!(h.status, 101);
    let (a, rest) = msg.split_at(10);
    let (bb, c) = rest.split_at(30);
    r.send_frame(false, 1, a, true).await;
    r.send_frame(false, 0, bb, true).await;
    r.send_frame(true, 0, c, true).await;
    assert_eq!(
        within("backend", rx.recv()).await.unwrap(),
        Ok("fragmented payload".into())
    );
    let (op, reply) = r.read_frame().await.unwrap();
    assert_eq!(op, 1);
    assert!(reply.starts_with(b"wsg1.c1.1."));
}

#[tokio::test]
async fn a_client_key_removed_by_reload_is_refused_in_live_sessions() {
    let (b, _rx) = signing_backend().await;
    let (c1, c2, up) = (
        key_file("c1", &CLIENT1),
        key_file("c2", &CLIENT2),
        key_file("p1", &UPSTREAM),
    );
    let yaml = |with_c2: bool| {
        let second = if with_c2 {
            format!("    - {{ id: c2, secret_file: \"{c2}\" }}\n")
        } else {
            String::new()
        };
        format!(
            "listen: \"127.0.0.1:0\"\nadmin: {{ listen: \"127.0.0.1:0\" }}\nupstream: {{ url: \"ws://{b}\" }}\nhmac:\n  mode: enforce\n  client_keys:\n    - {{ id: c1, secret_file: \"{c1}\" }}\n{second}  upstream_key: {{ id: p1, secret_file: \"{up}\" }}\nkeepalive: {{ interval: 0s, upstream_interval: 0s }}\nlimits: {{ per_ip: null, per_connection: null }}\n"
        )
    };
    let p = proxy_yaml(&yaml(true)).await;
    let mut c = ws(p.addr, "/").await;
    c.send(signed_text(
        "c2",
        &CLIENT2,
        Direction::C2s,
        1,
        sign::now_ms(),
        "before",
    ))
    .await
    .unwrap();
    assert!(matches!(next(&mut c).await, Message::Text(_)));
    // The operator removes the compromised key c2 and reloads.
    p.process
        .install(wsguard::policy::Policy::from_text("reload.yaml", &yaml(false)).unwrap());
    c.send(signed_text(
        "c2",
        &CLIENT2,
        Direction::C2s,
        2,
        sign::now_ms(),
        "after",
    ))
    .await
    .unwrap();
    let m = next(&mut c).await;
    assert_eq!(close_of(&m).map(|c| c.0), Some(1008));
    assert_eq!(
        metric(
            &p,
            "wsguard_signature_failures_total{reason=\"unknown_kid\"}"
        ),
        1.0
    );
}
