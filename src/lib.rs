//! wsguard: a WebSocket hardening sidecar.
//!
//! The path of one connection is a straight line through the modules:
//!
//! ```text
//! server (accept, hyper upgrade) -> handshake (validate, headers)
//!   -> guard::{limits, breaker} -> upstream (dial, strict 101 check)
//!   -> session (two pumps: sign, limits; keepalive) -> close
//! ```
//!
//! `config` is the raw YAML, `policy` the validated form every other module
//! reads; `runtime` holds the hot-swappable policy and process-wide state.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod admin;
pub mod compression;
pub mod config;
pub mod demo;
pub mod error;
pub mod files;
pub mod fuzzing;
pub mod gate;
pub mod guard;
pub mod handshake;
pub mod keepalive;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod pongs;
pub mod reject_log;
pub mod reload;
pub mod runtime;
pub mod server;
pub mod session;
pub mod sign;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::policy::Policy;
use crate::runtime::Shared;

/// A running proxy: its bound addresses and its shared state.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub shared: Arc<Shared>,
    accept: JoinHandle<()>,
    admin: JoinHandle<()>,
}

/// Binds the proxy and admin listeners of `policy` and starts serving.
/// Tests pass `127.0.0.1:0` addresses and read the real ones back.
pub async fn start(policy: Policy) -> std::io::Result<Running> {
    tls::install_provider();
    // The error names the address, so that "address in use" says which.
    let bind = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot bind {what} {addr}: {e}")))
    };
    let listener = bind(policy.listen, "the listen address").await?;
    let admin_listener = bind(policy.admin_listen, "the admin address").await?;
    let addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let shared = Shared::new(policy);
    let admin = tokio::spawn(admin::run(admin_listener, Arc::clone(&shared)));
    let accept = tokio::spawn(server::run(listener, Arc::clone(&shared)));
    Ok(Running {
        addr,
        admin_addr,
        shared,
        accept,
        admin,
    })
}

impl Running {
    /// Stops accepting, closes every live session with 1001 on both sides
    /// and waits up to `grace` for them to finish. Returns true when every
    /// session finished in time.
    pub async fn shutdown(self, grace: Duration) -> bool {
        self.shared
            .ready
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.shared.shutdown.cancel();
        let _ = self.accept.await;
        self.shared.tracker.close();
        let clean = tokio::time::timeout(grace, self.shared.tracker.wait())
            .await
            .is_ok();
        self.admin.abort();
        clean
    }
}
