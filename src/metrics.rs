//! Prometheus metrics (contract section 5).
//!
//! Hot-path counters (messages and bytes per direction) are resolved once
//! into plain [`Counter`] handles so that counting a message is one atomic
//! add, not a label lookup. Labels are bounded: no per-IP or per-subject
//! label ever exists, so a spray of clients cannot blow up the registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// A hop (`client`, `backend`) and a direction (`c2s`, `s2c`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WireLabel {
    pub hop: &'static str,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteResultLabel {
    pub route: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabel {
    pub side: &'static str,
    pub code: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub connections_active: Gauge,
    pub handshakes: Family<ResultLabel, Counter>,
    pub messages: Family<DirectionLabel, Counter>,
    pub bytes: Family<DirectionLabel, Counter>,
    pub rejections: Family<ReasonLabel, Counter>,
    pub signature_failures: Family<ReasonLabel, Counter>,
    pub ping_rtt: Histogram,
    pub circuit_state: Family<UpstreamLabel, Gauge>,
    pub reloads: Family<ResultLabel, Counter>,
    pub policy_generation: Gauge,
    pub closes: Family<CloseLabel, Counter>,
    /// Per-route views (the route label is a configured path prefix, "/"
    /// for the top level, so its cardinality is the operator's).
    pub route_connections_active: Family<RouteLabel, Gauge>,
    pub route_handshakes: Family<RouteResultLabel, Counter>,
    /// Shared-limit checks that found Redis slow or down.
    pub shared_unavailable: Counter,
    /// Sessions ended by `limits.max_session_duration`.
    pub session_duration_closes: Counter,
    pub messages_c2s: Counter,
    pub messages_s2c: Counter,
    pub bytes_c2s: Counter,
    pub bytes_s2c: Counter,
    /// Frame bytes (headers and payloads as sent, compressed or not) per
    /// hop and direction: with `wsguard_bytes_total` (payload bytes) it
    /// shows what permessage-deflate saves on each hop.
    pub wire: Family<WireLabel, Counter>,
    pub wire_client_c2s: Counter,
    pub wire_backend_c2s: Counter,
    pub wire_backend_s2c: Counter,
    pub wire_client_s2c: Counter,
    /// Token introspection: cache hits/misses/coalesced waits and calls
    /// to the endpoint by answer.
    pub introspection: crate::guard::introspect::IntrospectionMetrics,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("wsguard");
        let connections_active = Gauge::default();
        registry.register(
            "connections_active",
            "Live proxied WebSocket sessions",
            connections_active.clone(),
        );
        let handshakes = Family::<ResultLabel, Counter>::default();
        registry.register(
            "handshakes",
            "Upgrade requests by outcome (ok, or the rejection status class)",
            handshakes.clone(),
        );
        let messages = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "messages",
            "Data messages relayed, by direction (c2s, s2c)",
            messages.clone(),
        );
        let bytes = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "bytes",
            "Payload bytes relayed, by direction (c2s, s2c)",
            bytes.clone(),
        );
        let wire = Family::<WireLabel, Counter>::default();
        registry.register(
            "wire_bytes",
            "Frame bytes relayed on the wire (after compression), by hop (client, backend) and direction (c2s, s2c)",
            wire.clone(),
        );
        let wire_of = |hop, direction| wire.get_or_create(&WireLabel { hop, direction }).clone();
        let wire_client_c2s = wire_of("client", "c2s");
        let wire_backend_c2s = wire_of("backend", "c2s");
        let wire_backend_s2c = wire_of("backend", "s2c");
        let wire_client_s2c = wire_of("client", "s2c");
        let rejections = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "rejections",
            "Handshakes refused and messages dropped or sessions closed by a guard, by reason",
            rejections.clone(),
        );
        let signature_failures = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "signature_failures",
            "Messages whose HMAC envelope failed verification, by reason",
            signature_failures.clone(),
        );
        // 100us .. ~26s
        let ping_rtt = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.0001, 4.0, 10,
        ));
        registry.register(
            "ping_rtt_seconds",
            "Round-trip time of wsguard's own keepalive pings",
            ping_rtt.clone(),
        );
        let circuit_state = Family::<UpstreamLabel, Gauge>::default();
        registry.register(
            "circuit_state",
            "Circuit breaker state per upstream: 0 closed, 1 open, 2 half-open",
            circuit_state.clone(),
        );
        let reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "reloads",
            "Policy reloads by result (ok, error)",
            reloads.clone(),
        );
        let policy_generation = Gauge::default();
        registry.register(
            "policy_generation",
            "Generation of the policy in force: 1 at start, +1 per successful reload",
            policy_generation.clone(),
        );
        let closes = Family::<CloseLabel, Counter>::default();
        registry.register(
            "session_closes",
            "Ended sessions by the side that ended them and the close code sent to the client",
            closes.clone(),
        );
        let route_connections_active = Family::<RouteLabel, Gauge>::default();
        registry.register(
            "route_connections_active",
            "Live proxied sessions per route",
            route_connections_active.clone(),
        );
        let route_handshakes = Family::<RouteResultLabel, Counter>::default();
        registry.register(
            "route_handshakes",
            "Upgrade requests per route by outcome",
            route_handshakes.clone(),
        );
        let shared_unavailable = Counter::default();
        registry.register(
            "shared_limiter_unavailable",
            "Shared-limit checks that found Redis slow or down (on_error applied)",
            shared_unavailable.clone(),
        );
        let session_duration_closes = Counter::default();
        registry.register(
            "session_duration_closes",
            "Sessions closed by limits.max_session_duration (1001 \"session too long\")",
            session_duration_closes.clone(),
        );
        let introspection = crate::guard::introspect::IntrospectionMetrics::default();
        registry.register(
            "introspection_cache",
            "Token introspection lookups by result: hit (cached answer), miss (a call was made), coalesced (joined a call in flight)",
            introspection.cache.clone(),
        );
        registry.register(
            "introspection_requests",
            "Calls to the token introspection endpoint by result (active, inactive, error)",
            introspection.requests.clone(),
        );
        let dir = |d| DirectionLabel { direction: d };
        for reason in known_rejections() {
            let _ = rejections.get_or_create(&ReasonLabel { reason });
        }
        for reason in known_signature_failures() {
            let _ = signature_failures.get_or_create(&ReasonLabel { reason });
        }
        for result in ["ok", "error"] {
            let _ = reloads.get_or_create(&ResultLabel { result });
        }
        let _ = handshakes.get_or_create(&ResultLabel { result: "ok" });
        // The ordinary ends of a session, so the closes panel has a series
        // before the first one (the other codes appear when they happen).
        for (side, code) in [
            ("client", "1000"),
            ("client", "1001"),
            ("backend", "1000"),
            ("proxy", "1001"),
        ] {
            let _ = closes.get_or_create(&CloseLabel { side, code });
        }
        let messages_c2s = messages.get_or_create(&dir("c2s")).clone();
        let messages_s2c = messages.get_or_create(&dir("s2c")).clone();
        let bytes_c2s = bytes.get_or_create(&dir("c2s")).clone();
        let bytes_s2c = bytes.get_or_create(&dir("s2c")).clone();
        Metrics {
            messages_c2s,
            messages_s2c,
            bytes_c2s,
            bytes_s2c,
            wire,
            wire_client_c2s,
            wire_backend_c2s,
            wire_backend_s2c,
            wire_client_s2c,
            registry,
            connections_active,
            handshakes,
            messages,
            bytes,
            rejections,
            signature_failures,
            ping_rtt,
            circuit_state,
            reloads,
            policy_generation,
            closes,
            route_connections_active,
            route_handshakes,
            shared_unavailable,
            session_duration_closes,
            introspection,
        }
    }

    /// Exports each route's per-route series at 0 from the start (called
    /// on every policy install), so that a route shows up on a dashboard
    /// before its first session.
    pub fn init_routes<'a>(&self, prefixes: impl Iterator<Item = &'a str>) {
        for prefix in prefixes {
            let route = route_name(prefix);
            let _ = self.route_connections_active.get_or_create(&RouteLabel {
                route: route.clone(),
            });
            let _ = self.route_handshakes.get_or_create(&RouteResultLabel {
                route,
                result: "ok",
            });
        }
    }

    pub fn handshake(&self, result: &'static str) {
        self.handshakes.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn route_handshake(&self, route: &str, result: &'static str) {
        self.route_handshakes
            .get_or_create(&RouteResultLabel {
                route: route_name(route),
                result,
            })
            .inc();
    }

    pub fn route_active(&self, route: &str) -> Gauge {
        self.route_connections_active
            .get_or_create(&RouteLabel {
                route: route_name(route),
            })
            .clone()
    }

    pub fn reject(&self, reason: &'static str) {
        self.rejections.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn reload(&self, result: &'static str) {
        self.reloads.get_or_create(&ResultLabel { result }).inc();
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Every `wsguard_rejections_total` reason wsguard can count, exported at 0
/// from the start: a panel or an alert on `rate(...)` must see a series on a
/// healthy instance, not "No data". Handshake refusals come from
/// [`Reject::label`](crate::error::Reject::label) itself, so they cannot be
/// misspelt here; the rest are counted by name where they happen.
pub fn known_rejections() -> Vec<&'static str> {
    use crate::error::Reject;
    use crate::guard::jwt::JwtError;
    use crate::guard::origin::OriginError;
    let mut refused = vec![
        Reject::BadRequest(""),
        Reject::Version,
        Reject::RateLimited { retry_after: 0 },
        Reject::ConnectionCap { retry_after: 0 },
        Reject::Capacity { retry_after: 0 },
        Reject::CircuitOpen { retry_after: 0 },
        Reject::BadGateway(String::new()),
        Reject::GatewayTimeout,
        Reject::SharedUnavailable,
        Reject::ShuttingDown,
        Reject::RouteUnavailable,
        Reject::NotUpgrade,
        Reject::PendingCap { retry_after: 0 },
        Reject::AmbiguousToken("jwt_ambiguous"),
        Reject::AmbiguousToken("introspection_ambiguous"),
    ];
    {
        use crate::guard::introspect::IntrospectError as I;
        for i in [
            I::Missing,
            I::Inactive,
            I::Expired,
            I::NotYetValid,
            I::WrongIssuer,
            I::WrongAudience,
        ] {
            refused.push(Reject::TokenInactive(i));
        }
        refused.push(Reject::IntrospectionUnavailable(I::Unavailable(
            String::new(),
        )));
    }
    for o in [
        OriginError::Missing,
        OriginError::Null,
        OriginError::Malformed,
        OriginError::NotAllowed,
    ] {
        refused.push(Reject::Origin(o));
    }
    for j in [
        JwtError::Missing,
        JwtError::Malformed,
        JwtError::AlgNotAllowed,
        JwtError::UnknownKey,
        JwtError::BadSignature,
        JwtError::Expired,
        JwtError::NotYetValid,
        JwtError::WrongIssuer,
        JwtError::WrongAudience,
        JwtError::MissingClaim(String::new()),
        JwtError::InvalidClaim(String::new()),
    ] {
        refused.push(Reject::Unauthorized(j));
    }
    let mut out: Vec<&'static str> = refused.iter().map(Reject::label).collect();
    out.extend([
        "pending_limit",
        "tls_error",
        "handshake_timeout",
        "origin_report",
        "jwt_report",
        "introspection_report",
        "hmac_report",
        "introspection_unavailable_allowed",
        "message_rate",
        "subject_message_rate",
    ]);
    out.sort_unstable();
    out.dedup();
    out
}

/// Every `wsguard_signature_failures_total` reason (the labels of
/// [`SigFailure`](crate::sign::SigFailure)).
pub fn known_signature_failures() -> Vec<&'static str> {
    use crate::sign::SigFailure;
    [
        SigFailure::MissingEnvelope,
        SigFailure::MalformedEnvelope,
        SigFailure::UnknownKid,
        SigFailure::Skew,
        SigFailure::Replay,
        SigFailure::BadMac,
    ]
    .iter()
    .map(SigFailure::label)
    .collect()
}

/// The label for a route prefix: "/" for the top level.
fn route_name(prefix: &str) -> String {
    if prefix.is_empty() {
        "/".to_string()
    } else {
        prefix.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_series_exist_at_zero_before_any_event() {
        let m = Metrics::new();
        m.init_routes(["", "/admin"].into_iter());
        let text = m.encode();
        for line in [
            "wsguard_rejections_total{reason=\"origin_not_allowed\"} 0",
            "wsguard_rejections_total{reason=\"jwt_expired\"} 0",
            "wsguard_rejections_total{reason=\"handshake_rate\"} 0",
            "wsguard_rejections_total{reason=\"message_rate\"} 0",
            "wsguard_signature_failures_total{reason=\"bad_mac\"} 0",
            "wsguard_signature_failures_total{reason=\"replay\"} 0",
            "wsguard_reloads_total{result=\"ok\"} 0",
            "wsguard_reloads_total{result=\"error\"} 0",
            "wsguard_handshakes_total{result=\"ok\"} 0",
            "wsguard_route_connections_active{route=\"/admin\"} 0",
            "wsguard_route_handshakes_total{route=\"/\",result=\"ok\"} 0",
            "wsguard_session_closes_total{side=\"client\",code=\"1000\"} 0",
            "wsguard_wire_bytes_total{hop=\"client\",direction=\"c2s\"} 0",
            "wsguard_wire_bytes_total{hop=\"backend\",direction=\"s2c\"} 0",
        ] {
            assert!(text.contains(line), "missing {line}:\n{text}");
        }
        // Counting still works on a pre-created series.
        m.reject("origin_not_allowed");
        assert!(m
            .encode()
            .contains("wsguard_rejections_total{reason=\"origin_not_allowed\"} 1"));
    }
}
