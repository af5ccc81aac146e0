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
use crate::guard::jwt::{JwksCache, Verifier};
use crate::guard::limits::{ConnCounts, HandshakeLimiter, SubjectLimiter};
use crate::guard::redis_limits::{SharedLimiter, SharedSettings};
use crate::metrics::{Metrics, UpstreamLabel};
use crate::policy::{Limits, Policy, Route};
use crate::values::{BreakerPolicy, Rate};

/// One policy generation plus what is derived from it. New handshakes load
/// the current one; a live session keeps the one it started with.
pub struct Generation {
    pub policy: Policy,
    pub generation: u64,
    /// Aligned with [`Policy::route`]: 0 is the top level.
    pub routes: Vec<RouteState>,
    /// `limits.per_subject.messages`, shared by every route.
    pub subject_messages: Option<Arc<SubjectLimiter>>,
    /// `limits.shared`: the Redis limiter.
    pub shared_limiter: Option<Arc<SharedLimiter>>,
    /// Every header wsguard can assert anywhere in this policy (contract
    /// section 7): removed from every client request on every route.
    pub asserted_headers: Vec<hyper::header::HeaderName>,
}

/// What a route derives from its policy.
pub struct RouteState {
    pub handshakes: Option<Arc<HandshakeLimiter>>,
    /// Token verification with this route's keys (and JWKS cache).
    pub jwt: Option<Verifier>,
    /// Token introspection with its answer cache.
    pub introspection: Option<Arc<crate::guard::introspect::Introspector>>,
    pub breaker: Option<Arc<Breaker>>,
    /// Toward the client: the policy's frame and message limits.
    pub ws_config: WebSocketConfig,
    /// Toward the backend: no frame limit (backends send messages as one
    /// frame), the message limit plus room for a signature envelope.
    pub upstream_ws_config: WebSocketConfig,
}

impl Generation {
    pub fn route(&self, index: usize) -> (&Route, Option<&RouteState>) {
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

/// See [`RouteState::upstream_ws_config`].
pub fn upstream_ws_config(l: &Limits) -> WebSocketConfig {
    ws_config(l)
        .max_frame_size(None)
        .max_message_size(Some(l.max_message_size.saturating_add(1024)))
}

pub struct Process {
    current: ArcSwap<Generation>,
    pub metrics: Metrics,
    pub counts: Arc<ConnCounts>,
    /// Connections still in the handshake, per peer address (a trusted
    /// proxy's connections are counted in the total only).
    pub pending: Arc<ConnCounts>,
    /// Handshakes in progress per client IP taken from a trusted proxy's
    /// `X-Forwarded-For` (`limits.per_ip.pending_handshakes`).
    pub pending_clients: Arc<ConnCounts>,
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
    /// JWKS key caches by URL, each with its one refresher. A reload keeps
    /// the cache (and its keys) of every URL the new policy still names and
    /// fetches nothing for it: a reload while the identity provider is down
    /// changes nothing for valid tokens.
    jwks: Mutex<HashMap<String, JwksEntry>>,
    /// The Redis limiter, kept while its settings are unchanged (its
    /// connection and outage state survive reloads).
    shared_limiter: Mutex<Option<(SharedSettings, Arc<SharedLimiter>)>>,
    pub ready: std::sync::atomic::AtomicBool,
    /// Refused handshakes are logged at info through this rate limit.
    pub refusals: crate::reject_log::RefusalLog,
    /// Bytes held in unfinished messages that HMAC must see whole, across
    /// every session (see [`crate::session::Budget`]).
    pub partial: crate::session::Budget,
    /// Bytes held by messages being inflated (permessage-deflate), all
    /// sessions together.
    pub inflate: Arc<crate::compression::InflateBudget>,
    /// The generation of `current`, readable without touching the ArcSwap.
    generation: std::sync::atomic::AtomicU64,
}

type BreakerKey = (u32, u128, u128, u32, bool);

/// One JWKS URL's cache and the refresher that keeps it fresh.
struct JwksEntry {
    cache: Arc<JwksCache>,
    /// The refresh period the refresher runs with (the shortest non-zero
    /// `jwks_refresh` among the routes naming the URL; zero = none).
    every: std::time::Duration,
    stop: CancellationToken,
}

fn breaker_key(b: &BreakerPolicy) -> BreakerKey {
    (
        b.consecutive_failures,
        b.open_for.as_nanos(),
        b.max_open_for.as_nanos(),
        b.half_open_probes,
        b.shared,
    )
}

impl Process {
    pub fn new(policy: Policy) -> Arc<Process> {
        let metrics = Metrics::new();
        let placeholder = Generation {
            routes: Vec::new(),
            subject_messages: None,
            shared_limiter: None,
            asserted_headers: Vec::new(),
            generation: 0,
            policy: policy.clone(),
        };
        let process = Arc::new(Process {
            current: ArcSwap::from_pointee(placeholder),
            metrics,
            counts: Arc::new(ConnCounts::default()),
            pending: Arc::new(ConnCounts::default()),
            pending_clients: Arc::new(ConnCounts::default()),
            subjects: Arc::new(ConnCounts::default()),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            breakers: Mutex::new(HashMap::new()),
            limiters: Mutex::new(HashMap::new()),
            jwks: Mutex::new(HashMap::new()),
            shared_limiter: Mutex::new(None),
            ready: std::sync::atomic::AtomicBool::new(false),
            refusals: crate::reject_log::RefusalLog::default(),
            partial: crate::session::Budget::new(crate::session::DEFAULT_PARTIAL_BUDGET),
            inflate: crate::compression::InflateBudget::new(
                crate::compression::budget::DEFAULT_BUDGET,
            ),
            generation: std::sync::atomic::AtomicU64::new(0),
        });
        process.install(policy);
        process
    }

    /// The generation in force (1 at start, +1 per applied reload).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The policy generation new handshakes use.
    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// The JWKS cache of `key` ([`crate::guard::jwt::Jwt::jwks_cache_key`]:
    /// the `jwks_url`), if the policy in force names it.
    pub fn jwks_cache(&self, url: &str) -> Option<Arc<JwksCache>> {
        let map = self.jwks.lock().unwrap_or_else(|e| e.into_inner());
        map.get(url).map(|e| Arc::clone(&e.cache))
    }

    /// Brings the per-URL JWKS caches in line with `policy`: one cache and
    /// one refresher per URL. A URL still named keeps its cache and keys and
    /// is not refetched (its refresher restarts only when the refresh
    /// period changed, and then waits a full period); a new URL is fetched
    /// in the background; a URL no longer named loses its refresher.
    fn sync_jwks(&self, policy: &Policy) {
        let mut wanted: Vec<(String, std::time::Duration, &crate::guard::jwt::Jwt)> = Vec::new();
        for j in policy.all_routes().filter_map(|r| r.jwt.as_ref()) {
            let Some(url) = j.jwks_cache_key() else {
                continue;
            };
            match wanted.iter_mut().find(|(u, _, _)| *u == url) {
                Some((_, every, _)) => {
                    if every.is_zero() || (!j.jwks_refresh.is_zero() && j.jwks_refresh < *every) {
                        *every = j.jwks_refresh;
                    }
                }
                None => wanted.push((url, j.jwks_refresh, j)),
            }
        }
        let mut map = self.jwks.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|url, e| {
            let keep = wanted.iter().any(|(u, _, _)| u == url);
            if !keep {
                e.stop.cancel();
            }
            keep
        });
        let handle = tokio::runtime::Handle::try_current().ok();
        for (url, every, jwt) in wanted {
            let (cache, initial) = match map.get(&url) {
                Some(e) if e.every == every => continue,
                Some(e) => {
                    e.stop.cancel();
                    (Arc::clone(&e.cache), false)
                }
                None => match jwt.new_jwks_cache() {
                    Some(c) => (c, true),
                    None => continue,
                },
            };
            let stop = self.shutdown.child_token();
            if let Some(h) = &handle {
                h.spawn(Arc::clone(&cache).run(every, initial, stop.clone()));
            }
            map.insert(url, JwksEntry { cache, every, stop });
        }
    }

    /// Swaps in a new policy atomically. Live sessions keep theirs.
    pub fn install(&self, policy: Policy) {
        let generation = self.current.load().generation + 1;
        self.sync_jwks(&policy);
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
                            let l = Arc::new(l.with_tracker(self.tracker.clone()));
                            if tokio::runtime::Handle::try_current().is_ok() {
                                l.warm_up();
                            }
                            // Shared breakers follow the new Redis.
                            map.retain(|_, b| !b.is_shared());
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
        let routes = policy
            .all_routes()
            .map(|r| RouteState {
                ws_config: ws_config(&r.limits),
                upstream_ws_config: upstream_ws_config(&r.limits),
                jwt: r.jwt.as_ref().map(|j| {
                    // The process-wide cache of the URL: fetched and
                    // refreshed off the handshake path by sync_jwks; an
                    // unknown kid also triggers a (throttled) fetch.
                    let cache = j.jwks_cache_key().and_then(|k| self.jwks_cache(&k));
                    Verifier::with_cache(Arc::clone(j), cache)
                }),
                introspection: r.introspection.as_ref().map(|i| {
                    Arc::new(crate::guard::introspect::Introspector::new(
                        Arc::clone(i),
                        self.metrics.introspection.clone(),
                    ))
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
                        let breaker = Breaker::new(b, r.upstream.url.clone(), gauge);
                        let breaker = Arc::new(match (&shared_limiter, b.shared) {
                            (Some(l), true) => breaker.shared(Arc::clone(l)),
                            _ => breaker,
                        });
                        breaker.watch();
                        breaker
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
        let asserted_headers = policy.asserted_headers();
        self.current.store(Arc::new(Generation {
            asserted_headers,
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
