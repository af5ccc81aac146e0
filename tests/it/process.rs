//! Behaviour that needs the real process: exit codes and signals.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_wsguard");

fn check(yaml: &str) -> (i32, String) {
    let dir = std::env::temp_dir().join(format!(
        "wsguard-check-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("policy.yaml");
    std::fs::write(&f, yaml).unwrap();
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&f)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn check_accepts_the_example_policy() {
    let out = Command::new(BIN)
        .args([
            "check",
            "-c",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.yaml"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}

#[test]
fn check_reports_every_problem_with_its_line() {
    let (code, out) = check("listen: \"127.0.0.1:8080\"\nshutdown_grace: 10 secs\nlimits:\n  per_connection:\n    messages: { rate: 0/s, burst: 5 }\n");
    assert_eq!(code, 1);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].ends_with(
            ":2:17: shutdown_grace: `10 secs` is not a duration (use e.g. 500ms, 25s, 10m, 1h)"
        ),
        "{out}"
    );
    assert!(
        lines[1].contains(":5:")
            && lines[1].contains("limits.per_connection.messages.rate")
            && lines[1].contains("above zero"),
        "{out}"
    );
    let (code, out) = check("limits:\n  max_conections: 5\n");
    assert_eq!(code, 1);
    assert!(
        out.contains(":2:3: limits.max_conections: unknown field"),
        "{out}"
    );
    // Structural and semantic problems together, each at its own place.
    let (code, out) = check("origin:\n  allwo: []\nkeepalive:\n  bogus: 1\n  interval: 5x\nroutes:\n  - path: /a\n    mode: x\n");
    assert_eq!(code, 1);
    // "FILE:LINE:COL: key.path: message" -> "LINE:COL: key.path"
    let tails: Vec<String> = out
        .lines()
        .filter_map(|l| l.split_once(".yaml:"))
        .map(|(_, t)| t.splitn(3, ": ").take(2).collect::<Vec<_>>().join(": "))
        .collect();
    assert_eq!(
        tails,
        vec![
            "2:3: origin.allwo",
            "4:3: keepalive.bogus",
            "5:13: keepalive.interval",
            "8:5: routes[0].mode"
        ],
        "{out}"
    );
}

#[test]
fn check_validates_feature_material() {
    let (code, out) = check("limits:\n  shared:\n    redis_url: http://127.0.0.1:6379\n");
    assert_eq!(code, 1);
    assert!(out.contains(":3:16: limits.shared.redis_url:"), "{out}");
    let (code, out) = check("jwt:\n  mode: enforce\n  keys: []\n");
    assert_eq!(code, 1);
    assert!(out.contains("jwt.keys"), "{out}");
    let (code, _) = check("jwt: { mode: off }\nlimits: { shared: null }\nroutes: []\n");
    assert_eq!(code, 0);
}

#[test]
fn bad_arguments_exit_1_and_version_exits_0() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("wsguard "));
    let out = Command::new(BIN).args(["run"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn sign_and_verify_round_trip_on_the_command_line() {
    let key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="; // 32 bytes
    let mut sign = Command::new(BIN)
        .args([
            "sign",
            "--key-env",
            "K",
            "--kid",
            "k1",
            "--dir",
            "c2s",
            "--seq",
            "7",
            "--ts",
            "1700000000000",
        ])
        .env("K", key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    sign.stdin.take().unwrap().write_all(b"hello").unwrap();
    let signed = sign.wait_with_output().unwrap();
    assert_eq!(signed.status.code(), Some(0));
    assert!(signed.stdout.starts_with(b"wsg1.k1.7.1700000000000."));
    let verify = |dir: &str, extra: &[&str]| {
        let mut v = Command::new(BIN)
            .args(["verify", "--key-env", "K", "--dir", dir])
            .args(extra)
            .env("K", key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        v.stdin.take().unwrap().write_all(&signed.stdout).unwrap();
        v.wait_with_output().unwrap()
    };
    let ok = verify("c2s", &[]);
    assert_eq!(ok.status.code(), Some(0));
    assert_eq!(ok.stdout, b"hello");
    let wrong_dir = verify("s2c", &[]);
    assert_eq!(wrong_dir.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong_dir.stderr).contains("bad_mac"));
    let stale = verify("c2s", &["--max-skew", "30s"]);
    assert_eq!(stale.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&stale.stderr).contains("skew"));
}

/// The spawned proxy with its log lines; killed on drop so a failing test
/// leaves nothing behind.
pub(crate) struct Proc {
    child: tokio::process::Child,
    /// Log lines, drained from the child's stderr by a background task so
    /// the pipe can never fill and block the child's logging.
    log: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Proc {
    pub(crate) fn spawn(config: &std::path::Path) -> Proc {
        Proc::spawn_args(config, &[])
    }

    /// `wsguard run -c CONFIG ARGS...`
    pub(crate) fn spawn_args(config: &std::path::Path, args: &[&str]) -> Proc {
        let mut child = tokio::process::Command::new(BIN)
            .args(["run", "-c"])
            .arg(config)
            .args(args)
            .env("WSGUARD_LOG", "info")
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            let mut copy = std::env::var("WSGUARD_TEST_LOG_COPY")
                .ok()
                .and_then(|f| std::fs::File::create(f).ok());
            while let Ok(Some(l)) = lines.next_line().await {
                if let Some(f) = copy.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{l}");
                }
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Proc { child, log }
    }

    /// Waits for a log line containing `needle`.
    pub(crate) async fn log_line(&mut self, needle: &str) -> String {
        within(needle, async {
            loop {
                match self.log.recv().await {
                    Some(l) if l.contains(needle) => return l,
                    Some(_) => continue,
                    None => panic!("wsguard exited before logging {needle:?}"),
                }
            }
        })
        .await
    }

    /// The proxy and admin addresses the proxy bound, from its `wsguard
    /// listening` line: tests bind 127.0.0.1:0, so no port is guessed,
    /// released and raced for.
    pub(crate) async fn listening(&mut self) -> (SocketAddr, SocketAddr) {
        let line = self.log_line("wsguard listening").await;
        listening_addrs(&line)
    }

    /// The child's process id (for /proc/PID/status).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id().expect("wsguard still running")
    }

    pub(crate) fn signal(&self, sig: &str) {
        let pid = self.child.id().unwrap();
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    pub(crate) async fn exit_code(&mut self) -> Option<i32> {
        within("exit", self.child.wait()).await.unwrap().code()
    }
}

use tokio::io::AsyncBufReadExt;

/// The `listen` and `admin` fields of a `wsguard listening` log line.
pub(crate) fn listening_addrs(line: &str) -> (SocketAddr, SocketAddr) {
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let field = |name: &str| -> SocketAddr {
        v.get(name)
            .or_else(|| v["fields"].get(name))
            .and_then(|a| a.as_str())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
            .parse()
            .unwrap()
    };
    (field("listen"), field("admin"))
}

/// The policy head of a spawned proxy: both listeners on port 0.
pub(crate) const ANY_PORTS: &str = "listen: \"127.0.0.1:0\"\nadmin: { listen: \"127.0.0.1:0\" }\n";

pub(crate) fn policy_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wsguard-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("p.yaml");
    std::fs::write(&f, text).unwrap();
    f
}

#[tokio::test]
async fn sigterm_drains_live_sessions_with_1001_and_exits_0() {
    let backend = echo_backend().await;
    let f = policy_file(
        "term",
        &format!("{ANY_PORTS}upstream: {{ url: \"ws://{backend}\" }}\nshutdown_grace: 5s\n"),
    );
    let mut p = Proc::spawn(&f);
    let (addr, _) = p.listening().await;
    let mut c = ws(addr, "/").await;
    c.send(Message::text("hi")).await.unwrap();
    assert_eq!(next(&mut c).await, Message::text("hi"));
    p.signal("TERM");
    let m = next(&mut c).await;
    assert_eq!(close_of(&m).map(|c| c.0), Some(1001));
    drop(c);
    assert_eq!(p.exit_code().await, Some(0));
}

#[tokio::test]
async fn sigterm_with_shutdown_close_code_1012_gives_clients_1012_and_exits_0() {
    let (backend, mut rx) = recording_backend().await;
    let f = policy_file("term1012", &format!("{ANY_PORTS}upstream: {{ url: \"ws://{backend}\" }}\nshutdown_grace: 5s\nshutdown_close_code: 1012\n"));
    let mut p = Proc::spawn(&f);
    let (addr, _) = p.listening().await;
    let mut c = ws(addr, "/").await;
    c.send(Message::text("hi")).await.unwrap();
    assert_eq!(next(&mut c).await, Message::text("hi"));
    p.signal("TERM");
    let m = next(&mut c).await;
    assert_eq!(close_of(&m), Some((1012, "shutting down".into())));
    drop(c);
    assert_eq!(backend_close(&mut rx).await.map(|c| c.0), Some(1001));
    assert_eq!(p.exit_code().await, Some(0));
}

/// The access-log line of a session, as JSON (fields at the top level or
/// under `fields`, depending on the formatter).
fn access_field(line: &str, name: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    v.get(name)
        .or_else(|| v["fields"].get(name))
        .cloned()
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

/// A 1009 that wsguard imposes is logged as closed by the proxy, with the
/// client at fault and the reason; a close the client sends is logged as
/// closed by the client.
#[tokio::test]
async fn the_access_log_names_who_closed_and_why() {
    let backend = echo_backend().await;
    let f = policy_file(
        "access",
        &format!("{ANY_PORTS}upstream: {{ url: \"ws://{backend}\" }}\nlimits:\n  max_message_size: 1KiB\n"),
    );
    let mut p = Proc::spawn(&f);
    let (addr, _) = p.listening().await;

    let mut c = ws(addr, "/too-big").await;
    c.send(Message::binary(vec![7u8; 2048])).await.unwrap();
    let m = next(&mut c).await;
    assert_eq!(close_of(&m).map(|c| c.0), Some(1009));
    // The line is written once the close handshake is over: hang up.
    drop(c);
    let line = p.log_line("session closed").await;
    assert_eq!(access_field(&line, "path"), "/too-big", "{line}");
    assert_eq!(access_field(&line, "close_code"), 1009, "{line}");
    assert_eq!(access_field(&line, "closed_by"), "proxy", "{line}");
    assert_eq!(access_field(&line, "fault"), "client", "{line}");
    assert_eq!(access_field(&line, "reason"), "message too big", "{line}");

    let mut c = ws(addr, "/polite").await;
    c.send(Message::text("hi")).await.unwrap();
    assert_eq!(next(&mut c).await, Message::text("hi"));
    c.close(None).await.unwrap();
    drop(c);
    let line = p.log_line("session closed").await;
    assert_eq!(access_field(&line, "path"), "/polite", "{line}");
    assert_eq!(access_field(&line, "closed_by"), "client", "{line}");
    assert_eq!(access_field(&line, "close_code"), 1005, "{line}");
    assert_eq!(access_field(&line, "reason"), "", "{line}");
}

#[tokio::test]
async fn taken_listen_address_exits_2() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let f = policy_file(
        "taken",
        &format!("listen: \"127.0.0.1:{port}\"\nadmin: {{ listen: \"127.0.0.1:0\" }}\n"),
    );
    let mut p = Proc::spawn(&f);
    assert_eq!(p.exit_code().await, Some(2));
}

#[tokio::test]
async fn sighup_reload_keeps_live_sessions_and_counts_failures() {
    let backend = echo_backend().await;
    let good = format!("{ANY_PORTS}upstream: {{ url: \"ws://{backend}\" }}\n");
    let f = policy_file("hup", &good);
    let mut p = Proc::spawn(&f);
    let (addr, admin) = p.listening().await;
    let mut c = ws(addr, "/").await;
    let metrics = || async move {
        let (mut r, _) = Raw::request(
            admin,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        r.body().await
    };
    // An invalid file is refused; the old policy stays.
    std::fs::write(&f, format!("{good}limits:\n  max_conections: 1\n")).unwrap();
    p.signal("HUP");
    let line = p.log_line("reload refused").await;
    assert!(line.contains("max_conections"), "{line}");
    assert!(metrics()
        .await
        .contains("wsguard_reloads_total{result=\"error\"} 1"));
    c.send(Message::text("after bad reload")).await.unwrap();
    assert_eq!(next(&mut c).await, Message::text("after bad reload"));
    // A valid one is applied; the live session keeps echoing.
    std::fs::write(&f, format!("{good}limits:\n  max_connections: 50\n")).unwrap();
    p.signal("HUP");
    p.log_line("policy reloaded").await;
    let m = metrics().await;
    assert!(m.contains("wsguard_reloads_total{result=\"ok\"} 1"), "{m}");
    assert!(m.contains("wsguard_policy_generation 2"), "{m}");
    c.send(Message::text("after good reload")).await.unwrap();
    assert_eq!(next(&mut c).await, Message::text("after good reload"));
    assert_echo(addr).await;
    p.signal("TERM");
    assert_eq!(close_of(&next(&mut c).await).map(|c| c.0), Some(1001));
    drop(c);
    assert_eq!(p.exit_code().await, Some(0));
}

#[tokio::test]
async fn shutdown_delay_turns_readyz_503_before_the_listener_closes() {
    let backend = echo_backend().await;
    let f = policy_file(
        "delay",
        &format!("{ANY_PORTS}upstream: {{ url: \"ws://{backend}\" }}\nshutdown_delay: 2s\n"),
    );
    let mut p = Proc::spawn(&f);
    let (addr, admin_addr) = p.listening().await;
    let ready = || async move {
        Raw::request(
            admin_addr,
            "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .1
        .status
    };
    assert_eq!(ready().await, 200);
    let mut c = ws(addr, "/").await;
    p.signal("TERM");
    p.log_line("not ready").await;
    assert_eq!(ready().await, 503);
    // Still accepting during the delay.
    assert_echo(addr).await;
    // Then live sessions get 1001 and the process exits 0.
    assert_eq!(close_of(&next(&mut c).await).map(|c| c.0), Some(1001));
    drop(c);
    assert_eq!(p.exit_code().await, Some(0));
}

#[tokio::test]
async fn a_stalled_log_reader_does_not_stall_the_proxy() {
    let backend = echo_backend().await;
    let f = policy_file(
        "stalled-log",
        &format!("{ANY_PORTS}upstream: {{ url: \"ws://{backend}\" }}\nlimits: {{ per_ip: null, per_connection: null }}\n"),
    );
    // stderr is a pipe that nobody reads (but that stays open).
    let mut child = tokio::process::Command::new(BIN)
        .args(["run", "-c"])
        .arg(&f)
        .env("WSGUARD_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Read up to the `wsguard listening` line for the bound addresses, then
    // stop reading (the pipe stays open).
    let mut unread = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let (addr, admin) = within("wsguard listening", async {
        loop {
            let line = unread.next_line().await.unwrap().expect("wsguard exited");
            if line.contains("wsguard listening") {
                return listening_addrs(&line);
            }
        }
    })
    .await;
    // 600 sessions open and close: ~600 access-log lines, several pipe buffers' worth.
    for _ in 0..6 {
        let mut batch = Vec::new();
        for _ in 0..100 {
            batch.push(
                Raw::upgrade(addr, "/a-fairly-long-path-to-make-the-log-lines-longer", "")
                    .await
                    .0,
            );
        }
        drop(batch);
    }
    // The proxy and its admin endpoint still answer.
    assert_echo(addr).await;
    let (_r, h) = Raw::request(
        admin,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(h.status, 200);
}
