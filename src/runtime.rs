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
use crate::guard::jwt::Verifier;
use crate::guard::limits::{ConnCounts, HandshakeLimiter, SubjectLimiter};
use crate::guard::shared::{SharedLimiter, SharedSettings};
use crate::metrics::{Metrics, UpstreamLabel};
use crate::policy::{BreakerPolicy, Limits, Policy, Rate, Route};

/// One policy generation plus what is derived from it. New handshakes load
/// the current one; a live session keeps the one it started with.
pub struct Runtime {
    pub policy: Policy,
    pub generation: u64,
    /// Aligned with [`Policy::route`]: 0 is the top level.
    pub routes: Vec<RouteRuntime>,
    /// `limits.per_subject.messages`, shared by every route.
    pub subject_messages: Option<Arc<SubjectLimiter>>,
    /// `limits.shared`: the Redis limiter.
    pub shared_limiter: Option<Arc<SharedLimiter>>,
}

/// What a route derives from its policy.
pub struct RouteRuntime {
    pub handshakes: Option<Arc<HandshakeLimiter>>,
    /// Token verification with this route's keys (and JWKS cache).
    pub jwt: Option<Verifier>,
    pub breaker: Option<Arc<Breaker>>,
    /// Toward the client: the policy's frame and message limits.
    pub ws_config: WebSocketConfig,
    /// Toward the backend: no frame limit (backends send messages as one
    /// frame), the message limit plus room for a signature envelope.
    pub upstream_ws_config: WebSocketConfig,
}

impl Runtime {
    pub fn route(&self, index: usize) -> (&Route, Option<&RouteRuntime>) {
        (self.policy.route(index), self.routes.get(index))
    }
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

/// See [`RouteRuntime::upstream_ws_config`].
pub fn upstream_ws_config(l: &Limits) -> WebSocketConfig {
    ws_config(l)
        .max_frame_size(None)
        .max_message_size(Some(l.max_message_size.saturating_add(1024)))
}

pub struct Shared {
    current: ArcSwap<Runtime>,
    pub metrics: Metrics,
    pub counts: Arc<ConnCounts>,
    /// Connections still in the handshake, per peer address.
    pub pending: Arc<ConnCounts>,
    /// Live sessions per JWT subject.
    pub subjects: Arc<ConnCounts<String>>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    /// Breakers survive reloads while the upstream and its breaker settings
    /// are unchanged, so a reload cannot be used to reset an open circuit.
    breakers: Mutex<HashMap<(String, BreakerKey), Arc<Breaker>>>,
    /// Per-IP handshake limiters by (route prefix, rate), kept across
    /// reloads for the same reason.
    limiters: Mutex<HashMap<(String, Rate), Arc<HandshakeLimiter>>>,
    /// The Redis limiter, kept while its settings are unchanged (its
    /// connection and outage state survive reloads).
    shared_limiter: Mutex<Option<(SharedSettings, Arc<SharedLimiter>)>>,
    pub ready: std::sync::atomic::AtomicBool,
    /// Refused handshakes are logged at info through this rate limit.
    pub refusals: crate::reject_log::RefusalLog,
    /// The generation of `current`, readable without touching the ArcSwap.
    generation: std::sync::atomic::AtomicU64,
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
            routes: Vec::new(),
            subject_messages: None,
            shared_limiter: None,
            generation: 0,
            policy: policy.clone(),
        };
        let shared = Arc::new(Shared {
            current: ArcSwap::from_pointee(placeholder),
            metrics,
            counts: Arc::new(ConnCounts::default()),
            pending: Arc::new(ConnCounts::default()),
            subjects: Arc::new(ConnCounts::default()),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            breakers: Mutex::new(HashMap::new()),
            limiters: Mutex::new(HashMap::new()),
            shared_limiter: Mutex::new(None),
            ready: std::sync::atomic::AtomicBool::new(false),
            refusals: crate::reject_log::RefusalLog::default(),
            generation: std::sync::atomic::AtomicU64::new(0),
        });
        shared.install(policy);
        shared
    }

    /// The generation in force (1 at start, +1 per applied reload).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The policy generation new handshakes use.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.current.load_full()
    }

    /// Swaps in a new policy atomically. Live sessions keep theirs.
    pub fn install(&self, policy: Policy) {
        let generation = self.current.load().generation + 1;
        let mut map = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
        let mut limiters = self.limiters.lock().unwrap_or_else(|e| e.into_inner());
        let wanted_limiters: Vec<(String, Rate)> = policy
            .all_routes()
            .filter_map(|r| {
                r.limits
                    .per_ip_handshakes
                    .map(|rate| (r.prefix.clone(), rate))
            })
            .collect();
        limiters.retain(|k, _| wanted_limiters.contains(k));
        let wanted: Vec<(String, BreakerKey)> = policy
            .all_routes()
            .filter_map(|r| {
                r.upstream
                    .breaker
                    .map(|b| (r.upstream.url.clone(), breaker_key(&b)))
            })
            .collect();
        // Forget breakers of upstreams that are no longer configured.
        map.retain(|k, _| wanted.contains(k));
        let routes = policy
            .all_routes()
            .map(|r| RouteRuntime {
                ws_config: ws_config(&r.limits),
                upstream_ws_config: upstream_ws_config(&r.limits),
                jwt: r.jwt.as_ref().map(|j| {
                    let v = Verifier::new(Arc::clone(j));
                    // Initial JWKS fetch and periodic refresh, off the
                    // handshake path. An unknown kid also triggers a fetch.
                    if j.jwks_url.is_some() {
                        if let Ok(handle) = tokio::runtime::Handle::try_current() {
                            let (v2, stop) = (v.clone(), self.shutdown.clone());
                            handle.spawn(async move { v2.start(stop).await });
                        }
                    }
                    v
                }),
                handshakes: r.limits.per_ip_handshakes.map(|rate| {
                    // Reuse the limiter while the route and rate are unchanged:
                    // a reload must not hand every client a fresh burst.
                    let key = (r.prefix.clone(), rate);
                    Arc::clone(
                        limiters
                            .entry(key)
                            .or_insert_with(|| Arc::new(HandshakeLimiter::new(&rate))),
                    )
                }),
                breaker: r.upstream.breaker.map(|b| {
                    let key = (r.upstream.url.clone(), breaker_key(&b));
                    Arc::clone(map.entry(key).or_insert_with(|| {
                        let gauge = self
                            .metrics
                            .circuit_state
                            .get_or_create(&UpstreamLabel {
                                upstream: r.upstream.url.clone(),
                            })
                            .clone();
                        Arc::new(Breaker::new(b, r.upstream.url.clone(), gauge))
                    }))
                }),
            })
            .collect();
        drop(map);
        drop(limiters);
        self.metrics
            .policy_generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
        self.metrics
            .init_routes(policy.all_routes().map(|r| r.prefix.as_str()));
        let subject_messages = policy.per_subject_messages.map(|r| {
            let old = self.current.load();
            match (&old.subject_messages, old.policy.per_subject_messages) {
                // Same rate: keep the buckets, so a reload is no fresh burst.
                (Some(l), Some(prev)) if prev == r => Arc::clone(l),
                _ => Arc::new(SubjectLimiter::keyed(crate::guard::limits::quota(&r))),
            }
        });
        let shared_limiter = {
            let mut slot = self
                .shared_limiter
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match &policy.shared {
                None => {
                    *slot = None;
                    None
                }
                Some(settings) => match slot.as_ref() {
                    Some((old, l)) if old == settings => Some(Arc::clone(l)),
                    _ => match SharedLimiter::new(settings.clone()) {
                        Ok(l) => {
                            let l = Arc::new(l);
                            *slot = Some((settings.clone(), Arc::clone(&l)));
                            Some(l)
                        }
                        // Validated at load; unreachable in practice.
                        Err(e) => {
                            tracing::error!(error = %e, "shared limits disabled");
                            None
                        }
                    },
                },
            }
        };
        self.current.store(Arc::new(Runtime {
            policy,
            generation,
            routes,
            subject_messages,
            shared_limiter,
        }));
        self.generation
            .store(generation, std::sync::atomic::Ordering::Release);
    }
}
