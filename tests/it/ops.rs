//! Operator-facing behaviour: policy file watch (ConfigMap symlink swap),
//! refusal logs, metrics present from the start, the demo page.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;
use crate::process::{Proc, ANY_PORTS};

/// A directory laid out as the kubelet mounts a ConfigMap:
/// `policy.yaml -> ..data/policy.yaml`, `..data -> ..<version>`.
struct ConfigMapDir {
    dir: PathBuf,
    version: u32,
}

impl ConfigMapDir {
    fn new(name: &str, text: &str) -> ConfigMapDir {
        let dir = std::env::temp_dir().join(format!("wsguard-cm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut cm = ConfigMapDir { dir, version: 0 };
        cm.swap(text);
        std::os::unix::fs::symlink("..data/policy.yaml", cm.dir.join("policy.yaml")).unwrap();
        cm
    }

    fn file(&self) -> PathBuf {
        self.dir.join("policy.yaml")
    }

    /// What the kubelet does on an update: a new versioned directory, a
    /// temporary symlink to it, renamed over `..data` (atomic).
    fn swap(&mut self, text: &str) {
        self.version += 1;
        let v = format!("..2026_12_03_{}", self.version);
        std::fs::create_dir_all(self.dir.join(&v)).unwrap();
        std::fs::write(self.dir.join(&v).join("policy.yaml"), text).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&v, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

impl Drop for ConfigMapDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn origin_policy(backend: std::net::SocketAddr, allowed: &str) -> String {
    format!(
        "listen: \"127.0.0.1:0\"\nadmin: {{ listen: \"127.0.0.1:0\" }}\nupstream: {{ url: \"ws://{backend}\" }}\norigin: {{ mode: enforce, allow: [\"{allowed}\"] }}\n"
    )
}

async fn status_with_origin(addr: std::net::SocketAddr, origin: &str) -> u16 {
    Raw::upgrade(addr, "/", &format!("Origin: {origin}\r\n"))
        .await
        .1
        .status
}

#[tokio::test]
async fn watch_reloads_on_a_configmap_symlink_swap() {
    let backend = echo_backend().await;
    let mut cm = ConfigMapDir::new("swap", &origin_policy(backend, "http://a.example"));
    let policy = wsguard::policy::Policy::load(&cm.file()).unwrap_or_else(|e| panic!("{e}"));
    let p = wsguard::start(policy).await.unwrap();
    let mut reloads = wsguard::reload::spawn_watch(
        std::sync::Arc::clone(&p.process),
        cm.file(),
        Duration::from_millis(20),
    );
    assert_eq!(status_with_origin(p.addr, "http://b.example").await, 403);
    // A live session survives the reload.
    let mut live = {
        let (mut r, h) = Raw::upgrade(p.addr, "/", "Origin: http://a.example\r\n").await;
        assert_eq!(h.status, 101);
        r.send_frame(true, 1, b"before", true).await;
        assert_eq!(r.read_frame().await, Some((1, b"before".to_vec())));
        r
    };

    cm.swap(&origin_policy(backend, "http://b.example"));
    within("the reload after the swap", reloads.changed())
        .await
        .unwrap();
    assert_eq!(*reloads.borrow(), 1);
    assert_eq!(p.process.generation(), 2);
    assert_eq!(metric(&p, "wsguard_reloads_total{result=\"ok\"}"), 1.0);
    assert_eq!(status_with_origin(p.addr, "http://b.example").await, 101);
    assert_eq!(status_with_origin(p.addr, "http://a.example").await, 403);
    live.send_frame(true, 1, b"after", true).await;
    assert_eq!(live.read_frame().await, Some((1, b"after".to_vec())));

    // An invalid update is refused and counted; the policy in force stays.
    cm.swap("origin: { mode: enforce, allwo: [] }\n");
    within("the refused reload", reloads.changed())
        .await
        .unwrap();
    assert_eq!(metric(&p, "wsguard_reloads_total{result=\"error\"}"), 1.0);
    assert_eq!(p.process.generation(), 2);
    assert_eq!(status_with_origin(p.addr, "http://b.example").await, 101);
    // Unchanged content (the kubelet re-syncs the same data) is no reload.
    cm.swap("origin: { mode: enforce, allwo: [] }\n");
    cm.swap(&origin_policy(backend, "http://c.example"));
    within("the next reload", reloads.changed()).await.unwrap();
    assert_eq!(*reloads.borrow(), 3);
    assert_eq!(status_with_origin(p.addr, "http://c.example").await, 101);
    drop(live);
    p.shutdown(Duration::from_secs(2)).await;
}

fn write(path: &Path, text: &str) {
    // Replace by rename, as editors and `kubectl cp` do.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn run_watch_flag_reloads_without_a_signal() {
    let backend = echo_backend().await;
    let base = format!("{ANY_PORTS}upstream: {{ url: \"ws://{backend}\" }}\n");
    let f = crate::process::policy_file(
        "watch",
        &format!("{base}origin: {{ mode: enforce, allow: [\"http://a.example\"] }}\n"),
    );
    let mut p = Proc::spawn_args(&f, &["--watch", "--watch-interval", "50ms"]);
    let (addr, _) = p.listening().await;
    p.log_line("watching the policy file").await;
    assert_eq!(status_with_origin(addr, "http://b.example").await, 403);
    write(
        &f,
        &format!("{base}origin: {{ mode: enforce, allow: [\"http://b.example\"] }}\n"),
    );
    p.log_line("policy reloaded").await;
    assert_eq!(status_with_origin(addr, "http://b.example").await, 101);
    p.signal("TERM");
    assert_eq!(p.exit_code().await, Some(0));
}

#[tokio::test]
async fn refused_handshakes_are_logged_at_info_without_the_token() {
    let backend = echo_backend().await;
    let secret = std::env::temp_dir().join(format!("wsguard-ops-hs-{}", std::process::id()));
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef").unwrap();
    let f = crate::process::policy_file(
        "refusals",
        &format!(
            "{ANY_PORTS}upstream: {{ url: \"ws://{backend}\" }}\n\
             origin: {{ mode: enforce, allow: [\"http://a.example\"], allow_missing: true }}\n\
             jwt:\n  mode: enforce\n  algorithms: [HS256]\n  keys: [{{ secret_file: \"{}\" }}]\n  token_sources: [header, \"query:access_token\"]\n",
            secret.display()
        ),
    );
    // At the default level (info), as an operator runs it.
    let mut p = Proc::spawn(&f);
    let (addr, _) = p.listening().await;

    assert_eq!(status_with_origin(addr, "http://evil.example").await, 403);
    let line = p.log_line("handshake refused").await;
    assert!(line.contains("\"status\":403"), "{line}");
    assert!(line.contains("origin_not_allowed"), "{line}");
    assert!(line.contains("127.0.0.1"), "{line}");

    let token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.SECRETSIGNATURE";
    let (_, h) = Raw::upgrade(addr, "/", &format!("Authorization: Bearer {token}\r\n")).await;
    assert_eq!(h.status, 401);
    let line = p.log_line("handshake refused").await;
    assert!(line.contains("\"status\":401"), "{line}");
    assert!(
        !line.contains("SECRETSIGNATURE") && !line.contains("eyJ"),
        "{line}"
    );
    let (_, h) = Raw::upgrade(addr, &format!("/x?access_token={token}"), "").await;
    assert_eq!(h.status, 401);
    let line = p.log_line("handshake refused").await;
    assert!(
        !line.contains("SECRETSIGNATURE") && !line.contains("/x"),
        "{line}"
    );

    let (_, h) = Raw::request(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(h.status, 426);
    let line = p.log_line("handshake refused").await;
    assert!(line.contains("\"status\":426"), "{line}");
    p.signal("TERM");
    assert_eq!(p.exit_code().await, Some(0));
    let _ = std::fs::remove_file(secret);
}

fn hs_token(secret: &str, sub: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({ "sub": sub, "exp": exp }),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

async fn request_seen(
    seen: &mut tokio::sync::mpsc::UnboundedReceiver<Seen>,
) -> Vec<(String, String)> {
    loop {
        match within("the backend's request", seen.recv()).await {
            Some(Seen::Request { headers, .. }) => return headers,
            Some(_) => continue,
            None => panic!("backend gone"),
        }
    }
}

#[tokio::test]
async fn a_token_only_subprotocol_is_answered_back_and_never_forwarded() {
    let secret_text = "0123456789abcdef0123456789abcdef";
    let secret = std::env::temp_dir().join(format!("wsguard-ops-sp-{}", std::process::id()));
    std::fs::write(&secret, secret_text).unwrap();
    let (backend, mut seen) = recording_backend().await;
    let p = proxy(
        backend,
        &format!(
            "jwt:\n  mode: enforce\n  algorithms: [HS256]\n  keys: [{{ secret_file: \"{}\" }}]\n  token_sources: [\"subprotocol:bearer.\"]\n",
            secret.display()
        ),
    )
    .await;
    let token = hs_token(secret_text, "alice");
    let entry = format!("bearer.{token}");

    // Only the token offered: the backend gets no subprotocol and selects
    // none; the client gets its token entry back (browsers need an answer).
    let (mut r, h) =
        Raw::upgrade(p.addr, "/", &format!("Sec-WebSocket-Protocol: {entry}\r\n")).await;
    assert_eq!(h.status, 101, "{}", h.text);
    assert_eq!(
        h.header("sec-websocket-protocol").as_deref(),
        Some(entry.as_str())
    );
    let headers = request_seen(&mut seen).await;
    assert!(
        headers
            .iter()
            .all(|(k, v)| k != "sec-websocket-protocol" && !v.contains(&token)),
        "{headers:?}"
    );
    r.send_frame(true, 1, b"hi", true).await;
    assert_eq!(r.read_frame().await, Some((1, b"hi".to_vec())));

    // With an application protocol offered too, the backend's choice is
    // what the client gets; the token still stays behind.
    let (_r2, h) = Raw::upgrade(
        p.addr,
        "/",
        &format!("Sec-WebSocket-Protocol: chat, {entry}\r\n"),
    )
    .await;
    assert_eq!(h.status, 101, "{}", h.text);
    assert_eq!(h.header("sec-websocket-protocol").as_deref(), Some("chat"));
    let headers = request_seen(&mut seen).await;
    let offered: Vec<_> = headers
        .iter()
        .filter(|(k, _)| k == "sec-websocket-protocol")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(offered, vec!["chat"]);

    // A bad token is still a 401, and nothing is echoed.
    let (_, h) = Raw::upgrade(p.addr, "/", "Sec-WebSocket-Protocol: bearer.not-a-jwt\r\n").await;
    assert_eq!(h.status, 401);
    assert_eq!(h.header("sec-websocket-protocol"), None);
    let _ = std::fs::remove_file(secret);
}

/// Headless Chromium, or None (with a message) when it is not installed.
pub(crate) fn chromium() -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(name))
                    .find(|p| p.is_file())
            })
        });
    if found.is_none() {
        eprintln!(
            "SKIPPED: the browser test needs chromium (apt-get install chromium, or WSGUARD_BROWSER_TESTS=1 scripts/test.sh)"
        );
    }
    found
}

/// Headless Chromium opening `http://{page}/` with a fresh profile of its
/// own (named after the test); killed when the child is dropped.
pub(crate) fn headless_chromium(browser: &Path, name: &str, page: std::net::SocketAddr) -> Browser {
    let profile =
        std::env::temp_dir().join(format!("wsguard-chromium-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&profile);
    let child = tokio::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("http://{page}/"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    Browser { child, profile }
}

/// A running headless Chromium and its profile directory.
pub(crate) struct Browser {
    child: tokio::process::Child,
    profile: PathBuf,
}

impl Browser {
    /// Stops the browser and removes its profile.
    pub(crate) async fn quit(mut self) {
        let _ = self.child.kill().await;
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

#[tokio::test]
async fn the_demo_page_works_in_headless_chromium() {
    let Some(browser) = chromium() else { return };
    let any = "127.0.0.1:0".parse().unwrap();
    let demo = wsguard::demo::prepare(any, any, any).await.unwrap();
    let page_addr = demo.page_addr;
    let p = wsguard::start(demo.policy).await.unwrap();
    let (tx, mut reports) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(wsguard::demo::serve_page(
        demo.page,
        wsguard::demo::page_html(p.addr, &demo.token, &demo.client_key),
        tx,
    ));
    let browser = headless_chromium(&browser, "demo", page_addr);
    let mut got = Vec::new();
    let outcome = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(r) = reports.recv().await {
            got.push(r.clone());
            if r.starts_with("event=echo") || r.starts_with("event=close") {
                return r;
            }
        }
        String::new()
    })
    .await;
    browser.quit().await;
    let last = outcome.unwrap_or_else(|_| panic!("no echo from the page within 30s: {got:?}"));
    // Chromium offers permessage-deflate and wsguard answered it (issue
    // 13): the signed message and its echo went compressed on this hop.
    assert_eq!(
        got.first().map(String::as_str),
        Some("event=open&protocol=bearer.%3Ctoken%3E&extensions=permessage-deflate%3B+server_no_context_takeover%3B+client_no_context_takeover"),
        "{got:?}"
    );
    // The page signed its message (wsguard enforces signatures on the
    // route and passed it), and verified wsguard's s2c signature on the echo.
    assert_eq!(
        last, "event=echo&data=hello+through+wsguard&verified=s2c&seq=1",
        "{got:?}"
    );
    // The page went through the proxy: one accepted handshake on /secure.
    assert_eq!(metric(&p, "wsguard_handshakes_total{result=\"ok\"}"), 1.0);
    assert_eq!(metric(&p, "wsguard_messages_total{direction=\"c2s\"}"), 1.0);
    for reason in wsguard::metrics::known_signature_failures() {
        let series = format!("wsguard_signature_failures_total{{reason=\"{reason}\"}}");
        assert_eq!(metric(&p, &series), 0.0, "{series}");
    }
    // The route really enforces signatures: the same origin and token with
    // an unsigned message is closed with 1008.
    let (mut r, h) = Raw::upgrade(
        p.addr,
        wsguard::demo::SECURE_PATH,
        &format!(
            "Origin: http://{page_addr}\r\nAuthorization: Bearer {}\r\n",
            demo.token
        ),
    )
    .await;
    assert_eq!(h.status, 101, "{}", h.text);
    r.send_frame(true, 1, b"unsigned", true).await;
    assert_eq!(r.close_code().await, Some(1008));
}

#[tokio::test]
async fn demo_prints_its_banner_after_binding_and_names_a_taken_address() {
    use tokio::io::AsyncBufReadExt;
    let bin = env!("CARGO_BIN_EXE_wsguard");
    let mut child = tokio::process::Command::new(bin)
        .args(["demo", "--listen", "127.0.0.1:0"])
        .args(["--admin", "127.0.0.1:0"])
        .args(["--page", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    // The banner names the addresses bound (all port 0 here).
    let addr_after = |l: &str, marker: &str| -> Option<std::net::SocketAddr> {
        let rest = &l[l.find(marker)? + marker.len()..];
        rest.split(['/', ' ']).next()?.parse().ok()
    };
    let (addr, page) = within("the banner", async {
        let (mut addr, mut page) = (None, None);
        while let Some(l) = lines.next_line().await.unwrap() {
            if l.contains("proxy on ws://") {
                addr = addr_after(&l, "proxy on ws://");
            }
            if l.contains("open http://") {
                page = addr_after(&l, "open http://");
            }
            if l.contains("Ctrl-C stops it") {
                return (addr.expect("proxy address"), page.expect("page address"));
            }
        }
        panic!("demo exited without its banner");
    })
    .await;
    // Everything the banner names accepts at once.
    assert_echo(addr).await;
    let (mut r, h) = Raw::request(
        page,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(h.status, 200);
    assert!(r.body().await.contains(&format!("ws://{addr}/secure")));
    let _ = child.kill().await;

    // A taken address is named, and the exit code is 2.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let t = taken.local_addr().unwrap();
    for flag in ["--listen", "--page"] {
        let mut args = vec![
            "demo".to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--admin".into(),
            "127.0.0.1:0".into(),
            "--page".into(),
            "127.0.0.1:0".into(),
        ];
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = t.to_string();
        let out = within(
            "demo exits",
            tokio::process::Command::new(bin).args(&args).output(),
        )
        .await
        .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&t.to_string()), "{flag}: {err}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("Ctrl-C"),
            "{flag}"
        );
    }
}

/// Every metric and every `by (...)` label that the Grafana dashboard
/// queries exists in a real scrape of a fresh, idle proxy (no panel says
/// "No data" on a healthy instance).
#[tokio::test]
async fn the_grafana_dashboard_queries_match_a_real_scrape() {
    let backend = echo_backend().await;
    let p = proxy(backend, "routes:\n  - path: /admin\n").await;
    let (mut r, h) = Raw::request(
        p.admin_addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(h.status, 200);
    let scrape = r.body().await;
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana-dashboard.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut queries = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("expr" | "definition", serde_json::Value::String(s)) => {
                            out.push(s.clone())
                        }
                        _ => walk(x, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(&dashboard, &mut queries);
    assert!(queries.len() >= 15, "{queries:?}");
    for q in &queries {
        let names: Vec<&str> = q
            .match_indices("wsguard_")
            .map(|(i, _)| {
                let rest = &q[i..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .collect();
        assert!(!names.is_empty(), "{q}");
        let series: Vec<&str> = scrape
            .lines()
            .filter(|l| {
                names.iter().any(|n| {
                    l.strip_prefix(n)
                        .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
                })
            })
            .collect();
        for n in &names {
            assert!(
                series.iter().any(|l| l.starts_with(n)),
                "`{n}` (in {q}) is not in the scrape:\n{scrape}"
            );
        }
        if let Some(i) = q.find("by (") {
            let labels = &q[i + 4..q[i..].find(')').map_or(q.len(), |j| i + j)];
            // job and instance are added by Prometheus at scrape time.
            for label in labels
                .split(',')
                .map(str::trim)
                .filter(|l| !["job", "instance"].contains(l))
            {
                assert!(
                    series.iter().any(|l| l.contains(&format!("{label}=\""))),
                    "label `{label}` (in {q}) is on no series of {names:?}:\n{scrape}"
                );
            }
        }
    }
    p.shutdown(Duration::from_secs(1)).await;
}

/// Every flag of the commands an operator types has a description.
#[test]
fn every_flag_is_described_in_help() {
    let bin = env!("CARGO_BIN_EXE_wsguard");
    for cmd in ["run", "check", "demo", "sign", "verify", "connect"] {
        let out = std::process::Command::new(bin)
            .args([cmd, "--help"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{cmd}");
        let help = String::from_utf8_lossy(&out.stdout).to_string();
        let mut flags = 0;
        let lines: Vec<&str> = help.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if !line.trim_start().starts_with('-') {
                continue;
            }
            flags += 1;
            // "  -c, --config <CONFIG>  The policy file": text after the
            // flag column; or, when clap puts help on the next line (long
            // help), an indented description line right below the flag.
            let same_line = line
                .trim_start()
                .split_once("  ")
                .is_some_and(|(_, d)| !d.trim().is_empty());
            let next_line = lines.get(i + 1).is_some_and(|n| {
                let t = n.trim_start();
                !t.is_empty()
                    && !t.starts_with('-')
                    && n.len() - t.len() > line.len() - line.trim_start().len()
            });
            let described = same_line || next_line;
            assert!(
                described,
                "`wsguard {cmd}`: no description for {line:?}\n{help}"
            );
        }
        assert!(flags >= 1, "{cmd}: {help}");
    }
}

/// The container build parses the real Cargo.toml against a stub crate
/// (tests/ is not in the build context): every target the manifest
/// declares by path ([[bench]], [[test]]) needs its stub in the Dockerfile,
/// or the image build fails before compiling anything (it did, once
/// `[[test]] fuzz_corpus` and `[[bench]] deflate` were added).
#[test]
fn the_dockerfile_stubs_every_target_the_manifest_declares() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let mut declared = Vec::new();
    let mut section = "";
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if let Some(name) = line
            .strip_prefix("name = \"")
            .and_then(|n| n.strip_suffix('"'))
        {
            match section {
                "[[bench]]" => declared.push(format!("benches/{name}.rs")),
                "[[test]]" => declared.push(format!("tests/{name}.rs")),
                _ => {}
            }
        }
    }
    assert!(declared.len() >= 3, "{declared:?}");
    for path in &declared {
        assert!(
            dockerfile.contains(path.as_str()),
            "the Dockerfile's dependency stage has no stub for {path}"
        );
    }
}
