//! Operator-facing behaviour: policy file watch (ConfigMap symlink swap),
//! refusal logs, metrics present from the start, the demo page.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;
use crate::process::{free_port, Proc};

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
        std::sync::Arc::clone(&p.shared),
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
    assert_eq!(p.shared.generation(), 2);
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
    assert_eq!(p.shared.generation(), 2);
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
    let port = free_port();
    let base = format!(
        "listen: \"127.0.0.1:{port}\"\nadmin: {{ listen: \"127.0.0.1:0\" }}\nupstream: {{ url: \"ws://{backend}\" }}\n"
    );
    let f = crate::process::policy_file(
        "watch",
        &format!("{base}origin: {{ mode: enforce, allow: [\"http://a.example\"] }}\n"),
    );
    let mut p = Proc::spawn_args(&f, &["--watch", "--watch-interval", "50ms"]);
    p.log_line("watching the policy file").await;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
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
    let port = free_port();
    let secret = std::env::temp_dir().join(format!("wsguard-ops-hs-{}", std::process::id()));
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef").unwrap();
    let f = crate::process::policy_file(
        "refusals",
        &format!(
            "listen: \"127.0.0.1:{port}\"\nadmin: {{ listen: \"127.0.0.1:0\" }}\nupstream: {{ url: \"ws://{backend}\" }}\n\
             origin: {{ mode: enforce, allow: [\"http://a.example\"], allow_missing: true }}\n\
             jwt:\n  mode: enforce\n  algorithms: [HS256]\n  keys: [{{ secret_file: \"{}\" }}]\n  token_sources: [header, \"query:access_token\"]\n",
            secret.display()
        ),
    );
    // At the default level (info), as an operator runs it.
    let mut p = Proc::spawn(&f);
    p.log_line("wsguard listening").await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

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
