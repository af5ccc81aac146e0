//! `wsguard demo`: a built-in echo backend on loopback with wsguard in
//! front of it, using the example policy, so a newcomer sees it work; and a
//! small page, served on an origin the policy allows, that connects through
//! wsguard from a browser with its token in a subprotocol and signs its
//! messages (HMAC-SHA256 with SubtleCrypto, contract section 3).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::policy::Policy;

/// The example policy, compiled in so the demo works from any directory.
pub const EXAMPLE_POLICY: &str = include_str!("../config.example.yaml");

/// The route the demo page uses: origin and token enforced.
pub const SECURE_PATH: &str = "/secure";

/// The subprotocol prefix that carries the page's token.
pub const TOKEN_PREFIX: &str = "bearer.";

/// The key id of the demo's client signing key.
pub const CLIENT_KID: &str = "demo";

/// A conformant echo server: text and binary come back as sent.
pub async fn echo_backend(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let cfg = WebSocketConfig::default()
                .read_buffer_size(4096)
                .write_buffer_size(0)
                .max_message_size(Some(64 << 20))
                .max_frame_size(Some(16 << 20));
            let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(cfg)).await
            else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                let reply = match msg {
                    Message::Text(_) | Message::Binary(_) => msg,
                    Message::Close(_) => break,
                    _ => continue,
                };
                if ws.send(reply).await.is_err() {
                    break;
                }
            }
            // Completes the close handshake (tungstenite queued the reply).
            let _ = ws.close(None).await;
        });
    }
}

/// The demo's JWT secret and signing keys, in a private temporary
/// directory removed on drop.
#[derive(Debug)]
pub struct SecretFile(PathBuf);

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Everything `demo` sets up before wsguard binds.
#[derive(Debug)]
pub struct Demo {
    /// The example policy pointed at the echo backend, plus a
    /// [`SECURE_PATH`] route that enforces the page's origin and a token.
    pub policy: Policy,
    /// The page server's listener, already bound.
    pub page: TcpListener,
    pub page_addr: SocketAddr,
    /// An HS256 token (sub `demo-user`, valid 24 h) for [`SECURE_PATH`].
    pub token: String,
    /// The client signing key ([`CLIENT_KID`], base64) that the page signs
    /// its messages with on [`SECURE_PATH`]. A key shipped to a page is
    /// readable by the page's scripts: fine for a demo, see
    /// docs/signing.md before doing it in production.
    pub client_key: String,
    pub secret: SecretFile,
}

/// Starts the echo backend on an ephemeral loopback port, binds the page
/// address, and returns the demo policy (proxy on `listen`, admin on
/// `admin`). An address that cannot be bound is named in the error.
pub async fn prepare(
    listen: SocketAddr,
    admin: SocketAddr,
    page: SocketAddr,
) -> Result<Demo, String> {
    let page_listener = TcpListener::bind(page)
        .await
        .map_err(|e| format!("cannot bind the page address {page}: {e}"))?;
    let page_addr = page_listener.local_addr().map_err(|e| e.to_string())?;
    let backend = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot bind the echo backend on 127.0.0.1: {e}"))?;
    let backend_addr = backend.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(echo_backend(backend));

    // A fresh random HS256 secret for this run, in a file only we can read.
    let dir = std::env::temp_dir().join(format!(
        "wsguard-demo-{}-{:x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let secret = SecretFile(dir);
    let secret_path = secret.0.join("jwt.secret");
    let secret_text: String = {
        use rand::distr::{Alphanumeric, SampleString};
        Alphanumeric.sample_string(&mut rand::rng(), 48)
    };
    write_private(&secret_path, &secret_text)?;
    // Fresh signing keys too: the page's client key and wsguard's key
    // toward the backend (32 random bytes each, base64).
    let random_key = || {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
    };
    let client_key = random_key();
    let client_key_path = secret.0.join("client.key");
    write_private(&client_key_path, &client_key)?;
    let upstream_key_path = secret.0.join("upstream.key");
    write_private(&upstream_key_path, &random_key())?;

    let origin = format!("http://{}", page_origin_host(page_addr));
    // The echo backend returns wsguard's own c2s envelope instead of
    // signing s2c, so the demo trusts it (verify_upstream: false): wsguard
    // strips that envelope and signs the echo for the page.
    let route = format!(
        "routes:\n  - path: {SECURE_PATH}\n    origin: {{ mode: enforce, allow: [\"{origin}\"] }}\n    jwt:\n      mode: enforce\n      algorithms: [HS256]\n      keys: [{{ secret_file: \"{}\" }}]\n      token_sources: [header, \"subprotocol:{TOKEN_PREFIX}\"]\n    hmac:\n      mode: enforce\n      client_keys: [{{ id: {CLIENT_KID}, secret_file: \"{}\" }}]\n      upstream_key: {{ id: demo-upstream, secret_file: \"{}\" }}\n      verify_upstream: false\n",
        secret_path.display(),
        client_key_path.display(),
        upstream_key_path.display(),
    );
    let yaml: String = EXAMPLE_POLICY
        .lines()
        .map(|l| {
            if l.starts_with("routes: []") {
                route.clone()
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let mut policy = Policy::from_text("demo policy", &yaml).map_err(|e| e.to_string())?;
    policy.listen = listen;
    policy.admin_listen = admin;
    for r in std::iter::once(&mut policy.default_route).chain(policy.routes.iter_mut()) {
        let up = &mut r.upstream;
        up.url = format!("ws://{backend_addr}");
        up.host = backend_addr.ip().to_string();
        up.port = backend_addr.port();
        up.base_path = String::new();
    }
    let token = mint_token(&secret_text)?;
    Ok(Demo {
        policy,
        page: page_listener,
        page_addr,
        token,
        client_key,
        secret,
    })
}

/// How a browser names a loopback listener (an unspecified address is
/// reached as 127.0.0.1).
fn page_origin_host(a: SocketAddr) -> SocketAddr {
    if a.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], a.port()))
    } else {
        a
    }
}

fn write_private(path: &std::path::Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn mint_token(secret: &str) -> Result<String, String> {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 24 * 3600;
    let claims = serde_json::json!({ "sub": "demo-user", "exp": exp });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| format!("cannot sign the demo token: {e}"))
}

/// The demo page: connects to `ws://{proxy}/secure` offering only
/// `bearer.<token>` as subprotocol, sends one signed message, verifies the
/// signed echo, and reports each step to the page server
/// (`GET /report?...`).
pub fn page_html(proxy: SocketAddr, token: &str, client_key: &str) -> String {
    let proxy = page_origin_host(proxy);
    PAGE.replace("{{WS_URL}}", &format!("ws://{proxy}{SECURE_PATH}"))
        .replace("{{PREFIX}}", TOKEN_PREFIX)
        .replace("{{TOKEN}}", token)
        .replace("{{KID}}", CLIENT_KID)
        .replace("{{KEY}}", client_key)
}

const PAGE: &str = r#"<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>wsguard demo</title>
<style>body{font:15px/1.5 system-ui,sans-serif;max-width:46em;margin:2em auto;padding:0 1em}
pre{background:#f4f4f4;padding:.8em;white-space:pre-wrap;word-break:break-all}</style></head>
<body>
<h1>wsguard demo</h1>
<p>This page is served on an origin that the demo policy allows on the
<code>/secure</code> route. It opens a WebSocket through wsguard with its JWT
in a subprotocol (browsers cannot set <code>Authorization</code> on a
WebSocket):</p>
<pre>new WebSocket("{{WS_URL}}", ["{{PREFIX}}" + token])</pre>
<p>wsguard checks the Origin and the token, removes the token before the
request goes to the echo backend, and answers the token subprotocol back
(the backend selected none, and a browser aborts a handshake that offered a
subprotocol and got none back).</p>
<p>The route also enforces message signatures: the page signs each message
with HMAC-SHA256 (SubtleCrypto) under the demo client key <code>{{KID}}</code>
(<code>wsg1.kid.seq.ts.sig</code>, a newline, the payload; see
docs/signing.md). wsguard verifies and strips the envelope, and signs the
echo for the page, which verifies it. An unsigned message would be closed
with 1008.</p>
<p><input id="msg" value="hello through wsguard" size="30">
<button id="send">send</button></p>
<pre id="log"></pre>
<script>
"use strict";
const token = "{{TOKEN}}", kid = "{{KID}}";
const enc = new TextEncoder(), dec = new TextDecoder();
const out = document.getElementById("log");
function log(line) { out.textContent += line + "\n"; }
function report(params) {
  fetch("/report?" + new URLSearchParams(params)).catch(() => {});
}
const b64 = (s) => Uint8Array.from(atob(s.replace(/-/g, "+").replace(/_/g, "/")), (c) => c.charCodeAt(0));
const b64url = (buf) => btoa(String.fromCharCode(...new Uint8Array(buf)))
  .replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
// canonical: wsg1, direction, kid, seq, ts, bind (none here), type, payload
const canonical = (dir, k, seq, ts, payload) =>
  enc.encode(["wsg1", dir, k, seq, ts, "", "text", payload].join("\n"));
const subtle = window.crypto && crypto.subtle;
if (!subtle) log("SubtleCrypto needs a secure context: open this page on 127.0.0.1 or localhost");
const key = subtle && subtle.importKey("raw", b64("{{KEY}}"),
  { name: "HMAC", hash: "SHA-256" }, false, ["sign", "verify"]);
let seq = 0, sending = Promise.resolve(), lastSeq = 0;
function sendSigned(text) {
  if (!key) return;
  const s = ++seq;  // chained, so messages leave in seq order
  sending = sending.then(async () => {
    const ts = String(Date.now());
    const mac = await crypto.subtle.sign("HMAC", await key, canonical("c2s", kid, s, ts, text));
    const msg = `wsg1.${kid}.${s}.${ts}.${b64url(mac)}\n${text}`;
    log("sent: " + msg.replace("\n", " \u21b5 "));
    ws.send(msg);
  });
}
async function verify(data) {
  const nl = data.indexOf("\n");
  const head = (nl < 0 ? "" : data.slice(0, nl)).split("."), payload = data.slice(nl + 1);
  if (!key || head.length !== 5 || head[0] !== "wsg1" || head[1] !== kid) return null;
  const s = Number(head[2]);
  if (!(s > lastSeq) || Math.abs(Date.now() - Number(head[3])) > 30000) return null;
  const ok = await crypto.subtle.verify("HMAC", await key, b64(head[4]),
    canonical("s2c", head[1], head[2], head[3], payload));
  if (!ok) return null;
  lastSeq = s;
  return { seq: s, payload };
}
const ws = new WebSocket("{{WS_URL}}", ["{{PREFIX}}" + token]);
ws.onopen = () => {
  const proto = ws.protocol.startsWith("{{PREFIX}}") ? "{{PREFIX}}<token>" : ws.protocol;
  log("open; subprotocol: " + proto + "; extensions: " + (ws.extensions || "none"));
  report({ event: "open", protocol: proto, extensions: ws.extensions });
  sendSigned(document.getElementById("msg").value);
};
ws.onmessage = async (e) => {
  const v = await verify(e.data);
  if (v) {
    log("echo, signature verified (s2c seq " + v.seq + "): " + v.payload);
    report({ event: "echo", data: v.payload, verified: "s2c", seq: v.seq });
  } else {
    log("echo with a bad signature: " + e.data);
    report({ event: "echo", data: e.data, verified: "no" });
  }
};
ws.onclose = (e) => {
  log("closed: " + e.code + " " + e.reason);
  report({ event: "close", code: e.code });
};
ws.onerror = () => log("error (see the browser console)");
document.getElementById("send").onclick = () => sendSigned(document.getElementById("msg").value);
</script>
</body>
</html>
"#;

/// Serves the page on `/` and passes each `/report` query to `reports`.
pub async fn serve_page(
    listener: TcpListener,
    html: String,
    reports: mpsc::UnboundedSender<String>,
) {
    let html = Bytes::from(html);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (html, reports) = (html.clone(), reports.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (html, reports) = (html.clone(), reports.clone());
                async move {
                    let mut resp = Response::new(Full::new(Bytes::new()));
                    match (req.method(), req.uri().path()) {
                        (&hyper::Method::GET, "/") => {
                            *resp.body_mut() = Full::new(html);
                            let h = resp.headers_mut();
                            h.insert(
                                hyper::header::CONTENT_TYPE,
                                hyper::header::HeaderValue::from_static("text/html; charset=utf-8"),
                            );
                            h.insert(
                                hyper::header::CACHE_CONTROL,
                                hyper::header::HeaderValue::from_static("no-store"),
                            );
                        }
                        (&hyper::Method::GET, "/report") => {
                            let _ = reports.send(req.uri().query().unwrap_or("").to_string());
                            *resp.status_mut() = StatusCode::NO_CONTENT;
                        }
                        _ => *resp.status_mut() = StatusCode::NOT_FOUND,
                    }
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
