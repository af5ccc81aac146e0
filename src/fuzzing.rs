//! Entry points shared by the cargo-fuzz targets in `fuzz/` and by the
//! corpus regression test in `tests/`. Each takes arbitrary bytes and must
//! never panic.
//!
//! The only deliberate panics are the signing round-trip check in
//! [`envelope`] (it fires when `sign` produces a message that `verify` does
//! not give back unchanged) and the idempotence check in [`path`]: both are
//! real bugs, not bad input.

use std::net::{IpAddr, Ipv4Addr};

use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request, Version};

use crate::handshake::{self, Forwarding};
use crate::policy::Policy;
use crate::sign::{self, Direction, Key, MsgType, SeqState};
use crate::values::Cidr;

/// The key id of the fixed fuzzing key. Seed envelopes in
/// `fuzz/corpus/envelope/` are signed with it (`wsguard sign --kid k1`).
pub const KID: &str = "k1";

/// The fixed 32-byte fuzzing secret (base64:
/// `d3NndWFyZC1mdXp6LWtleS0wMTIzNDU2Nzg5YWJjZGU=`). Not a real key.
pub const SECRET: &[u8; 32] = b"wsguard-fuzz-key-0123456789abcde";

/// The clock the fuzzer's verifier reads, in Unix milliseconds. Seed
/// envelopes use this `--ts` so they get past the skew check.
pub const NOW_MS: u64 = 1_700_000_000_000;

/// Allowed skew for the fuzzer's verifier.
pub const MAX_SKEW_MS: u64 = 30_000;

/// The `Sec-WebSocket-Key` the backend's answer is checked against (the
/// RFC 6455 sample; its accept value is `s3pPLMBiTxaQ9kYGzzhZRbK+xOo=`).
pub const UPSTREAM_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Policy text: YAML parsing, key-path location of the first problem and the
/// semantic validation, including the formatting of the problem list.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Policy::from_text("fuzz.yaml", text) {
        Ok(p) => {
            let _ = p.summary();
        }
        Err(problems) => {
            let _ = problems.to_string();
        }
    }
}

/// The path normaliser: never panics, and normalising a normalised path
/// gives it back unchanged (the one property route matching relies on).
pub fn path(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(once) = handshake::normalize_path(text) else {
        return;
    };
    let twice = handshake::normalize_path(&once);
    check(
        twice.as_deref() == Ok(once.as_str()),
        "normalising a normalised path changed it or refused it",
        data,
    );
    let _ = handshake::without_params(&once);
}

/// A client's upgrade request head (and, on the same bytes, a backend's
/// answer to ours).
pub fn upgrade_request(data: &[u8]) {
    let offered = ["chat".to_string()];
    let _ = crate::upstream::check_response(data, UPSTREAM_KEY, &offered);

    let Some(req) = build_request(data) else {
        return;
    };
    if handshake::validate(&req).is_err() {
        return;
    }
    let peer = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    let trusted: Vec<Cidr> = Cidr::parse("10.0.0.0/8").into_iter().collect();
    let client_ip = crate::guard::limits::client_ip_of(peer, req.headers(), &trusted);
    for peer_trusted in [true, false] {
        let request_id = handshake::request_id(req.headers(), peer_trusted);
        let fwd = Forwarding {
            client_ip,
            peer_trusted,
            peer_ip: peer,
            tls: false,
            request_id: &request_id,
            asserted: &[HeaderName::from_static("x-auth-subject")],
        };
        let _ = handshake::upstream_headers(req.headers(), &fwd);
    }
}

/// Parses `data` as an HTTP/1.x request head and converts it the way hyper
/// would hand it to the server. `None` for anything hyper would refuse.
fn build_request(data: &[u8]) -> Option<Request<()>> {
    let mut hdrs = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut hdrs);
    match parsed.parse(data) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return None,
    }
    let method = Method::from_bytes(parsed.method?.as_bytes()).ok()?;
    let version = match parsed.version? {
        0 => Version::HTTP_10,
        1 => Version::HTTP_11,
        _ => return None,
    };
    let mut builder = Request::builder()
        .method(method)
        .uri(parsed.path?)
        .version(version);
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        builder = builder.header(name, value);
    }
    builder.body(()).ok()
}

/// A signed message ("wsg1" envelope): parsing, full verification in every
/// direction and frame type, and a sign/verify round trip of the bytes as a
/// payload.
pub fn envelope(data: &[u8]) {
    let Ok(key) = Key::new(KID, SECRET.to_vec()) else {
        return;
    };
    let keys = [key];
    let _ = sign::parse(data);
    for dir in [Direction::C2s, Direction::S2c] {
        for ty in [MsgType::Text, MsgType::Binary] {
            let mut state = SeqState::default();
            if let Ok(payload) =
                sign::verify(&keys, dir, "", ty, data, NOW_MS, MAX_SKEW_MS, &mut state)
            {
                // Verified once: the very same message is now a replay.
                let again = sign::verify(&keys, dir, "", ty, data, NOW_MS, MAX_SKEW_MS, &mut state);
                check(
                    again == Err(sign::SigFailure::Replay),
                    "a verified message was accepted twice",
                    data,
                );
                let _ = payload;
            }
        }
    }
    round_trip(&keys, data);
}

/// Signs `data` as a payload, with a sequence number, timestamp, direction
/// and type taken from its first bytes, and checks `verify` returns exactly
/// `data`.
fn round_trip(keys: &[Key; 1], data: &[u8]) {
    let Some((&first, _)) = data.split_first() else {
        return;
    };
    let [key] = keys;
    let dir = if first & 1 == 0 {
        Direction::C2s
    } else {
        Direction::S2c
    };
    let ty = if first & 2 == 0 {
        MsgType::Text
    } else {
        MsgType::Binary
    };
    let seq = u64::from(first).saturating_add(1);
    // Anywhere inside the allowed skew, on both sides of NOW_MS.
    let offset = u64::from(data.get(1).copied().unwrap_or(0)) * 100;
    let ts = if first & 4 == 0 {
        NOW_MS.saturating_add(offset)
    } else {
        NOW_MS.saturating_sub(offset)
    };
    let bind = "fuzz-conn";
    let signed = sign::sign(key, dir, seq, ts, bind, ty, data);
    let mut state = SeqState::default();
    let got = sign::verify(
        keys,
        dir,
        bind,
        ty,
        &signed,
        NOW_MS,
        MAX_SKEW_MS,
        &mut state,
    );
    check(
        got == Ok(data),
        "sign/verify round trip did not return the payload",
        data,
    );
    // Neither the other direction nor the other frame type may verify it.
    let other_dir = match dir {
        Direction::C2s => Direction::S2c,
        Direction::S2c => Direction::C2s,
    };
    let other_ty = match ty {
        MsgType::Text => MsgType::Binary,
        MsgType::Binary => MsgType::Text,
    };
    for (d, t) in [(other_dir, ty), (dir, other_ty)] {
        let mut state = SeqState::default();
        let moved = sign::verify(keys, d, bind, t, &signed, NOW_MS, MAX_SKEW_MS, &mut state);
        check(
            moved == Err(sign::SigFailure::BadMac),
            "a signed message verified in another direction or frame type",
            data,
        );
    }
}

/// The one place a fuzz entry point may panic: an invariant of the signing
/// code or of the path normaliser does not hold, which the fuzzer must report as a crash.
#[allow(clippy::panic)]
fn check(ok: bool, what: &str, data: &[u8]) {
    if !ok {
        panic!("{what} (input: {data:?})");
    }
}

/// JWT token extraction and removal from an arbitrary request head: every
/// token source kind, the query/cookie/subprotocol strippers, and the
/// `token_sources` syntax. The removal functions must never leave the token
/// behind when it was found in that source.
pub fn token(data: &[u8]) {
    use crate::guard::jwt::{self, TokenSource};
    let Some(req) = build_request(data) else {
        // Still exercise the string-level helpers on raw text.
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = TokenSource::parse(text);
            let _ = jwt::strip_query(text, "access_token");
            let _ = jwt::strip_cookie(&[text], "tok");
        }
        return;
    };
    let sources = [
        TokenSource::Header,
        TokenSource::Query("access_token".into()),
        TokenSource::Cookie("tok".into()),
        TokenSource::Subprotocol("bearer.".into()),
    ];
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let protocols: Vec<String> = req
        .headers()
        .get_all(hyper::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .collect();
    // Whatever the request, once every source is stripped no token is left
    // anywhere wsguard looks.
    let mut headers = req.headers().clone();
    let mut pq = path.to_string();
    let mut protos = protocols.clone();
    let _ = jwt::find(&sources, &headers, &pq, &protos);
    jwt::strip_sources(&sources, None, &mut headers, &mut pq, &mut protos);
    check(
        jwt::find(&sources, &headers, &pq, &protos) == Ok(None),
        "a token survived strip_sources",
        data,
    );
    let found = jwt::extract(&sources, req.headers(), path, &protocols);
    let _ = jwt::strip_query(path, "access_token");
    let cookies: Vec<&str> = req
        .headers()
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let _ = jwt::strip_cookie(&cookies, "tok");
    let stripped = jwt::strip_subprotocol(&protocols, "bearer.");
    if let Some(f) = found {
        if f.source == 3 {
            check(
                !stripped
                    .iter()
                    .any(|p| p.strip_prefix("bearer.") == Some(f.token.as_str())),
                "subprotocol token survived stripping",
                data,
            );
        }
    }
}

/// The inflate path of permessage-deflate under its caps. Byte 0 picks the
/// peer's window (8..=15), byte 1 where the message is split into two
/// frames; the rest is the compressed message. Never panics on bad data,
/// and never holds more than the cap (the checks below are real bugs).
pub fn inflate(data: &[u8]) {
    use crate::compression::{InflateBudget, Inflated, Inflater};
    const CAP: usize = 64 * 1024;
    let (Some(&bits), Some(&split)) = (data.first(), data.get(1)) else {
        return;
    };
    let body = data.get(2..).unwrap_or_default();
    let at = usize::from(split).min(body.len());
    let (a, b) = body.split_at(at);
    let budget = InflateBudget::new(4 * CAP);
    let mut inf = Inflater::new(8 + bits % 8, false);
    let mut out = Inflated::new(&budget);
    let r = inf
        .inflate_into(a, false, CAP, &mut out)
        .and_then(|()| inf.inflate_into(b, true, CAP, &mut out));
    // One byte past the cap is how the inflater learns the message is too
    // big (then it stops with TooBig); never more.
    assert!(out.len() <= CAP + 1, "inflated {} past the cap", out.len());
    assert!(r.is_err() || out.len() <= CAP);
    assert!(
        out.capacity() <= CAP + 1,
        "allocated {} past the cap",
        out.capacity()
    );
    assert!(r.is_err() || budget.used() <= CAP + 1);
    drop(out);
    assert_eq!(budget.used(), 0, "the inflate budget leaks");
}
