//! Issues 11 and 16 together: introspected tokens get the same request
//! integrity as JWTs. Every configured token source is emptied before the
//! backend, a token in more than one place is 400 `invalid_request` (before
//! the introspection endpoint is asked anything), and the introspection
//! `forward_claims` targets are asserted headers on every route.

use tokio::sync::mpsc;

use crate::common::*;
use crate::identity::{bearer, idp_secret_file, introspection_policy, Idp, IDP_ID};

const ALL_SOURCES: &str =
    "  token_sources: [header, \"query:access_token\", \"cookie:tok\", \"subprotocol:bearer.\"]\n";

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

#[tokio::test]
async fn introspection_token_in_more_than_one_place_is_400_and_never_introspected() {
    let idp = Idp::start(false).await;
    let (b, mut rx) = recording_backend().await;
    let url = format!("http://{}/introspect", idp.addr);
    let p = proxy(b, &introspection_policy(&url, ALL_SOURCES, "")).await;
    let auth = bearer("act-alice");
    let cases = [
        ("/?access_token=act-root".to_string(), auth.clone()),
        ("/".to_string(), format!("{auth}Cookie: tok=act-root\r\n")),
        (
            "/".to_string(),
            format!("{auth}Sec-WebSocket-Protocol: chat, bearer.act-root\r\n"),
        ),
        ("/".to_string(), format!("{auth}{}", bearer("act-root"))),
        (
            "/?access_token=act-alice&access_token=act-root".to_string(),
            String::new(),
        ),
    ];
    for (path, extra) in &cases {
        let (_r, h) = Raw::upgrade(p.addr, path, extra).await;
        assert_eq!(h.status, 400, "{path} {extra}: {}", h.text);
        assert_eq!(
            h.header("www-authenticate").as_deref(),
            Some("Bearer error=\"invalid_request\""),
            "{path} {extra}"
        );
    }
    // Refused before the endpoint is asked: no call, nothing at the backend.
    assert_eq!(idp.calls(), 0);
    assert_eq!(
        metric(
            &p,
            "wsguard_rejections_total{reason=\"introspection_ambiguous\"}"
        ),
        cases.len() as f64
    );

    // One token: every configured source is emptied before forwarding,
    // including empty ones the client added; other parameters, cookies and
    // subprotocols are kept.
    let (_r, h) = Raw::upgrade(
        p.addr,
        "/room?access_token=&x=1",
        &format!("{auth}Cookie: tok=; theme=dark\r\nSec-WebSocket-Protocol: chat\r\n"),
    )
    .await;
    assert_eq!(h.status, 101, "{}", h.text);
    let (path, headers) = request(&mut rx).await;
    assert_eq!(path, "/room?x=1");
    assert!(values(&headers, "authorization").is_empty(), "{headers:?}");
    assert_eq!(values(&headers, "cookie"), vec!["theme=dark"]);
    assert_eq!(values(&headers, "sec-websocket-protocol"), vec!["chat"]);
    assert_eq!(values(&headers, "x-auth-subject"), vec!["alice"]);
    assert_eq!(idp.calls(), 1);

    // A token from the query alone is the one introspected, and it too is
    // removed.
    let (_r, h) = Raw::upgrade(p.addr, "/?access_token=act-bob", "").await;
    assert_eq!(h.status, 101, "{}", h.text);
    let (path, headers) = request(&mut rx).await;
    assert_eq!(path, "/");
    assert_eq!(values(&headers, "x-auth-subject"), vec!["bob"]);
    assert_echo_with(p.addr, &auth).await;
}

#[tokio::test]
async fn introspection_report_mode_counts_an_ambiguous_token_and_strips_every_source() {
    let idp = Idp::start(false).await;
    let (b, mut rx) = recording_backend().await;
    let url = format!("http://{}/introspect", idp.addr);
    let p = proxy(
        b,
        &introspection_policy(&url, ALL_SOURCES, "").replace("mode: enforce", "mode: report"),
    )
    .await;
    let (_r, h) = Raw::upgrade(
        p.addr,
        "/?access_token=forged&k=v",
        &format!(
            "{}Cookie: tok=forged2\r\nX-Auth-Subject: root\r\n",
            bearer("act-alice")
        ),
    )
    .await;
    assert_eq!(h.status, 101, "{}", h.text);
    let (path, headers) = request(&mut rx).await;
    // Neither the valid nor the forged tokens reach the backend, and no
    // claim is asserted for an ambiguous request.
    assert_eq!(path, "/?k=v");
    assert!(values(&headers, "authorization").is_empty(), "{headers:?}");
    assert!(values(&headers, "cookie").is_empty(), "{headers:?}");
    assert!(values(&headers, "x-auth-subject").is_empty(), "{headers:?}");
    assert!(
        metric(
            &p,
            "wsguard_rejections_total{reason=\"introspection_report\"}"
        ) >= 1.0
    );
    assert_eq!(idp.calls(), 0);
}

#[tokio::test]
async fn introspection_forward_token_passes_only_the_consumed_token() {
    let idp = Idp::start(false).await;
    let (b, mut rx) = recording_backend().await;
    let url = format!("http://{}/introspect", idp.addr);
    let p = proxy(
        b,
        &introspection_policy(&url, &format!("{ALL_SOURCES}  forward_token: true\n"), ""),
    )
    .await;
    let (_r, h) = Raw::upgrade(
        p.addr,
        "/?access_token=&y=2",
        &format!("{}Cookie: tok=; a=b\r\n", bearer("act-alice")),
    )
    .await;
    assert_eq!(h.status, 101, "{}", h.text);
    let (path, headers) = request(&mut rx).await;
    assert_eq!(path, "/?y=2");
    assert_eq!(values(&headers, "authorization"), vec!["Bearer act-alice"]);
    assert_eq!(values(&headers, "cookie"), vec!["a=b"]);
}

#[tokio::test]
async fn introspection_claim_headers_are_stripped_on_routes_that_do_not_introspect() {
    let idp = Idp::start(false).await;
    let (b, mut rx) = recording_backend().await;
    // Only /intro introspects; the top level has no token guard at all.
    let policy = format!(
        "keepalive: {{ interval: 0s, upstream_interval: 0s }}\nlimits:\n  per_ip: null\n  per_connection: null\n\
         routes:\n  - path: /intro\n    introspection:\n      mode: enforce\n      url: \"http://{}/introspect\"\n      client_id: {IDP_ID}\n      client_secret_file: \"{}\"\n      forward_claims: {{ sub: x-introspected-sub }}\n",
        idp.addr,
        idp_secret_file()
    );
    let p = proxy(b, &policy).await;
    let forged = "X-Introspected-Sub: root\r\nX_Introspected_Sub: root\r\nX-Other: kept\r\n";
    let (_r, h) = Raw::upgrade(p.addr, "/open", forged).await;
    assert_eq!(h.status, 101, "{}", h.text);
    let (path, headers) = request(&mut rx).await;
    assert_eq!(path, "/open");
    assert!(
        values(&headers, "x-introspected-sub").is_empty(),
        "{headers:?}"
    );
    assert!(
        values(&headers, "x_introspected_sub").is_empty(),
        "{headers:?}"
    );
    assert_eq!(values(&headers, "x-other"), vec!["kept"]);
    assert_eq!(idp.calls(), 0);

    // On the introspected route the claim is wsguard's alone, even when the
    // client names the header in Connection.
    let (_r, h) = Raw::upgrade(
        p.addr,
        "/intro/room",
        &format!(
            "{}X-Introspected-Sub: root\r\nConnection: Upgrade, x-introspected-sub\r\n",
            bearer("act-alice")
        ),
    )
    .await;
    assert_eq!(h.status, 101, "{}", h.text);
    let (path, headers) = request(&mut rx).await;
    assert_eq!(path, "/intro/room");
    assert_eq!(values(&headers, "x-introspected-sub"), vec!["alice"]);
    assert!(values(&headers, "authorization").is_empty());
    assert_echo(p.addr).await;
}
