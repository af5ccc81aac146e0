//! Reload storm (issue 7), run with:
//!   cargo test --release --test it soak -- --ignored --nocapture
//! 500 sessions stream sequence-numbered messages through the real binary
//! while it gets 100 SIGHUPs alternating valid and invalid policy files.
//! Afterwards: zero sessions dropped, zero messages lost or reordered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;
use crate::process::{free_port, policy_file, Proc};

const SESSIONS: usize = 500;
const RELOADS: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak test: run explicitly (see the module doc)"]
async fn reload_storm_drops_nothing() {
    let backend = echo_backend().await;
    let (port, admin) = (free_port(), free_port());
    let base = format!(
        "listen: \"127.0.0.1:{port}\"\nadmin: {{ listen: \"127.0.0.1:{admin}\" }}\nupstream: {{ url: \"ws://{backend}\" }}\nlog: {{ level: info }}\nlimits:\n  per_ip: null\n  per_connection: null\n"
    );
    let valid = |i: usize| format!("{base}  max_connections: {}\n", 1000 + i);
    let invalid = format!("{base}  max_conections: 1\n");
    let f = policy_file("soak", &valid(0));
    let mut p = Proc::spawn(&f);
    p.log_line("wsguard listening").await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let stop = Arc::new(tokio::sync::Notify::new());
    let total = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(32));
    let mut sessions = Vec::new();
    for s in 0..SESSIONS {
        let (stop, total, gate) = (Arc::clone(&stop), Arc::clone(&total), Arc::clone(&gate));
        sessions.push(tokio::spawn(async move {
            let permit = gate.acquire().await.unwrap();
            let mut c = ws(addr, &format!("/s{s}")).await;
            drop(permit);
            let stopped = stop.notified();
            tokio::pin!(stopped);
            let mut seq = 0u64;
            loop {
                seq += 1;
                let text = format!("{s}:{seq}");
                tokio::select! {
                    () = &mut stopped => break,
                    r = c.send(Message::text(text.clone())) => r.map_err(|e| format!("session {s}: send failed: {e}"))?,
                }
                let m = tokio::time::timeout(Duration::from_secs(10), c.next())
                    .await
                    .map_err(|_| format!("session {s}: echo {seq} timed out"))?;
                match m {
                    Some(Ok(Message::Text(t))) if t.as_str() == text => {}
                    other => return Err(format!("session {s}: expected {text}, got {other:?}")),
                }
                total.fetch_add(1, Ordering::Relaxed);
            }
            c.close(None).await.map_err(|e| format!("session {s}: close: {e}"))?;
            Ok::<u64, String>(seq - 1)
        }));
    }
    // Wait until every session has echoed at least once.
    let started = Instant::now();
    while total.load(Ordering::Relaxed) < SESSIONS as u64 * 2 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "sessions did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let storm = Instant::now();
    for i in 0..RELOADS {
        let ok = i % 2 == 0;
        std::fs::write(&f, if ok { valid(i + 1) } else { invalid.clone() }).unwrap();
        p.signal("HUP");
        p.log_line(if ok {
            "policy reloaded"
        } else {
            "reload refused"
        })
        .await;
    }
    let storm = storm.elapsed();
    stop.notify_waiters();
    let mut per_session = Vec::new();
    for s in sessions {
        per_session.push(s.await.unwrap().unwrap_or_else(|e| panic!("{e}")));
    }
    let (mut r, _) = Raw::request(
        format!("127.0.0.1:{admin}").parse().unwrap(),
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let metrics = r.body().await;
    assert!(
        metrics.contains(&format!(
            "wsguard_reloads_total{{result=\"ok\"}} {}",
            RELOADS / 2
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "wsguard_reloads_total{{result=\"error\"}} {}",
            RELOADS / 2
        )),
        "{metrics}"
    );
    println!(
        "reload storm: {SESSIONS} sessions, {RELOADS} SIGHUPs in {:.2?}, {} messages echoed in order, min/max per session {}/{}, 0 dropped",
        storm,
        total.load(Ordering::Relaxed),
        per_session.iter().min().unwrap(),
        per_session.iter().max().unwrap()
    );
    p.signal("TERM");
    assert_eq!(p.exit_code().await, Some(0));
}
