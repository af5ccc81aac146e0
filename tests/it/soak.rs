//! Reload storm (issue 7), run with:
//!   cargo test --release --test it soak -- --ignored --nocapture
//! 500 sessions (SOAK_SESSIONS) stream sequence-numbered messages (10/s each) through the real binary
//! while it gets 100 SIGHUPs alternating valid and invalid policy files.
//! Afterwards: zero sessions dropped, zero messages lost or reordered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;
use crate::process::{policy_file, Proc, ANY_PORTS};

const SESSIONS_DEFAULT: usize = 500;
const RELOADS_DEFAULT: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak test: run explicitly (see the module doc)"]
async fn reload_storm_drops_nothing() {
    let sessions_n: usize = std::env::var("SOAK_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SESSIONS_DEFAULT);
    let reloads: usize = std::env::var("SOAK_RELOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(RELOADS_DEFAULT);
    // The echo backend runs in its own process (the demo's), so this test
    // process only hosts the 500 clients.
    let mut demo = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsguard"))
        .args(["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let backend = {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(demo.stdout.take().unwrap()).lines();
        let line = within("demo backend", lines.next_line())
            .await
            .unwrap()
            .unwrap();
        let url = line.rsplit(' ').next().unwrap().to_string();
        url.trim_start_matches("ws://").to_string()
    };
    let base = format!(
        "{ANY_PORTS}upstream: {{ url: \"ws://{backend}\" }}\nlog: {{ level: info }}\nlimits:\n  per_ip: null\n  per_connection: null\n"
    );
    let valid = |i: usize| format!("{base}  max_connections: {}\n", 1000 + i);
    let invalid = format!("{base}  max_conections: 1\n");
    let f = policy_file("soak", &valid(0));
    let mut p = Proc::spawn(&f);
    let (mut addr, admin) = p.listening().await;
    if std::env::var("SOAK_DIRECT").is_ok() {
        // Diagnostic: the same clients straight to the backend.
        addr = backend.parse().unwrap();
    }

    let stop = Arc::new(tokio::sync::Notify::new());
    let total = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(32));
    // Every session opens first; streaming starts once all are up.
    let all_open = Arc::new(tokio::sync::Barrier::new(sessions_n + 1));
    let mut sessions = Vec::new();
    for s in 0..sessions_n {
        let (stop, total, gate, all_open) = (
            Arc::clone(&stop),
            Arc::clone(&total),
            Arc::clone(&gate),
            Arc::clone(&all_open),
        );
        sessions.push(tokio::spawn(async move {
            let permit = gate.acquire().await.unwrap();
            let mut c = tokio::time::timeout(Duration::from_secs(30), ws(addr, &format!("/s{s}")))
                .await
                .map_err(|_| format!("session {s}: handshake timed out"))?;
            drop(permit);
            all_open.wait().await;
            let stopped = stop.notified();
            tokio::pin!(stopped);
            let mut seq = 0u64;
            // A steady stream (10 messages/s per session, 5,000/s in all)
            // rather than a closed loop: the test process also runs the
            // echo backend and 500 clients, and must not starve itself.
            let mut pace = tokio::time::interval(Duration::from_millis(100));
            loop {
                pace.tick().await;
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
    tokio::time::timeout(Duration::from_secs(120), all_open.wait())
        .await
        .expect("sessions opened");
    // Wait until every session has echoed at least once.
    let started = Instant::now();
    while total.load(Ordering::Relaxed) < sessions_n as u64 * 2 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "sessions did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let storm = Instant::now();
    for i in 0..reloads {
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
        admin,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let metrics = r.body().await;
    assert!(
        metrics.contains(&format!(
            "wsguard_reloads_total{{result=\"ok\"}} {}",
            reloads / 2
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "wsguard_reloads_total{{result=\"error\"}} {}",
            reloads / 2
        )),
        "{metrics}"
    );
    println!(
        "reload storm: {sessions_n} sessions, {reloads} SIGHUPs in {:.2?}, {} messages echoed in order, min/max per session {}/{}, 0 dropped",
        storm,
        total.load(Ordering::Relaxed),
        per_session.iter().min().unwrap(),
        per_session.iter().max().unwrap()
    );
    p.signal("TERM");
    assert_eq!(p.exit_code().await, Some(0));
}
