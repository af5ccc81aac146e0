//! wsguard: a WebSocket hardening sidecar.
//!
//! The path of one connection:
//!
//! ```text
//! server (accept, TLS, hyper upgrade, the 101)
//!   -> handshake (validate the upgrade, build the upstream header set)
//!   -> admission (one ordered list of checks over the handshake, cheap
//!      first; report mode handled once) calling
//!      guard::{limits, origin, jwt, introspect, redis_limits, breaker}
//!   -> upstream (dial, strict 101 check)
//!   -> session (the frame engine: relay, sign, limits, keepalive; `frame`
//!      is its RFC 6455 codec, `compression` its permessage-deflate:
//!      negotiation per hop, capped inflate, deflate)
//!   -> close
//! ```
//!
//! Beside it:
//! - `config` (the raw YAML: `config::parse` reads it, every structural
//!   problem at its position) -> `policy` (validated at load by
//!   `policy::check`, printed back by `policy::show`; every other module
//!   reads this) -> `values` (durations, sizes, rates, CIDRs, breaker
//!   settings: a leaf that `policy` and the guards both import);
//! - `state`: the process-wide state ([`state::Process`]) and the
//!   hot-swappable policy generation ([`state::Generation`]);
//!   `reload` swaps it, `admin` serves health and metrics, `metrics` counts;
//! - `error` (why a handshake was refused), `reject_log` (one line per
//!   refusal, rate-limited), `logging`, `files` (bounded reads of the files
//!   a policy names), `tls` (certificates and rustls configs), `sign` (the
//!   wsg1 message signature), `demo` (`wsguard demo`);
//! - `fuzzing` (feature `fuzzing`): entry points for fuzz/ and the corpus
//!   replay test.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod admin;
pub mod admission;
pub mod compression;
pub mod config;
pub mod demo;
pub mod error;
pub mod files;
pub mod frame;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod guard;
pub mod handshake;
pub mod keepalive;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod reject_log;
pub mod reload;
pub mod server;
pub mod session;
pub mod sign;
pub mod state;
pub mod tls;
pub mod upstream;
pub mod values;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::policy::Policy;
use crate::state::Process;

/// A running proxy: its bound addresses and its process-wide state.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub process: Arc<Process>,
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
    let process = Process::new(policy);
    let admin = tokio::spawn(admin::run(admin_listener, Arc::clone(&process)));
    let accept = tokio::spawn(server::run(listener, Arc::clone(&process)));
    Ok(Running {
        addr,
        admin_addr,
        process,
        accept,
        admin,
    })
}

impl Running {
    /// Stops accepting, closes every live session with 1001 on both sides
    /// and waits up to `grace` for them to finish. Returns true when every
    /// session finished in time.
    pub async fn shutdown(self, grace: Duration) -> bool {
        self.process
            .ready
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.process.shutdown.cancel();
        let _ = self.accept.await;
        self.process.tracker.close();
        let clean = tokio::time::timeout(grace, self.process.tracker.wait())
            .await
            .is_ok();
        self.admin.abort();
        clean
    }
}
