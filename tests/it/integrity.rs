//! Issue 11: request integrity. What the backend sees must be what wsguard
//! checked. One test per attack; each asserts what the backend received or
//! what the client got, then that a normal client still works.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;
use tokio::sync::mpsc;

use crate::common::*;

const SECRET: &str = "an-hs256-secret-that-is-at-least-32-bytes-long";

fn secret_file() -> String {
    let dir = std::env::temp_dir().join(format!("wsguard-it-integrity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("hs.secret");
    std::fs::write(&f, SECRET).unwrap();
    f.display().to_string()
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

#[allow(dead_code)]
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
