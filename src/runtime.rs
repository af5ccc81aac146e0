//! Process-wide state: the policy in force (hot-swappable), and what
//! outlives a policy generation (metrics, live-session counts, breakers,
//! the shutdown token and the task tracker).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::guard::breaker::Breaker;
use crate::guard::limits::{ConnCounts, HandshakeLimiter};
use crate::metrics::{Metrics, UpstreamLabel};
use crate::policy::{BreakerPolicy, Limits, Policy};

/// One policy generation plus what is derived from it. New handshakes load
/// the current one; a live session keeps the one it started with.
pub struct Runtime {
    pub policy: Policy,
    pub generation: u64,
    pub handshakes: Option<HandshakeLimiter>,
    pub breaker: Option<Arc<Breaker>>,
    pub ws_config: WebSocketConfig,
}

/// The explicit per-connection WebSocket configuration. tungstenite's
/// defaults (128 KiB read buffer, 64 MiB messages) would cost over 130 KiB
/// per idle session and let one client pin 64 MiB.
pub fn ws_config(l: &Limits) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(l.max_message_size.saturating_add(64 * 1024))
        .max_message_size(Some(l.max_message_size))
        .max_frame_size(Some(l.max_frame_size))
        .accept_unmasked_frames(false)
}

pub struct Shared {
    current: ArcSwap<Runtime>,
    pub metrics: Metrics,
    pub counts: Arc<ConnCounts>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    /// Breakers survive reloads while the upstream and its breaker settings
    /// are unchanged, so a reload cannot be used to reset an open circuit.
    breakers: Mutex<HashMap<(String, BreakerKey), Arc<Breaker>>>,
    pub ready: std::sync::atomic::AtomicBool,
}

type BreakerKey = (u32, u128, u128, u32);

fn breaker_key(b: &BreakerPolicy) -> BreakerKey {
    (
        b.consecutive_failures,
        b.open_for.as_nanos(),
        b.max_open_for.as_nanos(),
        b.half_open_probes,
    )
}

impl Shared {
    pub fn new(policy: Policy) -> Arc<Shared> {
        let metrics = Metrics::new();
        let placeholder = Runtime {
            ws_config: ws_config(&policy.limits),
            handshakes: None,
            breaker: None,
            generation: 0,
            policy: policy.clone(),
        };
        let shared = Arc::new(Shared {
            current: ArcSwap::from_pointee(placeholder),
            metrics,
            counts: Arc::new(ConnCounts::default()),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            breakers: Mutex::new(HashMap::new()),
            ready: std::sync::atomic::AtomicBool::new(false),
        });
        shared.install(policy);
        shared
    }

    /// The policy generation new handshakes use.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.current.load_full()
    }

    /// Swaps in a new policy atomically. Live sessions keep theirs.
    pub fn install(&self, policy: Policy) {
        let generation = self.current.load().generation + 1;
        let breaker = policy.upstream.breaker.map(|b| {
            let mut map = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
            let key = (policy.upstream.url.clone(), breaker_key(&b));
            // Forget breakers of upstreams that are no longer configured.
            map.retain(|(url, k), _| url != &key.0 || *k == key.1);
            Arc::clone(map.entry(key).or_insert_with(|| {
                let gauge = self
                    .metrics
                    .circuit_state
                    .get_or_create(&UpstreamLabel {
                        upstream: policy.upstream.url.clone(),
                    })
                    .clone();
                Arc::new(Breaker::new(b, policy.upstream.url.clone(), gauge))
            }))
        });
        let rt = Runtime {
            ws_config: ws_config(&policy.limits),
            handshakes: policy
                .limits
                .per_ip_handshakes
                .as_ref()
                .map(HandshakeLimiter::new),
            breaker,
            generation,
            policy,
        };
        self.metrics
            .policy_generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
        self.current.store(Arc::new(rt));
    }
}
