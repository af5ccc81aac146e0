//! Issue 6: limits shared across replicas through a real redis-server.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;

struct Redis {
    child: Child,
    port: u16,
}

enum Started {
    Up(Redis),
    NotInstalled,
    PortTaken,
}

impl Redis {
    /// Starts a private redis-server on a port of its own; None (test
    /// skipped) only when the binary is absent — scripts/test.sh installs
    /// it. Redis cannot bind port 0 (that turns TCP off), so a random port
    /// is tried; if it is taken, another.
    async fn start() -> Option<Redis> {
        for _ in 0..20 {
            let port: u16 = 20_000 + rand::random::<u16>() % 30_000;
            match Redis::start_on(port).await {
                Started::Up(r) => return Some(r),
                Started::NotInstalled => return None,
                Started::PortTaken => continue,
            }
        }
        panic!("could not start redis-server");
    }

    /// Starts on `port` and waits for the server's own "Ready to accept
    /// connections" line: an answer on the port could come from someone
    /// else's server; this line comes from ours.
    async fn start_on(port: u16) -> Started {
        let mut child = match Command::new("redis-server")
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
            .stdout(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(_) => {
                eprintln!("redis-server not installed: shared-limit test skipped (scripts/test.sh installs it)");
                return Started::NotInstalled;
            }
        };
        let stdout = child.stdout.take().unwrap();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        // Reads until the ready line (or the end), then keeps draining so
        // the server never blocks on a full pipe.
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut ready_tx = Some(ready_tx);
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("Ready to accept connections") {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        let r = Redis { child, port };
        // An error: it exited before accepting (the port was taken).
        match within("redis up", ready).await {
            Ok(()) => Started::Up(r),
            Err(_) => Started::PortTaken,
        }
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
    let Some(_redis) = Redis::start().await else {
        return;
    };
    let port = _redis.port;
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
    let Some(mut redis) = Redis::start().await else {
        return;
    };
    let port = redis.port;
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
    let Started::Up(_redis) = Redis::start_on(redis.port).await else {
        panic!("redis did not restart on its port");
    };
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

// ------------------------------------------------------------------
// Issues 11 and 14: leases, Sentinel, Cluster, the shared breaker.

use std::path::PathBuf;
use std::time::Instant;

use futures_util::StreamExt;
use wsguard::guard::redis_limits::{Decision, RedisTarget, SharedLimiter, SharedSettings};

/// A redis-server (data node or sentinel) on a port of its own; killed by
/// PID on drop. Ports are tried at random and a collision is retried (the
/// server exits when its port is taken), never bound and dropped.
struct Node {
    child: Child,
    port: u16,
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "wsguard-it-redis-{name}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn have_redis() -> bool {
    let ok = Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok()
        && Command::new("redis-cli").arg("--version").output().is_ok();
    if !ok {
        eprintln!(
            "redis-server/redis-cli not installed: test skipped (scripts/test.sh installs them)"
        );
    }
    ok
}

/// One Redis command through redis-cli (test set-up only).
fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Polls `f` every 50 ms until it is true; panics after `limit`.
async fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Node {
    /// `config` is written to a file (a sentinel needs one it may rewrite)
    /// with `port N` prepended; `sentinel` starts it in sentinel mode.
    async fn start(dir: &std::path::Path, config: &str, sentinel: bool) -> Node {
        for _ in 0..20 {
            // Cluster bus ports are port + 10000.
            let port: u16 = 20_000 + rand::random::<u16>() % 30_000;
            let file = dir.join(format!("{port}.conf"));
            std::fs::write(
                &file,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nsave \"\"\nappendonly no\n{config}",
                    dir.display()
                ),
            )
            .unwrap();
            let mut cmd = Command::new("redis-server");
            cmd.arg(&file);
            if sentinel {
                cmd.arg("--sentinel");
            }
            let mut child = cmd.stdout(Stdio::null()).spawn().unwrap();
            let t = Instant::now();
            loop {
                if cli(port, &["PING"]).trim() == "PONG" {
                    return Node { child, port };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break; // most likely the port was taken: another one
                }
                if t.elapsed() > Duration::from_secs(10) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("could not start redis-server");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A 3-master Redis Cluster, no replicas.
async fn cluster() -> (Vec<Node>, PathBuf) {
    cluster_with(0).await
}

/// A 3-master Redis Cluster with `replicas` replicas per master.
async fn cluster_with(replicas: usize) -> (Vec<Node>, PathBuf) {
    let dir = scratch("cluster");
    let mut nodes = Vec::new();
    for _ in 0..3 * (1 + replicas) {
        nodes.push(
            Node::start(
                &dir,
                &format!(
                    "cluster-enabled yes\ncluster-config-file nodes-{}.conf\ncluster-node-timeout 2000\n",
                    rand::random::<u32>()
                ),
                false,
            )
            .await,
        );
    }
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let out = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cluster create: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    for n in &nodes {
        until("cluster_state:ok", Duration::from_secs(20), || {
            cli(n.port, &["CLUSTER", "INFO"]).contains("cluster_state:ok")
        })
        .await;
    }
    for n in &nodes {
        until("every replica in sync", Duration::from_secs(20), || {
            let info = cli(n.port, &["INFO", "replication"]);
            info.contains("role:master") || info.contains("master_link_status:up")
        })
        .await;
    }
    (nodes, dir)
}

fn limiter_for(target: RedisTarget, prefix: &str) -> std::sync::Arc<SharedLimiter> {
    std::sync::Arc::new(
        SharedLimiter::new(SharedSettings {
            target,
            prefix: prefix.to_string(),
            timeout: Duration::from_millis(200),
            on_error: wsguard::config::OnError::Local,
        })
        .unwrap(),
    )
}

fn rate(count: u32, per_s: u64, burst: u32) -> wsguard::policy::Rate {
    use std::num::NonZeroU32;
    wsguard::policy::Rate {
        count: NonZeroU32::new(count).unwrap(),
        per: Duration::from_secs(per_s),
        burst: NonZeroU32::new(burst).unwrap(),
    }
}

/// First calls dial (a cluster learns its slot map): wait for a real answer.
async fn reachable(l: &SharedLimiter) {
    let t = Instant::now();
    while l.check("warmup", &rate(1_000_000, 1, 1_000_000)).await != Decision::Allow {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "limiter never reached redis"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ha_policy(shared: &str, on_error: &str, prefix: &str) -> String {
    format!(
        "keepalive: {{ interval: 0s, upstream_interval: 0s }}\nlimits:\n  per_connection: null\n  per_ip:\n    handshakes: {{ rate: 1/m, burst: 3 }}\n    connections: null\n  shared:\n{shared}    prefix: {prefix}\n    timeout: 200ms\n    on_error: {on_error}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_shares_limits_across_replicas() {
    if !have_redis() {
        return;
    }
    let (nodes, _dir) = cluster().await;
    let urls: Vec<String> = nodes.iter().map(Node::url).collect();
    let backend = echo_backend().await;
    // Seeded with one live node each: the rest of the cluster is
    // discovered. b's first seed refuses connections (a node that is down):
    // it is skipped, which is why the README says to list several seeds.
    let down = dead_port().await;
    let a = proxy(
        backend,
        &ha_policy(&format!("    cluster: [{}]\n", urls[0]), "deny", "c1"),
    )
    .await;
    let b = proxy(
        backend,
        &ha_policy(
            &format!("    cluster: [redis://{down}/, {}]\n", urls[2]),
            "deny",
            "c1",
        ),
    )
    .await;
    // The first calls dial; on_error deny answers 503 until then.
    let t = Instant::now();
    loop {
        match status(a.addr).await {
            101 => break,
            503 => {}
            s => panic!("{s}"),
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "cluster never reached"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = Instant::now();
    let mut seen = vec![101];
    while seen.len() < 5 {
        match status(if seen.len() % 2 == 1 { b.addr } else { a.addr }).await {
            503 if seen.len() == 1 => {
                assert!(
                    t.elapsed() < Duration::from_secs(15),
                    "b never reached the cluster"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            s => seen.push(s),
        }
    }
    assert_eq!(seen, [101, 101, 101, 429, 429], "burst 3 across both");

    // The scripts, unchanged, on keys spread over the three masters.
    let l = limiter_for(RedisTarget::Cluster(urls.clone()), "c2");
    reachable(&l).await;
    let r = rate(1, 60, 2);
    let mut keys = Vec::new();
    for i in 0..30 {
        let k = format!("hs:/:10.0.0.{i}");
        assert_eq!(l.check(&k, &r).await, Decision::Allow);
        assert_eq!(l.check(&k, &r).await, Decision::Allow);
        assert!(matches!(l.check(&k, &r).await, Decision::Deny { .. }));
        keys.push(k);
    }
    let holding = nodes
        .iter()
        .filter(|n| cli(n.port, &["DBSIZE"]).trim().parse::<u64>().unwrap_or(0) > 0)
        .count();
    assert_eq!(holding, 3, "keys on every master");
    // Leases: a cap of 2, shared by two limiters on the cluster.
    let l2 = limiter_for(RedisTarget::Cluster(vec![urls[1].clone()]), "c2");
    reachable(&l2).await;
    let g1 = l.acquire_slot_guard("conn:sub:zoe", 2).await.unwrap();
    let g2 = l2.acquire_slot_guard("conn:sub:zoe", 2).await.unwrap();
    assert!(matches!(
        l.acquire_slot_guard("conn:sub:zoe", 2).await.err(),
        Some(Decision::Deny { .. })
    ));
    g1.release().await;
    g2.release().await;
    assert!(l2.acquire_slot_guard("conn:sub:zoe", 2).await.is_ok());
}

/// Issue 14: a Cluster failover (the master holding the bucket is stopped,
/// its replica promoted) is survived with `on_error: local`: meanwhile each
/// replica applies its own bucket (101s although the shared one is empty,
/// never a 5xx), and afterwards both proxies are back on the cluster by
/// themselves, on the replicated bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_follows_on_error_local_then_recovers() {
    if !have_redis() {
        return;
    }
    let (mut nodes, _dir) = cluster_with(1).await;
    let urls: Vec<String> = nodes.iter().map(Node::url).collect();
    // Seeded with every node, as an operator should: a dead seed is skipped.
    let seeds = format!("    cluster: [{}]\n", urls.join(", "));
    let backend = echo_backend().await;
    let a = proxy(backend, &ha_policy(&seeds, "local", "cf")).await;
    let b = proxy(backend, &ha_policy(&seeds, "local", "cf")).await;
    for p in [&a, &b] {
        reachable(p.process.current().shared_limiter.as_ref().unwrap()).await;
    }
    let unavailable = |p: &wsguard::Running| metric(p, "wsguard_shared_limiter_unavailable_total");
    let before = (unavailable(&a), unavailable(&b));
    let seen = [
        status(a.addr).await,
        status(b.addr).await,
        status(a.addr).await,
        status(b.addr).await,
        status(a.addr).await,
    ];
    assert_eq!(seen, [101, 101, 101, 429, 429], "burst 3 across both");
    assert_eq!((unavailable(&a), unavailable(&b)), before);

    // The master that holds the bucket, once its replica has it too.
    let key = "cf:hs:/:127.0.0.1";
    let master = nodes
        .iter()
        .position(|n| {
            cli(n.port, &["ROLE"]).starts_with("master")
                && cli(n.port, &["EXISTS", key]).trim() == "1"
        })
        .expect("a master holds the bucket");
    assert_eq!(cli(nodes[master].port, &["WAIT", "1", "5000"]).trim(), "1");
    let id = cli(nodes[master].port, &["CLUSTER", "MYID"])
        .trim()
        .to_string();
    let replica = nodes
        .iter()
        .position(|n| {
            cli(n.port, &["CLUSTER", "MYID"]).trim() != id
                && cli(n.port, &["INFO", "replication"])
                    .contains(&format!("master_port:{}", nodes[master].port))
        })
        .expect("the master has a replica");
    nodes[master].kill();

    // During the failover: on_error local, never a 5xx.
    let t = Instant::now();
    let mut during = Vec::new();
    loop {
        for p in [&a, &b] {
            let s = status(p.addr).await;
            assert!(s == 101 || s == 429, "{s} during the failover");
            during.push(s);
        }
        let promoted = cli(nodes[replica].port, &["ROLE"]).starts_with("master")
            && cli(nodes[replica].port, &["CLUSTER", "INFO"]).contains("cluster_state:ok");
        if promoted {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no failover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "cluster failover after {:?}; statuses meanwhile: {during:?}",
        t.elapsed()
    );
    assert!(
        unavailable(&a) + unavailable(&b) > before.0 + before.1,
        "the outage was seen"
    );
    // The shared bucket is empty: only the replicas' own buckets let these in.
    assert!(during.contains(&101), "{during:?}");

    // Afterwards both proxies are back on the cluster by themselves: a
    // handshake no longer counts as unavailable, and the bucket (replicated
    // to the promoted node) still holds.
    for p in [&a, &b] {
        let t = Instant::now();
        loop {
            let before = unavailable(p);
            let s = status(p.addr).await;
            if unavailable(p) == before {
                assert_eq!(s, 429, "the replicated bucket is still empty");
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "proxy never recovered"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(cli(nodes[replica].port, &["EXISTS", key]).trim(), "1");
}

/// A primary, a replica and one sentinel watching them.
struct SentinelGroup {
    primary: Node,
    replica: Node,
    sentinel: Node,
    _dir: PathBuf,
}

async fn sentinel_group() -> SentinelGroup {
    let dir = scratch("sentinel");
    let primary = Node::start(&dir, "", false).await;
    let replica = Node::start(
        &dir,
        &format!("replicaof 127.0.0.1 {}\n", primary.port),
        false,
    )
    .await;
    until("the replica in sync", Duration::from_secs(20), || {
        cli(replica.port, &["INFO", "replication"]).contains("master_link_status:up")
    })
    .await;
    let sentinel = Node::start(
        &dir,
        &format!(
            "sentinel monitor wsg 127.0.0.1 {} 1\nsentinel down-after-milliseconds wsg 500\nsentinel failover-timeout wsg 3000\n",
            primary.port
        ),
        true,
    )
    .await;
    until(
        "the sentinel sees the replica",
        Duration::from_secs(20),
        || cli(sentinel.port, &["SENTINEL", "REPLICAS", "wsg"]).contains(&replica.port.to_string()),
    )
    .await;
    SentinelGroup {
        primary,
        replica,
        sentinel,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_shares_limits_and_survives_a_failover() {
    if !have_redis() {
        return;
    }
    let mut g = sentinel_group().await;
    let shared = format!(
        "    sentinel:\n      master: wsg\n      addresses: [{}]\n",
        g.sentinel.url()
    );
    let backend = echo_backend().await;
    let a = proxy(backend, &ha_policy(&shared, "local", "s1")).await;
    let b = proxy(backend, &ha_policy(&shared, "local", "s1")).await;
    for p in [&a, &b] {
        reachable(p.process.current().shared_limiter.as_ref().unwrap()).await;
    }
    let l = limiter_for(
        RedisTarget::Sentinel {
            master: "wsg".into(),
            addresses: vec![g.sentinel.url()],
            password: None,
        },
        "s2",
    );
    reachable(&l).await;
    // A handshake that Redis answered leaves the unavailable count alone.
    let unavailable = |p: &wsguard::Running| metric(p, "wsguard_shared_limiter_unavailable_total");
    let seen = [
        status(a.addr).await,
        status(b.addr).await,
        status(a.addr).await,
        status(b.addr).await,
        status(a.addr).await,
    ];
    // Through the sentinel: burst 3 across both.
    assert_eq!(seen, [101, 101, 101, 429, 429]);
    assert_eq!(
        cli(g.primary.port, &["EXISTS", "s1:hs:/:127.0.0.1"]).trim(),
        "1"
    );

    // Failover: the primary dies; the sentinel promotes the replica.
    g.primary.kill();
    let old = g.primary.port.to_string();
    let t = Instant::now();
    let mut statuses = Vec::new();
    loop {
        // Meanwhile every handshake gets an answer from on_error: local
        // (this replica's own bucket) or from Redis: 101 or 429, never 5xx.
        for p in [&a, &b] {
            let s = status(p.addr).await;
            assert!(s == 101 || s == 429, "{s} during the failover");
            statuses.push(s);
        }
        let master = cli(
            g.sentinel.port,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "wsg"],
        );
        if !master.contains(&old) && l.check("after", &rate(1, 60, 5)).await == Decision::Allow {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no failover: {master}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("failover followed after {:?}", t.elapsed());
    assert!(cli(g.replica.port, &["INFO", "replication"]).contains("role:master"));
    // Both proxies are back on Redis by themselves: handshakes stop
    // counting as unavailable, and the bucket (replicated) still holds.
    for p in [&a, &b] {
        let t = Instant::now();
        loop {
            let before = unavailable(p);
            let s = status(p.addr).await;
            if unavailable(p) == before {
                assert_eq!(s, 429, "the replicated bucket is still empty");
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "proxy never recovered"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(
        cli(g.replica.port, &["EXISTS", "s1:hs:/:127.0.0.1"]).trim(),
        "1"
    );
}

const SECRET: &str = "an-hs256-secret-that-is-at-least-32-bytes-long";

fn subject_token(sub: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({ "sub": sub, "exp": exp }),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Issue 11: a graceful shutdown releases every per-subject lease before
/// it returns.
#[tokio::test]
async fn shutdown_leaves_no_subject_count_in_redis() {
    let Some(_redis) = Redis::start().await else {
        return;
    };
    let port = _redis.port;
    let dir = scratch("jwt");
    let secret = dir.join("hs.secret");
    std::fs::write(&secret, SECRET).unwrap();
    let p = proxy(
        echo_backend().await,
        &format!(
            "jwt:\n  mode: enforce\n  algorithms: [HS256]\n  keys: [{{ secret_file: \"{}\" }}]\n  token_sources: [\"query:access_token\"]\nkeepalive: {{ interval: 0s, upstream_interval: 0s }}\nlimits:\n  per_ip: null\n  per_connection: null\n  per_subject: {{ connections: 5 }}\n  shared:\n    redis_url: redis://127.0.0.1:{port}\n    prefix: sd{port}\n    timeout: 500ms\n",
            secret.display()
        ),
    )
    .await;
    let key = format!("sd{port}:lease:conn:sub:ivy");
    let mut clients = Vec::new();
    for _ in 0..3 {
        let c = ws(p.addr, &format!("/?access_token={}", subject_token("ivy"))).await;
        // Read until the end, so the client answers wsguard's close.
        clients.push(tokio::spawn(async move {
            let mut c = c;
            while let Some(Ok(_)) = c.next().await {}
        }));
    }
    assert_eq!(cli(port, &["ZCARD", &key]).trim(), "3");
    assert!(p.shutdown(Duration::from_secs(5)).await, "clean shutdown");
    assert_eq!(cli(port, &["EXISTS", &key]).trim(), "0", "no lease left");
    for c in clients {
        within("client end", c).await.unwrap();
    }
}

/// Issue 14: two replicas, one failing backend: failures seen through one
/// open the other's circuit; the gauge shows the shared state.
#[tokio::test]
async fn shared_breaker_opens_on_every_replica() {
    let Some(mut redis) = Redis::start().await else {
        return;
    };
    let port = redis.port;
    let (dead, socket) = down_port();
    let policy = |prefix: &str| {
        format!(
            "keepalive: {{ interval: 0s, upstream_interval: 0s }}\nupstream:\n  url: \"ws://{dead}\"\n  connect_timeout: 1s\n  circuit_breaker: {{ consecutive_failures: 3, open_for: 2s, max_open_for: 8s, shared: true }}\nlimits:\n  per_ip: null\n  per_connection: null\n  shared:\n    redis_url: redis://127.0.0.1:{port}\n    prefix: {prefix}\n    timeout: 200ms\n"
        )
    };
    let a = proxy_yaml(&format!(
        "listen: \"127.0.0.1:0\"\nadmin: {{ listen: \"127.0.0.1:0\" }}\n{}",
        policy("cb")
    ))
    .await;
    let b = proxy_yaml(&format!(
        "listen: \"127.0.0.1:0\"\nadmin: {{ listen: \"127.0.0.1:0\" }}\n{}",
        policy("cb")
    ))
    .await;
    let c = proxy_yaml(&format!(
        "listen: \"127.0.0.1:0\"\nadmin: {{ listen: \"127.0.0.1:0\" }}\n{}",
        policy("cb")
    ))
    .await;
    let series = format!("wsguard_circuit_state{{upstream=\"ws://{dead}\"}}");
    // Three failures, all through a.
    for _ in 0..3 {
        assert_eq!(status(a.addr).await, 502);
    }
    assert_eq!(metric(&a, &series), 1.0);
    // A third replica's gauge follows the shared state without traffic.
    let t = Instant::now();
    while metric(&c, &series) != 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "c's gauge never showed open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // b never saw the backend fail, yet its circuit is open.
    let t = Instant::now();
    let (_r, h) = Raw::upgrade(b.addr, "/", "").await;
    assert_eq!(h.status, 503, "b's circuit is open");
    assert!(t.elapsed() < Duration::from_millis(500));
    assert!(h.header("retry-after").is_some());
    assert_eq!(metric(&b, &series), 1.0);
    assert_eq!(
        cli(port, &["HGET", &format!("cb:cb:ws://{dead}"), "open_for"]).trim(),
        "2000"
    );
    // After open_for one probe (through b) fails: open for twice as long,
    // for both.
    let t = Instant::now();
    loop {
        let s = status(b.addr).await;
        if s == 502 {
            break;
        }
        assert_eq!(s, 503);
        assert!(t.elapsed() < Duration::from_secs(10), "no probe");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status(a.addr).await, 503);
    assert_eq!(
        cli(port, &["HGET", &format!("cb:cb:ws://{dead}"), "open_for"]).trim(),
        "4000"
    );
    // The backend comes up; the next probe closes the circuit for both.
    let l = socket.listen(1024).unwrap();
    let up = tokio::spawn(wsguard::demo::echo_backend(l));
    let t = Instant::now();
    loop {
        let s = status(a.addr).await;
        if s == 101 {
            break;
        }
        assert_eq!(s, 503);
        assert!(t.elapsed() < Duration::from_secs(10), "never closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status(b.addr).await, 101);
    assert_eq!(metric(&b, &series), 0.0);
    assert_eq!(
        cli(port, &["EXISTS", &format!("cb:cb:ws://{dead}")]).trim(),
        "0"
    );

    // Redis gone: each replica falls back to its own breaker. The backend
    // fails again: a's failures open a's circuit only.
    redis.kill();
    assert_eq!(status(a.addr).await, 101);
    assert_eq!(status(b.addr).await, 101);
    up.abort();
    let _ = up.await;
    for _ in 0..3 {
        assert_eq!(status(a.addr).await, 502);
    }
    assert_eq!(status(a.addr).await, 503, "a's own breaker is open");
    assert_eq!(metric(&a, &series), 1.0);
    assert_eq!(status(b.addr).await, 502, "b decides alone");
    assert_eq!(metric(&b, &series), 0.0);
}
