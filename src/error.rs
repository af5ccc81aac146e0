//! Why a handshake was refused, one variant per row of the contract's status
//! table (section 4). The status, the extra header and the metric label all
//! derive from the variant, so they cannot drift apart.

use hyper::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum Reject {
    /// Not a valid WebSocket upgrade (method, headers, key).
    #[error("invalid upgrade request: {0}")]
    BadRequest(&'static str),
    /// `Sec-WebSocket-Version` other than 13.
    #[error("unsupported WebSocket version")]
    Version,
    /// A plain HTTP request to the proxy port.
    #[error("plain HTTP request, upgrade required")]
    NotUpgrade,
    /// Origin not allowed (or missing, `null`, malformed).
    #[error("origin refused: {}", .0.reason())]
    Origin(crate::guard::origin::OriginError),
    /// Token missing, invalid or expired.
    #[error("token refused: {0}")]
    Unauthorized(crate::guard::jwt::JwtError),
    /// A token in more than one place (RFC 6750 section 2), with the
    /// guard's rejection label (`jwt_ambiguous`, `introspection_ambiguous`).
    #[error("token in more than one place")]
    AmbiguousToken(&'static str),
    /// Introspection: token missing, inactive, unknown, expired or not
    /// for this audience/issuer.
    #[error("token refused by introspection: {0}")]
    TokenInactive(crate::guard::introspect::IntrospectError),
    /// The introspection endpoint is unreachable and `on_error: deny`.
    #[error("{0}")]
    IntrospectionUnavailable(crate::guard::introspect::IntrospectError),
    /// Per-IP handshake rate limit.
    #[error("handshake rate limit")]
    RateLimited { retry_after: u64 },
    /// Per-IP (or per-subject) concurrent connection cap.
    #[error("connection cap for this client")]
    ConnectionCap { retry_after: u64 },
    /// `limits.per_ip.pending_handshakes`: too many handshakes in progress
    /// from this client IP (behind a trusted proxy; a direct peer is
    /// refused before its request is read).
    #[error("too many handshakes in progress from this client")]
    PendingCap { retry_after: u64 },
    /// `max_connections` reached.
    #[error("proxy at max_connections")]
    Capacity { retry_after: u64 },
    /// The upstream's circuit breaker is open.
    #[error("circuit open")]
    CircuitOpen { retry_after: u64 },
    /// Backend unreachable or answered anything but a valid 101.
    #[error("bad gateway: {0}")]
    BadGateway(String),
    /// Backend did not answer within `connect_timeout`.
    #[error("backend did not answer in time")]
    GatewayTimeout,
    /// Shared limits unavailable (Redis down) with `on_error: deny`.
    #[error("shared limits unavailable")]
    SharedUnavailable,
    /// The proxy is shutting down.
    #[error("shutting down")]
    ShuttingDown,
    /// The policy in force names the route but holds no state for
    /// it (an internal inconsistency, not a shutdown): 503, logged as an
    /// error.
    #[error("route not ready")]
    RouteUnavailable,
}

impl Reject {
    pub fn status(&self) -> StatusCode {
        match self {
            Reject::BadRequest(_) | Reject::AmbiguousToken(_) => StatusCode::BAD_REQUEST,
            Reject::Origin(_) => StatusCode::FORBIDDEN,
            Reject::Unauthorized(_) | Reject::TokenInactive(_) => StatusCode::UNAUTHORIZED,
            Reject::Version | Reject::NotUpgrade => StatusCode::UPGRADE_REQUIRED,
            Reject::RateLimited { .. }
            | Reject::ConnectionCap { .. }
            | Reject::PendingCap { .. } => StatusCode::TOO_MANY_REQUESTS,
            Reject::Capacity { .. }
            | Reject::CircuitOpen { .. }
            | Reject::ShuttingDown
            | Reject::RouteUnavailable
            | Reject::SharedUnavailable
            | Reject::IntrospectionUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Reject::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Reject::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Metric label for `wsguard_handshakes_total{result}` and
    /// `wsguard_rejections_total{reason}`.
    pub fn label(&self) -> &'static str {
        match self {
            Reject::BadRequest(_) => "bad_request",
            Reject::Version => "bad_version",
            Reject::Origin(e) => e.reason(),
            Reject::Unauthorized(e) => e.reason(),
            Reject::AmbiguousToken(label) => label,
            Reject::TokenInactive(e) | Reject::IntrospectionUnavailable(e) => e.reason(),
            Reject::NotUpgrade => "not_upgrade",
            Reject::RateLimited { .. } => "handshake_rate",
            Reject::ConnectionCap { .. } => "connection_cap",
            Reject::PendingCap { .. } => "pending_limit",
            Reject::Capacity { .. } => "max_connections",
            Reject::CircuitOpen { .. } => "circuit_open",
            Reject::BadGateway(_) => "bad_gateway",
            Reject::GatewayTimeout => "gateway_timeout",
            Reject::ShuttingDown => "shutting_down",
            Reject::RouteUnavailable => "route_unavailable",
            Reject::SharedUnavailable => "shared_unavailable",
        }
    }

    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Reject::RateLimited { retry_after }
            | Reject::ConnectionCap { retry_after }
            | Reject::PendingCap { retry_after }
            | Reject::Capacity { retry_after }
            | Reject::CircuitOpen { retry_after } => Some((*retry_after).max(1)),
            Reject::ShuttingDown
            | Reject::RouteUnavailable
            | Reject::SharedUnavailable
            | Reject::IntrospectionUnavailable(_) => Some(1),
            _ => None,
        }
    }
}
