//! Issue 6: limits shared across replicas through a real redis-server.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;
use crate::process::free_port;

struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    /// Starts a private redis-server; None (test skipped) only when the
    /// binary is absent — scripts/test.sh installs it.
    async fn start(port: u16) -> Option<Redis> {
        let child = match Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(_) => {
                eprintln!("redis-server not installed: shared-limit test skipped (scripts/test.sh installs it)");
                return None;
            }
        };
        let r = Redis { child, port };
        within("redis up", async {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        Some(r)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn shared_policy(redis_port: u16, on_error: &str) -> String {
    format!(
        "keepalive: {{ interval: 0s, upstream_interval: 0s }}\nlimits:\n  per_connection: null\n  per_ip:\n    handshakes: {{ rate: 1/m, burst: 3 }}\n    connections: null\n  shared:\n    redis_url: redis://127.0.0.1:{redis_port}\n    prefix: it{redis_port}\n    timeout: 100ms\n    on_error: {on_error}\n"
    )
}

async fn status(addr: std::net::SocketAddr) -> u16 {
    Raw::upgrade(addr, "/", "").await.1.status
}

#[tokio::test]
async fn two_replicas_share_the_handshake_budget() {
    let port = free_port();
    let Some(_redis) = Redis::start(port).await else {
        return;
    };
    let backend = echo_backend().await;
    let a = proxy(backend, &shared_policy(port, "local")).await;
    let b = proxy(backend, &shared_policy(port, "local")).await;
    // Burst 3 across both replicas together, not 3 each.
    let seen = [
        status(a.addr).await,
        status(b.addr).await,
        status(a.addr).await,
        status(b.addr).await,
        status(a.addr).await,
    ];
    assert_eq!(seen, [101, 101, 101, 429, 429]);
    let (_r, h) = Raw::upgrade(b.addr, "/", "").await;
    let retry: u64 = h.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
}

#[tokio::test]
async fn redis_outage_follows_on_error_then_recovers() {
    let port = free_port();
    let Some(mut redis) = Redis::start(port).await else {
        return;
    };
    let backend = echo_backend().await;
    let local = proxy(backend, &shared_policy(port, "local")).await;
    let allow = proxy(backend, &shared_policy(port, "allow")).await;
    let deny = proxy(backend, &shared_policy(port, "deny")).await;
    assert_eq!(status(deny.addr).await, 101);
    redis.kill();
    // deny: 503 with Retry-After, fast.
    let t = std::time::Instant::now();
    let (_r, h) = Raw::upgrade(deny.addr, "/", "").await;
    assert_eq!(h.status, 503);
    assert!(h.header("retry-after").is_some());
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // allow: everything passes while Redis is down.
    for _ in 0..5 {
        assert_eq!(status(allow.addr).await, 101);
    }
    // local: this replica's own bucket (burst 3) takes over.
    let seen: Vec<u16> = vec![
        status(local.addr).await,
        status(local.addr).await,
        status(local.addr).await,
        status(local.addr).await,
    ];
    assert_eq!(seen, vec![101, 101, 101, 429]);
    assert!(metric(&deny, "wsguard_shared_limiter_unavailable_total") >= 1.0);
    // Redis comes back empty (scripts lost): shared decisions resume.
    let _redis = Redis::start(redis.port).await.unwrap();
    let mut back = false;
    for _ in 0..100 {
        if status(deny.addr).await == 101 {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "did not recover after Redis restarted");
}
