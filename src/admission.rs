//! Admission: whether a valid upgrade request may reach its backend.
//!
//! One [`Handshake`] per request carries what the checks read (the request,
//! the route, the client) and what they hold or learn for the session
//! (connection slots, the token's claims, the breaker's permit). The checks
//! run in one ordered list, [`CHECKS`], cheap before expensive:
//!
//! ```text
//! pending cap -> connection caps -> origin -> handshake rate
//!   -> token (one place only) -> token (verify, strip, claims)
//!   -> hmac bind_claim -> per-subject slots -> circuit breaker
//! ```
//!
//! Local counters come before the origin's header scan, the rate limit
//! before a signature check that may fetch keys or call an introspection
//! endpoint, and the per-subject slots (a Redis round trip with
//! `limits.shared`) and the breaker last.
//!
//! Each check returns `Result<(), Reject>`. Report mode is handled once,
//! by [`admit`] around the list: a refusal from a check whose guard is in
//! `report` mode is counted under the guard's report label, logged, and
//! the next check runs. The refusal itself is counted and logged by the
//! server with every other handshake outcome.

use std::net::{IpAddr, SocketAddr};

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::time::Instant;

use crate::config::{Mode, OnError};
use crate::error::Reject;
use crate::guard::breaker::Permit;
use crate::guard::jwt::{self, JwtError, TokenSource};
use crate::guard::limits::{client_ip_of, ConnSlot, IpKey, SlotError};
use crate::guard::redis_limits::{verdict, Decision, SharedSlot, Verdict};
use crate::handshake::Upgrade;
use crate::policy::Route;
use crate::state::{Generation, Process, RouteState};

/// One handshake on its way through admission.
pub struct Handshake<'a, 'q> {
    process: &'a Process,
    rt: &'a Generation,
    route: &'a Route,
    derived: &'a RouteState,
    headers: &'q HeaderMap,
    up: &'q Upgrade,
    peer: SocketAddr,
    deadline: Instant,
    /// The route's token guard, if any.
    token: Option<TokenGuard<'a>>,
    /// The token found in the configured sources (None: none, or more
    /// than one in report mode).
    found: Option<jwt::Found>,
    /// The verified token's claims.
    claims: Option<jwt::Claims>,
    out: Admitted<'a>,
}

/// What admission decided, and what the session holds from it.
pub struct Admitted<'a> {
    pub route_index: usize,
    pub route: &'a Route,
    pub derived: &'a RouteState,
    /// The client IP (after `trusted_proxies`).
    pub client_ip: IpAddr,
    /// The peer is a trusted proxy.
    pub peer_trusted: bool,
    pub auth: Auth,
    /// The place among live connections (always taken once admitted).
    pub slot: Option<ConnSlot>,
    pub subject_slot: Option<ConnSlot<String>>,
    pub shared_slot: Option<SharedSlot>,
    /// The breaker's permission to dial; report the dial's outcome to it.
    pub permit: Option<Permit<'a>>,
    /// `limits.per_ip.pending_handshakes` behind a trusted proxy: held
    /// until the handshake is answered.
    pub pending_client: Option<ConnSlot>,
}

/// What the token guard (jwt or introspection) decided, and the request as
/// it travels upstream.
pub struct Auth {
    /// The client's headers minus every token source.
    pub headers: HeaderMap,
    /// The `forward_claims` headers wsguard asserts, added after the
    /// client's headers are filtered.
    pub claim_headers: Vec<(HeaderName, HeaderValue)>,
    pub path_and_query: String,
    pub protocols: Vec<String>,
    pub subject: Option<String>,
    /// The `hmac.bind_claim` value ("" when not bound).
    pub bind: String,
    /// When `close_on_expiry` ends the session.
    pub expires: Option<Instant>,
    /// Claim values for the route's derived HMAC client keys.
    pub derive: crate::sign::DeriveInputs,
    /// The client offered nothing but its token subprotocol: answered to
    /// the client when the backend selects none (browsers abort a handshake
    /// that offered a subprotocol and got none back). Never sent upstream.
    pub token_protocol: Option<String>,
}

impl<'a, 'q> Handshake<'a, 'q> {
    /// The context of one validated upgrade request under the policy
    /// generation `rt`. Routes match on the normalised path without `;`
    /// parameters.
    pub fn new(
        process: &'a Process,
        rt: &'a Generation,
        headers: &'q HeaderMap,
        up: &'q Upgrade,
        peer: SocketAddr,
        deadline: Instant,
    ) -> Result<Self, Reject> {
        let route_index = rt.policy.route_index(&up.match_path);
        let (route, derived) = rt.route(route_index);
        let Some(derived) = derived else {
            tracing::error!(
                route = route_index,
                "no state for this route in the policy generation in force"
            );
            return Err(Reject::RouteUnavailable);
        };
        let trusted = &rt.policy.trusted_proxies;
        let token = match (&route.jwt, &derived.jwt, &derived.introspection) {
            (Some(j), Some(verifier), _) => Some(TokenGuard::Jwt(j, verifier)),
            (None, _, Some(i)) => Some(TokenGuard::Introspection(i)),
            _ => None,
        };
        Ok(Handshake {
            process,
            rt,
            route,
            derived,
            headers,
            up,
            peer,
            deadline,
            token,
            found: None,
            claims: None,
            out: Admitted {
                route_index,
                route,
                derived,
                client_ip: client_ip_of(peer.ip(), headers, trusted),
                peer_trusted: trusted.iter().any(|c| c.contains(peer.ip())),
                auth: Auth {
                    headers: headers.clone(),
                    claim_headers: Vec::new(),
                    path_and_query: up.path_and_query.clone(),
                    protocols: up.protocols.clone(),
                    subject: None,
                    bind: String::new(),
                    expires: None,
                    derive: crate::sign::DeriveInputs::default(),
                    token_protocol: None,
                },
                slot: None,
                subject_slot: None,
                shared_slot: None,
                permit: None,
                pending_client: None,
            },
        })
    }

    fn key(&self) -> IpKey {
        IpKey::new(self.out.client_ip)
    }
}

/// Runs every check of [`CHECKS`] in order; the first refusal from a check
/// that enforces ends admission. See the module doc for report mode.
pub async fn admit<'a>(mut hs: Handshake<'a, '_>) -> Result<Admitted<'a>, Reject> {
    for check in CHECKS {
        let Err(r) = check.run(&mut hs).await else {
            continue;
        };
        let Some(label) = check.report_label(&hs) else {
            return Err(r);
        };
        hs.process.metrics.reject(label);
        tracing::info!(
            client = %hs.peer, reason = r.label(),
            "{} would be refused (report mode)", check.name()
        );
    }
    Ok(hs.out)
}

/// One admission check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// `limits.per_ip.pending_handshakes` for a client behind a trusted
    /// proxy (a direct peer was capped before its request was read).
    PendingCap,
    /// `limits.max_connections` and `limits.per_ip.connections`.
    Connections,
    Origin,
    /// `limits.per_ip.handshakes` (in Redis with `limits.shared`).
    Rate,
    /// The token is in one configured source only (RFC 6750 section 2).
    TokenSources,
    /// The token is valid; every source is stripped and claims become
    /// headers, the subject and the expiry.
    Token,
    /// `hmac.bind_claim` names a usable claim.
    BindClaim,
    /// `limits.per_subject.connections` (in Redis with `limits.shared`).
    SubjectSlots,
    /// The upstream's circuit breaker lets a dial through.
    Breaker,
}

/// The order admission runs its checks in: cheap first.
pub const CHECKS: [Check; 9] = [
    Check::PendingCap,
    Check::Connections,
    Check::Origin,
    Check::Rate,
    Check::TokenSources,
    Check::Token,
    Check::BindClaim,
    Check::SubjectSlots,
    Check::Breaker,
];

impl Check {
    /// The name a report-mode log line gives the check.
    pub fn name(self) -> &'static str {
        match self {
            Check::PendingCap => "pending handshake cap",
            Check::Connections => "connection cap",
            Check::Origin => "origin",
            Check::Rate => "handshake rate",
            Check::TokenSources | Check::Token => "token",
            Check::BindClaim => "hmac bind_claim",
            Check::SubjectSlots => "per-subject connection cap",
            Check::Breaker => "circuit breaker",
        }
    }

    /// The report label of the check's guard when that guard is in report
    /// mode (its refusals are counted and let through); None when it
    /// enforces.
    fn report_label(self, hs: &Handshake<'_, '_>) -> Option<&'static str> {
        let mode = match self {
            Check::Origin => hs.route.origin.as_ref().map(|o| o.mode),
            Check::TokenSources | Check::Token => hs.token.as_ref().map(TokenGuard::mode),
            Check::BindClaim => hs.route.hmac.as_ref().map(|h| h.mode),
            _ => None,
        };
        if mode.is_none_or(|m| m == Mode::Enforce) {
            return None;
        }
        match self {
            Check::Origin => Some("origin_report"),
            Check::TokenSources | Check::Token => hs.token.as_ref().map(TokenGuard::report_label),
            Check::BindClaim => Some("hmac_report"),
            _ => None,
        }
    }

    async fn run(self, hs: &mut Handshake<'_, '_>) -> Result<(), Reject> {
        match self {
            Check::PendingCap => pending_cap(hs),
            Check::Connections => connections(hs),
            Check::Origin => origin(hs),
            Check::Rate => handshake_rate(hs).await,
            Check::TokenSources => token_sources(hs),
            Check::Token => token(hs).await,
            Check::BindClaim => bind_claim(hs),
            Check::SubjectSlots => subject_slots(hs).await,
            Check::Breaker => breaker(hs).await,
        }
    }
}

/// Behind a trusted proxy, the pending-handshake cap applies to the
/// forwarded client IP.
fn pending_cap(hs: &mut Handshake<'_, '_>) -> Result<(), Reject> {
    let Some(cap) = hs.rt.policy.per_ip_pending_handshakes else {
        return Ok(());
    };
    if !hs.out.peer_trusted {
        return Ok(());
    }
    let key = hs.key();
    let slot = hs
        .process
        .pending_clients
        .acquire(key, u64::MAX, Some(cap))
        .map_err(|_| Reject::PendingCap { retry_after: 1 })?;
    hs.out.pending_client = Some(slot);
    Ok(())
}

fn connections(hs: &mut Handshake<'_, '_>) -> Result<(), Reject> {
    let key = hs.key();
    let slot = hs
        .process
        .counts
        .acquire(
            key,
            hs.rt.policy.max_connections,
            hs.route.limits.per_ip_connections,
        )
        .map_err(|e| match e {
            SlotError::Global => Reject::Capacity { retry_after: 1 },
            SlotError::PerIp => Reject::ConnectionCap { retry_after: 1 },
        })?;
    hs.out.slot = Some(slot);
    Ok(())
}

fn origin(hs: &mut Handshake<'_, '_>) -> Result<(), Reject> {
    let Some(origin) = &hs.route.origin else {
        return Ok(());
    };
    let values: Vec<&[u8]> = hs
        .headers
        .get_all(hyper::header::ORIGIN)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    origin.check(&values).map_err(Reject::Origin)
}

/// The per-IP handshake rate: in Redis across replicas when `limits.shared`
/// is set (with `on_error` deciding what an outage means), else local.
async fn handshake_rate(hs: &mut Handshake<'_, '_>) -> Result<(), Reject> {
    let Some(rate) = hs.route.limits.per_ip_handshakes else {
        return Ok(());
    };
    let key = hs.key();
    let local = || {
        hs.derived
            .handshakes
            .as_ref()
            .map_or(Ok(()), |l| l.check(key))
    };
    let Some(limiter) = &hs.rt.shared_limiter else {
        return local().map_err(|retry_after| Reject::RateLimited { retry_after });
    };
    let name = if hs.route.prefix.is_empty() {
        "/"
    } else {
        hs.route.prefix.as_str()
    };
    let decision = limiter.check(&format!("hs:{name}:{key}"), &rate).await;
    if decision == Decision::Unavailable {
        hs.process.metrics.shared_unavailable.inc();
    }
    match verdict(decision, limiter.on_error(), local) {
        Verdict::Allow => Ok(()),
        Verdict::Limited { retry_after_secs } => Err(Reject::RateLimited {
            retry_after: retry_after_secs,
        }),
        Verdict::Unavailable => Err(Reject::SharedUnavailable),
    }
}

/// Every configured source is looked at: a token in more than one place
/// is refused (RFC 6750 section 2), whichever guard is on.
fn token_sources(hs: &mut Handshake<'_, '_>) -> Result<(), Reject> {
    let Some(j) = &hs.token else {
        return Ok(());
    };
    match jwt::find(
        j.token_sources(),
        hs.headers,
        &hs.up.path_and_query,
        &hs.up.protocols,
    ) {
        Ok(found) => {
            hs.found = found;
            Ok(())
        }
        Err(jwt::Ambiguous) => Err(Reject::AmbiguousToken(j.ambiguous_label())),
    }
}

/// The token guard (jwt or introspection): verify the token found, empty
/// every configured source before forwarding (`forward_token` keeps the
/// consumed one), and turn claims into headers, the subject, the derived
/// key inputs and the expiry. The sources are emptied whatever the verdict,
/// so that a token in report mode never reaches the backend either.
async fn token(hs: &mut Handshake<'_, '_>) -> Result<(), Reject> {
    let Some(j) = &hs.token else {
        return Ok(());
    };
    let token = hs.found.as_ref().map(|f| f.token.as_str());
    let verified = match j.verify(token, hs.deadline).await {
        Err(Reject::IntrospectionUnavailable(e)) if j.allow_on_error() => {
            hs.process
                .metrics
                .reject("introspection_unavailable_allowed");
            tracing::warn!(client = %hs.peer, error = %e, "introspection unavailable; letting the handshake through without claims (on_error: allow)");
            Ok(None)
        }
        other => other.map(Some),
    };
    let claims = verified.as_ref().ok().and_then(Option::as_ref);
    let auth = &mut hs.out.auth;
    // Every configured source is emptied, not only the one used: a forged
    // token beside a valid one must never reach the backend. With
    // forward_token, the consumed token alone passes (and only once it was
    // accepted).
    let keep = hs
        .found
        .as_ref()
        .filter(|_| j.forward_token() && claims.is_some())
        .map(|f| f.source);
    jwt::strip_sources(
        j.token_sources(),
        keep,
        &mut auth.headers,
        &mut auth.path_and_query,
        &mut auth.protocols,
    );
    // A browser that offered only the token subprotocol aborts unless the
    // answer names one of its offers: echo the consumed entry back to it
    // (the token itself is never forwarded upstream).
    if let Some(f) = &hs.found {
        if let Some(TokenSource::Subprotocol(prefix)) = j.token_sources().get(f.source) {
            if auth.protocols.is_empty() {
                auth.token_protocol = Some(format!("{prefix}{}", f.token));
            }
        }
    }
    // Client copies of the claim headers are already gone: they are among
    // the policy's asserted headers (contract section 7).
    for (claim, header) in j.forward_claims() {
        if let Some(v) = claims
            .and_then(|c| c.get(claim))
            .and_then(jwt::claim_header_value)
        {
            auth.claim_headers.push((header.clone(), v));
        }
    }
    let claims = verified?;
    if let Some(claims) = &claims {
        auth.subject = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .map(str::to_string);
        if let Some(h) = &hs.route.hmac {
            auth.derive = h.derive_inputs(claims);
        }
        if j.close_on_expiry() {
            auth.expires = j.session_deadline(claims).map(|at| {
                let left = at
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default();
                Instant::now() + left
            });
        }
    }
    hs.claims = claims;
    Ok(())
}

/// `hmac.bind_claim`: the claim every signature of the session is bound to.
fn bind_claim(hs: &mut Handshake<'_, '_>) -> Result<(), Reject> {
    let (Some(claims), Some(h)) = (&hs.claims, &hs.route.hmac) else {
        return Ok(());
    };
    let Some(name) = &h.bind_claim else {
        return Ok(());
    };
    match claims.get(name).and_then(|v| v.as_str()) {
        // A newline would let the bind value run into the next canonical
        // field.
        Some(v) if !v.contains('\n') => {
            hs.out.auth.bind = v.to_string();
            Ok(())
        }
        _ => Err(Reject::Unauthorized(JwtError::MissingClaim(name.clone()))),
    }
}

/// Per-subject connection slots: fleet-wide in Redis when `limits.shared`
/// is set, else in this replica.
async fn subject_slots(hs: &mut Handshake<'_, '_>) -> Result<(), Reject> {
    let (Some(sub), Some(cap)) = (
        hs.out.auth.subject.as_deref(),
        hs.rt.policy.per_subject_connections,
    ) else {
        return Ok(());
    };
    let local = || {
        hs.process
            .subjects
            .acquire(sub.to_string(), u64::MAX, Some(cap))
            .map(|s| (Some(s), None))
            .map_err(|_| Reject::ConnectionCap { retry_after: 1 })
    };
    let (subject_slot, shared_slot) = match &hs.rt.shared_limiter {
        None => local()?,
        Some(limiter) => match limiter
            .acquire_slot_guard(&format!("conn:sub:{sub}"), cap)
            .await
        {
            Ok(slot) => (None, Some(slot)),
            Err(Decision::Unavailable) => {
                hs.process.metrics.shared_unavailable.inc();
                match limiter.on_error() {
                    OnError::Local => local()?,
                    OnError::Allow => (None, None),
                    OnError::Deny => return Err(Reject::SharedUnavailable),
                }
            }
            Err(_) => return Err(Reject::ConnectionCap { retry_after: 1 }),
        },
    };
    hs.out.subject_slot = subject_slot;
    hs.out.shared_slot = shared_slot;
    Ok(())
}

async fn breaker(hs: &mut Handshake<'_, '_>) -> Result<(), Reject> {
    let Some(b) = &hs.derived.breaker else {
        return Ok(());
    };
    let permit = b.acquire().await.map_err(|wait| Reject::CircuitOpen {
        retry_after: crate::guard::limits::ceil_secs(wait),
    })?;
    hs.out.permit = Some(permit);
    Ok(())
}

/// The token guard of a route: a JWT check or token introspection (policy
/// load makes sure at most one is on).
enum TokenGuard<'a> {
    Jwt(&'a jwt::Jwt, &'a jwt::Verifier),
    Introspection(&'a crate::guard::introspect::Introspector),
}

impl TokenGuard<'_> {
    fn mode(&self) -> Mode {
        match self {
            TokenGuard::Jwt(j, _) => j.mode,
            TokenGuard::Introspection(i) => i.policy().mode,
        }
    }

    fn token_sources(&self) -> &[TokenSource] {
        match self {
            TokenGuard::Jwt(j, _) => &j.token_sources,
            TokenGuard::Introspection(i) => &i.policy().token_sources,
        }
    }

    fn forward_token(&self) -> bool {
        match self {
            TokenGuard::Jwt(j, _) => j.forward_token,
            TokenGuard::Introspection(i) => i.policy().forward_token,
        }
    }

    fn forward_claims(&self) -> &[(String, HeaderName)] {
        match self {
            TokenGuard::Jwt(j, _) => &j.forward_claims,
            TokenGuard::Introspection(i) => &i.policy().forward_claims,
        }
    }

    fn close_on_expiry(&self) -> bool {
        match self {
            TokenGuard::Jwt(j, _) => j.close_on_expiry,
            TokenGuard::Introspection(i) => i.policy().close_on_expiry,
        }
    }

    fn session_deadline(&self, claims: &jwt::Claims) -> Option<std::time::SystemTime> {
        match self {
            TokenGuard::Jwt(j, _) => j.session_deadline(claims),
            TokenGuard::Introspection(i) => i.policy().session_deadline(claims),
        }
    }

    fn allow_on_error(&self) -> bool {
        matches!(self, TokenGuard::Introspection(i)
            if i.policy().on_error == crate::config::IntrospectionOnError::Allow)
    }

    fn report_label(&self) -> &'static str {
        match self {
            TokenGuard::Jwt(..) => "jwt_report",
            TokenGuard::Introspection(_) => "introspection_report",
        }
    }

    /// The rejection label of a token found in more than one place.
    fn ambiguous_label(&self) -> &'static str {
        match self {
            TokenGuard::Jwt(..) => "jwt_ambiguous",
            TokenGuard::Introspection(_) => "introspection_ambiguous",
        }
    }

    /// Checks the token found (None: none was) within the handshake's
    /// deadline.
    async fn verify(&self, token: Option<&str>, deadline: Instant) -> Result<jwt::Claims, Reject> {
        match self {
            TokenGuard::Jwt(_, verifier) => {
                let token = token.ok_or(Reject::Unauthorized(JwtError::Missing))?;
                tokio::time::timeout_at(deadline, verifier.verify(token))
                    .await
                    .unwrap_or(Err(JwtError::UnknownKey))
                    .map_err(Reject::Unauthorized)
            }
            TokenGuard::Introspection(i) => i.check(token, deadline).await.map_err(|e| match e {
                crate::guard::introspect::IntrospectError::Unavailable(_) => {
                    Reject::IntrospectionUnavailable(e)
                }
                other => Reject::TokenInactive(other),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cheap first: local counters, the origin's header scan and the rate
    /// before the token (a signature, maybe a key fetch or an introspection
    /// call), and the shared limits (a Redis round trip) after it.
    #[test]
    fn checks_run_cheap_first() {
        let at = |c: Check| CHECKS.iter().position(|x| *x == c).unwrap();
        assert!(at(Check::PendingCap) < at(Check::Connections));
        assert!(at(Check::Connections) < at(Check::Origin));
        assert!(at(Check::Origin) < at(Check::Rate));
        assert!(at(Check::Rate) < at(Check::TokenSources));
        assert!(at(Check::TokenSources) < at(Check::Token));
        assert!(at(Check::Token) < at(Check::BindClaim));
        assert!(at(Check::BindClaim) < at(Check::SubjectSlots));
        assert!(at(Check::SubjectSlots) < at(Check::Breaker));
    }
}
