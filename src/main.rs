//! The `wsguard` command line (contract section 1).
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine as _;
use clap::{Args, Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncBufReadExt;
use tokio::signal::unix::{signal, SignalKind};
use wsguard::config::LogFormat;
use wsguard::policy::Policy;
use wsguard::sign::{self, Direction, Key, MsgType, SeqState};
use wsguard::values::parse_duration;

#[derive(Parser)]
#[command(
    name = "wsguard",
    version,
    about = "A WebSocket hardening sidecar proxy"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy until SIGTERM/SIGINT (SIGHUP reloads the policy).
    Run {
        /// The policy file.
        #[arg(short, long)]
        config: PathBuf,
        /// Also reload the policy whenever the file's content changes, as on
        /// SIGHUP. Follows symlinks, so a Kubernetes ConfigMap update (an
        /// atomic swap of its ..data symlink) is picked up without a signal.
        #[arg(long)]
        watch: bool,
        /// How often --watch reads the file (e.g. 2s, 500ms).
        #[arg(long, default_value = "2s", value_name = "DUR", requires = "watch")]
        watch_interval: String,
    },
    /// Validate a policy file.
    Check {
        /// The policy file.
        #[arg(short, long)]
        config: PathBuf,
        /// Also print the effective policy of every route.
        #[arg(long)]
        explain: bool,
    },
    /// Start a built-in echo backend with wsguard in front of it.
    Demo {
        /// Where the demo proxy listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where the admin endpoints (/metrics, /healthz, /readyz) listen.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
        /// Where the demo page is served (an origin the demo policy allows).
        #[arg(long, default_value = "127.0.0.1:8000")]
        page: SocketAddr,
    },
    /// Sign a payload read on stdin; write the signed message (wire format
    /// v1: `wsg1.<kid>.<seq>.<ts>.<sig>` newline payload) to stdout.
    Sign {
        #[command(flatten)]
        key: KeyArgs,
        /// Key id written into the envelope: the `id` the verifier knows the
        /// key by (hmac.client_keys[].id or hmac.upstream_key.id).
        #[arg(long, value_name = "KID")]
        kid: String,
        /// Direction: c2s (client to backend) or s2c (backend to client).
        /// Part of what is signed, so a message cannot be reflected back.
        #[arg(long, value_name = "c2s|s2c")]
        dir: Direction,
        /// Sequence number, above 0 and strictly increasing per connection
        /// and direction (gaps allowed).
        #[arg(long, value_name = "N")]
        seq: u64,
        /// Timestamp in Unix milliseconds; defaults to now.
        #[arg(long, value_name = "MS")]
        ts: Option<u64>,
        /// Bound value: the string value of the JWT claim named by
        /// hmac.bind_claim (e.g. the token's sub); empty when not bound.
        #[arg(long, value_name = "V", default_value = "")]
        bind: String,
        /// Sign a binary message (the payload is raw bytes); the default is
        /// a text message, whose payload must be UTF-8.
        #[arg(long)]
        binary: bool,
        /// Sign with the key derived from the secret for this claim value
        /// (a client key with `derive: CLAIM`).
        #[arg(long, value_name = "V")]
        derive_claim_value: Option<String>,
    },
    /// Verify a signed message read on stdin; print its payload on stdout
    /// and exit 0, or print the reason on stderr and exit 1.
    Verify {
        #[command(flatten)]
        key: KeyArgs,
        /// Direction the message was signed for: c2s or s2c.
        #[arg(long, value_name = "c2s|s2c")]
        dir: Direction,
        /// Bound value the signer used (see sign --bind); empty when not bound.
        #[arg(long, value_name = "V", default_value = "")]
        bind: String,
        /// The message is binary (the default is text).
        #[arg(long)]
        binary: bool,
        /// Also check the timestamp against now, allowing this much clock
        /// difference (e.g. 30s); without it the timestamp is not checked.
        #[arg(long, value_name = "DUR")]
        max_skew: Option<String>,
        /// Verify with the key derived from the secret for this claim value
        /// (a client key with `derive: CLAIM`).
        #[arg(long, value_name = "V")]
        derive_claim_value: Option<String>,
    },
    /// Print, in base64, the client key derived from a secret for one
    /// token claim value (a client key with `derive: CLAIM`), for the
    /// service that issues tokens to hand to its client.
    DeriveKey {
        #[command(flatten)]
        key: KeyArgs,
        #[arg(long)]
        claim_value: String,
    },
    /// A tiny interactive client: sends each stdin line as a text message
    /// and prints what comes back.
    Connect {
        /// ws:// URL to connect to, e.g. ws://127.0.0.1:8080/
        url: String,
    },
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct KeyArgs {
    /// Environment variable holding the HMAC key (base64, at least 32 bytes).
    #[arg(long, value_name = "NAME")]
    key_env: Option<String>,
    /// File holding the HMAC key (base64, at least 32 bytes).
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors.
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.cmd {
        Cmd::Check { config, explain } => check(&config, explain),
        Cmd::Run {
            config,
            watch,
            watch_interval,
        } => match Policy::load(&config) {
            Ok(p) => {
                let every = match parse_duration(&watch_interval) {
                    Ok(d) if watch && d < Duration::from_millis(10) => {
                        eprintln!("wsguard: --watch-interval must be at least 10ms");
                        return ExitCode::from(1);
                    }
                    Ok(d) => watch.then_some(d),
                    Err(e) => {
                        eprintln!("wsguard: --watch-interval: {e}");
                        return ExitCode::from(1);
                    }
                };
                runtime(|| run(p, Some(config), every))
            }
            Err(problems) => {
                eprintln!("{problems}");
                ExitCode::from(1)
            }
        },
        Cmd::Demo {
            listen,
            admin,
            page,
        } => runtime(|| demo(listen, admin, page)),
        Cmd::Sign {
            key,
            kid,
            dir,
            seq,
            ts,
            bind,
            binary,
            derive_claim_value,
        } => sign_cmd(
            &key,
            &kid,
            derive_claim_value.as_deref(),
            dir,
            seq,
            ts,
            &bind,
            binary,
        ),
        Cmd::Verify {
            key,
            dir,
            bind,
            binary,
            max_skew,
            derive_claim_value,
        } => verify_cmd(
            &key,
            derive_claim_value.as_deref(),
            dir,
            &bind,
            binary,
            max_skew.as_deref(),
        ),
        Cmd::DeriveKey { key, claim_value } => derive_key_cmd(&key, &claim_value),
        Cmd::Connect { url } => runtime(|| connect(url)),
    }
}

fn runtime<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ExitCode>,
{
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f()),
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            ExitCode::from(2)
        }
    }
}

fn check(path: &Path, explain: bool) -> ExitCode {
    match Policy::load(path) {
        Ok(p) => {
            println!("{}: {}", path.display(), p.summary());
            if explain {
                print!("{}", p.explain());
            }
            ExitCode::SUCCESS
        }
        Err(problems) => {
            println!("{problems}");
            ExitCode::from(1)
        }
    }
}

/// Logs go to stderr through a bounded in-memory queue drained by its own
/// thread: a slow or stalled log reader (a blocked container log driver, a
/// full pipe) must never stall the proxy's data path. When the queue is
/// full, lines are dropped (and the count of dropped lines is reported by
/// the writer) instead of blocking. The guard flushes the queue at exit.
fn init_logs(format: LogFormat, level: &str) -> tracing_appender::non_blocking::WorkerGuard {
    // The WebSocket library is capped at info: below, it logs payloads.
    let filter = wsguard::logging::filter(std::env::var("WSGUARD_LOG").ok().as_deref(), level);
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(64 * 1024)
        .lossy(true)
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    guard
}

async fn run(policy: Policy, config: Option<PathBuf>, watch: Option<Duration>) -> ExitCode {
    let _logs = init_logs(policy.log_format, &policy.log_level);
    let running = match wsguard::start(policy).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot bind");
            eprintln!("wsguard: {e}");
            return ExitCode::from(2);
        }
    };
    serve(running, config, watch).await
}

/// Runs a started proxy until SIGTERM/SIGINT, reloading on SIGHUP (and on
/// file changes with `watch`), then drains it.
async fn serve(
    running: wsguard::Running,
    config: Option<PathBuf>,
    watch: Option<Duration>,
) -> ExitCode {
    let grace = running.process.current().policy.shutdown_grace;
    tracing::info!(listen = %running.addr, admin = %running.admin_addr, "wsguard listening");
    if let (Some(every), Some(path)) = (watch, &config) {
        tracing::info!(file = %path.display(), ?every, "watching the policy file");
        drop(wsguard::reload::spawn_watch(
            std::sync::Arc::clone(&running.process),
            path.clone(),
            every,
        ));
    }
    let (Ok(mut hup), Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("wsguard: cannot install signal handlers");
        return ExitCode::from(2);
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {
                if let Some(path) = &config {
                    // Signals arriving while this runs are coalesced by the
                    // signal stream into one pending wake-up.
                    wsguard::reload::reload(&running.process, path);
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // /readyz turns 503 first; the listener keeps accepting for
    // shutdown_delay so load balancers stop sending before it closes.
    running
        .process
        .ready
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let delay = running.process.current().policy.shutdown_delay;
    if !delay.is_zero() {
        tracing::info!(
            ?delay,
            "not ready; draining new connections before closing the listener"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    tracing::info!(live = running.process.counts.total(), "shutting down");
    let clean = running.shutdown(grace).await;
    tracing::info!(clean, "stopped");
    ExitCode::SUCCESS
}

async fn demo(listen: SocketAddr, admin: SocketAddr, page: SocketAddr) -> ExitCode {
    let demo = match wsguard::demo::prepare(listen, admin, page).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("wsguard demo: {e}");
            return ExitCode::from(2);
        }
    };
    let wsguard::demo::Demo {
        policy,
        page,
        page_addr,
        token,
        client_key,
        secret: _secret,
    } = demo;
    let _logs = init_logs(policy.log_format, &policy.log_level);
    let backend = policy.default_route.upstream.url.clone();
    // Bind first: the banner promises addresses that already accept.
    let running = match wsguard::start(policy).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wsguard demo: {e}");
            return ExitCode::from(2);
        }
    };
    let (listen, admin) = (running.addr, running.admin_addr);
    let (tx, mut reports) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(wsguard::demo::serve_page(
        page,
        wsguard::demo::page_html(listen, &token, &client_key),
        tx,
    ));
    tokio::spawn(async move {
        while let Some(r) = reports.recv().await {
            println!("wsguard demo: the page reports: {r}");
        }
    });
    let exe = std::env::args().next().unwrap_or_else(|| "wsguard".into());
    let secure = wsguard::demo::SECURE_PATH;
    println!("wsguard demo: echo backend on {backend}");
    println!("wsguard demo: proxy on ws://{listen}/  (admin: http://{admin}/metrics)");
    println!("wsguard demo: open http://{page_addr}/ in a browser: the page connects to");
    println!("              ws://{listen}{secure} (origin, token and message signatures enforced;");
    println!(
        "              token in a subprotocol, messages signed with SubtleCrypto HMAC-SHA256)"
    );
    println!("try it:  echo hello | {exe} connect ws://{listen}/");
    println!("         (or: cargo run -- connect ws://{listen}/ and type lines)");
    println!("Ctrl-C stops it.");
    let _ = std::io::stdout().flush();
    serve(running, None, None).await
}

/// The key to sign or verify with: the secret itself, or the key derived
/// from it for `derive` (a claim value).
fn read_key(k: &KeyArgs, kid: &str, derive: Option<&str>) -> Result<Key, String> {
    let text = read_key_text(k)?;
    match derive {
        None => Key::from_base64(kid, &text),
        Some(value) => sign::DerivingKey::new(kid, &sign::decode_secret(kid, &text)?, "cli")?
            .derive(value)
            .ok_or_else(|| "--derive-claim-value must not be empty".to_string()),
    }
}

fn derive_key_cmd(k: &KeyArgs, claim_value: &str) -> ExitCode {
    let result = (|| {
        if claim_value.is_empty() {
            return Err("--claim-value must not be empty".to_string());
        }
        let secret = sign::decode_secret("key", &read_key_text(k)?)?;
        if secret.len() < sign::MIN_KEY_LEN {
            return Err(format!(
                "the secret is {} bytes, at least {} are required",
                secret.len(),
                sign::MIN_KEY_LEN
            ));
        }
        Ok(base64::engine::general_purpose::STANDARD
            .encode(sign::derive_secret(&secret, claim_value)))
    })();
    match result {
        Ok(b64) => {
            println!("{b64}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wsguard derive-key: {e}");
            ExitCode::from(1)
        }
    }
}

fn read_key_text(k: &KeyArgs) -> Result<String, String> {
    Ok(match (&k.key_env, &k.key_file) {
        (Some(env), _) => {
            std::env::var(env).map_err(|_| format!("environment variable {env} is not set"))?
        }
        (None, Some(path)) => {
            std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?
        }
        (None, None) => return Err("--key-env or --key-file is required".into()),
    })
}

fn stdin_bytes() -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    Ok(buf)
}

#[allow(clippy::too_many_arguments)]
fn sign_cmd(
    k: &KeyArgs,
    kid: &str,
    derive: Option<&str>,
    dir: Direction,
    seq: u64,
    ts: Option<u64>,
    bind: &str,
    binary: bool,
) -> ExitCode {
    let result = (|| {
        let key = read_key(k, kid, derive)?;
        if seq == 0 {
            return Err("--seq must be above 0".to_string());
        }
        let payload = stdin_bytes()?;
        let ty = if binary {
            MsgType::Binary
        } else {
            MsgType::Text
        };
        if ty == MsgType::Text && std::str::from_utf8(&payload).is_err() {
            return Err("a text payload must be UTF-8 (use --binary)".into());
        }
        Ok(sign::sign(
            &key,
            dir,
            seq,
            ts.unwrap_or_else(sign::now_ms),
            bind,
            ty,
            &payload,
        ))
    })();
    match result {
        Ok(out) => {
            let mut stdout = std::io::stdout();
            if stdout
                .write_all(&out)
                .and_then(|()| stdout.flush())
                .is_err()
            {
                return ExitCode::from(2);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wsguard sign: {e}");
            ExitCode::from(1)
        }
    }
}

fn verify_cmd(
    k: &KeyArgs,
    derive: Option<&str>,
    dir: Direction,
    bind: &str,
    binary: bool,
    max_skew: Option<&str>,
) -> ExitCode {
    let result = (|| {
        let msg = stdin_bytes()?;
        // The key id comes from the envelope; the key file holds one key.
        let kid = sign::parse(&msg)
            .map(|e| e.kid.to_string())
            .map_err(|f| f.label().to_string())?;
        let key = read_key(k, &kid, derive)?;
        let skew = match max_skew {
            Some(s) => u64::try_from(parse_duration(s)?.as_millis()).unwrap_or(u64::MAX),
            None => u64::MAX,
        };
        let ty = if binary {
            MsgType::Binary
        } else {
            MsgType::Text
        };
        let mut state = SeqState::default();
        sign::verify(
            std::slice::from_ref(&key),
            dir,
            bind,
            ty,
            &msg,
            sign::now_ms(),
            skew,
            &mut state,
        )
        .map(<[u8]>::to_vec)
        .map_err(|f| f.label().to_string())
    })();
    match result {
        Ok(payload) => {
            let mut stdout = std::io::stdout();
            if stdout
                .write_all(&payload)
                .and_then(|()| stdout.flush())
                .is_err()
            {
                return ExitCode::from(2);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wsguard verify: {e}");
            ExitCode::from(1)
        }
    }
}

async fn connect(url: String) -> ExitCode {
    let ws = match tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url.as_str()),
    )
    .await
    {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => {
            eprintln!("wsguard connect: {e}");
            return ExitCode::from(2);
        }
        Err(_) => {
            eprintln!("wsguard connect: timed out");
            return ExitCode::from(2);
        }
    };
    let (mut tx, mut rx) = ws.split();
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = rx.next().await {
            match m {
                tokio_tungstenite::tungstenite::Message::Text(t) => println!("< {t}"),
                tokio_tungstenite::tungstenite::Message::Binary(b) => {
                    println!("< ({} bytes)", b.len())
                }
                tokio_tungstenite::tungstenite::Message::Close(f) => {
                    println!("< close {f:?}");
                    break;
                }
                _ => {}
            }
        }
    });
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if tx.send(line.into()).await.is_err() {
            break;
        }
    }
    // stdin ended: give the echo a moment, then close politely.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = tx.close().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
    ExitCode::SUCCESS
}
