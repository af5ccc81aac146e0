//! Handshakes per second through wsguard (issues 3 and 6): N concurrent
//! clients each open a WebSocket (optionally with a bearer token), close
//! it, and repeat, for T seconds.
//!
//! `cargo run --release --example handshakes -- --url ws://127.0.0.1:8080/ --conns 32 --secs 10 [--hs-secret S | --rs-key PEM]`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[derive(clap::Parser)]
struct Args {
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 32)]
    conns: usize,
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Sign an HS256 token with this secret.
    #[arg(long)]
    hs_secret: Option<String>,
    /// Sign an RS256 token with this PEM private key file.
    #[arg(long)]
    rs_key: Option<String>,
    #[arg(long)]
    label: Option<String>,
}

#[tokio::main]
async fn main() {
    let args = <Args as clap::Parser>::parse();
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 3600;
    let claims = serde_json::json!({ "sub": "bench", "exp": exp });
    let token = match (&args.hs_secret, &args.rs_key) {
        (Some(s), _) => Some(
            encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(s.as_bytes()),
            )
            .expect("hs token"),
        ),
        (_, Some(k)) => {
            let pem = std::fs::read(k).expect("rsa key file");
            Some(
                encode(
                    &Header::new(Algorithm::RS256),
                    &claims,
                    &EncodingKey::from_rsa_pem(&pem).expect("rsa pem"),
                )
                .expect("rs token"),
            )
        }
        _ => None,
    };
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.secs);
    let mut tasks = Vec::new();
    for _ in 0..args.conns {
        let (url, token, ok, failed) = (
            args.url.clone(),
            token.clone(),
            Arc::clone(&ok),
            Arc::clone(&failed),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let mut req = url.as_str().into_client_request().expect("url");
                if let Some(t) = &token {
                    req.headers_mut().insert(
                        "authorization",
                        format!("Bearer {t}").parse().expect("header"),
                    );
                }
                match tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio_tungstenite::connect_async(req),
                )
                .await
                {
                    Ok(Ok((mut ws, _))) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        let _ = ws.close(None).await;
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let start = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    let secs = start.elapsed().as_secs_f64();
    let n = ok.load(Ordering::Relaxed);
    println!(
        "{}: {} handshakes in {:.1}s = {:.0}/s, {} failed ({} concurrent)",
        args.label.as_deref().unwrap_or("handshakes"),
        n,
        secs,
        n as f64 / secs,
        failed.load(Ordering::Relaxed),
        args.conns
    );
}
